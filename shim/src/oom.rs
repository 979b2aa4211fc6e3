//! OOM notifications for a container's memory cgroup, turned into `TaskOOM`
//! events: cgroup v1 through `memory.oom_control` + an eventfd registered in
//! `cgroup.event_control`, cgroup v2 by watching `memory.events`' `oom_kill`
//! counter with inotify. Each watch runs on its own OS thread (blocking reads)
//! and ends when the cgroup is removed.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use tokio::sync::mpsc;

use crate::cgroup;

/// Starts watching `pid`'s memory cgroup; sends the container id on each OOM.
pub fn watch(container_id: String, pid: i32, tx: mpsc::Sender<String>) -> std::io::Result<()> {
    let dirs = cgroup::of_pid(pid)?;
    let Some((dir, v2)) = cgroup::memory_dir(&dirs) else {
        tracing::warn!(container = %container_id, "no memory cgroup found; OOM events disabled");
        return Ok(());
    };
    let dir = dir.to_owned();
    let run: Box<dyn FnOnce() -> std::io::Result<()> + Send> = if v2 {
        let inotify = v2_setup(&dir)?;
        Box::new(move || v2_loop(&container_id, &dir, inotify, &tx))
    } else {
        let efd = v1_setup(&dir)?;
        Box::new(move || v1_loop(&container_id, &dir, efd, &tx))
    };
    std::thread::Builder::new()
        .name("oom-watch".into())
        .spawn(move || {
            if let Err(e) = run() {
                tracing::debug!("OOM watch ended: {e}");
            }
        })?;
    Ok(())
}

fn v1_setup(dir: &Path) -> std::io::Result<File> {
    let control = File::open(dir.join("memory.oom_control"))?;
    // SAFETY: eventfd returns a new fd or -1.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if efd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: efd is a fresh fd we own.
    let efd = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(efd) };
    std::fs::write(
        dir.join("cgroup.event_control"),
        format!("{} {}", efd.as_raw_fd(), control.as_raw_fd()),
    )?;
    // The kernel holds its own reference to `control` once registered.
    Ok(efd)
}

fn v1_loop(id: &str, dir: &Path, mut efd: File, tx: &mpsc::Sender<String>) -> std::io::Result<()> {
    let mut buf = [0u8; 8];
    loop {
        efd.read_exact(&mut buf)?;
        // The eventfd also fires when the cgroup is removed.
        if !dir.exists() {
            return Ok(());
        }
        if tx.blocking_send(id.to_owned()).is_err() {
            return Ok(());
        }
    }
}

fn oom_kills(events: &Path) -> Option<u64> {
    std::fs::read_to_string(events).ok()?.lines().find_map(|l| {
        l.strip_prefix("oom_kill ")
            .and_then(|v| v.trim().parse().ok())
    })
}

fn v2_setup(dir: &Path) -> std::io::Result<nix::sys::inotify::Inotify> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let ino = Inotify::init(InitFlags::IN_CLOEXEC)?;
    ino.add_watch(&dir.join("memory.events"), AddWatchFlags::IN_MODIFY)?;
    Ok(ino)
}

fn v2_loop(
    id: &str,
    dir: &Path,
    ino: nix::sys::inotify::Inotify,
    tx: &mpsc::Sender<String>,
) -> std::io::Result<()> {
    let events: PathBuf = dir.join("memory.events");
    let mut seen = oom_kills(&events).unwrap_or(0);
    loop {
        let evs = ino.read_events()?;
        if evs.iter().any(|e| {
            e.mask
                .contains(nix::sys::inotify::AddWatchFlags::IN_IGNORED)
        }) {
            return Ok(());
        }
        let Some(now) = oom_kills(&events) else {
            return Ok(());
        };
        if now > seen {
            seen = now;
            if tx.blocking_send(id.to_owned()).is_err() {
                return Ok(());
            }
        }
    }
}
