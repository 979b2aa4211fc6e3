//! The `sidetunnel` runtime (containerd-shim-sidetunnel-v1) under a real
//! containerd, driven over CRI like kubelet: the sandbox gets the redirection
//! ruleset before any app container exists, a supervised proxy runs in the
//! pod's netns and cgroup as a non-root user, app start waits for its
//! readiness, exec and logs work, a killed proxy is restarted, and removing
//! the pod leaves nothing. A `runc` pod runs side by side, unchanged.
//!
//! The proxy is a stand-in configured through the node config (busybox httpd
//! answering `GET /healthz/ready` with 200 `ready`), so these tests exercise
//! the shim's launch, identity, supervision and readiness gating on their own.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use sidetunnel_tests::containerd::{self, Containerd, Options, RUNC, SIDETUNNEL};
use sidetunnel_tests::cri::{ContainerSpec, Cri, Pod, median};
use sidetunnel_tests::{bins, image, prereq};

const TEST: &str = "shim";
const PROXY_UID: u32 = 15000;
const SHIM: &str = "containerd-shim-sidetunnel-v1";

fn prerequisites() -> bool {
    prereq::root(TEST)
        && prereq::binary(TEST, containerd::CONTAINERD)
        && prereq::binary(TEST, "runc")
        && prereq::binary(TEST, "nft")
        && prereq::binary(TEST, image::BUSYBOX_BIN)
        && prereq::binary(TEST, &format!("{}/bridge", containerd::CNI_BIN_DIR))
}

/// Node config + stand-in proxy in a directory the proxy user can traverse.
struct Node {
    dir: tempfile::TempDir,
}

const STAND_IN: &str = r#"#!/bin/busybox sh
echo "stand-in proxy for $SIDETUNNEL_POD_NAMESPACE/$SIDETUNNEL_POD_NAME as uid $(/bin/busybox id -u)"
/bin/busybox mkdir -p www/healthz
case "$SIDETUNNEL_POD_NAME" in
  never-ready*) echo "never ready" >&2 ;;
  *) echo ready > www/healthz/ready ;;
esac
exec /bin/busybox httpd -f -p 127.0.0.1:15021 -h www
"#;

