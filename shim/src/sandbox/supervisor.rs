//! Runs and supervises one pod's proxy: launches it (through the launcher),
//! forwards its output to the pod's CRI log and the shim log, restarts it with
//! backoff when it exits, keeps its exit history in the shim's record, and on
//! stop drains it (SIGTERM, grace, SIGKILL).

use std::fmt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use containerd_shim::asynchronous::monitor::{monitor_subscribe, monitor_unsubscribe};
use containerd_shim::monitor::Topic;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use time::OffsetDateTime;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::backoff::Backoff;
use super::crilog::{self, Stream};
use super::launch::{self, LaunchFailure, LaunchSpec};
use super::record::{self, ExitRecord, Paths, Record};
use crate::runtime::wait_exit;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProxyState {
    Starting,
    Running {
        pid: i32,
    },
    /// Exited; restarting after `retry_in`.
    Exited {
        pid: i32,
        code: i32,
        retry_in: Duration,
    },
    SpawnFailed(String),
    /// The launcher could not execute the proxy (it exits next).
    LaunchFailed(LaunchFailure),
    Stopped,
}

impl fmt::Display for ProxyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyState::Starting => f.write_str("starting"),
            ProxyState::Running { pid } => write!(f, "running (pid {pid})"),
            ProxyState::Exited {
                pid,
                code,
                retry_in,
            } => {
                write!(
                    f,
                    "exited (pid {pid}, status {code}), restarting in {retry_in:?}"
                )
            }
            ProxyState::SpawnFailed(e) => write!(f, "failed to start: {e}"),
            ProxyState::LaunchFailed(e) => write!(f, "failed to start: {}", e.message),
            ProxyState::Stopped => f.write_str("stopped"),
        }
    }
}

pub struct ProxyPlan {
    pub launch: LaunchSpec,
    pub paths: Paths,
    pub log_file: Option<PathBuf>,
    pub drain: Duration,
    pub backoff: Backoff,
    /// Kubelet's token → the proxy's copy, refreshed at this interval.
    pub token: Option<(PathBuf, PathBuf, Duration)>,
    pub record: Record,
}

pub struct Supervisor {
    pub state: watch::Receiver<ProxyState>,
    /// How the first start went, once known (the state moves on from a
    /// failed launch to the restart back-off within milliseconds).
    first: watch::Receiver<Option<Result<(), LaunchFailure>>>,
    stop: watch::Sender<bool>,
    task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

type LogSink = Arc<Mutex<Option<std::fs::File>>>;

/// Bound on the wait for the launcher's report of the first start (it
/// arrives within milliseconds; past this the restart loop takes over).
const FIRST_START_WAIT: Duration = Duration::from_secs(10);

impl Supervisor {
    pub fn start(plan: ProxyPlan) -> Supervisor {
        let (state_tx, state) = watch::channel(ProxyState::Starting);
        let (first_tx, first) = watch::channel(None);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(plan, state_tx, first_tx, stop_rx));
        Supervisor {
            state,
            first,
            stop,
            task: tokio::sync::Mutex::new(Some(task)),
        }
    }

    pub fn current(&self) -> ProxyState {
        self.state.borrow().clone()
    }

