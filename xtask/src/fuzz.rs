//! `cargo xtask fuzz`: the libFuzzer targets in tests/fuzz, run through
//! cargo-fuzz. cargo-fuzz passes nightly-only flags (`-Zsanitizer=address`,
//! coverage passes); this project pins a stable toolchain, so the one
//! command that needs them runs with `RUSTC_BOOTSTRAP=1`. Sanitizer builds
//! go to their own target dir (`<target>/fuzz`) so they never evict the
//! normal ones. Corpora: the committed seeds (`tests/fuzz/corpus/<target>`)
//! and regression inputs (`tests/fuzz/regressions/<target>`) are read; what
//! the fuzzer discovers goes to `<target>/fuzz/corpus/<target>`, outside
//! the tree. Crash inputs land in `tests/fuzz/artifacts/<target>/`.
//!
//! `fuzz long` (the runs recorded in docs/fuzzing.md) builds without
//! AddressSanitizer, in `<target>/fuzz/nosan`: the targets are safe Rust,
//! where ASan finds next to nothing and costs several times the speed (see
//! docs/fuzzing.md); debug assertions and overflow checks stay on, as in
//! every cargo-fuzz build.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use clap::Subcommand;

/// Seconds each target runs in `fuzz smoke` (and in `cargo xtask test`).
pub const SMOKE_SECS: u64 = 10;

/// Input size limit per target for `fuzz long`: small for text parsers so
/// the fuzzer does not waste time on inputs no caller can send.
fn max_len(target: &str) -> usize {
    match target {
        "spiffe_identity" => 256,
        "ca_csr_sans" => 512,
        "redirect_annotations" | "hbone_request" | "jwt_claims" => 1024,
        "jwt_token" | "ca_csr" => 2048,
        _ => 4096,
    }
}

#[derive(Subcommand)]
pub enum FuzzTask {
    /// Build every target, then run each for a few seconds on its seeds and
    /// regression inputs (what CI runs). Fails on the first crash.
    Smoke {
        /// Seconds per target.
        #[arg(long, default_value_t = SMOKE_SECS)]
        time: u64,
    },
    /// Fuzz one target, printing libFuzzer's progress.
    Run {
        /// Target name (see `cargo xtask fuzz list`).
        target: String,
        /// Stop after this many seconds (default: until a crash or Ctrl-C).
        #[arg(long)]
        time: Option<u64>,
        /// Extra libFuzzer flags, after `--` (e.g. `-- -max_len=512`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Long runs, one target at a time at lowest CPU priority, without
    /// ASan: each target until `--runs` executions or `--time` seconds.
    /// Prints a table of executions, speed, coverage and crashes; fails if
    /// any target crashed (after running the others).
    Long {
        /// Executions per target.
        #[arg(long, default_value_t = 10_000_000)]
        runs: u64,
        /// Seconds per target at most.
        #[arg(long, default_value_t = 600)]
        time: u64,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
    /// List the fuzz targets.
    List,
    /// Regenerate the seed corpora (tests/fuzz/examples/seeds.rs).
    Seeds,
}

pub fn run(task: FuzzTask) -> Result<()> {
    let fuzz = Fuzz::new()?;
    match task {
        FuzzTask::Smoke { time } => fuzz.smoke(time),
        FuzzTask::Run { target, time, args } => {
            fuzz.check_target(&target)?;
            let mut flags: Vec<String> = time
                .map(|t| format!("-max_total_time={t}"))
                .into_iter()
                .collect();
            flags.extend(args);
            if fuzz.run_target(&target, &flags, Mode::Verbose)?.crashed {
                bail!("fuzz target {target} crashed");
            }
            Ok(())
        }
        FuzzTask::Long {
            runs,
            time,
            targets,
        } => fuzz.long(runs, time, targets),
        FuzzTask::List => {
            fuzz.targets()?.iter().for_each(|t| println!("{t}"));
            Ok(())
        }
        FuzzTask::Seeds => fuzz.seeds(),
    }
}

struct Fuzz {
    /// tests/fuzz: the cargo-fuzz project.
    dir: PathBuf,
    /// Where sanitizer builds and the working corpora go.
    target_dir: PathBuf,
    cargo: String,
}

/// How a target runs.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// With ASan; libFuzzer's progress lines shown.
    Verbose,
    /// With ASan; per-input progress lines (`#123 NEW …`) dropped.
    Quiet,
    /// Without ASan (`fuzz long`), niced; progress dropped.
    Long,
}

/// What libFuzzer reported (`-print_final_stats=1` and progress lines).
#[derive(Default)]
struct Stats {
    execs: u64,
    secs: u64,
    execs_per_sec: u64,
    cov: u64,
    ft: u64,
    crashed: bool,
}

impl Stats {
    /// Takes what a libFuzzer output line tells.
    fn read(&mut self, line: &str) {
        if let Some(v) = stat(line, "stat::number_of_executed_units:") {
            self.execs = v;
        }
        if let Some(v) = stat(line, "stat::average_exec_per_sec:") {
            self.execs_per_sec = v;
        }
        if let Some(v) = stat(line, "Done ") {
            self.secs = v;
        }
        // `#123\tNEW    cov: 240 ft: 496 corp: …`: the last one is final.
        if line.starts_with('#') {
            let mut words = line.split_whitespace();
            while let Some(w) = words.next() {
                let slot = match w {
                    "cov:" => &mut self.cov,
                    "ft:" => &mut self.ft,
                    _ => continue,
                };
                if let Some(v) = words.next().and_then(|v| v.parse().ok()) {
                    *slot = v;
                }
            }
        }
    }
}

impl Fuzz {
    fn new() -> Result<Fuzz> {
        let root = crate::workspace::root();
        let target_dir = crate::workspace::target_dir().join("fuzz");
        Ok(Fuzz {
            dir: root.join("tests").join("fuzz"),
            target_dir,
            cargo: std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()),
        })
    }

