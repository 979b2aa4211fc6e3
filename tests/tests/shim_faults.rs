//! Faults at the containerd level (issue 9), with the real proxy and a real
//! `sidetunnel-meshd`: the control plane down at pod start (the app's start
//! fails after the bounded readiness wait, naming the proxy's state; it
//! starts once the control plane is back), the client proxy killed
//! repeatedly under traffic (restarted each time, nothing reaches the server
//! except over mTLS, traffic resumes), containerd restarted while pods run
//! (they keep networking, containerd re-attaches to the shim and receives
//! its events, deletes clean up), and the shim killed (containerd's
//! delete-after-crash path removes the proxy, the rules and the files).
//!
//! And the proxy binary's place on the node (issue 24): a proxy under a
//! directory only root may search (a build in a 0700 home) still runs, and
//! one the proxy uid may not execute fails RunPodSandbox at once, naming the
//! binary, the uid and the errno.

mod shim_support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use shim_support::{
    APP_PORT, Cluster, Pair, WAIT, idle_client, metrics_via, mtls_opened, netns_of, request,
    server_counts,
};
use sidetunnel_tests::cri::api::ContainerState;
use sidetunnel_tests::cri::{ContainerSpec, Cri};
use sidetunnel_tests::{bins, image};

const TEST: &str = "shim_faults";
const NS: &str = "faults";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidetunnel_pods_survive_and_clean_up_after_faults() -> Result<()> {
    shim_support::run_on_cluster(TEST, async |c| {
        let mut cri = c.h.cri().await?;
        control_plane_down_at_pod_start(c, &mut cri).await?;
        let pair = mesh_pair(c, &mut cri).await?;
        proxy_killed_repeatedly_under_traffic(c, &mut cri, &pair).await?;
        let cri = containerd_restarted_while_pods_run(c, &pair).await?;
        shim_killed(c, cri).await
    })
    .await
}

/// The proxy uid of the harness's node config (the shim's default).
const PROXY_UID: u32 = 15000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_binary_in_a_private_directory_or_unexecutable() -> Result<()> {
    shim_support::run_on_cluster("shim_faults_proxy_binary", async |c| {
        let mut cri = c.h.cri().await?;
        let home = tempfile::Builder::new()
            .prefix("sidetunnel-home-")
            .tempdir_in("/tmp")?;
        let private = home.path().join("private");
        std::fs::create_dir(&private)?;
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700))?;
        let proxy = private.join("sidetunnel-proxy");
        std::fs::copy(bins::path("sidetunnel-proxy"), &proxy)?;
        std::fs::set_permissions(&proxy, std::fs::Permissions::from_mode(0o755))?;

        // Under a 0700 directory: the proxy uid cannot search it, but the
        // shim opens the binary as root and executes it by descriptor.
        c.write_node_config(&proxy)?;
        let config = c.pod_config("private-dir", NS);
        let pod = c.run_pod(&mut cri, &config, "private-dir").await?;
        c.wait_ready(&pod, WAIT).await?;
        cri.stop_pod(pod.id()).await?;
        cri.remove_pod(pod.id()).await?;

        // Not executable by the proxy uid: RunPodSandbox fails fast, naming
        // the binary, the uid and the errno; nothing of the pod is left.
        std::fs::set_permissions(&proxy, std::fs::Permissions::from_mode(0o700))?;
        let config = c.pod_config("unexecutable", NS);
        c.mesh
            .mint_token(&config.namespace, &config.name, &config.uid, "unexecutable")?;
        let t = Instant::now();
        let err = match cri.run_pod(&config).await {
            Ok(p) => bail!(
                "RunPodSandbox succeeded with an unexecutable proxy: {}",
                p.id
            ),
            Err(e) => format!("{e:#}"),
        };
        let took = t.elapsed();
        eprintln!("RunPodSandbox with an unexecutable proxy failed after {took:?}: {err}");
        let want = [
            proxy.display().to_string(),
            format!("uid {PROXY_UID}"),
            "EACCES".to_string(),
        ];
        for w in &want {
            ensure!(
                err.contains(w.as_str()),
                "the error does not name {w:?}: {err}"
            );
        }
        // Bounded well above the few milliseconds the refusal takes, so a
        // loaded CI machine does not fail it; a restart loop would never end.
        ensure!(
            took < Duration::from_secs(10),
            "RunPodSandbox took {took:?} to fail"
        );
        let left = cri.list_pods().await?;
        ensure!(
            left.is_empty(),
            "sandboxes left after the failed start: {left:?}"
        );
        c.assert_no_processes().await
    })
    .await
}

