//! The mesh side of a node whose pods run through the harness containerd:
//! a real `sidetunnel-meshd` (control plane and CA) listening on the harness
//! bridge's gateway address (where pods reach the node), the shim's node
//! config pointing at it, bearer tokens placed where that config's
//! `token.path_template` finds them, and readers for a pod proxy's metrics,
//! admin API and shim record. Shared by `cargo xtask demo` and the packaging
//! test, so both run the real proxy against a real control plane.

pub mod metrics;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cmd::run_ok;
use crate::containerd::Containerd;

/// The TLS name meshd's serving certificate carries (as istiod's does).
pub const XDS_SERVER_NAME: &str = "istiod.istio-system.svc";
/// Cluster id meshd serves and the node config announces.
pub const CLUSTER_ID: &str = "Kubernetes";
const WAIT: Duration = Duration::from_secs(30);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// meshd's state directory, its running `serve` process (once started) and
/// the tokens it minted.
pub struct MeshNode {
    meshd_bin: PathBuf,
    meshd: Option<Child>,
    addr: Option<SocketAddr>,
    dir: tempfile::TempDir,
}

/// How the shim's node config for this mesh is rendered.
#[derive(Debug, Clone)]
pub struct NodeConfigParams {
    /// `proxy.binary`.
    pub proxy_binary: PathBuf,
    /// `proxy.state_root`.
    pub state_root: PathBuf,
    /// `proxy.readiness_timeout`.
    pub readiness_timeout: String,
    /// The proxy's log filter (`SIDETUNNEL_LOG_LEVEL`).
    pub log_level: String,
}

