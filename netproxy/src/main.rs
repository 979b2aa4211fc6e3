//! `sidetunnel-proxy`: the per-pod L4 mesh proxy.
//!
//! * `sidetunnel-proxy [run] [FLAGS]` — run the proxy inside the pod's
//!   network namespace (the default subcommand); see netproxy/README.md.
//! * `sidetunnel-proxy redirect show --netns PATH` — print the redirection
//!   ruleset installed in a network namespace (for operators).
//!
//! Exit codes: 0 after a clean drain, 1 on a runtime/start failure, 2 on a
//! configuration error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use netproxy::admin::LogControl;
use netproxy::config::{Config, ProxyArgs};

#[derive(Parser)]
#[command(
    name = "sidetunnel-proxy",
    version,
    about = "Per-pod ztunnel-compatible L4 mesh proxy"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: ProxyArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (default).
    Run(Box<ProxyArgs>),
    /// Inspect traffic redirection.
    #[command(subcommand)]
    Redirect(RedirectCommand),
}

#[derive(Subcommand)]
enum RedirectCommand {
    /// Print the nftables table and policy routing installed in a netns.
    Show {
        /// Network namespace file, e.g. /run/netns/NAME or /proc/PID/ns/net.
        #[arg(long)]
        netns: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Redirect(RedirectCommand::Show { netns })) => {
            match sidetunnel_redirect::show(&netns) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("sidetunnel-proxy: redirect show {}: {e}", netns.display());
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Run(args)) => run(*args),
        None => run(cli.run),
    }
}

fn run(args: ProxyArgs) -> ExitCode {
    raise_nofile_limit();
    netproxy::proxy::limits::tune_allocator();
    let cfg = match Config::load(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sidetunnel-proxy: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let logs = match LogControl::init(cfg.log_format, &cfg.log_level) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sidetunnel-proxy: logging: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.worker_threads)
        .thread_name("sidetunnel-proxy")
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sidetunnel-proxy: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(netproxy::proxy::run_app(cfg, logs)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("sidetunnel-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit: every proxied
/// connection costs two descriptors (more with HBONE pooling), and the
/// common soft default of 1024 caps a pod at a few hundred connections.
/// Raising the hard limit is left to whoever starts the proxy (the shim's
/// `max_open_files`). Best effort: on failure the proxy runs with what it has.
fn raise_nofile_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read/write a valid rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            eprintln!(
                "sidetunnel-proxy: raising RLIMIT_NOFILE: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}
