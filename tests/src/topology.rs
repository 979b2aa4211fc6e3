//! Two meshed "pods" in network namespaces, for data-path tests and
//! benchmarks: a "node" netns holding a bridge and a real
//! `sidetunnel-meshd` (control plane and CA), and pods A and B attached to
//! the bridge by veth pairs, each behind the real `sidetunnel-redirect`
//! ruleset and running the real `sidetunnel-proxy`. Apps are whatever the
//! caller creates inside the namespaces (`NetNs::run`).
//!
//! Processes are started by forking from a thread that has entered the
//! target namespace (a child inherits its thread's network namespace), not
//! through `ip netns exec`, so spawn → ready timings measure the proxy, not
//! `ip`. Everything is torn down on drop: processes, then namespaces.

mod node;
pub mod ztunnel;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sidetunnel_redirect::RedirectConfig;

use crate::mesh::{MeshNode, XDS_SERVER_NAME};
use crate::netns::NetNs;
pub use node::{
    MeshdServe, NODE_IP, NODE_IP6, Proc, attach_pod, bridge_node, http_get_on, spawn_meshd,
};

pub const A_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 2);
pub const B_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 3);
/// VIP of service `b.ns-b` (port 80 → B's [`APP_PORT`]).
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The optional out-of-mesh host X on the same bridge (no proxy, no rules).
pub const X_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 50);
pub const APP_PORT: u16 = 8080;
/// SO_MARK of the proxy's sockets (the ruleset exempts it).
pub const PROXY_MARK: u32 = 0x539;
pub const A_ID: &str = "spiffe://cluster.local/ns/ns-a/sa/sa-a";
pub const B_ID: &str = "spiffe://cluster.local/ns/ns-b/sa/sa-b";
pub const READINESS_PORT: u16 = 15021;
pub const METRICS_PORT: u16 = 15020;

const WAIT: Duration = Duration::from_secs(30);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// One of the two meshed pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pod {
    A,
    B,
}

impl Pod {
    pub fn ip(self) -> Ipv4Addr {
        match self {
            Pod::A => A_IP,
            Pod::B => B_IP,
        }
    }

