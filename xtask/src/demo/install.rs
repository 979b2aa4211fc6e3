//! The demo's host prerequisites: what it runs (containerd and its `ctr`,
//! runc, the CNI bridge plugins, nftables, iproute2, a static busybox for
//! the locally built images) and the Debian package providing each. Missing
//! ones are installed with apt-get; nothing present is touched.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// (file that must exist, Debian package that provides it).
const NEEDS: &[(&str, &str)] = &[
    ("/usr/bin/containerd", "containerd"),
    ("/usr/bin/ctr", "containerd"),
    ("/usr/sbin/runc", "runc"),
    ("/usr/lib/cni/bridge", "containernetworking-plugins"),
    ("/usr/lib/cni/host-local", "containernetworking-plugins"),
    ("/usr/sbin/nft", "nftables"),
    ("/usr/bin/ip", "iproute2"),
    ("/bin/busybox", "busybox-static"),
];

/// Debian packages whose files are missing (busybox must be the static
/// build: it is copied into the images as their only binary).
pub fn missing() -> Vec<&'static str> {
    let mut out: Vec<&str> = NEEDS
        .iter()
        .filter(|(file, _)| !present(file))
        .map(|(_, pkg)| *pkg)
        .collect();
    if present("/bin/busybox") && !static_busybox() {
        out.push("busybox-static");
    }
    out.dedup();
    out
}

/// `runc` may live in /usr/bin or /usr/sbin depending on the distribution.
fn present(file: &str) -> bool {
    let name = Path::new(file).file_name().unwrap_or_default();
    Path::new(file).exists()
        || ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"]
            .iter()
            .any(|d| Path::new(d).join(name).is_file())
}

/// A static ELF has no program interpreter (no `PT_INTERP` program
/// header). Only 64-bit little-endian ELF is inspected; anything else is
/// taken as not static.
fn static_busybox() -> bool {
    std::fs::read("/bin/busybox").is_ok_and(|b| elf64_has_no_interp(&b))
}

fn elf64_has_no_interp(b: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| {
        b.get(o..o + 2)
            .map(|x| u16::from_le_bytes([x[0], x[1]]) as usize)
    };
    let u32_at = |o: usize| {
        b.get(o..o + 4)
            .map(|x| u32::from_le_bytes([x[0], x[1], x[2], x[3]]))
    };
    let u64_at = |o: usize| {
        b.get(o..o + 8)
            .map(|x| u64::from_le_bytes(x.try_into().expect("8 bytes")) as usize)
    };
    // Magic, ELFCLASS64, ELFDATA2LSB.
    if b.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1]) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..phnum).all(|i| u32_at(phoff + i * phentsize).is_some_and(|t| t != PT_INTERP))
}

/// Installs `packages` with apt-get (Debian/Ubuntu).
pub fn install(packages: &[&str]) -> Result<()> {
    if !Path::new("/usr/bin/apt-get").exists() {
        bail!(
            "missing {}; this machine has no apt-get: install the equivalents of these Debian \
             packages with your package manager, then re-run `cargo xtask demo`",
            packages.join(", ")
        );
    }
    apt(&["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend_from_slice(packages);
    apt(&args)
}

fn apt(args: &[&str]) -> Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    if !status.success() {
        bail!(
            "`apt-get {}` failed ({status}): check the machine's apt sources and network",
            args.join(" ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_static_from_dynamic_elf() {
        // /bin/sh is dynamically linked on every supported distribution.
        let sh = std::fs::read("/bin/sh").unwrap();
        assert!(!elf64_has_no_interp(&sh));
        assert!(!elf64_has_no_interp(b"#!/bin/sh\n"));
        // A minimal ELF64 header with no program headers is static.
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
        assert!(elf64_has_no_interp(&elf));
    }
}
