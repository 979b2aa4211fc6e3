//! Shared by the integration tests that run real `sidetunnel-proxy`
//! processes in network-namespace "pods" (dataplane.rs, faults.rs): a
//! "node" netns with a bridge and a real `sidetunnel-meshd` (control plane
//! and CA) on `NODE_IP:15012`, pods A and B with the redirection ruleset of
//! `sidetunnel-redirect` and a proxy each, and an out-of-mesh host X. Apps
//! are plain sockets created inside the namespaces.
//!
//! The control plane is *not* excluded from the pods' outbound capture: the
//! proxy's xDS and CA connections carry its mark, which the ruleset exempts.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sidetunnel_redirect::RedirectConfig;
use sidetunnel_tests::netns::NetNs;
use sidetunnel_tests::topology::{self, MeshdServe};
pub use sidetunnel_tests::topology::{Proc, http_get_on};
use sidetunnel_tests::{bins, prereq};

pub const NODE_IP: &str = "10.88.0.1";
pub const A_IP: &str = "10.88.0.2";
pub const B_IP: &str = "10.88.0.3";
pub const X_IP: &str = "10.88.0.50";
pub const VIP: &str = "10.96.0.10";
pub const NODE_IP6: &str = "fd00:88::1";
pub const A_IP6: &str = "fd00:88::2";
pub const B_IP6: &str = "fd00:88::3";
pub const X_IP6: &str = "fd00:88::50";
pub const VIP6: &str = "fd00:96::10";
/// Where meshd serves xDS and the CA in the node netns.
pub const CP_PORT: u16 = 15012;
pub const APP_PORT: u16 = 8080;
/// Port on B that bypasses B's proxy (for the direct-path baseline).
pub const DIRECT_PORT: u16 = 9999;
pub const EXT_PORT: u16 = 9000;
/// The proxy's packet mark (its default).
pub const MARK: u32 = 0x539;
/// Generous bound for anything that waits (slow, busy 2-core machine).
pub const WAIT: Duration = Duration::from_secs(30);
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
pub const SERVER_NAME: &str = "istiod.istio-system.svc";

pub const A_ID: &str = "spiffe://cluster.local/ns/ns-a/sa/sa-a";
pub const B_ID: &str = "spiffe://cluster.local/ns/ns-b/sa/sa-b";

/// The inventory of A, B and B's service (VIP port 80 → 8080), optionally
/// dual-stack, optionally with a DENY policy for A's principal on B.
pub fn inventory(deny_a: bool, ipv6: bool) -> String {
    let (a, b, vips) = if ipv6 {
        (
            format!("{A_IP}, {A_IP6}"),
            format!("{B_IP}, {B_IP6}"),
            format!("{VIP}, {VIP6}"),
        )
    } else {
        (A_IP.to_string(), B_IP.to_string(), VIP.to_string())
    };
    let mut s = topology::inventory_with_addresses(&a, &b, &vips);
    if deny_a {
        s.push_str(DENY_A_POLICY);
    }
    s
}

pub const DENY_A_POLICY: &str = r#"policies:
  - name: deny-a
    namespace: ns-b
    action: Deny
    rules:
      - clauses:
          - matches:
              - principals: ["cluster.local/ns/ns-a/sa/sa-a"]
"#;

pub fn run_ok(cmd: &mut Command) -> String {
    sidetunnel_tests::cmd::run_ok(cmd, WAIT).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Runs `f` with its sockets inside `ns`.
pub fn in_ns<T: Send>(ns: &NetNs, f: impl FnOnce() -> T + Send) -> T {
    ns.run(f)
}

/// How [`Mesh::start_opts`] sets things up.
pub struct Options {
    pub inventory: String,
    /// Extra `sidetunnel-meshd serve` arguments (e.g. `--max-cert-ttl`).
    pub meshd_args: Vec<String>,
    /// Start meshd before the proxies.
    pub meshd: bool,
    pub a_flags: Vec<String>,
    pub b_flags: Vec<String>,
    /// Dual-stack pods (IPv6 addresses on the bridge and in the inventory).
    pub ipv6: bool,
    /// Wait for both proxies to report ready.
    pub wait_ready: bool,
    /// Run A's proxy as this uid/gid with only CAP_NET_ADMIN and
    /// CAP_NET_RAW (ambient), as the shim starts it.
    pub a_uid: Option<u32>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            inventory: inventory(false, false),
            meshd_args: Vec::new(),
            meshd: true,
            a_flags: Vec::new(),
            b_flags: Vec::new(),
            ipv6: false,
            wait_ready: true,
            a_uid: None,
        }
    }
}

