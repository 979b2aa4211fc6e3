//! The bounded connection table: at most `--max-connections` entries at
//! once. Every TCP connection accepted on a data-path port (outbound,
//! plaintext inbound, HBONE) takes one, and so does every inbound HBONE
//! CONNECT stream (each holds an upstream socket and buffers of its own).
//! An entry is a [`ConnectionSlot`] held for the connection's lifetime;
//! when the table is full a new connection is refused at once (TCP reset,
//! or `503` for an HBONE stream) while open ones are untouched.
//! Together with the per-connection buffer bounds (HTTP/2 windows, copy
//! chunks) and the process-wide budget for grown copy buffers
//! (`hbone::CopyBudget`, `--copy-buffer-budget`) this caps the proxy's
//! memory: a pod under a connection flood degrades by refusing, not by
//! being OOM-killed with every connection.
//!
//! Refusals are counted per listener (`sidetunnel_connections_refused_total`)
//! and logged at most once per [`LOG_INTERVAL`] with the count since the
//! last line, so a flood cannot flood the log too.
//!
//! After a burst, glibc keeps the freed connection memory in its heap (RSS
//! stays at the burst's peak); [`release_memory_after_bursts`] hands it
//! back to the kernel once the table has shrunk by [`TRIM_AFTER`] entries.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tracing::warn;

use crate::metrics::{ConnectionTableMetrics, ListenerLabel};

/// Shortest time between two "table full" log lines.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The table must have shrunk by this many entries since its high-water
/// mark before freed heap is handed back (a trim costs a heap walk).
pub const TRIM_AFTER: usize = 256;
/// How often [`release_memory_after_bursts`] looks.
pub const TRIM_CHECK: Duration = Duration::from_secs(10);

/// Where a connection arrived (the refusal metric's `listener` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Outbound,
    InboundPlaintext,
    /// A TCP (TLS) connection to the HBONE port.
    Hbone,
    /// A CONNECT stream inside an HBONE connection.
    HboneStream,
}

impl Listener {
    pub fn as_str(self) -> &'static str {
        match self {
            Listener::Outbound => "outbound",
            Listener::InboundPlaintext => "inbound_plaintext",
            Listener::Hbone => "hbone",
            Listener::HboneStream => "hbone_stream",
        }
    }
}

/// The table. Share as `Arc<ConnectionTable>`.
#[derive(Debug)]
pub struct ConnectionTable {
    max: usize,
    open: AtomicUsize,
    /// Most entries held at once since the last heap trim.
    high_water: AtomicUsize,
    metrics: ConnectionTableMetrics,
    started: Instant,
    /// Milliseconds after `started` of the last "table full" log line
    /// (`u64::MAX`: none yet).
    last_log_ms: AtomicU64,
    /// Refusals not yet reported in a log line.
    unlogged: AtomicU64,
}

/// A held entry of the table; dropping it frees the entry.
#[derive(Debug)]
#[must_use = "the connection holds its table entry until the slot is dropped"]
pub struct ConnectionSlot {
    table: Arc<ConnectionTable>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.table.open.fetch_sub(1, Ordering::AcqRel);
        self.table.metrics.open.dec();
    }
}

impl ConnectionTable {
    /// A table of at most `max` connections (`max` ≥ 1, checked by the
    /// configuration).
    pub fn new(max: usize, metrics: ConnectionTableMetrics) -> Arc<Self> {
        Arc::new(ConnectionTable {
            max,
            open: AtomicUsize::new(0),
            high_water: AtomicUsize::new(0),
            metrics,
            started: Instant::now(),
            last_log_ms: AtomicU64::new(u64::MAX),
            unlogged: AtomicU64::new(0),
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections currently held.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Takes an entry for a new connection on `listener`, or counts and
    /// (rate-limited) logs a refusal and returns `None`; the caller then
    /// refuses the connection.
    pub fn try_acquire(self: &Arc<Self>, listener: Listener) -> Option<ConnectionSlot> {
        let taken = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            });
        if let Ok(n) = taken {
            self.high_water.fetch_max(n + 1, Ordering::AcqRel);
            self.metrics.open.inc();
            return Some(ConnectionSlot {
                table: self.clone(),
            });
        }
        self.metrics
            .refused
            .get_or_create(&ListenerLabel {
                listener: listener.as_str(),
            })
            .inc();
        self.log_refusal(listener);
        None
    }

    /// True (and the high-water mark reset) when at least [`TRIM_AFTER`]
    /// entries were freed since the high-water mark.
    fn shrunk_since_trim(&self) -> bool {
        let open = self.open();
        let hwm = self.high_water.load(Ordering::Acquire);
        if hwm.saturating_sub(open) < TRIM_AFTER {
            return false;
        }
        self.high_water.store(open, Ordering::Release);
        true
    }

    fn log_refusal(&self, listener: Listener) {
        self.unlogged.fetch_add(1, Ordering::AcqRel);
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.last_log_ms.load(Ordering::Acquire);
        let due = last == u64::MAX || now.saturating_sub(last) >= LOG_INTERVAL.as_millis() as u64;
        // One thread wins the slot; the others' refusals go into the next line.
        if due
            && self
                .last_log_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            let refused = self.unlogged.swap(0, Ordering::AcqRel);
            warn!(
                max_connections = self.max,
                refused,
                listener = listener.as_str(),
                "connection table full: refusing new connections (--max-connections)"
            );
        }
    }
}

