//! Kubelet-shaped CRI configs: what kubelet sends for a pod sandbox and an
//! app container (metadata, `io.kubernetes.*` labels, log paths, cgroup
//! parent, namespace options), reduced to what the tests vary.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use sidetunnel_cri_api::v1 as cri;

/// A pod as kubelet would describe it to RunPodSandbox.
#[derive(Debug, Clone)]
pub struct PodConfig {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub attempt: u32,
    pub runtime_handler: String,
    pub labels: HashMap<String, String>,
    pub annotations: HashMap<String, String>,
    /// `hostNetwork: true` (NamespaceMode NODE) instead of a pod netns.
    pub host_network: bool,
    /// Parent of `<ns>_<name>_<uid>` log directories.
    pub log_root: PathBuf,
    /// Parent cgroup; the pod gets `<cgroup_root>/pod<uid>` like kubelet's
    /// `/kubepods/besteffort/pod<uid>`.
    pub cgroup_root: String,
    /// The pod's DNS config (kubelet's for `dnsPolicy: ClusterFirst`:
    /// nameservers, searches, options); `None`: the runtime copies the
    /// node's resolv.conf.
    pub dns: Option<cri::DnsConfig>,
}

/// A container of a pod, as in the pod spec.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub labels: HashMap<String, String>,
    pub annotations: HashMap<String, String>,
}

