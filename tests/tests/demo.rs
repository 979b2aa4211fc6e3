//! The README's first command, end to end: runs the built `xtask demo`
//! (private containerd, `sidetunnel-meshd`, two pods in runtime class
//! `sidetunnel` with the real proxy) and checks its summary: both
//! identities, traffic by pod IP and by service VIP, mTLS counted by the
//! server's proxy with both principals, and on-demand xDS far below a full
//! WDS of the same mesh. `--no-build`: the suite's binaries are already
//! built; `--no-install`: CI installed the packages.

use std::process::Command;
use std::time::Duration;

use sidetunnel_tests::{bins, cmd, mesh};

const TEST: &str = "demo";

#[test]
fn demo_runs_end_to_end_and_prints_the_summary() {
    if !mesh::node_prerequisites(TEST) {
        return;
    }
    let out = cmd::output_within(
        Command::new(bins::path("xtask"))
            .args(["demo", "--no-build", "--no-install"])
            .env("RUST_BACKTRACE", "0"),
        Duration::from_secs(660),
    )
    .expect("running xtask demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "xtask demo failed ({}):\n{stdout}\n--- stderr ---\n{stderr}",
        out.status
    );
    eprintln!("{stdout}");
    let has = |needle: &str| {
        assert!(
            stdout.contains(needle),
            "summary lacks {needle:?}:\n{stdout}"
        )
    };
    has("pod demo/server: ip 10.213.");
    has("identity spiffe://cluster.local/ns/demo/sa/server");
    has("identity spiffe://cluster.local/ns/demo/sa/client");
    has("traffic: client -> server pod IP");
    has("traffic: client -> service VIP 192.168.213.10:80: ok");
    has(concat!(
        "mTLS: demo/server proxy accepted 2 connection(s) with ",
        "connection_security_policy=\"mutual_tls\" ",
        "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\" ",
        "destination_principal=\"spiffe://cluster.local/ns/demo/sa/server\""
    ));
    has("demo: ok");
    // On demand: each proxy received a small fraction of the full WDS.
    let xds: Vec<&str> = stdout.lines().filter(|l| l.starts_with("xDS: ")).collect();
    assert_eq!(xds.len(), 2, "{stdout}");
    for line in xds {
        let pct: f64 = line
            .rsplit_once("-> ")
            .and_then(|(_, r)| r.split('%').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no percentage in {line:?}"));
        assert!(pct > 0.0 && pct < 5.0, "on-demand share {pct}%: {line}");
    }
}
