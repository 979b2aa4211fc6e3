//! HBONE client: a pool of mTLS HTTP/2 connections keyed by (source
//! identity, expected destination identities, destination address), each
//! carrying up to `max_streams_per_conn` concurrent CONNECT streams.
//!
//! * Connections for one key are opened one at a time (a per-key async
//!   lock), so a burst of 100 new streams shares one handshake instead of
//!   racing 100 of them.
//! * A connection with no streams for `idle_timeout` is closed by its own
//!   driver task; a connection whose keepalive fails or whose peer goes away
//!   leaves the pool.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Request, StatusCode, Version};
use tokio::net::TcpStream;

use super::headers::{BAGGAGE, TRACEPARENT, TraceParent, forwarded_header};
use super::stream::StreamGuard;
use super::{H2Config, HboneError, HboneStream, ping};
use crate::identity::{CertificateManager, Identity};
use crate::tls::TlsError;

/// Opens the TCP sockets of outbound HBONE connections (the proxy's factory
/// sets the packet mark its redirection rules exempt).
pub trait SocketFactory: Send + Sync + 'static {
    fn connect(
        &self,
        addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + '_>>;
}

/// Plain `TcpStream::connect` with `TCP_NODELAY`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpSocketFactory;

impl SocketFactory for TcpSocketFactory {
    fn connect(
        &self,
        addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + '_>> {
        Box::pin(async move {
            let s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Ok(s)
        })
    }
}

/// What a pooled connection is shared by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src_identity: Identity,
    /// Sorted and de-duplicated.
    pub dst_identities: Vec<Identity>,
    /// The HBONE endpoint (`ip:15008` of a workload or waypoint).
    pub dst: SocketAddr,
}

impl PoolKey {
    pub fn new(src_identity: Identity, mut dst_identities: Vec<Identity>, dst: SocketAddr) -> Self {
        dst_identities.sort();
        dst_identities.dedup();
        Self {
            src_identity,
            dst_identities,
            dst,
        }
    }
}

/// The CONNECT request to send.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// `:authority`: the destination workload's `ip:port`.
    pub authority: SocketAddr,
    /// The original client address (`forwarded: for="…"`).
    pub source: SocketAddr,
    /// Service hostname when a service VIP was addressed (`;host=…`).
    pub service_host: Option<String>,
    /// `baggage` value (see [`super::Baggage::to_header`]).
    pub baggage: Option<String>,
    /// `traceparent`; a random one is generated when `None`.
    pub traceparent: Option<TraceParent>,
}

impl ConnectRequest {
    /// A request with only the mandatory fields.
    pub fn new(authority: SocketAddr, source: SocketAddr) -> Self {
        Self {
            authority,
            source,
            service_host: None,
            baggage: None,
            traceparent: None,
        }
    }

    fn to_http(&self) -> Result<Request<()>, HboneError> {
        let mut b = Request::builder()
            .method(Method::CONNECT)
            .version(Version::HTTP_2)
            .uri(self.authority.to_string())
            .header(
                http::header::FORWARDED,
                forwarded_header(self.source, self.service_host.as_deref()),
            )
            .header(
                TRACEPARENT,
                self.traceparent
                    .unwrap_or_else(TraceParent::random)
                    .to_string(),
            );
        if let Some(baggage) = &self.baggage {
            b = b.header(BAGGAGE, baggage.as_str());
        }
        Ok(b.body(())?)
    }
}

/// Pool counters (for metrics and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Connections opened since the pool was created.
    pub connections_opened: u64,
    /// Connections currently pooled.
    pub open_connections: usize,
    /// Streams currently open across all connections.
    pub active_streams: usize,
}

/// The HBONE connection pool. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    cfg: H2Config,
    certs: CertificateManager,
    sockets: Arc<dyn SocketFactory>,
    entries: Mutex<HashMap<PoolKey, Arc<KeyEntry>>>,
    opened: AtomicU64,
    epoch: Instant,
}

#[derive(Default)]
struct KeyEntry {
    conns: Mutex<Vec<Arc<Conn>>>,
    /// Serialises connection establishment per key.
    connecting: tokio::sync::Mutex<()>,
}

/// The most app data [`Pool::connect_with_data`] callers should send with
/// the headers: one TLS record, and below HTTP/2's default initial stream
/// window (65,535), so it never waits for flow-control credit.
pub const FIRST_DATA_MAX: usize = 16 * 1024;

