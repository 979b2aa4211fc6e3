//! `sidetunnel-meshd` command line: init, token, serve, generate
//! (documented in meshd/README.md).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use sidetunnel_meshd::{duration, generate, jwt, mode, pki, server};

#[derive(Parser)]
#[command(
    name = "sidetunnel-meshd",
    version,
    about = "Local Istio-compatible control plane (xDS + CA) for sidetunnel"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the CA, serving certificate and JWT key in DIR (keeps existing files).
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
    /// Print a service-account token (JWT) signed with DIR/jwt-key.pem.
    Token {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        service_account: String,
        #[arg(long, requires = "pod_uid")]
        pod_name: Option<String>,
        #[arg(long, requires = "pod_name")]
        pod_uid: Option<String>,
        #[arg(long, default_value = "1h", value_parser = duration::parse)]
        ttl: Duration,
        #[arg(long, default_value = jwt::AUDIENCE)]
        audience: String,
    },
    /// Serve delta ADS and the CA from an inventory file.
    Serve {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        inventory: PathBuf,
        #[arg(long, default_value = "127.0.0.1:15012")]
        listen: SocketAddr,
        #[arg(long, default_value = "Kubernetes")]
        cluster_id: String,
        #[arg(long, default_value = "24h", value_parser = duration::parse)]
        max_cert_ttl: Duration,
        #[arg(long, default_value = "200ms", value_parser = duration::parse)]
        poll_interval: Duration,
        /// `istiod`: behave as istiod does (every policy to every client, …);
        /// `extended`: with meshd's extensions (uid-scoped Authorization, …).
        /// See docs/istiod-fidelity.md.
        #[arg(long, default_value = "istiod", env = "SIDETUNNEL_MESHD_MODE")]
        mode: mode::Mode,
    },
    /// Write a generated scale-scenario inventory to stdout.
    Generate {
        #[arg(long)]
        services: usize,
        #[arg(long)]
        pods: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        namespaces: Option<usize>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Init { dir, trust_domain } => {
            let created = pki::init(&dir, &trust_domain)?;
            let kept = pki::read_trust_domain(&dir)?;
            if kept != trust_domain {
                eprintln!(
                    "warning: {} keeps its trust domain {kept:?} (not {trust_domain:?}); remove the directory to start over",
                    dir.display()
                );
            }
            if created.is_empty() {
                eprintln!("{}: already initialized", dir.display());
            } else {
                eprintln!("{}: created {}", dir.display(), created.join(", "));
            }
        }
        Cmd::Token {
            dir,
            namespace,
            service_account,
            pod_name,
            pod_uid,
            ttl,
            audience,
        } => {
            let key = jwt::JwtKey::from_pkcs8(&pki::load_pkcs8_der(&dir.join(pki::JWT_KEY))?)?;
            let token = key.issue(&jwt::TokenRequest {
                namespace,
                service_account,
                pod: pod_name.zip(pod_uid),
                ttl,
                audience,
            })?;
            println!("{token}");
        }
        Cmd::Serve {
            dir,
            inventory,
            listen,
            cluster_id,
            max_cert_ttl,
            poll_interval,
            mode,
        } => {
            init_tracing();
            let cfg = server::ServeConfig {
                dir,
                inventory,
                listen,
                cluster_id,
                max_cert_ttl,
                poll_interval,
                mode,
            };
            let rt = tokio::runtime::Runtime::new().context("starting tokio")?;
            rt.block_on(server::serve(cfg, announce, shutdown_signal()))?;
        }
        Cmd::Generate {
            services,
            pods,
            seed,
            namespaces,
        } => {
            let inv = generate::generate(&generate::Params {
                services,
                pods,
                seed,
                namespaces,
            })?;
            let mut out = std::io::stdout().lock();
            serde_yaml::to_writer(&mut out, &inv).context("writing inventory")?;
            out.flush()?;
        }
    }
    Ok(())
}

/// The one stdout line tests and scripts wait for.
fn announce(addr: SocketAddr) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "sidetunnel-meshd listening on {addr}");
    let _ = out.flush();
}

fn init_tracing() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
