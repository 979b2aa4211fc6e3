//! When a pod's proxy is replaced by a new binary, and how many pods of the
//! node do it at once.
//!
//! Each shim looks at the node's `proxy.binary` every
//! `upgrade.check_interval`; when the file there is not the one its proxy
//! runs (see `sidetunnel_contract::handover::identity_of`) and not one
//! that already failed to take over in this pod, it hands over (the
//! supervisor does that). The node-wide limit is a set of
//! `upgrade.max_concurrent` lock files under the state root: a shim holds
//! one (`flock`) from starting the new proxy until the new one is ready or
//! has failed. Locks held by a shim that dies are released by the kernel.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Directory of the slot lock files, under the state root.
const SLOTS_DIR: &str = ".upgrade-slots";

/// One of the node's upgrade slots, held until dropped.
#[derive(Debug)]
pub struct Slot {
    _file: std::fs::File,
    pub index: u32,
}

/// Takes a free slot of `max` under `state_root`, without waiting; `None`
/// when all are held (try again later).
pub fn try_slot(state_root: &Path, max: u32) -> std::io::Result<Option<Slot>> {
    let dir = slots_dir(state_root);
    std::fs::create_dir_all(&dir)?;
    for index in 0..max {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("{index}.lock")))?;
        // SAFETY: flock on a descriptor we own.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            return Ok(Some(Slot { _file: file, index }));
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(e);
        }
    }
    Ok(None)
}

fn slots_dir(state_root: &Path) -> PathBuf {
    state_root.join(SLOTS_DIR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_limit_concurrent_holders() {
        let d = tempfile::tempdir().unwrap();
        let a = try_slot(d.path(), 2).unwrap().unwrap();
        let b = try_slot(d.path(), 2).unwrap().unwrap();
        assert_ne!(a.index, b.index);
        assert!(try_slot(d.path(), 2).unwrap().is_none(), "both slots held");
        drop(a);
        assert!(try_slot(d.path(), 2).unwrap().is_some(), "a freed slot");
    }
}