/// Identity and addresses of a pod.
#[derive(Clone, Copy)]
pub struct Pod {
    pub name: &'static str,
    pub namespace: &'static str,
    pub sa: &'static str,
    pub ip: &'static str,
    pub ip6: &'static str,
}

pub const POD_A: Pod = Pod {
    name: "a",
    namespace: "ns-a",
    sa: "sa-a",
    ip: A_IP,
    ip6: A_IP6,
};
pub const POD_B: Pod = Pod {
    name: "b",
    namespace: "ns-b",
    sa: "sa-b",
    ip: B_IP,
    ip6: B_IP6,
};

/// The whole set-up: node netns with a bridge and meshd, pods A and B with
/// proxies and redirection, out-of-mesh host X.
pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub ipv6: bool,
    // Drop order: processes first, then namespaces.
    pub proxies: Vec<(String, Proc)>,
    pub meshds: Vec<Proc>,
    pub a: NetNs,
    pub b: NetNs,
    pub x: NetNs,
    pub node: NetNs,
    meshd_args: Vec<String>,
}

impl Mesh {
    pub fn start(test: &str) -> Option<Mesh> {
        Self::start_opts(test, Options::default())
    }

    /// Like `start`, with extra flags for B's proxy.
    pub fn start_with(test: &str, b_flags: &[&str]) -> Option<Mesh> {
        Self::start_opts(
            test,
            Options {
                b_flags: b_flags.iter().map(|s| s.to_string()).collect(),
                ..Options::default()
            },
        )
    }

    pub fn start_opts(test: &str, o: Options) -> Option<Mesh> {
        if !(prereq::root(test) && prereq::binary(test, "ip") && prereq::binary(test, "nft")) {
            return None;
        }
        if o.a_uid.is_some() && !prereq::binary(test, "setpriv") {
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let node = topology::bridge_node("dpn", o.ipv6);
        let attach = |prefix: &str, ip: &str, ip6: &str| {
            let ip6 = o.ipv6.then(|| ip6.parse().unwrap());
            topology::attach_pod(&node, prefix, ip.parse().unwrap(), ip6)
                .unwrap_or_else(|e| panic!("{e:#}"))
        };
        let a = attach("dpa", A_IP, A_IP6);
        let b = attach("dpb", B_IP, B_IP6);
        let x = attach("dpx", X_IP, X_IP6);

        let d = dir.path().to_str().unwrap().to_string();
        run_ok(Command::new(meshd_bin()).args(["init", "--dir", &d]));
        write_atomic(&dir.path().join("inventory.yaml"), &o.inventory);

        let mut mesh = Mesh {
            dir,
            ipv6: o.ipv6,
            proxies: Vec::new(),
            meshds: Vec::new(),
            a,
            b,
            x,
            node,
            meshd_args: o.meshd_args,
        };
        if o.meshd {
            mesh.start_meshd(CP_PORT);
        }
        // No exclusion for the control plane: the proxy's xDS and CA
        // connections carry its mark, which the ruleset lets through.
        let redirect = RedirectConfig {
            exclude_inbound_ports: [DIRECT_PORT].into(),
            ..Default::default()
        };
        for ns in [&mesh.a, &mesh.b] {
            sidetunnel_redirect::install(Path::new(&ns.path()), &redirect)
                .expect("install redirection");
        }
        let a_flags: Vec<&str> = o.a_flags.iter().map(String::as_str).collect();
        let b_flags: Vec<&str> = o.b_flags.iter().map(String::as_str).collect();
        let p = mesh.spawn_proxy(POD_A, &a_flags, o.a_uid);
        mesh.proxies.push(("a".into(), p));
        let p = mesh.spawn_proxy(POD_B, &b_flags, None);
        mesh.proxies.push(("b".into(), p));
        if o.wait_ready {
            for name in ["a", "b"] {
                mesh.wait_ready(name);
            }
        }
        Some(mesh)
    }

    pub fn ns(&self, name: &str) -> &NetNs {
        match name {
            "a" => &self.a,
            "b" => &self.b,
            "x" => &self.x,
            _ => &self.node,
        }
    }

    pub fn ip(name: &str) -> &'static str {
        if name == "a" { A_IP } else { B_IP }
    }

