//! Criterion benchmarks of the xDS hot paths on scenario C (1000 services,
//! 5000 pods; meshd's generator and encoder, the bytes meshd serves):
//! decoding and applying the full Address snapshot, applying one
//! incremental workload update to a full store, and `workload_by_ip`.
//! `cargo bench -p netproxy --bench xds`.

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{Criterion, criterion_group, criterion_main};
use netproxy::state::Store;
use netproxy::xds::handler;
use prost::Message;
use sidetunnel_meshd::scale::{self, Scenario};
use sidetunnel_meshd::snapshot::TypeUrl;
use sidetunnel_proto::envoy::service::discovery::v3::DeltaDiscoveryResponse;

fn decode_apply(bytes: &[u8], store: &Store) {
    let resp = DeltaDiscoveryResponse::decode(bytes).expect("meshd's own response decodes");
    let processed = handler::process(&resp);
    store.apply(processed.update);
}

fn benches(c: &mut Criterion) {
    let sc = Scenario::by_name("C").expect("scenario C");
    let snap = scale::snapshot(&sc.inventory().expect("generate")).expect("convert");
    let full = scale::full_response(&snap, TypeUrl::Address);
    let full_bytes = full.encode_to_vec();

    let mut g = c.benchmark_group("xds");
    g.sample_size(20);
    g.bench_function("decode_apply_full_snapshot_C", |b| {
        b.iter_with_large_drop(|| {
            let store = Store::new();
            decode_apply(black_box(&full_bytes), &store);
            store
        })
    });
    g.finish();

    // A filled store, and two versions of one workload to alternate between
    // so every apply is a real change.
    let store = Store::new();
    decode_apply(&full_bytes, &store);
    let updates = incremental_pair(&snap);
    let mut i = 0usize;
    c.bench_function("xds/decode_apply_incremental_update", |b| {
        b.iter(|| {
            i += 1;
            decode_apply(black_box(&updates[i % 2]), &store);
        })
    });

    let ips: Vec<IpAddr> = store
        .dump()
        .workloads
        .iter()
        .flat_map(|w| w.addresses.clone())
        .collect();
    let mut j = 0usize;
    c.bench_function("state/workload_by_ip_C", |b| {
        b.iter(|| {
            j = (j + 7919) % ips.len();
            black_box(store.workload_by_ip("", black_box(ips[j])))
        })
    });
}

/// Two encoded one-resource responses updating the same workload (its node
/// changes back and forth), as meshd would push them.
fn incremental_pair(snap: &sidetunnel_meshd::snapshot::Snapshot) -> [Vec<u8>; 2] {
    let (uid, _) = snap
        .table(TypeUrl::Address)
        .iter()
        .find(|(n, _)| n.contains("//Pod/"))
        .expect("a workload");
    let w = scale::workload(snap, uid).expect("decodes");
    [w.node.clone(), format!("{}-moved", w.node)].map(|node| {
        let mut changed = w.clone();
        changed.node = node;
        scale::incremental_response(uid, &changed).encode_to_vec()
    })
}

criterion_group!(xds, benches);
criterion_main!(xds);
