//! `cargo xtask bench xds` (issue 6): builds release binaries, generates the
//! study's three scenarios, serves each with a real `sidetunnel-meshd`,
//! measures real xDS clients (netproxy's `xds_probe` example: one process
//! per client, wildcard and scoped with 1/10/50 destinations) and the real
//! `sidetunnel-proxy`'s memory after sync (`proxy`, as root), times decode
//! and apply on one core, applies the per-object cost model for cluster
//! totals and the spread over all pods, and prints per scenario a Markdown
//! table in the study's shape plus one JSON line (also written to
//! `target/bench/xds.json`).
//!
//! `cargo xtask bench dns` (`dns`) measures the in-pod DNS proxy.
//!
//! This module runs the measurements; `meshd` is the control-plane process,
//! `proxy` the real proxy's memory, `report` the tables, `projection` the
//! extrapolation to 50,000 pods.

mod dns;
mod meshd;
mod podstart;
mod projection;
mod proxy;
mod report;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sidetunnel_meshd::scale::{self, Scenario};

use crate::workspace::{git_head, target_dir};
use meshd::Meshd;
use projection::project;
use report::{markdown, num};

#[derive(clap::Subcommand)]
pub enum BenchTask {
    /// Per-proxy xDS bytes, apply times, RSS and cluster totals (A, B, C).
    Xds {
        /// Scenarios to run.
        #[arg(long, value_delimiter = ',', default_value = "A,B,C")]
        scenarios: Vec<String>,
        /// Destination counts of the scoped rows.
        #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
        k: Vec<usize>,
        /// meshd's serving mode: `istiod` (every policy to every proxy, as
        /// istiod does) or `extended` (uid-scoped Authorization).
        #[arg(long, default_value = "istiod")]
        meshd_mode: sidetunnel_meshd::mode::Mode,
    },
    /// Data path through two proxies vs direct (issue 7): throughput,
    /// latency, CPU, memory, start → ready.
    Dataplane(crate::bench_dataplane::Args),
    /// Pod start, runc vs sidetunnel on one containerd (issue 19):
    /// sequential and burst, with the sidetunnel phases.
    Podstart(podstart::Args),
    /// DNS proxy latency (issue 21): a cached mesh name, an on-demand name,
    /// a forwarded name, and the resolver alone, in one run.
    Dns(dns::Args),
}

/// Destinations per pod in the cluster totals (the reference pod).
const CLUSTER_K: usize = 10;

pub fn run(task: BenchTask) -> Result<()> {
    match task {
        BenchTask::Xds {
            scenarios,
            k,
            meshd_mode,
        } => xds(&scenarios, &k, meshd_mode),
        BenchTask::Dataplane(args) => crate::bench_dataplane::run(&args),
        BenchTask::Podstart(args) => podstart::run(&args),
        BenchTask::Dns(args) => dns::run(&args),
    }
}

/// The suite's smoke of the pod start bench: a few pods of each handler on
/// the debug build, so the bench keeps working between runs of record.
/// Outside CI without root it is skipped with the reason.
pub fn run_podstart_smoke() -> Result<()> {
    if !nix::unistd::geteuid().is_root() && !sidetunnel_tests::prereq::in_ci() {
        eprintln!("SKIP pod start bench smoke: needs root");
        return Ok(());
    }
    podstart::run(&podstart::Args::quick())
}

struct Paths {
    meshd: PathBuf,
    /// `sidetunnel-meshd serve --mode`.
    mode: sidetunnel_meshd::mode::Mode,
    probe: PathBuf,
    /// `None` when the proxy cannot run here (the reason is printed).
    proxy: Option<PathBuf>,
    work: PathBuf,
}

