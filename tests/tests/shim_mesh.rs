//! Two `sidetunnel` pods under a real containerd, meshed by their real
//! proxies against a real `sidetunnel-meshd`: the client app's traffic to
//! the server pod is carried over mTLS (both proxies' metrics name both
//! SPIFFE principals), the proxies run confined (pod netns and cgroup,
//! non-root, two capabilities), the apps cannot reach the proxies' state,
//! a killed client proxy fails closed (connections refused, the server
//! receives nothing) until it is back, `runc` pods run side by side and talk
//! to mesh pods, and removing the pods leaves nothing. Also prints the
//! median RunPodSandbox → app running time, sidetunnel vs runc.

mod shim_support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use shim_support::{
    APP_PORT, Cluster, MeshPod, Pair, WAIT, check_proxy_process, counting_server, metrics_via,
    mtls_opened, netns_of, request, server_counts,
};
use sidetunnel_tests::containerd::{RUNC, SIDETUNNEL};
use sidetunnel_tests::cri::{ContainerSpec, Cri, median};
use sidetunnel_tests::image;
use sidetunnel_tests::mesh::{admin_get, admin_socket, metrics};

const TEST: &str = "shim_mesh";
const NS: &str = "mesh";
const PREFETCH: &str = "sidetunnel.io/prefetch";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidetunnel_pods_talk_over_mtls_and_fail_closed() -> Result<()> {
    shim_support::run_on_cluster(TEST, async |c| {
        let mut cri = c.h.cri().await?;
        mesh_pods(c, &mut cri).await?;
        timed_pods(c, &mut cri).await
    })
    .await
}

async fn mesh_pods(c: &Cluster, cri: &mut Cri) -> Result<()> {
    bad_prefetch_fails_the_pod(c, cri).await?;
    let server = c
        .run_pod(cri, &c.pod_config("server", NS), "server")
        .await?;
    // The client prefetches the server (`sidetunnel.io/prefetch`).
    let client_config = c
        .pod_config("client", NS)
        .annotation(PREFETCH, &server.ip.to_string());
    let client = c.run_pod(cri, &client_config, "client").await?;
    for p in [&server, &client] {
        // Before any app container: the ruleset is installed and the proxy
        // runs confined.
        let netns = netns_of(&c.h, &p.pod)?;
        let rules = sidetunnel_redirect::show(&netns)?;
        ensure!(
            !rules.contains("(not installed)"),
            "{}: no ruleset before the app starts:\n{rules}",
            p.pod.config.name
        );
        ensure!(
            cri.list_containers(Some(p.id())).await?.is_empty(),
            "app containers exist already"
        );
        let pid = c.proxy_pid(p.id(), None, WAIT).await?;
        check_proxy_process(pid, &netns, &p.pod)
            .with_context(|| format!("{}'s proxy", p.pod.config.name))?;
    }
    c.publish(&[&server, &client]).await?;
    prefetched_before_traffic(c, &server, &client).await?;
    let pair = Pair::start_apps(cri, server, client).await?;

    mtls_between_the_pods(cri, &pair).await?;
    apps_cannot_reach_proxy_state(c, cri, &pair).await?;
    runc_side_by_side(c, cri, &pair).await?;
    killed_proxy_fails_closed(c, cri, &pair).await?;

    // Removing the pods leaves no process, mount, rule or file.
    for (p, app) in [
        (&pair.server, &pair.server_app),
        (&pair.client, &pair.client_app),
    ] {
        let netns = netns_of(&c.h, &p.pod)?;
        cri.stop_pod(p.id()).await?;
        cri.remove_pod(p.id()).await?;
        c.assert_gone(p.id(), &netns, &[&app.id]).await?;
    }
    c.assert_no_processes().await
}