    /// The control plane's address.
    pub fn cp(&self) -> SocketAddr {
        SocketAddr::new(NODE_IP.parse().unwrap(), CP_PORT)
    }

    /// Starts `sidetunnel-meshd serve` in the node netns on `NODE_IP:port`
    /// with the options' extra arguments (more meshds on other ports share
    /// the same state directory, hence the same CA and inventory).
    pub fn start_meshd(&mut self, port: u16) -> SocketAddr {
        let n = self.meshds.len();
        let serve = MeshdServe {
            bin: &meshd_bin(),
            dir: self.dir.path(),
            listen: SocketAddr::new(NODE_IP.parse().unwrap(), port),
            extra_args: &self.meshd_args,
            log: &self.dir.path().join(format!("meshd-{port}-{n}.log")),
        };
        let (proc, addr) =
            topology::spawn_meshd(&self.node, &serve).unwrap_or_else(|e| panic!("{e:#}"));
        self.meshds.push(proc);
        addr
    }

    /// Kills (SIGKILL) every running meshd.
    pub fn kill_meshds(&mut self) {
        self.meshds.clear();
    }

    /// Kills (SIGKILL) the `i`-th started (still registered) meshd.
    pub fn kill_meshd(&mut self, i: usize) {
        drop(self.meshds.remove(i));
    }

    /// Starts pod `pod`'s proxy (with a fresh token) and registers it as
    /// `pod.name`, replacing an earlier one.
    pub fn start_proxy(&mut self, pod: Pod, extra: &[&str]) {
        let p = self.spawn_proxy(pod, extra, None);
        self.proxies.retain(|(n, _)| n != pod.name);
        self.proxies.push((pod.name.to_string(), p));
    }

    /// Where pod `name`'s proxy keeps its admin socket.
    pub fn admin_path(&self, name: &str) -> PathBuf {
        self.dir
            .path()
            .join(format!("run-{name}"))
            .join("admin.sock")
    }