/// How long before [`Conn::valid_until`] a connection stops taking new
/// streams (more than a stream's trip to the server).
const EXPIRY_MARGIN: std::time::Duration = std::time::Duration::from_secs(1);

struct Conn {
    sender: h2::client::SendRequest<Bytes>,
    peer: Identity,
    active: AtomicUsize,
    closed: AtomicBool,
    /// Milliseconds since the pool epoch when `active` last dropped to 0.
    idle_since_ms: AtomicU64,
    /// The earlier expiry of the two certificates that authenticated this
    /// connection: no new stream starts on it afterwards (open streams
    /// finish), so an expired certificate is never relied on.
    valid_until: SystemTime,
}

/// Decrements the connection's stream count when the stream is dropped.
struct ActiveGuard {
    conn: Arc<Conn>,
    pool: Weak<PoolInner>,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if self.conn.active.fetch_sub(1, Ordering::AcqRel) == 1
            && let Some(pool) = self.pool.upgrade()
        {
            self.conn
                .idle_since_ms
                .store(pool.now_ms(), Ordering::Release);
        }
    }
}

impl PoolInner {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn entry(&self, key: &PoolKey) -> Arc<KeyEntry> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.entry(key.clone()).or_default().clone()
    }

    /// Reserves a stream slot on an open connection with room.
    fn checkout(&self, entry: &KeyEntry) -> Option<Arc<Conn>> {
        let conns = entry.conns.lock().unwrap_or_else(|e| e.into_inner());
        let max = self.cfg.max_streams_per_conn.max(1) as usize;
        conns
            .iter()
            .find(|c| {
                !c.closed.load(Ordering::Acquire)
                    && c.active.load(Ordering::Acquire) < max
                    // The server refuses (401/503) a stream that reaches it
                    // after either certificate expired: stop a little early
                    // so a stream in flight at the boundary is not refused.
                    && SystemTime::now() + EXPIRY_MARGIN < c.valid_until
            })
            .map(|c| {
                c.active.fetch_add(1, Ordering::AcqRel);
                c.clone()
            })
    }

    /// Removes `conn` from its key (and the key when empty).
    fn remove(&self, key: &PoolKey, conn: &Arc<Conn>) {
        conn.closed.store(true, Ordering::Release);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = entries.get(key) {
            let mut conns = entry.conns.lock().unwrap_or_else(|e| e.into_inner());
            conns.retain(|c| !Arc::ptr_eq(c, conn));
            let empty = conns.is_empty();
            drop(conns);
            if empty && Arc::strong_count(entry) == 1 {
                entries.remove(key);
            }
        }
    }

    /// Drops a key without connections that nobody else is using (after a
    /// failed dial), so unreachable destinations do not accumulate.
    fn forget_if_unused(&self, key: &PoolKey, entry: Arc<KeyEntry>) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let empty = entry
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        drop(entry);
        if empty
            && let Some(e) = entries.get(key)
            && Arc::strong_count(e) == 1
        {
            entries.remove(key);
        }
    }

    /// Under the entry lock: closes `conn` if it is still idle past the
    /// timeout. Returns when to check again, or `None` once removed.
    fn expire_if_idle(&self, key: &PoolKey, entry: &KeyEntry, conn: &Arc<Conn>) -> Option<u64> {
        let timeout = self.cfg.idle_timeout.as_millis() as u64;
        let conns = entry.conns.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.now_ms();
        if conn.active.load(Ordering::Acquire) == 0 {
            let idle_since = conn.idle_since_ms.load(Ordering::Acquire);
            if now.saturating_sub(idle_since) >= timeout {
                // Marked closed while holding the entry lock: no checkout can
                // race with the removal.
                conn.closed.store(true, Ordering::Release);
                drop(conns);
                self.remove(key, conn);
                return None;
            }
            return Some(idle_since + timeout);
        }
        Some(now + timeout)
    }
}

