//! Annotation keys the CRI implementations write into OCI specs.
//! containerd: `pkg/cri/annotations` (1.6+); CRI-O: `pkg/annotations`.
//! kubelet's own labels (`io.kubernetes.pod.*`) reach the spec through
//! CRI-O, which copies a sandbox's labels and annotations verbatim.

/// containerd's CRI plugin.
pub mod containerd {
    pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
    pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
    pub const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
    pub const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
    pub const SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";
    pub const SANDBOX_LOG_DIRECTORY: &str = "io.kubernetes.cri.sandbox-log-directory";
    pub const CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
    pub const IMAGE_NAME: &str = "io.kubernetes.cri.image-name";
}

/// CRI-O.
pub mod crio {
    pub const CONTAINER_TYPE: &str = "io.kubernetes.cri-o.ContainerType";
    pub const SANDBOX_ID: &str = "io.kubernetes.cri-o.SandboxID";
    /// Pod namespace.
    pub const NAMESPACE: &str = "io.kubernetes.cri-o.Namespace";
    /// Kubernetes metadata name: the pod's for a sandbox, the container's otherwise.
    pub const KUBE_NAME: &str = "io.kubernetes.cri-o.KubeName";
    /// JSON of the CRI metadata (`{"name","uid","namespace","attempt"}` for a sandbox).
    pub const METADATA: &str = "io.kubernetes.cri-o.Metadata";
    /// Sandbox: `<log_directory>/<sandbox id>.log`; container: its log file.
    pub const LOG_PATH: &str = "io.kubernetes.cri-o.LogPath";
    pub const HOST_NETWORK: &str = "io.kubernetes.cri-o.HostNetwork";
    /// Sandbox: the resolv.conf CRI-O wrote for the pod.
    pub const RESOLV_PATH: &str = "io.kubernetes.cri-o.ResolvPath";
}

/// Labels kubelet puts on every sandbox and container.
pub mod kubelet {
    pub const POD_NAME: &str = "io.kubernetes.pod.name";
    pub const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
    pub const POD_UID: &str = "io.kubernetes.pod.uid";
    pub const CONTAINER_NAME: &str = "io.kubernetes.container.name";
}

/// Value of the container-type annotations for the pod sandbox.
pub const TYPE_SANDBOX: &str = "sandbox";
/// Value of the container-type annotations for an app container.
pub const TYPE_CONTAINER: &str = "container";
