//! SPIFFE identities as Istio uses them: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! The parser is strict (exactly that shape, no empty segments, no query or
//! fragment) because an identity is compared byte for byte against
//! certificate SANs and authorization principals: two spellings of the same
//! identity must not exist.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Why a string is not a valid Istio SPIFFE identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityParseError {
    #[error("identity {0:?} does not start with \"spiffe://\"")]
    MissingScheme(String),
    #[error(
        "identity {0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    BadShape(String),
    #[error("identity {input:?} has an empty {segment}")]
    EmptySegment {
        input: String,
        segment: &'static str,
    },
    #[error("identity {input:?}: {segment} {value:?} contains a character outside [A-Za-z0-9._-]")]
    BadCharacter {
        input: String,
        segment: &'static str,
        value: String,
    },
}

/// An Istio workload identity. The URI is stored once behind an `Arc`
/// (clones are a reference-count increment: identities are copied into pool
/// keys, requests and metrics labels on the hot path); the parts are slices
/// of it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    uri: Arc<str>,
    /// End of the trust domain; the namespace starts 4 bytes later ("/ns/").
    td_end: u32,
    /// End of the namespace; the service account starts 4 bytes later ("/sa/").
    ns_end: u32,
}

const SCHEME: &str = "spiffe://";

impl Identity {
    /// Builds an identity from its parts, validating each one.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityParseError> {
        format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..self.td_end as usize]
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.uri[self.td_end as usize + 4..self.ns_end as usize]
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.uri[self.ns_end as usize + 4..]
    }

    /// The full `spiffe://…` URI.
    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.uri, f)
    }
}

/// Segments are DNS labels / Kubernetes names in practice; SPIFFE allows
/// `[A-Za-z0-9._-]` in path segments and trust domains.
fn check_segment(
    input: &str,
    segment: &'static str,
    value: &str,
) -> Result<(), IdentityParseError> {
    if value.is_empty() {
        return Err(IdentityParseError::EmptySegment {
            input: input.to_owned(),
            segment,
        });
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(IdentityParseError::BadCharacter {
            input: input.to_owned(),
            segment,
            value: value.to_owned(),
        });
    }
    Ok(())
}

impl FromStr for Identity {
    type Err = IdentityParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityParseError::MissingScheme(s.to_owned()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => {
                check_segment(s, "trust domain", td)?;
                check_segment(s, "namespace", ns)?;
                check_segment(s, "service account", sa)?;
                if s.len() > u32::MAX as usize {
                    return Err(IdentityParseError::BadShape(s.to_owned()));
                }
                let td_end = SCHEME.len() + td.len();
                Ok(Self {
                    uri: Arc::from(s),
                    td_end: td_end as u32,
                    ns_end: (td_end + 4 + ns.len()) as u32,
                })
            }
            _ => Err(IdentityParseError::BadShape(s.to_owned())),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl serde::Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Identity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays() {
        let id: Identity = "spiffe://cluster.local/ns/default/sa/bookinfo-ratings"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "bookinfo-ratings");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/bookinfo-ratings"
        );
        let dots: Identity = "spiffe://td.with.dots/ns/ns.with.dots/sa/sa.with.dots"
            .parse()
            .unwrap();
        assert_eq!(dots.namespace(), "ns.with.dots");
        let built = Identity::new("td", "ns", "sa").unwrap();
        assert_eq!(built.to_string(), "spiffe://td/ns/ns/sa/sa");
        assert_eq!(
            (
                built.trust_domain(),
                built.namespace(),
                built.service_account()
            ),
            ("td", "ns", "sa")
        );
        assert_eq!(built, "spiffe://td/ns/ns/sa/sa".parse().unwrap());
    }

    #[test]
    fn rejects_malformed() {
        use IdentityParseError::*;
        let err = |s: &str| s.parse::<Identity>().unwrap_err();
        assert!(matches!(err("td/ns/ns/sa/sa"), MissingScheme(_)));
        assert!(matches!(err("SPIFFE://td/ns/ns/sa/sa"), MissingScheme(_)));
        assert!(matches!(err("spiffe://td/ns/ns/sa"), BadShape(_)));
        assert!(matches!(err("spiffe://td/ns/ns/sa/sa/"), BadShape(_)));
        assert!(matches!(err("spiffe://td/ns/ns/foobar/sa"), BadShape(_)));
        assert!(matches!(err("spiffe://td/sa/sa/ns/ns"), BadShape(_)));
        assert!(matches!(
            err("spiffe://td/ns//sa/sa"),
            EmptySegment {
                segment: "namespace",
                ..
            }
        ));
        assert!(matches!(
            err("spiffe:///ns/a/sa/b"),
            EmptySegment {
                segment: "trust domain",
                ..
            }
        ));
        assert!(matches!(
            err("spiffe://td/ns/a/sa/"),
            EmptySegment {
                segment: "service account",
                ..
            }
        ));
        assert!(matches!(
            err("spiffe://td/ns/a b/sa/c"),
            BadCharacter { .. }
        ));
        assert!(matches!(
            err("spiffe://td/ns/a/sa/c?x=1"),
            BadCharacter { .. }
        ));
        assert!(matches!(
            err("spiffe://td:80/ns/a/sa/c"),
            BadCharacter { .. }
        ));
        assert!(Identity::new("td", "", "sa").is_err());
        // The message names the offending input.
        assert!(
            err("spiffe://td/ns/x")
                .to_string()
                .contains("spiffe://td/ns/x")
        );
    }

    #[test]
    fn serde_round_trip() {
        let id = Identity::new("cluster.local", "a", "b").unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://cluster.local/ns/a/sa/b\"");
        assert_eq!(serde_json::from_str::<Identity>(&json).unwrap(), id);
        assert!(serde_json::from_str::<Identity>("\"nope\"").is_err());
    }
}
