//! Builds the xDS client settings from the proxy's resolved configuration,
//! so the proxy wires the client in one call.

use std::net::IpAddr;

use super::{NodeInfo, Subscription, XdsConfig};
use crate::config::{Config, XdsMode};
use crate::state::NetworkAddr;

impl XdsConfig {
    /// Settings for the pod described by `c`, whose addresses are
    /// `local_ips`: its identity in the node metadata, its service-account
    /// token file as bearer token, the proxy's socket mark and connect
    /// timeout, and in on-demand mode (sidetunnel's default, "scoped"):
    /// * Address: the pod's own workload by its `network/IP` names, pinned
    ///   (the IPs are certain; inbound policy and metrics need the workload
    ///   from the start), plus the prefetch list; destinations are fetched
    ///   on first use and dropped after `c.xds_idle_timeout` unused;
    /// * Authorization: the own workload's uid as istiod names it
    ///   (`<cluster>//Pod/<ns>/<name>`). istiod (and sidetunnel-meshd by
    ///   default) ignores Authorization names: it sends every policy and
    ///   lists the uid as removed. `sidetunnel-meshd --mode extended`
    ///   resolves it to the policies that apply to the workload (mesh-wide,
    ///   its namespace's and those selecting it).
    ///
    /// In wildcard mode both types are wildcard, as a node ztunnel subscribes.
    ///
    /// Node metadata: `NODE_NAME` only in wildcard mode, and only when the
    /// node name is configured. istiod sends an on-demand client every
    /// workload on the node its `NODE_NAME` names
    /// (`AdditionalPodSubscriptions`, meant for node ztunnels); on a
    /// virtual node that is every pod of the platform, so an on-demand
    /// proxy never sends it (a wildcard proxy receives everything anyway).
    pub fn from_proxy_config(c: &Config, local_ips: &[IpAddr]) -> XdsConfig {
        let pod = &c.pod;
        let node_name = match c.xds_mode {
            XdsMode::Wildcard => pod.node_name.clone().unwrap_or_default(),
            XdsMode::OnDemand => String::new(),
        };
        let node = NodeInfo {
            pod_name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
            node_name,
            cluster_id: pod.cluster_id.clone(),
            ips: local_ips.to_vec(),
            extra: Default::default(),
        };
        let mut x = XdsConfig::new(c.xds.address.clone(), c.xds.root_cert.clone(), node);
        x.server_name = c.xds.server_name.clone();
        x.token_file = c.token_file.clone();
        x.connect_timeout = c.connect_timeout;
        x.mark = c.mark;
        if c.xds_mode == XdsMode::OnDemand {
            x.addresses = Subscription::OnDemand {
                initial: local_ips
                    .iter()
                    .map(|ip| NetworkAddr::new(pod.network.clone(), *ip).to_string())
                    .collect(),
            };
            let uid = own_workload_uid(&pod.cluster_id, &pod.namespace, &pod.name);
            x.authorizations = Subscription::OnDemand { initial: vec![uid] };
            x.idle_timeout = Some(c.xds_idle_timeout);
            // Validated when the configuration was resolved.
            if let Err(e) = x.add_prefetch(&c.xds_prefetch, &pod.network) {
                tracing::warn!(error = %e, "ignoring the xDS prefetch list");
            }
        }
        x
    }
}

/// istiod's uid of a pod's workload.
pub fn own_workload_uid(cluster_id: &str, namespace: &str, pod_name: &str) -> String {
    format!("{cluster_id}//Pod/{namespace}/{pod_name}")
}
