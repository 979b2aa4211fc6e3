//! An xDS `Address` resource (WDS, from the control plane) as bytes: prost
//! decode → validation/conversion → store apply → every lookup the data
//! path makes → removal. Checks that whatever conversion accepts is found
//! under its name and IPs, and that removing it leaves the store empty
//! (no stale secondary index entries).
#![no_main]

use libfuzzer_sys::fuzz_target;
use netproxy::state::{Address, Store, StoreUpdate, convert};
use prost::Message;
use sidetunnel_proto::istio::workload as xwl;

fuzz_target!(|data: &[u8]| {
    let Ok(addr) = xwl::Address::decode(data) else {
        return;
    };
    // The name istiod gives the object, so validation goes past the name
    // check; a mismatching name must be rejected, never panic.
    let name = match &addr.r#type {
        Some(xwl::address::Type::Workload(w)) => w.uid.clone(),
        Some(xwl::address::Type::Service(s)) => format!("{}/{}", s.namespace, s.hostname),
        None => String::new(),
    };
    let _ = convert::address("not-the-name", &addr);
    let Ok(converted) = convert::address(&name, &addr) else {
        return;
    };
    let store = Store::new();
    store.apply(StoreUpdate {
        addresses: vec![converted.clone()],
        ..Default::default()
    });
    assert!(store.lookup_name(&name).is_some(), "{name:?} not found");
    let mut ips = Vec::new();
    match &converted {
        Address::Workload(w) => {
            assert!(store.workload_by_uid(&w.uid).is_some());
            for key in w.network_addrs() {
                let found = store.workload_by_ip(&key.network, key.address);
                assert_eq!(found.map(|f| f.uid.clone()), Some(w.uid.clone()));
                assert!(store.lookup_name(&key.to_string()).is_some(), "{key}");
                ips.push((key.network.clone(), key.address));
            }
            let _ = store.policies_for(w);
            let _ = w.identity();
        }
        Address::Service(s) => {
            for vip in &s.vips {
                assert!(store.service_by_vip(&vip.network, vip.address).is_some());
                ips.push((vip.network.clone(), vip.address));
            }
            let _ = store.service_endpoints(s);
        }
    }
    serde_json::to_string(&store.dump()).expect("config dump serializes");

    store.apply(StoreUpdate {
        removed_addresses: vec![name.clone()],
        ..Default::default()
    });
    let stats = store.stats();
    assert_eq!(
        (stats.workloads, stats.services),
        (0, 0),
        "{name:?} not removed"
    );
    for (network, ip) in ips {
        assert!(
            store.lookup_address(&network, ip).is_none(),
            "{network}/{ip} lingers"
        );
    }
});
