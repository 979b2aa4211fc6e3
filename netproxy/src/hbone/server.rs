//! HBONE server side: serves the HTTP/2 connection of one accepted mTLS
//! connection. Each CONNECT stream is independent: a malformed request gets
//! 400 on its own stream, others carry on. Well-formed requests go to the
//! handler, which decides (authorization, upstream connect) and answers with
//! [`InboundRequest::reject`] or [`InboundRequest::accept`].

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

use super::headers::{
    BAGGAGE, Baggage, TRACEPARENT, forwarded_for, forwarded_host, parse_authority,
};
use super::{CopyCounters, CopyResult, H2Config, HboneError, HboneStream, ping};
use crate::identity::Identity;

/// One well-formed CONNECT request, awaiting the handler's decision.
pub struct InboundRequest {
    parts: http::request::Parts,
    destination: SocketAddr,
    peer: Identity,
    recv: h2::RecvStream,
    respond: h2::server::SendResponse<Bytes>,
}

impl std::fmt::Debug for InboundRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundRequest")
            .field("destination", &self.destination)
            .field("peer", &self.peer.to_string())
            .field("headers", &self.parts.headers)
            .finish()
    }
}

impl InboundRequest {
    /// The `:authority` (`ip:port` of the destination workload).
    pub fn destination(&self) -> SocketAddr {
        self.destination
    }

    /// The client's verified SPIFFE identity (from its certificate).
    pub fn peer_identity(&self) -> &Identity {
        &self.peer
    }

    /// All request headers.
    pub fn headers(&self) -> &http::HeaderMap {
        &self.parts.headers
    }

    fn header(&self, name: impl http::header::AsHeaderName) -> Option<&str> {
        self.parts.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Original client IP from `forwarded: for=…`.
    pub fn forwarded_for(&self) -> Option<IpAddr> {
        self.header(http::header::FORWARDED).and_then(forwarded_for)
    }

    /// Service hostname from `forwarded: …;host=…`.
    pub fn forwarded_host(&self) -> Option<String> {
        self.header(http::header::FORWARDED)
            .and_then(forwarded_host)
    }

    /// The client workload's metadata from `baggage`.
    pub fn baggage(&self) -> Option<Baggage> {
        self.header(BAGGAGE).map(Baggage::parse)
    }

    /// The raw `traceparent`.
    pub fn traceparent(&self) -> Option<&str> {
        self.header(TRACEPARENT)
    }

    /// Answers with `status` (401 for denied, 503 for upstream failure, …)
    /// and ends the stream.
    pub fn reject(mut self, status: StatusCode) {
        if let Err(e) = self.respond.send_response(response(status), true) {
            tracing::debug!(error = %e, %status, "sending HBONE rejection failed");
        }
    }

    /// Answers 200 and returns the tunnel. Call only once the upstream
    /// connection is established (the client treats 200 as "connected").
    pub fn accept(mut self) -> Result<HboneStream, HboneError> {
        let send = self
            .respond
            .send_response(response(StatusCode::OK), false)?;
        Ok(HboneStream::new(send, self.recv, None))
    }

    /// `accept` then splice the tunnel with `upstream` until both sides
    /// close. `a_to_b` of the result counts client → upstream bytes.
    pub async fn accept_and_splice<U>(
        self,
        upstream: &mut U,
        counters: Option<&CopyCounters>,
    ) -> Result<CopyResult, HboneError>
    where
        U: super::Splice + ?Sized,
    {
        let mut tunnel = self.accept()?;
        let result = super::copy_bidirectional(&mut tunnel, upstream, counters).await;
        if result.error.is_some() {
            tunnel.reset();
        }
        Ok(result)
    }
}

fn response(status: StatusCode) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = status;
    r
}

/// Serves HBONE on an established (m)TLS stream whose client is `peer`.
/// Each well-formed CONNECT is passed to `handler` on its own task. When
/// `shutdown` completes, the connection is drained: GOAWAY, no new streams,
/// returns once open streams finish. Returns when the peer closes.
pub async fn serve_connection<IO, H, Fut>(
    io: IO,
    peer: Identity,
    cfg: &H2Config,
    shutdown: impl Future<Output = ()>,
    handler: H,
) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: Fn(InboundRequest) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(cfg.stream_window)
        .initial_connection_window_size(cfg.connection_window)
        .max_frame_size(cfg.max_frame_size)
        // CONNECT requests carry a handful of headers.
        .max_header_list_size(64 * 1024)
        // A few chunks per stream: see `SEND_BUFFER`.
        .max_send_buffer_size(super::SEND_BUFFER)
        .max_concurrent_streams(cfg.server_max_concurrent_streams)
        .handshake::<_, Bytes>(io);
    // h2 waits for the client preface without a deadline and keepalive
    // pings start only after it: a client trickling the preface (slow
    // loris) would hold the connection forever.
    let mut conn = tokio::time::timeout(cfg.connect_timeout, handshake)
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "HBONE client did not send the HTTP/2 preface in time",
            )
        })??;
    let mut keepalive = pin!(ping::keepalive(
        conn.ping_pong(),
        cfg.keepalive_interval,
        cfg.keepalive_timeout
    ));
    let mut shutdown = pin!(shutdown);
    let mut draining = false;
    loop {
        tokio::select! {
            request = conn.accept() => {
                let (request, respond) = match request {
                    None => return Ok(()),
                    Some(Ok(r)) => r,
                    Some(Err(e)) => return Err(e.into()),
                };
                dispatch(request, respond, &peer, &handler);
            }
            _ = &mut shutdown, if !draining => {
                tracing::debug!(%peer, "draining HBONE connection");
                conn.graceful_shutdown();
                draining = true;
            }
            _ = &mut keepalive => {
                conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                return Err(HboneError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "HBONE peer stopped answering keepalive pings",
                )));
            }
        }
    }
}

fn dispatch<H, Fut>(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    peer: &Identity,
    handler: &H,
) where
    H: Fn(InboundRequest) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (parts, recv) = request.into_parts();
    let bad = |respond: &mut h2::server::SendResponse<Bytes>, why: String| {
        tracing::debug!(%peer, reason = %why, "rejecting malformed HBONE request");
        let _ = respond.send_response(response(StatusCode::BAD_REQUEST), true);
    };
    if parts.method != Method::CONNECT {
        return bad(
            &mut respond,
            format!("method {} is not CONNECT", parts.method),
        );
    }
    let destination = match parse_authority(&parts.uri) {
        Ok(d) => d,
        Err(e) => return bad(&mut respond, e.to_string()),
    };
    let req = InboundRequest {
        parts,
        destination,
        peer: peer.clone(),
        recv,
        respond,
    };
    tokio::spawn(handler(req));
}
