//! `cargo xtask bench dataplane` (issue 7): the data path through two real
//! `sidetunnel-proxy` pods (real redirection, real HBONE mTLS, a real
//! `sidetunnel-meshd`) against the direct path between the same two network
//! namespaces, in the same run. Direct = a client socket carrying the
//! proxy's mark (so A's ruleset lets it pass) to a server port B's ruleset
//! does not capture; for iperf3, which cannot mark, the port is excluded
//! from outbound capture instead.
//!
//! Workloads (each run alternates direct and mesh, flipping the order every
//! round; medians of `--runs`): bulk throughput with 1, 10 and 100 streams
//! (a Rust sender/sink, plus iperf3 single-stream when installed), 1 KiB
//! request/response on a persistent connection (closed loop, and paced at
//! 1000 req/s for CPU per 1000 req/s), 1 KiB with a new connection per
//! request through the warm HBONE pool, the proxies' CPU seconds (utime +
//! stime) per GB, RSS idle / under load / high-water mark, and spawn →
//! `/healthz/ready`. Prints a Markdown table and one JSON line (also
//! written to `target/bench/dataplane.{md,json}`).

mod report;
mod workloads;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sidetunnel_tests::topology::{Options, Pod, PodPair};

pub use report::Report;
use workloads::{Bench, Route};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Runs of every measure, direct and mesh alternating; medians reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Smoke run: one run, 1 s per workload (overrides the durations).
    #[arg(long)]
    quick: bool,
    /// Seconds of each bulk-throughput run.
    #[arg(long, default_value_t = 10.0)]
    bulk_secs: f64,
    /// Seconds of each latency and connection-rate run.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Extra flag for both proxies (repeatable), e.g.
    /// `--proxy-arg=--worker-threads=1`.
    #[arg(long = "proxy-arg", allow_hyphen_values = true)]
    proxy_args: Vec<String>,
    /// Use the binaries in this directory instead of building the shipped
    /// ones (`cargo xtask dist`).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Run only these workloads (comma-separated; default: all), e.g.
    /// `--only bulk1,rr,cpr` for a quick A/B comparison of two builds.
    #[arg(long, value_delimiter = ',')]
    only: Vec<Workload>,
    /// Run this ztunnel binary (built from istio/ztunnel) instead of
    /// sidetunnel-proxy: same wire, same meshd, same redirection.
    #[arg(long, value_name = "PATH")]
    ztunnel: Option<PathBuf>,
    /// Only this pod runs ztunnel, the other sidetunnel (HBONE interop).
    #[arg(long, value_name = "a|b", requires = "ztunnel", value_parser = parse_pod)]
    ztunnel_only_in: Option<Pod>,
    /// Environment for ztunnel (repeatable), e.g.
    /// `--ztunnel-env ZTUNNEL_WORKER_THREADS=1`.
    #[arg(long, value_name = "KEY=VALUE", requires = "ztunnel")]
    ztunnel_env: Vec<String>,
}

fn parse_pod(s: &str) -> Result<Pod, String> {
    match s {
        "a" | "A" => Ok(Pod::A),
        "b" | "B" => Ok(Pod::B),
        _ => Err(format!("{s:?} is not a pod: a or b")),
    }
}

/// The load rounds' workloads (memory and start-up measures always run).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Bulk, single stream.
    Bulk1,
    /// Bulk, 10 streams.
    Bulk10,
    /// Bulk, 100 streams.
    Bulk100,
    /// iperf3 single stream.
    Iperf3,
    /// 1 KiB request/response, persistent connection, closed loop.
    Rr,
    /// 1 KiB request/response at 1000 req/s.
    Paced,
    /// 1 KiB, new connection per request.
    Cpr,
}

/// What one bench run does.
#[derive(Debug, Clone)]
pub struct Plan {
    pub runs: usize,
    pub bulk: Duration,
    pub latency: Duration,
    pub quick: bool,
    pub proxy_args: Vec<String>,
    /// Where to keep the proxies' and meshd's logs afterwards.
    pub logs: Option<PathBuf>,
    /// Workloads to run; empty = all.
    pub only: Vec<Workload>,
    /// ztunnel in place of sidetunnel-proxy (binary, only in, environment).
    pub ztunnel: Option<PathBuf>,
    pub ztunnel_only_in: Option<Pod>,
    pub ztunnel_env: Vec<String>,
}

