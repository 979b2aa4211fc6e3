//! Istio CA round trip against a real `sidetunnel-meshd` process over TLS on
//! loopback: a CSR for the token's identity yields a leaf-first chain that
//! verifies with meshd's root; a CSR for another identity is refused with
//! PERMISSION_DENIED; bad or missing tokens with UNAUTHENTICATED.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use sidetunnel_proto::istio::ca::IstioCertificateRequest;
use sidetunnel_proto::istio::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic::{Code, Status};

const STARTUP: Duration = Duration::from_secs(30);
const RPC: Duration = Duration::from_secs(20);

fn meshd() -> PathBuf {
    sidetunnel_tests::bins::path("sidetunnel-meshd")
}

/// Runs a meshd subcommand to completion; returns stdout.
fn run(args: &[&str]) -> String {
    let out = Command::new(meshd())
        .args(args)
        .output()
        .expect("spawn sidetunnel-meshd");
    assert!(
        out.status.success(),
        "sidetunnel-meshd {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn init(dir: &Path) {
    run(&["init", "--dir", dir.to_str().unwrap()]);
}

fn token(dir: &Path, ns: &str, sa: &str) -> String {
    run(&[
        "token",
        "--dir",
        dir.to_str().unwrap(),
        "--namespace",
        ns,
        "--service-account",
        sa,
        "--pod-name",
        "client-0",
        "--pod-uid",
        "0c6e5a3e-0000-4000-8000-000000000001",
    ])
    .trim()
    .to_owned()
}

/// A running `sidetunnel-meshd serve`, killed on drop.
struct Meshd {
    child: Child,
    addr: SocketAddr,
}

impl Meshd {
    fn start(dir: &Path, inventory: &Path, extra: &[&str]) -> Meshd {
        let mut child = Command::new(meshd())
            .args(["serve", "--dir", dir.to_str().unwrap()])
            .args(["--inventory", inventory.to_str().unwrap()])
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            // meshd's info logs would drown the test output; keep warnings.
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn sidetunnel-meshd serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut m = Meshd {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
        };
        let line = rx
            .recv_timeout(STARTUP)
            .expect("meshd did not print its listening line in time");
        m.addr = line
            .trim()
            .strip_prefix("sidetunnel-meshd listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("listening address");
        m
    }
}

impl Drop for Meshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn client(m: &Meshd, root_pem: &str) -> IstioCertificateServiceClient<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root_pem))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{}", m.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(RPC)
        .timeout(RPC)
        .connect()
        .await
        .expect("TLS connection to meshd");
    IstioCertificateServiceClient::new(channel)
}

fn csr(sans: &[&str]) -> String {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = sans
        .iter()
        .map(|s| SanType::URI((*s).try_into().unwrap()))
        .collect();
    let key = KeyPair::generate().unwrap();
    p.serialize_request(&key).unwrap().pem().unwrap()
}

async fn create(
    c: &mut IstioCertificateServiceClient<Channel>,
    token: Option<&str>,
    csr: String,
    validity_secs: i64,
) -> Result<Vec<String>, Status> {
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: validity_secs,
        metadata: None,
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let resp = tokio::time::timeout(RPC, c.create_certificate(req))
        .await
        .expect("CreateCertificate timed out")?;
    Ok(resp.into_inner().cert_chain)
}

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM certificate")
}

/// Verifies `leaf` up to `root` as a TLS client and server certificate.
fn verify(leaf: &str, root: &str) -> Result<(), webpki::Error> {
    let root_der = der(root);
    let anchor = webpki::anchor_from_trusted_cert(&root_der)?;
    let leaf_der = der(leaf);
    let ee = webpki::EndEntityCert::try_from(&leaf_der)?;
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            std::slice::from_ref(&anchor),
            &[],
            UnixTime::now(),
            usage,
            None,
            None,
        )?;
    }
    Ok(())
}

