//! `cargo xtask bench podstart` (issue 19): what a sidetunnel pod adds to
//! pod start, against runc pods on the same private containerd in the same
//! run. Sequential pods alternate runc / sidetunnel (the order flips every
//! pair), then a burst of pods started concurrently per handler. Measured
//! per pod: RunPodSandbox → first app container running (CreateContainer +
//! StartContainer returned: the shim lets the app start only once the
//! proxy is ready), and for sidetunnel pods the phases on the shared
//! monotonic clock from the shim's `start.json` (create, rules, sandbox,
//! proxy exec, gate released) and the proxy's own `ready` log line
//! (certificate, first xDS, relative to its start). Writes
//! `target/bench/podstart.{md,json}`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sidetunnel_tests::containerd::{Containerd, Options, RUNC, SIDETUNNEL};
use sidetunnel_tests::cri::{ContainerSpec, Cri, PodConfig};
use sidetunnel_tests::mesh::{MeshNode, NodeConfigParams};
use sidetunnel_tests::{image, procstat};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Sequential pods per handler (alternating runc / sidetunnel).
    #[arg(long, default_value_t = 30)]
    n: usize,
    /// Pods started concurrently per handler in the burst (0: no burst).
    #[arg(long, default_value_t = 20)]
    burst: usize,
    /// Smoke run: 3 pods per handler, a burst of 3, debug binaries.
    #[arg(long)]
    quick: bool,
    /// Use the binaries in this directory (containerd-shim-sidetunnel-v1,
    /// sidetunnel-proxy, sidetunnel-meshd) instead of the shipped build.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

impl Args {
    /// What `--quick` alone means.
    pub fn quick() -> Args {
        Args {
            n: 3,
            burst: 3,
            quick: true,
            bin_dir: None,
        }
    }
}

const NAMESPACE: &str = "podstart";
/// Idle time before a pod's memory is read (start-up allocations settled).
const COST_SETTLE: Duration = Duration::from_secs(2);
const SERVICE_ACCOUNT: &str = "bench";
/// Shim phases in start order (see shim/src/sandbox/timeline.rs).
const SHIM_PHASES: &[&str] = &[
    "create",
    "rules",
    "sandbox",
    "proxy_exec",
    "app_start",
    "ready",
];

/// One pod's start.
#[derive(Debug, Clone, Default)]
struct Sample {
    /// RunPodSandbox call → returned.
    sandbox: Duration,
    /// RunPodSandbox call → app container running.
    running: Duration,
    /// Phase → offset from the RunPodSandbox call (sidetunnel pods).
    phases: BTreeMap<String, Duration>,
}

pub fn run(args: &Args) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the pod start bench needs root (containerd, network namespaces)");
    }
    let (n, burst) = if args.quick {
        (3, 3.min(args.burst))
    } else {
        (args.n, args.burst)
    };
    let bins = match (&args.bin_dir, args.quick) {
        // The node config needs absolute paths.
        (Some(d), _) => {
            std::fs::canonicalize(d).with_context(|| format!("--bin-dir {}", d.display()))?
        }
        (None, true) => {
            crate::cargo(&["build", "--workspace", "--bins"])?;
            sidetunnel_tests::bins::dir()
        }
        (None, false) => crate::dist::build(&[])?,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(measure(&bins, n, burst))?;
    let out = crate::workspace::target_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    let md = report.markdown();
    std::fs::write(out.join("podstart.md"), &md)?;
    std::fs::write(
        out.join("podstart.json"),
        serde_json::to_string_pretty(&report.json())?,
    )?;
    print!("{md}");
    eprintln!("written: {}/podstart.{{md,json}}", out.display());
    Ok(())
}

struct Report {
    binaries: PathBuf,
    containerd: String,
    load: String,
    sequential: BTreeMap<&'static str, Vec<Sample>>,
    burst: BTreeMap<&'static str, Vec<Sample>>,
    cost: Vec<Cost>,
}

/// What one idle pod's runtime processes cost (KiB).
#[derive(Debug, Clone)]
struct Cost {
    handler: &'static str,
    process: &'static str,
    rss_kib: u64,
    pss_kib: u64,
}

