//! DNS capture through the shim, under a real containerd: the node config
//! leaves capture off, a pod turns it on with `sidetunnel.io/dns-capture`,
//! and the shim must install the port-53 redirect, copy the resolv.conf
//! containerd wrote for the pod (from the pod's DNS config, as kubelet's
//! ClusterFirst sets it) and start the proxy's DNS server. In the app
//! container, busybox `nslookup` (a real stub, reading the pod's
//! resolv.conf) then resolves a ServiceEntry host the pod never contacted
//! through on-demand xDS from meshd (istiod mode), and a name outside the
//! mesh through the proxy to the pod's nameserver: a small resolver on the
//! harness bridge's gateway. A pod without the annotation has no DNS
//! redirect.

mod shim_support;

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::{Context, Result, ensure};
use shim_support::{idle_client, metrics_via, netns_of};
use sidetunnel_meshd::inventory::model::Service;
use sidetunnel_tests::dns::Resolver;

const TEST: &str = "shim_dns";
const NS: &str = "dnsns";
const SE_HOST: &str = "api.example.com";
const SE_VIP: &str = "240.240.0.9";
const OUTSIDE_HOST: &str = "www.example.org";
const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 81);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_capture_annotation_resolves_a_service_entry_on_demand() -> Result<()> {
    shim_support::run_on_cluster(TEST, async |c| {
        let mut cri = c.h.cri().await?;
        let gateway = c.h.gateway();
        let _resolver = Resolver::start_here(
            SocketAddr::new(gateway.into(), 53),
            &[(OUTSIDE_HOST, OUTSIDE_IP)],
        )
        .context("resolver on the bridge gateway")?;
        c.add_service(Service {
            name: "api".into(),
            namespace: NS.into(),
            hostname: Some(SE_HOST.into()),
            vips: vec![SE_VIP.into()],
            ..Default::default()
        });
        let gw = gateway.to_string();
        let config = c
            .pod_config("dns-client", NS)
            .annotation("sidetunnel.io/dns-capture", "true")
            .dns(
                &[&gw],
                &[
                    &format!("{NS}.svc.cluster.local"),
                    "svc.cluster.local",
                    "cluster.local",
                ],
                &["ndots:5"],
            );
        let pod = c.run_pod(&mut cri, &config, "client").await?;
        c.publish(&[&pod]).await?;
        let rules = sidetunnel_redirect::show(&netns_of(&c.h, &pod.pod)?)?;
        ensure!(rules.contains("dport 53"), "no DNS redirect:\n{rules}");
        let app = cri.run_container(&pod.pod, &idle_client()).await?;
        cri.wait_container_state(
            &app.id,
            sidetunnel_tests::cri::api::ContainerState::ContainerRunning,
            shim_support::WAIT,
        )
        .await?;

        let out = cri.exec_ok(&app.id, &["nslookup", SE_HOST]).await?;
        ensure!(out.contains(SE_VIP), "nslookup {SE_HOST}: {out}");
        let out = cri.exec_ok(&app.id, &["nslookup", OUTSIDE_HOST]).await?;
        ensure!(
            out.contains(&OUTSIDE_IP.to_string()),
            "nslookup {OUTSIDE_HOST}: {out}"
        );
        let m = metrics_via(&mut cri, &app.id).await?;
        let on_demand = sidetunnel_tests::mesh::metrics::sum(
            &m,
            "sidetunnel_dns_queries_total",
            &[("outcome", "answered_on_demand")],
        );
        ensure!(on_demand >= 1.0, "no on-demand answer counted");

        // Without the annotation (node default off): no DNS redirect.
        let plain = c
            .run_pod(&mut cri, &c.pod_config("dns-off", NS), "client")
            .await?;
        let rules = sidetunnel_redirect::show(&netns_of(&c.h, &plain.pod)?)?;
        ensure!(
            !rules.contains("dport 53"),
            "DNS redirect without capture:\n{rules}"
        );
        Ok(())
    })
    .await
}
