//! Peer and CA-issued certificates: DER → URI SANs → SPIFFE identities (what
//! the mTLS verifiers authorize on), the same bytes as a PEM bundle (CA
//! responses, roots files), and as a leaf/root pair for a workload
//! certificate. Checks that every identity extracted prints back as itself.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use netproxy::identity::{Identity, WorkloadCertificate, identities_of, parse_pem_certificates};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A real key, so certificate loading gets past key parsing.
fn key() -> PrivateKeyDer<'static> {
    static KEY: OnceLock<Vec<u8>> = OnceLock::new();
    let pkcs8 = KEY.get_or_init(|| {
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &SystemRandom::new())
            .expect("key generation")
            .as_ref()
            .to_vec()
    });
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8.clone()))
}

fn check(der: &CertificateDer<'_>) {
    if let Ok(ids) = identities_of(der) {
        for id in ids {
            let again: Identity = id.as_str().parse().expect("extracted identity reparses");
            assert_eq!(again, id);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let der = CertificateDer::from(data.to_vec());
    check(&der);
    if let Ok(c) = WorkloadCertificate::from_der(vec![der.clone()], key(), vec![der]) {
        let info = c.info();
        assert_eq!(info.identity, c.identity().to_string());
    }
    if let Ok(certs) = parse_pem_certificates(data) {
        certs.iter().for_each(check);
    }
});