async fn measure(bins: &Path, n: usize, burst: usize) -> Result<Report> {
    for b in [
        "containerd-shim-sidetunnel-v1",
        "sidetunnel-proxy",
        "sidetunnel-meshd",
    ] {
        if !bins.join(b).is_file() {
            bail!("{} is missing", bins.join(b).display());
        }
    }
    let mut mesh = MeshNode::init(&bins.join("sidetunnel-meshd"))?;
    let state_root = mesh.dir().join("state");
    std::fs::create_dir_all(&state_root)?;
    let config = mesh.dir().join("node-config.toml");
    let h = Containerd::start_with_images(Options {
        sidetunnel_shim: Some(bins.join("containerd-shim-sidetunnel-v1")),
        sidetunnel_config: Some(config.clone()),
        ..Default::default()
    })
    .await?;
    let res = async {
        mesh.serve(&h)?;
        std::fs::write(
            &config,
            mesh.node_config(
                &h,
                &NodeConfigParams {
                    proxy_binary: bins.join("sidetunnel-proxy"),
                    state_root: state_root.clone(),
                    readiness_timeout: "60s".into(),
                    log_level: "info".into(),
                },
            )?,
        )?;
        let bench = Bench {
            h: &h,
            mesh: &mesh,
            state_root: &state_root,
        };
        // One pod of each first: page cache and containerd warm for both.
        for handler in [RUNC, SIDETUNNEL] {
            bench.start_and_remove(handler, "warm").await?;
        }
        let mut sequential: BTreeMap<&'static str, Vec<Sample>> = BTreeMap::new();
        for i in 0..n {
            let order = if i % 2 == 0 {
                [RUNC, SIDETUNNEL]
            } else {
                [SIDETUNNEL, RUNC]
            };
            for handler in order {
                let s = bench.start_and_remove(handler, &format!("seq-{i}")).await?;
                sequential.entry(handler).or_default().push(s);
            }
            eprintln!("  sequential {}/{n}", i + 1);
        }
        let cost = bench.cost().await?;
        let mut bursts: BTreeMap<&'static str, Vec<Sample>> = BTreeMap::new();
        if burst > 0 {
            for handler in [RUNC, SIDETUNNEL] {
                bursts.insert(handler, bench.burst(handler, burst).await?);
                eprintln!("  burst of {burst} {handler} pods done");
            }
        }
        anyhow::Ok((sequential, bursts, cost))
    }
    .await;
    let version = format!(
        "{} ({})",
        h.version(),
        sidetunnel_tests::containerd::containerd_bin().display()
    );
    let down = h.shutdown().await;
    drop(mesh);
    let (sequential, burst, cost) = res?;
    down.context("stopping the bench containerd")?;
    Ok(Report {
        binaries: bins.to_owned(),
        containerd: version,
        load: std::fs::read_to_string("/proc/loadavg").unwrap_or_default(),
        sequential,
        burst,
        cost,
    })
}

struct Bench<'a> {
    h: &'a Containerd,
    mesh: &'a MeshNode,
    state_root: &'a Path,
}

