//! The stream loop: connect (TLS, bearer token, `clusterid`), send one
//! initial request per type (subscriptions + `initial_resource_versions`),
//! then apply responses and ACK/NACK them while forwarding on-demand
//! subscriptions and dropping idle ones, until the stream breaks; then back
//! off and reconnect.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use rand::Rng;
use sidetunnel_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
};
use sidetunnel_proto::google::rpc::Status as RpcStatus;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tracing::{debug, info, warn};

use super::{
    AddressDemand, Command, Shared, Subscription, XdsConfig, XdsError, XdsHandle, XdsStats,
    XdsStatus, handler,
};
use crate::state::Store;

/// Largest response accepted; a full WDS of a big mesh is tens of MB.
const MAX_MESSAGE: usize = 256 << 20;
/// gRPC code INVALID_ARGUMENT, sent in NACKs as istiod expects a non-zero code.
const INVALID_ARGUMENT: i32 = 3;

/// Per-type subscription state, kept across reconnects.
struct TypeState {
    type_url: &'static str,
    wildcard: bool,
    /// On-demand names (initial + demanded), re-sent on every connect.
    subscribed: BTreeSet<String>,
    /// The initial names: never dropped as idle.
    pinned: BTreeSet<String>,
    /// Names subscribed on the current stream since the last response of
    /// this type: a repeated demand for one of them is not re-sent (a burst
    /// of connections to a new destination costs one request). Any other
    /// demand is sent even if the name is subscribed already: the store
    /// asks only when it holds no answer for the name (e.g. what it
    /// resolved to was removed since), and the server answers every
    /// subscribe request.
    awaiting: BTreeSet<String>,
    /// Version of each resource the store holds, by resource name.
    versions: HashMap<String, String>,
    /// Whether readiness waits for a first response of this type.
    expected: bool,
    received: bool,
}

/// The xDS client. Create it, take a [`XdsHandle`], then `run` or `spawn` it.
pub struct XdsClient {
    cfg: XdsConfig,
    store: Arc<Store>,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedReceiver<Command>,
    types: Vec<TypeState>,
    attempt: u64,
}

