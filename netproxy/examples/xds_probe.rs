//! The measuring end of `cargo xtask bench xds` (issue 6). One JSON object
//! on stdout per run:
//!
//! * `sync`: a real xDS client (netproxy's `XdsClient` + `Store`) in its own
//!   process against a running sidetunnel-meshd, in wildcard or scoped mode
//!   (own workload + policies, then destinations fetched on demand, as the
//!   data path does on first use). Reports bytes received, what the store
//!   holds and the process's VmRSS after sync.
//! * `apply`: decode + apply timings on one pinned core, on the responses
//!   meshd serves for the inventory: the full Address snapshot into an
//!   empty store, and one incremental workload update into a full store.
//! * `model`: the per-object cost model (meshd::scale) of the inventory:
//!   a pod's identity, destinations and scoped set (what `sync` must then
//!   hold), full-sync bytes, cluster totals and churn.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use netproxy::state::Store;
use netproxy::xds::{NodeInfo, Subscription, XdsClient, XdsConfig, handler};
use prost::Message;
use serde_json::{Value, json};
use sidetunnel_meshd::inventory;
use sidetunnel_meshd::scale::{self, CostModel};
use sidetunnel_meshd::snapshot::{Kind, Snapshot, TypeUrl};
use sidetunnel_proto::envoy::service::discovery::v3::DeltaDiscoveryResponse;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Wildcard,
    Scoped,
}

#[derive(Subcommand)]
enum Cmd {
    /// Sync a real client against meshd and report bytes, what the store
    /// holds and RSS. Takes the pod's identity and destinations from the
    /// command line (see `model`), so this process never loads the
    /// inventory: its RSS is the client's.
    Sync {
        /// `https://127.0.0.1:PORT`.
        #[arg(long)]
        xds: String,
        /// PEM roots of the server certificate.
        #[arg(long)]
        root_cert: PathBuf,
        /// Bearer token file (`sidetunnel-meshd token`).
        #[arg(long)]
        token_file: PathBuf,
        #[arg(long, value_enum)]
        mode: Mode,
        /// The pod's workload uid, name, namespace, service account, node, IP.
        #[arg(long)]
        uid: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        service_account: String,
        #[arg(long, default_value = "")]
        node: String,
        #[arg(long)]
        ip: Vec<std::net::IpAddr>,
        /// Destinations fetched on demand in scoped mode (`ns/hostname`).
        #[arg(long, value_delimiter = ',')]
        dest: Vec<String>,
        #[arg(long, default_value = "120")]
        timeout_secs: u64,
    },
    /// Time decode + apply of the full snapshot and of one update.
    Apply {
        #[arg(long)]
        inventory: PathBuf,
        #[arg(long, default_value_t = 15)]
        full_iterations: usize,
        #[arg(long, default_value_t = 2000)]
        update_iterations: usize,
    },
    /// The cost model of the inventory.
    Model {
        #[arg(long)]
        inventory: PathBuf,
        /// The pod: its index, or `median` for the pod whose scoped config
        /// (with `--cluster-k` destinations) is the median over all pods.
        #[arg(long, default_value = "median")]
        pod: PodChoice,
        /// Destinations per pod for the scoped rows and cluster totals.
        #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
        k: Vec<usize>,
        /// Destinations per pod for the cluster totals.
        #[arg(long, default_value_t = 10)]
        cluster_k: usize,
        /// The meshd mode priced: `istiod` (every policy to every proxy)
        /// or `extended` (uid-scoped Authorization).
        #[arg(long, default_value = "istiod")]
        meshd_mode: sidetunnel_meshd::mode::Mode,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Sync {
            xds,
            root_cert,
            token_file,
            mode,
            uid,
            name,
            namespace,
            service_account,
            node,
            ip,
            dest,
            timeout_secs,
        } => {
            let node = NodeInfo {
                pod_name: name,
                namespace,
                service_account,
                // As the proxy: no NODE_NAME on demand (istiod would push
                // every workload of the node).
                node_name: if mode == Mode::Scoped {
                    String::new()
                } else {
                    node
                },
                cluster_id: "Kubernetes".into(),
                ips: ip,
                extra: Default::default(),
            };
            let mut cfg = XdsConfig::new(xds, root_cert, node);
            cfg.token_file = Some(token_file);
            if mode == Mode::Scoped {
                cfg.addresses = Subscription::OnDemand {
                    initial: vec![uid.clone()],
                };
                cfg.authorizations = Subscription::OnDemand { initial: vec![uid] };
            }
            // One worker thread: a per-pod proxy's xDS work is one stream.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            let out = rt.block_on(sync(cfg, &dest, Duration::from_secs(timeout_secs)))?;
            println!("{out}");
        }
        Cmd::Apply {
            inventory,
            full_iterations,
            update_iterations,
        } => {
            let snap = load(&inventory)?;
            println!("{}", apply(&snap, full_iterations, update_iterations)?);
        }
        Cmd::Model {
            inventory,
            pod,
            k,
            cluster_k,
            meshd_mode,
        } => {
            let snap = load(&inventory)?;
            println!("{}", model(&snap, pod, &k, cluster_k, meshd_mode)?);
        }
    }
    Ok(())
}

