//! The per-pod sidetunnel proxy library, one module per concern (lowest
//! first; each imports only modules above it in this list, see
//! ARCHITECTURE.md):
//! `config` (flags/env/file), `state` (indexed xDS store), `socket` (marked
//! sockets, TPROXY, original destination), `crypto` (the rustls provider), `handover` (listeners
//! inherited from and given to the shim),
//! `identity` (SPIFFE identity, the current certificate), `tls` (rustls
//! configs for HBONE and the control plane), `cert_source` (certificates
//! from the Istio CA or files), `xds` (delta ADS client), `hbone` (HTTP/2
//! CONNECT tunnels and pool), `authz` (L4 AuthorizationPolicy), `metrics`
//! (Prometheus), `dns` (the in-pod DNS proxy), `admin` (readiness, logging, the Unix-socket admin API),
//! `proxy` (the listeners and the wiring of all of the above).

pub mod admin;
pub mod authz;
pub mod cert_source;
pub mod config;
pub mod crypto;
pub mod dns;
pub mod handover;
pub mod hbone;
pub mod identity;
pub mod metrics;
pub mod proxy;
pub mod socket;
pub mod state;
pub mod tls;
pub mod xds;
