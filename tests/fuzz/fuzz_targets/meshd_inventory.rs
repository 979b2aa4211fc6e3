//! meshd's inventory YAML (edited by hand, watched and pushed live) → parse
//! → validation → encoded xDS snapshot. Then the proxy side: every Address
//! and Authorization meshd would serve (except verbatim `raw` entries) must
//! decode and be accepted by netproxy's xDS handler, since a resource meshd
//! validated but the proxy NACKs is an interop bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netproxy::xds::handler;
use sidetunnel_meshd::inventory::{self, Context};
use sidetunnel_meshd::snapshot::{Kind, TypeUrl};
use sidetunnel_proto::envoy::service::discovery::v3::DeltaDiscoveryResponse;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let ctx = Context {
        cluster_id: "Kubernetes".into(),
        trust_domain: "cluster.local".into(),
    };
    let Ok(snapshot) = inventory::parse(&ctx, text) else {
        return;
    };
    for t in TypeUrl::ALL {
        let resources = snapshot
            .table(t)
            .iter()
            .filter(|(_, e)| e.kind != Kind::Raw)
            .map(|(name, _)| snapshot.resource(t, name).expect("listed resource exists"))
            .collect();
        let p = handler::process(&DeltaDiscoveryResponse {
            type_url: t.as_str().into(),
            resources,
            ..Default::default()
        });
        assert!(
            p.rejected.is_empty(),
            "the proxy rejects what meshd serves: {:?}",
            p.error_detail()
        );
        let _ = snapshot.full_sync_bytes(t);
    }
});
