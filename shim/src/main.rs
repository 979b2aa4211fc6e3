//! `containerd-shim-sidetunnel-v1`: containerd's shim v2 for runtime type
//! `io.containerd.sidetunnel.v1`. Runs containers like runc's shim does and
//! gives every pod its own sidetunnel proxy (see README.md).
//!
//! The binary also serves as the proxy's launcher (`__launch-proxy`),
//! dispatched before any runtime or thread exists.

mod bootstrap;
mod cgroup;
mod config;
mod container;
mod error;
mod info;
mod logging;
mod oom;
mod options;
mod process;
mod runtime;
mod sandbox;
mod service;
mod settings;
mod stdio;
mod task;

use containerd_shim::Config;

const RUNTIME_ID: &str = "io.containerd.sidetunnel.v1";

/// What `--help` prints: containerd starts this binary; people only ask it
/// for its version or read where its configuration lives.
fn usage(argv0: &str) -> String {
    format!(
        "containerd-shim-sidetunnel-v1 {version}: containerd shim v2 (runtime_type {RUNTIME_ID})
that runs pods with an OCI runtime (runc by default) and gives each pod its own
sidetunnel proxy, installed in the pod's network namespace at sandbox creation.

containerd starts it; it is not meant to be run by hand.

Usage:
  {argv0} -v | --version             print version and runtime type
  {argv0} -h | --help                this text
  {argv0} check-proxy [CONFIG]       can the proxy uid execute the node config's proxy binary?
  {argv0} -info                      RuntimeInfo protobuf for the options on stdin (containerd 2.x)
  {argv0} [containerd shim flags] start|delete
        -namespace NS -address SOCK -publish-binary BIN -id ID [-bundle DIR] [-debug]

Configuration: /etc/sidetunnel/config.toml, or the runtime option ConfigPath
(containerd runtime options). Every key is documented in packaging/config.toml
and shim/README.md. Pod annotations: sidetunnel.io/inject, sidetunnel.io/ready-timeout,
sidetunnel.io/prefetch, traffic.sidecar.istio.io/exclude* (see README).
",
        version = env!("CARGO_PKG_VERSION"),
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some(sandbox::launch::ARG) => sandbox::launch::main(),
        Some(sandbox::launch::CHECK_ARG) => sandbox::launch::check_main(&args[2..]),
        Some("-h" | "-help" | "--help") => {
            print!("{}", usage(&args[0]));
            return;
        }
        _ => {}
    }
    if let Ok(flags) = containerd_shim::parse(&args[1..]) {
        if flags.version {
            println!(
                "{}:\n  Version: {}\n  Runtime: {RUNTIME_ID}",
                args[0],
                env!("CARGO_PKG_VERSION")
            );
            return;
        }
        if flags.info {
            std::process::exit(info::main(RUNTIME_ID));
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{RUNTIME_ID}: tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    let config = Config {
        no_setup_logger: true,
        ..Default::default()
    };
    rt.block_on(containerd_shim::asynchronous::run::<service::Service>(
        RUNTIME_ID,
        Some(config),
    ));
}
