//! Last-resort cleanup after the harness containerd: whatever CRI did not
//! remove (because a test failed half-way or a shim crashed) is killed,
//! unmounted and deleted here, so one failed test cannot poison the next.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{MntFlags, umount2};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Mount points of every cgroup hierarchy (v1 controllers, v2 unified).
fn cgroup_mounts() -> Vec<PathBuf> {
    mounts()
        .into_iter()
        .filter(|(_, fstype)| fstype == "cgroup" || fstype == "cgroup2")
        .map(|(p, _)| p)
        .collect()
}

/// (mount point, fs type) of the current mount namespace.
fn mounts() -> Vec<(PathBuf, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let fstype = right.split(' ').next()?;
            Some((PathBuf::from(unescape(mount_point)), fstype.to_owned()))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Pids in `cgroup` (relative to each hierarchy root) and below, in any hierarchy.
pub(crate) fn cgroup_pids(cgroup: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for mount in cgroup_mounts() {
        walk(&mount.join(cgroup.trim_start_matches('/')), &mut |dir| {
            if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        });
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Visits `dir` and every sub-directory, children before parents.
fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path(), f);
            }
        }
        f(dir);
    }
}

/// SIGKILLs every process in the cgroup tree and removes the cgroups.
pub(crate) fn remove_cgroup_tree(cgroup: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = cgroup_pids(cgroup);
        for pid in &pids {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        let mut left = false;
        for mount in cgroup_mounts() {
            walk(&mount.join(cgroup.trim_start_matches('/')), &mut |dir| {
                // rmdir on a cgroup succeeds once it has no tasks or children.
                if std::fs::remove_dir(dir).is_err() && dir.exists() {
                    left = true;
                }
            });
        }
        if !left || Instant::now() > deadline {
            if left {
                eprintln!("harness cleanup: cgroup {cgroup} still busy");
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Processes whose command line mentions `needle` (e.g. the containerd
/// socket path shims are started with).
pub(crate) fn pids_with_arg(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid as u32 == std::process::id() {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(e.path().join("cmdline"))
            && cmdline
                .split(|b| *b == 0)
                .any(|arg| arg == needle.as_bytes())
        {
            out.push(pid);
        }
    }
    out
}

pub(crate) fn kill_all(pids: &[i32]) {
    for pid in pids {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
}

/// Mount points at or below `dir`.
pub(crate) fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    mounts()
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Lazily unmounts everything mounted at or below `dir`, deepest first.
pub(crate) fn unmount_under(dir: &Path) {
    let mut points = mounts_under(dir);
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    points.dedup();
    for p in points {
        let _ = umount2(&p, MntFlags::MNT_DETACH);
    }
}

/// Removes a bind-mounted network namespace file (what CNI DEL + CRI would
/// have removed).
pub(crate) fn remove_netns(path: &Path) {
    let _ = umount2(path, MntFlags::MNT_DETACH);
    let _ = std::fs::remove_file(path);
}

/// libcni's result cache (containerd 1.6 cannot relocate it); entries stay
/// behind when CNI DEL never ran.
const CNI_CACHE: &str = "/var/lib/cni/results";

/// Removes cached CNI results whose file name starts with `prefix`.
pub(crate) fn remove_cni_cache(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(CNI_CACHE) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(prefix) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo() {
        assert_eq!(unescape(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/t\04"), r"/t\04");
    }
}
