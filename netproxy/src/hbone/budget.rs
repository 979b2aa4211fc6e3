//! The process-wide budget for grown copy buffers (`--copy-buffer-budget`).
//!
//! A copy direction reads 16 KiB chunks at first and doubles its chunk up
//! to 256 KiB while reads keep filling it (see `copy.rs`). Small and
//! latency traffic never leaves 16 KiB and is bounded by the connection
//! table alone; a grown direction holds two buffers of its chunk size, and
//! with many bulk connections those dominate the proxy's memory. Every
//! growth past 16 KiB therefore takes bytes from one shared budget (an
//! atomic counter) through a [`Grant`]; when the budget has no room the
//! direction keeps its current chunk size, so chunks shrink as more
//! connections are in bulk mode. A grant gives its bytes back when the
//! direction shrinks and, being an RAII guard, on every way a copy ends
//! (EOF, error, the task dropped).
//!
//! The budget is process-wide because it bounds the process's memory; it
//! is set once at start ([`CopyBudget::global`], [`CopyBudget::set_limit`])
//! and read by the metrics at scrape time.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::config::DEFAULT_COPY_BUFFER_BUDGET;

static GLOBAL: CopyBudget = CopyBudget::new(DEFAULT_COPY_BUFFER_BUDGET);

/// Bytes that grown copy buffers may hold together.
#[derive(Debug)]
pub struct CopyBudget {
    limit: AtomicUsize,
    held: AtomicUsize,
    /// Growths refused because the budget was full (once per direction
    /// until it shrinks again).
    refused: AtomicU64,
}

impl CopyBudget {
    /// A budget of `limit` bytes, none held.
    pub const fn new(limit: usize) -> Self {
        CopyBudget {
            limit: AtomicUsize::new(limit),
            held: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// The proxy's budget, used by [`copy_bidirectional`](super::copy_bidirectional).
    pub fn global() -> &'static CopyBudget {
        &GLOBAL
    }

    /// Changes the limit. Grants already held stay valid; new growth waits
    /// until the held bytes fall below the new limit.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Release);
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Acquire)
    }

    /// Bytes currently held by grants.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// How often a direction could not grow because the budget was full.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Acquire)
    }

    /// An empty grant on this budget.
    pub fn grant(&self) -> Grant<'_> {
        Grant {
            budget: self,
            bytes: 0,
        }
    }

    pub(crate) fn count_refusal(&self) {
        self.refused.fetch_add(1, Ordering::AcqRel);
    }

    /// Takes `n` more bytes if the budget has room for all of them.
    fn try_take(&self, n: usize) -> bool {
        let limit = self.limit();
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(n).filter(|&after| after <= limit)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::AcqRel);
    }
}

/// Bytes one copy direction holds from a [`CopyBudget`]; returned on drop.
#[derive(Debug)]
#[must_use = "the bytes are returned to the budget when the grant is dropped"]
pub struct Grant<'a> {
    budget: &'a CopyBudget,
    bytes: usize,
}

impl Grant<'_> {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Makes the grant hold exactly `bytes`: shrinking always succeeds;
    /// growing succeeds only when the budget has room for the difference
    /// (otherwise nothing changes and `false` is returned).
    pub fn try_resize(&mut self, bytes: usize) -> bool {
        if bytes <= self.bytes {
            self.budget.give_back(self.bytes - bytes);
        } else if !self.budget.try_take(bytes - self.bytes) {
            return false;
        }
        self.bytes = bytes;
        true
    }

    /// The budget this grant takes from.
    pub fn budget(&self) -> &CopyBudget {
        self.budget
    }

    /// Returns everything held.
    pub fn release(&mut self) {
        self.try_resize(0);
    }
}

impl Drop for Grant<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_take_and_return_bytes_within_the_limit() {
        let b = CopyBudget::new(1000);
        let mut g = b.grant();
        assert!(g.try_resize(600));
        let mut h = b.grant();
        assert!(!h.try_resize(500), "only 400 left");
        assert_eq!((h.bytes(), b.held()), (0, 600));
        assert!(h.try_resize(400));
        assert_eq!(b.held(), 1000);
        // Shrinking returns the difference.
        assert!(g.try_resize(100));
        assert_eq!(b.held(), 500);
        assert!(h.try_resize(900));
        g.release();
        g.release();
        assert_eq!((g.bytes(), b.held()), (0, 900));
        drop(h);
        assert_eq!(b.held(), 0);
    }

    #[test]
    fn a_lowered_limit_keeps_held_grants_and_stops_growth() {
        let b = CopyBudget::new(1000);
        let mut g = b.grant();
        assert!(g.try_resize(800));
        b.set_limit(500);
        assert!(!b.grant().try_resize(1));
        assert!(!g.try_resize(900));
        assert!(g.try_resize(400), "shrinking below the new limit");
        assert!(b.grant().try_resize(100));
        assert_eq!(b.held(), 400, "the temporary grant was returned");
    }

    #[test]
    fn concurrent_grants_never_exceed_the_limit_and_all_return() {
        let b = CopyBudget::new(64 * 1024);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for i in 0..2000usize {
                        let mut g = b.grant();
                        if g.try_resize(4096 * (1 + i % 4)) {
                            assert!(b.held() <= b.limit());
                        }
                        // Dropped here: returned.
                    }
                });
            }
        });
        assert_eq!(b.held(), 0);
    }
}
