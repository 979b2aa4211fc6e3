//! SPIFFE identity strings (from peer certificate SANs, authorization
//! principals, CA responses). Checks that the strict parser has one
//! spelling per identity: what parses prints back unchanged, its parts
//! rebuild it, and serde agrees with `FromStr`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netproxy::identity::Identity;

fuzz_target!(|s: &str| {
    let Ok(id) = s.parse::<Identity>() else {
        return;
    };
    assert_eq!(id.to_string(), s);
    assert_eq!(id.as_str(), s);
    let rebuilt = Identity::new(id.trust_domain(), id.namespace(), id.service_account())
        .expect("parts of a valid identity are valid");
    assert_eq!(rebuilt, id);
    for part in [id.trust_domain(), id.namespace(), id.service_account()] {
        assert!(!part.is_empty() && !part.contains('/'), "{part:?}");
    }
    let json = serde_json::to_string(&id).expect("serializes");
    let back: Identity = serde_json::from_str(&json).expect("deserializes");
    assert_eq!(back, id);
});
