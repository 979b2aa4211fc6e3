//! Classifies a bundle as pod sandbox, app container or non-CRI container
//! from the annotations containerd's CRI plugin or CRI-O wrote, and extracts
//! what the shim needs about the pod.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::cgroup::CgroupsPath;
use crate::error::{Error, Result};
use crate::keys::{TYPE_CONTAINER, TYPE_SANDBOX, containerd, crio, kubelet};
use crate::settings::PodSettings;
use crate::spec::Spec;

/// Which CRI implementation produced the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CriRuntime {
    Containerd,
    CriO,
}

impl fmt::Display for CriRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CriRuntime::Containerd => "containerd",
            CriRuntime::CriO => "CRI-O",
        })
    }
}

/// What a bundle is, as far as pods are concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// The pod's sandbox ("pause") container: the pod's network namespace
    /// exists and CNI has run.
    Sandbox(PodInfo),
    /// An app (or init, or ephemeral) container of an existing pod.
    Container(ContainerInfo),
    /// Not created through CRI (e.g. `ctr run`): no pod to attach to.
    Standalone,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub runtime: CriRuntime,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub sandbox_id: String,
    /// `linux.namespaces[type=network].path`. `None` either for a host-network
    /// pod (see `host_network`) or when the runtime would create an unnamed
    /// namespace itself.
    pub netns_path: Option<PathBuf>,
    /// No network namespace of its own: the pod shares the node's network.
    pub host_network: bool,
    pub cgroup_path: Option<CgroupsPath>,
    /// kubelet's per-pod log directory (`/var/log/pods/<ns>_<name>_<uid>`).
    pub log_directory: Option<PathBuf>,
    /// The resolv.conf the runtime wrote for the pod (containerd: the
    /// source of the sandbox's `/etc/resolv.conf` mount; CRI-O: its
    /// `ResolvPath` annotation); `None` if the spec names none.
    pub resolv_conf: Option<PathBuf>,
    /// All annotations of the sandbox spec. With containerd, pod annotations
    /// appear here only when the runtime's `pod_annotations` allow-list
    /// matches them; CRI-O copies all of them.
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub runtime: CriRuntime,
    /// The sandbox this container belongs to (the shim groups by it).
    pub sandbox_id: String,
    /// Container name from the pod spec, when the runtime recorded it.
    pub name: Option<String>,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
}

impl PodInfo {
    /// Per-pod sidetunnel settings from the sandbox's annotations.
    pub fn settings(&self) -> Result<PodSettings> {
        PodSettings::from_annotations(&self.annotations)
    }
}

impl Role {
    /// Sandbox id for grouping containers of one pod; `None` for standalone.
    pub fn sandbox_id(&self) -> Option<&str> {
        match self {
            Role::Sandbox(p) => Some(&p.sandbox_id),
            Role::Container(c) => Some(&c.sandbox_id),
            Role::Standalone => None,
        }
    }
}

/// Reads `<bundle>/config.json` and classifies it.
pub fn classify_bundle(bundle: &Path) -> Result<Role> {
    classify(&Spec::load_bundle(bundle)?)
}

/// Classifies a parsed spec. containerd's keys win when (unusually) both
/// runtimes' keys are present.
pub fn classify(spec: &Spec) -> Result<Role> {
    if let Some(kind) = spec.annotation(containerd::CONTAINER_TYPE) {
        let ann = Annotations::new(spec, CriRuntime::Containerd);
        return match container_type(containerd::CONTAINER_TYPE, kind)? {
            Kind::Sandbox => containerd_sandbox(spec, &ann).map(Role::Sandbox),
            Kind::Container => containerd_container(&ann).map(Role::Container),
        };
    }
    if let Some(kind) = spec.annotation(crio::CONTAINER_TYPE) {
        let ann = Annotations::new(spec, CriRuntime::CriO);
        return match container_type(crio::CONTAINER_TYPE, kind)? {
            Kind::Sandbox => crio_sandbox(spec, &ann).map(Role::Sandbox),
            Kind::Container => crio_container(&ann).map(Role::Container),
        };
    }
    Ok(Role::Standalone)
}