impl Pool {
    /// A pool presenting `certs`' certificate, opening sockets with `sockets`.
    pub fn new(cfg: H2Config, certs: CertificateManager, sockets: Arc<dyn SocketFactory>) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                cfg,
                certs,
                sockets,
                entries: Mutex::new(HashMap::new()),
                opened: AtomicU64::new(0),
                epoch: Instant::now(),
            }),
        }
    }

    /// Opens a CONNECT stream to `req.authority` through the HBONE endpoint
    /// `hbone_addr`, whose certificate must carry one of `expected`
    /// identities. Reuses a pooled connection when one has room. Returns the
    /// tunnel and the server's verified identity; a non-200 answer is
    /// `HboneError::Status`.
    pub async fn connect(
        &self,
        hbone_addr: SocketAddr,
        expected: &[Identity],
        req: &ConnectRequest,
    ) -> Result<(HboneStream, Identity), HboneError> {
        self.connect_with_data(hbone_addr, expected, req, Bytes::new())
            .await
    }

    /// [`Pool::connect`], sending `first` (bytes the app already wrote) as
    /// DATA right behind the CONNECT headers instead of after the 200: the
    /// destination's proxy holds them in the stream's receive window until
    /// its upstream connection is up, which saves the client a round trip
    /// between the proxies on every new connection. Only the authenticated
    /// destination proxy sees them; a refused stream drops them, as it
    /// would the rest of the connection. Kept (a cheap `Bytes` clone) so
    /// the retry on a fresh connection sends them again.
    pub async fn connect_with_data(
        &self,
        hbone_addr: SocketAddr,
        expected: &[Identity],
        req: &ConnectRequest,
        first: Bytes,
    ) -> Result<(HboneStream, Identity), HboneError> {
        let key = PoolKey::new(
            self.inner.certs.identity().clone(),
            expected.to_vec(),
            hbone_addr,
        );
        let request = req.to_http()?;
        // A pooled connection may have died since its last use; one retry on
        // a fresh connection hides that from the caller.
        let mut last_err = None;
        for _ in 0..2 {
            let conn = self.conn_for(&key).await?;
            match self.open_stream(&conn, request.clone(), &first).await {
                Ok(stream) => return Ok((stream, conn.peer.clone())),
                Err(StreamError::Connection(e)) => {
                    self.inner.remove(&key, &conn);
                    last_err = Some(e);
                }
                Err(StreamError::Stream(e)) => return Err(e),
            }
        }
        Err(last_err.unwrap_or(HboneError::Io(io::ErrorKind::NotConnected.into())))
    }

    /// Current counters.
    pub fn stats(&self) -> PoolStats {
        let entries = self.inner.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut open_connections = 0;
        let mut active_streams = 0;
        for entry in entries.values() {
            let conns = entry.conns.lock().unwrap_or_else(|e| e.into_inner());
            open_connections += conns.len();
            active_streams += conns
                .iter()
                .map(|c| c.active.load(Ordering::Relaxed))
                .sum::<usize>();
        }
        PoolStats {
            connections_opened: self.inner.opened.load(Ordering::Relaxed),
            open_connections,
            active_streams,
        }
    }

    async fn conn_for(&self, key: &PoolKey) -> Result<Arc<Conn>, HboneError> {
        let entry = self.inner.entry(key);
        if let Some(c) = self.inner.checkout(&entry) {
            return Ok(c);
        }
        let _connecting = entry.connecting.lock().await;
        // Someone else may have connected while we waited.
        if let Some(c) = self.inner.checkout(&entry) {
            return Ok(c);
        }
        let conn = match self.dial(key).await {
            Ok(c) => c,
            Err(e) => {
                drop(_connecting);
                self.inner.forget_if_unused(key, entry);
                return Err(e);
            }
        };
        conn.active.fetch_add(1, Ordering::AcqRel);
        entry
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn.clone());
        Ok(conn)
    }

    async fn dial(&self, key: &PoolKey) -> Result<Arc<Conn>, HboneError> {
        let cfg = &self.inner.cfg;
        let addr = key.dst;
        let handshake = async {
            let tcp = self
                .inner
                .sockets
                .connect(addr)
                .await
                .map_err(|source| HboneError::Connect { addr, source })?;
            // Taken before the handshake: a rotation during it only
            // presents a later-expiring certificate.
            let own_expiry = self.inner.certs.current().map(|c| c.not_after());
            let (tls, peer) =
                crate::tls::hbone_connect(&self.inner.certs, &key.dst_identities, tcp).await?;
            let own_expiry = own_expiry.ok_or(TlsError::NoCertificate)?;
            let peer_expiry =
                crate::tls::peer_not_after(tls.get_ref().1).ok_or(TlsError::NoPeerIdentity)?;
            let valid_until = own_expiry.min(peer_expiry);
            let (sender, connection) = h2::client::Builder::new()
                .initial_window_size(cfg.stream_window)
                .initial_connection_window_size(cfg.connection_window)
                .max_frame_size(cfg.max_frame_size)
                .max_header_list_size(16 * 1024)
                // The stream window, not `SEND_BUFFER` as on the server:
                // 512 KiB here measured +17 KiB of RSS per idle proxied
                // connection and no lower peak with 100 bulk streams
                // (docs/performance.md, "Memory budget").
                .max_send_buffer_size(cfg.stream_window as usize)
                .handshake::<_, Bytes>(tls)
                .await?;
            Ok::<_, HboneError>((sender, connection, peer, valid_until))
        };
        let (sender, connection, peer, valid_until) =
            tokio::time::timeout(cfg.connect_timeout, handshake)
                .await
                .map_err(|_| HboneError::ConnectTimeout(addr))??;
        self.inner.opened.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%addr, %peer, "opened HBONE connection");
        let conn = Arc::new(Conn {
            sender,
            peer,
            active: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(self.inner.now_ms()),
            valid_until,
        });
        tokio::spawn(drive(
            connection,
            Arc::downgrade(&self.inner),
            key.clone(),
            conn.clone(),
        ));
        Ok(conn)
    }

    async fn open_stream(
        &self,
        conn: &Arc<Conn>,
        request: Request<()>,
        first: &Bytes,
    ) -> Result<HboneStream, StreamError> {
        let guard = ActiveGuard {
            conn: conn.clone(),
            pool: Arc::downgrade(&self.inner),
        };
        let mut sender = conn
            .sender
            .clone()
            .ready()
            .await
            .map_err(|e| StreamError::Connection(e.into()))?;
        let (response, mut send) = sender
            .send_request(request, false)
            .map_err(|e| classify(e.into()))?;
        if !first.is_empty() {
            // Within the stream's initial window (the caller reads at most
            // `FIRST_DATA_MAX`), so h2 queues it with the headers.
            send.send_data(first.clone(), false)
                .map_err(|e| classify(e.into()))?;
        }
        let response = response.await.map_err(|e| classify(e.into()))?;
        if response.status() != StatusCode::OK {
            return Err(StreamError::Stream(HboneError::Status(response.status())));
        }
        let guard: StreamGuard = Box::new(guard);
        Ok(HboneStream::new(send, response.into_body(), Some(guard)))
    }
}

