//! When each step of a pod's start happened, read on CLOCK_MONOTONIC: the
//! clock every process on the node shares, so a benchmark lines these up
//! with its own RunPodSandbox call. Written to `<sandbox dir>/start.json`
//! (root-owned, removed with the pod) after the proxy started and again
//! when the first app container's gate opened.

use serde::{Deserialize, Serialize};

use super::record::Paths;

const FILE: &str = "start.json";

/// One step: `create` (the shim got the sandbox's create), `rules`
/// (redirection installed), `sandbox` (the OCI runtime created the
/// sandbox), `proxy_exec` (the proxy was executed), `app_start` (the first
/// app container's start arrived and began waiting for the proxy), `ready`
/// (an app container's start saw the proxy ready and was let through).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    pub monotonic_ns: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Timeline {
    pub phases: Vec<Phase>,
}

/// CLOCK_MONOTONIC now, in nanoseconds.
pub fn now_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

impl Timeline {
    /// Records `name` now, unless it was recorded before (only the first
    /// gate opening counts).
    pub fn mark(&mut self, name: &str) -> bool {
        if self.phases.iter().any(|p| p.name == name) {
            return false;
        }
        self.phases.push(Phase {
            name: name.to_owned(),
            monotonic_ns: now_ns(),
        });
        true
    }

    pub fn save(&self, paths: &Paths) {
        let path = paths.dir.join(FILE);
        let res = serde_json::to_vec(self)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&path, b));
        if let Err(e) = res {
            tracing::warn!("write {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_each_phase_once_in_order() {
        let mut t = Timeline::default();
        assert!(t.mark("create"));
        assert!(t.mark("ready"));
        assert!(!t.mark("ready"));
        let names: Vec<&str> = t.phases.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["create", "ready"]);
        assert!(t.phases[0].monotonic_ns <= t.phases[1].monotonic_ns);
        assert!(t.phases[0].monotonic_ns > 0);
    }
}
