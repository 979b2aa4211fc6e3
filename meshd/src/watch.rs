//! Watches the inventory file by polling (mtime and size as the cheap
//! trigger, a content hash to skip rewrites of the same bytes) and publishes
//! each valid change with its diff. An invalid edit is logged and the last
//! good snapshot stays published. A file is read only once its mtime and
//! size are the same on two consecutive polls, and an empty file is ignored
//! on reload: a non-atomic rewrite (truncate, then write) must not push a
//! half-written or empty mesh to every client.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tracing::{error, info};

use crate::inventory::{self, Context, LoadError};
use crate::snapshot::Snapshot;
use crate::xds::Published;

pub struct InventoryWatcher {
    path: PathBuf,
    ctx: Context,
    interval: Duration,
    /// Stamp of the content last read.
    stamp: Option<(SystemTime, u64)>,
    /// A new stamp seen once, read when seen again unchanged.
    settling: Option<(SystemTime, u64)>,
    hash: Vec<u8>,
}

fn digest(text: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .to_vec()
}

impl InventoryWatcher {
    /// Loads the file once; the server does not start on an invalid inventory.
    pub fn load(
        path: PathBuf,
        ctx: Context,
        interval: Duration,
    ) -> Result<(Self, Snapshot), LoadError> {
        let stamp = stamp(&path);
        let text = std::fs::read_to_string(&path).map_err(|source| LoadError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let snap = inventory::parse(&ctx, &text)?;
        let w = InventoryWatcher {
            hash: digest(&text),
            path,
            ctx,
            interval,
            stamp,
            settling: None,
        };
        Ok((w, snap))
    }

    /// Polls until every receiver is gone.
    pub async fn run(mut self, tx: watch::Sender<Arc<Published>>) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if tx.is_closed() {
                return;
            }
            let Some(snap) = self.poll().await else {
                continue;
            };
            let prev = tx.borrow().clone();
            let diff = snap.diff_from(&prev.snapshot);
            if diff.is_empty() {
                info!(path = %self.path.display(), "inventory rewritten without resource changes");
                continue;
            }
            info!(
                path = %self.path.display(),
                generation = prev.generation + 1,
                addresses_changed = diff.addresses.changed.len(),
                addresses_removed = diff.addresses.removed.len(),
                policies_changed = diff.policies.changed.len(),
                policies_removed = diff.policies.removed.len(),
                "inventory reloaded"
            );
            tx.send_replace(Arc::new(Published {
                generation: prev.generation + 1,
                snapshot: Arc::new(snap),
                diff_from_previous: diff,
            }));
        }
    }

    /// A new valid snapshot if the file changed.
    async fn poll(&mut self) -> Option<Snapshot> {
        let now = stamp(&self.path);
        if now == self.stamp {
            self.settling = None;
            return None;
        }
        if now != self.settling {
            self.settling = now;
            return None;
        }
        self.settling = None;
        self.stamp = now;
        let text = match tokio::fs::read_to_string(&self.path).await {
            Ok(t) => t,
            Err(e) => {
                error!(path = %self.path.display(), "cannot read inventory, keeping the last good one: {e}");
                return None;
            }
        };
        let hash = digest(&text);
        if hash == self.hash {
            return None;
        }
        self.hash = hash;
        if text.trim().is_empty() {
            error!(path = %self.path.display(), "inventory is empty, keeping the last good one (write `workloads: []` for an empty mesh)");
            return None;
        }
        let ctx = self.ctx.clone();
        let parsed = tokio::task::spawn_blocking(move || inventory::parse(&ctx, &text)).await;
        match parsed {
            Ok(Ok(snap)) => Some(snap),
            Ok(Err(e)) => {
                error!(path = %self.path.display(), "rejected inventory change, keeping the last good one: {e}");
                None
            }
            Err(e) => {
                error!("inventory parser failed: {e}");
                None
            }
        }
    }
}

fn stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}