enum StreamError {
    /// The connection is unusable (retry on another).
    Connection(HboneError),
    /// This stream failed; the connection is fine.
    Stream(HboneError),
}

fn classify(e: HboneError) -> StreamError {
    match &e {
        HboneError::H2(h) if h.is_io() || h.is_go_away() => StreamError::Connection(e),
        _ => StreamError::Stream(e),
    }
}

/// Drives one client connection: HTTP/2 I/O, keepalive, idle expiry.
async fn drive<T>(
    connection: h2::client::Connection<T, Bytes>,
    pool: Weak<PoolInner>,
    key: PoolKey,
    conn: Arc<Conn>,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut connection = connection;
    let (interval, timeout, idle) = match pool.upgrade() {
        Some(p) => (
            p.cfg.keepalive_interval,
            p.cfg.keepalive_timeout,
            p.cfg.idle_timeout,
        ),
        None => return,
    };
    let mut keepalive = pin!(ping::keepalive(connection.ping_pong(), interval, timeout));
    let mut connection = pin!(connection);
    let mut next_check = tokio::time::Instant::now() + idle;
    loop {
        tokio::select! {
            r = &mut connection => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, dst = %key.dst, "HBONE connection closed with error");
                }
                break;
            }
            _ = &mut keepalive => {
                tracing::warn!(dst = %key.dst, "HBONE keepalive failed; closing connection");
                break;
            }
            _ = tokio::time::sleep_until(next_check) => {
                let Some(p) = pool.upgrade() else { break };
                let entry = p.entry(&key);
                match p.expire_if_idle(&key, &entry, &conn) {
                    None => {
                        tracing::debug!(dst = %key.dst, "closing idle HBONE connection");
                        // Finish politely: the sender is gone from the pool;
                        // dropping the connection closes the socket.
                        return;
                    }
                    Some(at_ms) => {
                        let in_ms = at_ms.saturating_sub(p.now_ms());
                        next_check = tokio::time::Instant::now() + std::time::Duration::from_millis(in_ms.max(1));
                    }
                }
            }
        }
    }
    if let Some(p) = pool.upgrade() {
        p.remove(&key, &conn);
    } else {
        conn.closed.store(true, Ordering::Release);
    }
}
