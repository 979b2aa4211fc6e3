//! Graceful shutdown: stop accepting, let open connections finish for a
//! grace period, then cut whatever is left. Connection tasks are spawned
//! through [`Drain::spawn`] (or wrapped with [`Drain::track`]) so the
//! proxy knows when the last one ends.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

/// Shared shutdown state. Clone freely.
#[derive(Clone, Debug, Default)]
pub struct Drain {
    accepting: CancellationToken,
    force: CancellationToken,
    tracker: TaskTracker,
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    /// Listeners stop accepting; HBONE connections send GOAWAY.
    pub fn stop_accepting(&self) {
        self.accepting.cancel();
    }

    /// Completes once accepting stopped.
    pub async fn accepting_stopped(&self) {
        self.accepting.cancelled().await
    }

    pub fn is_draining(&self) -> bool {
        self.accepting.is_cancelled()
    }

    /// Completes when the grace period is over and connections are cut.
    pub async fn forced(&self) {
        self.force.cancelled().await
    }

    /// Wraps `fut` so it counts as an open connection and is cancelled at
    /// the end of the grace period.
    pub fn track<F>(&self, fut: F) -> impl Future<Output = ()> + Send + 'static
    where
        F: Future<Output = ()> + Send + 'static,
    {
        // Boxed: an async block that captures a future and then awaits it
        // holds it twice (the captured value and the awaited one; rustc
        // does not overlap them), and connection tasks live as long as
        // their connection. Unboxed, two such layers made every outbound
        // task 11.4 KiB for a 2.8 KiB connection future.
        let fut = Box::pin(fut);
        let force = self.force.clone();
        self.tracker.track_future(async move {
            tokio::select! {
                _ = fut => {}
                _ = force.cancelled() => {}
            }
        })
    }

    /// Spawns a tracked connection task.
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        tokio::spawn(self.track(fut));
    }

    /// Number of tracked tasks still running.
    pub fn open(&self) -> usize {
        self.tracker.len()
    }

    /// Stops accepting, waits up to `grace` for tracked work, then cancels
    /// the rest and waits (briefly) for it to unwind. Returns how many
    /// connections were cut.
    pub async fn shutdown(&self, grace: Duration) -> usize {
        self.stop_accepting();
        self.tracker.close();
        let open = self.tracker.len();
        info!(open, grace = ?grace, "draining connections");
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
        {
            info!("all connections finished");
            return 0;
        }
        let cut = self.tracker.len();
        info!(cut, "grace period over, closing remaining connections");
        self.force.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tracker.wait()).await;
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn finished_work_ends_drain_early_and_stragglers_are_cut() {
        let d = Drain::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        d.spawn(async move {
            let _ = rx.await;
        });
        d.spawn(std::future::pending());
        assert_eq!(d.open(), 2);
        let d2 = d.clone();
        let waiter = tokio::spawn(async move { d2.shutdown(Duration::from_millis(300)).await });
        d.accepting_stopped().await;
        tx.send(()).unwrap();
        let cut = waiter.await.unwrap();
        assert_eq!(cut, 1, "only the pending task is cut");
        assert_eq!(d.open(), 0);
    }

    #[tokio::test]
    async fn drain_returns_immediately_when_idle() {
        let d = Drain::new();
        let t = std::time::Instant::now();
        assert_eq!(d.shutdown(Duration::from_secs(30)).await, 0);
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    /// A tracked connection holds its future once, behind a pointer: the
    /// wrapper's own size does not grow with the connection's state.
    #[test]
    fn tracking_does_not_copy_the_connection_state() {
        let d = Drain::new();
        let big = [7u8; 8192];
        let fut = async move {
            tokio::task::yield_now().await;
            std::hint::black_box(&big);
        };
        assert!(std::mem::size_of_val(&fut) >= 8192);
        let tracked = d.track(fut);
        let size = std::mem::size_of_val(&tracked);
        assert!(size < 1024, "tracked future is {size} bytes");
    }
}
