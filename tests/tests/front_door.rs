//! The README's front door, checked in the suite (not only in CI):
//!
//! * no build script in the workspace's dependency graph (xtask's included)
//!   runs `protoc`: `cargo check --workspace --all-targets` runs with
//!   `PROTOC` and a `protoc` first on PATH both pointing at a tripwire that
//!   records its call and fails, so a build script that needs protoc either
//!   fails the check or leaves its name in the record;
//! * `.ci/run` installs nothing itself: it ends in `exec cargo xtask test`
//!   and contains no package manager or `cargo install`, so every CI run is
//!   a fresh-machine run of the README's command.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The target directory this test run builds into (so the protoc-free check
/// stays warm between runs on one machine, in its own subdirectory).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

#[test]
fn no_build_script_runs_protoc() {
    let dir = target_dir().join("front-door");
    let bin = dir.join("tripwire");
    std::fs::create_dir_all(&bin).unwrap();
    let record = dir.join("protoc-calls");
    let _ = std::fs::remove_file(&record);
    let protoc = bin.join("protoc");
    // The tripwire's path is stable so a cached build script that reads
    // PROTOC is not re-run for a changed value alone.
    std::fs::write(
        &protoc,
        format!(
            "#!/bin/sh\necho \"protoc $* (from $PWD)\" >> '{}'\nexit 1\n",
            record.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&protoc, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = std::env::join_paths(std::iter::once(bin.clone()).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace())
        .args([
            "check",
            "--workspace",
            "--all-targets",
            "--locked",
            "--quiet",
        ])
        .arg("--target-dir")
        .arg(dir.join("target"))
        .env("PROTOC", &protoc)
        .env("PATH", path)
        .output()
        .expect("running cargo check");
    let calls = std::fs::read_to_string(&record).unwrap_or_default();
    assert!(
        calls.is_empty(),
        "build scripts ran protoc (they must compile protos with protox):\n{calls}"
    );
    assert!(
        out.status.success(),
        "cargo check --workspace --all-targets failed with protoc unavailable:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Commands that would make `.ci/run` install something of its own.
const INSTALLERS: &[&str] = &[
    "apt-get",
    "apt",
    "dpkg",
    "cargo install",
    "cargo-binstall",
    "rustup",
    "pip",
    "pip3",
    "npm",
    "curl",
    "wget",
];

/// Whether `line` runs `command` (one or more words) as whole words.
fn runs(line: &str, command: &str) -> bool {
    let words: Vec<&str> = line
        .split(|c: char| c.is_whitespace() || ";&|()$`\"'".contains(c))
        .filter(|w| !w.is_empty())
        .collect();
    let want: Vec<&str> = command.split(' ').collect();
    words.windows(want.len()).any(|w| w == want.as_slice())
}

#[test]
fn ci_run_installs_nothing_itself() {
    let script = std::fs::read_to_string(workspace().join(".ci/run")).unwrap();
    let code: Vec<&str> = script
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for line in &code {
        for installer in INSTALLERS {
            assert!(
                !runs(line, installer),
                ".ci/run installs something itself ({installer:?} in {line:?}): \
                 `cargo xtask test` must install what the suite needs"
            );
        }
    }
    assert_eq!(
        code.last().copied(),
        Some("exec cargo xtask test"),
        ".ci/run must end by running exactly the README's test command"
    );
}

#[test]
fn installer_words_are_matched_whole() {
    assert!(runs("apt-get install -y x", "apt-get"));
    assert!(runs(
        "sudo cargo install --locked cargo-deny",
        "cargo install"
    ));
    assert!(runs("x && pip install y", "pip"));
    assert!(!runs("set -euo pipefail", "pip"));
    assert!(!runs("exec cargo xtask test", "cargo install"));
}
