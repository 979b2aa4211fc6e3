//! Protocol types sidetunnel speaks with Istio's control plane, generated at
//! build time from the `.proto` files under `proto/`: Istio's workload
//! discovery (`istio.workload`), L4 authorization (`istio.security`), the Istio
//! CA service (`istio.v1.auth`) and the subset of Envoy's delta ADS
//! (`envoy.service.discovery.v3`) that carries them. Field numbers match
//! upstream so istiod, ztunnel and sidetunnel interoperate on the wire.

#![allow(clippy::all, clippy::pedantic)]

/// Type URL of Istio's `Address` resource (workloads and services).
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
/// Type URL of Istio's L4 `Authorization` resource.
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";

pub mod istio {
    pub mod workload {
        tonic::include_proto!("istio.workload");
    }
    pub mod security {
        tonic::include_proto!("istio.security");
    }
    pub mod ca {
        tonic::include_proto!("istio.v1.auth");
    }
}

pub mod envoy {
    pub mod config {
        pub mod core {
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
    }
}

pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}
