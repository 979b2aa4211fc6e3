//! Runs and supervises one pod's proxy: launches it (`spawn.rs`), restarts
//! it with backoff when it exits, keeps its exit history in the shim's
//! record, hands the pod over to a new proxy binary (`upgrade.rs`) and on
//! stop drains it (SIGTERM, grace, SIGKILL).
//!
//! The listeners a proxy gives the shim (`channel.rs`) are held here and
//! handed to every later proxy of the pod, so a restart after a crash or an
//! upgrade never closes the ports: connections arriving meanwhile wait in
//! the kernel's accept queue instead of being refused. A proxy that exits
//! before it was ever ready releases them (so a proxy that cannot start
//! leaves the ports closed, and new connections are refused: fail closed).
//! A pod that stops releases them before its proxy drains.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{error, info, warn};

use super::backoff::Backoff;
use super::channel::{Event, Held};
use super::crilog;
use super::launch::{LaunchFailure, LaunchSpec};
use super::record::{self, ExitRecord, Paths, Record};
use super::spawn::{self, LogSink, Proxy};
use super::upgrade;
use crate::config::UpgradeConfig;

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
    pub upgrade: UpgradeConfig,
}

pub struct Supervisor {
    pub state: watch::Receiver<ProxyState>,
    /// How the first start went, once known (the state moves on from a
    /// failed launch to the restart back-off within milliseconds).
    first: watch::Receiver<Option<Result<(), LaunchFailure>>>,
    stop: watch::Sender<bool>,
    task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

/// Bound on the wait for the launcher's report of the first start (it
/// arrives within milliseconds; past this the restart loop takes over).
const FIRST_START_WAIT: Duration = Duration::from_secs(10);

/// Time an old proxy gets past the drain grace before it is killed (its
/// own drain cuts what is left at the grace; this covers its exit).
const DRAIN_MARGIN: Duration = Duration::from_secs(2);

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
            warn!("proxy supervisor task: {e}");
        }
    }
}

fn save(rec: &Record, paths: &Paths) {
    if let Err(e) = rec.save(paths) {
        warn!("write {}: {e}", paths.record().display());
    }
}

fn refresh_token(token: &Option<(PathBuf, PathBuf, Duration)>, uid: u32, gid: u32) {
    if let Some((from, to, _)) = token
        && let Err(e) = super::token::copy(from, to, uid, gid)
    {
        warn!("refresh service-account token from {}: {e}", from.display());
    }
}

fn now() -> String {
    crilog::timestamp(OffsetDateTime::now_utc())
}

/// The supervisor's loop state besides the plan.
struct Run {
    plan: ProxyPlan,
    sink: LogSink,
    state: watch::Sender<ProxyState>,
    /// Listeners kept for the next proxy (see the module comment).
    held: Held,
    /// A binary that already failed to take over this pod: not retried
    /// until the file changes again.
    failed_binary: Option<String>,
    /// Old proxies draining after a handover; each yields its exit.
    draining: JoinSet<ExitRecord>,
}

