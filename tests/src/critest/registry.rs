//! A real local registry (Debian's `docker-registry`, the CNCF
//! distribution server) on loopback, filled with the critest images under
//! their upstream repository paths, and the containerd registry host
//! configuration (`config_path`, one `hosts.toml` per upstream registry)
//! that makes containerd pull `registry.k8s.io/...`, `gcr.io/...` and
//! `k8s.gcr.io/...` from it. Every host's `server` is the local registry,
//! so nothing is ever asked of the upstream hosts.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::image::ImageDef;

pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
/// Upstream registries the critest images come from.
pub const UPSTREAMS: &[&str] = &["registry.k8s.io", "gcr.io", "k8s.gcr.io"];
/// containerd namespace the images are imported into before pushing.
const STAGING_NS: &str = "critest-staging";
const PUSH_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Registry {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Registry {
    /// Starts the registry on a free loopback port with storage in a fresh
    /// directory; returns once `/v2/` answers.
    pub fn start() -> Result<Registry> {
        let dir = tempfile::Builder::new().prefix("st-registry-").tempdir()?;
        let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
                 delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {REGISTRY_BIN}"))?;
        let mut r = Registry { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = r.child.try_wait()? {
                bail!("{REGISTRY_BIN} exited ({st}): {}", r.log_tail());
            }
            if let Ok(reply) = http_get(addr, "/v2/")
                && reply.starts_with("HTTP/1.1 200")
            {
                return Ok(r);
            }
            if Instant::now() > deadline {
                bail!("registry on {addr} not answering: {}", r.log_tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn log_tail(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Writes `<dir>/<upstream>/hosts.toml` for every upstream, each
    /// served by this registry over plain HTTP; returns `dir` (containerd's
    /// `config_path`).
    pub fn write_hosts(&self, dir: &Path) -> Result<PathBuf> {
        for up in UPSTREAMS {
            let d = dir.join(up);
            std::fs::create_dir_all(&d)?;
            std::fs::write(
                d.join("hosts.toml"),
                format!(
                    "# {up} is served by the test's local registry; no upstream fallback.\n\
                     server = \"http://{addr}\"\n\n[host.\"http://{addr}\"]\n  \
                     capabilities = [\"pull\", \"resolve\"]\n",
                    addr = self.addr
                ),
            )?;
        }
        Ok(dir.to_owned())
    }

    /// Builds `images`, imports them into a staging namespace of the
    /// containerd at `address` and pushes each to this registry under its
    /// upstream path (`registry.k8s.io/pause:3.9` → `<addr>/pause:3.9`).
    pub fn push_all(&self, address: &Path, images: &[ImageDef], work: &Path) -> Result<()> {
        std::fs::create_dir_all(work)?;
        for def in images {
            let file = work.join(format!("{}.oci.tar", def.name.replace(['/', ':'], "_")));
            crate::image::write_oci_archive(def, &file)?;
            crate::containerd::import_content(address, STAGING_NS, &file)?;
            let (_, path) = def
                .name
                .split_once('/')
                .with_context(|| format!("image name {} has no registry", def.name))?;
            let remote = format!("{}/{path}", self.addr);
            let mut cmd = Command::new(crate::containerd::ctr_bin());
            cmd.arg("--address")
                .arg(address)
                .args(["--namespace", STAGING_NS, "images", "push", "--plain-http"])
                .args([&remote, &def.name]);
            let out = crate::cmd::output_within(&mut cmd, PUSH_TIMEOUT)?;
            if !out.status.success() {
                bail!(
                    "ctr images push {remote} failed: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Ok(())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 GET on loopback; the raw reply.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}
