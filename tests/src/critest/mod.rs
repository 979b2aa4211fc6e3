//! Kubernetes' CRI conformance suite (critest, kubernetes-sigs/cri-tools)
//! against the harness containerd: the images it pulls, built offline and
//! served by a real local registry through containerd's registry host
//! configuration; a CRI front that does what a kubelet does around
//! RunPodSandbox (the pod's service-account token); and the per-spec
//! results of its JSON report.

pub mod front;
pub mod images;
pub mod registry;
pub mod report;