    fn spawn_proxy(&self, pod: Pod, extra: &[&str], uid: Option<u32>) -> Proc {
        let d = self.dir.path();
        let token = run_ok(Command::new(meshd_bin()).args([
            "token",
            "--dir",
            d.to_str().unwrap(),
            "--namespace",
            pod.namespace,
            "--service-account",
            pod.sa,
        ]));
        let token_file = d.join(format!("{}.token", pod.name));
        std::fs::write(&token_file, token.trim()).unwrap();
        let run_dir = d.join(format!("run-{}", pod.name));
        let _ = std::fs::create_dir(&run_dir);
        if let Some(uid) = uid {
            // The proxy user reads its token and the roots and owns its
            // runtime directory (the shim sets it up the same way).
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
            let owner = Some(nix::unistd::Uid::from_raw(uid));
            let group = Some(nix::unistd::Gid::from_raw(uid));
            for p in [&token_file, &run_dir] {
                nix::unistd::chown(p, owner, group).unwrap();
            }
        }
        let log = d.join(format!("{}-proxy.log", pod.name));
        let proxy = bins::path("sidetunnel-proxy");
        let mut cmd = match uid {
            None => self.ns(pod.name).command(proxy.to_str().unwrap()),
            Some(uid) => {
                let mut c = self.ns(pod.name).command("setpriv");
                c.args(["--reuid", &uid.to_string(), "--regid", &uid.to_string()])
                    .args(["--clear-groups", "--inh-caps", "-all,+net_admin,+net_raw"])
                    .args(["--ambient-caps", "+net_admin,+net_raw"])
                    .args(["--bounding-set", "-all,+net_admin,+net_raw"])
                    .arg(proxy);
                c
            }
        };
        let mut ips = pod.ip.to_string();
        if self.ipv6 {
            ips = format!("{ips},{}", pod.ip6);
        }
        let child = cmd
            .arg("run")
            .args(["--pod-namespace", pod.namespace, "--pod-name", pod.name])
            .args(["--service-account", pod.sa, "--pod-ip", &ips])
            .args(["--xds-address", &self.cp().to_string()])
            .args(["--xds-server-name", SERVER_NAME])
            .args(["--xds-root-cert", d.join("root-cert.pem").to_str().unwrap()])
            .args(["--token-file", token_file.to_str().unwrap()])
            .args([
                "--admin-socket",
                self.admin_path(pod.name).to_str().unwrap(),
            ])
            .args(["--drain-grace-period", "4s", "--log-format", "json"])
            .args(["--log-level", "info,access=debug"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn sidetunnel-proxy");
        Proc { child, log }
    }

    pub fn proxy(&mut self, name: &str) -> &mut Proc {
        &mut self
            .proxies
            .iter_mut()
            .find(|(n, _)| n == name)
            .expect("proxy")
            .1
    }

    pub fn logs(&self) -> String {
        let mut s: String = self
            .proxies
            .iter()
            .map(|(n, p)| format!("--- proxy {n} log tail ---\n{}\n", p.log_tail(40)))
            .collect();
        for m in &self.meshds {
            s.push_str(&format!("--- meshd log tail ---\n{}\n", m.log_tail(40)));
        }
        s
    }

    /// GET from the node netns (kubelet's vantage point); (status, body).
    pub fn http_get(&self, addr: &str, path: &str) -> std::io::Result<(u16, String)> {
        let addr: SocketAddr = addr.parse().unwrap();
        let mut s = in_ns(&self.node, || TcpStream::connect_timeout(&addr, IO_TIMEOUT))?;
        http_get_on(&mut s, path)
    }

    /// Readiness of pod `name`'s proxy: (status, body).
    pub fn readiness(&self, name: &str) -> std::io::Result<(u16, String)> {
        self.http_get(&format!("{}:15021", Self::ip(name)), "/healthz/ready")
    }

    pub fn wait_ready(&self, name: &str) {
        let deadline = Instant::now() + WAIT;
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.readiness(name) {
                Ok((200, body)) => {
                    assert_eq!(body, "ready\n");
                    return;
                }
                Ok((code, body)) => last = format!("{code} {body}"),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "proxy {name} not ready within {WAIT:?} (last: {last})\n{}",
            self.logs()
        );
    }

    pub fn metrics(&self, name: &str) -> String {
        let (code, body) = self
            .http_get(&format!("{}:15020", Self::ip(name)), "/metrics")
            .expect("scrape metrics");
        assert_eq!(code, 200);
        body
    }

    /// Polls pod `name`'s metrics until `metric`, summed over the series
    /// carrying every pair in `labels` (see [`sample`]), reaches `at_least`;
    /// that sum. `at_least` 0 waits for the series to exist.
    pub fn eventually_counted(
        &self,
        name: &str,
        metric: &str,
        labels: &[(&str, &str)],
        at_least: f64,
    ) -> f64 {
        let what = format!("{metric} {labels:?} >= {at_least} on {name}");
        eventually(&what, || {
            sample(&self.metrics(name), metric, labels).filter(|v| *v >= at_least)
        })
    }

    /// GET on pod `name`'s admin socket; the body.
    pub fn admin(&self, name: &str, path: &str) -> String {
        let mut s = UnixStream::connect(self.admin_path(name)).expect("admin socket");
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.split_once("\r\n\r\n")
            .map(|x| x.1.to_string())
            .unwrap_or_default()
    }

    pub fn config_dump(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.admin(name, "/config_dump")).expect("config dump JSON")
    }

    /// Serial of the certificate pod `name`'s proxy holds.
    pub fn cert_serial(&self, name: &str) -> Option<String> {
        let v = self.config_dump(name)["certificates"][0]["serial"].clone();
        match v {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some(s),
            other => Some(other.to_string()),
        }
    }

    /// Connects from `from` to `dst` and reads the app's greeting (see
    /// [`start_echo`]), which must name `source_ip` as the client's address:
    /// the path kept the original source. The connection, for more traffic.
    pub fn connect_expecting_source(&self, from: &NetNs, dst: &str, source_ip: &str) -> TcpStream {
        let mut c = connect_from(from, dst).unwrap_or_else(|e| panic!("connect to {dst}: {e}"));
        let peer =
            greeting(&mut c).unwrap_or_else(|| panic!("no greeting via {dst}\n{}", self.logs()));
        let want: std::net::IpAddr = source_ip.parse().expect("source IP");
        let seen = peer.parse::<SocketAddr>().map(|a| a.ip()).ok();
        assert_eq!(
            seen,
            Some(want),
            "the app behind {dst} saw {peer}, not {source_ip}"
        );
        c
    }

    pub fn set_inventory(&self, yaml: &str) {
        write_atomic(&self.dir.path().join("inventory.yaml"), yaml);
    }
}

pub fn meshd_bin() -> PathBuf {
    bins::path("sidetunnel-meshd")
}

pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// An app: for each connection, first writes `peer=<client addr>\n`, then
/// echoes. A thread per connection, all detached; the listener lives in
/// `ns`. The returned counter counts accepted connections and the bytes
/// they received.
pub fn start_echo(ns: &NetNs, ip: &str, port: u16) -> Arc<AppStats> {
    let addr = SocketAddr::new(ip.parse().unwrap(), port);
    let listener = in_ns(ns, || TcpListener::bind(addr)).expect("bind app");
    let stats = Arc::new(AppStats::default());
    let s = stats.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            if s.stop.load(Ordering::Relaxed) {
                break;
            }
            let Ok(mut c) = conn else { continue };
            s.accepted.fetch_add(1, Ordering::Relaxed);
            let s = s.clone();
            std::thread::spawn(move || {
                let peer = c.peer_addr().map(|p| p.to_string()).unwrap_or_default();
                if writeln!(c, "peer={peer}").is_err() {
                    return;
                }
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            s.bytes.fetch_add(n as u64, Ordering::Relaxed);
                            if c.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = c.shutdown(Shutdown::Write);
            });
        }
    });
    stats
}

