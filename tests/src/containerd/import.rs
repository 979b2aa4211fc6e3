//! Importing OCI archives into the containerd under test with its own `ctr`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Bound for one `ctr images import`.
const IMPORT_TIMEOUT: Duration = Duration::from_secs(90);

/// Imports an OCI archive into containerd namespace `namespace` with `ctr`,
/// unpacking it for `snapshotter`.
pub fn import(address: &Path, namespace: &str, snapshotter: &str, archive: &Path) -> Result<()> {
    ctr_import(address, namespace, &["--snapshotter", snapshotter], archive)
}

/// Imports an OCI archive's content without unpacking it (for pushing it
/// elsewhere: no snapshotter or platform is involved).
pub fn import_content(address: &Path, namespace: &str, archive: &Path) -> Result<()> {
    ctr_import(address, namespace, &["--no-unpack"], archive)
}

fn ctr_import(address: &Path, namespace: &str, flags: &[&str], archive: &Path) -> Result<()> {
    let mut cmd = Command::new(super::ctr_bin());
    cmd.arg("--address")
        .arg(address)
        .args(["--namespace", namespace])
        .args(["images", "import"])
        .args(flags)
        .arg(archive);
    let out = crate::cmd::output_within(&mut cmd, IMPORT_TIMEOUT)
        .context("running ctr (containerd's CLI)")?;
    if !out.status.success() {
        bail!(
            "ctr images import {} failed: {}{}",
            archive.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
