//! Bearer tokens shaped like Kubernetes projected service-account tokens,
//! ES256-signed (JWS compact form) with ring, and their verification.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _,
    UnparsedPublicKey,
};
use serde::{Deserialize, Serialize};

/// Issuer claim meshd puts in its tokens.
pub const ISSUER: &str = "sidetunnel-meshd";
/// Audience Istio's CA and xDS server require.
pub const AUDIENCE: &str = "istio-ca";
/// Clock skew tolerated on `exp`/`nbf`.
const LEEWAY_SECS: u64 = 60;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwtError {
    #[error("token is not a JWT (expected header.payload.signature)")]
    Malformed,
    #[error("token {0} is not valid base64url")]
    Base64(&'static str),
    #[error("token {0} is not valid JSON: {1}")]
    Json(&'static str, String),
    #[error("token algorithm {0:?} is not ES256")]
    Algorithm(String),
    #[error("token signature does not verify with meshd's JWT key")]
    Signature,
    #[error("token expired at {exp} (now {now})")]
    Expired { exp: u64, now: u64 },
    #[error("token not valid before {nbf} (now {now})")]
    NotYetValid { nbf: u64, now: u64 },
    #[error("token audience {0:?} does not include {AUDIENCE:?}")]
    Audience(Vec<String>),
    #[error("token carries no service-account identity: {0}")]
    Identity(String),
    #[error("invalid JWT key: {0}")]
    Key(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameUid {
    pub name: String,
    #[serde(default)]
    pub uid: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubernetesClaims {
    pub namespace: String,
    pub serviceaccount: NameUid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<NameUid>,
}

/// Audience may be a string or a list, as in RFC 7519.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn contains(&self, a: &str) -> bool {
        match self {
            Audience::One(s) => s == a,
            Audience::Many(v) => v.iter().any(|s| s == a),
        }
    }
    fn to_vec(&self) -> Vec<String> {
        match self {
            Audience::One(s) => vec![s.clone()],
            Audience::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: Audience,
    pub exp: u64,
    pub iat: u64,
    pub nbf: u64,
    #[serde(
        rename = "kubernetes.io",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub kubernetes: Option<KubernetesClaims>,
}

/// The caller identity a verified token carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: Option<String>,
}

impl Identity {
    pub fn spiffe(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

/// What to put in a new token.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub namespace: String,
    pub service_account: String,
    pub pod: Option<(String, String)>,
    pub ttl: Duration,
    pub audience: String,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Signs and verifies tokens with one ES256 key.
pub struct JwtKey {
    pair: EcdsaKeyPair,
    kid: String,
}

impl JwtKey {
    /// From a PKCS#8 DER ECDSA P-256 key.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, JwtError> {
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &SystemRandom::new())
                .map_err(|e| JwtError::Key(e.to_string()))?;
        let digest = ring::digest::digest(&ring::digest::SHA256, pair.public_key().as_ref());
        let kid = B64.encode(&digest.as_ref()[..12]);
        Ok(JwtKey { pair, kid })
    }

    pub fn issue(&self, req: &TokenRequest) -> Result<String, JwtError> {
        check_names(&req.namespace, &req.service_account)?;
        let now = now_secs();
        let sa_uid = uid_for(&format!("{}/{}", req.namespace, req.service_account));
        let claims = Claims {
            iss: ISSUER.into(),
            sub: format!(
                "system:serviceaccount:{}:{}",
                req.namespace, req.service_account
            ),
            aud: Audience::Many(vec![req.audience.clone()]),
            exp: now + req.ttl.as_secs(),
            iat: now,
            nbf: now,
            kubernetes: Some(KubernetesClaims {
                namespace: req.namespace.clone(),
                serviceaccount: NameUid {
                    name: req.service_account.clone(),
                    uid: sa_uid,
                },
                pod: req.pod.as_ref().map(|(name, uid)| NameUid {
                    name: name.clone(),
                    uid: uid.clone(),
                }),
            }),
        };
        self.sign(&claims)
    }

    fn sign(&self, claims: &Claims) -> Result<String, JwtError> {
        let header = Header {
            alg: "ES256".into(),
            typ: Some("JWT".into()),
            kid: Some(self.kid.clone()),
        };
        let signing_input = format!("{}.{}", encode_json(&header), encode_json(claims));
        let sig = self
            .pair
            .sign(&SystemRandom::new(), signing_input.as_bytes())
            .map_err(|e| JwtError::Key(e.to_string()))?;
        Ok(format!("{signing_input}.{}", B64.encode(sig.as_ref())))
    }

    /// Verifies signature, time window and audience; returns the identity.
    pub fn verify(&self, token: &str) -> Result<Identity, JwtError> {
        self.verify_at(token, now_secs())
    }

    fn verify_at(&self, token: &str, now: u64) -> Result<Identity, JwtError> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        let header: Header = decode_json(h, "header")?;
        if header.alg != "ES256" {
            return Err(JwtError::Algorithm(header.alg));
        }
        let sig = B64.decode(s).map_err(|_| JwtError::Base64("signature"))?;
        let public = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, self.pair.public_key());
        let signing_input = &token[..h.len() + 1 + p.len()];
        public
            .verify(signing_input.as_bytes(), &sig)
            .map_err(|_| JwtError::Signature)?;
        let claims: Claims = decode_json(p, "payload")?;
        // Saturating: a signed `exp`/`nbf` near u64::MAX must not overflow
        // (a panic in debug builds, a wrapped and wrong window in release).
        if now > claims.exp.saturating_add(LEEWAY_SECS) {
            return Err(JwtError::Expired {
                exp: claims.exp,
                now,
            });
        }
        if claims.nbf > now.saturating_add(LEEWAY_SECS) {
            return Err(JwtError::NotYetValid {
                nbf: claims.nbf,
                now,
            });
        }
        if !claims.aud.contains(AUDIENCE) {
            return Err(JwtError::Audience(claims.aud.to_vec()));
        }
        identity(&claims)
    }
}

/// The claimed identity, whose namespace and service account must be valid
/// SPIFFE path segments: they are pasted into
/// `spiffe://<td>/ns/<namespace>/sa/<service-account>`, where a `/` would
/// let two tokens (namespace `a/sa/b`, and service account `b/sa/c` in
/// namespace `a`) name the same identity.
fn identity(claims: &Claims) -> Result<Identity, JwtError> {
    let id = claimed_identity(claims)?;
    check_names(&id.namespace, &id.service_account)?;
    Ok(id)
}

fn check_names(namespace: &str, service_account: &str) -> Result<(), JwtError> {
    for (what, v) in [
        ("namespace", namespace),
        ("service account", service_account),
    ] {
        let ok = !v.is_empty()
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !ok {
            return Err(JwtError::Identity(format!(
                "{what} {v:?} is not a SPIFFE path segment ([A-Za-z0-9._-])"
            )));
        }
    }
    Ok(())
}

/// Namespace and service account from `kubernetes.io`, else from `sub`.
fn claimed_identity(claims: &Claims) -> Result<Identity, JwtError> {
    if let Some(k) = &claims.kubernetes {
        if k.namespace.is_empty() || k.serviceaccount.name.is_empty() {
            return Err(JwtError::Identity(
                "empty kubernetes.io namespace or serviceaccount".into(),
            ));
        }
        return Ok(Identity {
            namespace: k.namespace.clone(),
            service_account: k.serviceaccount.name.clone(),
            pod_name: k.pod.as_ref().map(|p| p.name.clone()),
        });
    }
    let rest = claims
        .sub
        .strip_prefix("system:serviceaccount:")
        .ok_or_else(|| JwtError::Identity(format!("sub {:?}", claims.sub)))?;
    match rest.split_once(':') {
        Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains(':') => Ok(Identity {
            namespace: ns.into(),
            service_account: sa.into(),
            pod_name: None,
        }),
        _ => Err(JwtError::Identity(format!("sub {:?}", claims.sub))),
    }
}

fn encode_json<T: Serialize>(v: &T) -> String {
    B64.encode(serde_json::to_vec(v).expect("JWT parts always serialize"))
}

fn decode_json<T: serde::de::DeserializeOwned>(
    part: &str,
    what: &'static str,
) -> Result<T, JwtError> {
    let raw = B64.decode(part).map_err(|_| JwtError::Base64(what))?;
    serde_json::from_slice(&raw).map_err(|e| JwtError::Json(what, e.to_string()))
}

/// A stable UUID-shaped id derived from a name (service accounts have uids in
/// Kubernetes; meshd has no API server, so it derives one).
fn uid_for(name: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
    let h: String = d.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> JwtKey {
        let k = rcgen::KeyPair::generate().unwrap();
        JwtKey::from_pkcs8(&k.serialize_der()).unwrap()
    }

    fn req() -> TokenRequest {
        TokenRequest {
            namespace: "ns1".into(),
            service_account: "sa1".into(),
            pod: Some(("pod-a".into(), "uid-a".into())),
            ttl: Duration::from_secs(3600),
            audience: AUDIENCE.into(),
        }
    }

    #[test]
    fn round_trip_and_shape() {
        let k = key();
        let t = k.issue(&req()).unwrap();
        let id = k.verify(&t).unwrap();
        assert_eq!(
            id,
            Identity {
                namespace: "ns1".into(),
                service_account: "sa1".into(),
                pod_name: Some("pod-a".into())
            }
        );
        assert_eq!(
            id.spiffe("cluster.local"),
            "spiffe://cluster.local/ns/ns1/sa/sa1"
        );
        let payload: serde_json::Value =
            serde_json::from_slice(&B64.decode(t.split('.').nth(1).unwrap()).unwrap()).unwrap();
        assert_eq!(payload["sub"], "system:serviceaccount:ns1:sa1");
        assert_eq!(payload["aud"][0], "istio-ca");
        assert_eq!(payload["kubernetes.io"]["pod"]["uid"], "uid-a");
        assert_eq!(payload["kubernetes.io"]["serviceaccount"]["name"], "sa1");
        let header: serde_json::Value =
            serde_json::from_slice(&B64.decode(t.split('.').next().unwrap()).unwrap()).unwrap();
        assert_eq!(header["alg"], "ES256");
    }

    #[test]
    fn rejects_other_key_tampering_expiry_audience() {
        let k = key();
        let t = k.issue(&req()).unwrap();
        assert_eq!(key().verify(&t), Err(JwtError::Signature));

        // Swap the payload for one naming another service account.
        let mut other = req();
        other.service_account = "admin".into();
        let t2 = k.issue(&other).unwrap();
        let parts: Vec<&str> = t.split('.').collect();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            t2.split('.').nth(1).unwrap(),
            parts[2]
        );
        assert_eq!(k.verify(&forged), Err(JwtError::Signature));

        let now = now_secs();
        assert!(matches!(
            k.verify_at(&t, now + 3600 + LEEWAY_SECS + 1),
            Err(JwtError::Expired { .. })
        ));
        assert!(matches!(
            k.verify_at(&t, now - LEEWAY_SECS - 10),
            Err(JwtError::NotYetValid { .. })
        ));

        let mut aud = req();
        aud.audience = "kubernetes".into();
        let t3 = k.issue(&aud).unwrap();
        assert_eq!(
            k.verify(&t3),
            Err(JwtError::Audience(vec!["kubernetes".into()]))
        );
        assert_eq!(k.verify("abc"), Err(JwtError::Malformed));
        assert_eq!(k.verify("a.b.c"), Err(JwtError::Base64("header")));
    }

    /// Fuzz findings (tests/fuzz, target `jwt_claims`): validly signed
    /// claims that must be refused, not panic or name a forged identity.
    #[test]
    fn signed_edge_claims_refused() {
        let k = key();
        let now = now_secs();
        let claims = |sub: &str, exp: u64, nbf: u64, kubernetes| Claims {
            iss: ISSUER.into(),
            sub: sub.into(),
            aud: Audience::One(AUDIENCE.into()),
            exp,
            iat: 0,
            nbf,
            kubernetes,
        };
        // exp near u64::MAX: `exp + leeway` overflowed (debug panic).
        let t = k
            .sign(&claims("system:serviceaccount:a:b", u64::MAX, 0, None))
            .unwrap();
        assert_eq!(k.verify(&t).unwrap().service_account, "b");
        let t = k
            .sign(&claims(
                "system:serviceaccount:a:b",
                now + 100,
                u64::MAX,
                None,
            ))
            .unwrap();
        assert!(matches!(k.verify(&t), Err(JwtError::NotYetValid { .. })));
        // `/` in a name: both tokens would be spiffe://td/ns/a/sa/b/sa/c.
        let slash_sa = claims("system:serviceaccount:a:b/sa/c", now + 100, 0, None);
        let slash_ns = claims(
            "",
            now + 100,
            0,
            Some(KubernetesClaims {
                namespace: "a/sa/b".into(),
                serviceaccount: NameUid {
                    name: "c".into(),
                    uid: String::new(),
                },
                pod: None,
            }),
        );
        for c in [slash_sa, slash_ns] {
            let t = k.sign(&c).unwrap();
            assert!(
                matches!(&k.verify(&t), Err(JwtError::Identity(m)) if m.contains("SPIFFE")),
                "{:?}",
                k.verify(&t)
            );
        }
        let mut bad = req();
        bad.namespace = "a/b".into();
        assert!(matches!(k.issue(&bad), Err(JwtError::Identity(_))));
    }

    #[test]
    fn identity_from_sub_when_no_kubernetes_claims() {
        let mk = |sub: &str| Claims {
            iss: ISSUER.into(),
            sub: sub.into(),
            aud: Audience::One(AUDIENCE.into()),
            exp: 0,
            iat: 0,
            nbf: 0,
            kubernetes: None,
        };
        let id = identity(&mk("system:serviceaccount:a:b")).unwrap();
        assert_eq!(
            (id.namespace.as_str(), id.service_account.as_str()),
            ("a", "b")
        );
        assert!(identity(&mk("user:alice")).is_err());
        assert!(identity(&mk("system:serviceaccount:a")).is_err());
        assert!(identity(&mk("system:serviceaccount::b")).is_err());
        // A string audience is accepted, as RFC 7519 allows.
        let k = key();
        let mut c = mk("system:serviceaccount:a:b");
        c.exp = now_secs() + 100;
        let t = k.sign(&c).unwrap();
        assert_eq!(k.verify(&t).unwrap().namespace, "a");
    }
}