    /// How the first start went: `Err` when the launcher could not execute
    /// the proxy for a reason a retry cannot fix (see
    /// [`LaunchFailure::is_permanent`]). Anything else, including a proxy
    /// that exits later, is left to the restart loop.
    pub async fn first_start(&self) -> Result<(), LaunchFailure> {
        let mut rx = self.first.clone();
        let settled = tokio::time::timeout(FIRST_START_WAIT, rx.wait_for(Option::is_some)).await;
        match settled {
            Ok(Ok(first)) => match &*first {
                Some(Err(f)) if f.is_permanent() => Err(f.clone()),
                _ => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// Drains and stops the proxy; returns once it is gone. Idempotent.
    pub async fn stop(&self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.lock().await.take()
            && let Err(e) = task.await
        {
            tracing::warn!("proxy supervisor task: {e}");
        }
    }
}

fn open_log(path: &Option<PathBuf>) -> LogSink {
    let file = path.as_ref().and_then(|p| {
        let dir = p.parent()?;
        std::fs::create_dir_all(dir).ok()?;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .inspect_err(|e| tracing::warn!("open proxy log {}: {e}", p.display()))
            .ok()
    });
    Arc::new(Mutex::new(file))
}

fn forward(out: impl AsyncRead + Unpin + Send + 'static, stream: Stream, sink: LogSink) {
    tokio::spawn(async move {
        let mut r = BufReader::new(out);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            tracing::info!(target: "sidetunnel::proxy", stream = stream.as_str(), "{}", String::from_utf8_lossy(&line));
            let rec = crilog::records(OffsetDateTime::now_utc(), stream, &line);
            if let Some(f) = sink.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                let _ = std::io::Write::write_all(f, &rec);
            }
        }
    });
}

type Spawned = (
    i32,
    containerd_shim::asynchronous::monitor::Subscription,
    tokio::process::Child,
    tokio::sync::oneshot::Receiver<Option<LaunchFailure>>,
);

async fn spawn(spec: &LaunchSpec, sink: &LogSink) -> Result<Spawned, String> {
    let exe = std::env::current_exe().map_err(|e| format!("locate shim binary: {e}"))?;
    let json = serde_json::to_string(spec).map_err(|e| e.to_string())?;
    let (report_rx, report_tx) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let sub = monitor_subscribe(Topic::Pid)
        .await
        .map_err(|e| e.to_string())?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg(launch::ARG)
        .env_clear()
        .env(launch::ENV, json)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let report_raw = std::os::fd::AsRawFd::as_raw_fd(&report_tx);
    // SAFETY: dup2 is async-signal-safe; it places the report pipe's write
    // end at the launcher's REPORT_FD (without close-on-exec).
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself would keep close-on-exec: clear it instead.
            let r = if report_raw == launch::REPORT_FD {
                libc::fcntl(report_raw, libc::F_SETFD, 0)
            } else {
                libc::dup2(report_raw, launch::REPORT_FD)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    drop(report_tx);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            monitor_unsubscribe(sub.id).await.unwrap_or_default();
            return Err(format!("spawn launcher: {e}"));
        }
    };
    let pid = child.id().unwrap_or_default() as i32;
    if let Some(o) = child.stdout.take() {
        forward(o, Stream::Stdout, sink.clone());
    }
    if let Some(e) = child.stderr.take() {
        forward(e, Stream::Stderr, sink.clone());
    }
    let (outcome_tx, outcome) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("launch-report".into())
        .spawn(move || {
            let _ = outcome_tx.send(read_report(report_rx));
        })
        .map_err(|e| format!("spawn report reader: {e}"))?;
    // The handle is kept (never waited on) until the monitor reports the
    // exit: a dropped tokio Child joins tokio's orphan reaper, which could
    // collect the status before the shim's reaper and so hide the exit.
    Ok((pid, sub, child, outcome))
}

/// Reads the launcher's report pipe to its end: nothing means the proxy was
/// executed (the close-on-exec write end closed), a line is the failure.
fn read_report(pipe: std::os::fd::OwnedFd) -> Option<LaunchFailure> {
    use std::io::Read;
    let mut text = String::new();
    let _ = std::fs::File::from(pipe)
        .take(64 * 1024)
        .read_to_string(&mut text);
    let line = text.lines().next()?.trim();
    if line.is_empty() {
        return None;
    }
    Some(
        serde_json::from_str(line).unwrap_or_else(|_| LaunchFailure {
            exec: false,
            errno: None,
            message: line.to_string(),
        }),
    )
}

fn save(rec: &Record, paths: &Paths) {
    if let Err(e) = rec.save(paths) {
        tracing::warn!("write {}: {e}", paths.record().display());
    }
}

fn refresh_token(token: &Option<(PathBuf, PathBuf, Duration)>, uid: u32, gid: u32) {
    if let Some((from, to, _)) = token
        && let Err(e) = super::token::copy(from, to, uid, gid)
    {
        tracing::warn!("refresh service-account token from {}: {e}", from.display());
    }
}