/// A pod whose prefetch annotation has an entry the proxy cannot resolve
/// fails RunPodSandbox with a message naming the annotation and the entry,
/// and leaves no process behind (run first, while no other pod exists).
async fn bad_prefetch_fails_the_pod(c: &Cluster, cri: &mut Cri) -> Result<()> {
    let config = c
        .pod_config("bad-prefetch", NS)
        .annotation(PREFETCH, "10.0.0.1,api.example.com");
    match cri.run_pod(&config).await {
        Ok(pod) => bail!("a pod with a bad {PREFETCH} ran: {}", pod.id),
        Err(e) => {
            let msg = format!("{e:#}");
            ensure!(
                msg.contains(PREFETCH) && msg.contains("api.example.com"),
                "RunPodSandbox error does not name the annotation and entry: {msg}"
            );
            eprintln!("bad prefetch refused: {msg}");
        }
    }
    c.assert_no_processes().await
}

/// Right after the pods joined the mesh and before any traffic: the client
/// proxy holds the server's workload (prefetched), the server proxy does
/// not hold the client's (nothing asked for it: scoped config).
async fn prefetched_before_traffic(c: &Cluster, server: &MeshPod, client: &MeshPod) -> Result<()> {
    c.wait_knows(client, server)
        .await
        .context("the client proxy did not prefetch the server's workload")?;
    let dump = admin_get(&admin_socket(&c.state_root, server.id()), "/config_dump")?;
    let v: serde_json::Value = serde_json::from_str(&dump)?;
    let on_server: Vec<&str> = v["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["name"].as_str())
        .collect();
    ensure!(
        !on_server.contains(&"client"),
        "the server proxy holds the client's workload before any traffic: {on_server:?}"
    );
    Ok(())
}

/// Requests from the client app reach the server app through both proxies,
/// counted as mTLS with both principals by both.
async fn mtls_between_the_pods(cri: &mut Cri, p: &Pair) -> Result<()> {
    const N: u64 = 3;
    let before = server_counts(cri, &p.server_app.id).await?;
    for i in 0..N {
        request(cri, &p.client_app.id, p.target(), &format!("hello-{i}"))
            .await?
            .map_err(|e| anyhow::anyhow!("client → server {}: {e}", p.target()))?;
    }
    let after = server_counts(cri, &p.server_app.id).await?;
    ensure!(
        after.0 - before.0 == N,
        "server accepted {} connections for {N} requests",
        after.0 - before.0
    );
    let (src, dst) = (p.client.identity(), p.server.identity());
    // Metrics are recorded as connections open/close: allow a moment.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let client_m = metrics_via(cri, &p.client_app.id).await?;
        let server_m = metrics_via(cri, &p.server_app.id).await?;
        let out = mtls_opened(&client_m, "source", &src, &dst);
        let inb = mtls_opened(&server_m, "destination", &src, &dst);
        // Every connection the server app accepted came through its proxy
        // over mTLS (its proxy has not restarted).
        if out >= N as f64 && inb == after.0 as f64 {
            eprintln!(
                "mTLS {src} → {dst}: client proxy reported {out}, server proxy {inb} \
                 (server app accepted {})",
                after.0
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "mutual_tls connections {src} → {dst}: client proxy (source) {out}, server \
                 proxy (destination) {inb}, server app accepted {}; server proxy's TCP \
                 metrics: {:?}",
                after.0,
                metrics::select(&server_m, "istio_tcp_connections_opened_total", &[])
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// From inside the app containers, the proxy's state directory (token,
/// keys, admin socket) does not exist.
async fn apps_cannot_reach_proxy_state(c: &Cluster, cri: &mut Cri, p: &Pair) -> Result<()> {
    for (pod, app) in [(&p.client, &p.client_app), (&p.server, &p.server_app)] {
        let dir = c.sandbox_dir(pod.id());
        let on_host: Vec<String> = std::fs::read_dir(dir.join("proxy"))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        ensure!(
            on_host.iter().any(|f| f == "admin.sock") && on_host.iter().any(|f| f == "token"),
            "proxy dir on the host: {on_host:?}"
        );
        for f in ["", "proxy", "proxy/admin.sock", "proxy/token", "shim.json"] {
            let path = dir.join(f).display().to_string();
            let out = cri
                .exec_sync(&app.id, &["ls", "-d", &path], Duration::from_secs(10))
                .await?;
            ensure!(
                out.exit_code != 0,
                "{} sees {path}: {}",
                app.name,
                out.stdout
            );
        }
        let state_root = c.state_root.display().to_string();
        let out = cri
            .exec_ok(
                &app.id,
                &[
                    "sh",
                    "-c",
                    &format!(
                        "ls -d {state_root} 2>/dev/null; \
                         find / -xdev \\( -name admin.sock -o -name shim.json \\) 2>/dev/null; true"
                    ),
                ],
            )
            .await?;
        ensure!(
            out.trim().is_empty(),
            "{} finds proxy state: {out}",
            app.name
        );
        // Nor can it see (so signal or ptrace) the proxy process.
        let procs = cri
            .exec_ok(
                &app.id,
                &[
                    "sh",
                    "-c",
                    "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '",
                ],
            )
            .await?;
        ensure!(
            !procs.contains("sidetunnel-proxy") && !procs.contains("__launch-proxy"),
            "{} sees the proxy process: {procs}",
            app.name
        );
    }
    Ok(())
}

/// The client's proxy is killed and kept from coming back (the node's
/// proxy binary is replaced by one that exits at once): the shim, which
/// held the killed proxy's listeners for its restart, releases them when
/// the restart fails, so the app's new connections are refused and the
/// server receives nothing. With the real binary back, the shim's next
/// restart succeeds and traffic resumes over mTLS.
async fn killed_proxy_fails_closed(c: &Cluster, cri: &mut Cri, p: &Pair) -> Result<()> {
    let netns = netns_of(&c.h, &p.client.pod)?;
    let pid = c.proxy_pid(p.client.id(), None, WAIT).await?;
    let restarts = c.record(p.client.id())?["restarts"]
        .as_u64()
        .unwrap_or_default();
    let before = server_counts(cri, &p.server_app.id).await?;

    let broken = c.h.dir().join("broken-proxy");
    std::fs::write(&broken, "#!/bin/sh\necho broken proxy >&2\nexit 1\n")?;
    c.install_proxy(&broken)?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL)?;
    // Some start attempt after the kill has failed: the proxy is down.
    let deadline = Instant::now() + WAIT;
    loop {
        let rec = c.record(p.client.id())?;
        let failed_start = rec["exits"].as_array().is_some_and(|e| {
            e.iter()
                .any(|x| x["pid"] != pid && x["code"].as_i64().is_some_and(|c| c != 0 && c < 128))
        });
        if failed_start && rec["restarts"].as_u64() > Some(restarts + 1) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no failed proxy start recorded with a broken binary: {rec}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut refused = 0;
    for i in 0..3 {
        match request(cri, &p.client_app.id, p.target(), &format!("down-{i}")).await? {
            Ok(reply) => bail!("request while the client proxy is down was answered: {reply}"),
            Err(e) if e.contains("refused") => refused += 1,
            Err(e) => eprintln!("request while the proxy is down failed: {e}"),
        }
    }
    ensure!(
        refused > 0,
        "no connection was refused while the proxy was down"
    );
    let during = server_counts(cri, &p.server_app.id).await?;
    ensure!(
        during == before,
        "the server received connections/bytes while the client's proxy was down: \
         {before:?} → {during:?}"
    );

    c.install_proxy(&sidetunnel_tests::bins::path("sidetunnel-proxy"))?;
    let t = Instant::now();
    let new_pid = c.proxy_pid(p.client.id(), Some(pid), WAIT).await?;
    c.wait_ready(&p.client, WAIT).await?;
    check_proxy_process(new_pid, &netns, &p.client.pod)?;
    eprintln!(
        "client proxy back {:?} after its binary was restored",
        t.elapsed()
    );
    request(cri, &p.client_app.id, p.target(), "resumed")
        .await?
        .map_err(|e| anyhow::anyhow!("traffic did not resume after the restart: {e}"))?;
    let m = metrics_via(cri, &p.client_app.id).await?;
    ensure!(
        mtls_opened(&m, "source", &p.client.identity(), &p.server.identity()) >= 1.0,
        "the restarted proxy did not count the resumed connection as mTLS"
    );
    Ok(())
}

/// A `runc` pod (containerd's own shim) on the same node: it runs as
/// before, a mesh client reaches it (plain TCP: it is not in the mesh) and
/// it reaches the mesh server (plaintext inbound, PERMISSIVE).
async fn runc_side_by_side(c: &Cluster, cri: &mut Cri, p: &Pair) -> Result<()> {
    let (rpod, rapp, _) = cri
        .run_pod_with_container(&c.h.pod_config("baseline", RUNC), &counting_server())
        .await?;
    ensure!(
        !c.sandbox_dir(&rpod.id).exists(),
        "the runc pod has sidetunnel state"
    );
    rapp.wait_log("listening", WAIT).await?;
    // The mesh client reaches it: an on-demand lookup of a non-mesh IP,
    // answered negatively by meshd, then passthrough.
    let rip: std::net::IpAddr = cri.pod_ip(&rpod.id).await?.parse()?;
    let runc_addr = SocketAddr::new(rip, APP_PORT);
    if let Err(e) = request(cri, &p.client_app.id, runc_addr, "to-runc").await? {
        let dump = admin_get(&admin_socket(&c.state_root, p.client.id()), "/config_dump")
            .map(|d| {
                let v: serde_json::Value = serde_json::from_str(&d).unwrap_or_default();
                v["xds"].to_string()
            })
            .unwrap_or_else(|e| format!("(no config dump: {e:#})"));
        bail!("mesh client → runc pod {runc_addr}: {e}; client proxy xDS state: {dump}");
    }
    ensure!(
        server_counts(cri, &rapp.id).await?.0 == 1,
        "the runc pod's server did not count the mesh client's connection"
    );
    let before = server_counts(cri, &p.server_app.id).await?;
    request(cri, &rapp.id, p.target(), "from-runc")
        .await?
        .map_err(|e| anyhow::anyhow!("runc pod → mesh server: {e}"))?;
    ensure!(
        server_counts(cri, &p.server_app.id).await?.0 == before.0 + 1,
        "the mesh server did not count the runc pod's connection"
    );
    cri.stop_pod(&rpod.id).await?;
    cri.remove_pod(&rpod.id).await?;
    Ok(())
}

/// Pods per handler for the RunPodSandbox → app-running comparison.
const TIMED_PODS: usize = 20;

/// Median RunPodSandbox → app container running, sidetunnel (real proxy,
/// certificate from meshd's CA, initial xDS) vs runc, alternating handlers
/// in the same run (printed, not asserted).
async fn timed_pods(c: &Cluster, cri: &mut Cri) -> Result<()> {
    let app = ContainerSpec::new("app", image::BUSYBOX).command(&["sh", "-c", "exec sleep 3600"]);
    let (mut st, mut rc) = (Vec::new(), Vec::new());
    for i in 0..TIMED_PODS {
        for (handler, samples) in [(SIDETUNNEL, &mut st), (RUNC, &mut rc)] {
            let config =
                c.h.pod_config(&format!("timed-{handler}-{i}"), handler)
                    .namespace(NS);
            if handler == SIDETUNNEL {
                c.mesh
                    .mint_token(NS, &config.name, &config.uid, "default")?;
            }
            let (pod, _app, elapsed) = cri.run_pod_with_container(&config, &app).await?;
            samples.push(elapsed);
            cri.stop_pod(&pod.id).await?;
            cri.remove_pod(&pod.id).await?;
            ensure!(
                !c.sandbox_dir(&pod.id).exists(),
                "state dir left for {}",
                pod.id
            );
        }
    }
    let mean = |v: &[Duration]| v.iter().sum::<Duration>() / v.len() as u32;
    eprintln!(
        "RunPodSandbox → app running over {TIMED_PODS} pods each: sidetunnel (real proxy) \
         median {:?} (mean {:?}, max {:?}); runc median {:?} (mean {:?}, max {:?})",
        median(&st),
        mean(&st),
        st.iter().max().copied().unwrap_or_default(),
        median(&rc),
        mean(&rc),
        rc.iter().max().copied().unwrap_or_default(),
    );
    c.assert_no_processes().await
}
