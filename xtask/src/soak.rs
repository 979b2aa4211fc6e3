//! `cargo xtask soak [--pods N]`: N pods (default 1,000) created and
//! removed one after another through CRI with the `sidetunnel` runtime on
//! a private test containerd (the tests' harness), with the real
//! `sidetunnel-meshd` as control plane and CA. Each pod runs until its
//! supervised `sidetunnel-proxy` has exec'd, then is stopped and removed.
//!
//! Nothing may be left behind, checked after every pod (its state dir,
//! netns, mounts) and at the end: no network namespace of any soak pod (and
//! no nftables table or ip rule of ours in one that survived), no proxy or
//! shim process, no process and no container or proxy cgroup in the
//! harness's pod cgroup tree (see [`leftover_cgroups`]), no sidetunnel state directory, no mount under the harness, and
//! containerd's open fds back to their baseline (taken after a few warm-up
//! pods, plus a small slack for its own caches).
//!
//! Not part of CI: 1,000 pods take roughly 15-30 minutes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use sidetunnel_tests::containerd::{Containerd, Options, SIDETUNNEL};
use sidetunnel_tests::cri::Cri;
use sidetunnel_tests::mesh::{self, MeshNode, NodeConfigParams};
use sidetunnel_tests::{bins, prereq};

#[derive(Args, Debug)]
pub struct SoakArgs {
    /// How many pods to create and remove, one after another.
    #[arg(long, default_value_t = 1000)]
    pods: usize,
    /// Pods before containerd's fd baseline is taken (first-use caches).
    #[arg(long, default_value_t = 5)]
    warmup: usize,
}

/// Bound on one pod's whole cycle (run, proxy up, stop, remove).
const POD_LIMIT: Duration = Duration::from_secs(120);
/// containerd fds allowed above the baseline at the end (gRPC connections
/// and event subscribers come and go).
const FD_SLACK: usize = 16;

pub fn run(args: &SoakArgs) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the soak needs root (network namespaces, cgroups, containerd)");
    }
    let containerd = sidetunnel_tests::containerd::containerd_bin();
    for b in ["runc", "nft", "ip", &containerd.to_string_lossy()] {
        ensure!(
            prereq::which(b).is_some() || Path::new(b).exists(),
            "`{b}` not found"
        );
    }
    crate::cargo(&["build", "--workspace", "--bins"])?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(soak(args))
}

async fn soak(args: &SoakArgs) -> Result<()> {
    let mut node = MeshNode::init(&bins::path("sidetunnel-meshd"))?;
    let state_root = node.dir().join("state");
    std::fs::create_dir_all(&state_root)?;
    let node_config = node.dir().join("node-config.toml");
    let h = Containerd::start_with_images(Options {
        sidetunnel_shim: Some(bins::path("containerd-shim-sidetunnel-v1")),
        sidetunnel_config: Some(node_config.clone()),
        ..Default::default()
    })
    .await?;
    node.serve(&h)?;
    let config = node.node_config(
        &h,
        &NodeConfigParams {
            proxy_binary: bins::path("sidetunnel-proxy"),
            state_root: state_root.clone(),
            readiness_timeout: "60s".into(),
            log_level: "warn".into(),
        },
    )?;
    std::fs::write(&node_config, config)?;
    let res = cycle_pods(args, &h, &node, &state_root).await;
    if res.is_err() {
        eprintln!("--- containerd log tail ---\n{}", h.log_tail(40));
        eprintln!("--- meshd log tail ---\n{}", node.log_tail(20));
    }
    let down = h.shutdown().await;
    drop(node);
    res?;
    down.context("stopping the soak containerd")
}