async fn run(
    plan: ProxyPlan,
    state: watch::Sender<ProxyState>,
    first: FirstStart,
    mut stop: watch::Receiver<bool>,
) {
    let (uid, gid) = (plan.launch.uid, plan.launch.gid);
    let token_every = plan
        .token
        .as_ref()
        .map_or(Duration::from_secs(3600), |t| t.2);
    let mut token_tick = tokio::time::interval(token_every);
    token_tick.tick().await;
    let mut upgrade_tick = tokio::time::interval(plan.upgrade.check_interval);
    upgrade_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    upgrade_tick.tick().await;
    let mut r = Run {
        sink: spawn::open_log(&plan.log_file),
        plan,
        state,
        held: Held::default(),
        failed_binary: None,
        draining: JoinSet::new(),
    };
    loop {
        if *stop.borrow() {
            break;
        }
        r.state.send_replace(ProxyState::Starting);
        let mut cur = match spawn::spawn(&r.plan.launch, &r.sink, &r.held).await {
            Ok(p) => p,
            Err(e) => {
                error!("proxy: {e}");
                settle_first(&first, Ok(()));
                r.state.send_replace(ProxyState::SpawnFailed(e));
                let delay = r.plan.backoff.after_run(Duration::ZERO);
                if sleep_or_stop(delay, &mut stop).await {
                    break;
                }
                continue;
            }
        };
        let pid = cur.pid;
        if let Some(f) = cur.launched(FIRST_START_WAIT).await {
            error!(pid, permanent = f.is_permanent(), "proxy: {}", f.message);
            r.plan.record.state = format!("failed to start: {}", f.message);
            save(&r.plan.record, &r.plan.paths);
            settle_first(&first, Err(f.clone()));
            r.state.send_replace(ProxyState::LaunchFailed(f));
        } else {
            info!(pid, "proxy started");
            r.running(&cur);
            settle_first(&first, Ok(()));
        }

        let code = loop {
            tokio::select! {
                code = &mut cur.exit => break code,
                ev = spawn::next_event(&mut cur.events) => r.on_event(&mut cur, ev),
                Some(done) = r.draining.join_next(), if !r.draining.is_empty() => {
                    if let Ok(exit) = done {
                        r.plan.record.push_exit(exit);
                        save(&r.plan.record, &r.plan.paths);
                    }
                }
                _ = token_tick.tick() => refresh_token(&r.plan.token, uid, gid),
                _ = upgrade_tick.tick(), if r.plan.upgrade.enabled => {
                    match r.maybe_upgrade(&mut cur, &mut stop).await {
                        Some(Handover::CurrentExited(code)) => break code,
                        Some(Handover::Stopping) | Some(Handover::Done) | Some(Handover::Failed) | None => {}
                    }
                }
                _ = stopped(&mut stop) => {
                    // The ports close with the proxy's own listeners, so
                    // connections during the drain are refused as before.
                    r.held = Held::default();
                    info!(pid = cur.pid, grace = ?r.plan.drain, "draining proxy");
                    let _ = kill(Pid::from_raw(cur.pid), Signal::SIGTERM);
                    match tokio::time::timeout(r.plan.drain, &mut cur.exit).await {
                        Ok(code) => break code,
                        Err(_) => {
                            warn!(pid = cur.pid, "proxy did not exit within the drain grace; killing it");
                            let _ = kill(Pid::from_raw(cur.pid), Signal::SIGKILL);
                            break (&mut cur.exit).await;
                        }
                    }
                }
            }
        };
        let pid = cur.pid;
        let ran = cur.started.elapsed();
        r.plan.record.push_exit(ExitRecord {
            at: now(),
            pid,
            code,
            ran_ms: ran.as_millis() as u64,
        });
        r.plan.record.proxy_pid = None;
        r.plan.record.proxy_start_time = None;
        if *stop.borrow() {
            info!(pid, code, "proxy stopped");
            break;
        }
        if cur.ready.is_none() && !r.held.is_empty() {
            warn!(
                pid,
                "proxy exited before it was ready; releasing its ports (connections are refused until a proxy is back)"
            );
            r.held = Held::default();
        }
        drop(cur);
        r.plan.record.restarts += 1;
        let delay = r.plan.backoff.after_run(ran);
        warn!(pid, code, ran = ?ran, restart_in = ?delay, restarts = r.plan.record.restarts, "proxy exited; restarting");
        r.plan.record.state = format!("exited with status {code}; restarting");
        save(&r.plan.record, &r.plan.paths);
        r.state.send_replace(ProxyState::Exited {
            pid,
            code,
            retry_in: delay,
        });
        if sleep_or_stop(delay, &mut stop).await {
            break;
        }
    }
    r.held = Held::default();
    while let Some(done) = r.draining.join_next().await {
        if let Ok(exit) = done {
            r.plan.record.push_exit(exit);
        }
    }
    r.plan.record.state = "stopped".into();
    save(&r.plan.record, &r.plan.paths);
    r.state.send_replace(ProxyState::Stopped);
}

/// How a handover attempt ended.
enum Handover {
    /// The new proxy serves; the old one drains.
    Done,
    /// The new proxy was stopped; the old one keeps serving.
    Failed,
    /// The old proxy exited meanwhile (status); the new one was stopped.
    CurrentExited(i32),
    /// The pod is stopping; the new proxy was stopped.
    Stopping,
}

impl Run {
    /// Records `p` as the pod's running proxy.
    fn running(&mut self, p: &Proxy) {
        let rec = &mut self.plan.record;
        rec.proxy_pid = Some(p.pid);
        rec.proxy_start_time = record::start_time(p.pid);
        rec.proxy_version = p.ready.as_ref().map(|r| r.0.clone());
        rec.proxy_binary = p.ready.as_ref().map(|r| r.1.clone());
        rec.state = "running".into();
        save(rec, &self.plan.paths);
        self.state.send_replace(ProxyState::Running { pid: p.pid });
    }

    fn on_event(&mut self, p: &mut Proxy, ev: Event) {
        match ev {
            Event::Listeners(held) => {
                info!(pid = p.pid, listeners = %held.names(), "holding the proxy's listeners");
                self.held = held;
            }
            Event::Ready { version, binary } => {
                info!(pid = p.pid, %version, %binary, "proxy ready");
                p.ready = Some((version, binary));
                self.running(p);
            }
        }
    }

