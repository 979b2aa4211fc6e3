//! The kubelet's side of a pod start that critest does not play: before a
//! kubelet calls RunPodSandbox it has mounted the pod's projected
//! service-account token. critest talks CRI to this front, which forwards
//! every call to containerd unchanged (gRPC over HTTP/2, bytes untouched),
//! and for RunPodSandbox first runs a hook with the pod's metadata (the
//! test mints the token there) and afterwards a second one with the new
//! sandbox id (the test publishes the workload to the control plane).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use tokio::net::{UnixListener, UnixStream};

use crate::cri::api;

const RUN_POD: &str = "/runtime.v1.RuntimeService/RunPodSandbox";

/// Called before RunPodSandbox is forwarded (pod metadata) and after it
/// succeeded (metadata, sandbox id).
pub trait Kubelet: Send + Sync + 'static {
    fn before_run(&self, pod: &api::PodSandboxMetadata) -> Result<()>;
    fn after_run(&self, pod: &api::PodSandboxMetadata, sandbox_id: &str);
}

pub struct Front {
    socket: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Front {
    /// Listens on `socket`, forwarding to containerd's CRI at `upstream`.
    pub fn start(socket: &Path, upstream: &Path, kubelet: Arc<dyn Kubelet>) -> Result<Front> {
        let _ = std::fs::remove_file(socket);
        let listener =
            UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
        let upstream = upstream.to_owned();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (upstream, kubelet) = (upstream.clone(), kubelet.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve(conn, &upstream, kubelet).await {
                        tracing::debug!("CRI front connection: {e:#}");
                    }
                });
            }
        });
        Ok(Front {
            socket: socket.to_owned(),
            task,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

type Body = BoxBody<Bytes, hyper::Error>;

async fn serve(conn: UnixStream, upstream: &Path, kubelet: Arc<dyn Kubelet>) -> Result<()> {
    let up = UnixStream::connect(upstream).await?;
    let (sender, up_conn) =
        hyper::client::conn::http2::handshake::<_, _, Body>(TokioExecutor::new(), TokioIo::new(up))
            .await?;
    tokio::spawn(up_conn);
    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let (mut sender, kubelet) = (sender.clone(), kubelet.clone());
        async move {
            if req.uri().path() != RUN_POD {
                let req = req.map(|b| b.boxed());
                return sender.send_request(req).await.map(|r| r.map(|b| b.boxed()));
            }
            let (parts, body) = req.into_parts();
            let data = body.collect().await?.to_bytes();
            let meta = decode::<api::RunPodSandboxRequest>(&data)
                .and_then(|r| r.config.and_then(|c| c.metadata));
            let refused = match &meta {
                Some(m) => kubelet.before_run(m).err(),
                None => None,
            };
            if let Some(e) = refused {
                tracing::warn!("kubelet hook before RunPodSandbox: {e:#}");
            }
            let req =
                hyper::Request::from_parts(parts, Full::new(data).map_err(|n| match n {}).boxed());
            let resp = sender.send_request(req).await?;
            let Some(meta) = meta else {
                return Ok(resp.map(|b| b.boxed()));
            };
            // Buffer the (small) reply to learn the sandbox id, trailers kept.
            let (parts, body) = resp.into_parts();
            let collected = body.collect().await?;
            let trailers = collected.trailers().cloned();
            let data = collected.to_bytes();
            if let Some(r) = decode::<api::RunPodSandboxResponse>(&data) {
                kubelet.after_run(&meta, &r.pod_sandbox_id);
            }
            if data.is_empty() && trailers.is_none() {
                // A trailers-only reply (an error) stays one: END_STREAM
                // on the headers, no frame after them.
                let body = http_body_util::Empty::new().map_err(|n| match n {});
                return Ok(hyper::Response::from_parts(parts, body.boxed()));
            }
            let mut frames = vec![Ok(hyper::body::Frame::data(data))];
            if let Some(t) = trailers {
                frames.push(Ok(hyper::body::Frame::trailers(t)));
            }
            let body = http_body_util::StreamBody::new(futures_iter(frames));
            Ok(hyper::Response::from_parts(parts, body.boxed()))
        }
    });
    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(conn), svc)
        .await?;
    Ok(())
}

/// A stream over ready frames.
fn futures_iter(
    frames: Vec<Result<hyper::body::Frame<Bytes>, hyper::Error>>,
) -> tokio_stream::Iter<std::vec::IntoIter<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
    tokio_stream::iter(frames)
}

/// The message of a single uncompressed gRPC frame.
fn decode<M: Message + Default>(data: &[u8]) -> Option<M> {
    if data.len() < 5 || data[0] != 0 {
        return None;
    }
    let len = u32::from_be_bytes(data[1..5].try_into().ok()?) as usize;
    M::decode(data.get(5..5 + len)?).ok()
}
