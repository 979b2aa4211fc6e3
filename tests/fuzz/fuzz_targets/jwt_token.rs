//! Bearer credentials as any caller of meshd's xDS and CA port sends them:
//! `clusterid` and `authorization` metadata values → scheme split → JWT
//! split, base64url, JSON, ES256 signature (meshd's fixed test key), time
//! window, audience, identity. Input: `<clusterid>\n<authorization>` (no
//! newline: authorization only; newlines cannot occur in header values).
//! Checks: never panics; the metadata path and a direct `verify` of the
//! token agree; whatever verifies names a valid SPIFFE identity.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sidetunnel_fuzz::{CLUSTER_ID, assert_spiffe_identity, authenticator, jwt_key};
use sidetunnel_meshd::auth::CLUSTER_ID_HEADER;
use tonic::metadata::{MetadataMap, MetadataValue};

fuzz_target!(|data: &[u8]| {
    let (cluster, auth) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (Some(&data[..i]), &data[i + 1..]),
        None => (None, data),
    };
    if let Ok(token) = std::str::from_utf8(auth)
        && let Ok(id) = jwt_key().verify(token)
    {
        assert_spiffe_identity(&id);
    }

    let mut md = MetadataMap::new();
    if let Some(c) = cluster {
        let Ok(v) = MetadataValue::try_from(c) else {
            return;
        };
        md.insert(CLUSTER_ID_HEADER, v);
    }
    if let Ok(v) = MetadataValue::try_from(auth) {
        md.insert("authorization", v);
    }
    let Ok(id) = authenticator().authenticate(&md) else {
        return;
    };
    assert_spiffe_identity(&id);
    if let Some(c) = cluster {
        assert_eq!(c, CLUSTER_ID.as_bytes(), "accepted a foreign clusterid");
    }
    // The credential accepted is "<scheme> <token>": the token alone
    // verifies to the same identity.
    let text = std::str::from_utf8(auth).expect("accepted header is ASCII");
    let (_, token) = text.split_once(' ').expect("accepted header has a scheme");
    assert_eq!(jwt_key().verify(token.trim()), Ok(id));
});