async fn run(
    mut plan: ProxyPlan,
    state: watch::Sender<ProxyState>,
    first: FirstStart,
    mut stop: watch::Receiver<bool>,
) {
    let sink = open_log(&plan.log_file);
    let (uid, gid) = (plan.launch.uid, plan.launch.gid);
    let token_every = plan
        .token
        .as_ref()
        .map_or(Duration::from_secs(3600), |t| t.2);
    let mut token_tick = tokio::time::interval(token_every);
    token_tick.tick().await;
    loop {
        if *stop.borrow() {
            break;
        }
        state.send_replace(ProxyState::Starting);
        let started = Instant::now();
        let (pid, sub, child, outcome) = match spawn(&plan.launch, &sink).await {
            Ok(x) => x,
            Err(e) => {
                tracing::error!("proxy: {e}");
                settle_first(&first, Ok(()));
                state.send_replace(ProxyState::SpawnFailed(e));
                let delay = plan.backoff.after_run(Duration::ZERO);
                if sleep_or_stop(delay, &mut stop).await {
                    break;
                }
                continue;
            }
        };
        let failure = match tokio::time::timeout(FIRST_START_WAIT, outcome).await {
            Ok(Ok(failure)) => failure,
            _ => None,
        };
        if let Some(f) = failure {
            tracing::error!(pid, permanent = f.is_permanent(), "proxy: {}", f.message);
            plan.record.state = format!("failed to start: {}", f.message);
            save(&plan.record, &plan.paths);
            settle_first(&first, Err(f.clone()));
            state.send_replace(ProxyState::LaunchFailed(f));
        } else {
            tracing::info!(pid, "proxy started");
            plan.record.proxy_pid = Some(pid);
            plan.record.proxy_start_time = record::start_time(pid);
            plan.record.state = "running".into();
            save(&plan.record, &plan.paths);
            settle_first(&first, Ok(()));
            state.send_replace(ProxyState::Running { pid });
        }

        let exit = wait_exit(pid, sub);
        tokio::pin!(exit);
        let code = loop {
            tokio::select! {
                code = &mut exit => break code,
                _ = token_tick.tick() => refresh_token(&plan.token, uid, gid),
                _ = stopped(&mut stop) => {
                    tracing::info!(pid, grace = ?plan.drain, "draining proxy");
                    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                    match tokio::time::timeout(plan.drain, &mut exit).await {
                        Ok(code) => break code,
                        Err(_) => {
                            tracing::warn!(pid, "proxy did not exit within the drain grace; killing it");
                            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                            break exit.await;
                        }
                    }
                }
            }
        };
        drop(child);
        let ran = started.elapsed();
        plan.record.push_exit(ExitRecord {
            at: crilog::timestamp(OffsetDateTime::now_utc()),
            pid,
            code,
            ran_ms: ran.as_millis() as u64,
        });
        plan.record.proxy_pid = None;
        plan.record.proxy_start_time = None;
        if *stop.borrow() {
            tracing::info!(pid, code, "proxy stopped");
            break;
        }
        plan.record.restarts += 1;
        let delay = plan.backoff.after_run(ran);
        tracing::warn!(pid, code, ran = ?ran, restart_in = ?delay, restarts = plan.record.restarts, "proxy exited; restarting");
        plan.record.state = format!("exited with status {code}; restarting");
        save(&plan.record, &plan.paths);
        state.send_replace(ProxyState::Exited {
            pid,
            code,
            retry_in: delay,
        });
        if sleep_or_stop(delay, &mut stop).await {
            break;
        }
    }
    plan.record.state = "stopped".into();
    save(&plan.record, &plan.paths);
    state.send_replace(ProxyState::Stopped);
}

/// The first start's outcome (see [`Supervisor::first_start`]): the first
/// settled value stays, later starts do not change it.
type FirstStart = watch::Sender<Option<Result<(), LaunchFailure>>>;

fn settle_first(first: &FirstStart, outcome: Result<(), LaunchFailure>) {
    first.send_if_modified(|f| {
        if f.is_some() {
            return false;
        }
        *f = Some(outcome);
        true
    });
}

/// Sleeps `d`; true when a stop was requested meanwhile.
async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = stopped(stop) => {}
    }
    *stop.borrow()
}

/// Resolves once a stop was requested.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
