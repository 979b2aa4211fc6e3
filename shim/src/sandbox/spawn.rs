//! Starting one proxy process: the launcher child (see `launch.rs`) with
//! its report pipe, the proxy's end of a fresh handover channel and the
//! listeners the shim holds placed at the descriptors the contract names;
//! the proxy's output forwarded to the pod's CRI log and the shim log.

use std::future::Future;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use containerd_shim::asynchronous::monitor::{monitor_subscribe, monitor_unsubscribe};
use containerd_shim::monitor::Topic;
use sidetunnel_contract::handover::{CHANNEL_ENV, CHANNEL_FD, LISTEN_FDS_START};
use time::OffsetDateTime;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;

use super::channel::{self, Event, Held};
use super::crilog::{self, Stream};
use super::launch::{self, LaunchFailure, LaunchSpec};
use crate::runtime::wait_exit;

pub type LogSink = Arc<Mutex<Option<std::fs::File>>>;

/// One running proxy process, from the shim's side.
pub struct Proxy {
    pub pid: i32,
    /// Resolves to the exit status once the process is gone.
    pub exit: Pin<Box<dyn Future<Output = i32> + Send>>,
    /// What the proxy says on its handover channel; `None` once closed.
    pub events: Option<mpsc::UnboundedReceiver<Event>>,
    pub started: Instant,
    /// `(version, binary identity)` once the proxy said it is ready.
    pub ready: Option<(String, String)>,
    /// The launcher's report: `Some` failure, or `None` once executed.
    outcome: Option<tokio::sync::oneshot::Receiver<Option<LaunchFailure>>>,
    /// Kept (never waited on) until the monitor reports the exit: a dropped
    /// tokio Child joins tokio's orphan reaper, which could collect the
    /// status before the shim's reaper and so hide the exit.
    _child: tokio::process::Child,
}

impl Proxy {
    /// How the launch went, waiting up to `bound` for the launcher's
    /// report (it comes within milliseconds); `None`: the proxy runs.
    pub async fn launched(&mut self, bound: Duration) -> Option<LaunchFailure> {
        let rx = self.outcome.take()?;
        match tokio::time::timeout(bound, rx).await {
            Ok(Ok(failure)) => failure,
            _ => None,
        }
    }
}

/// The next event of a proxy's channel, or never once it closed (so a
/// `select!` branch on it does not spin). Takes the field, not the
/// [`Proxy`], so the same `select!` can also wait for the exit.
pub async fn next_event(events: &mut Option<mpsc::UnboundedReceiver<Event>>) -> Event {
    if let Some(rx) = events {
        if let Some(ev) = rx.recv().await {
            return ev;
        }
        *events = None;
    }
    std::future::pending().await
}

pub fn open_log(path: &Option<PathBuf>) -> LogSink {
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

/// Starts the launcher for `spec`, handing down `held` listeners.
pub async fn spawn(spec: &LaunchSpec, sink: &LogSink, held: &Held) -> Result<Proxy, String> {
    let exe = std::env::current_exe().map_err(|e| format!("locate shim binary: {e}"))?;
    let mut spec = spec.clone();
    spec.env
        .push((CHANNEL_ENV.to_string(), CHANNEL_FD.to_string()));
    if !held.is_empty() {
        spec.env.push((
            sidetunnel_contract::handover::LISTEN_FDS_ENV.to_string(),
            held.names(),
        ));
    }
    let json = serde_json::to_string(&spec).map_err(|e| e.to_string())?;
    let (report_rx, report_tx) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let (channel_shim, channel_proxy) =
        channel::pair().map_err(|e| format!("handover channel: {e}"))?;
    // Where each descriptor goes in the launcher: report pipe, channel,
    // then the held listeners in order.
    let mut moves = vec![
        (report_tx.as_raw_fd(), launch::REPORT_FD),
        (channel_proxy.as_raw_fd(), CHANNEL_FD),
    ];
    for (i, (fd, _)) in held.fds().into_iter().enumerate() {
        moves.push((fd, LISTEN_FDS_START + i as i32));
    }
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
    // SAFETY: fcntl and dup2 are async-signal-safe and nothing allocates.
    unsafe {
        cmd.pre_exec(move || place_descriptors(&moves));
    }
    let spawned = cmd.spawn();
    drop(report_tx);
    drop(channel_proxy);
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
    Ok(Proxy {
        pid,
        exit: Box::pin(wait_exit(pid, sub)),
        events: Some(channel::read_events(channel_shim, pid)),
        started: Instant::now(),
        ready: None,
        outcome: Some(outcome),
        _child: child,
    })
}

/// In the forked child before exec: each `(from, to)` descriptor lands at
/// `to` without close-on-exec. Copies go high first, so a `from` equal to
/// an earlier `to` is not overwritten before it is moved.
fn place_descriptors(moves: &[(i32, i32)]) -> std::io::Result<()> {
    const MAX: usize = 2 + sidetunnel_contract::handover::MAX_LISTENERS;
    let mut high = [-1i32; MAX];
    if moves.len() > MAX {
        return Err(std::io::Error::from_raw_os_error(libc::EMFILE));
    }
    for (i, (from, _)) in moves.iter().enumerate() {
        // SAFETY: duplicates an open descriptor (close-on-exec) at >= 64.
        let fd = unsafe { libc::fcntl(*from, libc::F_DUPFD_CLOEXEC, 64) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        high[i] = fd;
    }
    for (i, (_, to)) in moves.iter().enumerate() {
        // SAFETY: dup2 onto the target number; the copy is inheritable.
        if unsafe { libc::dup2(high[i], *to) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
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
