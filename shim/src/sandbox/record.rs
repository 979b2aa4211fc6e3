//! The shim's own record of a pod's sandbox resources
//! (`<state_root>/<sandbox id>/shim.json`, root-owned, outside the directory
//! the proxy can see): which netns got rules, which process is the proxy, its
//! exit history. It is what the delete-after-crash path reads to clean up
//! after a shim that died.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sidetunnel_redirect::RedirectConfig;

const RECORD: &str = "shim.json";
const PROXY_DIR: &str = "proxy";
/// Exit history entries kept in the record.
pub const HISTORY: usize = 16;

#[derive(Debug, Clone)]
pub struct Paths {
    /// `<state_root>/<sandbox id>`: root-owned.
    pub dir: PathBuf,
    /// `<dir>/proxy`: the proxy's own directory (keys, admin socket, token).
    pub proxy_dir: PathBuf,
}

impl Paths {
    pub fn new(state_root: &Path, sandbox_id: &str) -> Paths {
        let dir = state_root.join(sandbox_id);
        Paths {
            proxy_dir: dir.join(PROXY_DIR),
            dir,
        }
    }

    pub fn record(&self) -> PathBuf {
        self.dir.join(RECORD)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub at: String,
    pub pid: i32,
    pub code: i32,
    pub ran_ms: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Record {
    pub sandbox_id: String,
    pub pod: String,
    pub netns: Option<PathBuf>,
    pub redirect: Option<RedirectConfig>,
    pub proxy_pid: Option<i32>,
    /// `/proc/<pid>/stat` start time, so a recycled pid is never signalled.
    pub proxy_start_time: Option<u64>,
    pub state: String,
    pub restarts: u32,
    pub exits: Vec<ExitRecord>,
    /// What the running proxy reported once ready: its version and the
    /// identity of its binary (`dev:inode:size:mtime`).
    #[serde(default)]
    pub proxy_version: Option<String>,
    #[serde(default)]
    pub proxy_binary: Option<String>,
    /// Live handovers to a new proxy binary so far.
    #[serde(default)]
    pub upgrades: u32,
    /// The last handover: when, from and to which process, or why it failed.
    #[serde(default)]
    pub last_upgrade: Option<String>,
}

impl Record {
    pub fn load(paths: &Paths) -> Option<Record> {
        let b = std::fs::read(paths.record()).ok()?;
        serde_json::from_slice(&b).ok()
    }

    pub fn save(&self, paths: &Paths) -> std::io::Result<()> {
        let tmp = paths.dir.join(".shim.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(tmp, paths.record())
    }

    pub fn push_exit(&mut self, e: ExitRecord) {
        self.exits.push(e);
        if self.exits.len() > HISTORY {
            self.exits.remove(0);
        }
    }
}

/// Field 22 of `/proc/<pid>/stat` (start time in clock ticks).
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    after.split(' ').nth(19)?.parse().ok()
}

/// Kills the recorded proxy if that very process still runs.
pub fn kill_recorded(rec: &Record) {
    if let (Some(pid), Some(st)) = (rec.proxy_pid, rec.proxy_start_time)
        && start_time(pid) == Some(st)
    {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_self_is_stable() {
        let me = std::process::id() as i32;
        let a = start_time(me).unwrap();
        assert_eq!(start_time(me), Some(a));
        assert_eq!(start_time(i32::MAX), None);
    }

    #[test]
    fn record_round_trip_and_bounded_history() {
        let d = tempfile::tempdir().unwrap();
        let p = Paths::new(d.path(), "sb1");
        std::fs::create_dir_all(&p.dir).unwrap();
        let mut r = Record {
            sandbox_id: "sb1".into(),
            ..Default::default()
        };
        for i in 0..(HISTORY as i32 + 3) {
            r.push_exit(ExitRecord {
                at: "t".into(),
                pid: i,
                code: 1,
                ran_ms: 5,
            });
        }
        assert_eq!(r.exits.len(), HISTORY);
        assert_eq!(r.exits[0].pid, 3);
        r.save(&p).unwrap();
        let back = Record::load(&p).unwrap();
        assert_eq!(back.exits, r.exits);
        assert_eq!(back.sandbox_id, "sb1");
    }
}