enum Kind {
    Sandbox,
    Container,
}

fn container_type(key: &str, value: &str) -> Result<Kind> {
    match value {
        TYPE_SANDBOX => Ok(Kind::Sandbox),
        TYPE_CONTAINER => Ok(Kind::Container),
        _ => Err(Error::invalid(
            key,
            value,
            "expected \"sandbox\" or \"container\"",
        )),
    }
}

/// Annotation lookups that report which key was missing.
struct Annotations<'a> {
    map: &'a BTreeMap<String, String>,
    runtime: CriRuntime,
    role: &'static str,
}

impl<'a> Annotations<'a> {
    fn new(spec: &'a Spec, runtime: CriRuntime) -> Self {
        let role = match spec.annotation(match runtime {
            CriRuntime::Containerd => containerd::CONTAINER_TYPE,
            CriRuntime::CriO => crio::CONTAINER_TYPE,
        }) {
            Some(TYPE_SANDBOX) => "sandbox",
            _ => "container",
        };
        Annotations {
            map: &spec.annotations,
            runtime,
            role,
        }
    }

    /// Non-empty value of `key`.
    fn get(&self, key: &str) -> Option<&'a str> {
        self.map
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn missing(&self, key: &'static str) -> Error {
        Error::MissingAnnotation {
            runtime: match self.runtime {
                CriRuntime::Containerd => "containerd",
                CriRuntime::CriO => "CRI-O",
            },
            role: self.role,
            key,
        }
    }

    fn require(&self, key: &'static str) -> Result<String> {
        self.get(key)
            .map(str::to_owned)
            .ok_or_else(|| self.missing(key))
    }
}

/// Network namespace, host-network flag and cgroup path from `linux`.
fn linux_parts(spec: &Spec) -> Result<(Option<PathBuf>, bool, Option<CgroupsPath>)> {
    let (netns, host) = match spec.namespace("network") {
        None => (None, true),
        Some(ns) => match ns.path.as_deref() {
            None => (None, false),
            Some(p) if p.as_os_str().is_empty() => (None, false),
            Some(p) if !p.is_absolute() => return Err(Error::RelativeNetns(p.to_owned())),
            Some(p) => (Some(p.to_owned()), false),
        },
    };
    let cgroup = match spec.linux.as_ref().and_then(|l| l.cgroups_path.as_deref()) {
        None | Some("") => None,
        Some(raw) => Some(CgroupsPath::parse(raw)?),
    };
    Ok((netns, host, cgroup))
}

fn containerd_sandbox(spec: &Spec, ann: &Annotations) -> Result<PodInfo> {
    let (netns_path, host_network, cgroup_path) = linux_parts(spec)?;
    Ok(PodInfo {
        runtime: CriRuntime::Containerd,
        namespace: ann.require(containerd::SANDBOX_NAMESPACE)?,
        name: ann.require(containerd::SANDBOX_NAME)?,
        uid: ann.require(containerd::SANDBOX_UID)?,
        sandbox_id: ann.require(containerd::SANDBOX_ID)?,
        netns_path,
        host_network,
        cgroup_path,
        log_directory: ann
            .get(containerd::SANDBOX_LOG_DIRECTORY)
            .map(PathBuf::from),
        resolv_conf: spec
            .mounts
            .iter()
            .find(|m| m.destination == Path::new("/etc/resolv.conf"))
            .and_then(|m| m.source.clone())
            .filter(|p| p.is_absolute()),
        annotations: spec.annotations.clone(),
    })
}