/// What an app started with [`start_echo`] saw.
#[derive(Default)]
pub struct AppStats {
    pub accepted: AtomicU64,
    pub bytes: AtomicU64,
    pub stop: AtomicBool,
}

impl AppStats {
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// Connects from inside `ns` (an unmodified client: no mark, plain TCP).
pub fn connect_from(ns: &NetNs, dst: &str) -> std::io::Result<TcpStream> {
    let addr: SocketAddr = dst.parse().unwrap();
    let s = in_ns(ns, || TcpStream::connect_timeout(&addr, IO_TIMEOUT))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Reads the server's `peer=` greeting; `None` if the connection closed first.
pub fn greeting(s: &mut TcpStream) -> Option<String> {
    let mut line = String::new();
    let mut r = BufReader::new(s.try_clone().ok()?);
    match r.read_line(&mut line) {
        Ok(n) if n > 0 => Some(line.trim().strip_prefix("peer=")?.to_string()),
        _ => None,
    }
}

/// Connects from `ns` to `dst` and returns the app's greeting (`None`: the
/// connection was refused, reset or closed before the app answered).
pub fn reach(ns: &NetNs, dst: &str) -> Option<String> {
    greeting(&mut connect_from(ns, dst).ok()?)
}

pub fn echo_roundtrip(s: &mut TcpStream, payload: &[u8]) -> std::io::Result<()> {
    s.write_all(payload)?;
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back)?;
    assert_eq!(back, payload, "echo mismatch");
    Ok(())
}

/// The value of the first sample of `name` whose label set contains every
/// `label="value"` pair in `labels` (summed over matching series).
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

/// Polls `f` until it returns `Some` or `WAIT` passes.
pub fn eventually<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    eventually_within(WAIT, what, f)
}

/// Polls `f` until it returns `Some` or `limit` passes.
pub fn eventually_within<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Established TCP sockets in `ns` whose peer is `peer`, as `ss -tnie`
/// lines (each carries `fwmark:0x…` when the socket is marked).
pub fn sockets_to(ns: &NetNs, peer: SocketAddr) -> Vec<String> {
    let out = ns.exec_ok(&[
        "ss",
        "-tnHe",
        "state",
        "established",
        "dst",
        &peer.to_string(),
    ]);
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}
