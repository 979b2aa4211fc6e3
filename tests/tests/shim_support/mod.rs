//! Shared by the shim's containerd-level tests (shim.rs, shim_mesh.rs,
//! shim_faults.rs): a harness containerd whose `sidetunnel` runtime runs
//! the real `sidetunnel-proxy` against a real `sidetunnel-meshd` (control
//! plane and CA on the bridge gateway), pods published to meshd's
//! inventory, and what the tests read back: the proxy's pid, record,
//! process attributes and metrics, and what a removed pod may not leave.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use sidetunnel_meshd::inventory::model::{Inventory, Service, Workload};
use sidetunnel_tests::containerd::{Containerd, Options, SIDETUNNEL};
use sidetunnel_tests::cri::{ContainerSpec, Cri, Pod, PodConfig};
use sidetunnel_tests::mesh::{self, MeshNode, NodeConfigParams, metrics};
use sidetunnel_tests::{bins, image};

pub const PROXY_UID: u32 = 15000;
pub const SHIM: &str = "containerd-shim-sidetunnel-v1";
pub const METRICS_PORT: u16 = 15020;
pub const READINESS_PORT: u16 = 15021;
/// Bound for waits on the proxy (start, restart, config push) on a busy
/// 2-core machine.
pub const WAIT: Duration = Duration::from_secs(60);
/// CapEff of the proxy: CAP_NET_ADMIN (12) and CAP_NET_RAW (13) only.
pub const PROXY_CAPS: u64 = (1 << 12) | (1 << 13);

pub use mesh::node_prerequisites as prerequisites;

/// Bound on one containerd-level test, set-up and teardown included.
pub const TEST_LIMIT: Duration = Duration::from_secs(600);

/// The frame of a containerd-level test: skips (printing why) when a
/// prerequisite is missing, runs `body` on a fresh [`Cluster`] within
/// [`TEST_LIMIT`], prints containerd's and meshd's log tails if it fails,
/// and shuts the cluster down.
pub async fn run_on_cluster(
    test: &str,
    body: impl AsyncFnOnce(&mut Cluster) -> Result<()>,
) -> Result<()> {
    if !prerequisites(test) {
        return Ok(());
    }
    let run = async {
        let mut c = Cluster::start("").await?;
        let res = body(&mut c).await;
        if res.is_err() {
            c.dump_logs();
        }
        res?;
        c.shutdown().await
    };
    tokio::time::timeout(TEST_LIMIT, run)
        .await
        .with_context(|| format!("{test} test exceeded {TEST_LIMIT:?}"))?
}

/// A harness containerd plus the mesh its `sidetunnel` pods join. Field
/// order matters for drop: pods go (containerd) before the control plane.
pub struct Cluster {
    pub h: Containerd,
    pub mesh: MeshNode,
    pub state_root: PathBuf,
    /// The shim's node config file, and the `[runtime]` TOML it was given.
    config: PathBuf,
    runtime: String,
    /// More node config TOML (whole tables, e.g. `[upgrade]`).
    extra: String,
    /// The node's proxy binary: a copy of the build's, so a test can
    /// replace it (an upgrade) without touching the build.
    pub proxy: PathBuf,
    workloads: Mutex<Vec<Workload>>,
    /// Services (and ServiceEntries) published with the workloads.
    services: Mutex<Vec<Service>>,
}

/// A `sidetunnel` pod with its mesh identity.
#[derive(Debug, Clone)]
pub struct MeshPod {
    pub pod: Pod,
    pub ip: IpAddr,
    pub service_account: String,
}

impl MeshPod {
    pub fn id(&self) -> &str {
        &self.pod.id
    }

    /// `spiffe://cluster.local/ns/<ns>/sa/<sa>`.
    pub fn identity(&self) -> String {
        format!(
            "spiffe://cluster.local/ns/{}/sa/{}",
            self.pod.config.namespace, self.service_account
        )
    }
}