impl XdsClient {
    /// A client feeding `store`. In on-demand Address mode it installs itself
    /// as the store's demander, so `Store::fetch_on_demand` subscribes.
    pub fn new(cfg: XdsConfig, store: Arc<Store>) -> XdsClient {
        let (tx, commands) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            stats: XdsStats::default(),
            status: watch::channel(XdsStatus::default()).0,
            commands: tx.clone(),
        });
        let ty = |type_url, sub: &Subscription| {
            let (wildcard, subscribed) = match sub {
                Subscription::Wildcard => (true, BTreeSet::new()),
                Subscription::OnDemand { initial } => (false, initial.iter().cloned().collect()),
            };
            TypeState {
                type_url,
                wildcard,
                expected: wildcard || !subscribed.is_empty(),
                pinned: subscribed.clone(),
                subscribed,
                awaiting: BTreeSet::new(),
                versions: HashMap::new(),
                received: false,
            }
        };
        let types = vec![
            ty(super::ADDRESS_TYPE_URL, &cfg.addresses),
            ty(super::AUTHORIZATION_TYPE_URL, &cfg.authorizations),
        ];
        if !types[0].wildcard {
            store.set_demand(Arc::new(AddressDemand(tx)));
        }
        XdsClient {
            cfg,
            store,
            shared,
            commands,
            types,
            attempt: 0,
        }
    }

    /// A handle for status, counters and subscriptions.
    pub fn handle(&self) -> XdsHandle {
        XdsHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Runs on a new task; abort the task to stop the client.
    pub fn spawn(self) -> (XdsHandle, tokio::task::JoinHandle<()>) {
        let handle = self.handle();
        (handle, tokio::spawn(self.run()))
    }

    /// Connects and serves forever, reconnecting with jittered exponential
    /// backoff (reset after a stream that delivered a response).
    pub async fn run(mut self) {
        let mut backoff = self.cfg.backoff.initial;
        loop {
            self.attempt += 1;
            let attempt = self.attempt;
            self.shared.status.send_modify(|s| s.attempt = attempt);
            let mut delivered = false;
            let err = self.connect_and_serve(&mut delivered).await;
            if delivered {
                backoff = self.cfg.backoff.initial;
            }
            let delay = jitter(backoff);
            warn!(attempt, error = %err, retry_in = ?delay, "xDS connection ended");
            self.shared.status.send_modify(|s| {
                s.connected = false;
                s.last_error = Some(err.to_string());
            });
            tokio::time::sleep(delay).await;
            backoff = (backoff * 2).min(self.cfg.backoff.max);
        }
    }

    /// One connection: returns why it ended. `delivered` is set once a
    /// response has been applied on this stream.
    async fn connect_and_serve(&mut self, delivered: &mut bool) -> XdsError {
        self.drain_commands();
        let (tx, mut stream) = match self.open().await {
            Ok(v) => v,
            Err(e) => {
                self.shared.stats.connect_failed();
                return e;
            }
        };
        self.shared.stats.connected();
        self.shared.status.send_modify(|s| {
            s.connected = true;
            s.last_error = None;
        });
        info!(address = %self.cfg.address, attempt = self.attempt, "xDS stream established");
        let mut sweep = tokio::time::interval(sweep_period(self.cfg.idle_timeout));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = stream.message() => match msg {
                    Ok(Some(resp)) => {
                        if let Err(e) = self.on_response(resp, &tx).await {
                            return e;
                        }
                        *delivered = true;
                    }
                    Ok(None) => return self.closed(),
                    Err(status) => return XdsError::Stream {
                        address: self.cfg.address.clone(),
                        code: status.code(),
                        message: status.message().to_string(),
                    },
                },
                Some(cmd) = self.commands.recv() => {
                    for req in self.apply_command(cmd) {
                        if let Err(e) = self.send(&tx, req).await {
                            return e;
                        }
                    }
                }
                _ = sweep.tick(), if self.cfg.idle_timeout.is_some() => {
                    if let Some(req) = self.sweep_idle()
                        && let Err(e) = self.send(&tx, req).await {
                        return e;
                    }
                }
            }
        }
    }

    /// Drops on-demand Address names unused for the idle timeout (pinned
    /// names never): the store forgets them and removes what only they
    /// brought; the returned request unsubscribes the names and those
    /// canonical names, so the server stops pushing them.
    fn sweep_idle(&mut self) -> Option<DeltaDiscoveryRequest> {
        let max_idle = self.cfg.idle_timeout?;
        let t = self
            .types
            .iter_mut()
            .find(|t| t.type_url == super::ADDRESS_TYPE_URL && !t.wildcard)?;
        let idle: Vec<String> = self
            .store
            .idle_demands(max_idle)
            .into_iter()
            .filter(|n| !t.pinned.contains(n))
            .collect();
        if idle.is_empty() {
            return None;
        }
        let keep: Vec<String> = t
            .subscribed
            .iter()
            .filter(|n| !idle.contains(n))
            .cloned()
            .collect();
        let removed = self.store.drop_demands(&idle, &keep);
        let mut unsubscribe: BTreeSet<String> = idle.into_iter().collect();
        unsubscribe.extend(removed);
        for n in &unsubscribe {
            t.subscribed.remove(n);
            t.awaiting.remove(n);
            t.versions.remove(n);
        }
        info!(names = ?unsubscribe, "dropping idle on-demand subscriptions");
        Some(DeltaDiscoveryRequest {
            type_url: t.type_url.to_string(),
            resource_names_unsubscribe: unsubscribe.into_iter().collect(),
            ..Default::default()
        })
    }

    fn closed(&self) -> XdsError {
        XdsError::Closed {
            address: self.cfg.address.clone(),
        }
    }

    /// Folds queued subscription changes into the state; the initial
    /// requests of the next stream carry them.
    fn drain_commands(&mut self) {
        while let Ok(cmd) = self.commands.try_recv() {
            let _ = self.apply_command(cmd);
        }
    }

    /// Records a subscription change; returns the requests announcing it
    /// (none if nothing changed). A name asked for again while subscribed
    /// (its answer is gone from the store: removed, or dropped) is first
    /// unsubscribed, then subscribed: istiod answers a subscription request
    /// only when it changes the subscribed set (`shouldRespondDelta`), so a
    /// repeated subscribe alone would never be answered.
    fn apply_command(&mut self, cmd: Command) -> Vec<DeltaDiscoveryRequest> {
        let (type_url, names, subscribe) = match cmd {
            Command::Subscribe(t, n) => (t, n, true),
            Command::Unsubscribe(t, n) => (t, n, false),
        };
        let Some(t) = self.types.iter_mut().find(|t| t.type_url == type_url) else {
            return Vec::new();
        };
        if t.wildcard {
            return Vec::new();
        }
        let mut again = Vec::new();
        let changed: Vec<String> = names
            .into_iter()
            .filter(|n| {
                if subscribe {
                    let new = t.subscribed.insert(n.clone());
                    let ask = t.awaiting.insert(n.clone()) || new;
                    if ask && !new {
                        again.push(n.clone());
                    }
                    ask
                } else {
                    t.awaiting.remove(n);
                    t.subscribed.remove(n)
                }
            })
            .collect();
        if changed.is_empty() {
            return Vec::new();
        }
        debug!(
            type_url,
            ?changed,
            subscribe,
            "on-demand subscription change"
        );
        let mut req = DeltaDiscoveryRequest {
            type_url: type_url.to_string(),
            ..Default::default()
        };
        let mut out = Vec::with_capacity(2);
        if !again.is_empty() {
            out.push(DeltaDiscoveryRequest {
                type_url: type_url.to_string(),
                resource_names_unsubscribe: again,
                ..Default::default()
            });
        }
        if subscribe {
            req.resource_names_subscribe = changed;
        } else {
            req.resource_names_unsubscribe = changed;
        }
        out.push(req);
        out
    }

    async fn channel(&self) -> Result<Channel, XdsError> {
        let cfg = &self.cfg;
        let bad_address = |reason: String| XdsError::Address {
            address: cfg.address.clone(),
            reason,
        };
        if !cfg.address.starts_with("https://") {
            return Err(bad_address("must be https://host:port".into()));
        }
        let pem = tokio::fs::read(&cfg.root_cert)
            .await
            .map_err(|source| XdsError::RootCert {
                path: cfg.root_cert.clone(),
                source,
            })?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(pem))
            .domain_name(cfg.server_name.clone())
            .timeout(cfg.connect_timeout);
        let endpoint = Endpoint::from_shared(cfg.address.clone())
            .map_err(|e| bad_address(error_chain(&e)))?
            .tls_config(tls)
            .map_err(|e| bad_address(error_chain(&e)))?
            .connect_timeout(cfg.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let connector = crate::tls::MarkedConnector::new(cfg.mark);
        endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|e| XdsError::Connect {
                address: cfg.address.clone(),
                reason: error_chain(&e),
            })
    }

    async fn token(&self) -> Result<Option<String>, XdsError> {
        let Some(path) = &self.cfg.token_file else {
            return Ok(None);
        };
        let raw = tokio::fs::read_to_string(path)
            .await
            .map_err(|source| XdsError::Token {
                path: path.clone(),
                source,
            })?;
        Ok(Some(raw.trim().to_string()))
    }

    /// Opens the stream with the initial requests queued.
    async fn open(
        &mut self,
    ) -> Result<
        (
            mpsc::Sender<DeltaDiscoveryRequest>,
            tonic::Streaming<DeltaDiscoveryResponse>,
        ),
        XdsError,
    > {
        let channel = self.channel().await?;
        let token = self.token().await?;
        let initial = self.initial_requests();
        let (tx, rx) = mpsc::channel(initial.len() + 64);
        for req in initial {
            self.shared.stats.request_sent();
            // Capacity exceeds the initial requests, so this cannot fail.
            let _ = tx.try_send(req);
        }
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        let md = request.metadata_mut();
        if let Some(token) = token {
            let path = self.cfg.token_file.clone().unwrap_or_default();
            let value = MetadataValue::try_from(format!("Bearer {token}"))
                .map_err(|_| XdsError::TokenFormat { path })?;
            md.insert("authorization", value);
        }
        if !self.cfg.cluster_id.is_empty()
            && let Ok(v) = MetadataValue::try_from(self.cfg.cluster_id.as_str())
        {
            md.insert("clusterid", v);
        }
        let mut client =
            AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
        let call = client.delta_aggregated_resources(request);
        let response = tokio::time::timeout(self.cfg.connect_timeout, call)
            .await
            .map_err(|_| XdsError::Timeout(self.cfg.connect_timeout))?
            .map_err(|status| XdsError::Refused {
                address: self.cfg.address.clone(),
                code: status.code(),
                message: status.message().to_string(),
            })?;
        Ok((tx, response.into_inner()))
    }

    /// One request per type: its subscriptions and the versions of what the
    /// store still holds (so the server resends only what changed).
    fn initial_requests(&mut self) -> Vec<DeltaDiscoveryRequest> {
        let node = self.cfg.node.to_proto();
        let store = &self.store;
        self.types
            .iter_mut()
            .map(|t| {
                let is_address = t.type_url == super::ADDRESS_TYPE_URL;
                // This request asks for every subscribed name.
                t.awaiting = t.subscribed.clone();
                t.versions.retain(|name, _| {
                    if is_address {
                        store.has_address(name)
                    } else {
                        store.policy(name).is_some()
                    }
                });
                let (subscribe, unsubscribe) = if t.wildcard {
                    (Vec::new(), Vec::new())
                } else if t.subscribed.is_empty() {
                    // Delta xDS has no "subscribe to nothing": like ztunnel,
                    // subscribe and unsubscribe the wildcard at once.
                    (vec!["*".to_string()], vec!["*".to_string()])
                } else {
                    (t.subscribed.iter().cloned().collect(), Vec::new())
                };
                DeltaDiscoveryRequest {
                    node: Some(node.clone()),
                    type_url: t.type_url.to_string(),
                    resource_names_subscribe: subscribe,
                    resource_names_unsubscribe: unsubscribe,
                    initial_resource_versions: t.versions.clone(),
                    ..Default::default()
                }
            })
            .collect()
    }

    async fn send(
        &self,
        tx: &mpsc::Sender<DeltaDiscoveryRequest>,
        req: DeltaDiscoveryRequest,
    ) -> Result<(), XdsError> {
        tx.send(req).await.map_err(|_| self.closed())?;
        self.shared.stats.request_sent();
        Ok(())
    }

    /// Applies a response to the store, then ACKs or NACKs it.
    async fn on_response(
        &mut self,
        resp: DeltaDiscoveryResponse,
        tx: &mpsc::Sender<DeltaDiscoveryRequest>,
    ) -> Result<(), XdsError> {
        self.shared.stats.response(
            &resp.type_url,
            resp.encoded_len(),
            resp.resources.len(),
            resp.removed_resources.len(),
        );
        let processed = handler::process(&resp);
        let detail = processed.error_detail();
        let rejected = processed.rejected.len();
        let handler::Processed {
            update, accepted, ..
        } = processed;
        debug!(
            type_url = %resp.type_url,
            resources = resp.resources.len(),
            removed = resp.removed_resources.len(),
            "xDS response"
        );
        if !update.is_empty() {
            self.store.apply(update);
        }
        if let Some(t) = self.types.iter_mut().find(|t| t.type_url == resp.type_url) {
            for name in &resp.removed_resources {
                t.versions.remove(name);
            }
            t.versions.extend(accepted);
            t.received = true;
            // This response may or may not answer the awaited names (it can
            // be a push crossing our request; the server answers that one
            // later anyway). Either way a demand from now on is sent again:
            // a duplicate request is cheap, a name never re-sent is not.
            t.awaiting.clear();
        }
        let synced = self.types.iter().all(|t| !t.expected || t.received);
        let nacked = detail.is_some();
        if let Some(d) = &detail {
            warn!(type_url = %resp.type_url, nonce = %resp.nonce, detail = %d, "NACK");
        }
        self.send(
            tx,
            DeltaDiscoveryRequest {
                type_url: resp.type_url,
                response_nonce: resp.nonce,
                error_detail: detail.clone().map(|message| RpcStatus {
                    code: INVALID_ARGUMENT,
                    message,
                    details: Vec::new(),
                }),
                ..Default::default()
            },
        )
        .await?;
        if nacked {
            self.shared.stats.nacked(rejected);
        } else {
            self.shared.stats.acked();
        }
        self.shared.status.send_modify(|s| {
            s.synced |= synced;
            if detail.is_some() {
                s.last_nack = detail;
            }
        });
        Ok(())
    }
}