/// meshd (control plane and CA) is down when the pod starts: the proxy
/// cannot get a certificate or config, so the app's start fails after the
/// pod's `sidetunnel.io/ready-timeout`, naming the proxy's state. With the
/// control plane back, the proxy becomes ready and the app starts.
async fn control_plane_down_at_pod_start(c: &mut Cluster, cri: &mut Cri) -> Result<()> {
    c.mesh.stop();
    let config = c
        .pod_config("cold", NS)
        .annotation("sidetunnel.io/ready-timeout", "3s");
    let pod = c.run_pod(cri, &config, "cold").await?;
    let app = cri.create_container(&pod.pod, &idle_client()).await?;
    let t = Instant::now();
    let err = match cri.start_container(&app.id).await {
        Ok(()) => bail!("the app started although its proxy had no control plane"),
        Err(e) => format!("{e:#}"),
    };
    let took = t.elapsed();
    eprintln!("app start with the control plane down failed after {took:?}: {err}");
    ensure!(took < Duration::from_secs(60), "start took {took:?}");
    ensure!(
        err.contains("proxy not ready after 3s")
            && err.contains("last state: running (pid")
            && err.contains("answered 503"),
        "the error does not name the proxy's state: {err}"
    );
    let status = cri.container_status(&app.id).await?;
    ensure!(
        status.state != ContainerState::ContainerRunning as i32,
        "the app runs although its start failed"
    );

    // Control plane back (same address): the proxy reconnects on its own,
    // and kubelet's retry (a new container) starts.
    c.mesh.serve(&c.h)?;
    let t = Instant::now();
    c.wait_ready(&pod, WAIT).await?;
    eprintln!(
        "proxy ready {:?} after the control plane came back",
        t.elapsed()
    );
    cri.remove_container(&app.id).await?;
    let app = cri.run_container(&pod.pod, &idle_client()).await?;
    cri.wait_container_state(&app.id, ContainerState::ContainerRunning, WAIT)
        .await?;
    let netns = netns_of(&c.h, &pod.pod)?;
    cri.stop_pod(pod.id()).await?;
    cri.remove_pod(pod.id()).await?;
    c.assert_gone(pod.id(), &netns, &[&app.id]).await
}

async fn mesh_pair(c: &Cluster, cri: &mut Cri) -> Result<Pair> {
    let server = c
        .run_pod(cri, &c.pod_config("server", NS), "server")
        .await?;
    let client = c
        .run_pod(cri, &c.pod_config("client", NS), "client")
        .await?;
    c.publish(&[&server, &client]).await?;
    let pair = Pair::start_apps(cri, server, client).await?;
    request(cri, &pair.client_app.id, pair.target(), "first")
        .await?
        .map_err(|e| anyhow::anyhow!("client → server: {e}"))?;
    Ok(pair)
}

/// Kills of the client's proxy while the client app sends a request every
/// 100 ms.
const KILLS: usize = 4;