fn containerd_container(ann: &Annotations) -> Result<ContainerInfo> {
    let opt = |key| ann.get(key).map(str::to_owned);
    Ok(ContainerInfo {
        runtime: CriRuntime::Containerd,
        sandbox_id: ann.require(containerd::SANDBOX_ID)?,
        name: opt(containerd::CONTAINER_NAME),
        pod_namespace: opt(containerd::SANDBOX_NAMESPACE),
        pod_name: opt(containerd::SANDBOX_NAME),
        pod_uid: opt(containerd::SANDBOX_UID),
    })
}

/// CRI metadata CRI-O serialises into `io.kubernetes.cri-o.Metadata`.
#[derive(Debug, Default, Deserialize)]
struct CrioMetadata {
    #[serde(default)]
    name: String,
    #[serde(default)]
    uid: String,
    #[serde(default)]
    namespace: String,
}

fn crio_metadata(ann: &Annotations) -> Result<CrioMetadata> {
    match ann.get(crio::METADATA) {
        None => Ok(CrioMetadata::default()),
        Some(raw) => serde_json::from_str(raw).map_err(|e| {
            Error::invalid(crio::METADATA, raw, format!("not CRI metadata JSON: {e}"))
        }),
    }
}

/// First non-empty of several sources, else the error naming `key`.
fn first(ann: &Annotations, key: &'static str, candidates: &[Option<&str>]) -> Result<String> {
    candidates
        .iter()
        .flatten()
        .find(|v| !v.is_empty())
        .map(|v| (*v).to_owned())
        .ok_or_else(|| ann.missing(key))
}

fn crio_sandbox(spec: &Spec, ann: &Annotations) -> Result<PodInfo> {
    let meta = crio_metadata(ann)?;
    let (netns_path, mut host_network, cgroup_path) = linux_parts(spec)?;
    if let Some(v) = ann.get(crio::HOST_NETWORK) {
        host_network |= match v {
            "true" => true,
            "false" => false,
            _ => {
                return Err(Error::invalid(
                    crio::HOST_NETWORK,
                    v,
                    "expected true or false",
                ));
            }
        };
    }
    // CRI-O writes the sandbox log file, `<log_directory>/<id>.log`.
    let log_directory = ann
        .get(crio::LOG_PATH)
        .and_then(|p| Path::new(p).parent())
        .filter(|d| !d.as_os_str().is_empty())
        .map(Path::to_owned);
    Ok(PodInfo {
        runtime: CriRuntime::CriO,
        namespace: first(
            ann,
            crio::NAMESPACE,
            &[
                ann.get(crio::NAMESPACE),
                Some(&meta.namespace),
                ann.get(kubelet::POD_NAMESPACE),
            ],
        )?,
        name: first(
            ann,
            crio::KUBE_NAME,
            &[
                ann.get(crio::KUBE_NAME),
                Some(&meta.name),
                ann.get(kubelet::POD_NAME),
            ],
        )?,
        uid: first(
            ann,
            crio::METADATA,
            &[Some(&meta.uid), ann.get(kubelet::POD_UID)],
        )?,
        sandbox_id: ann.require(crio::SANDBOX_ID)?,
        netns_path: if host_network { None } else { netns_path },
        host_network,
        cgroup_path,
        log_directory,
        resolv_conf: ann
            .get(crio::RESOLV_PATH)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute()),
        annotations: spec.annotations.clone(),
    })
}

fn crio_container(ann: &Annotations) -> Result<ContainerInfo> {
    let meta = crio_metadata(ann)?;
    let opt = |key| ann.get(key).map(str::to_owned);
    Ok(ContainerInfo {
        runtime: CriRuntime::CriO,
        sandbox_id: ann.require(crio::SANDBOX_ID)?,
        name: Some(meta.name)
            .filter(|n| !n.is_empty())
            .or_else(|| opt(kubelet::CONTAINER_NAME)),
        pod_namespace: opt(kubelet::POD_NAMESPACE).or_else(|| opt(crio::NAMESPACE)),
        pod_name: opt(kubelet::POD_NAME),
        pod_uid: opt(kubelet::POD_UID),
    })
}