impl Plan {
    /// Whether `w` is part of this run.
    pub fn runs_workload(&self, w: Workload) -> bool {
        self.only.is_empty() || self.only.contains(&w)
    }
}

impl Plan {
    pub fn quick() -> Plan {
        Plan {
            runs: 1,
            bulk: Duration::from_secs(1),
            latency: Duration::from_secs(1),
            quick: true,
            proxy_args: Vec::new(),
            logs: None,
            only: Vec::new(),
            ztunnel: None,
            ztunnel_only_in: None,
            ztunnel_env: Vec::new(),
        }
    }
}

pub fn run(args: &Args) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the data-plane bench needs root (network namespaces, nftables)");
    }
    let mut plan = Plan {
        runs: args.runs.max(1),
        bulk: secs(args.bulk_secs, "--bulk-secs")?,
        latency: secs(args.secs, "--secs")?,
        quick: false,
        proxy_args: args.proxy_args.clone(),
        logs: Some(crate::workspace::target_dir().join("bench/dataplane-logs")),
        only: args.only.clone(),
        ztunnel: args.ztunnel.clone(),
        ztunnel_only_in: args.ztunnel_only_in,
        ztunnel_env: args.ztunnel_env.clone(),
    };
    if args.quick {
        plan = Plan {
            proxy_args: plan.proxy_args,
            logs: plan.logs,
            only: plan.only,
            ztunnel: plan.ztunnel,
            ztunnel_only_in: plan.ztunnel_only_in,
            ztunnel_env: plan.ztunnel_env,
            ..Plan::quick()
        };
    }
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => crate::dist::build(&[])?,
    };
    let report = bench(&plan, &bin_dir)?;
    let out = crate::workspace::target_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    let out = out.canonicalize()?;
    std::fs::write(out.join("dataplane.md"), &report.markdown)?;
    std::fs::write(out.join("dataplane.json"), format!("{}\n", report.json))?;
    print!("{}", report.markdown);
    println!("{}", report.json);
    eprintln!(
        "(also in {} and dataplane.json)",
        out.join("dataplane.md").display()
    );
    Ok(())
}

fn secs(v: f64, flag: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("{flag} must be a positive number of seconds, not {v}"))
}

/// Samples of one measure per route.
#[derive(Debug, Default, Clone)]
pub struct Series {
    pub direct: Vec<f64>,
    pub mesh: Vec<f64>,
}

impl Series {
    pub fn push(&mut self, route: Route, v: f64) {
        match route {
            Route::Direct => self.direct.push(v),
            Route::Mesh => self.mesh.push(v),
        }
    }
}

/// Measure name → samples.
pub type Samples = BTreeMap<&'static str, Series>;

/// Builds the topology from the binaries in `bin_dir`, runs every workload
/// `plan.runs` times per route and reports medians.
pub fn bench(plan: &Plan, bin_dir: &Path) -> Result<Report> {
    let load_start = loadavg();
    let mut opts = Options::new(bin_dir);
    opts.proxy_args = plan.proxy_args.clone();
    opts.ztunnel = plan.ztunnel.clone();
    opts.ztunnel_only_in = plan.ztunnel_only_in;
    opts.ztunnel_env = plan.ztunnel_env.clone();
    opts.exclude_outbound_ports = [workloads::IPERF_DIRECT_PORT].into();
    opts.exclude_inbound_ports = workloads::DIRECT_PORTS.into();
    crate::step("starting meshd, pods A and B with their proxies");
    let proxies = proxies_label(&opts);
    let pair = PodPair::start(opts)?;
    let mut b = Bench::new(pair, plan)?;
    let mut samples = Samples::new();
    b.idle_memory(&mut samples)?;
    b.warm_up()?;
    b.idle_connections(&mut samples)?;
    for round in 0..plan.runs {
        crate::step(&format!("round {} of {}", round + 1, plan.runs));
        let order = if round % 2 == 0 {
            [Route::Direct, Route::Mesh]
        } else {
            [Route::Mesh, Route::Direct]
        };
        b.round(order, &mut samples)?;
    }
    b.memory_after_load(&mut samples)?;
    crate::step("start → ready (proxy A restarted)");
    b.start_to_ready(&mut samples)?;
    let iperf3 = b.has_iperf3();
    if let Some(dir) = &plan.logs {
        b.save_logs(dir)?;
    }
    drop(b);
    let meta = json!({
        "runs": plan.runs,
        "quick": plan.quick,
        "bulk_secs": plan.bulk.as_secs_f64(),
        "latency_secs": plan.latency.as_secs_f64(),
        "proxy_args": plan.proxy_args,
        "proxy": proxies,
        "ztunnel_env": plan.ztunnel_env,
        "only": plan.only.iter().map(|w| format!("{w:?}").to_lowercase()).collect::<Vec<_>>(),
        "iperf3": iperf3,
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "commit": crate::workspace::git_head(),
    });
    Ok(report::build(plan, &samples, meta))
}

