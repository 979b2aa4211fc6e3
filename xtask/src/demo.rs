//! `cargo xtask demo`: from a fresh Debian machine (as root) to two meshed
//! pods. Installs what is missing (containerd, runc, CNI plugins, nftables,
//! iproute2, busybox-static), builds the workspace binaries, starts a
//! private containerd (own root, state, socket, bridge and cgroup: a system
//! containerd is never touched) with the `sidetunnel` runtime handler,
//! `sidetunnel-meshd` as the control plane and CA, runs a `server` and a
//! `client` pod in that runtime, sends traffic by pod IP and by service VIP,
//! prints what the proxies report (identities, mTLS, xDS bytes against a
//! full WDS of the same mesh, start times, proxy memory), and cleans up.

mod inventory;
mod report;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use sidetunnel_tests::containerd::{Containerd, Options, SIDETUNNEL};
use sidetunnel_tests::cri::{ContainerSpec, Cri, Pod};
use sidetunnel_tests::mesh::{self, MeshNode, NodeConfigParams};
use sidetunnel_tests::{bins, image};

use inventory::DemoPod;
use report::{PodReport, Report};

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Do not install missing Debian packages (fail with what is missing).
    #[arg(long)]
    pub no_install: bool,
    /// Do not run `cargo build --workspace --bins` (use what is built).
    #[arg(long)]
    pub no_build: bool,
    /// Services in the generated background mesh the pods share a control
    /// plane with (0 for none).
    #[arg(long, default_value_t = 100)]
    pub background_services: usize,
    /// Pods in the background mesh.
    #[arg(long, default_value_t = 1000)]
    pub background_pods: usize,
    /// On failure, keep containerd, the pods and meshd running this many
    /// seconds for inspection before cleaning up.
    #[arg(long, default_value_t = 0)]
    pub hold_on_failure: u64,
    /// Proxy binary the pods run (default: the workspace build next to
    /// this binary). Use a release build to measure the proxy's footprint:
    /// `cargo build --release -p netproxy` then
    /// `--proxy-binary target/release/sidetunnel-proxy`.
    #[arg(long)]
    pub proxy_binary: Option<std::path::PathBuf>,
}

const SERVER_REPLY: &str = "hello from the sidetunnel demo server";
/// Whole-demo bound once the binaries are built.
const DEMO_TIMEOUT: Duration = Duration::from_secs(600);
const WAIT: Duration = Duration::from_secs(60);

/// Numbered progress lines on stderr.
struct Steps {
    n: usize,
    total: usize,
    started: Instant,
}

impl Steps {
    fn next(&mut self, what: &str) {
        self.n += 1;
        eprintln!(
            "[{}/{}] {what} (t+{:.1}s)",
            self.n,
            self.total,
            self.started.elapsed().as_secs_f64()
        );
    }
}

fn detail(what: impl std::fmt::Display) {
    eprintln!("      {what}");
}

