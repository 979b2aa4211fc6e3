//! Turns one `DeltaDiscoveryResponse` into a store update plus the verdict
//! to send back. Each resource is decoded and validated on its own: the good
//! ones are applied and the bad ones are listed in the NACK, so one bad
//! resource never hides the rest of the mesh (as ztunnel does).

use prost::Message;
use sidetunnel_proto::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
use sidetunnel_proto::istio::{security, workload};
use sidetunnel_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

use crate::state::{StoreUpdate, convert};

/// The resource types this client understands.
pub const TYPE_URLS: [&str; 2] = [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL];

/// A resource that failed decoding or validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub name: String,
    pub reason: String,
}

/// Outcome of processing one response.
#[derive(Debug, Default)]
pub struct Processed {
    pub update: StoreUpdate,
    /// `(name, version)` of each applied resource.
    pub accepted: Vec<(String, String)>,
    pub rejected: Vec<Rejected>,
}

impl Processed {
    /// The NACK message (`None` means ACK): every rejected resource by name.
    pub fn error_detail(&self) -> Option<String> {
        if self.rejected.is_empty() {
            return None;
        }
        let list = self
            .rejected
            .iter()
            .map(|r| format!("{}: {}", r.name, r.reason))
            .collect::<Vec<_>>()
            .join("; ");
        Some(format!(
            "rejected {} of the resources: {list}",
            self.rejected.len()
        ))
    }
}

/// Decodes, converts and classifies every resource of `resp`. An unknown
/// type URL rejects the whole response (named by its type).
pub fn process(resp: &DeltaDiscoveryResponse) -> Processed {
    let mut out = Processed::default();
    let is_address = match resp.type_url.as_str() {
        ADDRESS_TYPE_URL => true,
        AUTHORIZATION_TYPE_URL => false,
        other => {
            out.rejected.push(Rejected {
                name: other.to_string(),
                reason: "resource type not supported by this client".to_string(),
            });
            return out;
        }
    };
    for r in &resp.resources {
        let result = if is_address {
            decode::<workload::Address>(r, &resp.type_url)
                .and_then(|a| convert::address(&r.name, &a).map_err(|e| e.to_string()))
                .map(|a| out.update.addresses.push(a))
        } else {
            decode::<security::Authorization>(r, &resp.type_url)
                .and_then(|a| convert::policy(&r.name, &a).map_err(|e| e.to_string()))
                .map(|p| out.update.policies.push(p))
        };
        match result {
            Ok(()) => out.accepted.push((r.name.clone(), r.version.clone())),
            Err(reason) => {
                if is_address {
                    out.update.rejected_addresses.push(r.name.clone());
                    out.update
                        .rejected_addresses
                        .extend(r.aliases.iter().cloned());
                }
                out.rejected.push(Rejected {
                    name: r.name.clone(),
                    reason,
                });
            }
        }
    }
    let removed = resp.removed_resources.clone();
    if is_address {
        out.update.removed_addresses = removed;
    } else {
        out.update.removed_policies = removed;
    }
    out
}

fn decode<T: Message + Default>(r: &Resource, type_url: &str) -> Result<T, String> {
    let Some(any) = &r.resource else {
        return Err("resource body missing".to_string());
    };
    if any.type_url != type_url {
        return Err(format!(
            "body has type {:?}, response has type {type_url:?}",
            any.type_url
        ));
    }
    T::decode(any.value.as_ref()).map_err(|e| format!("decoding protobuf: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::Any;

    fn resource(name: &str, aliases: &[&str], type_url: &str, value: Vec<u8>) -> Resource {
        Resource {
            name: name.into(),
            aliases: aliases.iter().map(|a| a.to_string()).collect(),
            version: "v1".into(),
            resource: Some(Any {
                type_url: type_url.into(),
                value,
            }),
            ..Default::default()
        }
    }

    fn address(uid: &str, ip: Vec<u8>) -> Vec<u8> {
        workload::Address {
            r#type: Some(workload::address::Type::Workload(workload::Workload {
                uid: uid.into(),
                name: "p".into(),
                namespace: "ns".into(),
                addresses: vec![ip.into()],
                ..Default::default()
            })),
        }
        .encode_to_vec()
    }

    #[test]
    fn good_resources_apply_and_bad_ones_are_named() {
        let resp = DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE_URL.into(),
            nonce: "n1".into(),
            resources: vec![
                resource(
                    "good",
                    &["/10.0.0.1"],
                    ADDRESS_TYPE_URL,
                    address("good", vec![10, 0, 0, 1]),
                ),
                resource(
                    "bad-ip",
                    &["/x"],
                    ADDRESS_TYPE_URL,
                    address("bad-ip", vec![1, 2, 3]),
                ),
                resource("garbage", &[], ADDRESS_TYPE_URL, vec![0xff, 0xff, 0xff]),
                resource("wrong-type", &[], AUTHORIZATION_TYPE_URL, Vec::new()),
            ],
            removed_resources: vec!["gone".into()],
            ..Default::default()
        };
        let p = process(&resp);
        assert_eq!(p.update.addresses.len(), 1);
        assert_eq!(p.accepted, [("good".to_string(), "v1".to_string())]);
        let names: Vec<&str> = p.rejected.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["bad-ip", "garbage", "wrong-type"]);
        assert_eq!(p.update.removed_addresses, ["gone"]);
        assert_eq!(
            p.update.rejected_addresses,
            ["bad-ip", "/x", "garbage", "wrong-type"]
        );
        let detail = p.error_detail().unwrap();
        assert!(
            detail.starts_with("rejected 3 of the resources: bad-ip: workload.addresses[0]"),
            "{detail}"
        );
        assert!(detail.contains("garbage: decoding protobuf"), "{detail}");

        let unknown = process(&DeltaDiscoveryResponse {
            type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
            ..Default::default()
        });
        assert!(unknown.error_detail().unwrap().contains("not supported"));
    }
}
