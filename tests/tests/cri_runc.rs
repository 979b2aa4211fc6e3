//! A real containerd (Debian's 1.6 by default, see `SIDETUNNEL_CONTAINERD_DIR`) driven over CRI like kubelet, with
//! containerd's own runc shim: the baseline the sidetunnel runtime must match.
//! Pods get CNI bridge networking, logs, exec; removal must leave nothing.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use sidetunnel_oci::Role;
use sidetunnel_tests::containerd::{self, Containerd, Options, RUNC};
use sidetunnel_tests::cri::{ContainerSpec, Cri, Pod, api::ContainerState, median};
use sidetunnel_tests::{image, prereq};

const TEST: &str = "cri_runc";
/// Pods timed for the RunPodSandbox → container-running figure.
const TIMED_PODS: usize = 5;

fn prerequisites() -> bool {
    prereq::root(TEST)
        && prereq::binary(TEST, &containerd::containerd_bin().to_string_lossy())
        && prereq::binary(TEST, &containerd::ctr_bin().to_string_lossy())
        && prereq::binary(TEST, &containerd::runc_shim_bin().to_string_lossy())
        && prereq::binary(TEST, "runc")
        && prereq::binary(TEST, image::BUSYBOX_BIN)
        && prereq::binary(TEST, &format!("{}/bridge", containerd::CNI_BIN_DIR))
        && prereq::binary(TEST, &format!("{}/host-local", containerd::CNI_BIN_DIR))
        && prereq::binary(TEST, &format!("{}/loopback", containerd::CNI_BIN_DIR))
}

