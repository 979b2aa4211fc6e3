//! The proxy's default ports and socket mark. The redirection rules the
//! shim installs send traffic to these ports and exempt the mark, so the
//! proxy and the rules must default to the same numbers.

/// Outbound capture (original destination via `SO_ORIGINAL_DST`).
pub const OUTBOUND: u16 = 15001;
/// Inbound plaintext capture (TPROXY).
pub const INBOUND_PLAINTEXT: u16 = 15006;
/// Inbound HBONE (mTLS HTTP/2 CONNECT).
pub const HBONE: u16 = 15008;
/// Prometheus metrics.
pub const METRICS: u16 = 15020;
/// Readiness (see [`crate::readiness`]).
pub const READINESS: u16 = 15021;
/// DNS proxy (UDP and TCP, on loopback), when DNS capture is on.
pub const DNS: u16 = 15053;
/// The mark on the proxy's own sockets, which the rules let pass
/// uncaptured (otherwise its upstream connections would loop back to it).
pub const MARK: u32 = 0x539;
