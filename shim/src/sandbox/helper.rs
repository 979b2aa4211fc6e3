//! Redirection install/remove run in a child copy of the shim
//! (`containerd-shim-sidetunnel-v1 __redirect install|remove <netns>`, the
//! config as JSON on stdin). The redirect library spawns `nft`/`ip` and waits
//! for them; inside the shim that wait would race the subreaper's
//! `waitpid(-1)`, so the library runs where no reaper competes, and the shim
//! learns the helper's exit from the monitor like any other child.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Stdio;

use containerd_shim::asynchronous::monitor::{monitor_subscribe, monitor_unsubscribe};
use containerd_shim::monitor::Topic;
use sidetunnel_redirect::RedirectConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::runtime::wait_exit;

pub const ARG: &str = "__redirect";

/// Child side of the helper; never returns.
pub fn main(args: &[String]) -> ! {
    let result = (|| -> Result<(), String> {
        let [op, netns] = args else {
            return Err("usage: __redirect install|remove <netns>".into());
        };
        let mut json = String::new();
        std::io::stdin()
            .read_to_string(&mut json)
            .map_err(|e| format!("read config: {e}"))?;
        let cfg: RedirectConfig =
            serde_json::from_str(&json).map_err(|e| format!("bad config: {e}"))?;
        let netns = Path::new(netns);
        match op.as_str() {
            "install" => sidetunnel_redirect::install(netns, &cfg),
            "remove" => sidetunnel_redirect::remove(netns, &cfg),
            other => return Err(format!("unknown operation {other:?}")),
        }
        .map_err(|e| e.to_string())
    })();
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "{e}");
            std::process::exit(1)
        }
    }
}

/// Runs `op` (`install` or `remove`) for `netns` in a helper process.
pub async fn redirect(op: &str, netns: &Path, cfg: &RedirectConfig) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("locate shim binary: {e}"))?;
    let json = serde_json::to_vec(cfg).map_err(|e| e.to_string())?;
    let sub = monitor_subscribe(Topic::Pid)
        .await
        .map_err(|e| e.to_string())?;
    let spawned = tokio::process::Command::new(exe)
        .arg(ARG)
        .arg(op)
        .arg(netns)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    // Kept unwaited until the monitor reports the exit (see runtime.rs).
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            monitor_unsubscribe(sub.id).await.unwrap_or_default();
            return Err(format!("spawn redirect helper: {e}"));
        }
    };
    let pid = child.id().unwrap_or_default() as i32;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(&json)
            .await
            .map_err(|e| format!("write config: {e}"))?;
    }
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut stderr).await;
    }
    let code = wait_exit(pid, sub).await;
    if code != 0 {
        return Err(format!("{} (helper exit {code})", stderr.trim()));
    }
    Ok(())
}
