//! The `sidetunnel-meshd` binary's command line: init idempotence, token
//! shape, generator determinism, and serve's start-up, errors and SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use sidetunnel_meshd::inventory::{self, Context};

const WAIT: Duration = Duration::from_secs(30);

fn meshd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sidetunnel-meshd"))
}

fn run(args: &[&str]) -> Output {
    meshd().args(args).output().expect("spawn sidetunnel-meshd")
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Kills the child if a test fails before it exits.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn init_is_idempotent_and_token_is_shaped_like_kubernetes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("st");
    ok(&["init", "--dir", p(&dir), "--trust-domain", "example.org"]);
    let root = std::fs::read(dir.join("root-cert.pem")).unwrap();
    let again = run(&["init", "--dir", p(&dir)]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already initialized"));
    assert_eq!(std::fs::read(dir.join("root-cert.pem")).unwrap(), root);
    assert_eq!(
        std::fs::read_to_string(dir.join("trust-domain"))
            .unwrap()
            .trim(),
        "example.org"
    );

    let t = ok(&[
        "token",
        "--dir",
        p(&dir),
        "--namespace",
        "shop",
        "--service-account",
        "web",
        "--pod-name",
        "web-0",
        "--pod-uid",
        "u-1",
        "--ttl",
        "2h",
    ]);
    let parts: Vec<&str> = t.trim().split('.').collect();
    assert_eq!(parts.len(), 3);
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[1])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["sub"], "system:serviceaccount:shop:web");
    assert_eq!(claims["aud"][0], "istio-ca");
    assert_eq!(claims["kubernetes.io"]["namespace"], "shop");
    assert_eq!(claims["kubernetes.io"]["serviceaccount"]["name"], "web");
    assert_eq!(claims["kubernetes.io"]["pod"]["name"], "web-0");
    assert_eq!(claims["kubernetes.io"]["pod"]["uid"], "u-1");
    let (iat, exp) = (
        claims["iat"].as_u64().unwrap(),
        claims["exp"].as_u64().unwrap(),
    );
    assert_eq!(exp - iat, 7200);

    let bad = run(&[
        "token",
        "--dir",
        p(&dir),
        "--namespace",
        "a",
        "--service-account",
        "b",
        "--ttl",
        "5y",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown unit"));
}

#[test]
fn generate_is_deterministic_and_valid() {
    let gen_ = |seed: &str| {
        ok(&[
            "generate",
            "--services",
            "40",
            "--pods",
            "300",
            "--seed",
            seed,
        ])
    };
    let a = gen_("3");
    assert_eq!(a, gen_("3"));
    assert_ne!(a, gen_("4"));
    let ctx = Context {
        cluster_id: "Kubernetes".into(),
        trust_domain: "cluster.local".into(),
    };
    let snap = inventory::parse(&ctx, &a).expect("generated inventory is valid");
    assert_eq!(
        snap.table(sidetunnel_meshd::snapshot::TypeUrl::Address)
            .len(),
        340
    );
}

#[test]
fn serve_errors_are_clear_and_sigterm_stops_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("st");
    let inv = tmp.path().join("inv.yaml");
    std::fs::write(
        &inv,
        "workloads:\n  - {name: a, namespace: n, addresses: [10.0.0.1]}\n",
    )
    .unwrap();

    // Not initialized yet.
    let out = run(&[
        "serve",
        "--dir",
        p(&dir),
        "--inventory",
        p(&inv),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("sidetunnel-meshd init"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    ok(&["init", "--dir", p(&dir)]);
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "workloads:\n  - {name: a, namespace: n, addresses: [10.0.0.999]}\n",
    )
    .unwrap();
    let out = run(&[
        "serve",
        "--dir",
        p(&dir),
        "--inventory",
        p(&bad),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("workloads[0] n/a: addresses[0]: invalid IP"),
        "{err}"
    );

    let mut child = Reap(
        meshd()
            .args([
                "serve",
                "--dir",
                p(&dir),
                "--inventory",
                p(&inv),
                "--listen",
                "127.0.0.1:0",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let _ = tx.send(line.unwrap_or_default());
        }
    });
    let line = rx.recv_timeout(WAIT).expect("listening line");
    let addr: std::net::SocketAddr = line
        .strip_prefix("sidetunnel-meshd listening on ")
        .unwrap_or_else(|| panic!("{line:?}"))
        .parse()
        .unwrap();
    assert_ne!(addr.port(), 0);
    std::net::TcpStream::connect_timeout(&addr, WAIT).expect("port accepts connections");
    // Exactly one stdout line.
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());

    let pid = child.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < WAIT, "meshd ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}
