//! The demo's mesh inventory: a generated background mesh (so the xDS
//! numbers compare on-demand against a realistic full WDS) plus the demo's
//! own namespace: a `server` and a `client` pod and a `server` service
//! whose VIP the client calls. Pod IPs are known only after RunPodSandbox,
//! so the demo workloads are added once their sandboxes exist.

use std::collections::BTreeMap;
use std::net::IpAddr;

use anyhow::{Context, Result};
use ipnet::Ipv4Net;
use sidetunnel_meshd::generate::{self, Params};
use sidetunnel_meshd::inventory::model::{Inventory, Service, Workload};
use sidetunnel_meshd::inventory::{self, Context as InvContext};
use sidetunnel_meshd::snapshot::TypeUrl;

pub const NAMESPACE: &str = "demo";
/// The server's VIP: outside the generator's ranges (10/8 pods,
/// 172.16/12 VIPs) and never routed (the client's proxy resolves it).
pub const VIP: &str = "192.168.213.10";
pub const SERVICE_PORT: u32 = 80;
pub const APP_PORT: u32 = 8080;

/// A demo pod as the inventory describes it.
pub struct DemoPod<'a> {
    pub name: &'a str,
    pub service_account: &'a str,
    pub ip: IpAddr,
    /// Whether it backs the `server` service.
    pub serves: bool,
}

pub fn service_host() -> String {
    format!("{NAMESPACE}/server.{NAMESPACE}.svc.cluster.local")
}

/// The generated background mesh, without anything that would collide with
/// the harness's pod subnet or the demo VIP.
pub fn background(services: usize, pods: usize, subnet: Ipv4Net) -> Result<Inventory> {
    let mut inv = generate::generate(&Params {
        services,
        pods,
        seed: 1,
        namespaces: None,
    })
    .context("generating the background mesh")?;
    let collides = |a: &String| {
        a.parse::<IpAddr>().is_ok_and(|ip| match ip {
            IpAddr::V4(v4) => subnet.contains(&v4) || a == VIP,
            IpAddr::V6(_) => false,
        })
    };
    inv.workloads.retain(|w| !w.addresses.iter().any(collides));
    inv.services.retain(|s| !s.vips.iter().any(|v| v == VIP));
    Ok(inv)
}

/// `background` plus the demo pods and the `server` service.
pub fn with_demo(background: &Inventory, pods: &[DemoPod]) -> Inventory {
    let mut inv = background.clone();
    for p in pods {
        let mut services = BTreeMap::new();
        if p.serves {
            services.insert(service_host(), BTreeMap::from([(SERVICE_PORT, APP_PORT)]));
        }
        inv.workloads.push(Workload {
            name: p.name.into(),
            namespace: NAMESPACE.into(),
            service_account: Some(p.service_account.into()),
            addresses: vec![p.ip.to_string()],
            canonical_name: Some(p.name.into()),
            canonical_revision: Some("v1".into()),
            workload_type: Some("pod".into()),
            labels: BTreeMap::from([("app".to_string(), p.name.to_string())]),
            services,
            ..Default::default()
        });
    }
    inv.services.push(Service {
        name: "server".into(),
        namespace: NAMESPACE.into(),
        vips: vec![VIP.into()],
        ports: BTreeMap::from([(SERVICE_PORT, APP_PORT)]),
        ..Default::default()
    });
    inv
}

pub fn to_yaml(inv: &Inventory) -> Result<String> {
    serde_yaml::to_string(inv).context("serialising the inventory")
}

/// What a full (wildcard) WDS sync of `inv` carries: (Address bytes,
/// Address resources, Authorization bytes), encoded exactly as meshd serves
/// them.
pub fn full_sync(inv: &Inventory, cluster_id: &str) -> Result<(usize, usize, usize)> {
    let ctx = InvContext {
        cluster_id: cluster_id.into(),
        trust_domain: "cluster.local".into(),
    };
    let snap = inventory::parse(&ctx, &to_yaml(inv)?).context("converting the inventory")?;
    Ok((
        snap.full_sync_bytes(TypeUrl::Address),
        snap.table(TypeUrl::Address).len(),
        snap.full_sync_bytes(TypeUrl::Authorization),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_inventory_is_valid_and_avoids_the_pod_subnet() {
        let subnet: Ipv4Net = "10.0.0.0/24".parse().unwrap();
        let bg = background(20, 300, subnet).unwrap();
        assert!(bg.workloads.iter().all(|w| {
            w.addresses
                .iter()
                .all(|a| !subnet.contains(&a.parse::<std::net::Ipv4Addr>().unwrap()))
        }));
        let pods = [
            DemoPod {
                name: "server",
                service_account: "server",
                ip: "10.0.0.2".parse().unwrap(),
                serves: true,
            },
            DemoPod {
                name: "client",
                service_account: "client",
                ip: "10.0.0.3".parse().unwrap(),
                serves: false,
            },
        ];
        let inv = with_demo(&bg, &pods);
        let (bytes, count, _) = full_sync(&inv, "Kubernetes").unwrap();
        // Every background workload and service, plus 2 pods and 1 service.
        assert_eq!(count, bg.workloads.len() + bg.services.len() + 3);
        let (bg_bytes, _, _) = full_sync(&bg, "Kubernetes").unwrap();
        assert!(bytes > bg_bytes);
    }
}