pub fn run(args: &DemoArgs) -> Result<()> {
    let mut steps = Steps {
        n: 0,
        total: 10,
        started: Instant::now(),
    };
    steps.next("checking prerequisites");
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the demo needs root (network namespaces, nftables, containerd): run `sudo -E cargo xtask demo`"
        );
    }
    crate::prereqs::ensure(crate::prereqs::For::Demo, args.no_install)?;
    steps.next("building the workspace binaries");
    if args.no_build {
        detail("skipped (--no-build)");
    } else {
        crate::cargo(&["build", "--workspace", "--bins"])
            .context("building failed: fix the compile error above, then re-run")?;
    }
    for bin in [
        "containerd-shim-sidetunnel-v1",
        "sidetunnel-proxy",
        "sidetunnel-meshd",
    ] {
        let p = bins::dir().join(bin);
        if !p.is_file() {
            bail!(
                "{} is not built: run `cargo build --workspace --bins` (or drop --no-build)",
                p.display()
            );
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(async {
        let limit = DEMO_TIMEOUT + Duration::from_secs(args.hold_on_failure);
        tokio::time::timeout(limit, demo(args, &mut steps))
            .await
            .with_context(|| format!("the demo did not finish within {limit:?}"))?
    })?;
    print!("{report}");
    Ok(())
}

async fn demo(args: &DemoArgs, steps: &mut Steps) -> Result<Report> {
    steps.next("starting a private containerd with the sidetunnel runtime");
    let mut node = MeshNode::init(&bins::path("sidetunnel-meshd"))?;
    let state_root = node.dir().join("state");
    std::fs::create_dir_all(&state_root)?;
    let node_config = node.dir().join("node-config.toml");
    let h = Containerd::start_with_images(Options {
        sidetunnel_config: Some(node_config.clone()),
        ..Default::default()
    })
    .await
    .context(
        "starting containerd failed: see the log above; is another process using the \
         10.213.0.0/16 test subnets (see /run/sidetunnel-tests)?",
    )?;
    detail(format!(
        "containerd {} (socket {}, pod subnet {}), images {} and {}",
        h.pid().unwrap_or_default(),
        h.socket().display(),
        h.subnet(),
        image::PAUSE,
        image::BUSYBOX
    ));
    let res = with_containerd(args, steps, &h, &mut node, &state_root, &node_config).await;
    if res.is_err() && args.hold_on_failure > 0 {
        eprintln!(
            "holding for {}s before cleaning up: ctr --address {} --namespace k8s.io ...",
            args.hold_on_failure,
            h.socket().display()
        );
        tokio::time::sleep(Duration::from_secs(args.hold_on_failure)).await;
    }
    let cause = res
        .is_err()
        .then(|| first_cause(&std::fs::read_to_string(h.log_path()).unwrap_or_default()))
        .flatten();
    if res.is_err() && std::env::var_os("SIDETUNNEL_DEMO_LOGS").is_some() {
        eprintln!("--- containerd log tail ---\n{}", h.log_tail(30));
        eprintln!("--- meshd log tail ---\n{}", node.log_tail(20));
    }
    steps.next("cleaning up (pods, containerd, control plane)");
    let down = h.shutdown().await;
    drop(node);
    let report = match (res, cause) {
        (Err(e), Some(cause)) => Err(e.context(format!(
            "first error in the shim's log: {cause} (SIDETUNNEL_DEMO_LOGS=1 prints the log tails)"
        ))),
        (res, _) => res,
    }?;
    down.context("stopping the demo containerd")?;
    Ok(report)
}

/// The first error the shim (or the proxy launcher, or containerd) wrote to
/// containerd's log: usually the reason a demo step failed further on.
fn first_cause(log: &str) -> Option<String> {
    let shim_error =
        |l: &str| l.contains(" ERROR sidetunnel") || l.contains(" ERROR containerd_shim");
    let launcher = |l: &str| l.contains("sidetunnel proxy launcher:");
    let containerd_error = |l: &str| l.contains("level=error");
    let found = [
        &shim_error as &dyn Fn(&str) -> bool,
        &launcher,
        &containerd_error,
    ]
    .iter()
    .find_map(|wanted| log.lines().find(|l| wanted(l)))?;
    // Drop the timestamp and level: the message is what names the cause.
    let text = found
        .split_once(" ERROR ")
        .map_or(found, |(_, rest)| rest)
        .trim();
    Some(text.chars().take(400).collect())
}

async fn with_containerd(
    args: &DemoArgs,
    steps: &mut Steps,
    h: &Containerd,
    node: &mut MeshNode,
    state_root: &Path,
    node_config: &Path,
) -> Result<Report> {
    steps.next("starting sidetunnel-meshd (control plane + CA)");
    let bg = inventory::background(args.background_services, args.background_pods, h.subnet())?;
    node.set_inventory(&inventory::to_yaml(&bg)?)?;
    let cp = node.serve(h)?;
    std::fs::write(
        node_config,
        node.node_config(
            h,
            &NodeConfigParams {
                proxy_binary: match &args.proxy_binary {
                    Some(p) => std::fs::canonicalize(p)
                        .with_context(|| format!("--proxy-binary {}", p.display()))?,
                    None => bins::path("sidetunnel-proxy"),
                },
                state_root: state_root.to_owned(),
                readiness_timeout: "30s".into(),
                log_level: "info".into(),
            },
        )?,
    )?;
    detail(format!(
        "listening on {cp}; background mesh: {} workloads, {} services",
        bg.workloads.len(),
        bg.services.len()
    ));

    steps.next("running pod sandboxes demo/server and demo/client (runtime handler sidetunnel)");
    let mut cri = h.cri().await?;
    let mut pods = Vec::new();
    for (name, sa) in [("server", "server"), ("client", "client")] {
        let config = h
            .pod_config(name, SIDETUNNEL)
            .namespace(inventory::NAMESPACE)
            .label("app", name);
        node.mint_token(inventory::NAMESPACE, name, &config.uid, sa)?;
        let t = Instant::now();
        let pod = cri.run_pod(&config).await.with_context(|| {
            format!(
                "RunPodSandbox({name}) failed: the shim's error is above; the shim log is in \
                 containerd's log and the proxy's in {}",
                config
                    .log_directory()
                    .join("sidetunnel-proxy/0.log")
                    .display()
            )
        })?;
        let sandbox_time = t.elapsed();
        let ip: IpAddr = cri
            .pod_ip(&pod.id)
            .await?
            .parse()
            .context("pod IP from PodSandboxStatus")?;
        detail(format!(
            "{name}: sandbox {} ip {ip} in {sandbox_time:.2?}",
            &pod.id[..12]
        ));
        pods.push((pod, sa, ip, t, sandbox_time));
    }

    steps.next("publishing the pods and the server service to the control plane");
    let demo_pods: Vec<DemoPod> = pods
        .iter()
        .map(|(pod, sa, ip, _, _)| DemoPod {
            name: &pod.config.name,
            service_account: sa,
            ip: *ip,
            serves: pod.config.name == "server",
        })
        .collect();
    let full = inventory::with_demo(&bg, &demo_pods);
    node.set_inventory(&inventory::to_yaml(&full)?)?;
    for (pod, ..) in &pods {
        wait_own_workload(state_root, pod).await?;
    }

    steps.next("starting the app containers (each waits for its proxy)");
    let server_app = ContainerSpec::new("httpd", image::BUSYBOX).command(&[
        "sh",
        "-c",
        &format!(
            "mkdir -p /www && echo '{SERVER_REPLY}' > /www/index.html && exec httpd -f -v -p {} -h /www",
            inventory::APP_PORT
        ),
    ]);
    let client_app = ContainerSpec::new("client", image::BUSYBOX).command(&["sleep", "3600"]);
    let mut reports = Vec::new();
    let mut client_id = String::new();
    for (pod, _, ip, t, sandbox_time) in &pods {
        let spec = if pod.config.name == "server" {
            &server_app
        } else {
            &client_app
        };
        let c = cri.run_container(pod, spec).await.with_context(|| {
            format!(
                "starting {}'s app failed: if the proxy was not ready, its log is {}",
                pod.config.name,
                pod.log_directory().join("sidetunnel-proxy/0.log").display()
            )
        })?;
        cri.wait_container_state(
            &c.id,
            sidetunnel_tests::cri::api::ContainerState::ContainerRunning,
            WAIT,
        )
        .await?;
        let start_time = t.elapsed();
        if pod.config.name == "client" {
            client_id = c.id.clone();
        }
        let pid = mesh::proxy_pid(state_root, &pod.id)?;
        reports.push(PodReport {
            name: format!("{}/{}", pod.config.namespace, pod.config.name),
            ip: Some(*ip),
            sandbox: pod.id.clone(),
            sandbox_time: *sandbox_time,
            start_time,
            proxy_pid: pid,
            proxy_rss_kib: mesh::rss_kib(pid)?,
            ..Default::default()
        });
    }

    steps.next("sending traffic from the client: to the server pod IP and to the service VIP");
    let server_ip = pods[0].2;
    let mut traffic = Vec::new();
    for (label, addr) in [
        (
            "server pod IP",
            SocketAddr::new(server_ip, inventory::APP_PORT as u16),
        ),
        (
            "service VIP",
            SocketAddr::new(inventory::VIP.parse()?, inventory::SERVICE_PORT as u16),
        ),
    ] {
        let out = fetch(&mut cri, &client_id, addr).await.with_context(|| {
            format!(
                "client → {label} {addr} failed: the proxies' access logs are in \
                 {}/*/sidetunnel-proxy/0.log",
                h.pod_log_root().display()
            )
        })?;
        detail(format!("client → {label} {addr}: {:?}", out.trim()));
        traffic.push((label.to_string(), addr, out.trim().to_string()));
    }

    steps.next("reading the proxies' identities, metrics and xDS counters");
    let (full_bytes, full_count, full_authz) = inventory::full_sync(&full, mesh::CLUSTER_ID)?;
    let mut report = Report {
        pods: reports,
        traffic,
        full_address_bytes: full_bytes,
        full_address_count: full_count,
        full_authorization_bytes: full_authz,
        control_plane: node.xds_address()?,
    };
    // Metrics are read a moment after the connections: retry briefly.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for r in &mut report.pods {
            report::fill_from_proxy(r, state_root)?;
        }
        match report.check_mtls() {
            Ok(()) => return Ok(report),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(
                    "traffic flowed but was not counted as mTLS by the server's proxy: \
                     the redirection or the proxy's HBONE path is broken",
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Waits until the pod's proxy holds its own workload (meshd pushed the
/// inventory update): inbound HBONE is answered 503 until it does.
async fn wait_own_workload(state_root: &Path, pod: &Pod) -> Result<()> {
    let sock = mesh::admin_socket(state_root, &pod.id);
    let deadline = Instant::now() + WAIT;
    loop {
        let last = match mesh::admin_get(&sock, "/config_dump") {
            Ok(body) => {
                let dump: serde_json::Value = serde_json::from_str(&body)?;
                let known = dump["workloads"].as_array().is_some_and(|ws| {
                    ws.iter().any(|w| {
                        w["name"] == pod.config.name.as_str()
                            && w["namespace"] == pod.config.namespace.as_str()
                    })
                });
                if known {
                    return Ok(());
                }
                "its own workload is not in the config dump yet".to_string()
            }
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!(
                "{}'s proxy did not receive its own workload within {WAIT:?} ({last}); \
                 check that meshd accepted the inventory (its log is printed below)",
                pod.config.name
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `wget` from the client container; the reply must be the server's page.
/// No `-T`: Debian's busybox 1.35 wget segfaults with it; the ExecSync
/// timeout bounds the call instead.
async fn fetch(cri: &mut Cri, container: &str, addr: SocketAddr) -> Result<String> {
    let url = format!("http://{addr}/");
    let out = cri
        .exec_sync(
            container,
            &["wget", "-q", "-O", "-", &url],
            Duration::from_secs(30),
        )
        .await?;
    if out.exit_code != 0 || !out.stdout.contains(SERVER_REPLY) {
        bail!(
            "wget {url} exited {}: stdout {:?}, stderr {:?}",
            out.exit_code,
            out.stdout,
            out.stderr.trim()
        );
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::first_cause;

    #[test]
    fn first_cause_prefers_the_shims_first_error() {
        let log = "time=\"x\" level=info msg=\"starting\"\n\
            time=\"x\" level=error msg=\"RunPodSandbox failed\"\n\
            2026-12-06T10:00:00Z  INFO sidetunnel::proxy: sidetunnel proxy launcher: exec refused\n\
            2026-12-06T10:00:00Z ERROR containerd_shim_sidetunnel_v1::sandbox::supervisor: proxy: open proxy binary /x as uid 1: EACCES\n\
            2026-12-06T10:00:01Z ERROR containerd_shim_sidetunnel_v1::sandbox: later\n";
        assert_eq!(
            first_cause(log).unwrap(),
            "containerd_shim_sidetunnel_v1::sandbox::supervisor: proxy: open proxy binary /x as uid 1: EACCES"
        );
        let no_shim = "a\ntime=\"x\" level=error msg=\"boom\"\n";
        assert_eq!(
            first_cause(no_shim).unwrap(),
            "time=\"x\" level=error msg=\"boom\""
        );
        assert_eq!(first_cause("all fine\n"), None);
    }
}