impl Bench<'_> {
    fn pod_config(&self, handler: &str, name: &str) -> Result<PodConfig> {
        let config = self
            .h
            .pod_config(&format!("{handler}-{name}"), handler)
            .namespace(NAMESPACE);
        if handler == SIDETUNNEL {
            self.mesh.mint_token(
                &config.namespace,
                &config.name,
                &config.uid,
                SERVICE_ACCOUNT,
            )?;
        }
        Ok(config)
    }

    /// Starts a pod and its app container, reads the phases, removes it.
    async fn start_and_remove(&self, handler: &'static str, name: &str) -> Result<Sample> {
        let config = self.pod_config(handler, name)?;
        let mut cri = self.h.cri().await?;
        let (sample, pod_id) = self.start(&mut cri, handler, &config).await?;
        cri.stop_pod(&pod_id).await?;
        cri.remove_pod(&pod_id).await?;
        Ok(sample)
    }

    async fn start(
        &self,
        cri: &mut Cri,
        handler: &str,
        config: &PodConfig,
    ) -> Result<(Sample, String)> {
        let app = ContainerSpec::new("app", image::BUSYBOX).command(&["sleep", "3600"]);
        let t0 = Instant::now();
        let t0_ns = monotonic_ns();
        let pod = cri
            .run_pod(config)
            .await
            .with_context(|| format!("RunPodSandbox {} ({handler})", config.name))?;
        let sandbox = t0.elapsed();
        let c = cri.create_container(&pod, &app).await?;
        cri.start_container(&c.id).await?;
        let running = t0.elapsed();
        let mut phases = BTreeMap::new();
        if handler == SIDETUNNEL {
            phases = shim_phases(&self.state_root.join(&pod.id).join("start.json"), t0_ns)?;
            let log = config.log_directory().join("sidetunnel-proxy/0.log");
            if let (Some(exec), Some(proxy)) =
                (phases.get("proxy_exec").copied(), proxy_ready(&log))
            {
                phases.insert("certificate".into(), exec + proxy.0);
                phases.insert("first_xds".into(), exec + proxy.1);
            }
        }
        Ok((
            Sample {
                sandbox,
                running,
                phases,
            },
            pod.id,
        ))
    }

    /// Per-pod cost: one idle pod of each handler with its app running;
    /// after a settle time, the RSS and PSS of the pod's shim and (for
    /// sidetunnel) its proxy.
    async fn cost(&self) -> Result<Vec<Cost>> {
        let mut cri = self.h.cri().await?;
        let mut pods = Vec::new();
        for handler in [RUNC, SIDETUNNEL] {
            let config = self.pod_config(handler, "cost")?;
            let (_, id) = self.start(&mut cri, handler, &config).await?;
            pods.push((handler, id));
        }
        tokio::time::sleep(COST_SETTLE).await;
        let mut out = Vec::new();
        for (handler, id) in &pods {
            let shim = self
                .h
                .shim_pid_of(id)
                .with_context(|| format!("no shim process for sandbox {id}"))?;
            let mut procs = vec![("shim", shim)];
            if *handler == SIDETUNNEL {
                let record = self.state_root.join(id).join("shim.json");
                let v: Value = serde_json::from_str(&std::fs::read_to_string(&record)?)?;
                let pid = v["proxy_pid"]
                    .as_i64()
                    .with_context(|| format!("no proxy_pid in {}", record.display()))?;
                procs.push(("proxy", pid as i32));
            }
            for (process, pid) in procs {
                out.push(Cost {
                    handler,
                    process,
                    rss_kib: procstat::status_kib(pid, "VmRSS")?,
                    pss_kib: procstat::pss_kib(pid)?,
                });
            }
        }
        for (_, id) in pods {
            cri.stop_pod(&id).await?;
            cri.remove_pod(&id).await?;
        }
        Ok(out)
    }

    /// `count` pods started at once, each timed on its own.
    async fn burst(&self, handler: &'static str, count: usize) -> Result<Vec<Sample>> {
        let configs = (0..count)
            .map(|i| self.pod_config(handler, &format!("burst-{i}")))
            .collect::<Result<Vec<_>>>()?;
        let mut clients = Vec::new();
        for _ in 0..count {
            clients.push(self.h.cri().await?);
        }
        let runs = clients
            .iter_mut()
            .zip(&configs)
            .map(|(cri, config)| self.start(cri, handler, config));
        let results = futures::future::join_all(runs).await;
        let mut cri = self.h.cri().await?;
        let mut samples = Vec::new();
        let mut first_err = None;
        for r in results {
            match r {
                Ok((s, id)) => {
                    samples.push(s);
                    cri.stop_pod(&id).await?;
                    cri.remove_pod(&id).await?;
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(samples),
        }
    }
}

fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// The shim's phases, as offsets from `t0_ns` (the RunPodSandbox call).
fn shim_phases(path: &Path, t0_ns: u64) -> Result<BTreeMap<String, Duration>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let mut out = BTreeMap::new();
    for p in v["phases"].as_array().into_iter().flatten() {
        if let (Some(name), Some(ns)) = (p["name"].as_str(), p["monotonic_ns"].as_u64()) {
            out.insert(
                name.to_owned(),
                Duration::from_nanos(ns.saturating_sub(t0_ns)),
            );
        }
    }
    Ok(out)
}

/// (certificate, first xDS) after the proxy's start, from its `ready` log
/// line (`certificate_ms=… config_ms=…`).
fn proxy_ready(log: &Path) -> Option<(Duration, Duration)> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().find(|l| l.contains("ready_ms"))?;
    let field = |key: &str| -> Option<Duration> {
        let rest = &line[line.find(key)? + key.len()..];
        let num: String = rest
            .trim_start_matches(['=', '"', ':', ' '])
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        num.parse::<f64>()
            .ok()
            .map(Duration::from_secs_f64)
            .map(|d| d / 1000)
    };
    Some((field("certificate_ms")?, field("config_ms")?))
}

/// (median, p90, max) in milliseconds.
type Stats = (f64, f64, f64);

/// A table row: label, runc, sidetunnel.
type Row = (String, Option<Stats>, Option<Stats>);

fn stats(mut v: Vec<Duration>) -> Option<Stats> {
    if v.is_empty() {
        return None;
    }
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Some((ms(at(0.5)), ms(at(0.9)), ms(*v.last().expect("non-empty"))))
}

impl Report {
    fn column(
        set: &BTreeMap<&'static str, Vec<Sample>>,
        handler: &str,
        f: impl Fn(&Sample) -> Option<Duration>,
    ) -> Option<Stats> {
        stats(set.get(handler)?.iter().filter_map(f).collect())
    }

