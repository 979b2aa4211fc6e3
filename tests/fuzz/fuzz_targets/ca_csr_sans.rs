//! Structure-aware CSR fuzzing of the CA's identity check: the input is a
//! list of SANs, one per line, `U<uri>`, `D<dns name>`, `I<ip address>` or
//! `E<email>`; the target builds a validly signed CSR carrying them (so
//! every input gets past parsing and the signature check) and asks meshd's
//! CA to sign it for the fixture caller. Checks that a certificate is
//! issued exactly when the only SAN is the caller's SPIFFE URI: never for a
//! CSR whose SANs differ from the token identity (another identity, a
//! look-alike spelling, an extra SAN), and that what is issued is right.
#![no_main]

use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use sidetunnel_fuzz::{CALLER_SAN, assert_issued, ca};

const TTL: Duration = Duration::from_secs(600);

fn key() -> &'static KeyPair {
    static KEY: OnceLock<KeyPair> = OnceLock::new();
    KEY.get_or_init(|| KeyPair::generate().expect("key generation"))
}

fn san(line: &str) -> Option<SanType> {
    let mut chars = line.chars();
    let kind = chars.next()?;
    let value = chars.as_str();
    Some(match kind {
        'U' => SanType::URI(value.try_into().ok()?),
        'D' => SanType::DnsName(value.try_into().ok()?),
        'E' => SanType::Rfc822Name(value.try_into().ok()?),
        'I' => SanType::IpAddress(value.parse::<IpAddr>().ok()?),
        _ => return None,
    })
}

fuzz_target!(|text: &str| {
    let Some(sans) = text.split('\n').map(san).collect::<Option<Vec<_>>>() else {
        return;
    };
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans.clone();
    let Ok(pem) = params.serialize_request(key()).and_then(|csr| csr.pem()) else {
        return;
    };
    let signed = ca().sign_csr(&pem, CALLER_SAN, TTL);
    let only_caller = matches!(sans.as_slice(), [SanType::URI(u)] if u.as_str() == CALLER_SAN);
    match signed {
        Ok(s) => {
            assert!(only_caller, "signed a CSR for {sans:?}");
            assert_issued(&s.chain, &pem, TTL);
        }
        Err(e) => assert!(!only_caller, "refused the caller's own CSR: {e}"),
    }
});