/// Random RFC 4122 version-4 UUID, the shape of a Kubernetes object uid.
pub fn new_uid() -> String {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("system randomness");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn strings<const N: usize>(v: [&str; N]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

impl PodConfig {
    /// Pod `name` in namespace `default` with a fresh uid.
    pub fn new(name: &str, runtime_handler: &str, log_root: &Path, cgroup_root: &str) -> Self {
        PodConfig {
            name: name.into(),
            namespace: "default".into(),
            uid: new_uid(),
            attempt: 0,
            runtime_handler: runtime_handler.into(),
            labels: HashMap::new(),
            annotations: HashMap::new(),
            host_network: false,
            log_root: log_root.into(),
            cgroup_root: cgroup_root.into(),
            dns: None,
        }
    }

    /// The resolv.conf the runtime writes for the pod.
    pub fn dns(mut self, servers: &[&str], searches: &[&str], options: &[&str]) -> Self {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect();
        self.dns = Some(cri::DnsConfig {
            servers: v(servers),
            searches: v(searches),
            options: v(options),
        });
        self
    }

    pub fn namespace(mut self, ns: &str) -> Self {
        self.namespace = ns.into();
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    pub fn host_network(mut self, on: bool) -> Self {
        self.host_network = on;
        self
    }

    /// kubelet's `/var/log/pods/<namespace>_<name>_<uid>`.
    pub fn log_directory(&self) -> PathBuf {
        self.log_root
            .join(format!("{}_{}_{}", self.namespace, self.name, self.uid))
    }

    /// Pod-level cgroup (cgroupfs path), e.g. `/sidetunnel-test-3/pod<uid>`.
    pub fn cgroup_parent(&self) -> String {
        format!("{}/pod{}", self.cgroup_root.trim_end_matches('/'), self.uid)
    }

    fn namespace_options(&self) -> cri::NamespaceOption {
        let network = if self.host_network {
            cri::NamespaceMode::Node
        } else {
            cri::NamespaceMode::Pod
        };
        cri::NamespaceOption {
            network: network as i32,
            pid: cri::NamespaceMode::Container as i32,
            ipc: cri::NamespaceMode::Pod as i32,
            ..Default::default()
        }
    }

    fn kube_labels(&self) -> HashMap<String, String> {
        let mut l = self.labels.clone();
        l.insert("io.kubernetes.pod.name".into(), self.name.clone());
        l.insert("io.kubernetes.pod.namespace".into(), self.namespace.clone());
        l.insert("io.kubernetes.pod.uid".into(), self.uid.clone());
        l
    }

    /// The PodSandboxConfig kubelet would send.
    pub fn to_cri(&self) -> cri::PodSandboxConfig {
        let mut annotations = self.annotations.clone();
        annotations.insert("kubernetes.io/config.source".into(), "api".into());
        annotations.insert(
            "kubernetes.io/config.seen".into(),
            "2025-01-01T00:00:00Z".into(),
        );
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: self.name.clone(),
                uid: self.uid.clone(),
                namespace: self.namespace.clone(),
                attempt: self.attempt,
            }),
            hostname: if self.host_network {
                String::new()
            } else {
                self.name.clone()
            },
            log_directory: self.log_directory().to_string_lossy().into_owned(),
            dns_config: self.dns.clone(),
            labels: self.kube_labels(),
            annotations,
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent(),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(self.namespace_options()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The ContainerConfig kubelet would send for `spec` (first attempt).
    pub fn container_config(&self, spec: &ContainerSpec) -> cri::ContainerConfig {
        let mut labels = spec.labels.clone();
        labels.extend(self.kube_labels());
        labels.insert("io.kubernetes.container.name".into(), spec.name.clone());
        let mut annotations = spec.annotations.clone();
        annotations.insert("io.kubernetes.container.restartCount".into(), "0".into());
        annotations.insert(
            "io.kubernetes.container.terminationMessagePath".into(),
            "/dev/termination-log".into(),
        );
        cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: spec.name.clone(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: spec.image.clone(),
                ..Default::default()
            }),
            command: spec.command.clone(),
            args: spec.args.clone(),
            envs: spec
                .env
                .iter()
                .map(|(k, v)| cri::KeyValue {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
            labels,
            annotations,
            // Relative to the sandbox log directory, as kubelet does.
            log_path: format!("{}/0.log", spec.name),
            linux: Some(cri::LinuxContainerConfig {
                resources: Some(cri::LinuxContainerResources {
                    cpu_period: 100_000,
                    cpu_shares: 2,
                    oom_score_adj: 1000,
                    ..Default::default()
                }),
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: Some(self.namespace_options()),
                    masked_paths: strings(["/proc/kcore", "/proc/keys", "/proc/timer_list"]),
                    readonly_paths: strings(["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys"]),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }
    }
}

impl ContainerSpec {
    pub fn new(name: &str, image: &str) -> Self {
        ContainerSpec {
            name: name.into(),
            image: image.into(),
            command: Vec::new(),
            args: Vec::new(),
            env: Vec::new(),
            labels: HashMap::new(),
            annotations: HashMap::new(),
        }
    }

    /// Overrides the image entrypoint (`command:` in the pod spec).
    pub fn command(mut self, argv: &[&str]) -> Self {
        self.command = argv.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    pub fn args(mut self, args: &[&str]) -> Self {
        self.args = args.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_is_uuid_v4() {
        let u = new_uid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_ne!(u, new_uid());
    }

    #[test]
    fn sandbox_config_is_kubelet_shaped() {
        let p = PodConfig::new("web", "runc", Path::new("/logs"), "/st-1").namespace("shop");
        let c = p.to_cri();
        let m = c.metadata.as_ref().unwrap();
        assert_eq!((m.name.as_str(), m.namespace.as_str()), ("web", "shop"));
        assert_eq!(c.log_directory, format!("/logs/shop_web_{}", p.uid));
        assert_eq!(c.labels["io.kubernetes.pod.uid"], p.uid);
        let linux = c.linux.unwrap();
        assert_eq!(linux.cgroup_parent, format!("/st-1/pod{}", p.uid));
        let ns = linux.security_context.unwrap().namespace_options.unwrap();
        assert_eq!(ns.network, cri::NamespaceMode::Pod as i32);
        let cc = p.container_config(&ContainerSpec::new("app", "img").command(&["sh"]));
        assert_eq!(cc.log_path, "app/0.log");
        assert_eq!(cc.labels["io.kubernetes.container.name"], "app");
    }
}