/// The client app sends requests in a loop while the client's proxy is
/// SIGKILLed several times. Each kill is followed by a restart; every
/// connection the server app accepted arrived over mTLS through its proxy
/// (none escaped in plaintext while the client's proxy was down); requests
/// succeed again after the last restart.
async fn proxy_killed_repeatedly_under_traffic(c: &Cluster, cri: &mut Cri, p: &Pair) -> Result<()> {
    let before = server_counts(cri, &p.server_app.id).await?;
    let (src, dst) = (p.client.identity(), p.server.identity());
    // A bounded loop in the app: one line per request, `ok` or `fail`.
    let script = format!(
        "end=$(( $(date +%s) + 40 )); i=0; while [ $(date +%s) -lt $end ] && \
         [ ! -e /tmp/stop ]; do i=$((i+1)); \
         if echo t$i | nc -w 3 {ip} {APP_PORT} 2>/dev/null | grep -q \"ack t$i\"; \
         then echo ok; else echo fail; fi; sleep 0.1; done",
        ip = p.server.ip
    );
    let traffic = {
        let mut cri = cri.clone();
        let id = p.client_app.id.clone();
        tokio::spawn(async move {
            cri.exec_sync(&id, &["sh", "-c", &script], Duration::from_secs(60))
                .await
        })
    };
    let mut pid = c.proxy_pid(p.client.id(), None, WAIT).await?;
    let mut downtimes = Vec::new();
    for _ in 0..KILLS {
        // Let traffic flow through the current proxy first.
        c.wait_ready(&p.client, WAIT).await?;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL)?;
        let t = Instant::now();
        pid = c.proxy_pid(p.client.id(), Some(pid), WAIT).await?;
        c.wait_ready(&p.client, WAIT).await?;
        downtimes.push(t.elapsed());
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cri.exec_ok(&p.client_app.id, &["touch", "/tmp/stop"])
        .await?;
    let out = traffic.await??;
    let ok = out.stdout.matches("ok").count() as u64;
    let fail = out.stdout.matches("fail").count() as u64;
    eprintln!(
        "{KILLS} kills of the client proxy under traffic: {ok} requests ok, {fail} failed; \
         kill → ready again: {downtimes:?}"
    );
    ensure!(ok > 0, "no request succeeded: {:?}", out.stdout);
    let rec = c.record(p.client.id())?;
    ensure!(
        rec["restarts"].as_u64() >= Some(KILLS as u64),
        "restarts not recorded: {rec}"
    );

    // Every connection the server accepted came over mTLS from the client
    // (the server's proxy never restarted, so its counters cover them all),
    // and each acknowledged request is one of them.
    let after = server_counts(cri, &p.server_app.id).await?;
    let accepted = after.0 - before.0;
    let m = metrics_via(cri, &p.server_app.id).await?;
    let inbound = mtls_opened(&m, "destination", &src, &dst);
    ensure!(
        inbound == after.0 as f64,
        "server app accepted {} connections in all, its proxy counted {inbound} mTLS ones",
        after.0
    );
    ensure!(
        accepted >= ok,
        "server accepted {accepted} connections for {ok} acknowledged requests"
    );
    request(cri, &p.client_app.id, p.target(), "after-kills")
        .await?
        .map_err(|e| anyhow::anyhow!("traffic did not resume: {e}"))?;
    Ok(())
}