/// URI SANs and validity (not_before, not_after) in Unix seconds.
fn inspect(leaf: &str) -> (Vec<String>, i64, i64) {
    let leaf_der = der(leaf);
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf_der).expect("parse leaf");
    let uris = cert
        .subject_alternative_name()
        .expect("SAN extension")
        .expect("SAN present")
        .value
        .general_names
        .iter()
        .filter_map(|g| match g {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect();
    let v = cert.validity();
    (uris, v.not_before.timestamp(), v.not_after.timestamp())
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_round_trip_over_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    init(&dir);
    let inventory = tmp.path().join("inventory.yaml");
    std::fs::write(
        &inventory,
        "workloads:\n  - {name: client-0, namespace: default, serviceAccount: client, addresses: [10.0.0.1]}\n",
    )
    .unwrap();
    let root = std::fs::read_to_string(dir.join("root-cert.pem")).unwrap();
    let m = Meshd::start(&dir, &inventory, &["--max-cert-ttl", "2h"]);
    let mut c = client(&m, &root).await;
    let tok = token(&dir, "default", "client");
    let me = "spiffe://cluster.local/ns/default/sa/client";

    // The caller's own identity: leaf first, root last, verifies with the root.
    let chain = create(&mut c, Some(&tok), csr(&[me]), 3600).await.unwrap();
    assert_eq!(chain.len(), 2, "{chain:?}");
    assert_eq!(chain[1].trim(), root.trim());
    verify(&chain[0], &root).expect("leaf verifies with meshd's root");
    let (uris, nb, na) = inspect(&chain[0]);
    assert_eq!(uris, [me]);
    assert!(
        (na - now() - 3600).abs() < 300,
        "not_after {na} for a 1h request"
    );
    assert!(nb <= now(), "not_before {nb} in the future");

    // The same chain does not verify under another CA (the check can fail).
    let other = tmp.path().join("other");
    init(&other);
    let other_root = std::fs::read_to_string(other.join("root-cert.pem")).unwrap();
    assert!(verify(&chain[0], &other_root).is_err());

    // Requested TTL above --max-cert-ttl is capped; none requested gets the cap.
    for requested in [10 * 86400, 0] {
        let chain = create(&mut c, Some(&tok), csr(&[me]), requested)
            .await
            .unwrap();
        let (_, _, na) = inspect(&chain[0]);
        assert!(
            (na - now() - 7200).abs() < 300,
            "not_after {na} for request {requested}s with a 2h cap"
        );
    }

    // Another identity, or extra SANs: refused.
    for sans in [
        vec!["spiffe://cluster.local/ns/default/sa/admin"],
        vec!["spiffe://cluster.local/ns/kube-system/sa/client"],
        vec!["spiffe://evil.example/ns/default/sa/client"],
        vec![me, "spiffe://cluster.local/ns/default/sa/admin"],
    ] {
        let err = create(&mut c, Some(&tok), csr(&sans), 3600)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{sans:?}: {err:?}");
    }

    // A corrupt CSR is an invalid argument.
    let err = create(&mut c, Some(&tok), "not a csr".into(), 3600)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Missing token, garbage token, token signed by another meshd's key.
    let foreign = token(&other, "default", "client");
    for (t, want) in [
        (None, "missing authorization"),
        (Some("not-a-jwt"), "not a JWT"),
        (Some(foreign.as_str()), "signature"),
    ] {
        let err = create(&mut c, t, csr(&[me]), 3600).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        assert!(
            err.message().contains(want),
            "{:?} !~ {want}",
            err.message()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_rejects_a_server_it_does_not_trust() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let other = tmp.path().join("other");
    init(&dir);
    init(&other);
    let inventory = tmp.path().join("inventory.yaml");
    std::fs::write(&inventory, "").unwrap();
    let m = Meshd::start(&dir, &inventory, &[]);
    let wrong_root = std::fs::read_to_string(other.join("root-cert.pem")).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(wrong_root))
        .domain_name("localhost");
    let connected = Channel::from_shared(format!("https://{}", m.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(RPC)
        .connect()
        .await;
    assert!(connected.is_err(), "TLS must fail with the wrong root");
}
