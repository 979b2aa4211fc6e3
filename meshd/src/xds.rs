//! The delta ADS endpoint (`DeltaAggregatedResources`): authenticates the
//! stream, then runs one task per stream that answers requests through
//! [`Watch`] and pushes inventory changes as deltas.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sidetunnel_proto::envoy::config::core::v3::{ControlPlane, Node};
use sidetunnel_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use sidetunnel_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::auth::{Authenticator, check_node};
use crate::jwt::Identity;
use crate::mode::Extensions;
use crate::snapshot::{Diff, Snapshot, TypeUrl};
use crate::subscription::{Options, Outgoing, Reaction, Watch};

/// Identifies this server in `DeltaDiscoveryResponse.control_plane`.
pub const CONTROL_PLANE_ID: &str = "sidetunnel-meshd";

/// A served snapshot and the diff from the one published just before it.
#[derive(Debug, Default)]
pub struct Published {
    pub generation: u64,
    pub snapshot: Arc<Snapshot>,
    pub diff_from_previous: Diff,
}

pub struct AdsService {
    auth: Arc<Authenticator>,
    snapshots: watch::Receiver<Arc<Published>>,
    streams: AtomicU64,
    extensions: Extensions,
}

impl AdsService {
    pub fn new(
        auth: Arc<Authenticator>,
        snapshots: watch::Receiver<Arc<Published>>,
        extensions: Extensions,
    ) -> Self {
        AdsService {
            auth,
            snapshots,
            streams: AtomicU64::new(0),
            extensions,
        }
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".into());
        let identity = self
            .auth
            .authenticate(request.metadata())
            .inspect_err(|e| {
                warn!(%peer, "xDS stream refused: {}", e.message());
            })?;
        let id = self.streams.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel(16);
        let stream = StreamTask {
            id,
            peer,
            identity,
            tx,
            snapshots: self.snapshots.clone(),
            watches: HashMap::new(),
            nonces: 0,
            node_checked: false,
            opts: Options {
                extensions: self.extensions,
                node_name: None,
            },
        };
        tokio::spawn(stream.run(request.into_inner()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct StreamTask {
    id: u64,
    peer: String,
    identity: Identity,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    snapshots: watch::Receiver<Arc<Published>>,
    watches: HashMap<TypeUrl, Watch>,
    nonces: u64,
    node_checked: bool,
    /// Extensions, and the client's `NODE_NAME` from its first node.
    opts: Options,
}

/// Why a stream ended early.
enum End {
    /// The client went away (or the response channel closed).
    Gone,
    /// Tell the client this, then close.
    Error(Status),
}

impl StreamTask {
    async fn run(mut self, mut input: Streaming<DeltaDiscoveryRequest>) {
        let mut current = self.snapshots.borrow_and_update().clone();
        info!(
            stream = self.id,
            peer = %self.peer,
            identity = %format!("{}/{}", self.identity.namespace, self.identity.service_account),
            "xDS stream opened"
        );
        let end = loop {
            tokio::select! {
                msg = input.message() => match msg {
                    Ok(Some(req)) => {
                        if let Err(end) = self.on_request(req, &current).await {
                            break end;
                        }
                    }
                    Ok(None) => break End::Gone,
                    Err(status) => {
                        debug!(stream = self.id, "xDS stream receive error: {status}");
                        break End::Gone;
                    }
                },
                changed = self.snapshots.changed() => {
                    if changed.is_err() {
                        break End::Error(Status::unavailable("control plane shutting down"));
                    }
                    let next = self.snapshots.borrow_and_update().clone();
                    if let Err(end) = self.on_change(&current, &next).await {
                        break end;
                    }
                    current = next;
                }
            }
        };
        if let End::Error(status) = end {
            warn!(stream = self.id, peer = %self.peer, "closing xDS stream: {}", status.message());
            let _ = self.tx.send(Err(status)).await;
        }
        info!(stream = self.id, "xDS stream closed");
    }

    async fn on_request(
        &mut self,
        req: DeltaDiscoveryRequest,
        current: &Published,
    ) -> Result<(), End> {
        let snap = &current.snapshot;
        match &req.node {
            Some(node) => {
                check_node(&self.identity, node).map_err(End::Error)?;
                if !self.node_checked {
                    self.opts.node_name = node_name(node);
                    info!(stream = self.id, node = %node.id, node_name = ?self.opts.node_name, "xDS node");
                }
                self.node_checked = true;
            }
            None if !self.node_checked => {
                return Err(End::Error(Status::invalid_argument(
                    "the first request on an xDS stream must carry node",
                )));
            }
            None => {}
        }
        let Some(t) = TypeUrl::parse(&req.type_url) else {
            warn!(stream = self.id, type_url = %req.type_url, "ignoring request for unsupported type");
            return Ok(());
        };
        let out = match self.watches.get_mut(&t) {
            None => {
                debug!(
                    stream = self.id, ?t,
                    subscribe = ?req.resource_names_subscribe,
                    unsubscribe = ?req.resource_names_unsubscribe,
                    initial = req.initial_resource_versions.len(),
                    "first request"
                );
                let (w, out) = Watch::first(t, &req, snap, &self.opts);
                self.watches.insert(t, w);
                out
            }
            Some(w) => match w.on_request(&req, snap) {
                Reaction::Respond(out) => {
                    if let Some(e) = &req.error_detail {
                        warn!(stream = self.id, peer = %self.peer, ?t, nonce = %req.response_nonce, "NACK (with subscriptions): code {}: {}", e.code, e.message);
                    }
                    out
                }
                Reaction::Ack => {
                    debug!(stream = self.id, ?t, nonce = %req.response_nonce, "ACK");
                    return Ok(());
                }
                Reaction::Nack(reason) => {
                    warn!(stream = self.id, peer = %self.peer, ?t, nonce = %req.response_nonce, "NACK: {reason}");
                    return Ok(());
                }
                Reaction::Ignore => return Ok(()),
            },
        };
        self.send(t, out, current.generation).await
    }

    async fn on_change(&mut self, prev: &Published, next: &Published) -> Result<(), End> {
        // The precomputed diff is only valid if no publication was skipped.
        let diff = (next.generation == prev.generation + 1).then_some(&next.diff_from_previous);
        let mut pending = Vec::new();
        for (t, w) in self.watches.iter_mut() {
            let out = w.on_change(&next.snapshot, diff.map(|d| d.of(*t)));
            if !out.is_empty() {
                pending.push((*t, out));
            }
        }
        for (t, out) in pending {
            self.send(t, out, next.generation).await?;
        }
        Ok(())
    }

    async fn send(&mut self, t: TypeUrl, out: Outgoing, generation: u64) -> Result<(), End> {
        self.nonces += 1;
        let nonce = format!("{}-{}-{}", self.id, generation, self.nonces);
        debug!(
            stream = self.id, ?t, nonce = %nonce,
            resources = out.resources.len(), removed = out.removed.len(), "push"
        );
        if let Some(w) = self.watches.get_mut(&t) {
            w.set_nonce(nonce.clone());
        }
        let resp = response(t, out, nonce, generation);
        self.tx.send(Ok(resp)).await.map_err(|_| End::Gone)
    }
}

/// The `NODE_NAME` string metadata of a client's node, if set and not
/// empty (istiod's `proxy.Metadata.NodeName`).
pub fn node_name(node: &Node) -> Option<String> {
    let v = node.metadata.as_ref()?.fields.get("NODE_NAME")?;
    match &v.kind {
        Some(prost_types::value::Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// The response message exactly as a stream sends it (also used by the
/// scale model and benchmarks to size and replay real responses).
pub fn response(
    t: TypeUrl,
    out: Outgoing,
    nonce: String,
    generation: u64,
) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        system_version_info: generation.to_string(),
        resources: out.resources,
        type_url: t.as_str().to_owned(),
        removed_resources: out.removed,
        nonce,
        control_plane: Some(ControlPlane {
            identifier: CONTROL_PLANE_ID.into(),
        }),
    }
}
