//! Kubernetes' CRI conformance suite (critest, kubernetes-sigs/cri-tools)
//! against the harness containerd, once with `--runtime-handler runc` and
//! once with `--runtime-handler sidetunnel`, whose pods run the real proxy
//! configured by a real meshd (identity from a minted service-account
//! token, a certificate from meshd's CA, xDS). The images critest pulls are
//! built offline and served by a local registry through containerd's
//! registry host configuration. Every spec that passes with runc must pass
//! with sidetunnel.
//!
//! Runs when `SIDETUNNEL_CRITEST` names a critest binary (e.g. cri-tools
//! v1.36.0); otherwise it prints why and passes, under CI too.
//! `SIDETUNNEL_CRITEST_FOCUS` narrows the run (a ginkgo focus regexp),
//! `SIDETUNNEL_CRITEST_OUT` keeps the reports and logs in that directory.

mod shim_support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use shim_support::{Cluster, prerequisites};
use sidetunnel_meshd::inventory::model::{Inventory, Workload};
use sidetunnel_tests::containerd::{Options, RUNC, SIDETUNNEL};
use sidetunnel_tests::cri::{Cri, api};
use sidetunnel_tests::critest::front::{Front, Kubelet};
use sidetunnel_tests::critest::registry::{REGISTRY_BIN, Registry};
use sidetunnel_tests::critest::report::Results;
use sidetunnel_tests::critest::{images, registry};
use sidetunnel_tests::mesh::{self, TokenMinter};
use sidetunnel_tests::prereq;

/// Bound on one critest run (one handler).
const RUN_LIMIT: Duration = Duration::from_secs(40 * 60);

/// Specs not run with either handler, each with the reason (documented in
/// docs/compatibility.md). Empty: every spec runs.
const SKIPPED: &[(&str, &str)] = &[];

/// Specs that pass with runc but cannot pass with a mesh proxy in the pod,
/// with the reason. Target: none.
const EXPECTED_DIFFERENCES: &[(&str, &str)] = &[];

/// Service account of critest's pods (every Kubernetes pod has one).
const SERVICE_ACCOUNT: &str = "default";

/// What the kubelet does around RunPodSandbox for a meshed node: mounts the
/// pod's service-account token before it, and (playing the control plane's
/// pod watch) publishes the pod as a workload once it has an IP.
struct NodeAgent {
    minter: TokenMinter,
    cri_socket: PathBuf,
    inventory: PathBuf,
    workloads: Arc<Mutex<Vec<Workload>>>,
    /// The shim's state root: sidetunnel pods have a record there.
    state_root: PathBuf,
    /// Meshed pods started, and those whose proxy got its own workload
    /// from meshd over xDS (a stream authenticated with the pod's token).
    meshed: Arc<AtomicUsize>,
    configured: Arc<AtomicUsize>,
}

impl Kubelet for NodeAgent {
    fn before_run(&self, pod: &api::PodSandboxMetadata) -> Result<()> {
        self.minter
            .mint(&pod.namespace, &pod.name, &pod.uid, SERVICE_ACCOUNT)
            .map(drop)
    }

