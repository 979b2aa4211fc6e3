//! Kubernetes' Container Runtime Interface, `runtime.v1`: the gRPC client
//! and message types kubelet uses to drive containerd. Generated at build
//! time from `proto/runtime/v1/api.proto`, copied unchanged from
//! k8s.io/cri-api (Apache-2.0), so the harness speaks to containerd's CRI
//! plugin exactly as kubelet does.

#![allow(clippy::all, clippy::pedantic)]

pub mod v1 {
    tonic::include_proto!("runtime.v1");
}
