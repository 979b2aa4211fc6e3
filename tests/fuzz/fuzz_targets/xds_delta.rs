//! A whole delta ADS response as bytes: the xDS client's handler decodes
//! each resource on its own, converts it, and builds one store update plus
//! the ACK/NACK. Checks that accepted and rejected resources partition the
//! response, that every accepted Address is found under its name after the
//! apply, and that removing every accepted name empties the store.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netproxy::state::{Store, StoreUpdate};
use netproxy::xds::handler;
use prost::Message;
use sidetunnel_proto::ADDRESS_TYPE_URL;
use sidetunnel_proto::envoy::service::discovery::v3::DeltaDiscoveryResponse;

fuzz_target!(|data: &[u8]| {
    let Ok(resp) = DeltaDiscoveryResponse::decode(data) else {
        return;
    };
    let p = handler::process(&resp);
    let _ = p.error_detail();
    if handler::TYPE_URLS.contains(&resp.type_url.as_str()) {
        assert_eq!(p.accepted.len() + p.rejected.len(), resp.resources.len());
        assert_eq!(p.error_detail().is_some(), !p.rejected.is_empty());
    } else {
        assert!(p.update.is_empty() && p.error_detail().is_some());
    }
    let is_address = resp.type_url == ADDRESS_TYPE_URL;
    let store = Store::new();
    store.apply(p.update);
    let names: Vec<String> = p.accepted.iter().map(|(n, _)| n.clone()).collect();
    for name in &names {
        if is_address {
            assert!(store.lookup_name(name).is_some(), "{name:?} not found");
        } else {
            assert!(store.policy(name).is_some(), "{name:?} not found");
        }
    }
    serde_json::to_string(&store.dump()).expect("config dump serializes");

    // A workload and a service may (against istiod's naming) share a name;
    // each removal drops one of them.
    for _ in 0..2 {
        store.apply(if is_address {
            StoreUpdate {
                removed_addresses: names.clone(),
                ..Default::default()
            }
        } else {
            StoreUpdate {
                removed_policies: names.clone(),
                ..Default::default()
            }
        });
    }
    let stats = store.stats();
    assert_eq!(
        (stats.workloads, stats.services, stats.policies),
        (0, 0, 0),
        "removing every accepted name left objects behind"
    );
});