    fn rows(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        for (label, set) in [("sequential", &self.sequential), ("burst", &self.burst)] {
            if set.is_empty() {
                continue;
            }
            let n = set.values().map(Vec::len).max().unwrap_or(0);
            rows.push((
                format!("{label} (n={n}): RunPodSandbox → app running"),
                Self::column(set, RUNC, |s| Some(s.running)),
                Self::column(set, SIDETUNNEL, |s| Some(s.running)),
            ));
            rows.push((
                format!("{label}: RunPodSandbox returned"),
                Self::column(set, RUNC, |s| Some(s.sandbox)),
                Self::column(set, SIDETUNNEL, |s| Some(s.sandbox)),
            ));
            // Per pod, how long the gate held the app's start for the
            // proxy: the proxy's share of the critical path.
            rows.push((
                format!("{label}: sidetunnel app start held for the proxy (`ready` − `app_start`)"),
                None,
                Self::column(set, SIDETUNNEL, |s| {
                    Some(
                        s.phases
                            .get("ready")?
                            .saturating_sub(*s.phases.get("app_start")?),
                    )
                }),
            ));
            if label == "sequential" {
                for phase in SHIM_PHASES
                    .iter()
                    .copied()
                    .chain(["certificate", "first_xds"])
                {
                    rows.push((
                        format!("  sidetunnel phase `{phase}` (from RunPodSandbox)"),
                        None,
                        Self::column(set, SIDETUNNEL, |s| s.phases.get(phase).copied()),
                    ));
                }
            }
        }
        rows
    }

    fn markdown(&self) -> String {
        let f = |s: Option<Stats>| match s {
            Some((m, p, x)) => format!("{m:.1} / {p:.1} / {x:.1}"),
            None => "–".into(),
        };
        let mut md = String::new();
        let _ = writeln!(
            md,
            "### Pod start: runc vs sidetunnel (one containerd, same run)\n"
        );
        let _ = writeln!(
            md,
            "containerd: {} · binaries: {} · load: {}\n",
            self.containerd,
            self.binaries.display(),
            self.load.trim()
        );
        let _ = writeln!(
            md,
            "| measure (ms: median / p90 / max) | runc | sidetunnel | added (median) |\n| --- | --- | --- | --- |"
        );
        for (label, r, s) in self.rows() {
            let added = match (r, s) {
                (Some(r), Some(s)) => format!("{:+.1}", s.0 - r.0),
                _ => "–".into(),
            };
            let _ = writeln!(md, "| {label} | {} | {} | {added} |", f(r), f(s));
        }
        if !self.cost.is_empty() {
            let _ = writeln!(
                md,
                "\n#### Per-pod cost, idle pod with its app running (MiB)\n\n| handler | process | RSS | PSS |\n| --- | --- | --- | --- |"
            );
            let mib = |k: u64| k as f64 / 1024.0;
            for c in &self.cost {
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.1} | {:.1} |",
                    c.handler,
                    c.process,
                    mib(c.rss_kib),
                    mib(c.pss_kib)
                );
            }
            for handler in [RUNC, SIDETUNNEL] {
                let (rss, pss) = self
                    .cost
                    .iter()
                    .filter(|c| c.handler == handler)
                    .fold((0, 0), |(r, p), c| (r + c.rss_kib, p + c.pss_kib));
                let _ = writeln!(
                    md,
                    "| {handler} | **total** | {:.1} | {:.1} |",
                    mib(rss),
                    mib(pss)
                );
            }
        }
        md
    }

    fn json(&self) -> Value {
        let j = |s: Option<Stats>| match s {
            Some((m, p, x)) => json!({"median_ms": m, "p90_ms": p, "max_ms": x}),
            None => Value::Null,
        };
        let rows: Vec<Value> = self
            .rows()
            .into_iter()
            .map(|(label, r, s)| json!({"measure": label.trim(), "runc": j(r), "sidetunnel": j(s)}))
            .collect();
        let cost: Vec<Value> = self
            .cost
            .iter()
            .map(|c| json!({"handler": c.handler, "process": c.process, "rss_kib": c.rss_kib, "pss_kib": c.pss_kib}))
            .collect();
        json!({
            "cost": cost,
            "meta": {
                "containerd": self.containerd,
                "binaries": self.binaries,
                "loadavg": self.load.trim(),
            },
            "rows": rows,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_median_p90_max() {
        let v: Vec<Duration> = (1..=10).map(Duration::from_millis).collect();
        let (m, p, x) = stats(v).unwrap();
        assert_eq!((m.round(), p.round(), x.round()), (6.0, 9.0, 10.0));
        assert!(stats(Vec::new()).is_none());
    }

    #[test]
    fn reads_the_proxys_ready_line() {
        let dir = tempfile_dir();
        let log = dir.join("0.log");
        std::fs::write(
            &log,
            "2026-12-06T10:00:00.1Z stderr F INFO netproxy: starting\n\
             2026-12-06T10:00:00.2Z stderr F INFO netproxy::proxy::app: ready ready_ms=\"12.5\" certificate_ms=\"7.5\" config_ms=\"12.5\"\n",
        )
        .unwrap();
        let (cert, xds) = proxy_ready(&log).unwrap();
        assert_eq!(cert, Duration::from_micros(7500));
        assert_eq!(xds, Duration::from_micros(12500));
        assert!(proxy_ready(&dir.join("absent")).is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("podstart-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
