//! The contract between the shim and the proxy it launches in every pod:
//! everything both sides must spell the same way lives here, once.
//!
//! * `env`: the environment variables the shim sets and the proxy reads;
//! * `ports`: the proxy's default ports and socket mark (also the defaults
//!   of the redirection rules that send traffic to them);
//! * `readiness`: where the shim asks the proxy whether it is ready;
//! * `handover`: how the shim keeps the proxy's listeners and hands them
//!   to the next proxy (upgrade, restart);
//! * `prefetch`: the grammar of the prefetch list and the `--xds-prefetch`
//!   flag carrying it, so the shim refuses a bad list before launching.
//!
//! Deliberately small and dependency-free (no tokio, rustls, HTTP): the shim
//! links it instead of the proxy crate.

pub mod env;
pub mod handover;
pub mod ports;
pub mod prefetch;
pub mod readiness;