fn xds(names: &[String], ks: &[usize], mode: sidetunnel_meshd::mode::Mode) -> Result<()> {
    let scenarios = names
        .iter()
        .map(|n| Scenario::by_name(n).with_context(|| format!("unknown scenario {n:?} (A, B, C)")))
        .collect::<Result<Vec<_>>>()?;
    // The shipped (static) binaries, and the probe built the same way.
    let bins = crate::dist::build(&["netproxy:xds_probe".to_string()])?;
    let proxy_missing = proxy::unavailable();
    if let Some(why) = proxy_missing {
        eprintln!("(not measuring sidetunnel-proxy's memory: {why})");
    }
    let target = target_dir();
    let paths = Paths {
        meshd: bins.join("sidetunnel-meshd"),
        mode,
        probe: bins.join("examples/xds_probe"),
        proxy: proxy_missing
            .is_none()
            .then(|| bins.join("sidetunnel-proxy")),
        work: target.join("bench/xds"),
    };
    let mut results = Vec::new();
    for sc in scenarios {
        crate::step(&format!(
            "scenario {}: {} services / {} pods",
            sc.name, sc.services, sc.pods
        ));
        let r = scenario(&paths, &sc, ks)?;
        print!("{}", markdown(&sc, &r)?);
        results.push(r);
    }
    let projection = results
        .iter()
        .find(|r| r["scenario"] == json!("C"))
        .map(project)
        .transpose()?;
    if let Some((md, _)) = &projection {
        print!("{md}");
    }
    let line = json!({
        "bench": "xds",
        "commit": git_head(),
        "scenarios": results,
        "projection_50k": projection.map(|(_, v)| v),
    });
    let out = target.join("bench/xds.json");
    std::fs::write(&out, format!("{line}\n"))
        .with_context(|| format!("writing {}", out.display()))?;
    println!("{line}");
    eprintln!("(JSON also in {})", out.display());
    Ok(())
}

