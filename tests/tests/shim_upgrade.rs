//! Live proxy upgrades under load, through a real containerd: two meshed
//! `sidetunnel` pods carry continuous new connections and long-lived
//! streams (client netns → client proxy → HBONE/mTLS → server proxy →
//! an echo server in the server netns) while the node's proxy binary is
//! replaced several times. Every replacement is taken over by both pods'
//! shims (node setting `[upgrade]`), with no failed connection, no reset
//! stream, no pod or proxy restart. Then the failures: a new binary that
//! exits, one that never becomes ready (the old proxy keeps serving and the
//! record says why), a rollback; and a crashed proxy whose restart refuses
//! no new connection (the shim held its listeners).
//!
//! `SIDETUNNEL_UPGRADE_ROUNDS` sets the number of upgrades (default 3; the
//! run of record in docs/operations.md used 10).

mod shim_support;

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use shim_support::{Cluster, MeshPod, WAIT, check_proxy_process, netns_of};
use sidetunnel_tests::cri::Cri;
use sidetunnel_tests::{bins, netns};

const TEST: &str = "shim_upgrade";
const NS: &str = "upgrade";
const ECHO_PORT: u16 = 9100;
/// How long a long-lived stream lasts: under the proxies' drain grace (5 s
/// by default), so a handover must carry it to its end.
const STREAM_LIFE: Duration = Duration::from_secs(3);
const UPGRADE: &str =
    "[upgrade]\ncheck_interval = \"500ms\"\nmax_concurrent = 2\nready_timeout = \"10s\"";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_are_replaced_under_load_without_a_failed_connection() -> Result<()> {
    shim_support::run_on_cluster(TEST, async |c| {
        c.set_extra_config(UPGRADE)?;
        let mut cri = c.h.cri().await?;
        upgrades_under_load(c, &mut cri).await
    })
    .await
}

