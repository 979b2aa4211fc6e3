//! `cargo xtask`: the project's entry points — the full test suite (what CI
//! runs), the demo and the benchmarks — so a fresh machine needs only the two
//! commands the README names.

mod bench;
mod bench_dataplane;
mod demo;
mod dist;
mod fuzz;
mod prereqs;
mod soak;
mod workspace;

use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "sidetunnel developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Format check, clippy -D warnings, cargo-deny, build, and every test.
    Test {
        /// Do not install missing prerequisites (Debian packages,
        /// cargo-deny, cargo-fuzz): fail naming what is missing.
        #[arg(long)]
        no_install: bool,
        /// Extra arguments passed to `cargo test` (e.g. a test-name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Local containerd + sidetunnel runtime + control plane + two meshed pods.
    Demo(demo::DemoArgs),
    /// libFuzzer targets (tests/fuzz): `smoke`, `run <target> [--time S]`, `long`, `list`, `seeds`.
    Fuzz {
        #[command(subcommand)]
        task: fuzz::FuzzTask,
    },
    /// Benchmarks: `xds` (issue 6's xDS table), `dataplane` (issue 7's data-path table).
    Bench {
        #[command(subcommand)]
        task: bench::BenchTask,
    },
    /// Create and remove N pods via CRI (sidetunnel runtime); check nothing is left (not in CI).
    Soak(soak::SoakArgs),
    /// Build the shipped release binaries (statically linked); prints their directory.
    Dist(dist::DistArgs),
}

/// Errors end the process with one line (the error and its causes), never
/// a backtrace: they are expected failures with a message for the user,
/// whatever RUST_BACKTRACE says.
fn main() {
    if let Err(e) = run(Cli::parse().task) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(task: Task) -> Result<()> {
    match task {
        Task::Test { no_install, args } => test(no_install, &args),
        Task::Demo(args) => demo::run(&args),
        Task::Fuzz { task } => fuzz::run(task),
        Task::Bench { task } => bench::run(task),
        Task::Soak(args) => soak::run(&args),
        Task::Dist(args) => dist::run(&args),
    }
}

/// The cargo that runs this xtask (`$CARGO`), else `cargo` on PATH.
fn cargo_bin() -> std::ffi::OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

fn cargo(args: &[&str]) -> Result<()> {
    cargo_with(args, &[])
}

/// `cargo <args>` with extra environment variables.
fn cargo_with(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Result<()> {
    let status = Command::new(cargo_bin())
        .args(args)
        .envs(env.iter().copied())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn step(name: &str) {
    eprintln!("==> {name}");
}

fn test(no_install: bool, extra: &[String]) -> Result<()> {
    step("prerequisites (Debian packages, cargo-deny, cargo-fuzz)");
    prereqs::ensure(prereqs::For::Test, no_install)?;
    step("cargo fmt --check");
    cargo(&["fmt", "--all", "--check"])?;
    step("cargo clippy -D warnings");
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    step("cargo deny check licenses bans sources");
    cargo(&["deny", "check", "licenses", "bans", "sources"])?;
    step("cargo build (binaries the integration tests run)");
    cargo(&["build", "--workspace", "--bins"])?;
    // The shipped binaries too: the data-plane smoke bench runs them and a
    // test checks they are static.
    let dist = dist::build(&[])?;
    step("cargo test");
    let mut args = vec!["test", "--workspace"];
    args.extend(extra.iter().map(String::as_str));
    cargo_with(&args, &[(dist::DIR_ENV, dist.as_os_str())])?;
    step("pod start bench smoke (cargo xtask bench podstart --quick)");
    bench::run_podstart_smoke()?;
    step("fuzz smoke (every target, a few seconds each)");
    fuzz::run(fuzz::FuzzTask::Smoke {
        time: fuzz::SMOKE_SECS,
    })
}
