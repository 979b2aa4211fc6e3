//! Shared by the integration tests that run a real `sidetunnel-meshd`
//! process on loopback (xds.rs, scale.rs): its state directory and
//! inventory file, tokens, and the `serve` process (killed on drop).
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sidetunnel_tests::bins;

/// Bound for every wait on a client: generous for a slow, busy machine.
pub const WAIT: Duration = Duration::from_secs(30);

pub fn meshd_bin() -> PathBuf {
    bins::path("sidetunnel-meshd")
}

pub fn run_ok(args: &[&str]) -> String {
    let out = Command::new(meshd_bin())
        .args(args)
        .output()
        .expect("spawn sidetunnel-meshd");
    assert!(
        out.status.success(),
        "sidetunnel-meshd {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// A meshd state directory (CA, keys) plus an inventory file.
pub struct Mesh {
    dir: tempfile::TempDir,
}

impl Mesh {
    pub fn new(inventory: &str) -> Mesh {
        let dir = tempfile::tempdir().expect("tempdir");
        run_ok(&["init", "--dir", dir.path().to_str().unwrap()]);
        let mesh = Mesh { dir };
        mesh.write_inventory(inventory);
        mesh
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Replaces the inventory atomically (meshd must never see half a file).
    pub fn write_inventory(&self, yaml: &str) {
        let tmp = self.path("inventory.yaml.tmp");
        std::fs::write(&tmp, yaml).expect("write inventory");
        std::fs::rename(&tmp, self.path("inventory.yaml")).expect("rename inventory");
    }

    /// Writes a token for `ns`/`sa` to a file and returns its path.
    pub fn token(&self, ns: &str, sa: &str) -> PathBuf {
        let t = run_ok(&[
            "token",
            "--dir",
            self.dir.path().to_str().unwrap(),
            "--namespace",
            ns,
            "--service-account",
            sa,
        ]);
        let path = self.path(&format!("token-{ns}-{sa}"));
        std::fs::write(&path, t.trim()).expect("write token");
        path
    }

    /// meshd in its default mode (istiod's behaviour).
    #[allow(dead_code)]
    pub fn serve(&self, listen: &str) -> Meshd {
        self.serve_mode(listen, sidetunnel_meshd::mode::Mode::default())
    }

    pub fn serve_mode(&self, listen: &str, mode: sidetunnel_meshd::mode::Mode) -> Meshd {
        Meshd::start(self.dir.path(), &self.path("inventory.yaml"), listen, mode)
    }
}

/// A running `sidetunnel-meshd serve`, killed on drop.
pub struct Meshd {
    child: Child,
    pub addr: SocketAddr,
}

impl Meshd {
    pub fn start(
        dir: &Path,
        inventory: &Path,
        listen: &str,
        mode: sidetunnel_meshd::mode::Mode,
    ) -> Meshd {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("meshd.log"))
            .expect("meshd log");
        let mut child = Command::new(meshd_bin())
            .args(["serve", "--dir", dir.to_str().unwrap()])
            .args(["--inventory", inventory.to_str().unwrap()])
            .args(["--listen", listen, "--poll-interval", "100ms"])
            .args(["--mode", mode.as_str()])
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn meshd serve");
        let stdout = child.stdout.take().expect("stdout");
        let addr = match sidetunnel_tests::mesh::meshd_listen_addr(stdout, WAIT) {
            Ok(addr) => addr,
            Err(line) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(dir.join("meshd.log")).unwrap_or_default();
                panic!("meshd did not announce its address (got {line:?}); log:\n{log}");
            }
        };
        Meshd { child, addr }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn stop(mut self) -> SocketAddr {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.addr
    }
}

impl Drop for Meshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}