async fn upgrades_under_load(c: &Cluster, cri: &mut Cri) -> Result<()> {
    let server = c
        .run_pod(cri, &c.pod_config("server", NS), "server")
        .await?;
    let client_config = c
        .pod_config("client", NS)
        .annotation("sidetunnel.io/prefetch", &server.ip.to_string());
    let client = c.run_pod(cri, &client_config, "client").await?;
    c.publish(&[&server, &client]).await?;
    c.wait_knows(&client, &server).await?;
    let pods = [&server, &client];
    for p in pods {
        wait_upgrades(c, p, 0).await?;
    }
    let server_netns = netns_of(&c.h, &server.pod)?;
    let client_netns = netns_of(&c.h, &client.pod)?;
    let _echo = echo_server(&server_netns)?;
    let target = SocketAddr::new(server.ip, ECHO_PORT);
    let load = Load::start(&client_netns, target);

    // Before: the load runs through the first proxies.
    tokio::time::sleep(Duration::from_secs(3)).await;
    load.phase.store(DURING, Ordering::SeqCst);

    let rounds: u32 = std::env::var("SIDETUNNEL_UPGRADE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut upgrades = 0;
    for round in 1..=rounds {
        let pids = [
            c.proxy_pid(server.id(), None, WAIT).await?,
            c.proxy_pid(client.id(), None, WAIT).await?,
        ];
        c.install_proxy(&bins::path("sidetunnel-proxy"))?;
        upgrades += 1;
        for (p, old) in pods.into_iter().zip(pids) {
            let rec = wait_upgrades(c, p, upgrades).await?;
            let pid = c.proxy_pid(p.id(), Some(old), WAIT).await?;
            check_proxy_process(pid, &netns_of(&c.h, &p.pod)?, &p.pod)?;
            ensure!(
                rec["restarts"] == 0,
                "{}: the proxy restarted during upgrade {round}: {rec}",
                p.pod.config.name
            );
            ensure!(
                rec["proxy_binary"].as_str() == Some(identity(&c.proxy)?.as_str()),
                "{}: the record names binary {} but the node's is {}",
                p.pod.config.name,
                rec["proxy_binary"],
                identity(&c.proxy)?
            );
        }
        eprintln!("upgrade {round}/{rounds} done: {}", load.snapshot());
        // Let long-lived streams opened on the old proxies finish on them
        // while new ones open on the new proxies.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    // A new binary that exits at once, then one that never becomes ready:
    // each pod's old proxy keeps serving and the record says why.
    for (script, why) in [
        ("#!/bin/sh\necho broken proxy >&2\nexit 3\n", "status 3"),
        ("#!/bin/sh\nexec sleep 600\n", "not ready within"),
    ] {
        let pids = [
            c.proxy_pid(server.id(), None, WAIT).await?,
            c.proxy_pid(client.id(), None, WAIT).await?,
        ];
        let bad = c.h.dir().join("bad-proxy");
        std::fs::write(&bad, script)?;
        c.install_proxy(&bad)?;
        for (p, pid) in pods.into_iter().zip(pids) {
            let rec = wait_record(c, p, |r| {
                r["last_upgrade"]
                    .as_str()
                    .is_some_and(|l| l.contains("failed") && l.contains(why))
            })
            .await
            .with_context(|| {
                format!("{}: no failed upgrade ({why}) recorded", p.pod.config.name)
            })?;
            ensure!(
                rec["proxy_pid"] == pid && rec["upgrades"] == upgrades,
                "{}: a failed upgrade changed the proxy: {rec}",
                p.pod.config.name
            );
            eprintln!("{}: {}", p.pod.config.name, rec["last_upgrade"]);
        }
    }
    // Rollback: the good binary again.
    c.install_proxy(&bins::path("sidetunnel-proxy"))?;
    upgrades += 1;
    for p in pods {
        wait_upgrades(c, p, upgrades).await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    load.phase.store(AFTER, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let tally = load.stop();
    eprintln!("{}", tally.table(upgrades));
    if let Err(e) = tally.check() {
        // What the proxies logged about failed connections.
        let log = std::fs::read_to_string(c.h.log_path()).unwrap_or_default();
        for line in log.lines().filter(|l| {
            (l.contains("response_flags=") && !l.contains("response_flags=\"-\""))
                || l.contains(" WARN ")
                || l.contains(" ERROR ")
        }) {
            eprintln!("{line}");
        }
        return Err(e);
    }
    ensure!(
        tally.short[DURING].ok.load(Ordering::SeqCst) > 0
            && tally.long[DURING].ok.load(Ordering::SeqCst) > 0,
        "no traffic completed during the upgrades: {}",
        tally.summary()
    );

    crashed_proxy_refuses_nothing(c, &client, &client_netns, target).await?;

    for (p, netns) in [(&server, &server_netns), (&client, &client_netns)] {
        cri.stop_pod(p.id()).await?;
        cri.remove_pod(p.id()).await?;
        c.assert_gone(p.id(), netns, &[]).await?;
    }
    c.assert_no_processes().await
}

/// The client's proxy is killed; connections the app opens right after
/// wait in the accept queue of the listeners the shim held, and are all
/// served by the restarted proxy: none is refused.
async fn crashed_proxy_refuses_nothing(
    c: &Cluster,
    client: &MeshPod,
    netns: &Path,
    target: SocketAddr,
) -> Result<()> {
    let pid = c.proxy_pid(client.id(), None, WAIT).await?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL)?;
    let killed = Instant::now();
    let netns = netns.to_owned();
    let results = tokio::task::spawn_blocking(move || {
        in_netns(&netns, move || {
            let attempts: Vec<_> = (0..10)
                .map(|i| {
                    std::thread::spawn(move || {
                        let r =
                            exchange(target, &format!("after-crash-{i}"), Duration::from_secs(30));
                        (r, killed.elapsed())
                    })
                })
                .collect();
            attempts
                .into_iter()
                .map(|t| {
                    t.join()
                        .unwrap_or_else(|_| (Err("thread panicked".into()), Duration::ZERO))
                })
                .collect::<Vec<_>>()
        })
    })
    .await??;
    let failed: Vec<String> = results
        .iter()
        .filter_map(|(r, _)| r.as_ref().err().cloned())
        .collect();
    let slowest = results.iter().map(|(_, t)| *t).max().unwrap_or_default();
    let new_pid = c.proxy_pid(client.id(), Some(pid), WAIT).await?;
    let rec = c.record(client.id())?;
    eprintln!(
        "killed proxy {pid}: 10 new connections right after, {} failed, last answered {slowest:?} \
         after the kill; restarted as {new_pid} (restarts {})",
        failed.len(),
        rec["restarts"]
    );
    ensure!(
        failed.is_empty(),
        "connections failed while the proxy restarted: {failed:?}"
    );
    Ok(())
}

/// Waits until `p`'s record shows `n` upgrades; returns the record.
async fn wait_upgrades(c: &Cluster, p: &MeshPod, n: u32) -> Result<serde_json::Value> {
    wait_record(c, p, |r| {
        r["upgrades"].as_u64().unwrap_or_default() >= u64::from(n)
            && r["proxy_binary"].is_string()
            && r["state"] == "running"
    })
    .await
    .with_context(|| format!("{}: upgrade {n} not done", p.pod.config.name))
}

async fn wait_record(
    c: &Cluster,
    p: &MeshPod,
    done: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let rec = c.record(p.id())?;
        if done(&rec) {
            return Ok(rec);
        }
        if Instant::now() > deadline {
            bail!("record after {WAIT:?}: {rec}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The identity the shim compares (`dev:inode:size:mtime`).
fn identity(path: &Path) -> Result<String> {
    Ok(sidetunnel_contract::handover::identity_of(path)?)
}

/// Runs `f` on a thread inside the network namespace at `netns`.
fn in_netns<T: Send + 'static>(netns: &Path, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let netns = netns.to_owned();
    std::thread::spawn(move || -> Result<T> {
        netns::enter(&netns)?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

/// A line echo server on [`ECHO_PORT`] in `netns` (a thread per
/// connection); runs until the process ends.
fn echo_server(netns: &Path) -> Result<JoinHandle<()>> {
    let listener = in_netns(netns, || {
        TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, ECHO_PORT)))
    })??;
    Ok(std::thread::spawn(move || {
        while let Ok((conn, _)) = listener.accept() {
            std::thread::spawn(move || {
                let mut out = match conn.try_clone() {
                    Ok(o) => o,
                    Err(_) => return,
                };
                for line in BufReader::new(conn).lines() {
                    let Ok(line) = line else { return };
                    if writeln!(out, "{line}").is_err() {
                        return;
                    }
                }
            });
        }
    }))
}

/// One connection: send a line, read it back, close.
fn exchange(target: SocketAddr, line: &str, timeout: Duration) -> Result<(), String> {
    let mut s =
        TcpStream::connect_timeout(&target, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    echo_once(&mut s, &mut r, line)
}

fn echo_once(s: &mut TcpStream, r: &mut BufReader<TcpStream>, line: &str) -> Result<(), String> {
    writeln!(s, "{line}").map_err(|e| format!("send: {e}"))?;
    let mut back = String::new();
    r.read_line(&mut back)
        .map_err(|e| format!("receive: {e}"))?;
    if back.trim_end() != line {
        return Err(format!("sent {line:?}, got {back:?}"));
    }
    Ok(())
}

const BEFORE: usize = 0;
const DURING: usize = 1;
const AFTER: usize = 2;
const PHASES: [&str; 3] = ["before", "during", "after"];

#[derive(Default)]
struct Count {
    ok: AtomicU64,
    failed: AtomicU64,
}

#[derive(Default)]
struct Tally {
    /// New connections (one exchange each), by the phase they started in.
    short: [Count; 3],
    /// Long-lived streams (an exchange every 100 ms for [`STREAM_LIFE`]).
    long: [Count; 3],
    errors: Mutex<Vec<String>>,
}

impl Tally {
    fn record(&self, long: bool, phase: usize, r: Result<(), String>) {
        let c = if long {
            &self.long[phase]
        } else {
            &self.short[phase]
        };
        match r {
            Ok(()) => c.ok.fetch_add(1, Ordering::SeqCst),
            Err(e) => {
                let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
                if errors.len() < 20 {
                    errors.push(format!(
                        "{} {}: {e}",
                        PHASES[phase],
                        if long { "stream" } else { "connection" }
                    ));
                }
                c.failed.fetch_add(1, Ordering::SeqCst)
            }
        };
    }

    fn summary(&self) -> String {
        let f = |c: &[Count; 3]| {
            PHASES
                .iter()
                .zip(c)
                .map(|(p, c)| {
                    format!(
                        "{p} {}/{} failed",
                        c.failed.load(Ordering::SeqCst),
                        c.ok.load(Ordering::SeqCst) + c.failed.load(Ordering::SeqCst)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "connections: {}; streams: {}",
            f(&self.short),
            f(&self.long)
        )
    }

    fn table(&self, upgrades: u32) -> String {
        let mut s = format!(
            "| phase ({upgrades} upgrades of both proxies during) | new connections ok | failed | long-lived streams ok | failed |\n| --- | --- | --- | --- | --- |\n"
        );
        for (i, p) in PHASES.iter().enumerate() {
            s += &format!(
                "| {p} | {} | {} | {} | {} |\n",
                self.short[i].ok.load(Ordering::SeqCst),
                self.short[i].failed.load(Ordering::SeqCst),
                self.long[i].ok.load(Ordering::SeqCst),
                self.long[i].failed.load(Ordering::SeqCst)
            );
        }
        s
    }

    fn check(&self) -> Result<()> {
        let failed: u64 = self
            .short
            .iter()
            .chain(&self.long)
            .map(|c| c.failed.load(Ordering::SeqCst))
            .sum();
        let errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        ensure!(
            failed == 0,
            "{failed} failed ({}); first errors: {errors:#?}",
            self.summary()
        );
        Ok(())
    }
}

/// Client load from inside the client pod's netns: two threads opening a
/// new connection every 20 ms, four threads each keeping a long-lived
/// stream busy.
struct Load {
    phase: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(netns: &Path, target: SocketAddr) -> Load {
        let phase = Arc::new(AtomicUsize::new(BEFORE));
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let mut threads = Vec::new();
        for (long, n) in [(false, 2), (true, 4)] {
            for t in 0..n {
                let (phase, stop, tally) = (phase.clone(), stop.clone(), tally.clone());
                let netns = netns.to_owned();
                threads.push(std::thread::spawn(move || {
                    if let Err(e) = netns::enter(&netns) {
                        tally.record(long, BEFORE, Err(format!("enter netns: {e}")));
                        return;
                    }
                    let mut i = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let p = phase.load(Ordering::SeqCst);
                        i += 1;
                        let r = if long {
                            stream(target, &format!("s{t}-{i}"))
                        } else {
                            let r = exchange(target, &format!("c{t}-{i}"), Duration::from_secs(10));
                            std::thread::sleep(Duration::from_millis(20));
                            r
                        };
                        tally.record(long, p, r);
                    }
                }));
            }
        }
        Load {
            phase,
            stop,
            tally,
            threads,
        }
    }

    fn snapshot(&self) -> String {
        self.tally.summary()
    }

    fn stop(self) -> Arc<Tally> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            let _ = t.join();
        }
        self.tally
    }
}

/// A long-lived stream: one connection, an exchange every 100 ms for
/// [`STREAM_LIFE`], then a clean close.
fn stream(target: SocketAddr, name: &str) -> Result<(), String> {
    let timeout = Duration::from_secs(10);
    let mut s =
        TcpStream::connect_timeout(&target, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < STREAM_LIFE {
        echo_once(&mut s, &mut r, &format!("{name}-{n}"))
            .map_err(|e| format!("after {n} exchanges ({:?}): {e}", start.elapsed()))?;
        n += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