impl Cluster {
    /// Starts meshd's PKI, containerd (with images) and meshd on the
    /// bridge gateway, then writes the node config. `runtime`: extra TOML
    /// for the node config's `[runtime]` table (e.g. the OCI runtime).
    pub async fn start(runtime: &str) -> Result<Cluster> {
        Self::start_with(runtime, Options::default()).await
    }

    /// [`Cluster::start`] with more containerd options (the shim binary
    /// and its config are the cluster's).
    pub async fn start_with(runtime: &str, opts: Options) -> Result<Cluster> {
        let mut node = MeshNode::init(&bins::path("sidetunnel-meshd"))?;
        let state_root = node.dir().join("state");
        std::fs::create_dir_all(&state_root)?;
        let config = node.dir().join("node-config.toml");
        let proxy = node.dir().join("bin").join("sidetunnel-proxy");
        let h = Containerd::start_with_images(Options {
            sidetunnel_shim: Some(bins::path(SHIM)),
            sidetunnel_config: Some(config.clone()),
            ..opts
        })
        .await?;
        node.serve(&h)?;
        let c = Cluster {
            h,
            mesh: node,
            state_root,
            config,
            runtime: runtime.to_owned(),
            extra: String::new(),
            proxy,
            workloads: Mutex::new(Vec::new()),
            services: Mutex::new(Vec::new()),
        };
        c.install_proxy(&bins::path("sidetunnel-proxy"))?;
        // The shim reads the node config at every pod's first call, so it
        // may be written after containerd starts (meshd's address is known
        // only now).
        c.write_node_config(&c.proxy)?;
        Ok(c)
    }

