//! `cargo xtask dist`: the release binaries as shipped (and as benchmarked).
//!
//! They are linked statically against glibc (`-C target-feature=+crt-static`,
//! a static PIE). The proxy and the shim run once per pod, and a dynamically
//! linked process maps its own resident pages of libc, libm, libgcc_s and
//! ld.so: 2.1 MiB of the proxy's 7.1 MiB idle RSS. Static linking keeps only
//! the glibc code the binary calls. glibc 2.34+ has its `files` and `dns`
//! name-service backends built in, so a static binary still resolves host
//! names from /etc/hosts and DNS with no shared object at run time; other
//! NSS modules (mdns, systemd-resolved's `resolve`) are not consulted.
//!
//! `--target <host>` is explicit so the flag applies to the binaries only:
//! build scripts and proc-macros (which must stay dynamic) are host
//! artifacts. The binaries land in `<target dir>/<host triple>/release`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Set by `cargo xtask test` for the tests that check or run the shipped
/// binaries: the directory [`build`] returned.
pub const DIR_ENV: &str = "SIDETUNNEL_DIST_DIR";

/// Packages whose binaries `dist` builds.
const PACKAGES: [&str; 3] = ["netproxy", "sidetunnel-meshd", "sidetunnel-shim"];

#[derive(clap::Args, Debug)]
pub struct DistArgs {
    /// Also build this package's example (e.g. `netproxy:xds_probe`).
    #[arg(long, value_name = "PACKAGE:EXAMPLE")]
    pub example: Vec<String>,
}

pub fn run(args: &DistArgs) -> Result<()> {
    let dir = build(&args.example)?;
    println!("{}", dir.display());
    Ok(())
}

/// Builds the shipped binaries (and `examples`, `package:name`) and returns
/// the directory holding them.
pub fn build(examples: &[String]) -> Result<PathBuf> {
    let triple = host_triple()?;
    crate::step(&format!(
        "building release binaries, statically linked ({triple}): {}",
        PACKAGES.join(", ")
    ));
    // One cargo run per package: built together, their dependencies'
    // features would be unified and the proxy would carry the shim's and
    // meshd's (measured: +0.3 MiB of resident read-only data per pod).
    for p in PACKAGES {
        cargo_static(&["build", "--release", "--target", &triple, "--bins", "-p", p])?;
    }
    for e in examples {
        let (package, example) = e
            .split_once(':')
            .with_context(|| format!("--example {e:?}: expected PACKAGE:EXAMPLE"))?;
        cargo_static(&[
            "build",
            "--release",
            "--target",
            &triple,
            "-p",
            package,
            "--example",
            example,
        ])?;
    }
    let dir = crate::workspace::target_dir().join(triple).join("release");
    let proxy = dir.join("sidetunnel-proxy");
    if !is_static_elf(&proxy)? {
        bail!(
            "{} came out dynamically linked (RUSTFLAGS has -crt-static?)",
            proxy.display()
        );
    }
    Ok(dir)
}

/// `cargo <args>` with `+crt-static` added to the caller's RUSTFLAGS (which
/// with `--target` reach only target artifacts).
fn cargo_static(args: &[&str]) -> Result<()> {
    let mut flags = std::env::var("RUSTFLAGS").unwrap_or_default();
    if !flags.contains("crt-static") {
        flags.push_str(" -C target-feature=+crt-static");
    }
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .env("RUSTFLAGS", flags.trim())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// The toolchain's host triple (`rustc -vV`).
fn host_triple() -> Result<String> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(&rustc)
        .arg("-vV")
        .output()
        .with_context(|| format!("running {rustc} -vV"))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .with_context(|| format!("no `host:` line in `{rustc} -vV`"))
}

/// Whether the ELF executable at `path` is statically linked: it has no
/// `PT_INTERP` program header (no dynamic loader to run it).
pub fn is_static_elf(path: &Path) -> Result<bool> {
    let elf = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let bad = || anyhow::anyhow!("{} is not a 64-bit little-endian ELF file", path.display());
    if elf.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return Err(bad());
    }
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let phoff = elf
        .get(0x20..0x28)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
        .ok_or_else(bad)?;
    let (size, count) = (
        u16_at(0x36).ok_or_else(bad)? as usize,
        u16_at(0x38).ok_or_else(bad)? as usize,
    );
    const PT_INTERP: u32 = 3;
    for i in 0..count {
        let at = phoff + i * size;
        let ty = elf
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .ok_or_else(bad)?;
        if ty == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The binaries `cargo xtask test` built with [`build`] need no dynamic
    /// loader, while this (dynamically linked) test binary does: the
    /// check tells the two apart.
    #[test]
    fn shipped_binaries_are_static() {
        let Some(dir) = std::env::var_os(DIR_ENV).map(PathBuf::from) else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{DIR_ENV} is not set: run the suite with `cargo xtask test`"
            );
            eprintln!(
                "skipping shipped_binaries_are_static: {DIR_ENV} not set (cargo xtask test sets it)"
            );
            return;
        };
        let me = std::env::current_exe().unwrap();
        assert!(!is_static_elf(&me).unwrap(), "{} is dynamic", me.display());
        for bin in [
            "sidetunnel-proxy",
            "sidetunnel-meshd",
            "containerd-shim-sidetunnel-v1",
        ] {
            let p = dir.join(bin);
            assert!(
                is_static_elf(&p).unwrap(),
                "{} is dynamically linked",
                p.display()
            );
        }
    }

    #[test]
    fn non_elf_is_an_error() {
        let f = std::env::temp_dir().join(format!("dist-not-elf-{}", std::process::id()));
        std::fs::write(&f, b"#!/bin/sh\n").unwrap();
        let e = is_static_elf(&f).unwrap_err().to_string();
        let _ = std::fs::remove_file(&f);
        assert!(e.contains("not a 64-bit little-endian ELF"), "{e}");
    }
}
