//! `cargo xtask bench xds` (issue 6): builds release binaries, generates the
//! study's three scenarios, serves each with a real `sidetunnel-meshd`,
//! measures real xDS clients (netproxy's `xds_probe` example: one process
//! per client, wildcard and scoped with 1/10/50 destinations) and the real
//! `sidetunnel-proxy`'s memory after sync (`proxy`, as root), times decode
//! and apply on one core, applies the per-object cost model for cluster
//! totals and the spread over all pods, and prints per scenario a Markdown
//! table in the study's shape plus one JSON line (also written to
//! `target/bench/xds.json`).

mod podstart;
mod proxy;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sidetunnel_meshd::scale::{self, Scenario, StudyRow};

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
}

/// Destinations per pod in the cluster totals (the reference pod).
const CLUSTER_K: usize = 10;
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(60);

pub fn run(task: BenchTask) -> Result<()> {
    match task {
        BenchTask::Xds {
            scenarios,
            k,
            meshd_mode,
        } => xds(&scenarios, &k, meshd_mode),
        BenchTask::Dataplane(args) => crate::bench_dataplane::run(&args),
        BenchTask::Podstart(args) => podstart::run(&args),
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

pub(crate) fn target_dir() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    dir.canonicalize().unwrap_or(dir)
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

pub(crate) fn git_head() -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
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

/// A `sidetunnel-meshd serve` process, stopped on drop.
struct Meshd {
    child: Child,
    addr: String,
}

impl Meshd {
    /// Starts `serve` (a `sidetunnel-meshd serve --listen 127.0.0.1:0`
    /// command) and waits for the address it announces.
    fn start(mut serve: Command, log: &Path) -> Result<Meshd> {
        let mut child = serve
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .with_context(|| format!("starting {serve:?}"))?;
        let stdout = child.stdout.take().context("meshd stdout")?;
        let announced = sidetunnel_tests::mesh::meshd_listen_addr(stdout, ANNOUNCE_TIMEOUT);
        let mut meshd = Meshd {
            child,
            addr: String::new(),
        };
        match announced {
            Ok(a) => {
                meshd.addr = a.to_string();
                Ok(meshd)
            }
            // Dropping `meshd` stops the process.
            Err(line) => bail!(
                "sidetunnel-meshd did not start (stdout {line:?}); see {}",
                log.display()
            ),
        }
    }
}

impl Drop for Meshd {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// Bytes with the study's units (kB = 1000 B).
fn bytes(n: f64) -> String {
    match n {
        n if n >= 1e9 => format!("{:.2} GB", n / 1e9),
        n if n >= 1e6 => format!("{:.2} MB", n / 1e6),
        n if n >= 1e3 => format!("{:.1} kB", n / 1e3),
        n => format!("{n:.0} B"),
    }
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "–".to_string(), |n| bytes(n as f64))
}

fn num(v: &Value, what: &str) -> Result<f64> {
    v.as_f64().with_context(|| format!("{what} missing in {v}"))
}

fn study_row(name: &str, r: &StudyRow) -> String {
    format!(
        "| {name} | {} | {} | {} | {} | {} | {} |\n",
        opt(r.wds),
        opt(r.cds),
        opt(r.eds),
        opt(r.lds),
        opt(r.rds),
        bytes(r.total as f64)
    )
}

fn markdown(sc: &Scenario, r: &Value) -> Result<String> {
    let study = scale::study(sc.name).context("study row")?;
    let mut md = String::new();
    let pods = sc.pods as f64;
    writeln!(
        md,
        "\n### Scenario {}: {} services / {} pods\n",
        sc.name, sc.services, sc.pods
    )?;
    md.push_str("| bytes per proxy | WDS | CDS | EDS | LDS | RDS | total |\n");
    md.push_str("| --- | --- | --- | --- | --- | --- | --- |\n");
    md.push_str(&study_row("Envoy sidecar (study)", &study.envoy_sidecar));
    md.push_str(&study_row(
        "ztunnel sidecar (study)",
        &study.ztunnel_sidecar,
    ));
    let row = |label: String, v: &Value| -> Result<String> {
        Ok(format!(
            "| {label} | {} | – | – | – | – | {} |\n",
            bytes(num(&v["address_bytes"], "address_bytes")?),
            bytes(num(&v["bytes"], "bytes")?)
        ))
    };
    let w = &r["wildcard"];
    md.push_str(&row("sidetunnel, full WDS (wildcard)".into(), w)?);
    for s in r["scoped"].as_array().into_iter().flatten() {
        let k = num(&s["k"], "k")?;
        md.push_str(&row(
            format!(
                "sidetunnel, scoped: pod → {k} service{}",
                if k == 1.0 { "" } else { "s" }
            ),
            s,
        )?);
    }
    md.push_str("\n(sidetunnel totals include the Authorization resources; WDS = Address.)\n\n");
    md.push_str(&spread_table(r, sc.pods)?);

    let full = num(&w["address_bytes"], "address_bytes")?;
    let scoped10 = r["scoped"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["k"] == json!(CLUSTER_K));
    let a = &r["apply"];
    let m = &r["model"]["cluster"];
    md.push_str("| measure | value |\n| --- | --- |\n");
    let mut line = |k: &str, v: String| writeln!(md, "| {k} | {v} |");
    if let Some(s) = scoped10 {
        let b = num(&s["bytes"], "bytes")?;
        line(
            "scoped config (pod → 10 services) / full WDS, bench pod",
            format!("{:.2} % ({} / {})", 100.0 * b / full, bytes(b), bytes(full)),
        )?;
    }
    let mean = r["model"]["spread"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["k"] == json!(CLUSTER_K))
        .map(|s| num(&s["mean"], "mean"))
        .transpose()?;
    if let Some(mean) = mean {
        line(
            "scoped config (pod → 10 services) / full WDS, mean over all pods",
            format!(
                "{:.2} % ({} / {})",
                100.0 * mean / full,
                bytes(mean),
                bytes(full)
            ),
        )?;
    }
    line(
        "decode + apply full snapshot, one core (median)",
        format!("{:.1} ms", num(&a["full_apply_ms_median"], "full apply")?),
    )?;
    line(
        "decode + apply one incremental update (median)",
        format!("{:.1} µs", num(&a["update_apply_us_median"], "update")?),
    )?;
    let rss = |v: &Value| -> Result<String> {
        Ok(format!(
            "{:.1} MB: heap+stacks {:.2} MB (before connecting {:.2} MB), binary's pages {:.1} MB",
            num(&v["rss_kb"], "rss")? / 1024.0,
            num(&v["rss_anon_kb"], "rss")? / 1024.0,
            num(&v["rss_anon_start_kb"], "rss")? / 1024.0,
            num(&v["rss_file_kb"], "rss")? / 1024.0,
        ))
    };
    line("xds_probe RSS after sync, full config", rss(w)?)?;
    if let Some(s) = scoped10 {
        line("xds_probe RSS after sync, scoped (10 services)", rss(s)?)?;
    }
    for p in r["proxy"].as_array().into_iter().flatten() {
        let what = if p["mode"] == json!("wildcard") {
            "full config (wildcard)".to_string()
        } else {
            format!("scoped, on-demand ({} services prefetched)", p["k"])
        };
        line(
            &format!("sidetunnel-proxy (release) RSS after sync, {what}"),
            format!(
                "{:.1} MB: RssAnon {:.2} MB, RssFile {:.2} MB ({} threads; received {}: {} workloads, {} services, {} policies)",
                num(&p["rss_kb"], "rss")? / 1024.0,
                num(&p["rss_anon_kb"], "rss")? / 1024.0,
                num(&p["rss_file_kb"], "rss")? / 1024.0,
                p["threads"],
                bytes(num(&p["bytes"], "bytes")?),
                p["workloads"],
                p["services"],
                p["policies"],
            ),
        )?;
    }
    line(
        "cluster: one full sync of all pods, Envoy sidecar (study)",
        bytes(study.envoy_sidecar.total as f64 * pods),
    )?;
    line(
        "cluster: one full sync of all pods, ztunnel sidecar (study)",
        bytes(study.ztunnel_sidecar.total as f64 * pods),
    )?;
    line(
        "cluster: one full sync of all pods, sidetunnel wildcard",
        bytes(num(&m["full_sync_wildcard"], "full sync")?),
    )?;
    line(
        "cluster: one full sync of all pods, sidetunnel scoped (each pod → 10 services)",
        bytes(num(&m["full_sync_scoped"], "scoped sync")?),
    )?;
    let churned = num(&m["churned_pods"], "churned")?;
    line(
        &format!("cluster: pushed when 1% of pods ({churned}) are replaced, wildcard"),
        bytes(num(&m["churn_push_wildcard"], "churn")?),
    )?;
    line(
        &format!("cluster: pushed when 1% of pods ({churned}) are replaced, scoped"),
        format!(
            "{} (to {} of {} proxies)",
            bytes(num(&m["churn_push_scoped"], "churn")?),
            m["churn_receivers_scoped"],
            sc.pods
        ),
    )?;
    Ok(md)
}

/// How scoped bytes spread over all pods (the model's `spread`), with the
/// bench pod's own bytes and rank.
fn spread_table(r: &Value, pods: usize) -> Result<String> {
    let mut md = String::new();
    let pod = &r["model"]["pod"]["index"];
    writeln!(
        md,
        "| scoped config over all {pods} pods | bench pod (no. {pod}) | rank | min | p10 | median | mean | p90 | max |"
    )?;
    md.push_str("| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for s in r["model"]["spread"].as_array().into_iter().flatten() {
        let Some(mine) = r["model"]["scoped"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["k"] == s["k"])
        else {
            continue;
        };
        let b = |k: &str| -> Result<String> { Ok(bytes(num(&s[k], k)?)) };
        writeln!(
            md,
            "| pod → {} service{} | {} | {} of {pods} below | {} | {} | {} | {} | {} | {} |",
            s["k"],
            if s["k"] == json!(1) { "" } else { "s" },
            bytes(num(&mine["bytes"], "bytes")?),
            mine["pods_below"],
            b("min")?,
            b("p10")?,
            b("median")?,
            b("mean")?,
            b("p90")?,
            b("max")?,
        )?;
    }
    md.push('\n');
    Ok(md)
}

/// Target of the paper projection.
const PROJECT_PODS: f64 = 50_000.0;
const PROJECT_SERVICES: f64 = 10_000.0;

/// Paper projection to 50,000 pods / 10,000 services from scenario C's
/// measured per-object costs (same shape: 5 pods per service, policies in
/// proportion to services, each pod talking to 10 services drawn
/// uniformly, so each service has pods × 10 / services subscribers).
fn project(c: &Value) -> Result<(String, Value)> {
    let o = &c["model"]["per_object"];
    let w = num(&o["workload"], "workload")?;
    let s = num(&o["service"], "service")?;
    let p = num(&o["policy"], "policy")?;
    let ea = num(&o["address_envelope"], "envelope")?;
    let ez = num(&o["authorization_envelope"], "envelope")?;
    let removal = num(&o["workload_removal"], "removal")?;
    let scale_up = PROJECT_SERVICES / num(&c["services"], "services")?;
    let policies = num(&o["policies"], "policies")? * scale_up;
    let pods_per_service = PROJECT_PODS / PROJECT_SERVICES;
    let k = CLUSTER_K as f64;
    let scoped10 = c["scoped"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["k"] == json!(CLUSTER_K))
        .context("no scoped row with 10 services in scenario C")?;
    let own_policies = num(&scoped10["policies"], "policies")?;

    let full = ea + PROJECT_PODS * w + PROJECT_SERVICES * s + ez + policies * p;
    let scoped = w + k * (s + pods_per_service * w) + own_policies * p + (1.0 + k) * ea + ez;
    let churned = PROJECT_PODS / 100.0;
    let one = 2.0 * ea + removal + w;
    let subscribers = PROJECT_PODS * k / PROJECT_SERVICES;
    let study = scale::study("C").context("study row")?;
    let v = json!({
        "pods": PROJECT_PODS,
        "services": PROJECT_SERVICES,
        "full_bytes_per_proxy": full,
        "scoped_bytes_per_proxy": scoped,
        "full_sync_wildcard": full * PROJECT_PODS,
        "full_sync_scoped": scoped * PROJECT_PODS,
        "churn_push_wildcard": churned * one * (PROJECT_PODS - 1.0),
        "churn_push_scoped": churned * one * subscribers,
        "envoy_sidecar_linear": study.envoy_sidecar.total as f64 * scale_up,
        "ztunnel_sidecar_linear": study.ztunnel_sidecar.total as f64 * scale_up,
    });
    let mut md = String::new();
    writeln!(
        md,
        "\n### Paper projection: {PROJECT_PODS:.0} pods / {PROJECT_SERVICES:.0} services (from scenario C's per-object costs)\n"
    )?;
    md.push_str("| | per proxy | one full sync, all pods | pushed when 1% of pods are replaced |\n| --- | --- | --- | --- |\n");
    let row = |md: &mut String, name: &str, per: f64, churn: Option<f64>| {
        writeln!(
            md,
            "| {name} | {} | {} | {} |",
            bytes(per),
            bytes(per * PROJECT_PODS),
            churn.map_or_else(|| "–".to_string(), bytes)
        )
    };
    row(
        &mut md,
        "Envoy sidecar (study ×10, linear)",
        num(&v["envoy_sidecar_linear"], "envoy")?,
        None,
    )?;
    row(
        &mut md,
        "ztunnel sidecar (study ×10, linear)",
        num(&v["ztunnel_sidecar_linear"], "ztunnel")?,
        None,
    )?;
    row(
        &mut md,
        "sidetunnel wildcard",
        full,
        Some(num(&v["churn_push_wildcard"], "churn")?),
    )?;
    row(
        &mut md,
        "sidetunnel scoped (pod → 10 services)",
        scoped,
        Some(num(&v["churn_push_scoped"], "churn")?),
    )?;
    writeln!(
        md,
        "\nPer object (scenario C, bytes inside a response): workload {w:.0}, service {s:.0}, policy {p:.0}, workload removal {removal:.0}, response envelope {ea:.0}."
    )?;
    Ok((md, v))
}
