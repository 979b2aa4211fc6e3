//! Fixtures shared by the fuzz targets and the seed generator. Built once per
//! process (`OnceLock`): key generation and CA setup per input would make the
//! targets far slower without exercising anything new.
//!
//! The JWT signing key is fixed (a throwaway test key, written by
//! `sidetunnel-meshd init`) so that the seed tokens in the corpus stay
//! verifiable across runs: a fuzzer mutating a token that verifies reaches
//! the claim checks behind the signature.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use sidetunnel_meshd::auth::Authenticator;
use sidetunnel_meshd::ca::CaService;
use sidetunnel_meshd::jwt::{AUDIENCE, JwtKey, TokenRequest};
use sidetunnel_meshd::pki::{self, Ca};

/// meshd's JWT key for every run (PKCS#8, P-256). Test material only.
pub const JWT_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQghrnOOPCJWKSTFsLT
Tb5cugcnkxq9/36T7bCam4qaa/ahRANCAATpzH6dMoslzY/HWWM+eO6R5RRE7PN0
5SB1pR2RxVy04GB1XGs0CdCqgtqP6pcIJbcoXCNGQxex6jb2kJ0zpPmq
-----END PRIVATE KEY-----
";

pub const TRUST_DOMAIN: &str = "cluster.local";
pub const CLUSTER_ID: &str = "Kubernetes";
/// The caller every fixture token names.
pub const NAMESPACE: &str = "default";
pub const SERVICE_ACCOUNT: &str = "sleep";
/// The only SAN the CA may sign for that caller.
pub const CALLER_SAN: &str = "spiffe://cluster.local/ns/default/sa/sleep";
/// Longest certificate lifetime the fixture CA grants.
pub const MAX_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

fn pkcs8() -> &'static [u8] {
    static DER: OnceLock<Vec<u8>> = OnceLock::new();
    DER.get_or_init(|| {
        let b64: String = JWT_KEY_PEM
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("fixture key is base64")
    })
}

fn new_jwt_key() -> JwtKey {
    JwtKey::from_pkcs8(pkcs8()).expect("fixture JWT key loads")
}

/// meshd's verifier for the fixed key.
pub fn jwt_key() -> &'static JwtKey {
    static KEY: OnceLock<JwtKey> = OnceLock::new();
    KEY.get_or_init(new_jwt_key)
}

/// The same key, to sign arbitrary header and payload bytes.
fn signer() -> &'static EcdsaKeyPair {
    static KEY: OnceLock<EcdsaKeyPair> = OnceLock::new();
    KEY.get_or_init(|| {
        EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8(),
            &SystemRandom::new(),
        )
        .expect("fixture JWT key loads")
    })
}

/// A JWS compact token over any header and payload bytes, validly signed
/// with the fixture key (as only meshd could sign it).
pub fn sign_jws(header: &[u8], payload: &[u8]) -> String {
    let input = format!("{}.{}", B64.encode(header), B64.encode(payload));
    let sig = signer()
        .sign(&SystemRandom::new(), input.as_bytes())
        .expect("ECDSA signing");
    format!("{input}.{}", B64.encode(sig.as_ref()))
}

/// A token meshd issues for the fixture caller, valid for `ttl`.
pub fn caller_token(ttl: Duration) -> String {
    jwt_key()
        .issue(&TokenRequest {
            namespace: NAMESPACE.into(),
            service_account: SERVICE_ACCOUNT.into(),
            pod: Some(("sleep-7f9c".into(), "0b7d4f3e".into())),
            ttl,
            audience: AUDIENCE.into(),
        })
        .expect("issuing a token")
}

/// meshd's CA: `sidetunnel-meshd init` in a temporary directory, loaded,
/// and the directory removed (the CA keeps its material in memory).
pub fn ca() -> &'static Arc<Ca> {
    static CA: OnceLock<Arc<Ca>> = OnceLock::new();
    CA.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        pki::init(dir.path(), TRUST_DOMAIN).expect("meshd init");
        Arc::new(Ca::load(dir.path()).expect("CA loads"))
    })
}