    /// Installs `from` as the node's proxy binary the way a package
    /// manager does: a new file renamed over the old one.
    pub fn install_proxy(&self, from: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dir = self
            .proxy
            .parent()
            .context("proxy path without a directory")?;
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(".sidetunnel-proxy.new");
        std::fs::copy(from, &tmp).with_context(|| format!("copy {}", from.display()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&tmp, &self.proxy)?;
        Ok(())
    }

    /// Adds whole tables to the node config (rewritten now, with the
    /// node's proxy binary); pods started from now on see them.
    pub fn set_extra_config(&mut self, toml: &str) -> Result<()> {
        self.extra = toml.to_owned();
        self.write_node_config(&self.proxy.clone())
    }

    /// (Re)writes the node config with `proxy_binary`; pods started from
    /// now on (each has its own shim) run that proxy.
    pub fn write_node_config(&self, proxy_binary: &Path) -> Result<()> {
        let mut text = self.mesh.node_config(
            &self.h,
            &NodeConfigParams {
                proxy_binary: proxy_binary.to_owned(),
                state_root: self.state_root.clone(),
                readiness_timeout: "60s".into(),
                log_level: "info".into(),
            },
        )?;
        if !self.runtime.is_empty() {
            text += &format!("\n[runtime]\n{}\n", self.runtime);
        }
        if !self.extra.is_empty() {
            text += &format!("\n{}\n", self.extra);
        }
        std::fs::write(&self.config, text)?;
        Ok(())
    }

    /// Stops every pod, containerd and meshd; what CRI could not remove is
    /// force-cleaned and reported as an error.
    pub async fn shutdown(self) -> Result<()> {
        let Cluster { h, mesh, .. } = self;
        let res = h.shutdown().await;
        drop(mesh);
        res
    }

    /// Prints containerd's and meshd's log tails (after a failure).
    pub fn dump_logs(&self) {
        eprintln!("--- containerd log tail ---\n{}", self.h.log_tail(60));
        eprintln!("--- meshd log tail ---\n{}", self.mesh.log_tail(20));
    }

    pub fn pod_config(&self, name: &str, namespace: &str) -> PodConfig {
        self.h.pod_config(name, SIDETUNNEL).namespace(namespace)
    }

    /// Mints the pod's service-account token where the shim looks for it,
    /// then RunPodSandbox.
    pub async fn run_pod(&self, cri: &mut Cri, config: &PodConfig, sa: &str) -> Result<MeshPod> {
        self.mesh
            .mint_token(&config.namespace, &config.name, &config.uid, sa)?;
        let pod = cri.run_pod(config).await?;
        let ip = cri
            .pod_ip(&pod.id)
            .await?
            .parse()
            .with_context(|| format!("pod IP of {}", config.name))?;
        Ok(MeshPod {
            pod,
            ip,
            service_account: sa.into(),
        })
    }

    /// A mesh pod with one running app container.
    pub async fn run_pod_with(
        &self,
        cri: &mut Cri,
        config: &PodConfig,
        sa: &str,
        app: &ContainerSpec,
    ) -> Result<(MeshPod, sidetunnel_tests::cri::Container)> {
        let pod = self.run_pod(cri, config, sa).await?;
        let c = cri.run_container(&pod.pod, app).await?;
        cri.wait_container_state(
            &c.id,
            sidetunnel_tests::cri::api::ContainerState::ContainerRunning,
            WAIT,
        )
        .await?;
        Ok((pod, c))
    }

    /// Adds the pods to meshd's inventory (HBONE workloads with their IP
    /// and service account) and waits until each one's proxy knows itself.
    pub async fn publish(&self, pods: &[&MeshPod]) -> Result<()> {
        let yaml = {
            let mut ws = self.workloads.lock().unwrap();
            for p in pods {
                let c = &p.pod.config;
                ws.retain(|w| !(w.name == c.name && w.namespace == c.namespace));
                ws.push(Workload {
                    name: c.name.clone(),
                    namespace: c.namespace.clone(),
                    service_account: Some(p.service_account.clone()),
                    addresses: vec![p.ip.to_string()],
                    workload_type: Some("pod".into()),
                    labels: [("app".to_string(), c.name.clone())].into(),
                    ..Default::default()
                });
            }
            // JSON is YAML: no YAML serialiser needed.
            serde_json::to_string_pretty(&Inventory {
                workloads: ws.clone(),
                services: self.services.lock().unwrap().clone(),
                ..Default::default()
            })?
        };
        self.mesh.set_inventory(&yaml)?;
        for p in pods {
            self.wait_knows(p, p).await?;
        }
        Ok(())
    }

    /// Adds `service` to what the next [`Cluster::publish`] serves.
    pub fn add_service(&self, service: Service) {
        self.services.lock().unwrap().push(service);
    }

    /// Waits until `who`'s proxy holds `whom`'s workload.
    pub async fn wait_knows(&self, who: &MeshPod, whom: &MeshPod) -> Result<()> {
        mesh::wait_workload_known(
            &self.state_root,
            who.id(),
            &whom.pod.config.namespace,
            &whom.pod.config.name,
            WAIT,
        )
        .await
    }

    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.state_root.join(id)
    }

    pub fn record(&self, id: &str) -> Result<serde_json::Value> {
        mesh::shim_record(&self.state_root, id)
    }

