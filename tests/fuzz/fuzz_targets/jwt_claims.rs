//! Structure-aware JWT fuzzing: the input is the JSON of a token's header
//! and claims (`<header>\0<claims>`, or claims alone under meshd's usual
//! header), which the target signs with meshd's key, so every mutation gets
//! past the signature and reaches the checks a forged token never could:
//! algorithm, expiry and not-before with leeway, audience as string or
//! list, identity from `kubernetes.io` or `sub`. Checks against an
//! independent reading of the same JSON that whatever verifies has alg
//! ES256, is inside its time window, is for `istio-ca`, and names exactly
//! the identity its claims carry, as a valid SPIFFE identity.
#![no_main]

use std::time::{SystemTime, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use sidetunnel_fuzz::{assert_spiffe_identity, jwt_key, sign_jws};
use sidetunnel_meshd::jwt::AUDIENCE;

const HEADER: &[u8] = br#"{"alg":"ES256","typ":"JWT"}"#;
/// meshd's `exp`/`nbf` leeway.
const LEEWAY: u64 = 60;

#[derive(Deserialize)]
struct HeaderRead {
    alg: String,
}

#[derive(Deserialize)]
struct ClaimsRead {
    sub: String,
    aud: AudRead,
    exp: u64,
    nbf: u64,
    #[serde(rename = "kubernetes.io", default)]
    kubernetes: Option<K8sRead>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum AudRead {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct K8sRead {
    namespace: String,
    serviceaccount: NameRead,
}

#[derive(Deserialize)]
struct NameRead {
    name: String,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fuzz_target!(|data: &[u8]| {
    let (header, claims) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (HEADER, data),
    };
    let token = sign_jws(header, claims);
    let before = now();
    let Ok(id) = jwt_key().verify(&token) else {
        return;
    };
    let after = now();
    assert_spiffe_identity(&id);

    // The target's own reading of the fields meshd decides on. serde skips
    // unknown fields without checking them (invalid UTF-8, numbers out of
    // f64 range: harmless, meshd never reads them), so this reading skips
    // them too instead of parsing the whole document.
    let h: HeaderRead = serde_json::from_slice(header).expect("accepted header reads");
    assert_eq!(h.alg, "ES256", "accepted algorithm {:?}", h.alg);
    let c: ClaimsRead = serde_json::from_slice(claims).expect("accepted claims read");
    assert!(
        c.exp.saturating_add(LEEWAY) >= before,
        "expired token accepted: exp {}",
        c.exp
    );
    assert!(
        c.nbf <= after.saturating_add(LEEWAY),
        "future token accepted: nbf {}",
        c.nbf
    );
    let aud_ok = match &c.aud {
        AudRead::One(a) => a == AUDIENCE,
        AudRead::Many(v) => v.iter().any(|a| a == AUDIENCE),
    };
    assert!(aud_ok, "audience without {AUDIENCE} accepted");

    let (ns, sa) = match &c.kubernetes {
        None => c
            .sub
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
            .expect("sub names namespace:service-account"),
        Some(k) => (k.namespace.as_str(), k.serviceaccount.name.as_str()),
    };
    assert_eq!(
        (id.namespace.as_str(), id.service_account.as_str()),
        (ns, sa)
    );
});