/// meshd's Istio CA service, authenticating with the fixture key.
pub fn ca_service() -> &'static CaService {
    static SVC: OnceLock<CaService> = OnceLock::new();
    SVC.get_or_init(|| {
        let auth = Arc::new(Authenticator::new(new_jwt_key(), CLUSTER_ID.into()));
        CaService::new(auth, ca().clone(), TRUST_DOMAIN.into(), MAX_CERT_TTL)
    })
}

/// meshd's request authenticator for the fixture key.
pub fn authenticator() -> &'static Authenticator {
    static AUTH: OnceLock<Authenticator> = OnceLock::new();
    AUTH.get_or_init(|| Authenticator::new(new_jwt_key(), CLUSTER_ID.into()))
}

/// What meshd verified must name an identity the proxy accepts: meshd
/// signs certificates for `spiffe://<td>/ns/<namespace>/sa/<sa>`, so a
/// namespace or service account holding `/` (or anything else outside a
/// SPIFFE path segment) would let two callers share one SPIFFE ID.
pub fn assert_spiffe_identity(id: &sidetunnel_meshd::jwt::Identity) {
    let spiffe = id.spiffe(TRUST_DOMAIN);
    let parsed =
        netproxy::identity::Identity::new(TRUST_DOMAIN, &id.namespace, &id.service_account)
            .unwrap_or_else(|e| {
                panic!("verified token names {spiffe:?}, not a SPIFFE identity: {e}")
            });
    assert_eq!(parsed.as_str(), spiffe);
    assert_eq!(parsed.namespace(), id.namespace);
    assert_eq!(parsed.service_account(), id.service_account);
}

/// What meshd's CA returned for a CSR it accepted for the fixture caller:
/// `[leaf, root]`, the leaf issued by the root for the CSR's key, not a CA,
/// valid no longer than `max_ttl` (plus meshd's 60 s backdating), and with
/// exactly one SAN: the caller's SPIFFE URI.
pub fn assert_issued(chain: &[String], csr_pem: &str, max_ttl: Duration) {
    use rcgen::PublicKeyData;
    use x509_parser::extensions::GeneralName;

    assert_eq!(chain.len(), 2, "chain is leaf + root");
    assert_eq!(chain[1], ca().root_pem(), "second entry is the root");
    let (_, leaf_pem) = x509_parser::pem::parse_x509_pem(chain[0].as_bytes()).expect("leaf PEM");
    let leaf = leaf_pem.parse_x509().expect("leaf DER");
    let (_, root_pem) = x509_parser::pem::parse_x509_pem(chain[1].as_bytes()).expect("root PEM");
    let root = root_pem.parse_x509().expect("root DER");
    assert_eq!(leaf.issuer(), root.subject(), "leaf issued by the root");
    assert!(
        leaf.verify_signature(Some(root.public_key())).is_ok(),
        "leaf signature verifies with the root key"
    );
    assert!(!leaf.is_ca(), "CA certificate issued to a workload");
    let sans: Vec<&GeneralName<'_>> = leaf
        .subject_alternative_name()
        .expect("one SAN extension")
        .map(|e| e.value.general_names.iter().collect())
        .unwrap_or_default();
    assert_eq!(sans, [&GeneralName::URI(CALLER_SAN)], "issued SANs");
    let v = leaf.validity();
    let lifetime = v.not_after.timestamp() - v.not_before.timestamp();
    let max = i64::try_from(max_ttl.as_secs()).expect("small ttl") + 60 + 2;
    assert!(
        (0..=max).contains(&lifetime),
        "lifetime {lifetime}s > {max}s"
    );
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).expect("accepted CSR");
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        csr.public_key.der_bytes(),
        "leaf certifies the CSR's key"
    );
}

/// DER bytes as a PEM block with `label`.
pub fn pem_wrap(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
