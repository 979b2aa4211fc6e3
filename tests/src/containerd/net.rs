//! Per-harness network identity: a /24 out of 10.213.0.0/16, a bridge name
//! and a cgroup root, all derived from one slot number held by a lock file
//! under /run so concurrent harnesses (other test binaries, other helpers'
//! runs) never share a bridge or subnet.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;

use crate::cmd::output_within;

const LOCK_DIR: &str = "/run/sidetunnel-tests";
const SLOTS: u32 = 256;

/// A claimed slot; released (lock file removed) on drop.
pub(crate) struct Slot {
    pub index: u32,
    lock: PathBuf,
}

impl Slot {
    pub fn bridge(&self) -> String {
        format!("stbr{}", self.index)
    }

    pub fn subnet(&self) -> Ipv4Net {
        Ipv4Net::new([10, 213, self.index as u8, 0].into(), 24).expect("valid /24")
    }

    pub fn network_name(&self) -> String {
        format!("sidetunnel-test-{}", self.index)
    }

    /// cgroup (relative to each controller's root) holding every pod the
    /// harness runs.
    pub fn cgroup_root(&self) -> String {
        format!("/sidetunnel-test-{}", self.index)
    }

    /// Claims a free slot, reclaiming slots whose owner process is gone.
    pub fn claim() -> Result<Slot> {
        std::fs::create_dir_all(LOCK_DIR).with_context(|| format!("creating {LOCK_DIR}"))?;
        let routes = host_ipv4_routes()?;
        let start = std::process::id() % SLOTS;
        for i in 0..SLOTS {
            let index = (start + i) % SLOTS;
            let lock = Path::new(LOCK_DIR).join(format!("slot-{index}.lock"));
            if !try_lock(&lock)? {
                continue;
            }
            let slot = Slot { index, lock };
            // A stale slot may have left its bridge behind: remove it first,
            // then make sure nothing else on the host routes this subnet.
            delete_link(&slot.bridge());
            super::cleanup::remove_cni_cache(&format!("{}-", slot.network_name()));
            if routes.iter().any(|r| overlaps(r, &slot.subnet())) {
                continue;
            }
            return Ok(slot);
        }
        bail!("no free test network slot in 10.213.0.0/16 (see {LOCK_DIR})")
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        delete_link(&self.bridge());
        let _ = std::fs::remove_file(&self.lock);
    }
}

/// Creates `lock` holding our pid; takes over a lock whose pid is dead.
fn try_lock(lock: &Path) -> Result<bool> {
    for _ in 0..2 {
        match OpenOptions::new().write(true).create_new(true).open(lock) {
            Ok(mut f) => {
                writeln!(f, "{}", std::process::id())?;
                return Ok(true);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let owner = std::fs::read_to_string(lock).unwrap_or_default();
                let alive = owner
                    .trim()
                    .parse::<u32>()
                    .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
                // An empty file is a lock being written right now: busy.
                if alive || owner.is_empty() {
                    return Ok(false);
                }
                let _ = std::fs::remove_file(lock);
            }
            Err(e) => return Err(e).with_context(|| format!("creating {}", lock.display())),
        }
    }
    Ok(false)
}

fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// IPv4 destinations routed in the host namespace (default route excluded).
fn host_ipv4_routes() -> Result<Vec<Ipv4Net>> {
    let out = output_within(
        Command::new("ip").args(["-4", "route", "show", "table", "all"]),
        Duration::from_secs(10),
    )?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let dst = l.split_whitespace().find(|w| w.contains('.'))?;
            dst.parse::<Ipv4Net>()
                .ok()
                .or_else(|| dst.parse().ok().map(|a| Ipv4Net::new(a, 32).expect("/32")))
        })
        .filter(|n| n.prefix_len() > 0)
        .collect())
}

/// Deletes a link if present (ignores "does not exist").
pub(crate) fn delete_link(name: &str) {
    if Path::new("/sys/class/net").join(name).exists() {
        let _ = output_within(
            Command::new("ip").args(["link", "del", name]),
            Duration::from_secs(10),
        );
    }
}