impl MeshNode {
    /// Creates meshd's directory and its PKI (`sidetunnel-meshd init`).
    pub fn init(meshd_bin: &Path) -> Result<MeshNode> {
        let dir = tempfile::Builder::new().prefix("st-mesh-").tempdir()?;
        // The proxy user traverses nothing here (the shim copies the token
        // and the root certificate), but keep it readable for operators.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        std::fs::create_dir(dir.path().join("tokens"))?;
        run_ok(
            Command::new(meshd_bin)
                .arg("init")
                .arg("--dir")
                .arg(dir.path()),
            WAIT,
        )
        .context("sidetunnel-meshd init")?;
        Ok(MeshNode {
            meshd_bin: meshd_bin.to_owned(),
            meshd: None,
            addr: None,
            dir,
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn inventory_path(&self) -> PathBuf {
        self.dir.path().join("inventory.yaml")
    }

    pub fn root_cert(&self) -> PathBuf {
        self.dir.path().join("root-cert.pem")
    }

    /// Where the node config's `token.path_template` points.
    pub fn token_template(&self) -> String {
        format!(
            "{}/tokens/{{pod_namespace}}/{{pod_name}}/token",
            self.dir.path().display()
        )
    }

    /// The control plane's address (after [`MeshNode::serve`]).
    pub fn xds_address(&self) -> Result<SocketAddr> {
        self.addr.context("meshd is not serving yet")
    }

    /// Replaces the inventory atomically (meshd watches the file).
    pub fn set_inventory(&self, yaml: &str) -> Result<()> {
        let path = self.inventory_path();
        let tmp = path.with_extension("yaml.tmp");
        std::fs::write(&tmp, yaml).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))
    }

    /// Starts `sidetunnel-meshd serve` on the harness bridge's gateway
    /// address (creating the bridge first: CNI creates it only with the
    /// first pod), serving the current inventory file. After
    /// [`MeshNode::stop`] it serves again on the same address, so proxies
    /// configured with it reconnect.
    pub fn serve(&mut self, h: &Containerd) -> Result<SocketAddr> {
        ensure_bridge(h)?;
        if self.meshd.is_some() {
            bail!("sidetunnel-meshd is already serving");
        }
        if !self.inventory_path().exists() {
            self.set_inventory("workloads: []\n")?;
        }
        let listen = match self.addr {
            Some(addr) => addr.to_string(),
            None => format!("{}:0", h.gateway()),
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("meshd.log"))?;
        let mut child = Command::new(&self.meshd_bin)
            .arg("serve")
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--inventory")
            .arg(self.inventory_path())
            .args(["--listen", &listen])
            .args(["--cluster-id", CLUSTER_ID, "--poll-interval", "200ms"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.meshd_bin.display()))?;
        let stdout = child.stdout.take().context("meshd stdout")?;
        self.meshd = Some(child);
        let addr = meshd_listen_addr(stdout, WAIT).map_err(|line| {
            anyhow::anyhow!(
                "sidetunnel-meshd did not start (stdout {line:?}); log:\n{}",
                self.log_tail(30)
            )
        })?;
        self.addr = Some(addr);
        Ok(addr)
    }

    /// Last lines of meshd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("meshd.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Mints the pod's service-account token (audience `istio-ca`) and puts
    /// it where `token.path_template` finds it, as the kubelet's projected
    /// `istio-token` volume would.
    pub fn mint_token(&self, namespace: &str, pod: &str, uid: &str, sa: &str) -> Result<PathBuf> {
        self.minter().mint(namespace, pod, uid, sa)
    }

    /// A handle that mints tokens for this meshd from another thread.
    pub fn minter(&self) -> TokenMinter {
        TokenMinter {
            meshd_bin: self.meshd_bin.clone(),
            dir: self.dir.path().to_owned(),
        }
    }

    /// The shim's node config (`config.toml`) for pods on `h` meshed by this
    /// meshd. Nothing is excluded from capture: the proxy's xDS and CA
    /// sockets carry the proxy mark like every other socket it opens.
    pub fn node_config(&self, h: &Containerd, p: &NodeConfigParams) -> Result<String> {
        let addr = self.xds_address()?;
        let s = |v: &str| toml::Value::String(v.to_owned()).to_string();
        Ok(format!(
            r#"# Generated for a harness containerd ({bridge}).
[mesh]
xds_address = {xds}
root_cert = {root}
trust_domain = "cluster.local"
cluster_id = {cluster}

[proxy]
binary = {proxy}
state_root = {state}
readiness_timeout = {ready}
drain_grace = "2s"
restart_backoff_initial = "200ms"
restart_backoff_max = "5s"
# meshd's serving certificate names istiod, not the bridge address.
env = {{ SIDETUNNEL_XDS_SERVER_NAME = {server_name}, SIDETUNNEL_LOG_LEVEL = {log} }}

[token]
path_template = {token}
required = true
refresh_interval = "30s"
"#,
            bridge = h.bridge(),
            xds = s(&addr.to_string()),
            root = s(&self.root_cert().to_string_lossy()),
            cluster = s(CLUSTER_ID),
            proxy = s(&p.proxy_binary.to_string_lossy()),
            state = s(&p.state_root.to_string_lossy()),
            ready = s(&p.readiness_timeout),
            server_name = s(XDS_SERVER_NAME),
            log = s(&p.log_level),
            token = s(&self.token_template()),
        ))
    }

    /// Stops meshd (SIGTERM, then SIGKILL after 5 s): the control plane and
    /// CA are down until the next [`MeshNode::serve`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.meshd.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for MeshNode {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Mints service-account tokens with meshd's key (`sidetunnel-meshd
/// token`) into meshd's token directory.
#[derive(Debug, Clone)]
pub struct TokenMinter {
    meshd_bin: PathBuf,
    dir: PathBuf,
}

impl TokenMinter {
    /// See [`MeshNode::mint_token`].
    pub fn mint(&self, namespace: &str, pod: &str, uid: &str, sa: &str) -> Result<PathBuf> {
        let jwt = run_ok(
            Command::new(&self.meshd_bin)
                .arg("token")
                .arg("--dir")
                .arg(&self.dir)
                .args(["--namespace", namespace, "--service-account", sa])
                .args(["--pod-name", pod, "--pod-uid", uid, "--ttl", "2h"]),
            WAIT,
        )
        .context("sidetunnel-meshd token")?;
        let file = self.dir.join("tokens").join(namespace).join(pod);
        std::fs::create_dir_all(&file)?;
        let file = file.join("token");
        std::fs::write(&file, jwt.trim())?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
        Ok(file)
    }
}

/// Whether test `test` can run meshed pods through the harness containerd
/// (root, containerd, runc, nft, the busybox image's binary and the CNI
/// bridge plugin); skips with the missing piece named (fails under CI).
pub fn node_prerequisites(test: &str) -> bool {
    use crate::{containerd, image, prereq};
    prereq::root(test)
        && prereq::binary(test, &containerd::containerd_bin().to_string_lossy())
        && prereq::binary(test, "runc")
        && prereq::binary(test, "nft")
        && prereq::binary(test, image::BUSYBOX_BIN)
        && prereq::binary(test, &format!("{}/bridge", containerd::CNI_BIN_DIR))
}

/// Waits up to `timeout` for the line `sidetunnel-meshd serve` prints on
/// stdout once it listens (`sidetunnel-meshd listening on <addr>`) and
/// returns that address; otherwise the line it printed instead (empty when
/// none), for the caller's error message.
pub fn meshd_listen_addr(
    stdout: ChildStdout,
    timeout: Duration,
) -> std::result::Result<SocketAddr, String> {
    // A thread, because a blocking read has no timeout of its own.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(timeout).unwrap_or_default();
    line.trim()
        .strip_prefix("sidetunnel-meshd listening on ")
        .and_then(|a| a.parse().ok())
        .ok_or(line)
}

/// Creates the harness's bridge with its gateway address if CNI has not yet
/// (the CNI bridge plugin adopts an existing bridge and address; the
/// harness deletes the bridge when it stops).
pub fn ensure_bridge(h: &Containerd) -> Result<()> {
    let bridge = h.bridge();
    if !Path::new("/sys/class/net").join(&bridge).exists() {
        run_ok(
            Command::new("ip").args(["link", "add", &bridge, "type", "bridge"]),
            WAIT,
        )?;
    }
    let cidr = format!("{}/{}", h.gateway(), h.subnet().prefix_len());
    let shown = run_ok(
        Command::new("ip").args(["-4", "addr", "show", "dev", &bridge]),
        WAIT,
    )?;
    if !shown.contains(&cidr) {
        run_ok(
            Command::new("ip").args(["addr", "add", &cidr, "dev", &bridge]),
            WAIT,
        )?;
    }
    pin_bridge_mac(&bridge)?;
    run_ok(
        Command::new("ip").args(["link", "set", &bridge, "up"]),
        WAIT,
    )?;
    Ok(())
}

/// Fixes the bridge's MAC address. A Linux bridge whose address was never
/// set takes the lowest MAC of its ports, so a pod created later (its veth
/// joining with a lower MAC) silently changes the gateway's MAC: the other
/// pods keep the old one in their neighbour cache until the entry goes
/// stale (seconds to tens of seconds) and the host drops their packets to
/// the gateway, where meshd listens, meanwhile. That stalled established
/// xDS streams, so a proxy's on-demand lookup got no answer within 5 s
/// (the shim_mesh flake, about one run in three).
pub fn pin_bridge_mac(bridge: &str) -> Result<()> {
    let path = Path::new("/sys/class/net").join(bridge).join("address");
    let mac =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    run_ok(
        Command::new("ip").args(["link", "set", "dev", bridge, "address", mac.trim()]),
        WAIT,
    )?;
    Ok(())
}

/// The shim's record of a sandbox (`<state_root>/<sandbox id>/shim.json`).
pub fn shim_record(state_root: &Path, sandbox_id: &str) -> Result<serde_json::Value> {
    let p = state_root.join(sandbox_id).join("shim.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// The pod proxy's admin socket.
pub fn admin_socket(state_root: &Path, sandbox_id: &str) -> PathBuf {
    state_root.join(sandbox_id).join("proxy").join("admin.sock")
}

/// `GET path` on a proxy's admin socket; returns the body of a 200.
pub fn admin_get(socket: &Path, path: &str) -> Result<String> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n")?;
    response(&mut s, &format!("admin {path}"))
}

/// `GET path` over TCP from the host (e.g. a pod proxy's metrics port);
/// returns the body of a 200.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    response(&mut s, &format!("http://{addr}{path}"))
}

fn response(s: &mut impl Read, what: &str) -> Result<String> {
    let mut out = String::new();
    s.read_to_string(&mut out)
        .with_context(|| format!("reading {what}"))?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let code = head.get(9..12).unwrap_or_default();
    if code != "200" {
        bail!("{what}: status {code:?}: {}", body.trim());
    }
    Ok(body.to_owned())
}

/// Resident set size of a process in KiB (`VmRSS`).
pub fn rss_kib(pid: i32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// The running proxy's pid from the shim's record, once the launcher has
/// exec'd it (so its RSS is the proxy's).
pub fn proxy_pid(state_root: &Path, sandbox_id: &str) -> Result<i32> {
    let rec = shim_record(state_root, sandbox_id)?;
    let pid = rec["proxy_pid"]
        .as_i64()
        .with_context(|| format!("no proxy_pid in the shim record: {rec}"))? as i32;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .with_context(|| format!("proxy pid {pid} is not running"))?;
    if String::from_utf8_lossy(&cmdline).contains("__launch-proxy") {
        bail!("proxy pid {pid} has not exec'd the proxy yet");
    }
    Ok(pid)
}

/// Waits until the proxy of `sandbox_id` holds workload `namespace/name`
/// in its config (meshd pushed an inventory update, or an on-demand fetch
/// resolved it). A pod's own workload matters: its inbound HBONE is
/// answered 503 until the proxy knows it.
pub async fn wait_workload_known(
    state_root: &Path,
    sandbox_id: &str,
    namespace: &str,
    name: &str,
    limit: Duration,
) -> Result<()> {
    let sock = admin_socket(state_root, sandbox_id);
    let deadline = Instant::now() + limit;
    loop {
        let last = match admin_get(&sock, "/config_dump") {
            Ok(body) => {
                let dump: serde_json::Value = serde_json::from_str(&body)?;
                let known = dump["workloads"].as_array().is_some_and(|ws| {
                    ws.iter()
                        .any(|w| w["name"] == name && w["namespace"] == namespace)
                });
                if known {
                    return Ok(());
                }
                "not in the proxy's config dump yet".to_string()
            }
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!(
                "the proxy of sandbox {sandbox_id} did not learn workload {namespace}/{name} \
                 within {limit:?}: {last}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Declares each named `async fn(Mode)` test of the calling file twice, as
/// `istiod::<name>` and `extended::<name>`: against meshd in istiod mode
/// (the default) and in extended mode. The caller imports meshd's `Mode`.
#[macro_export]
macro_rules! in_both_meshd_modes {
    ($($name:ident),* $(,)?) => {
        mod istiod {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Mode::Istiod).await;
                }
            )*
        }
        mod extended {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Mode::Extended).await;
                }
            )*
        }
    };
}