    /// Target names: the files in tests/fuzz/fuzz_targets.
    fn targets(&self) -> Result<Vec<String>> {
        let dir = self.dir.join("fuzz_targets");
        let mut names = Vec::new();
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "rs")
                && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
            {
                names.push(stem.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    fn check_target(&self, target: &str) -> Result<()> {
        let targets = self.targets()?;
        if !targets.iter().any(|t| t == target) {
            bail!("no fuzz target {target:?}; targets: {}", targets.join(", "));
        }
        Ok(())
    }

    /// `cargo fuzz <sub> --fuzz-dir … --target-dir …`, allowed to use the
    /// nightly flags cargo-fuzz passes. `Mode::Long` builds without ASan,
    /// in its own target dir (so the two builds never evict each other),
    /// and runs at the lowest CPU priority.
    fn cargo_fuzz(&self, sub: &str, mode: Mode) -> Command {
        let mut cmd = if mode == Mode::Long {
            let mut c = Command::new("nice");
            c.args(["-n", "19"]).arg(&self.cargo);
            c
        } else {
            Command::new(&self.cargo)
        };
        cmd.arg("fuzz").arg(sub).arg("--fuzz-dir").arg(&self.dir);
        if mode == Mode::Long {
            cmd.args(["--sanitizer", "none", "--target-dir"])
                .arg(self.target_dir.join("nosan"));
        } else {
            cmd.arg("--target-dir").arg(&self.target_dir);
        }
        cmd.env("RUSTC_BOOTSTRAP", "1");
        cmd
    }

    fn require_cargo_fuzz(&self) -> Result<()> {
        let ok = Command::new(&self.cargo)
            .args(["fuzz", "--version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            bail!("cargo-fuzz is not installed: run `cargo install --locked cargo-fuzz`");
        }
        Ok(())
    }

    fn smoke(&self, secs: u64) -> Result<()> {
        self.require_cargo_fuzz()?;
        self.build(Mode::Quiet)?;
        let mut summary = Vec::new();
        for target in self.targets()? {
            eprintln!("--> fuzz {target} for {secs}s");
            let stats =
                self.run_target(&target, &[format!("-max_total_time={secs}")], Mode::Quiet)?;
            if stats.crashed {
                bail!(
                    "fuzz target {target} failed; the crashing input is in {}",
                    self.dir.join("artifacts").join(&target).display()
                );
            }
            summary.push(format!(
                "{target}: {} execs in {}s",
                stats.execs, stats.secs
            ));
        }
        eprintln!("fuzz smoke passed:\n  {}", summary.join("\n  "));
        Ok(())
    }

    fn build(&self, mode: Mode) -> Result<()> {
        let status = self
            .cargo_fuzz("build", mode)
            .status()
            .context("running cargo fuzz build")?;
        if !status.success() {
            bail!("`cargo fuzz build` failed ({status})");
        }
        Ok(())
    }

    fn long(&self, runs: u64, secs: u64, targets: Vec<String>) -> Result<()> {
        self.require_cargo_fuzz()?;
        let targets = if targets.is_empty() {
            self.targets()?
        } else {
            targets
        };
        for t in &targets {
            self.check_target(t)?;
        }
        self.build(Mode::Long)?;
        let mut rows = vec![
            "| target | executions | seconds | exec/s | cov | ft | crashes |".to_string(),
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |".to_string(),
        ];
        let mut crashed = Vec::new();
        for target in &targets {
            eprintln!("--> fuzz {target}: {runs} runs or {secs}s");
            let flags = [
                format!("-runs={runs}"),
                format!("-max_total_time={secs}"),
                format!("-max_len={}", max_len(target)),
            ];
            let s = self.run_target(target, &flags, Mode::Long)?;
            if s.crashed {
                crashed.push(target.clone());
            }
            let row = format!(
                "| `{target}` | {} | {} | {} | {} | {} | {} |",
                s.execs,
                s.secs,
                s.execs_per_sec,
                s.cov,
                s.ft,
                if s.crashed { "**crash**" } else { "0" }
            );
            eprintln!("{row}");
            rows.push(row);
        }
        println!("{}", rows.join("\n"));
        if !crashed.is_empty() {
            bail!(
                "crashes in {}; inputs in {}",
                crashed.join(", "),
                self.dir.join("artifacts").display()
            );
        }
        Ok(())
    }

    /// Runs one target on its working corpus, seeds and regressions. Except
    /// in `Mode::Verbose`, libFuzzer's progress lines (`#123 NEW …`,
    /// `NEW_FUNC …`) are dropped; everything else (crash reports above all) is shown.
    /// A crash is reported in the stats, not as an error.
    fn run_target(&self, target: &str, flags: &[String], mode: Mode) -> Result<Stats> {
        let work = self.target_dir.join("corpus").join(target);
        std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        let mut cmd = self.cargo_fuzz("run", mode);
        // The first corpus directory receives new inputs.
        cmd.arg(target).arg(&work);
        for dir in ["corpus", "regressions"] {
            let d = self.dir.join(dir).join(target);
            if d.is_dir() {
                cmd.arg(d);
            }
        }
        cmd.arg("--")
            .arg("-print_final_stats=1")
            .arg("-timeout=60")
            .args(flags)
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("running cargo fuzz run")?;
        let mut stats = Stats::default();
        let stderr = child.stderr.take().context("no stderr pipe")?;
        for line in BufReader::new(stderr).lines() {
            let line = line.context("reading cargo fuzz output")?;
            stats.read(&line);
            let progress = line.starts_with('#') || line.starts_with("\tNEW_FUNC");
            if mode == Mode::Verbose || !progress {
                eprintln!("{line}");
            }
        }
        let status = child.wait().context("waiting for cargo fuzz run")?;
        if !status.success() {
            eprintln!(
                "fuzz target {target} failed ({status}); the crashing input is in {}",
                self.dir.join("artifacts").join(target).display()
            );
            stats.crashed = true;
        }
        Ok(stats)
    }

    fn seeds(&self) -> Result<()> {
        let status = Command::new(&self.cargo)
            .arg("run")
            .arg("--manifest-path")
            .arg(self.dir.join("Cargo.toml"))
            // A normal build: it shares the workspace's target dir.
            .arg("--target-dir")
            .arg(self.target_dir.parent().unwrap_or(&self.target_dir))
            .args(["--example", "seeds", "--"])
            .arg(self.dir.join("corpus"))
            .status()
            .context("running the seed generator")?;
        if !status.success() {
            bail!("seed generator failed ({status})");
        }
        Ok(())
    }
}

/// The number after `prefix` in a libFuzzer line: `stat::…: 123` or
/// `Done 123 runs in 10 second(s)` (whose seconds come after "in").
fn stat(line: &str, prefix: &str) -> Option<u64> {
    let rest = line.strip_prefix(prefix)?;
    let field = match prefix {
        "Done " => rest.split(" in ").nth(1)?.split_whitespace().next()?,
        _ => rest.split_whitespace().next()?,
    };
    field.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_output() {
        let mut s = Stats::default();
        for line in [
            "#2\tINITED cov: 10 ft: 11 corp: 1/1b exec/s: 0 rss: 39Mb",
            "#2325671\tREDUCE cov: 240 ft: 496 corp: 78/2661b lim: 256 exec/s: 19877 rss: 462Mb",
            "Done 3225743 runs in 127 second(s)",
            "stat::number_of_executed_units: 3225743",
            "stat::average_exec_per_sec:     25399",
            "stat::new_units_added:          65",
        ] {
            s.read(line);
        }
        assert_eq!(
            (s.execs, s.secs, s.execs_per_sec, s.cov, s.ft),
            (3225743, 127, 25399, 240, 496)
        );
        assert!(!s.crashed);
    }
}