/// What A and B run, e.g. `sidetunnel → ztunnel`.
fn proxies_label(opts: &Options) -> String {
    let name = |pod| match opts.runs_ztunnel(pod) {
        true => "ztunnel",
        false => "sidetunnel",
    };
    format!("{} → {}", name(Pod::A), name(Pod::B))
}

/// The 1, 5 and 15 minute load averages: the machine is shared, so every
/// result says how busy it was.
fn loadavg() -> Value {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let v: Vec<f64> = text
        .split_whitespace()
        .take(3)
        .filter_map(|x| x.parse().ok())
        .collect();
    json!(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sidetunnel_tests::{bins, prereq};

    #[test]
    fn only_selects_workloads() {
        let all = Plan::quick();
        assert!(all.runs_workload(Workload::Cpr) && all.runs_workload(Workload::Bulk100));
        let some = Plan {
            only: vec![Workload::Bulk1, Workload::Rr],
            ..Plan::quick()
        };
        assert!(some.runs_workload(Workload::Rr));
        assert!(!some.runs_workload(Workload::Cpr));
        assert!(!some.runs_workload(Workload::Bulk10));
    }

    /// The CI smoke run: the quick bench with the shipped binaries produces
    /// the table and a JSON line whose measures are all present and
    /// non-zero. No thresholds: timing belongs to the full bench.
    #[test]
    fn quick_bench_produces_table_and_json() {
        let t = "quick_bench_produces_table_and_json";
        if !(prereq::root(t)
            && prereq::binary(t, "ip")
            && prereq::binary(t, "nft")
            && prereq::binary(t, "iperf3"))
        {
            return;
        }
        // The shipped (static, release) binaries when `cargo xtask test`
        // built them, else this profile's.
        let dir = std::env::var_os(crate::dist::DIR_ENV)
            .map(std::path::PathBuf::from)
            .unwrap_or_else(bins::dir);
        eprintln!("quick bench with the binaries in {}", dir.display());
        let report = bench(&Plan::quick(), &dir).expect("quick bench");
        let md = &report.markdown;
        for row in [
            "| measure | direct |",
            "single stream",
            "iperf3",
            "100 streams",
            "CPU per GB",
            "persistent connection, p99",
            "new connection per request (warm HBONE pool), p50",
            "proxy CPU per request",
            "proxy CPU per new connection",
            "per 1000 req/s",
            "RSS idle",
            "start → ready",
        ] {
            assert!(md.contains(row), "no {row:?} in the table:\n{md}");
        }
        let line = report.json.to_string();
        assert!(!line.contains('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["bench"], "dataplane");
        let metrics = v["metrics"].as_object().expect("metrics");
        assert!(metrics.len() >= 20, "{metrics:?}");
        for (name, m) in metrics {
            for route in ["direct", "mesh"] {
                if let Some(x) = m[route].as_f64() {
                    // Idle connections may fit in memory the proxy already
                    // holds: zero growth is a valid measurement.
                    let ok = if name.starts_with("kib_per_idle_conn") {
                        x >= 0.0
                    } else {
                        x > 0.0
                    };
                    assert!(ok, "{name}.{route} = {x}");
                }
            }
            assert!(m["mesh"].as_f64().is_some(), "{name} has no mesh figure");
        }
        for name in ["bulk_1_gbps", "rr_p50_us", "cpr_p50_us", "iperf3_gbps"] {
            assert!(metrics[name]["direct"].as_f64().is_some(), "{name}");
        }
    }
}