    /// The running proxy's pid from the shim's record, once it has exec'd
    /// the proxy (so it is in its final namespaces, cgroups and identity);
    /// `not`: wait for a different pid than this one (a restart).
    pub async fn proxy_pid(&self, id: &str, not: Option<i32>, limit: Duration) -> Result<i32> {
        let deadline = Instant::now() + limit;
        loop {
            let last = match mesh::proxy_pid(&self.state_root, id) {
                Ok(pid) if Some(pid) != not => return Ok(pid),
                Ok(pid) => format!("still pid {pid}"),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                bail!("no (new) running proxy recorded for {id} within {limit:?}: {last}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the pod's proxy answers its readiness endpoint with 200
    /// (from the host, on the pod IP).
    pub async fn wait_ready(&self, pod: &MeshPod, limit: Duration) -> Result<()> {
        let addr = SocketAddr::new(pod.ip, READINESS_PORT);
        let deadline = Instant::now() + limit;
        loop {
            let res =
                tokio::task::spawn_blocking(move || mesh::http_get(addr, "/healthz/ready")).await?;
            match res {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!("proxy of {} not ready", pod.id())));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Asserts that nothing of removed sandbox `id` is left: state dir,
    /// netns, rules (if the netns survives), processes in pod cgroups,
    /// shims, mounts.
    pub async fn assert_gone(&self, id: &str, netns: &Path, containers: &[&str]) -> Result<()> {
        ensure!(
            !self.sandbox_dir(id).exists(),
            "state dir left: {}",
            self.sandbox_dir(id).display()
        );
        if netns.exists() {
            let rules = sidetunnel_redirect::show(netns)?;
            ensure!(
                rules.contains("(not installed)"),
                "rules left in {}:\n{rules}",
                netns.display()
            );
            bail!("netns left: {}", netns.display());
        }
        let mounts: Vec<PathBuf> = self
            .h
            .mounts()
            .into_iter()
            .filter(|m| {
                let m = m.to_string_lossy();
                m.contains(id) || containers.iter().any(|c| m.contains(c))
            })
            .collect();
        ensure!(mounts.is_empty(), "mounts left: {mounts:?}");
        Ok(())
    }

    /// Waits until no process is left in the harness's pod cgroups and no
    /// shim runs (after every pod was removed).
    pub async fn assert_no_processes(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (procs, shims) = (self.h.pod_cgroup_pids(), self.h.shim_pids());
            if procs.is_empty() && shims.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("left running: pod cgroup processes {procs:?}, shims {shims:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The sandbox's netns path, from its bundle.
pub fn netns_of(h: &Containerd, pod: &Pod) -> Result<PathBuf> {
    match sidetunnel_oci::classify_bundle(&h.task_bundle(&pod.id))? {
        sidetunnel_oci::Role::Sandbox(info) => {
            info.netns_path.context("sandbox without netns path")
        }
        other => bail!("sandbox bundle classified as {other:?}"),
    }
}

pub fn same_file(a: &Path, b: &Path) -> Result<bool> {
    let (ma, mb) = (std::fs::metadata(a)?, std::fs::metadata(b)?);
    Ok(ma.dev() == mb.dev() && ma.ino() == mb.ino())
}

pub fn status_field(pid: i32, key: &str) -> Result<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
        .with_context(|| format!("{key} not in /proc/{pid}/status"))
}

/// The proxy process: in the pod netns, its own mount namespace, the pod's
/// cgroup, every uid the proxy user, only CAP_NET_ADMIN + CAP_NET_RAW
/// (effective, permitted and bounding), no_new_privs.
pub fn check_proxy_process(pid: i32, netns: &Path, pod: &Pod) -> Result<()> {
    let proc = |f: &str| PathBuf::from(format!("/proc/{pid}/{f}"));
    ensure!(same_file(netns, &proc("ns/net"))?, "proxy not in pod netns");
    ensure!(
        !same_file(Path::new("/proc/self/ns/mnt"), &proc("ns/mnt"))?,
        "proxy shares the host mount namespace"
    );
    let uids = status_field(pid, "Uid:")?;
    ensure!(
        uids.split_whitespace().all(|u| u == PROXY_UID.to_string()),
        "proxy uids {uids}"
    );
    for key in ["CapEff:", "CapPrm:", "CapBnd:"] {
        let caps = u64::from_str_radix(&status_field(pid, key)?, 16)?;
        ensure!(caps == PROXY_CAPS, "proxy {key} {caps:#x}");
    }
    ensure!(
        status_field(pid, "NoNewPrivs:")? == "1",
        "proxy without no_new_privs"
    );
    let cgroups = std::fs::read_to_string(proc("cgroup"))?;
    ensure!(
        cgroups.contains(&pod.config.cgroup_parent()),
        "proxy not in pod cgroup:\n{cgroups}"
    );
    Ok(())
}

/// The proxy's metrics, read by the app: `wget` to 127.0.0.1:15020 from
/// inside `container` (loopback is never redirected).
pub async fn metrics_via(cri: &mut Cri, container: &str) -> Result<Vec<metrics::Sample>> {
    let url = format!("http://127.0.0.1:{METRICS_PORT}/metrics");
    let out = cri
        .exec_sync(
            container,
            &["wget", "-q", "-O", "-", &url],
            Duration::from_secs(20),
        )
        .await?;
    ensure!(
        out.exit_code == 0,
        "wget {url} in {container} exited {}: {}",
        out.exit_code,
        out.stderr.trim()
    );
    Ok(metrics::parse(&out.stdout))
}

/// App port of the counting server.
pub const APP_PORT: u16 = 9000;

/// A server app that counts: every accepted connection appends a line to
/// `/tmp/conns`, every received line is appended to `/tmp/data` and
/// answered `ack <line>`.
pub fn counting_server() -> ContainerSpec {
    ContainerSpec::new("server", image::BUSYBOX).command(&[
        "sh",
        "-c",
        &format!(
            "printf '#!/bin/sh\\necho c >> /tmp/conns\\nread l\\necho \"$l\" >> /tmp/data\\n\
             echo \"ack $l\"\\n' > /tmp/serve.sh && chmod +x /tmp/serve.sh && \
             touch /tmp/conns /tmp/data && echo listening && \
             exec nc -ll -p {APP_PORT} -e /tmp/serve.sh"
        ),
    ])
}

/// (accepted connections, bytes received) of the counting server.
pub async fn server_counts(cri: &mut Cri, server: &str) -> Result<(u64, u64)> {
    let out = cri
        .exec_ok(
            server,
            &["sh", "-c", "wc -l < /tmp/conns; wc -c < /tmp/data"],
        )
        .await?;
    let v: Vec<u64> = out
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("server counts {out:?}"))?;
    ensure!(v.len() == 2, "server counts {out:?}");
    Ok((v[0], v[1]))
}

/// A client app that only sleeps (commands are exec'd into it).
pub fn idle_client() -> ContainerSpec {
    ContainerSpec::new("client", image::BUSYBOX).command(&["sleep", "3600"])
}

/// One request from `client` to `addr`: `Ok(reply)` when acknowledged,
/// `Err(nc's output)` otherwise (refused, reset, timeout).
pub async fn request(
    cri: &mut Cri,
    client: &str,
    addr: SocketAddr,
    payload: &str,
) -> Result<std::result::Result<String, String>> {
    let cmd = format!(
        "echo {payload} | nc -w 5 {} {} 2>&1",
        addr.ip(),
        addr.port()
    );
    let out = cri
        .exec_sync(client, &["sh", "-c", &cmd], Duration::from_secs(20))
        .await?;
    Ok(if out.stdout.contains(&format!("ack {payload}")) {
        Ok(out.stdout)
    } else {
        Err(format!("exit {}: {}", out.exit_code, out.stdout.trim()))
    })
}

/// mTLS connections the proxy reported as `reporter` from `src` to `dst`
/// (`istio_tcp_connections_opened_total`).
pub fn mtls_opened(samples: &[metrics::Sample], reporter: &str, src: &str, dst: &str) -> f64 {
    metrics::sum(
        samples,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", reporter),
            ("connection_security_policy", "mutual_tls"),
            ("source_principal", src),
            ("destination_principal", dst),
        ],
    )
}

/// A server and a client mesh pod with their apps: a counting server on
/// [`APP_PORT`] and an idle client to run requests from.
pub struct Pair {
    pub server: MeshPod,
    pub client: MeshPod,
    pub server_app: sidetunnel_tests::cri::Container,
    pub client_app: sidetunnel_tests::cri::Container,
}

impl Pair {
    /// Starts both apps and waits until the server listens.
    pub async fn start_apps(cri: &mut Cri, server: MeshPod, client: MeshPod) -> Result<Pair> {
        let server_app = cri.run_container(&server.pod, &counting_server()).await?;
        let client_app = cri.run_container(&client.pod, &idle_client()).await?;
        server_app.wait_log("listening", WAIT).await?;
        Ok(Pair {
            server,
            client,
            server_app,
            client_app,
        })
    }

    pub fn target(&self) -> SocketAddr {
        SocketAddr::new(self.server.ip, APP_PORT)
    }
}