/// `--pod`: a pod index or the scenario's median pod.
#[derive(Clone, Copy)]
enum PodChoice {
    Index(usize),
    Median,
}

impl std::str::FromStr for PodChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "median" => Ok(PodChoice::Median),
            n => n
                .parse()
                .map(PodChoice::Index)
                .map_err(|_| format!("{s:?} is neither a pod index nor \"median\"")),
        }
    }
}

fn load(path: &std::path::Path) -> Result<Snapshot> {
    inventory::load(&scale::context(), path)
        .with_context(|| format!("loading inventory {}", path.display()))
}

/// The uid of pod number `pod` and its `k` destinations.
fn pod_and_destinations(
    model: &CostModel<'_>,
    pod: usize,
    k: usize,
) -> Result<(String, Vec<String>)> {
    let Some(uid) = model.workloads().nth(pod).cloned() else {
        bail!("the inventory has no pod number {pod}");
    };
    let dests = model.destinations(pod, &uid, k);
    Ok((uid, dests))
}

async fn sync(cfg: XdsConfig, dests: &[String], timeout: Duration) -> Result<Value> {
    let start = rss()?;
    let store = Arc::new(Store::with_demand_timeout(timeout));
    let started = Instant::now();
    let (handle, task) = XdsClient::new(cfg, store.clone()).spawn();
    if !handle.wait_synced(timeout).await {
        bail!("xDS client did not sync: {:?}", handle.status());
    }
    let synced_ms = started.elapsed().as_secs_f64() * 1e3;
    // First use of each destination, one after the other.
    for d in dests {
        match store.fetch_name(d).await {
            Ok(Some(_)) => {}
            other => bail!("fetching destination {d}: {other:?}"),
        }
    }
    let total_ms = started.elapsed().as_secs_f64() * 1e3;
    let c = handle.stats().snapshot();
    let dump = store.dump();
    let addresses: BTreeSet<String> = dump
        .workloads
        .iter()
        .map(|w| w.uid.clone())
        .chain(dump.services.iter().map(|s| s.key()))
        .collect();
    let policies: BTreeSet<String> = dump.policies.iter().map(|p| p.key()).collect();
    let after = rss()?;
    task.abort();
    Ok(json!({
        "k": dests.len(),
        "address_bytes": c.address_bytes,
        "authorization_bytes": c.authorization_bytes,
        "bytes": c.bytes_received,
        "responses": c.responses,
        "nacks": c.nacks,
        "workloads": dump.workloads.len(),
        "services": dump.services.len(),
        "policies": dump.policies.len(),
        "held_addresses": addresses,
        "held_policies": policies,
        "sync_ms": synced_ms,
        "total_ms": total_ms,
        "rss_start_kb": start.total,
        "rss_kb": after.total,
        "rss_peak_kb": after.peak,
        "rss_anon_kb": after.anon,
        "rss_file_kb": after.file,
        "rss_anon_start_kb": start.anon,
    }))
}

/// Resident memory of this process, in kB (from `/proc/self/status`).
struct Rss {
    /// VmRSS: everything resident.
    total: u64,
    /// VmHWM: the peak of VmRSS.
    peak: u64,
    /// RssAnon: heap and stacks, what configuration costs.
    anon: u64,
    /// RssFile: the binary's code and data pages touched so far.
    file: u64,
}

fn rss() -> Result<Rss> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("{name} missing in /proc/self/status"))
    };
    Ok(Rss {
        total: field("VmRSS:")?,
        peak: field("VmHWM:")?,
        anon: field("RssAnon:")?,
        file: field("RssFile:")?,
    })
}

