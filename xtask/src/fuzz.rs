//! `cargo xtask fuzz`: the libFuzzer targets in tests/fuzz, run through
//! cargo-fuzz. cargo-fuzz passes nightly-only flags (`-Zsanitizer=address`,
//! coverage passes); this project pins a stable toolchain, so the one
//! command that needs them runs with `RUSTC_BOOTSTRAP=1`. Sanitizer builds
//! go to their own target dir (`<target>/fuzz`) so they never evict the
//! normal ones. Corpora: the committed seeds (`tests/fuzz/corpus/<target>`)
//! and regression inputs (`tests/fuzz/regressions/<target>`) are read; what
//! the fuzzer discovers goes to `<target>/fuzz/corpus/<target>`, outside
//! the tree. Crash inputs land in `tests/fuzz/artifacts/<target>/`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use clap::Subcommand;

/// Seconds each target runs in `fuzz smoke` (and in `cargo xtask test`).
pub const SMOKE_SECS: u64 = 10;

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
            fuzz.run_target(&target, &flags, false).map(|_| ())
        }
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

/// What libFuzzer reported at the end of a run (`-print_final_stats=1`).
#[derive(Default)]
struct Stats {
    execs: u64,
    secs: u64,
}

impl Fuzz {
    fn new() -> Result<Fuzz> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask has no parent directory")?
            .to_path_buf();
        let target_dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"))
            .join("fuzz");
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
    /// nightly flags cargo-fuzz passes.
    fn cargo_fuzz(&self, sub: &str) -> Command {
        let mut cmd = Command::new(&self.cargo);
        cmd.arg("fuzz")
            .arg(sub)
            .arg("--fuzz-dir")
            .arg(&self.dir)
            .arg("--target-dir")
            .arg(&self.target_dir)
            .env("RUSTC_BOOTSTRAP", "1");
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
        let status = self
            .cargo_fuzz("build")
            .status()
            .context("running cargo fuzz build")?;
        if !status.success() {
            bail!("`cargo fuzz build` failed ({status})");
        }
        let mut summary = Vec::new();
        for target in self.targets()? {
            eprintln!("--> fuzz {target} for {secs}s");
            let stats = self.run_target(&target, &[format!("-max_total_time={secs}")], true)?;
            summary.push(format!(
                "{target}: {} execs in {}s",
                stats.execs, stats.secs
            ));
        }
        eprintln!("fuzz smoke passed:\n  {}", summary.join("\n  "));
        Ok(())
    }

    /// Runs one target on its working corpus, seeds and regressions. With
    /// `quiet`, libFuzzer's per-input progress lines (`#123 NEW …`) are
    /// dropped; everything else (crash reports above all) is shown.
    fn run_target(&self, target: &str, flags: &[String], quiet: bool) -> Result<Stats> {
        let work = self.target_dir.join("corpus").join(target);
        std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        let mut cmd = self.cargo_fuzz("run");
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
            if let Some(v) = stat(&line, "stat::number_of_executed_units:") {
                stats.execs = v;
            }
            if let Some(v) = stat(&line, "Done ") {
                stats.secs = v;
            }
            if !(quiet && line.starts_with('#')) {
                eprintln!("{line}");
            }
        }
        let status = child.wait().context("waiting for cargo fuzz run")?;
        if !status.success() {
            bail!(
                "fuzz target {target} failed ({status}); the crashing input is in {}",
                self.dir.join("artifacts").join(target).display()
            );
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
