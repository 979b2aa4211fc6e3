//! Where the proxy answers whether it is ready: `GET <PATH>` on its
//! readiness port (default [`crate::ports::READINESS`]) answers 200 when
//! ready, otherwise 503 with `not ready: waiting for ...` as the body's
//! first line. The shim gates app containers on it, as kubelet would.

pub const PATH: &str = "/healthz/ready";