/// How often idle subscriptions are looked for: a quarter of the idle
/// timeout (so one is dropped at most 25% late), within 50 ms – 60 s.
fn sweep_period(idle: Option<Duration>) -> Duration {
    idle.map_or(Duration::from_secs(60), |d| {
        (d / 4).clamp(Duration::from_millis(50), Duration::from_secs(60))
    })
}

/// A delay uniformly drawn from `[backoff/2, backoff]`, so proxies that lost
/// the control plane together do not reconnect in lockstep.
fn jitter(backoff: Duration) -> Duration {
    let half = backoff / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}

/// `error: cause: cause…` (tonic's transport errors hide the useful part
/// in their sources).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_demand_client() -> XdsClient {
        let node = super::super::NodeInfo::default();
        let mut cfg = XdsConfig::new("https://127.0.0.1:1", "/nonexistent", node);
        cfg.addresses = Subscription::OnDemand {
            initial: vec!["/10.0.0.1".into()],
        };
        XdsClient::new(cfg, Arc::new(Store::new()))
    }

    /// The names a demand subscribes, checking that a name subscribed
    /// already is unsubscribed just before (so istiod answers).
    fn demand(c: &mut XdsClient, name: &str) -> Option<Vec<String>> {
        let was_subscribed = c.types[0].subscribed.contains(name);
        let cmd = Command::Subscribe(super::super::ADDRESS_TYPE_URL, vec![name.to_string()]);
        let mut reqs = c.apply_command(cmd);
        let sub = reqs.pop()?;
        match reqs.pop() {
            Some(unsub) => {
                assert!(was_subscribed, "{name}");
                assert_eq!(unsub.resource_names_unsubscribe, [name]);
                assert!(unsub.resource_names_subscribe.is_empty());
            }
            None => assert!(!was_subscribed, "{name} resubscribed without unsubscribe"),
        }
        assert!(reqs.is_empty());
        Some(sub.resource_names_subscribe)
    }

    /// A demand is sent unless the same name is already awaiting an answer
    /// on this stream, also when the name is subscribed already (the store
    /// asks only when it holds no answer for it).
    #[tokio::test]
    async fn demands_coalesce_until_a_response_then_are_resent() {
        let mut c = on_demand_client();
        let initial = c.initial_requests();
        assert_eq!(initial[0].resource_names_subscribe, ["/10.0.0.1"]);
        // The initial request asked for it already.
        assert_eq!(demand(&mut c, "/10.0.0.1"), None);
        assert_eq!(demand(&mut c, "/10.0.0.2"), Some(vec!["/10.0.0.2".into()]));
        assert_eq!(demand(&mut c, "/10.0.0.2"), None);

        let (tx, mut rx) = mpsc::channel(4);
        let resp = DeltaDiscoveryResponse {
            type_url: super::super::ADDRESS_TYPE_URL.into(),
            nonce: "n1".into(),
            removed_resources: vec!["/10.0.0.2".into()],
            ..Default::default()
        };
        c.on_response(resp, &tx).await.unwrap();
        let ack = rx.try_recv().unwrap();
        assert_eq!(
            (ack.response_nonce.as_str(), ack.error_detail),
            ("n1", None)
        );

        // Subscribed, answered: asked again, it is sent again.
        assert_eq!(demand(&mut c, "/10.0.0.2"), Some(vec!["/10.0.0.2".into()]));
        assert_eq!(demand(&mut c, "/10.0.0.1"), Some(vec!["/10.0.0.1".into()]));
        // Unsubscribing forgets it; a new demand subscribes it again.
        let unsub = Command::Unsubscribe(super::super::ADDRESS_TYPE_URL, vec!["/10.0.0.2".into()]);
        assert_eq!(c.apply_command(unsub).len(), 1);
        assert_eq!(demand(&mut c, "/10.0.0.2"), Some(vec!["/10.0.0.2".into()]));
        // A reconnect asks for everything: nothing is awaited twice.
        let initial = c.initial_requests();
        assert_eq!(
            initial[0].resource_names_subscribe,
            ["/10.0.0.1", "/10.0.0.2"]
        );
        assert_eq!(demand(&mut c, "/10.0.0.2"), None);
    }

    #[test]
    fn jitter_stays_within_half_to_full() {
        for _ in 0..100 {
            let d = jitter(Duration::from_millis(800));
            assert!(
                d >= Duration::from_millis(400) && d <= Duration::from_millis(800),
                "{d:?}"
            );
        }
    }
}
