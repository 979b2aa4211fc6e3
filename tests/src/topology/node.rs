//! Building blocks of a test "node" shared by [`super::PodPair`] and the
//! integration tests' own pod set-ups (`tests/tests/pods_support`): the
//! node netns with its bridge, pods attached to it by veth pairs, a real
//! `sidetunnel-meshd serve` in the node, child processes killed on drop, and
//! a minimal HTTP/1.0 GET for the proxies' readiness and metrics ports.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::mesh::meshd_listen_addr;
use crate::netns::NetNs;

/// The node's address on the bridge, the pods' IPv4 default gateway.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
/// The node's IPv6 address on the bridge (dual-stack set-ups).
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x88, 0, 0, 0, 0, 0, 1);

const WAIT: Duration = Duration::from_secs(30);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A child process, killed (and reaped) on drop; its stderr goes to `log`.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Sends `sig`; panics when the process is already reaped (a test bug).
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("kill");
    }

    pub fn sigterm(&self) {
        self.signal(nix::sys::signal::SIGTERM);
    }

    /// Waits up to `timeout` for the process to exit; its exit code (`None`
    /// while it still runs or when a signal ended it).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// True while the process has not exited.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then SIGKILL after `grace`; returns the exit code.
    pub fn stop(mut self, grace: Duration) -> Option<i32> {
        let pid = nix::unistd::Pid::from_raw(self.pid());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGTERM);
        if let Some(code) = self.wait_exit(grace) {
            return Some(code);
        }
        let _ = self.child.kill();
        self.child.wait().ok()?.code()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A new "node" namespace holding bridge `br0` with [`NODE_IP`]`/24` (and
/// [`NODE_IP6`]`/64` when `ipv6`).
pub fn bridge_node(prefix: &str, ipv6: bool) -> NetNs {
    let node = NetNs::new(prefix);
    // A fixed MAC: a bridge without one takes its ports' lowest and
    // changes it as pods join (see `mesh::pin_bridge_mac`).
    let mac = "02:53:54:00:00:01";
    node.exec_ok(&["ip", "link", "add", "br0", "address", mac, "type", "bridge"]);
    node.exec_ok(&["ip", "addr", "add", &format!("{NODE_IP}/24"), "dev", "br0"]);
    if ipv6 {
        // No duplicate address detection: the address is usable at once.
        let cidr = format!("{NODE_IP6}/64");
        node.exec_ok(&["ip", "-6", "addr", "add", &cidr, "dev", "br0", "nodad"]);
    }
    node.exec_ok(&["ip", "link", "set", "br0", "up"]);
    node
}

/// A pod namespace joined to the bridge of `node` (see [`bridge_node`]) as
/// `eth0` with `ip/24` (and `ip6/64`), default routes via the node.
pub fn attach_pod(
    node: &NetNs,
    prefix: &str,
    ip: Ipv4Addr,
    ip6: Option<Ipv6Addr>,
) -> Result<NetNs> {
    let ns = NetNs::new(prefix);
    // Host-side names must be unique on the node only; the pod side is eth0.
    let host_if = format!("v{prefix}{}", ns.name().rsplit('-').next().unwrap_or("0"));
    crate::cmd::run_ok(
        Command::new("ip").args([
            "link",
            "add",
            &host_if,
            "netns",
            node.name(),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ]),
        WAIT,
    )?;
    node.exec_ok(&["ip", "link", "set", &host_if, "master", "br0", "up"]);
    ns.exec_ok(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    if let Some(ip6) = ip6 {
        let cidr = format!("{ip6}/64");
        ns.exec_ok(&["ip", "-6", "addr", "add", &cidr, "dev", "eth0", "nodad"]);
    }
    ns.exec_ok(&["ip", "link", "set", "eth0", "up"]);
    ns.exec_ok(&["ip", "route", "add", "default", "via", &NODE_IP.to_string()]);
    if ip6.is_some() {
        let gw = NODE_IP6.to_string();
        ns.exec_ok(&["ip", "-6", "route", "add", "default", "via", &gw]);
    }
    Ok(ns)
}

/// What [`spawn_meshd`] starts.
pub struct MeshdServe<'a> {
    /// The `sidetunnel-meshd` binary.
    pub bin: &'a Path,
    /// Its state directory (`init`ed), holding `inventory.yaml`.
    pub dir: &'a Path,
    /// `--listen` (port 0: any free port).
    pub listen: SocketAddr,
    /// More `serve` flags.
    pub extra_args: &'a [String],
    /// Where its stderr goes.
    pub log: &'a Path,
}

/// Starts `sidetunnel-meshd serve` inside `node` on `dir`'s
/// `inventory.yaml` (polled every 100 ms) and waits until it listens; the
/// process and the address it serves xDS and the CA on.
pub fn spawn_meshd(node: &NetNs, m: &MeshdServe<'_>) -> Result<(Proc, SocketAddr)> {
    let mut cmd = Command::new(m.bin);
    cmd.arg("serve")
        .arg("--dir")
        .arg(m.dir)
        .arg("--inventory")
        .arg(m.dir.join("inventory.yaml"))
        .args(["--listen", &m.listen.to_string()])
        .args(["--poll-interval", "100ms"])
        .args(m.extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(
            std::fs::File::create(m.log)
                .with_context(|| format!("creating {}", m.log.display()))?,
        );
    let mut child = node
        .run(move || cmd.spawn())
        .context("spawning sidetunnel-meshd")?;
    let stdout = child.stdout.take().context("meshd stdout")?;
    let proc = Proc {
        child,
        log: m.log.to_owned(),
    };
    match meshd_listen_addr(stdout, WAIT) {
        Ok(addr) => Ok((proc, addr)),
        Err(line) => bail!(
            "sidetunnel-meshd did not start (stdout {line:?}):\n{}",
            proc.log_tail(30)
        ),
    }
}

/// HTTP/1.0 GET on a connected stream: (status, body).
pub fn http_get_on(s: &mut TcpStream, path: &str) -> std::io::Result<(u16, String)> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let host = s.peer_addr()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|x| x.1).unwrap_or_default();
    Ok((code, body.to_string()))
}
