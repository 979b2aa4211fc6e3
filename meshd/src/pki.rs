//! meshd's key material: the state directory created by `init` (root CA,
//! xDS serving certificate, JWT signing key, trust domain) and the CA that
//! signs workload certificates from CSRs.

use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::SecureRandom;

pub const ROOT_CERT: &str = "root-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const XDS_CERT: &str = "xds-cert.pem";
pub const XDS_KEY: &str = "xds-key.pem";
pub const JWT_KEY: &str = "jwt-key.pem";
pub const TRUST_DOMAIN: &str = "trust-domain";

/// DNS names the xDS serving certificate is valid for.
pub const XDS_DNS_SANS: &[&str] = &["localhost", "istiod.istio-system.svc"];
/// Lifetime of the root and of the serving certificate.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86400);
/// Certificates are valid from slightly in the past so a client whose clock
/// lags a little does not reject a fresh certificate.
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Rcgen { what: String, source: rcgen::Error },
    #[error("{0}")]
    Invalid(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

fn rc_err(what: &str) -> impl FnOnce(rcgen::Error) -> PkiError + '_ {
    move |source| PkiError::Rcgen {
        what: what.to_owned(),
        source,
    }
}

/// Writes `contents` to `path` unless the file exists; private files are 0600.
fn write_new(path: &Path, contents: &str, private: bool) -> Result<bool, PkiError> {
    if path.exists() {
        return Ok(false);
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(contents.as_bytes()).map_err(io_err(path))?;
    Ok(true)
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(io_err(path))
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("system RNG failed");
    b[0] &= 0x7f; // positive INTEGER
    SerialNumber::from_slice(&b)
}

fn validity(params: &mut CertificateParams, ttl: Duration) {
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + ttl).into();
}

fn root_params(trust_domain: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, "sidetunnel-meshd root CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.serial_number = Some(random_serial());
    validity(&mut p, CA_VALIDITY);
    p
}

/// Creates the state directory's missing files; existing files are kept.
/// Returns the names of the files it created.
pub fn init(dir: &Path, trust_domain: &str) -> Result<Vec<&'static str>, PkiError> {
    validate_trust_domain(trust_domain)?;
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut created = Vec::new();
    let mut note = |name: &'static str, did: bool| {
        if did {
            created.push(name);
        }
    };
    note(
        TRUST_DOMAIN,
        write_new(&dir.join(TRUST_DOMAIN), &format!("{trust_domain}\n"), false)?,
    );
    let trust_domain = read_trust_domain(dir)?;

    let ca_key_path = dir.join(CA_KEY);
    let root_path = dir.join(ROOT_CERT);
    if !ca_key_path.exists() {
        if root_path.exists() {
            return Err(PkiError::Invalid(format!(
                "{} exists but {} does not: remove the root to regenerate both",
                root_path.display(),
                ca_key_path.display()
            )));
        }
        let key = KeyPair::generate().map_err(rc_err("generating CA key"))?;
        note(CA_KEY, write_new(&ca_key_path, &key.serialize_pem(), true)?);
    }
    if !root_path.exists() {
        let key = load_key(&ca_key_path)?;
        let root = root_params(&trust_domain)
            .self_signed(&key)
            .map_err(rc_err("self-signing root"))?;
        note(ROOT_CERT, write_new(&root_path, &root.pem(), false)?);
    }
    let xds_key_path = dir.join(XDS_KEY);
    let xds_cert_path = dir.join(XDS_CERT);
    if !xds_cert_path.exists() || !xds_key_path.exists() {
        let ca = Ca::load(dir)?;
        let key = KeyPair::generate().map_err(rc_err("generating xDS key"))?;
        let cert = ca.serving_cert(&key)?;
        // Replace both together so key and certificate always match.
        let _ = fs::remove_file(&xds_key_path);
        let _ = fs::remove_file(&xds_cert_path);
        note(
            XDS_KEY,
            write_new(&xds_key_path, &key.serialize_pem(), true)?,
        );
        note(XDS_CERT, write_new(&xds_cert_path, &cert, false)?);
    }
    let jwt_path = dir.join(JWT_KEY);
    if !jwt_path.exists() {
        let key = KeyPair::generate().map_err(rc_err("generating JWT key"))?;
        note(JWT_KEY, write_new(&jwt_path, &key.serialize_pem(), true)?);
    }
    Ok(created)
}

fn validate_trust_domain(td: &str) -> Result<(), PkiError> {
    let ok = !td.is_empty()
        && td
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c));
    if ok {
        Ok(())
    } else {
        Err(PkiError::Invalid(format!(
            "invalid trust domain {td:?}: use lowercase letters, digits, '-', '.', '_'"
        )))
    }
}

/// Reads `DIR/trust-domain`.
pub fn read_trust_domain(dir: &Path) -> Result<String, PkiError> {
    let td = read(&dir.join(TRUST_DOMAIN))?.trim().to_owned();
    validate_trust_domain(&td)?;
    Ok(td)
}

fn load_key(path: &Path) -> Result<KeyPair, PkiError> {
    KeyPair::from_pem(&read(path)?).map_err(|source| PkiError::Rcgen {
        what: format!("parsing key {}", path.display()),
        source,
    })
}

/// Loads a PKCS#8 PEM private key as DER (for ring).
pub fn load_pkcs8_der(path: &Path) -> Result<Vec<u8>, PkiError> {
    Ok(load_key(path)?.serialize_der())
}