/// Pins this thread to the CPU it runs on, so timings are one core's.
fn pin_to_one_core() {
    // SAFETY: plain libc calls on a zeroed cpu_set_t owned by this frame.
    unsafe {
        let cpu = libc::sched_getcpu();
        if cpu >= 0 {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu as usize, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
}

fn decode_apply(bytes: &[u8], store: &Store) -> Result<()> {
    let resp = DeltaDiscoveryResponse::decode(bytes)?;
    let p = handler::process(&resp);
    if !p.rejected.is_empty() {
        bail!("rejected: {:?}", p.error_detail());
    }
    store.apply(p.update);
    Ok(())
}

/// Median and minimum of `samples` (seconds).
fn stats(mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    (samples[samples.len() / 2], samples[0])
}

fn apply(snap: &Snapshot, full_iterations: usize, update_iterations: usize) -> Result<Value> {
    pin_to_one_core();
    let full = scale::full_response(snap, TypeUrl::Address).encode_to_vec();
    let mut samples = Vec::with_capacity(full_iterations);
    let mut filled = None;
    for _ in 0..full_iterations.max(1) {
        let store = Store::new();
        let t = Instant::now();
        decode_apply(&full, &store)?;
        samples.push(t.elapsed().as_secs_f64());
        filled = Some(store);
    }
    let store = filled.expect("at least one iteration");
    let (full_median, full_min) = stats(samples);

    // One workload changes node back and forth: every apply is a change.
    let uid = CostModel::new(snap, sidetunnel_meshd::mode::Mode::Istiod)
        .workloads()
        .next()
        .cloned()
        .context("no workload")?;
    let w = scale::workload(snap, &uid).context("workload decodes")?;
    let pair = [w.node.clone(), format!("{}-moved", w.node)].map(|node| {
        let mut c = w.clone();
        c.node = node;
        scale::incremental_response(&uid, &c).encode_to_vec()
    });
    let mut samples = Vec::with_capacity(update_iterations);
    for i in 0..update_iterations.max(1) {
        let t = Instant::now();
        decode_apply(&pair[i % 2], &store)?;
        samples.push(t.elapsed().as_secs_f64());
    }
    let (upd_median, upd_min) = stats(samples);
    Ok(json!({
        "full_snapshot_bytes": full.len(),
        "full_resources": snap.table(TypeUrl::Address).len(),
        "full_apply_ms_median": full_median * 1e3,
        "full_apply_ms_min": full_min * 1e3,
        "update_bytes": pair[0].len(),
        "update_apply_us_median": upd_median * 1e6,
        "update_apply_us_min": upd_min * 1e6,
    }))
}

fn model(
    snap: &Snapshot,
    pod: PodChoice,
    ks: &[usize],
    cluster_k: usize,
    mode: sidetunnel_meshd::mode::Mode,
) -> Result<Value> {
    let m = CostModel::new(snap, mode);
    // How scoped bytes spread over all pods, per destination count.
    let mut spreads = Vec::new();
    let mut per_pod = BTreeMap::new();
    for &k in ks.iter().chain([&cluster_k]) {
        if let std::collections::btree_map::Entry::Vacant(e) = per_pod.entry(k) {
            let bytes = e.insert(scale::scoped_per_pod(&m, k));
            spreads.push(scale::Spread::of(k, bytes).context("the inventory has no pods")?);
        }
    }
    let pod = match pod {
        PodChoice::Index(i) => i,
        PodChoice::Median => {
            spreads
                .iter()
                .find(|s| s.k == cluster_k)
                .context("spread of cluster_k")?
                .median_pod
        }
    };
    let mut scoped = Vec::new();
    let (uid, _) = pod_and_destinations(&m, pod, 0)?;
    let w = scale::workload(snap, &uid).context("pod workload")?;
    let ips: Vec<String> = w
        .addresses
        .iter()
        .filter_map(|b| <[u8; 4]>::try_from(&b[..]).ok())
        .map(|o| std::net::Ipv4Addr::from(o).to_string())
        .collect();
    for &k in ks {
        let (_, dests) = pod_and_destinations(&m, pod, k)?;
        let s = m.scoped(&uid, &dests);
        scoped.push(json!({
            "k": dests.len(),
            "dests": dests,
            "bytes": s.total_bytes(),
            // Pods whose scoped config for `k` is smaller than this pod's.
            "pods_below": per_pod.get(&k).map(|v| v.iter().filter(|&&b| b < s.total_bytes()).count()),
            "addresses": s.addresses,
            "policies": s.policies,
        }));
    }
    let totals = scale::cluster_totals(&m, cluster_k);
    let pods = totals.pods.max(1) as u64;
    let uids: Vec<&String> = m.workloads().collect();
    let mean_removal =
        uids.iter().map(|u| m.removal_size(u)).sum::<usize>() as f64 / uids.len().max(1) as f64;
    Ok(json!({
        "per_object": {
            "workload": m.mean_size(Kind::Workload),
            "service": m.mean_size(Kind::Service),
            "policy": m.mean_size(Kind::Authorization),
            "policies": snap.table(TypeUrl::Authorization).len(),
            "workload_removal": mean_removal,
            "address_envelope": m.envelope(TypeUrl::Address),
            "authorization_envelope": m.envelope(TypeUrl::Authorization),
        },
        "pod": {
            "index": pod,
            "uid": uid,
            "name": w.name,
            "namespace": w.namespace,
            "service_account": w.service_account,
            "node": w.node,
            "ips": ips,
        },
        "counts": {
            "workloads": m.workloads().count(),
            "services": snap
                .table(TypeUrl::Address)
                .values()
                .filter(|e| e.kind == Kind::Service)
                .count(),
            "policies": snap.table(TypeUrl::Authorization).len(),
        },
        "full_wds_bytes": scale::full_wds_bytes(snap),
        "full_bytes": m.full_bytes(),
        "scoped": scoped,
        "spread": spreads,
        "cluster": totals,
        "scoped_avg_bytes_per_pod": totals.full_sync_scoped / pods,
    }))
}
