//! The OCI runtime (runc or crun) as the `runc` crate drives it, with a
//! spawner that learns each runtime command's exit from the shim kit's reaper
//! (monitor subscription) instead of waiting on the child itself: the shim is
//! the subreaper and reaps every child with `waitpid(-1)`, so a second waiter
//! would race it and lose the status.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::monitor::{
    Subscription, monitor_subscribe, monitor_unsubscribe,
};
use containerd_shim::monitor::{Subject, Topic};
use runc::options::GlobalOpts;
use runc::{Command, Runc, Spawner};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::error::{Error, Result};
use crate::options::RuntimeOptions;

pub const DEFAULT_ROOT: &str = "/run/containerd/runc";
pub const LOG_FILE: &str = "log.json";

/// Builds the runtime client for `namespace`'s containers in `bundle`.
pub fn build(binary: &str, opts: &RuntimeOptions, namespace: &str, bundle: &Path) -> Result<Runc> {
    let binary = opts.binary_name.as_deref().unwrap_or(binary);
    let root = Path::new(opts.root.as_deref().unwrap_or(DEFAULT_ROOT)).join(namespace);
    let mut g = GlobalOpts::new()
        .command(binary)
        .root(root)
        .log(bundle.join(LOG_FILE))
        .log_json()
        .systemd_cgroup(opts.systemd_cgroup);
    g.custom_spawner(Arc::new(ReaperSpawner));
    g.build().map_err(|e| Error::Runtime {
        op: "locate OCI runtime",
        msg: format!("{binary}: {e}"),
    })
}

/// Spawns runtime commands and takes their exit status from the monitor.
#[derive(Debug, Default)]
pub struct ReaperSpawner;

#[async_trait]
impl Spawner for ReaperSpawner {
    async fn execute(&self, mut cmd: Command) -> runc::Result<(ExitStatus, u32, String, String)> {
        // Subscribe before spawning so an instant exit cannot be missed.
        let sub = monitor_subscribe(Topic::Pid)
            .await
            .map_err(|e| runc::error::Error::Other(Box::new(e)))?;
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                monitor_unsubscribe(sub.id).await.unwrap_or_default();
                return Err(runc::error::Error::ProcessSpawnFailed(e));
            }
        };
        let pid = child.id().unwrap_or_default();
        let (out, err, code) = tokio::join!(
            read_all(child.stdout.take()),
            read_all(child.stderr.take()),
            wait_exit(pid as i32, sub)
        );
        // `child` is dropped without waiting: the reaper already collected it.
        Ok((ExitStatus::from_raw(code << 8), pid, out, err))
    }
}

async fn read_all(r: Option<impl AsyncRead + Unpin>) -> String {
    let mut s = String::new();
    if let Some(mut r) = r {
        let mut buf = Vec::new();
        if let Err(e) = r.read_to_end(&mut buf).await {
            tracing::warn!("reading runtime output: {e}");
        }
        s = String::from_utf8_lossy(&buf).into_owned();
    }
    s
}

/// Waits for `pid`'s exit code from a subscription taken before it was spawned.
pub async fn wait_exit(pid: i32, mut sub: Subscription) -> i32 {
    let mut code = -1;
    while let Some(ev) = sub.rx.recv().await {
        if let Subject::Pid(p) = ev.subject
            && p == pid
        {
            code = ev.exit_code;
            break;
        }
    }
    monitor_unsubscribe(sub.id).await.unwrap_or_default();
    code
}

/// The most useful description of a failed runtime command: the last error
/// the runtime logged to `log.json`, else its stderr.
pub fn describe(bundle: &Path, op: &'static str, e: runc::error::Error) -> Error {
    let logged = std::fs::read_to_string(bundle.join(LOG_FILE))
        .ok()
        .and_then(|text| last_logged_error(&text));
    let msg = match (logged, e) {
        (Some(m), _) => m,
        (
            None,
            runc::error::Error::CommandFailed {
                stderr,
                stdout,
                status,
            },
        ) => {
            let text = if stderr.trim().is_empty() {
                stdout
            } else {
                stderr
            };
            format!("{} ({status})", text.trim())
        }
        (None, other) => other.to_string(),
    };
    Error::Runtime { op, msg }
}

fn last_logged_error(text: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Line {
        level: String,
        msg: String,
    }
    text.lines()
        .filter_map(|l| serde_json::from_str::<Line>(l).ok())
        .filter(|l| l.level == "error")
        .map(|l| l.msg.trim().to_owned())
        .next_back()
}

/// Maps a failed `kill` to containerd's semantics (already gone = NotFound).
pub fn kill_error(bundle: &Path, e: runc::error::Error) -> Error {
    let text = match &e {
        runc::error::Error::CommandFailed { stderr, stdout, .. } => format!("{stderr} {stdout}"),
        other => other.to_string(),
    }
    .to_lowercase();
    if text.contains("process already finished")
        || text.contains("container not running")
        || text.contains("no such process")
        || text.contains("does not exist")
    {
        return Error::ProcessFinished;
    }
    describe(bundle, "OCI runtime kill", e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_last_logged_error() {
        let log = "{\"level\":\"info\",\"msg\":\"hi\"}\nnot json\n{\"level\":\"error\",\"msg\":\"first\"}\n{\"level\":\"error\",\"msg\":\" exec: \\\"nope\\\": not found \"}\n";
        assert_eq!(
            last_logged_error(log).as_deref(),
            Some("exec: \"nope\": not found")
        );
        assert_eq!(
            last_logged_error("{\"level\":\"info\",\"msg\":\"x\"}"),
            None
        );
    }
}