    /// On the upgrade tick: hands over to the file at `proxy.binary` when
    /// it is not what the current proxy runs, a node slot is free, and the
    /// current proxy holds handed-over listeners (else there is nothing to
    /// hand over without closing the ports).
    async fn maybe_upgrade(
        &mut self,
        cur: &mut Proxy,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<Handover> {
        let running = cur.ready.as_ref()?.1.clone();
        if self.held.is_empty() {
            return None;
        }
        let binary = &self.plan.launch.binary;
        let on_disk = sidetunnel_contract::handover::identity_of(binary).ok()?;
        if on_disk == running || self.failed_binary.as_deref() == Some(on_disk.as_str()) {
            return None;
        }
        let slot = match upgrade::try_slot(
            &self.plan.launch.state_root,
            self.plan.upgrade.max_concurrent,
        ) {
            Ok(Some(slot)) => slot,
            Ok(None) => {
                info!(
                    pid = cur.pid,
                    "new proxy binary; waiting for a free upgrade slot on this node"
                );
                return None;
            }
            Err(e) => {
                warn!(
                    "upgrade slots under {}: {e}",
                    self.plan.launch.state_root.display()
                );
                return None;
            }
        };
        info!(pid = cur.pid, from = %running, to = %on_disk, slot = slot.index, "new proxy binary: handing over");
        let outcome = self.hand_over(cur, stop, &on_disk).await;
        drop(slot);
        Some(outcome)
    }

    async fn hand_over(
        &mut self,
        cur: &mut Proxy,
        stop: &mut watch::Receiver<bool>,
        on_disk: &str,
    ) -> Handover {
        let mut new = match spawn::spawn(&self.plan.launch, &self.sink, &self.held).await {
            Ok(p) => p,
            Err(e) => return self.upgrade_failed(cur, on_disk, format!("could not start it: {e}")),
        };
        let timeout = tokio::time::sleep(self.plan.upgrade.ready_timeout);
        tokio::pin!(timeout);
        let failure = loop {
            tokio::select! {
                code = &mut cur.exit => {
                    stop_new(&mut new).await;
                    warn!(pid = cur.pid, code, "the old proxy exited during the handover; restarting");
                    return Handover::CurrentExited(code);
                }
                code = &mut new.exit => {
                    let why = match new.launched(Duration::from_millis(200)).await {
                        Some(f) => f.message,
                        None => format!("it exited with status {code} before it was ready"),
                    };
                    return self.upgrade_failed(cur, on_disk, why);
                }
                ev = spawn::next_event(&mut new.events) => match ev {
                    Event::Listeners(held) => self.held = held,
                    Event::Ready { version, binary } => {
                        new.ready = Some((version, binary));
                        break None;
                    }
                },
                _ = &mut timeout => break Some(format!(
                    "it was not ready within {:?} (upgrade.ready_timeout)",
                    self.plan.upgrade.ready_timeout
                )),
                _ = stopped(stop) => {
                    stop_new(&mut new).await;
                    return Handover::Stopping;
                }
            }
        };
        if let Some(why) = failure {
            stop_new(&mut new).await;
            return self.upgrade_failed(cur, on_disk, why);
        }
        // The new proxy serves: the old one stops accepting everywhere and
        // drains (see sidetunnel_contract::handover).
        let old = std::mem::replace(cur, new);
        let (old_version, _) = old.ready.clone().unwrap_or_default();
        let (version, binary) = cur.ready.clone().unwrap_or_default();
        let _ = kill(Pid::from_raw(old.pid), Signal::SIGUSR1);
        let grace = self.plan.drain + DRAIN_MARGIN;
        self.draining.spawn(drain_old(old, grace));
        let rec = &mut self.plan.record;
        rec.upgrades += 1;
        rec.last_upgrade = Some(format!(
            "{}: handed over from pid {} (version {old_version}) to pid {} (version {version}, binary {binary})",
            now(),
            rec.proxy_pid.unwrap_or_default(),
            cur.pid
        ));
        info!(pid = cur.pid, %version, %binary, "proxy upgraded");
        self.failed_binary = None;
        self.running(cur);
        Handover::Done
    }

    fn upgrade_failed(&mut self, cur: &Proxy, on_disk: &str, why: String) -> Handover {
        error!(pid = cur.pid, binary = %on_disk, "proxy upgrade failed, the running proxy keeps serving: {why}");
        self.failed_binary = Some(on_disk.to_string());
        self.plan.record.last_upgrade = Some(format!(
            "{}: upgrade to {} (binary {on_disk}) failed: {why}; pid {} keeps serving",
            now(),
            self.plan.launch.binary.display(),
            cur.pid
        ));
        save(&self.plan.record, &self.plan.paths);
        Handover::Failed
    }
}

/// Kills a new proxy that will not take over, and waits for its exit.
async fn stop_new(new: &mut Proxy) {
    let _ = kill(Pid::from_raw(new.pid), Signal::SIGKILL);
    let _ = tokio::time::timeout(Duration::from_secs(10), &mut new.exit).await;
}

/// Waits for a handed-over proxy to finish draining, killing it after
/// `grace`.
async fn drain_old(mut old: Proxy, grace: Duration) -> ExitRecord {
    let code = match tokio::time::timeout(grace, &mut old.exit).await {
        Ok(code) => code,
        Err(_) => {
            warn!(
                pid = old.pid,
                "old proxy still draining after {grace:?}; killing it"
            );
            let _ = kill(Pid::from_raw(old.pid), Signal::SIGKILL);
            (&mut old.exit).await
        }
    };
    info!(pid = old.pid, code, "old proxy exited after the handover");
    ExitRecord {
        at: now(),
        pid: old.pid,
        code,
        ran_ms: old.started.elapsed().as_millis() as u64,
    }
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
