//! The per-pod sidetunnel proxy library, one module per concern:
//! `config` (flags/env/file), `state` (indexed xDS store) and `xds` (delta ADS
//! client).

pub mod config;
pub mod state;
pub mod xds;
