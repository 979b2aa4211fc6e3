//! The `sidetunnel-meshd serve` process a benchmark measures against:
//! started, its announced address read, stopped on drop.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// How long meshd may take to announce its address.
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(60);

/// A `sidetunnel-meshd serve` process, stopped on drop.
pub(super) struct Meshd {
    child: Child,
    pub(super) addr: String,
}

impl Meshd {
    /// Starts `serve` (a `sidetunnel-meshd serve --listen 127.0.0.1:0`
    /// command) and waits for the address it announces.
    pub(super) fn start(mut serve: Command, log: &Path) -> Result<Meshd> {
        let mut child = serve
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .with_context(|| format!("starting {serve:?}"))?;
        let stdout = child.stdout.take().context("meshd stdout")?;
        let announced = sidetunnel_tests::mesh::meshd_listen_addr(stdout, ANNOUNCE_TIMEOUT);
        let mut meshd = Meshd {
            child,
            addr: String::new(),
        };
        match announced {
            Ok(a) => {
                meshd.addr = a.to_string();
                Ok(meshd)
            }
            // Dropping `meshd` stops the process.
            Err(line) => bail!(
                "sidetunnel-meshd did not start (stdout {line:?}); see {}",
                log.display()
            ),
        }
    }
}

impl Drop for Meshd {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}
