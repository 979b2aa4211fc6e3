//! A minimal HTTP/1.1 server for the proxy's small endpoints: one handler
//! function, TCP or Unix listeners, stops accepting on cancellation. Request
//! bodies are ignored (all endpoints are driven by path and query).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tracing::debug;

pub type Request = hyper::Request<Incoming>;
pub(super) type Handler = Arc<dyn Fn(Request) -> Response<Full<Bytes>> + Send + Sync>;

/// Slow clients may not hold a connection open forever.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) async fn serve_tcp(listener: TcpListener, handler: Handler, stop: CancellationToken) {
    serve(|| listener.accept(), handler, stop).await
}

pub(super) async fn serve_unix(listener: UnixListener, handler: Handler, stop: CancellationToken) {
    serve(|| listener.accept(), handler, stop).await
}

async fn serve<S, A, F, Fut>(accept: F, handler: Handler, stop: CancellationToken)
where
    F: Fn() -> Fut,
    Fut: Future<Output = std::io::Result<(S, A)>>,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            r = accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    debug!("admin accept: {e}");
                    // Typically EMFILE; back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let handler = handler.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let resp = handler(req);
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { debug!("admin connection: {e}") },
                _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
}