/// containerd is restarted (SIGTERM, start again) with both pods running:
/// they keep networking, containerd re-attaches to the shims (exec, status,
/// and a new container whose exit reaches containerd as the shim's event),
/// and removing the pods still cleans up everything. Returns a client on
/// the new containerd.
async fn containerd_restarted_while_pods_run(c: &mut Cluster, p: &Pair) -> Result<Cri> {
    let proxies = [
        c.proxy_pid(p.server.id(), None, WAIT).await?,
        c.proxy_pid(p.client.id(), None, WAIT).await?,
    ];
    let shims = c.h.shim_pids();
    let t = Instant::now();
    c.h.restart().await?;
    eprintln!("containerd restarted in {:?}", t.elapsed());
    let mut cri = c.h.cri().await?;
    ensure!(c.h.shim_pids() == shims, "shims changed across the restart");
    for (pod, pid) in [(&p.server, proxies[0]), (&p.client, proxies[1])] {
        ensure!(
            c.proxy_pid(pod.id(), None, WAIT).await? == pid,
            "{}'s proxy was restarted by a containerd restart",
            pod.pod.config.name
        );
    }
    request(&mut cri, &p.client_app.id, p.target(), "after-restart")
        .await?
        .map_err(|e| anyhow::anyhow!("client → server after containerd restart: {e}"))?;
    for app in [&p.server_app, &p.client_app] {
        cri.wait_container_state(&app.id, ContainerState::ContainerRunning, WAIT)
            .await?;
    }
    // The shim's events reach the new containerd: a short-lived container
    // is seen exiting with its status.
    let job = ContainerSpec::new("job", image::BUSYBOX).command(&["sh", "-c", "sleep 1; exit 7"]);
    let job = cri.run_container(&p.client.pod, &job).await?;
    let status = cri
        .wait_container_state(&job.id, ContainerState::ContainerExited, WAIT)
        .await?;
    ensure!(status.exit_code == 7, "job exit code {}", status.exit_code);

    let m = metrics_via(&mut cri, &p.client_app.id).await?;
    ensure!(
        mtls_opened(&m, "source", &p.client.identity(), &p.server.identity()) >= 1.0,
        "client proxy counted no mTLS connection after the restart"
    );
    for (pod, apps) in [
        (&p.server, vec![&p.server_app.id]),
        (&p.client, vec![&p.client_app.id, &job.id]),
    ] {
        let netns = netns_of(&c.h, &pod.pod)?;
        cri.stop_pod(pod.id()).await?;
        cri.remove_pod(pod.id()).await?;
        let apps: Vec<&str> = apps.into_iter().map(String::as_str).collect();
        c.assert_gone(pod.id(), &netns, &apps).await?;
    }
    c.assert_no_processes().await?;
    Ok(cri)
}

/// The shim is SIGKILLed: containerd runs `shim delete`, which must remove
/// the proxy, the rules and the files the dead shim left.
async fn shim_killed(c: &Cluster, mut cri: Cri) -> Result<()> {
    let (pod, app) = c
        .run_pod_with(
            &mut cri,
            &c.pod_config("crash", NS),
            "crash",
            &idle_client(),
        )
        .await?;
    let netns = netns_of(&c.h, &pod.pod)?;
    let proxy = c.proxy_pid(pod.id(), None, WAIT).await?;
    let shims = c.h.shim_pids();
    ensure!(shims.len() == 1, "expected one shim, found {shims:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shims[0]),
        nix::sys::signal::SIGKILL,
    )?;
    let alive = || Path::new(&format!("/proc/{proxy}")).exists();
    let deadline = Instant::now() + WAIT;
    while c.sandbox_dir(pod.id()).exists() || alive() {
        ensure!(
            Instant::now() < deadline,
            "after the shim died: state dir present {}, proxy alive {}",
            c.sandbox_dir(pod.id()).exists(),
            alive()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if netns.exists() {
        let rules = sidetunnel_redirect::show(&netns)?;
        ensure!(
            rules.contains("(not installed)"),
            "rules left after the shim crash:\n{rules}"
        );
    }
    // containerd reports the app container exited once it has cleaned up
    // after the dead shim, and that takes a race: CRI's Wait on the task
    // fails as soon as the shim dies, CRI then deletes the task while
    // containerd may still list the dead shim's tasks (`ttrpc: closed`, seen
    // with 1.7) and retries with a backoff; until then it calls the
    // container running and RemovePodSandbox fails with "container is still
    // running, to stop first". kubelet's PLEG likewise acts on the exit it
    // observes; so does the test.
    cri.wait_container_state(&app.id, ContainerState::ContainerExited, WAIT)
        .await?;
    cri.stop_pod(pod.id()).await?;
    cri.remove_pod(pod.id()).await?;
    c.assert_gone(pod.id(), &netns, &[&app.id]).await?;
    c.assert_no_processes().await
}