async fn cycle_pods(
    args: &SoakArgs,
    h: &Containerd,
    node: &MeshNode,
    state_root: &Path,
) -> Result<()> {
    let containerd = h.pid().context("containerd is not running")? as i32;
    let mut cri = h.cri().await?;
    let mut netns_seen = Vec::new();
    let mut fd_baseline = None;
    let start = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..args.pods {
        if i == args.warmup.min(args.pods.saturating_sub(1)) {
            fd_baseline = Some(fd_count(containerd)?);
        }
        let t = Instant::now();
        let netns = tokio::time::timeout(POD_LIMIT, one_pod(h, node, &mut cri, state_root, i))
            .await
            .with_context(|| format!("pod {i} did not cycle within {POD_LIMIT:?}"))??;
        slowest = slowest.max(t.elapsed());
        netns_seen.push(netns);
        if (i + 1) % 50 == 0 || i + 1 == args.pods {
            eprintln!(
                "soak: {} pods in {:.0} s ({:.2} s/pod, slowest {:.2} s), containerd fds {}",
                i + 1,
                start.elapsed().as_secs_f64(),
                start.elapsed().as_secs_f64() / (i + 1) as f64,
                slowest.as_secs_f64(),
                fd_count(containerd)?
            );
        }
    }
    ensure!(
        cri.list_pods().await?.is_empty(),
        "CRI still lists pods after the soak"
    );
    // Processes may take a moment to be reaped after the last removal.
    let deadline = Instant::now() + Duration::from_secs(30);
    let leftovers = loop {
        let l = leftovers(h, state_root, &netns_seen)?;
        if l.is_empty() || Instant::now() > deadline {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    ensure!(
        leftovers.is_empty(),
        "left behind:\n  {}",
        leftovers.join("\n  ")
    );
    let (base, end) = (fd_baseline.unwrap_or_default(), fd_count(containerd)?);
    ensure!(
        end <= base + FD_SLACK,
        "containerd holds {end} fds after the soak, {base} after the warm-up"
    );
    println!(
        "soak: {} pods created and removed in {:.0} s ({:.2} s/pod, slowest {:.2} s); \
         nothing left behind (netns, rules, proxy/shim processes, cgroups, state dirs, \
         mounts); containerd fds {base} after warm-up, {end} at the end",
        args.pods,
        start.elapsed().as_secs_f64(),
        start.elapsed().as_secs_f64() / args.pods.max(1) as f64,
        slowest.as_secs_f64()
    );
    Ok(())
}

/// Runs pod `i` until its proxy has exec'd, then stops and removes it and
/// checks what it owned is gone. Returns its netns path.
async fn one_pod(
    h: &Containerd,
    node: &MeshNode,
    cri: &mut Cri,
    state_root: &Path,
    i: usize,
) -> Result<PathBuf> {
    let name = format!("soak-{i}");
    let config = h.pod_config(&name, SIDETUNNEL).namespace("soak");
    node.mint_token("soak", &name, &config.uid, "soak")?;
    let pod = cri
        .run_pod(&config)
        .await
        .with_context(|| format!("RunPodSandbox {name}"))?;
    let netns = match sidetunnel_oci::classify_bundle(&h.task_bundle(&pod.id))? {
        sidetunnel_oci::Role::Sandbox(info) => info.netns_path.context("sandbox without netns")?,
        other => bail!("bundle of {name} is not a sandbox: {other:?}"),
    };
    let deadline = Instant::now() + POD_LIMIT / 2;
    let proxy = loop {
        match mesh::proxy_pid(state_root, &pod.id) {
            Ok(pid) => break pid,
            Err(e) if Instant::now() > deadline => return Err(e.context(format!("{name}'s proxy"))),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    cri.stop_pod(&pod.id).await?;
    cri.remove_pod(&pod.id).await?;
    let sdir = state_root.join(&pod.id);
    ensure!(!sdir.exists(), "{name}: state dir left: {}", sdir.display());
    ensure!(!netns.exists(), "{name}: netns left: {}", netns.display());
    ensure!(
        !Path::new(&format!("/proc/{proxy}")).exists() || zombie_or_gone(proxy),
        "{name}: proxy {proxy} still running"
    );
    let mounts: Vec<PathBuf> = h
        .mounts()
        .into_iter()
        .filter(|m| m.to_string_lossy().contains(&pod.id))
        .collect();
    ensure!(mounts.is_empty(), "{name}: mounts left: {mounts:?}");
    Ok(netns)
}

/// Everything of the soak's pods still present, one line each.
fn leftovers(h: &Containerd, state_root: &Path, netns_seen: &[PathBuf]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for ns in netns_seen.iter().filter(|p| p.exists()) {
        let rules = sidetunnel_redirect::show(ns).unwrap_or_else(|e| e.to_string());
        out.push(format!("netns {} (rules: {})", ns.display(), rules.trim()));
    }
    let proxies: Vec<i32> = pids_with(&state_root.to_string_lossy())
        .into_iter()
        .filter(|p| !zombie_or_gone(*p))
        .collect();
    if !proxies.is_empty() {
        out.push(format!("proxy processes {proxies:?}"));
    }
    if !h.shim_pids().is_empty() {
        out.push(format!("shim processes {:?}", h.shim_pids()));
    }
    if !h.pod_cgroup_pids().is_empty() {
        out.push(format!("pod cgroup processes {:?}", h.pod_cgroup_pids()));
    }
    let cgroups = leftover_cgroups(&h.cgroup_root());
    if !cgroups.is_empty() {
        out.push(format!("cgroups {cgroups:?}"));
    }
    let dirs: Vec<_> = std::fs::read_dir(state_root)?
        .flatten()
        .map(|e| e.path())
        .collect();
    if !dirs.is_empty() {
        out.push(format!("state dirs {dirs:?}"));
    }
    let mounts = h.mounts();
    if !mounts.is_empty() {
        out.push(format!("mounts {mounts:?}"));
    }
    Ok(out)
}

fn fd_count(pid: i32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("/proc/{pid}/fd"))?
        .count())
}

/// True when `pid` is gone or a zombie awaiting its parent.
fn zombie_or_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => true,
    }
}

/// Processes whose command line contains `needle`.
fn pids_with(needle: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

/// Cgroups left under the harness's pod cgroup root (in every hierarchy
/// under /sys/fs/cgroup, v1 or v2). Pod-level cgroups (`<root>/pod<uid>`)
/// are the kubelet's to create and remove (runc creates them as the
/// containers' parent and removes only its own leaves), so, standing in for
/// the kubelet, empty ones are removed here; one that still has a child
/// (a container's or the proxy's cgroup) or cannot be removed is reported.
fn leftover_cgroups(root: &str) -> Vec<PathBuf> {
    let rel = root.trim_start_matches('/');
    let mut tops = vec![PathBuf::from("/sys/fs/cgroup").join(rel)];
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        tops.extend(entries.flatten().map(|e| e.path().join(rel)));
    }
    let mut out = Vec::new();
    for pod in tops.iter().flat_map(|t| subdirs(t)) {
        let children = subdirs(&pod);
        if !children.is_empty() {
            out.extend(children);
        } else if std::fs::remove_dir(&pod).is_err() && pod.exists() {
            out.push(pod);
        }
    }
    out.sort();
    out.dedup();
    out
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}