impl Node {
    /// `runtime`: extra TOML for the `[runtime]` table (e.g. the OCI runtime binary).
    fn new(runtime: &str) -> Result<Node> {
        let dir = tempfile::Builder::new().prefix("st-shim-node-").tempdir()?;
        let d = dir.path();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
        std::fs::write(d.join("root-cert.pem"), "-----BEGIN CERTIFICATE-----\n")?;
        let proxy = d.join("stand-in-proxy");
        std::fs::write(&proxy, STAND_IN)?;
        std::fs::set_permissions(&proxy, std::fs::Permissions::from_mode(0o755))?;
        std::fs::create_dir(d.join("state"))?;
        std::fs::write(
            d.join("config.toml"),
            format!(
                r#"[mesh]
xds_address = "127.0.0.1:15012"
root_cert = "{root}"
trust_domain = "cluster.local"
cluster_id = "test"

[proxy]
binary = "{proxy}"
args = []
uid = {PROXY_UID}
gid = {PROXY_UID}
state_root = "{state}"
readiness_timeout = "20s"
drain_grace = "2s"
restart_backoff_initial = "100ms"
restart_backoff_max = "1s"

[runtime]
{runtime}
"#,
                root = d.join("root-cert.pem").display(),
                proxy = proxy.display(),
                state = d.join("state").display(),
            ),
        )?;
        Ok(Node { dir })
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    fn sandbox_dir(&self, pod: &Pod) -> PathBuf {
        self.dir.path().join("state").join(&pod.id)
    }

    fn record(&self, pod: &Pod) -> Result<serde_json::Value> {
        let p = self.sandbox_dir(pod).join("shim.json");
        let text = std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?;
        Ok(serde_json::from_str(&text)?)
    }

    /// The running proxy's pid from the shim's record.
    async fn proxy_pid(&self, pod: &Pod, not: Option<i32>, limit: Duration) -> Result<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(r) = self.record(pod)
                && let Some(pid) = r["proxy_pid"].as_i64()
                && Some(pid as i32) != not
                && exec_done(pid as i32)
            {
                return Ok(pid as i32);
            }
            if Instant::now() > deadline {
                bail!("no running proxy recorded for {} within {limit:?}", pod.id);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The process exists and the launcher has exec'd the proxy (so it is in
/// its final namespaces, cgroups and identity).
fn exec_done(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| !String::from_utf8_lossy(&c).contains("__launch-proxy"))
}

fn app() -> ContainerSpec {
    ContainerSpec::new("app", image::BUSYBOX).command(&["sh", "-c", "echo hello; exec sleep 3600"])
}

fn status_field(pid: i32, key: &str) -> Result<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
        .with_context(|| format!("{key} not in /proc/{pid}/status"))
}

fn same_file(a: &Path, b: &Path) -> Result<bool> {
    let (ma, mb) = (std::fs::metadata(a)?, std::fs::metadata(b)?);
    Ok(ma.dev() == mb.dev() && ma.ino() == mb.ino())
}

fn netns_of(h: &Containerd, pod: &Pod) -> Result<PathBuf> {
    match sidetunnel_oci::classify_bundle(&h.task_bundle(&pod.id))? {
        sidetunnel_oci::Role::Sandbox(info) => {
            info.netns_path.context("sandbox without netns path")
        }
        other => bail!("sandbox bundle classified as {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidetunnel_pods_get_a_supervised_proxy_and_leave_nothing_behind() -> Result<()> {
    if !prerequisites() {
        return Ok(());
    }
    tokio::time::timeout(Duration::from_secs(480), run())
        .await
        .context("shim test exceeded 480s")?
}

async fn run() -> Result<()> {
    let node = Node::new("")?;
    let h = harness(&node).await?;
    let mut cri = h.cri().await?;
    let res = async {
        injected_pod(&h, &mut cri, &node).await?;
        opted_out_and_runc_side_by_side(&h, &mut cri, &node).await?;
        readiness_timeout_fails_start(&h, &mut cri, &node).await?;
        shim_crash_is_cleaned_up(&h, &mut cri, &node).await?;
        timed_pods(&h, &mut cri, &node).await
    }
    .await;
    if res.is_err() {
        eprintln!("containerd log tail:\n{}", h.log_tail(60));
    }
    res?;
    h.shutdown().await
}

/// Pods per handler for the RunPodSandbox → app-running comparison.
const TIMED_PODS: usize = 20;

/// Median RunPodSandbox → app container running, sidetunnel vs runc,
/// alternating handlers in the same run (reported, not asserted).
async fn timed_pods(h: &Containerd, cri: &mut Cri, node: &Node) -> Result<()> {
    let (mut st, mut rc) = (Vec::new(), Vec::new());
    for i in 0..TIMED_PODS {
        for (handler, samples) in [(SIDETUNNEL, &mut st), (RUNC, &mut rc)] {
            let config = h.pod_config(&format!("timed-{handler}-{i}"), handler);
            let (pod, _app, elapsed) = cri.run_pod_with_container(&config, &app()).await?;
            samples.push(elapsed);
            cri.stop_pod(&pod.id).await?;
            cri.remove_pod(&pod.id).await?;
            ensure!(
                !node.sandbox_dir(&pod).exists(),
                "state dir left for {}",
                pod.id
            );
        }
    }
    eprintln!(
        "RunPodSandbox → app running, median over {TIMED_PODS} pods: sidetunnel {:?}, runc {:?}",
        median(&st),
        median(&rc)
    );
    Ok(())
}

async fn harness(node: &Node) -> Result<Containerd> {
    Containerd::start_with_images(Options {
        sidetunnel_shim: Some(bins::path(SHIM)),
        sidetunnel_config: Some(node.config()),
        ..Default::default()
    })
    .await
}

/// The OCI runtime is configurable: the same pod runs under crun.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidetunnel_pods_run_under_crun() -> Result<()> {
    if !prerequisites() || !prereq::binary("shim_crun", "/usr/bin/crun") {
        return Ok(());
    }
    tokio::time::timeout(Duration::from_secs(300), async {
        let node = Node::new("binary = \"/usr/bin/crun\"")?;
        let h = harness(&node).await?;
        let mut cri = h.cri().await?;
        let res = async {
            let config = h.pod_config("crun-web", SIDETUNNEL);
            let (pod, app, _) = match cri.run_pod_with_container(&config, &app()).await {
                Ok(x) => x,
                // crun refuses cgroup v1/v2 hybrid hosts whose unified
                // hierarchy has controllers. Then the shim must surface
                // crun's own reason and undo the sandbox hook.
                Err(e) if format!("{e:#}").contains("hybrid mode not supported") => {
                    eprintln!("crun cannot run containers on this host's cgroup layout: {e:#}");
                    let left = std::fs::read_dir(node.dir.path().join("state"))?.count();
                    ensure!(left == 0, "failed sandbox left {left} state dirs");
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            node.proxy_pid(&pod, None, Duration::from_secs(20)).await?;
            ensure!(
                cri.exec_ok(&app.id, &["echo", "ok"]).await?.trim() == "ok",
                "exec under crun"
            );
            app.wait_log("hello", Duration::from_secs(10)).await?;
            cri.stop_pod(&pod.id).await?;
            cri.remove_pod(&pod.id).await?;
            ensure!(!node.sandbox_dir(&pod).exists(), "state dir left");
            Ok(())
        }
        .await;
        if res.is_err() {
            eprintln!("containerd log tail:\n{}", h.log_tail(60));
        }
        res?;
        h.shutdown().await
    })
    .await
    .context("crun test exceeded 300s")?
}

/// The shim is SIGKILLed: containerd runs `shim delete`, which must remove
/// the proxy, the rules and the files the dead shim left.
async fn shim_crash_is_cleaned_up(h: &Containerd, cri: &mut Cri, node: &Node) -> Result<()> {
    let (pod, _app, _) = cri
        .run_pod_with_container(&h.pod_config("crash", SIDETUNNEL), &app())
        .await?;
    let netns = netns_of(h, &pod)?;
    let proxy = node.proxy_pid(&pod, None, Duration::from_secs(20)).await?;
    let shims = h.shim_pids();
    ensure!(shims.len() == 1, "expected one shim, found {shims:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shims[0]),
        nix::sys::signal::SIGKILL,
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while node.sandbox_dir(&pod).exists() || Path::new(&format!("/proc/{proxy}")).exists() {
        ensure!(
            Instant::now() < deadline,
            "after the shim died: state dir present {}, proxy alive {}",
            node.sandbox_dir(&pod).exists(),
            Path::new(&format!("/proc/{proxy}")).exists()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if netns.exists() {
        let rules = sidetunnel_redirect::show(&netns)?;
        ensure!(
            rules.contains("(not installed)"),
            "rules left after shim crash:\n{rules}"
        );
    }
    cri.stop_pod(&pod.id).await?;
    cri.remove_pod(&pod.id).await?;
    ensure!(
        h.pod_cgroup_pids().is_empty(),
        "processes left: {:?}",
        h.pod_cgroup_pids()
    );
    Ok(())
}

async fn injected_pod(h: &Containerd, cri: &mut Cri, node: &Node) -> Result<()> {
    let config = h.pod_config("web", SIDETUNNEL).namespace("shop");
    let t = Instant::now();
    let pod = cri.run_pod(&config).await?;
    eprintln!("sidetunnel pod: RunPodSandbox in {:?}", t.elapsed());
    let netns = netns_of(h, &pod)?;

    // The ruleset is in the pod netns before any app container exists.
    let rules = sidetunnel_redirect::show(&netns)?;
    ensure!(
        !rules.contains("(not installed)"),
        "no ruleset before app start:\n{rules}"
    );
    ensure!(
        rules.contains("redirect") && rules.contains("tproxy"),
        "unexpected ruleset:\n{rules}"
    );

    // The proxy: pod netns, pod cgroup, non-root, only NET_ADMIN + NET_RAW,
    // its own mount namespace, its identity in the environment.
    let pid = node.proxy_pid(&pod, None, Duration::from_secs(20)).await?;
    ensure!(
        same_file(&netns, Path::new(&format!("/proc/{pid}/ns/net")))?,
        "proxy not in pod netns"
    );
    ensure!(
        !same_file(
            Path::new("/proc/self/ns/mnt"),
            Path::new(&format!("/proc/{pid}/ns/mnt"))
        )?,
        "proxy shares the host mount namespace"
    );
    let uids = status_field(pid, "Uid:")?;
    ensure!(
        uids.split_whitespace().all(|u| u == PROXY_UID.to_string()),
        "proxy uids {uids}"
    );
    let cap_eff = u64::from_str_radix(&status_field(pid, "CapEff:")?, 16)?;
    ensure!(
        cap_eff == (1 << 12) | (1 << 13),
        "proxy effective caps {cap_eff:#x}"
    );
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    ensure!(
        cgroups.contains(&pod.config.cgroup_parent()),
        "proxy not in pod cgroup:\n{cgroups}"
    );
    let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
    let environ = String::from_utf8_lossy(&environ);
    ensure!(
        environ.contains("SIDETUNNEL_POD_NAME=web"),
        "proxy env: {environ}"
    );
    ensure!(
        environ.contains("SIDETUNNEL_POD_NAMESPACE=shop"),
        "proxy env: {environ}"
    );
    // Its state dir belongs to the proxy user and nobody else.
    let sdir = node.sandbox_dir(&pod).join("proxy");
    let md = std::fs::metadata(&sdir)?;
    ensure!(
        md.uid() == PROXY_UID && md.mode() & 0o777 == 0o700,
        "state dir {:o} uid {}",
        md.mode(),
        md.uid()
    );

    // App container: starts (proxy ready), exec and logs work.
    let app = cri.run_container(&pod, &app()).await?;
    eprintln!(
        "sidetunnel pod: RunPodSandbox → app running in {:?}",
        t.elapsed()
    );
    let status = cri.exec_ok(&app.id, &["cat", "/proc/self/status"]).await?;
    ensure!(status.contains("Name:\tcat"), "exec output {status}");
    let failing = cri
        .exec_sync(&app.id, &["sh", "-c", "exit 3"], Duration::from_secs(10))
        .await?;
    ensure!(
        failing.exit_code == 3,
        "exec exit code {}",
        failing.exit_code
    );
    app.wait_log("hello", Duration::from_secs(10)).await?;
    // The app cannot see the proxy's state directory.
    let ls = cri
        .exec_sync(
            &app.id,
            &["ls", &sdir.display().to_string()],
            Duration::from_secs(10),
        )
        .await?;
    ensure!(ls.exit_code != 0, "app sees the proxy state dir");

    // The proxy's output is in the pod's log directory in CRI format.
    let proxy_log = pod.config.log_directory().join("sidetunnel-proxy/0.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&proxy_log).unwrap_or_default();
        if let Some(line) = text
            .lines()
            .find(|l| l.contains("stand-in proxy for shop/web"))
        {
            let f: Vec<&str> = line.splitn(4, ' ').collect();
            ensure!(
                f.len() == 4 && f[0].ends_with('Z') && f[1] == "stdout" && f[2] == "F",
                "CRI line {line}"
            );
            ensure!(
                line.contains(&format!("as uid {PROXY_UID}")),
                "proxy log {line}"
            );
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "proxy log {} lacks the start line: {text}",
            proxy_log.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Kill the proxy: the shim restarts it and records the exit.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL)?;
    let new_pid = node
        .proxy_pid(&pod, Some(pid), Duration::from_secs(20))
        .await?;
    let rec = node.record(&pod)?;
    ensure!(rec["restarts"].as_u64() >= Some(1), "record {rec}");
    ensure!(
        rec["exits"]
            .as_array()
            .is_some_and(|e| e.iter().any(|x| x["pid"] == pid && x["code"] == 137)),
        "exit history lacks the killed proxy: {rec}"
    );
    ensure!(
        same_file(&netns, Path::new(&format!("/proc/{new_pid}/ns/net")))?,
        "restarted proxy not in pod netns"
    );

    // Removing the pod leaves no process, rule, file or mount.
    let t = Instant::now();
    cri.stop_pod(&pod.id).await?;
    ensure!(
        !Path::new(&format!("/proc/{new_pid}")).exists(),
        "proxy survives StopPodSandbox"
    );
    cri.remove_pod(&pod.id).await?;
    eprintln!(
        "sidetunnel pod: StopPodSandbox + RemovePodSandbox in {:?}",
        t.elapsed()
    );
    ensure!(
        !node.sandbox_dir(&pod).exists(),
        "state dir left: {}",
        node.sandbox_dir(&pod).display()
    );
    ensure!(!netns.exists(), "netns left: {}", netns.display());
    ensure!(
        h.pod_cgroup_pids().is_empty(),
        "processes left in pod cgroups: {:?}",
        h.pod_cgroup_pids()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !h.shim_pids().is_empty() {
        ensure!(
            Instant::now() < deadline,
            "shim processes left: {:?}",
            h.shim_pids()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mounts: Vec<PathBuf> = h
        .mounts()
        .into_iter()
        .filter(|m| m.to_string_lossy().contains(&pod.id) || m.to_string_lossy().contains(&app.id))
        .collect();
    ensure!(mounts.is_empty(), "mounts left: {mounts:?}");
    Ok(())
}

async fn opted_out_and_runc_side_by_side(h: &Containerd, cri: &mut Cri, node: &Node) -> Result<()> {
    let opted = h
        .pod_config("plain", SIDETUNNEL)
        .annotation("sidetunnel.io/inject", "false");
    let (opod, oapp, _) = cri.run_pod_with_container(&opted, &app()).await?;
    let (rpod, rapp, _) = cri
        .run_pod_with_container(&h.pod_config("baseline", RUNC), &app())
        .await?;
    // Opted out: no proxy, no rules, behaves like runc.
    ensure!(
        !node.sandbox_dir(&opod).exists(),
        "opted-out pod got a proxy"
    );
    let rules = sidetunnel_redirect::show(&netns_of(h, &opod)?)?;
    ensure!(
        rules.contains("(not installed)"),
        "opted-out pod got rules:\n{rules}"
    );
    for c in [&oapp, &rapp] {
        ensure!(
            cri.exec_ok(&c.id, &["echo", "ok"]).await?.trim() == "ok",
            "exec in {}",
            c.id
        );
        c.wait_log("hello", Duration::from_secs(10)).await?;
    }
    for p in [&opod, &rpod] {
        cri.stop_pod(&p.id).await?;
        cri.remove_pod(&p.id).await?;
    }
    Ok(())
}

async fn readiness_timeout_fails_start(h: &Containerd, cri: &mut Cri, node: &Node) -> Result<()> {
    let config = h
        .pod_config("never-ready", SIDETUNNEL)
        .annotation("sidetunnel.io/ready-timeout", "2s");
    let pod = cri.run_pod(&config).await?;
    let c = cri.create_container(&pod, &app()).await?;
    let t = Instant::now();
    let err = match cri.start_container(&c.id).await {
        Ok(()) => bail!("app container started although its proxy never became ready"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        t.elapsed() < Duration::from_secs(30),
        "start took {:?}",
        t.elapsed()
    );
    ensure!(
        err.contains("proxy not ready") && err.contains("running (pid"),
        "error does not name the proxy state: {err}"
    );
    ensure!(
        node.sandbox_dir(&pod).exists(),
        "state dir missing while pod exists"
    );
    cri.stop_pod(&pod.id).await?;
    cri.remove_pod(&pod.id).await?;
    ensure!(
        !node.sandbox_dir(&pod).exists(),
        "state dir left after removal"
    );
    Ok(())
}
