//! sidetunnel-meshd: a local control plane serving Istio's xDS (delta ADS for
//! `Address` and `Authorization`) and CA (`CreateCertificate`) APIs from a
//! mesh inventory file, as istiod serves them to ztunnel.
//!
//! Layers: `inventory` (YAML → validated protos) → `snapshot` (encoded,
//! indexed resources) → `subscription` (istiod's delta semantics, pure) →
//! `xds` / `ca` (gRPC services) → `server` (TLS port, `watch`er).

pub mod auth;
pub mod ca;
pub mod duration;
pub mod generate;
pub mod inventory;
pub mod jwt;
pub mod mode;
pub mod pki;
pub mod scale;
pub mod server;
pub mod snapshot;
pub mod subscription;
pub mod watch;
pub mod xds;
