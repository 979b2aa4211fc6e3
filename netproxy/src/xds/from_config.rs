//! Builds the xDS client settings from the proxy's resolved configuration,
//! so `main` wires the client in one call.

use super::{NodeInfo, Subscription, XdsConfig};
use crate::config::{Config, XdsMode};

impl XdsConfig {
    /// Settings for the pod described by `c`: its identity in the node
    /// metadata, its service-account token file as bearer token, and in
    /// on-demand mode (sidetunnel's default, "scoped"):
    /// * Address: the pod's own workload, named as istiod names it
    ///   (`<cluster>//Pod/<ns>/<name>`), pinned; destinations are fetched on
    ///   first use and dropped after [`super::DEFAULT_IDLE_TIMEOUT`] unused
    ///   (add a prefetch list with [`XdsConfig::add_prefetch`]);
    /// * Authorization: the same uid, which sidetunnel-meshd resolves to the
    ///   policies that apply to the workload (mesh-wide, its namespace's and
    ///   those selecting it). This extends istiod's semantics; istiod itself
    ///   ignores Authorization names (it sends every policy and lists the
    ///   uid as removed), so the same subscription degrades to "all
    ///   policies" there.
    ///
    /// In wildcard mode both types are wildcard, as a node ztunnel subscribes.
    pub fn from_proxy_config(c: &Config) -> XdsConfig {
        let pod = &c.pod;
        let node = NodeInfo {
            pod_name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
            node_name: pod.node_name.clone().unwrap_or_default(),
            cluster_id: pod.cluster_id.clone(),
            ips: pod.ips.clone(),
            extra: Default::default(),
        };
        let mut x = XdsConfig::new(c.xds.address.clone(), c.xds.root_cert.clone(), node);
        x.server_name = c.xds.server_name.clone();
        x.token_file = c.token_file.clone();
        if c.xds_mode == XdsMode::OnDemand {
            let uid = own_workload_uid(&pod.cluster_id, &pod.namespace, &pod.name);
            x.addresses = Subscription::OnDemand {
                initial: vec![uid.clone()],
            };
            x.authorizations = Subscription::OnDemand { initial: vec![uid] };
            x.idle_timeout = Some(super::DEFAULT_IDLE_TIMEOUT);
        }
        x
    }
}

/// istiod's uid of a pod's workload.
pub fn own_workload_uid(cluster_id: &str, namespace: &str, pod_name: &str) -> String {
    format!("{cluster_id}//Pod/{namespace}/{pod_name}")
}