    /// Pod (and workload) name.
    pub fn name(self) -> &'static str {
        match self {
            Pod::A => "a",
            Pod::B => "b",
        }
    }

    pub fn namespace(self) -> &'static str {
        match self {
            Pod::A => "ns-a",
            Pod::B => "ns-b",
        }
    }

    pub fn service_account(self) -> &'static str {
        match self {
            Pod::A => "sa-a",
            Pod::B => "sa-b",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How the pair is built.
#[derive(Debug, Clone)]
pub struct Options {
    /// Directory holding `sidetunnel-proxy` and `sidetunnel-meshd`
    /// (`bins::dir()` in tests, `target/release` in benchmarks).
    pub bin_dir: PathBuf,
    /// The proxies' `--log-level`.
    pub log_level: String,
    /// Extra flags for both proxies.
    pub proxy_args: Vec<String>,
    /// Extra flags for B's proxy only.
    pub b_args: Vec<String>,
    /// Destination ports excluded from the pods' outbound capture (direct-path
    /// baselines with tools that cannot mark their sockets).
    pub exclude_outbound_ports: BTreeSet<u16>,
    /// Ports excluded from the pods' inbound capture (direct-path servers).
    pub exclude_inbound_ports: BTreeSet<u16>,
    /// `--drain-grace-period` of the proxies.
    pub drain_grace: String,
    /// Also attach host X ([`X_IP`]): outside the mesh, no proxy.
    pub outside_host: bool,
    /// Run this ztunnel binary instead of `sidetunnel-proxy` ([`ztunnel`])
    /// in both pods, or only in `ztunnel_only_in`.
    pub ztunnel: Option<PathBuf>,
    pub ztunnel_only_in: Option<Pod>,
    /// Extra `KEY=VALUE` environment for ztunnel.
    pub ztunnel_env: Vec<String>,
    /// DNS capture in both pods' rulesets (UDP/TCP 53 → the proxy's DNS
    /// port); the proxies then need `--dns-proxy true` in `proxy_args`.
    pub dns_capture: bool,
}

impl Options {
    /// Whether `pod` runs ztunnel rather than `sidetunnel-proxy`.
    pub fn runs_ztunnel(&self, pod: Pod) -> bool {
        self.ztunnel.is_some() && self.ztunnel_only_in.is_none_or(|p| p == pod)
    }

    pub fn new(bin_dir: impl Into<PathBuf>) -> Options {
        Options {
            bin_dir: bin_dir.into(),
            log_level: "info".into(),
            proxy_args: Vec::new(),
            b_args: Vec::new(),
            exclude_outbound_ports: BTreeSet::new(),
            exclude_inbound_ports: BTreeSet::new(),
            drain_grace: "1s".into(),
            outside_host: false,
            ztunnel: None,
            ztunnel_only_in: None,
            ztunnel_env: Vec::new(),
            dns_capture: false,
        }
    }
}

/// The mesh inventory of the pair: workloads `a` and `b`, service `b.ns-b`
/// on [`VIP`], and `policies_yaml` (a YAML list, or empty) as `policies:`.
pub fn inventory(policies_yaml: &str) -> String {
    let mut s = inventory_with_addresses(&A_IP.to_string(), &B_IP.to_string(), &VIP.to_string());
    if !policies_yaml.is_empty() {
        s.push_str("policies:\n");
        s.push_str(policies_yaml);
    }
    s
}

/// The pair's workloads and service without policies, with the given
/// address lists (YAML flow-sequence items, e.g. `10.88.0.2, fd00:88::2`)
/// for pod A, pod B and the service's VIPs.
pub fn inventory_with_addresses(a: &str, b: &str, vips: &str) -> String {
    format!(
        r#"workloads:
  - name: a
    namespace: ns-a
    serviceAccount: sa-a
    addresses: [{a}]
    canonicalName: client
    canonicalRevision: v1
  - name: b
    namespace: ns-b
    serviceAccount: sa-b
    addresses: [{b}]
    canonicalName: server
    canonicalRevision: v2
    services:
      ns-b/b.ns-b.svc.cluster.local: {{80: {APP_PORT}}}
services:
  - name: b
    namespace: ns-b
    vips: [{vips}]
    ports: {{80: {APP_PORT}}}
"#
    )
}

/// Node, meshd, pods A and B with their proxies. Field order is drop
/// order: processes before the namespaces they live in.
pub struct PodPair {
    proxies: [Option<Proc>; 2],
    meshd: Proc,
    cp: SocketAddr,
    opts: Options,
    a: NetNs,
    b: NetNs,
    x: Option<NetNs>,
    node: NetNs,
    mesh: MeshNode,
    tokens: [PathBuf; 2],
}

impl PodPair {
    /// Builds the namespaces, starts meshd, installs redirection in both
    /// pods and starts both proxies, waiting until they are ready.
    pub fn start(opts: Options) -> Result<PodPair> {
        let meshd_bin = bin(&opts.bin_dir, "sidetunnel-meshd")?;
        bin(&opts.bin_dir, "sidetunnel-proxy")?;
        let node = bridge_node("tpn", false);
        let a = attach_pod(&node, "tpa", A_IP, None)?;
        let b = attach_pod(&node, "tpb", B_IP, None)?;
        let x = match opts.outside_host {
            true => Some(attach_pod(&node, "tpx", X_IP, None)?),
            false => None,
        };

        let mesh = MeshNode::init(&meshd_bin)?;
        mesh.set_inventory(&inventory(""))?;
        let serve = MeshdServe {
            bin: &meshd_bin,
            dir: mesh.dir(),
            listen: SocketAddrV4::new(NODE_IP, 0).into(),
            extra_args: &[],
            log: &mesh.dir().join("meshd-serve.log"),
        };
        let (meshd, cp) = spawn_meshd(&node, &serve)?;
        let tokens = [
            mesh.mint_token("ns-a", "a", "uid-a", "sa-a")?,
            mesh.mint_token("ns-b", "b", "uid-b", "sa-b")?,
        ];
        // The xDS and CA clients open unmarked sockets, so the control
        // plane's address is excluded from outbound capture
        // (netproxy/README.md, known limitation).
        let redirect = RedirectConfig {
            exclude_outbound_ip_ranges: vec![format!("{NODE_IP}/32").parse()?],
            exclude_outbound_ports: opts.exclude_outbound_ports.clone(),
            exclude_inbound_ports: opts.exclude_inbound_ports.clone(),
            dns_capture: opts.dns_capture,
            ..Default::default()
        };
        for ns in [&a, &b] {
            sidetunnel_redirect::install(Path::new(&ns.path()), &redirect)
                .with_context(|| format!("installing redirection in {}", ns.name()))?;
        }
        let mut pair = PodPair {
            proxies: [None, None],
            meshd,
            cp,
            opts,
            a,
            b,
            x,
            node,
            mesh,
            tokens,
        };
        for pod in [Pod::A, Pod::B] {
            pair.spawn_proxy(pod)?;
        }
        for pod in [Pod::A, Pod::B] {
            pair.wait_ready(pod, Instant::now() + WAIT)?;
        }
        Ok(pair)
    }

    pub fn ns(&self, pod: Pod) -> &NetNs {
        match pod {
            Pod::A => &self.a,
            Pod::B => &self.b,
        }
    }

    /// Host X, when [`Options::outside_host`] asked for it.
    pub fn outside(&self) -> Option<&NetNs> {
        self.x.as_ref()
    }

    /// The node namespace (bridge, meshd; kubelet's vantage point).
    pub fn node(&self) -> &NetNs {
        &self.node
    }

    /// meshd's state (PKI, inventory, tokens).
    pub fn mesh(&self) -> &MeshNode {
        &self.mesh
    }

    /// Replaces the inventory meshd serves (it watches the file).
    pub fn set_inventory(&self, yaml: &str) -> Result<()> {
        self.mesh.set_inventory(yaml)
    }

    /// The running proxy's pid.
    pub fn proxy_pid(&self, pod: Pod) -> Option<i32> {
        self.proxies[pod.index()]
            .as_ref()
            .map(|p| p.child.id() as i32)
    }

    pub fn admin_socket(&self, pod: Pod) -> PathBuf {
        self.mesh.dir().join(format!("{}-admin.sock", pod.name()))
    }

    /// `GET path` on a proxy's admin socket; the body of a 200.
    pub fn admin(&self, pod: Pod, path: &str) -> Result<String> {
        crate::mesh::admin_get(&self.admin_socket(pod), path)
    }

    /// The proxy's Prometheus text, scraped from the node.
    pub fn metrics(&self, pod: Pod) -> Result<String> {
        let (code, body) = self.http_get(SocketAddrV4::new(pod.ip(), METRICS_PORT), "/metrics")?;
        if code != 200 {
            bail!("metrics of proxy {}: status {code}", pod.name());
        }
        Ok(body)
    }

    /// Polls a proxy's metrics until a sample of `series` carries every
    /// label in `labels` (`name="value"`); the last scrape when it does
    /// not within `timeout`.
    pub fn wait_for_series(
        &self,
        pod: Pod,
        series: &str,
        labels: &[String],
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let prefix = format!("{series}{{");
        loop {
            let m = self.metrics(pod).map_err(|e| e.to_string())?;
            let found = m
                .lines()
                .any(|l| l.starts_with(&prefix) && labels.iter().all(|w| l.contains(w.as_str())));
            if found {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(m);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// HTTP/1.0 GET from the node namespace: (status, body).
    pub fn http_get(&self, addr: SocketAddrV4, path: &str) -> Result<(u16, String)> {
        self.node
            .run(|| http_get(addr, path))
            .with_context(|| format!("GET http://{addr}{path}"))
    }

    /// The last lines of every process's log.
    pub fn logs(&self) -> String {
        let mut out = format!("--- meshd ---\n{}\n", self.meshd.log_tail(20));
        for pod in [Pod::A, Pod::B] {
            if let Some(p) = &self.proxies[pod.index()] {
                out.push_str(&format!(
                    "--- proxy {} ---\n{}\n",
                    pod.name(),
                    p.log_tail(40)
                ));
            }
        }
        out
    }

    /// Copies every process's log (`*.log`) into `dest` (created), to keep
    /// them after the pair's temporary directory is gone.
    pub fn save_logs(&self, dest: &Path) -> Result<()> {
        std::fs::create_dir_all(dest)?;
        for e in std::fs::read_dir(self.mesh.dir())? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "log") {
                let to = dest.join(p.file_name().unwrap_or_default());
                std::fs::copy(&p, &to).with_context(|| format!("copying {}", p.display()))?;
            }
        }
        Ok(())
    }

    /// Sends SIGTERM to a proxy and returns at once (it drains meanwhile).
    pub fn sigterm_proxy(&self, pod: Pod) -> Result<()> {
        let pid = self
            .proxy_pid(pod)
            .with_context(|| format!("proxy {} is not running", pod.name()))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGTERM)
            .with_context(|| format!("SIGTERM to proxy {}", pod.name()))
    }

    /// Waits up to `timeout` for a proxy to exit; its exit code (`None`
    /// while it still runs or when a signal ended it).
    pub fn wait_proxy_exit(&mut self, pod: Pod, timeout: Duration) -> Option<i32> {
        self.proxies[pod.index()].as_mut()?.wait_exit(timeout)
    }

    /// Stops a proxy (SIGTERM; SIGKILL after `grace`); its exit code.
    pub fn stop_proxy(&mut self, pod: Pod, grace: Duration) -> Option<i32> {
        self.proxies[pod.index()].take()?.stop(grace)
    }

    /// Starts a stopped proxy and waits for `/healthz/ready`; returns the
    /// time from spawn to the first `200`.
    pub fn start_proxy(&mut self, pod: Pod) -> Result<Duration> {
        if self.proxies[pod.index()].is_some() {
            bail!("proxy {} is already running", pod.name());
        }
        let t0 = Instant::now();
        self.spawn_proxy(pod)?;
        let ready = self.wait_ready(pod, t0 + WAIT)?;
        Ok(ready - t0)
    }

    fn spawn_proxy(&mut self, pod: Pod) -> Result<()> {
        let d = self.mesh.dir();
        let log = d.join(format!("{}-proxy.log", pod.name()));
        let mut cmd = match &self.opts.ztunnel {
            Some(bin) if self.opts.runs_ztunnel(pod) => ztunnel::command(
                &ztunnel::Setup {
                    bin,
                    control_plane: self.cp,
                    root_cert: &self.mesh.root_cert(),
                    token: &self.tokens[pod.index()],
                    log_level: &self.opts.log_level,
                    env: &self.opts.ztunnel_env,
                },
                pod,
            )?,
            _ => self.sidetunnel_command(pod),
        };
        // ztunnel logs to stdout, ours to stderr.
        let out = std::fs::File::create(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = self
            .ns(pod)
            .run(move || cmd.spawn())
            .with_context(|| format!("spawning {program}"))?;
        self.proxies[pod.index()] = Some(Proc { child, log });
        Ok(())
    }

    fn sidetunnel_command(&self, pod: Pod) -> Command {
        let sock = self.admin_socket(pod);
        // A previous instance killed without draining leaves its socket.
        let _ = std::fs::remove_file(&sock);
        let mut cmd = Command::new(self.opts.bin_dir.join("sidetunnel-proxy"));
        cmd.arg("run")
            .args(["--pod-namespace", pod.namespace(), "--pod-name", pod.name()])
            .args(["--service-account", pod.service_account()])
            .args(["--pod-ip", &pod.ip().to_string()])
            .args(["--xds-address", &self.cp.to_string()])
            .args(["--xds-server-name", XDS_SERVER_NAME])
            .arg("--xds-root-cert")
            .arg(self.mesh.root_cert())
            .arg("--token-file")
            .arg(&self.tokens[pod.index()])
            .arg("--admin-socket")
            .arg(&sock)
            .args(&self.opts.proxy_args);
        // Defaults the caller's own flags may override (clap refuses
        // repeated flags).
        for (flag, value) in [
            ("--drain-grace-period", &self.opts.drain_grace),
            ("--log-level", &self.opts.log_level),
        ] {
            if !self.opts.proxy_args.iter().any(|a| a.starts_with(flag)) {
                cmd.args([flag, value]);
            }
        }
        if pod == Pod::B {
            cmd.args(&self.opts.b_args);
        }
        cmd
    }

    /// Polls the proxy's `/healthz/ready` from the node every millisecond
    /// until `200` (the instant it was seen) or `deadline`.
    fn wait_ready(&mut self, pod: Pod, deadline: Instant) -> Result<Instant> {
        let addr = SocketAddrV4::new(pod.ip(), READINESS_PORT);
        let proc = self.proxies[pod.index()]
            .as_mut()
            .with_context(|| format!("proxy {} is not running", pod.name()))?;
        let pid = proc.child.id() as i32;
        let polled = self.node.run(move || {
            let mut last = String::from("no answer");
            while Instant::now() < deadline {
                match http_get(addr, "/healthz/ready") {
                    Ok((200, _)) => return Ok(Instant::now()),
                    Ok((code, body)) => last = format!("{code} {}", body.trim()),
                    Err(e) => last = e.to_string(),
                }
                if exited(pid) {
                    return Err(format!("exited (last readiness answer: {last})"));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(format!("not ready in time (last: {last})"))
        });
        polled.map_err(|e| anyhow::anyhow!("proxy {}: {e}\n{}", pod.name(), self.logs()))
    }
}

fn bin(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    if !p.is_file() {
        bail!(
            "{} not built (cargo build -p netproxy -p sidetunnel-meshd --bins)",
            p.display()
        );
    }
    Ok(p)
}

/// True once `pid` has exited (a zombie counts: we have not reaped it).
fn exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => true,
    }
}

/// HTTP/1.0 GET in the calling thread's namespace: (status, body).
fn http_get(addr: SocketAddrV4, path: &str) -> std::io::Result<(u16, String)> {
    http_get_on(
        &mut TcpStream::connect_timeout(&addr.into(), IO_TIMEOUT)?,
        path,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{self, Server};
    use crate::{bins, prereq};

    /// The builder's contract: both proxies ready; A's plain client reaches
    /// B's app through both proxies with A's own address and mTLS
    /// identities; host X is outside the mesh; a proxy restarts and stops
    /// on SIGTERM with exit code 0.
    #[test]
    fn pair_meshes_a_and_b() {
        let t = "pair_meshes_a_and_b";
        if !(prereq::root(t) && prereq::binary(t, "ip") && prereq::binary(t, "nft")) {
            return;
        }
        let mut opts = Options::new(bins::dir());
        opts.outside_host = true;
        let mut pair = PodPair::start(opts).expect("start the pair");
        let app: SocketAddr = SocketAddrV4::new(B_IP, APP_PORT).into();
        let _echo = Server::echo(pair.ns(Pod::B), app).unwrap();
        let mut c = pair.ns(Pod::A).run(|| load::connect(app, None)).unwrap();
        let l = load::request_response(&mut c, 64, Duration::from_millis(100), None)
            .unwrap_or_else(|e| panic!("{e}\n{}", pair.logs()));
        assert!(!l.samples_ns.is_empty());
        drop(c);
        let want = [
            format!("source_principal=\"{A_ID}\""),
            format!("destination_principal=\"{B_ID}\""),
            "connection_security_policy=\"mutual_tls\"".to_string(),
        ];
        if let Err(m) =
            pair.wait_for_series(Pod::B, "istio_tcp_connections_closed_total", &want, WAIT)
        {
            panic!("no mTLS connection on B:\n{m}");
        }
        let x = pair.outside().expect("host X");
        let x_app: SocketAddr = SocketAddrV4::new(X_IP, 9000).into();
        let _x_echo = Server::echo(x, x_app).unwrap();
        let mut c = pair.ns(Pod::A).run(|| load::connect(x_app, None)).unwrap();
        load::request_response(&mut c, 8, Duration::from_millis(50), None).unwrap();

        assert_eq!(pair.stop_proxy(Pod::A, WAIT), Some(0));
        assert!(pair.start_proxy(Pod::A).unwrap() > Duration::ZERO);
        assert!(pair.start_proxy(Pod::A).is_err(), "already running");
        pair.sigterm_proxy(Pod::B).unwrap();
        assert_eq!(
            pair.wait_proxy_exit(Pod::B, WAIT),
            Some(0),
            "{}",
            pair.logs()
        );
        let saved = tempfile::tempdir().unwrap();
        pair.save_logs(saved.path()).unwrap();
        assert!(saved.path().join("b-proxy.log").is_file());
    }
}
