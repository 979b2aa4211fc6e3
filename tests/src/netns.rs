//! Network namespaces as test "pods": created with `ip netns`, removed on drop.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// A named network namespace under `/run/netns`, deleted on drop.
pub struct NetNs {
    name: String,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl NetNs {
    /// Creates a uniquely named namespace (`st-<prefix>-<pid>-<n>`) with `lo` up.
    pub fn new(prefix: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("st-{prefix}-{}-{n}", std::process::id());
        ip(&["netns", "add", &name]);
        let ns = NetNs { name };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Path to bind-mounted namespace file (what OCI specs carry).
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs a command inside the namespace and returns its output.
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .expect("spawn ip netns exec")
    }

    /// Runs a command inside the namespace; panics with its stderr on failure.
    pub fn exec_ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "in netns {}: {:?} failed: {}",
            self.name,
            args,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A `Command` that will run `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Joins two namespaces with a veth pair and assigns addresses (CIDR strings,
/// IPv4 and optionally IPv6) to each end; links come up.
pub fn veth_pair(a: &NetNs, a_addrs: &[&str], b: &NetNs, b_addrs: &[&str]) {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let (va, vb) = (
        format!("va{}x{n}", std::process::id() % 10000),
        format!("vb{}x{n}", std::process::id() % 10000),
    );
    ip(&[
        "link",
        "add",
        &va,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        &vb,
        "netns",
        b.name(),
    ]);
    for (ns, dev, addrs) in [(a, &va, a_addrs), (b, &vb, b_addrs)] {
        for addr in addrs {
            let family = if addr.contains(':') { "-6" } else { "-4" };
            ns.exec_ok(&["ip", family, "addr", "add", addr, "dev", dev, "nodad"]);
        }
        ns.exec_ok(&["ip", "link", "set", dev, "up"]);
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("spawn ip");
    assert!(
        out.status.success(),
        "ip {:?} failed: {}",
        args,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Moves the calling thread into the network namespace at `netns` (a
/// `/run/netns` file or `/proc/<pid>/ns/net`); setns is per thread.
pub fn enter(netns: &Path) -> std::io::Result<()> {
    let file = std::fs::File::open(netns)?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
}

impl NetNs {
    /// Runs `f` on a fresh thread that has entered this namespace (setns is
    /// per thread, so the caller's thread stays where it is). Sockets `f`
    /// creates belong to the namespace and may be returned and used anywhere.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(move || {
                enter(Path::new(&path)).expect("enter netns");
                f()
            })
            .join()
            .expect("thread in netns panicked")
        })
    }
}