fn app() -> ContainerSpec {
    ContainerSpec::new("app", image::BUSYBOX).command(&["sh", "-c", "echo hello; exec sleep 3600"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runc_pods_work_and_leave_nothing_behind() -> Result<()> {
    run_bounded("cri_runc test", Duration::from_secs(420), run()).await
}

/// Runs a test's `body` when the prerequisites are met (else skips), failing
/// it when it takes longer than `limit`.
async fn run_bounded(
    what: &str,
    limit: Duration,
    body: impl std::future::Future<Output = Result<()>>,
) -> Result<()> {
    if !prerequisites() {
        return Ok(());
    }
    tokio::time::timeout(limit, body)
        .await
        .with_context(|| format!("{what} exceeded {limit:?}"))?
}

async fn run() -> Result<()> {
    let t = Instant::now();
    // containerd's runc shim stands in for the sidetunnel binary so the
    // harness's `sidetunnel` handler config (pod_annotations) is checked
    // here independently of the shim under development.
    let h = Containerd::start_with_images(Options {
        sidetunnel_shim: Some(containerd::runc_shim_bin()),
        ..Options::default()
    })
    .await?;
    eprintln!("containerd + images ready in {:?}", t.elapsed());
    let mut cri = h.cri().await?;

    let res = async {
        pod_lifecycle(&h, &mut cri).await?;
        host_network_pod(&h, &mut cri).await?;
        pod_annotations_allow_list(&h, &mut cri).await?;
        timed_pods(&h, &mut cri).await
    }
    .await;
    if res.is_err() {
        eprintln!("containerd log tail:\n{}", h.log_tail(40));
    }
    res?;
    h.shutdown().await
}

/// One pod end to end, checking every step and the cleanup.
async fn pod_lifecycle(h: &Containerd, cri: &mut Cri) -> Result<()> {
    let config = h.pod_config("web", RUNC).namespace("shop");
    let (pod, app, elapsed) = cri.run_pod_with_container(&config, &app()).await?;
    eprintln!("pod web: RunPodSandbox → app running in {elapsed:?}");

    // CNI gave the pod an address on the harness bridge.
    let ip: std::net::Ipv4Addr = cri.pod_ip(&pod.id).await?.parse().context("pod IP")?;
    ensure!(
        h.subnet().contains(&ip),
        "pod IP {ip} not in {}",
        h.subnet()
    );

    // The sandbox spec carries what the sidetunnel shim relies on.
    let netns = check_sandbox_spec(h, &pod)?;
    ensure!(
        netns.exists(),
        "netns {} missing while pod runs",
        netns.display()
    );
    match sidetunnel_oci::classify_bundle(&h.task_bundle(&app.id))? {
        Role::Container(c) => {
            ensure!(
                c.sandbox_id == pod.id,
                "container spec sandbox id {}",
                c.sandbox_id
            );
            ensure!(
                c.name.as_deref() == Some("app"),
                "container name {:?}",
                c.name
            );
        }
        other => anyhow::bail!("app bundle classified as {other:?}"),
    }

    // ExecSync runs in the container, in the pod's network namespace.
    let status = cri.exec_ok(&app.id, &["cat", "/proc/self/status"]).await?;
    ensure!(
        status.contains("Name:\tcat"),
        "unexpected /proc/self/status: {status}"
    );
    let addrs = cri
        .exec_ok(&app.id, &["ip", "-4", "addr", "show", "eth0"])
        .await?;
    ensure!(
        addrs.contains(&format!("inet {ip}/")),
        "eth0 lacks {ip}: {addrs}"
    );
    let failing = cri
        .exec_sync(&app.id, &["sh", "-c", "exit 3"], Duration::from_secs(10))
        .await?;
    ensure!(
        failing.exit_code == 3,
        "exit code not propagated: {}",
        failing.exit_code
    );
    // Pods reach the host through the bridge gateway.
    let gw = h.gateway().to_string();
    cri.exec_ok(&app.id, &["ping", "-c", "1", "-W", "5", &gw])
        .await?;

    app.wait_log("hello", Duration::from_secs(10)).await?;
    let st = cri.container_status(&app.id).await?;
    ensure!(
        st.state == ContainerState::ContainerRunning as i32,
        "state {}",
        st.state
    );
    ensure!(
        Path::new(&st.log_path) == app.log_path,
        "log path {}",
        st.log_path
    );

    let pids = h.pod_cgroup_pids();
    ensure!(
        pids.len() >= 2,
        "expected pause + app in pod cgroups, found {pids:?}"
    );

    let t = Instant::now();
    cri.stop_pod(&pod.id).await?;
    cri.remove_pod(&pod.id).await?;
    eprintln!(
        "pod web: StopPodSandbox + RemovePodSandbox in {:?}",
        t.elapsed()
    );
    assert_nothing_left(h, cri, &[&pod.id, &app.id], Some(&netns)).await
}

/// The sandbox spec classifies as this pod's sandbox; returns its netns path.
fn check_sandbox_spec(h: &Containerd, pod: &Pod) -> Result<std::path::PathBuf> {
    let Role::Sandbox(info) = sidetunnel_oci::classify_bundle(&h.task_bundle(&pod.id))? else {
        anyhow::bail!("sandbox bundle of {} not classified as sandbox", pod.id);
    };
    ensure!(info.sandbox_id == pod.id, "sandbox id {}", info.sandbox_id);
    ensure!(
        (
            info.namespace.as_str(),
            info.name.as_str(),
            info.uid.as_str()
        ) == (
            pod.config.namespace.as_str(),
            pod.config.name.as_str(),
            pod.config.uid.as_str()
        ),
        "pod identity {info:?}"
    );
    ensure!(
        info.log_directory.as_deref() == Some(pod.log_directory().as_path()),
        "log dir {info:?}"
    );
    let cgroup = info.cgroup_path.as_ref().and_then(|c| c.pod_cgroup());
    ensure!(
        cgroup.as_deref() == Some(Path::new(&pod.config.cgroup_parent())),
        "pod cgroup {cgroup:?}"
    );
    ensure!(
        !info.host_network,
        "pod network pod classified host-network"
    );
    info.netns_path.context("sandbox spec has no netns path")
}

/// hostNetwork pods have no netns in their spec (the shim must skip them).
async fn host_network_pod(h: &Containerd, cri: &mut Cri) -> Result<()> {
    let config = h.pod_config("hostnet", RUNC).host_network(true);
    let (pod, app, _) = cri.run_pod_with_container(&config, &app()).await?;
    let Role::Sandbox(info) = sidetunnel_oci::classify_bundle(&h.task_bundle(&pod.id))? else {
        anyhow::bail!("hostNetwork sandbox not classified as sandbox");
    };
    ensure!(info.host_network && info.netns_path.is_none(), "{info:?}");
    // The container really shares the node's network: it sees the bridge.
    let links = cri
        .exec_ok(&app.id, &["ip", "link", "show", &h.bridge()])
        .await?;
    ensure!(links.contains(&h.bridge()), "host link missing: {links}");
    cri.stop_pod(&pod.id).await?;
    cri.remove_pod(&pod.id).await?;
    assert_nothing_left(h, cri, &[&pod.id, &app.id], None).await
}

/// Only allow-listed pod annotations reach the sandbox spec of the
/// `sidetunnel` handler, where the shim parses them into pod settings.
async fn pod_annotations_allow_list(h: &Containerd, cri: &mut Cri) -> Result<()> {
    let config = h
        .pod_config("annotated", containerd::SIDETUNNEL)
        .annotation("sidetunnel.io/inject", "false")
        .annotation(
            "sidetunnel.io/prefetch",
            "ratings.default.svc.cluster.local",
        )
        .annotation("traffic.sidecar.istio.io/excludeOutboundPorts", "5432")
        .annotation("example.com/not-forwarded", "x");
    let pod = cri.run_pod(&config).await?;
    let Role::Sandbox(info) = sidetunnel_oci::classify_bundle(&h.task_bundle(&pod.id))? else {
        anyhow::bail!("annotated sandbox not classified as sandbox");
    };
    ensure!(
        !info.annotations.contains_key("example.com/not-forwarded"),
        "{info:?}"
    );
    let settings = info.settings()?;
    ensure!(!settings.inject, "{settings:?}");
    ensure!(
        settings.prefetch == ["ratings.default.svc.cluster.local"],
        "{settings:?}"
    );
    ensure!(settings.exclude_outbound_ports == [5432], "{settings:?}");
    cri.stop_pod(&pod.id).await?;
    cri.remove_pod(&pod.id).await?;
    assert_nothing_left(h, cri, &[&pod.id], None).await
}

/// Sequential pods: median RunPodSandbox → container running.
async fn timed_pods(h: &Containerd, cri: &mut Cri) -> Result<()> {
    let mut samples = Vec::new();
    for i in 0..TIMED_PODS {
        let config = h.pod_config(&format!("timed-{i}"), RUNC);
        let (pod, app, elapsed) = cri.run_pod_with_container(&config, &app()).await?;
        samples.push(elapsed);
        cri.stop_pod(&pod.id).await?;
        cri.remove_pod(&pod.id).await?;
        assert_nothing_left(h, cri, &[&pod.id, &app.id], None).await?;
    }
    eprintln!(
        "runc: RunPodSandbox → app running over {TIMED_PODS} pods: median {:?}, samples {samples:?}",
        median(&samples)
    );
    Ok(())
}

/// No pod, container, process, netns, bundle, runc state or mount remains.
async fn assert_nothing_left(
    h: &Containerd,
    cri: &mut Cri,
    ids: &[&str],
    netns: Option<&Path>,
) -> Result<()> {
    ensure!(cri.list_pods().await?.is_empty(), "pods remain");
    ensure!(
        cri.list_containers(None).await?.is_empty(),
        "containers remain"
    );
    // Shims exit asynchronously after the last task of their pod is deleted.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !h.shim_pids().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        h.shim_pids().is_empty(),
        "shims still running: {:?}",
        h.shim_pids()
    );
    ensure!(
        h.pod_cgroup_pids().is_empty(),
        "processes in pod cgroups: {:?}",
        h.pod_cgroup_pids()
    );
    if let Some(ns) = netns {
        ensure!(!ns.exists(), "netns {} left behind", ns.display());
    }
    for id in ids {
        ensure!(!h.task_bundle(id).exists(), "bundle of {id} left behind");
        let runc_state = h.runc_root().join(containerd::K8S_NAMESPACE).join(id);
        ensure!(!runc_state.exists(), "runc state of {id} left behind");
    }
    let mounts: Vec<_> = h
        .mounts()
        .into_iter()
        .filter(|m| !m.ends_with("overlay-probe/merged"))
        .collect();
    ensure!(mounts.is_empty(), "mounts left behind: {mounts:?}");
    let ports = std::fs::read_dir(format!("/sys/class/net/{}/brif", h.bridge()))
        .map(|d| d.count())
        .unwrap_or(0);
    ensure!(ports == 0, "{ports} veth(s) still on bridge {}", h.bridge());
    Ok(())
}

/// A crashed containerd must not leak pods into later tests: dropping the
/// harness kills the orphaned shims and containers and removes the netns,
/// mounts, cgroups, bridge and directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_cleans_up_after_containerd_crash() -> Result<()> {
    run_bounded(
        "crash cleanup test",
        Duration::from_secs(180),
        crash_cleanup(),
    )
    .await
}

async fn crash_cleanup() -> Result<()> {
    let h = Containerd::start_with_images(Options::default()).await?;
    let mut cri = h.cri().await?;
    let (pod, _app, _) = cri
        .run_pod_with_container(&h.pod_config("orphan", RUNC), &app())
        .await?;
    let netns = check_sandbox_spec(&h, &pod)?;
    let shims = h.shim_pids();
    ensure!(!shims.is_empty(), "no shim found for the running pod");
    let pod_cgroup = format!("/sys/fs/cgroup/pids{}", pod.config.cgroup_parent());
    ensure!(Path::new(&pod_cgroup).exists(), "{pod_cgroup} missing");
    let (dir, bridge) = (h.dir().to_owned(), h.bridge());

    let pid = h.pid().context("containerd pid")? as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    drop(h);

    for shim in shims {
        ensure!(!running(shim), "shim {shim} survived");
    }
    ensure!(!netns.exists(), "netns {} survived", netns.display());
    ensure!(!Path::new(&pod_cgroup).exists(), "{pod_cgroup} survived");
    ensure!(!dir.exists(), "{} survived", dir.display());
    ensure!(
        !Path::new("/sys/class/net").join(&bridge).exists(),
        "bridge {bridge} survived"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    ensure!(
        !mounts.contains(&*dir.to_string_lossy()),
        "mounts under {} survived",
        dir.display()
    );
    Ok(())
}

/// Exists and is not a zombie (orphaned shims are reparented to an init that
/// may reap them late).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}