/// The CA: the root certificate and its key.
pub struct Ca {
    root_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate signed from a CSR.
#[derive(Debug)]
pub struct Signed {
    /// Leaf first, then the root; one PEM per entry (as istiod returns).
    pub chain: Vec<String>,
}

impl Ca {
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let root_pem = read(&dir.join(ROOT_CERT))?;
        let key = load_key(&dir.join(CA_KEY))?;
        let issuer = Issuer::from_ca_cert_pem(&root_pem, key).map_err(rc_err("parsing root"))?;
        Ok(Ca { root_pem, issuer })
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    fn serving_cert(&self, key: &KeyPair) -> Result<String, PkiError> {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "sidetunnel-meshd");
        p.distinguished_name = dn;
        p.subject_alt_names = XDS_DNS_SANS
            .iter()
            .map(|d| Ok(SanType::DnsName((*d).try_into()?)))
            .chain([
                Ok(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST))),
                Ok(SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST))),
            ])
            .collect::<Result<_, rcgen::Error>>()
            .map_err(rc_err("serving SANs"))?;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.serial_number = Some(random_serial());
        validity(&mut p, CA_VALIDITY);
        let cert = p
            .signed_by(key, &self.issuer)
            .map_err(rc_err("signing serving certificate"))?;
        Ok(cert.pem())
    }

    /// Verifies `csr_pem` (parse + signature), requires its only SAN to be the
    /// URI `expected_san`, and signs a leaf valid for `ttl`.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        expected_san: &str,
        ttl: Duration,
    ) -> Result<Signed, CsrError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CsrError::Invalid(format!("CSR rejected: {e}")))?;
        let uris: Vec<&str> = csr
            .params
            .subject_alt_names
            .iter()
            .filter_map(|s| match s {
                SanType::URI(u) => Some(u.as_str()),
                _ => None,
            })
            .collect();
        let sans = csr.params.subject_alt_names.len();
        if uris.len() != 1 || sans != 1 {
            return Err(CsrError::Identity(format!(
                "CSR must carry exactly one URI SAN ({expected_san}); it has {} SANs, {} URIs: {uris:?}",
                sans,
                uris.len()
            )));
        }
        if uris[0] != expected_san {
            return Err(CsrError::Identity(format!(
                "CSR requests identity {} but the caller is {expected_san}",
                uris[0]
            )));
        }
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = csr.params.subject_alt_names.clone();
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(random_serial());
        validity(&mut p, ttl);
        let cert = p
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| CsrError::Invalid(format!("signing failed: {e}")))?;
        Ok(Signed {
            chain: vec![cert.pem(), self.root_pem.clone()],
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    /// The CSR is malformed or its signature does not verify.
    #[error("{0}")]
    Invalid(String),
    /// The CSR asks for an identity the caller does not have.
    #[error("{0}")]
    Identity(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;

    fn csr(sans: &[SanType]) -> String {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = sans.to_vec();
        let key = KeyPair::generate().unwrap();
        p.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn pem_encode(label: &str, der: &[u8]) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn init_is_idempotent_and_signs() {
        let dir = tempfile::tempdir().unwrap();
        let created = init(dir.path(), "example.org").unwrap();
        assert_eq!(created.len(), 6, "{created:?}");
        let root = read(&dir.path().join(ROOT_CERT)).unwrap();
        assert!(init(dir.path(), "other.org").unwrap().is_empty());
        assert_eq!(read(&dir.path().join(ROOT_CERT)).unwrap(), root);
        assert_eq!(read_trust_domain(dir.path()).unwrap(), "example.org");
        // Missing serving cert is regenerated under the same root.
        fs::remove_file(dir.path().join(XDS_CERT)).unwrap();
        assert_eq!(
            init(dir.path(), "example.org").unwrap(),
            [XDS_KEY, XDS_CERT]
        );

        let ca = Ca::load(dir.path()).unwrap();
        let id = "spiffe://example.org/ns/a/sa/b";
        let signed = ca
            .sign_csr(&csr(&[uri(id)]), id, Duration::from_secs(3600))
            .unwrap();
        assert_eq!(signed.chain.len(), 2);
        assert_eq!(signed.chain[1], root);
    }

    #[test]
    fn csr_identity_checks() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), "cluster.local").unwrap();
        let ca = Ca::load(dir.path()).unwrap();
        let id = "spiffe://cluster.local/ns/a/sa/b";
        let ttl = Duration::from_secs(60);
        let other = ca.sign_csr(&csr(&[uri("spiffe://cluster.local/ns/a/sa/c")]), id, ttl);
        assert!(matches!(other, Err(CsrError::Identity(m)) if m.contains("sa/c")));
        let two = ca.sign_csr(&csr(&[uri(id), uri(id)]), id, ttl);
        assert!(matches!(two, Err(CsrError::Identity(_))));
        let dns = ca.sign_csr(
            &csr(&[uri(id), SanType::DnsName("x.example".try_into().unwrap())]),
            id,
            ttl,
        );
        assert!(matches!(dns, Err(CsrError::Identity(_))));
        let none = ca.sign_csr(&csr(&[]), id, ttl);
        assert!(matches!(none, Err(CsrError::Identity(_))));
        // A well-formed CSR whose signature does not verify.
        let good = csr(&[uri(id)]);
        let mut der =
            rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(good.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec();
        let last = der.len() - 2;
        der[last] ^= 0x55;
        let tampered = pem_encode("CERTIFICATE REQUEST", &der);
        let bad_sig = ca.sign_csr(&tampered, id, ttl);
        assert!(
            matches!(&bad_sig, Err(CsrError::Invalid(m)) if m.contains("signature")),
            "{bad_sig:?}"
        );
        let garbage = ca.sign_csr(
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            id,
            ttl,
        );
        assert!(matches!(garbage, Err(CsrError::Invalid(_))));
    }
}
