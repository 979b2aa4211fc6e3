//! CSRs as callers send them to meshd's CA (`IstioCertificateRequest.csr`,
//! untrusted): the input as DER (wrapped into a PEM block) and as PEM text
//! → parse, signature check, SAN identity check, signing. Must never panic;
//! whatever is signed for the fixture caller is a leaf for that caller's
//! SPIFFE ID only (see `assert_issued`).
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use sidetunnel_fuzz::{CALLER_SAN, assert_issued, ca, pem_wrap};

const TTL: Duration = Duration::from_secs(3600);

fn check(pem: &str) {
    if let Ok(signed) = ca().sign_csr(pem, CALLER_SAN, TTL) {
        assert_issued(&signed.chain, pem, TTL);
    }
}

fuzz_target!(|data: &[u8]| {
    check(&pem_wrap("CERTIFICATE REQUEST", data));
    if let Ok(text) = std::str::from_utf8(data) {
        check(text);
    }
});