    fn after_run(&self, pod: &api::PodSandboxMetadata, sandbox_id: &str) {
        let (socket, inventory, workloads) = (
            self.cri_socket.clone(),
            self.inventory.clone(),
            self.workloads.clone(),
        );
        let (pod, id) = (pod.clone(), sandbox_id.to_owned());
        let meshed = self.state_root.join(&id).join("shim.json").exists();
        if meshed {
            self.meshed.fetch_add(1, Ordering::Relaxed);
            let (root, configured) = (self.state_root.clone(), self.configured.clone());
            let (ns, name, id) = (pod.namespace.clone(), pod.name.clone(), id.clone());
            tokio::spawn(async move {
                let limit = Duration::from_secs(30);
                if mesh::wait_workload_known(&root, &id, &ns, &name, limit)
                    .await
                    .is_ok()
                {
                    configured.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        tokio::spawn(async move {
            let ip = match Cri::connect(&socket).await {
                Ok(mut cri) => cri.pod_ip(&id).await.ok(),
                Err(_) => None,
            };
            let Some(ip) = ip.filter(|ip| !ip.is_empty()) else {
                return; // host network: not a mesh workload
            };
            let yaml = {
                let mut ws = workloads.lock().unwrap();
                ws.push(Workload {
                    name: pod.name.clone(),
                    namespace: pod.namespace.clone(),
                    service_account: Some(SERVICE_ACCOUNT.into()),
                    addresses: vec![ip],
                    workload_type: Some("pod".into()),
                    labels: [("app".to_string(), "critest".to_string())].into(),
                    ..Default::default()
                });
                serde_json::to_string_pretty(&Inventory {
                    workloads: ws.clone(),
                    ..Default::default()
                })
                .unwrap_or_default()
            };
            let tmp = inventory.with_extension("yaml.critest");
            if std::fs::write(&tmp, yaml).is_ok() {
                let _ = std::fs::rename(&tmp, &inventory);
            }
        });
    }
}

/// One critest run; returns its per-spec results.
async fn run_critest(critest: &Path, socket: &Path, handler: &str, out: &Path) -> Result<Results> {
    let report = out.join(format!("critest-{handler}.json"));
    let log = out.join(format!("critest-{handler}.log"));
    let _ = std::fs::remove_file(&report);
    let endpoint = format!("unix://{}", socket.display());
    let mut cmd = Command::new(critest);
    cmd.args([
        "--runtime-endpoint",
        &endpoint,
        "--image-endpoint",
        &endpoint,
    ])
    .args(["--runtime-handler", handler])
    .arg(format!("-ginkgo.json-report={}", report.display()))
    .args(["-ginkgo.no-color", "-ginkgo.timeout=40m"])
    .current_dir(out)
    .stdin(Stdio::null())
    .stdout(std::fs::File::create(&log)?)
    .stderr(std::fs::File::create(log.with_extension("stderr"))?);
    if let Ok(focus) = std::env::var("SIDETUNNEL_CRITEST_FOCUS") {
        cmd.arg(format!("-ginkgo.focus={focus}"));
    }
    let skip: Vec<&str> = SKIPPED.iter().map(|(s, _)| *s).collect();
    if !skip.is_empty() {
        cmd.arg(format!("-ginkgo.skip={}", skip.join("|")));
    }
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("running {}", critest.display()))?;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if started.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "critest ({handler}) exceeded {RUN_LIMIT:?}; log {}",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let results = Results::load(&report)
        .with_context(|| format!("critest ({handler}) exited {status}; log {}", log.display()))?;
    eprintln!(
        "critest --runtime-handler {handler}: {} in {:?} (exit {status})",
        results.counts(),
        started.elapsed()
    );
    for name in results.with_state("failed") {
        eprintln!(
            "  FAILED [{handler}] {name}: {}",
            first_line(&results.0[name].1)
        );
    }
    Ok(results)
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn critest_passes_with_sidetunnel_as_with_runc() -> Result<()> {
    const TEST: &str = "critest";
    let Some(critest) = std::env::var_os("SIDETUNNEL_CRITEST").map(PathBuf::from) else {
        eprintln!(
            "SKIP {TEST}: SIDETUNNEL_CRITEST is not set (path of a critest binary, \
             cri-tools v1.36.0 or later)"
        );
        return Ok(());
    };
    if !prerequisites(TEST)
        || !prereq::binary(TEST, &critest.to_string_lossy())
        || !prereq::binary(TEST, REGISTRY_BIN)
        || !prereq::binary(TEST, "/usr/lib/cni/portmap")
        || !prereq::binary(TEST, "iptables")
    {
        return Ok(());
    }
    let keep = std::env::var_os("SIDETUNNEL_CRITEST_OUT").map(PathBuf::from);
    let tmp = tempfile::Builder::new().prefix("st-critest-").tempdir()?;
    let out = keep.clone().unwrap_or_else(|| tmp.path().to_owned());
    std::fs::create_dir_all(&out)?;

    let started = Instant::now();
    let reg = Registry::start()?;
    let hosts = reg.write_hosts(&tmp.path().join("certs.d"))?;
    let c = Cluster::start_with(
        "",
        Options {
            registry_config_path: Some(hosts),
            ..Default::default()
        },
    )
    .await?;
    let defs = images::all()?;
    let socket = c.h.socket().to_owned();
    reg.push_all(&socket, &defs, &tmp.path().join("images"))?;
    eprintln!(
        "critest: {} images pushed to the registry on {} ({}), cluster ready in {:?}",
        defs.len(),
        reg.addr(),
        registry::UPSTREAMS.join(", "),
        started.elapsed()
    );

    let (meshed, configured) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let agent = NodeAgent {
        minter: c.mesh.minter(),
        cri_socket: socket.clone(),
        inventory: c.mesh.inventory_path(),
        workloads: Arc::new(Mutex::new(Vec::new())),
        state_root: c.state_root.clone(),
        meshed: meshed.clone(),
        configured: configured.clone(),
    };
    let front = Front::start(
        &tmp.path().join("kubelet-cri.sock"),
        &socket,
        Arc::new(agent),
    )?;

    let mut results = Vec::new();
    for handler in [RUNC, SIDETUNNEL] {
        match run_critest(&critest, front.socket(), handler, &out).await {
            Ok(r) => results.push(r),
            Err(e) => {
                c.dump_logs();
                return Err(e);
            }
        }
    }
    let (runc, st) = (&results[0], &results[1]);
    let passed = |r: &Results| -> BTreeSet<String> {
        r.with_state("passed")
            .into_iter()
            .map(str::to_owned)
            .collect()
    };
    let (runc_pass, st_pass) = (passed(runc), passed(st));
    let expected: BTreeSet<&str> = EXPECTED_DIFFERENCES.iter().map(|(s, _)| *s).collect();
    let missing: Vec<&String> = runc_pass
        .difference(&st_pass)
        .filter(|s| !expected.contains(s.as_str()))
        .collect();
    let extra: Vec<&String> = st_pass.difference(&runc_pass).collect();
    // Short-lived pods may go before their proxy's first push: most, not
    // all, are checked.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (meshed, configured) = (
        meshed.load(Ordering::Relaxed),
        configured.load(Ordering::Relaxed),
    );
    let summary = format!(
        "critest {}: runc {} | sidetunnel {}\npassed with runc only: {missing:#?}\n\
         passed with sidetunnel only: {extra:#?}\nmeshed pods: {meshed}, proxies that \
         received their own workload from meshd over xDS: {configured}\n",
        critest.display(),
        runc.counts(),
        st.counts()
    );
    eprintln!("{summary}");
    std::fs::write(out.join("summary.txt"), &summary)?;
    if !missing.is_empty() {
        c.dump_logs();
    }
    drop(front);
    c.shutdown().await?;
    drop(reg);
    if !missing.is_empty() {
        bail!("specs pass with runc but not with sidetunnel: {missing:#?}");
    }
    // Every container start in a sidetunnel pod already passed the shim's
    // gate (the proxy held its certificate and an xDS session). Its own
    // workload arrives only after the pod is published, and critest removes
    // most pods within a second or two, so how many proxies saw it depends
    // on timing (between 15 and 44 of ~80 in the runs so far): at least one
    // must, or the xDS path never carried a workload.
    if meshed == 0 || configured == 0 {
        bail!("the mesh was not on: {configured} of {meshed} sidetunnel pods' proxies configured");
    }
    Ok(())
}
