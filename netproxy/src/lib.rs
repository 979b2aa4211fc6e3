//! The per-pod sidetunnel proxy library, one module per concern:
//! `config` (flags/env/file), `state` (indexed xDS store), `xds` (delta ADS
//! client), `identity` (certificates: Istio CA or files), `tls` (rustls
//! configs for HBONE and xDS), `hbone` (HTTP/2 CONNECT tunnels and pool),
//! `proxy` (listeners: outbound, inbound, inbound plaintext), `authz` (L4
//! AuthorizationPolicy), `metrics` (Prometheus), `admin` (readiness and the
//! Unix-socket admin API).

pub mod admin;
pub mod authz;
pub mod config;
pub mod hbone;
pub mod identity;
pub mod metrics;
pub mod proxy;
pub mod state;
pub mod tls;
pub mod xds;