/// Every [`TRIM_CHECK`], when the table shrank by [`TRIM_AFTER`] entries
/// since its high-water mark, returns the allocator's free memory to the
/// kernel (`malloc_trim`, glibc only). Runs until `stop`.
pub async fn release_memory_after_bursts(
    table: Arc<ConnectionTable>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(TRIM_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if table.shrunk_since_trim() {
            // A heap walk: keep it off the data-path workers.
            let _ = tokio::task::spawn_blocking(trim_heap).await;
        }
    }
}

/// Keeps glibc from handing heap pages back to the kernel after every
/// large free and from serving the data path's 256 KiB chunks with fresh
/// `mmap`s: both cost page faults per chunk under bulk load (measured with
/// `perf`: CPU per GB moved fell 7% on the sending proxy and 28% on the
/// receiving one in the same run). Memory freed after a burst is returned
/// by [`release_memory_after_bursts`] instead. Call before any thread
/// starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune_allocator() {
    const TRIM_THRESHOLD: libc::c_int = 256 << 20;
    const MMAP_THRESHOLD: libc::c_int = 32 << 20;
    // SAFETY: mallopt only changes glibc's tunables; called before other
    // threads allocate.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune_allocator() {}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_heap() {
    // SAFETY: malloc_trim only walks and releases the allocator's own free
    // memory; it is safe to call at any time from any thread.
    unsafe { libc::malloc_trim(0) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(max: usize) -> (Arc<ConnectionTable>, ConnectionTableMetrics) {
        let m = ConnectionTableMetrics::default();
        (ConnectionTable::new(max, m.clone()), m)
    }

    fn refused(m: &ConnectionTableMetrics, l: Listener) -> u64 {
        m.refused
            .get_or_create(&ListenerLabel {
                listener: l.as_str(),
            })
            .get()
    }

    #[test]
    fn full_table_refuses_and_a_freed_entry_is_reused() {
        let (t, m) = table(2);
        let a = t.try_acquire(Listener::Outbound).expect("first");
        let _b = t.try_acquire(Listener::Hbone).expect("second");
        assert_eq!((t.open(), m.open.get()), (2, 2));
        assert!(t.try_acquire(Listener::Outbound).is_none());
        assert!(t.try_acquire(Listener::InboundPlaintext).is_none());
        assert_eq!(refused(&m, Listener::Outbound), 1);
        assert_eq!(refused(&m, Listener::InboundPlaintext), 1);
        assert_eq!(refused(&m, Listener::Hbone), 0);
        drop(a);
        assert_eq!((t.open(), m.open.get()), (1, 1));
        let _c = t.try_acquire(Listener::Outbound).expect("freed entry");
        assert!(t.try_acquire(Listener::Outbound).is_none());
        assert_eq!(refused(&m, Listener::Outbound), 2);
    }

    #[test]
    fn concurrent_acquires_never_exceed_the_limit() {
        let (t, _) = table(50);
        let held: Vec<_> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..8)
                .map(|_| {
                    let t = t.clone();
                    s.spawn(move || {
                        (0..100)
                            .filter_map(|_| t.try_acquire(Listener::Outbound))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        });
        assert_eq!(held.len(), 50);
        assert_eq!(t.open(), 50);
        drop(held);
        assert_eq!(t.open(), 0);
    }

    #[test]
    fn trim_is_due_only_after_a_large_drop() {
        let (t, _) = table(TRIM_AFTER * 2);
        let mut held: Vec<_> = (0..TRIM_AFTER + 10)
            .map(|_| t.try_acquire(Listener::Outbound).unwrap())
            .collect();
        held.truncate(11);
        assert!(!t.shrunk_since_trim(), "only {} freed", TRIM_AFTER - 1);
        held.truncate(10);
        assert!(t.shrunk_since_trim());
        assert!(!t.shrunk_since_trim(), "mark reset to the open count");
    }

    #[test]
    fn refusal_log_is_rate_limited() {
        let (t, _) = table(1);
        let _a = t.try_acquire(Listener::Outbound).unwrap();
        for _ in 0..1000 {
            assert!(t.try_acquire(Listener::Outbound).is_none());
        }
        // The first refusal logged; the other 999 wait for the next line.
        assert_eq!(t.unlogged.load(Ordering::Acquire), 999);
        assert_ne!(t.last_log_ms.load(Ordering::Acquire), u64::MAX);
    }
}