/// Everything measured for one scenario, as JSON.
fn scenario(p: &Paths, sc: &Scenario, ks: &[usize]) -> Result<Value> {
    let dir = p.work.join(sc.name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cleaning {}", dir.display()))?;
    }
    let state = dir.join("state");
    std::fs::create_dir_all(&dir)?;
    output(Command::new(&p.meshd).arg("init").arg("--dir").arg(&state))?;
    let inventory = dir.join("inventory.yaml");
    let yaml = output(Command::new(&p.meshd).args([
        "generate",
        "--services",
        &sc.services.to_string(),
        "--pods",
        &sc.pods.to_string(),
        "--seed",
        &scale::SEED.to_string(),
    ]))?;
    std::fs::write(&inventory, yaml)?;
    let inv = inventory.to_string_lossy().to_string();

    let ks_arg = ks
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut model = probe(Command::new(&p.probe).args([
        "model",
        "--inventory",
        &inv,
        // The pod whose scoped config (10 destinations) is the median.
        "--pod",
        "median",
        "--k",
        &ks_arg,
        "--cluster-k",
        &CLUSTER_K.to_string(),
        "--meshd-mode",
        p.mode.as_str(),
    ]))?;
    let who = model["pod"].clone();
    let field = |k: &str| -> Result<String> {
        who[k]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("model pod has no {k}: {who}"))
    };
    let (uid, name, ns, sa) = (
        field("uid")?,
        field("name")?,
        field("namespace")?,
        field("service_account")?,
    );
    let token = output(
        Command::new(&p.meshd)
            .arg("token")
            .arg("--dir")
            .arg(&state)
            .args([
                "--namespace",
                &ns,
                "--service-account",
                &sa,
                "--pod-name",
                &name,
                "--pod-uid",
                &uid,
            ]),
    )?;
    let token_file = dir.join("token");
    std::fs::write(&token_file, token.trim())?;

    let mut serve = Command::new(&p.meshd);
    serve
        .arg("serve")
        .arg("--dir")
        .arg(&state)
        .arg("--inventory")
        .arg(&inventory)
        .args(["--listen", "127.0.0.1:0", "--mode", p.mode.as_str()])
        .env("RUST_LOG", "warn");
    let meshd = Meshd::start(serve, &dir.join("meshd.log"))?;
    let url = format!("https://{}", meshd.addr);
    let sync = |mode: &str, dests: &[String]| -> Result<Value> {
        let mut c = Command::new(&p.probe);
        c.args(["sync", "--xds", &url, "--mode", mode]);
        c.arg("--root-cert").arg(state.join("root-cert.pem"));
        c.arg("--token-file").arg(&token_file);
        c.args(["--uid", &uid, "--name", &name, "--namespace", &ns]);
        c.args(["--service-account", &sa, "--node", &field("node")?]);
        for ip in who["ips"].as_array().into_iter().flatten() {
            c.args(["--ip", ip.as_str().unwrap_or_default()]);
        }
        if !dests.is_empty() {
            c.args(["--dest", &dests.join(",")]);
        }
        probe(&mut c)
    };
    let mut wildcard = sync("wildcard", &[])?;
    strip_lists(&mut wildcard);
    let mut scoped = Vec::new();
    let mut proxy_scoped = None;
    for m in model["scoped"].as_array_mut().into_iter().flatten() {
        let dests: Vec<String> = serde_json::from_value(m["dests"].clone())?;
        let mut s = sync("scoped", &dests)?;
        // Scoped mode must hold exactly the pod's needs (the model's set).
        if s["held_addresses"] != m["addresses"] || s["held_policies"] != m["policies"] {
            bail!(
                "scoped proxy (k={}) does not hold exactly the model's set:\nheld {} {}\nmodel {} {}",
                m["k"],
                s["held_addresses"],
                s["held_policies"],
                m["addresses"],
                m["policies"]
            );
        }
        s["model_bytes"] = m["bytes"].clone();
        if m["k"] == json!(CLUSTER_K) {
            proxy_scoped = Some(proxy::Want::Scoped {
                dests,
                addresses: serde_json::from_value(m["addresses"].clone())?,
                policies: serde_json::from_value(m["policies"].clone())?,
            });
        }
        strip_lists(&mut s);
        strip_lists(m);
        scoped.push(s);
    }
    drop(meshd);
    let apply = probe(Command::new(&p.probe).args(["apply", "--inventory", &inv]))?;
    let mut proxies = Vec::new();
    if let Some(bin) = &p.proxy {
        let setup = proxy::Setup {
            proxy: bin,
            meshd: &p.meshd,
            mode: p.mode,
            state: &state,
            inventory: &inventory,
            token: &token_file,
            dir: &dir,
        };
        let pod = proxy::Pod {
            name: name.clone(),
            namespace: ns.clone(),
            service_account: sa.clone(),
            node: field("node")?,
            ips: serde_json::from_value(who["ips"].clone())?,
        };
        let full = &model["counts"];
        let wildcard = proxy::Want::Wildcard {
            workloads: num(&full["workloads"], "workloads")? as usize,
            services: num(&full["services"], "services")? as usize,
        };
        proxies.push(proxy::measure(&setup, &pod, &wildcard, "wildcard")?);
        if let Some(want) = &proxy_scoped {
            proxies.push(proxy::measure(&setup, &pod, want, "scoped")?);
        }
    }
    let study = scale::study(sc.name).context("study row")?;
    Ok(json!({
        "scenario": sc.name,
        "services": sc.services,
        "pods": sc.pods,
        "study": study,
        "wildcard": wildcard,
        "scoped": scoped,
        "model": model,
        "apply": apply,
        "proxy": proxies,
    }))
}

/// Replaces the resource-name lists (checked already) by their lengths, so
/// the JSON line stays small.
fn strip_lists(v: &mut Value) {
    if let Some(o) = v.as_object_mut() {
        for k in [
            "held_addresses",
            "held_policies",
            "addresses",
            "policies",
            "dests",
        ] {
            if let Some(Value::Array(a)) = o.get(k) {
                let n = a.len();
                o.insert(k.to_string(), json!(n));
            }
        }
    }
}

fn output(c: &mut Command) -> Result<String> {
    let out = c
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {c:?}"))?;
    if !out.status.success() {
        bail!(
            "{c:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn probe(c: &mut Command) -> Result<Value> {
    let out = output(c)?;
    serde_json::from_str(out.trim()).with_context(|| format!("probe printed {out:?}"))
}
