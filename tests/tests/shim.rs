//! The `sidetunnel` runtime (containerd-shim-sidetunnel-v1) under a real
//! containerd, driven over CRI like kubelet, with the real `sidetunnel-proxy`
//! and a real `sidetunnel-meshd` as control plane and CA: the sandbox gets
//! the redirection ruleset before any app container exists, a supervised
//! proxy runs in the pod's netns and cgroup as a non-root user with the
//! pod's identity (from its projected token), app start waits for its
//! readiness, exec and logs work, a killed proxy is restarted, and removing
//! the pod leaves nothing. Opted-out and `runc` pods run side by side,
//! unchanged. Two-pod mesh traffic is in shim_mesh.rs, faults in
//! shim_faults.rs.

mod shim_support;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use shim_support::{Cluster, PROXY_UID, WAIT, check_proxy_process, netns_of, same_file};
use sidetunnel_tests::containerd::RUNC;
use sidetunnel_tests::cri::{ContainerSpec, Cri, log};
use sidetunnel_tests::{image, prereq};

const TEST: &str = "shim";

fn app() -> ContainerSpec {
    ContainerSpec::new("app", image::BUSYBOX).command(&["sh", "-c", "echo hello; exec sleep 3600"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidetunnel_pods_get_a_supervised_proxy_and_leave_nothing_behind() -> Result<()> {
    if !shim_support::prerequisites(TEST) {
        return Ok(());
    }
    tokio::time::timeout(Duration::from_secs(480), run())
        .await
        .context("shim test exceeded 480s")?
}

async fn run() -> Result<()> {
    let c = Cluster::start("").await?;
    let res = async {
        let mut cri = c.h.cri().await?;
        injected_pod(&c, &mut cri).await?;
        opted_out_and_runc_side_by_side(&c, &mut cri).await
    }
    .await;
    if res.is_err() {
        c.dump_logs();
    }
    res?;
    c.shutdown().await
}

async fn injected_pod(c: &Cluster, cri: &mut Cri) -> Result<()> {
    let config = c.pod_config("web", "shop");
    let t = Instant::now();
    let pod = c.run_pod(cri, &config, "web-sa").await?;
    eprintln!("sidetunnel pod: RunPodSandbox in {:?}", t.elapsed());
    let netns = netns_of(&c.h, &pod.pod)?;

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
    // its own mount namespace, the pod's identity in its environment.
    let pid = c.proxy_pid(pod.id(), None, WAIT).await?;
    check_proxy_process(pid, &netns, &pod.pod)?;
    let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
    let environ = String::from_utf8_lossy(&environ).replace('\0', " ");
    for want in [
        "SIDETUNNEL_POD_NAME=web",
        "SIDETUNNEL_POD_NAMESPACE=shop",
        // From the projected token's claims.
        "SIDETUNNEL_SERVICE_ACCOUNT=web-sa",
    ] {
        ensure!(environ.contains(want), "proxy env lacks {want}: {environ}");
    }
    // Its state dir belongs to the proxy user and nobody else.
    let sdir = c.sandbox_dir(pod.id()).join("proxy");
    let md = std::fs::metadata(&sdir)?;
    ensure!(
        md.uid() == PROXY_UID && md.mode() & 0o777 == 0o700,
        "state dir {:o} uid {}",
        md.mode(),
        md.uid()
    );

    // The pod's IP is published to meshd's inventory (as a controller
    // would once CNI assigned it); meshd pushes it to the proxy.
    c.publish(&[&pod]).await?;

    // App container: starts (proxy ready), exec and logs work.
    let app = cri.run_container(&pod.pod, &app()).await?;
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

    // The proxy's output is in the pod's log directory in CRI format: its
    // start line names the SPIFFE identity it got from the CA.
    let proxy_log = pod.pod.log_directory().join("sidetunnel-proxy/0.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records = log::read(&proxy_log).unwrap_or_default();
        if records.iter().any(|r| {
            r.stream == "stderr"
                && r.content.contains("sidetunnel-proxy starting")
                && r.content
                    .contains("spiffe://cluster.local/ns/shop/sa/web-sa")
        }) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "proxy log {} lacks the start line: {:?}",
            proxy_log.display(),
            std::fs::read_to_string(&proxy_log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Kill the proxy: the shim restarts it and records the exit.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL)?;
    let new_pid = c.proxy_pid(pod.id(), Some(pid), WAIT).await?;
    let rec = c.record(pod.id())?;
    ensure!(rec["restarts"].as_u64() >= Some(1), "record {rec}");
    ensure!(
        rec["exits"]
            .as_array()
            .is_some_and(|e| e.iter().any(|x| x["pid"] == pid && x["code"] == 137)),
        "exit history lacks the killed proxy: {rec}"
    );
    check_proxy_process(new_pid, &netns, &pod.pod)?;
    c.wait_ready(&pod, WAIT).await?;

    // Removing the pod leaves no process, rule, file or mount.
    let t = Instant::now();
    cri.stop_pod(pod.id()).await?;
    ensure!(
        !Path::new(&format!("/proc/{new_pid}")).exists(),
        "proxy survives StopPodSandbox"
    );
    cri.remove_pod(pod.id()).await?;
    eprintln!(
        "sidetunnel pod: StopPodSandbox + RemovePodSandbox in {:?}",
        t.elapsed()
    );
    c.assert_gone(pod.id(), &netns, &[&app.id]).await?;
    c.assert_no_processes().await
}

async fn opted_out_and_runc_side_by_side(c: &Cluster, cri: &mut Cri) -> Result<()> {
    let opted =
        c.h.pod_config("plain", sidetunnel_tests::containerd::SIDETUNNEL)
            .annotation("sidetunnel.io/inject", "false");
    let (opod, oapp, _) = cri.run_pod_with_container(&opted, &app()).await?;
    let (rpod, rapp, _) = cri
        .run_pod_with_container(&c.h.pod_config("baseline", RUNC), &app())
        .await?;
    // Opted out: no proxy, no rules, behaves like runc.
    ensure!(
        !c.sandbox_dir(&opod.id).exists(),
        "opted-out pod got a proxy"
    );
    let rules = sidetunnel_redirect::show(&netns_of(&c.h, &opod)?)?;
    ensure!(
        rules.contains("(not installed)"),
        "opted-out pod got rules:\n{rules}"
    );
    for app in [&oapp, &rapp] {
        ensure!(
            cri.exec_ok(&app.id, &["echo", "ok"]).await?.trim() == "ok",
            "exec in {}",
            app.id
        );
        app.wait_log("hello", Duration::from_secs(10)).await?;
    }
    for p in [&opod, &rpod] {
        cri.stop_pod(&p.id).await?;
        cri.remove_pod(&p.id).await?;
    }
    c.assert_no_processes().await
}

/// The OCI runtime is configurable: the same pod runs under crun.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidetunnel_pods_run_under_crun() -> Result<()> {
    if !shim_support::prerequisites("shim_crun") || !prereq::binary("shim_crun", "/usr/bin/crun") {
        return Ok(());
    }
    tokio::time::timeout(Duration::from_secs(300), async {
        let c = Cluster::start("binary = \"/usr/bin/crun\"").await?;
        let res = async {
            let mut cri = c.h.cri().await?;
            let config = c.pod_config("crun-web", "default");
            let pod = c.run_pod(&mut cri, &config, "default").await;
            let app = match pod {
                Ok(p) => cri.run_container(&p.pod, &app()).await.map(|a| (p, a)),
                Err(e) => Err(e),
            };
            let (pod, app) = match app {
                Ok(x) => x,
                // crun refuses cgroup v1/v2 hybrid hosts whose unified
                // hierarchy has controllers, and a crun older than the OCI
                // runtime-spec containerd writes (Debian 12's crun 1.8.1
                // knows spec 1.1 at most; containerd 2.0 writes 1.2, 2.2+
                // writes 1.3: containerd's own runc shim fails the same
                // way). Then the shim must surface crun's own reason and
                // undo the sandbox hook.
                Err(e)
                    if format!("{e:#}").contains("hybrid mode not supported")
                        || (c.h.version().major >= 2
                            && format!("{e:#}").contains("unknown version specified")) =>
                {
                    eprintln!("crun cannot run this pod here: {e:#}");
                    for id in cri.list_pods().await? {
                        cri.stop_pod(&id).await?;
                        cri.remove_pod(&id).await?;
                    }
                    let left = std::fs::read_dir(&c.state_root)?.count();
                    ensure!(left == 0, "failed sandbox left {left} state dirs");
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            let pid = c.proxy_pid(pod.id(), None, WAIT).await?;
            ensure!(
                same_file(
                    &netns_of(&c.h, &pod.pod)?,
                    Path::new(&format!("/proc/{pid}/ns/net"))
                )?,
                "proxy not in the crun pod's netns"
            );
            ensure!(
                cri.exec_ok(&app.id, &["echo", "ok"]).await?.trim() == "ok",
                "exec under crun"
            );
            app.wait_log("hello", Duration::from_secs(10)).await?;
            cri.stop_pod(pod.id()).await?;
            cri.remove_pod(pod.id()).await?;
            ensure!(!c.sandbox_dir(pod.id()).exists(), "state dir left");
            Ok(())
        }
        .await;
        if res.is_err() {
            c.dump_logs();
        }
        res?;
        c.shutdown().await
    })
    .await
    .context("crun test exceeded 300s")?
}
