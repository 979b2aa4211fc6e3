//! Host prerequisites of `cargo xtask demo` and `cargo xtask test`: the
//! Debian packages whose files they run (containerd and its `ctr`, runc,
//! crun, the CNI bridge plugins, nftables, iproute2, a static busybox for
//! the locally built images, iperf3) and the cargo subcommands the suite
//! runs (cargo-deny, cargo-fuzz). What is missing is announced on one line
//! and installed (apt-get; `cargo install --locked`); nothing present is
//! touched. With `--no-install` the same check ends in one error naming
//! what is missing and the command that would install it.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// (file that must exist, Debian package that provides it): what the demo runs.
const DEMO: &[(&str, &str)] = &[
    ("/usr/bin/containerd", "containerd"),
    ("/usr/bin/ctr", "containerd"),
    ("/usr/sbin/runc", "runc"),
    ("/usr/lib/cni/bridge", "containernetworking-plugins"),
    ("/usr/lib/cni/host-local", "containernetworking-plugins"),
    ("/usr/sbin/nft", "nftables"),
    ("/usr/bin/ip", "iproute2"),
    // The harness network's CNI portmap plugin (hostPort) runs iptables.
    ("/usr/sbin/iptables", "iptables"),
    ("/bin/busybox", "busybox-static"),
];

/// What the test suite runs beyond the demo's set: crun (second OCI
/// runtime), iperf3 (data-plane bench smoke), the CA bundle (cargo install
/// over TLS), a local image registry (critest's images,
/// tests/tests/critest.rs).
const TEST_EXTRA: &[(&str, &str)] = &[
    ("/usr/bin/crun", "crun"),
    ("/usr/bin/docker-registry", "docker-registry"),
    ("/usr/bin/iperf3", "iperf3"),
    ("/etc/ssl/certs/ca-certificates.crt", "ca-certificates"),
];

/// (cargo subcommand, crate that provides it): what `cargo xtask test` runs.
const CARGO_TOOLS: &[(&str, &str)] = &[("deny", "cargo-deny"), ("fuzz", "cargo-fuzz")];

/// Which command's needs to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum For {
    Demo,
    Test,
}

/// Makes sure everything `what` needs is on the machine: installs what is
/// missing, or with `no_install` fails naming it and the install command.
pub fn ensure(what: For, no_install: bool) -> Result<()> {
    let packages = missing_packages(what);
    let tools = if what == For::Test {
        missing_cargo_tools()
    } else {
        Vec::new()
    };
    if packages.is_empty() && tools.is_empty() {
        return Ok(());
    }
    let mut commands = Vec::new();
    if !packages.is_empty() {
        commands.push(format!("apt-get install {}", packages.join(" ")));
    }
    for krate in &tools {
        commands.push(format!("cargo install --locked {krate}"));
    }
    let flag = match what {
        For::Demo => "cargo xtask demo",
        For::Test => "cargo xtask test",
    };
    if no_install {
        let mut names: Vec<&str> = packages.clone();
        names.extend(&tools);
        bail!(
            "missing {} (--no-install given): run `{}`, or re-run `{flag}` without --no-install",
            names.join(", "),
            commands.join(" && ")
        );
    }
    if !packages.is_empty() {
        install_packages(&packages, flag)?;
    }
    for krate in tools {
        eprintln!("==> installing {krate}: cargo install --locked {krate}");
        cargo_install(krate)?;
    }
    Ok(())
}

/// Debian packages whose files are missing (busybox must be the static
/// build: it is copied into the images as their only binary).
pub fn missing_packages(what: For) -> Vec<&'static str> {
    let extra: &[(&str, &str)] = match what {
        For::Demo => &[],
        For::Test => TEST_EXTRA,
    };
    let mut out: Vec<&str> = DEMO
        .iter()
        .chain(extra)
        .filter(|(file, _)| !present(file))
        .map(|(_, pkg)| *pkg)
        .collect();
    if present("/bin/busybox") && !static_busybox() {
        out.push("busybox-static");
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Crates whose cargo subcommand does not answer `--version`.
pub fn missing_cargo_tools() -> Vec<&'static str> {
    CARGO_TOOLS
        .iter()
        .filter(|(sub, _)| {
            !Command::new(crate::cargo_bin())
                .args([sub, "--version"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|(_, krate)| *krate)
        .collect()
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

/// Installs `packages` with apt-get (Debian/Ubuntu), as root.
fn install_packages(packages: &[&str], rerun: &str) -> Result<()> {
    let list = packages.join(" ");
    if !Path::new("/usr/bin/apt-get").exists() {
        bail!(
            "missing {list}; this machine has no apt-get to install them: install the \
             equivalents of these Debian packages with its package manager, then re-run `{rerun}`"
        );
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "missing {list}; installing needs root: run `sudo apt-get install {list}`, \
             then re-run `{rerun}`"
        );
    }
    eprintln!("==> installing Debian packages: apt-get install {list}");
    apt(&["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend_from_slice(packages);
    apt(&args)
}

fn apt(args: &[&str]) -> Result<()> {
    // Another apt or dpkg run (unattended upgrades, a second checkout's
    // `cargo xtask`) holds the dpkg lock for a while: wait for it rather
    // than fail the command.
    let status = Command::new("apt-get")
        .args(["-o", "DPkg::Lock::Timeout=600"])
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

/// `cargo install --locked <krate>`, into cargo's own bin directory (on
/// the PATH of whoever runs cargo).
fn cargo_install(krate: &str) -> Result<()> {
    let status = Command::new(crate::cargo_bin())
        .args(["install", "--locked", krate])
        .status()
        .with_context(|| format!("running cargo install {krate}"))?;
    if !status.success() {
        bail!(
            "`cargo install --locked {krate}` failed ({status}): check the compile error above \
             and access to crates.io"
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
