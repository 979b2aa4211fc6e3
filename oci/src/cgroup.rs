//! `linux.cgroupsPath` in both forms runc accepts, and the pod-level cgroup
//! derived from a sandbox's path (where the shim accounts the proxy).

use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupsPath {
    /// cgroupfs driver: a path below the cgroup mount, e.g.
    /// `/kubepods/besteffort/pod<uid>/<container id>`.
    Cgroupfs(PathBuf),
    /// systemd driver: `slice:prefix:name`, e.g.
    /// `kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>`.
    Systemd {
        slice: String,
        prefix: String,
        name: String,
    },
}

impl CgroupsPath {
    pub fn parse(raw: &str) -> Result<CgroupsPath> {
        let invalid = |reason| Error::InvalidCgroupsPath {
            path: raw.to_owned(),
            reason,
        };
        if raw.is_empty() {
            return Err(invalid("empty"));
        }
        if raw.contains('\0') {
            return Err(invalid("contains NUL"));
        }
        // runc treats a path as systemd's only when its cgroup driver is
        // systemd; the `a:b:c` shape with a `.slice` first part identifies it
        // without knowing the driver (cgroupfs paths never contain ':' in CRI).
        let parts: Vec<&str> = raw.split(':').collect();
        if parts.len() == 3 && !raw.starts_with('/') {
            let slice = parts[0];
            if !slice.is_empty() && !slice.ends_with(".slice") {
                return Err(invalid("systemd slice must end in .slice"));
            }
            if parts[2].is_empty() {
                return Err(invalid("systemd unit name is empty"));
            }
            // Unit names never contain '/'; in the slice it would put
            // path components (`..`) into the expanded pod cgroup.
            if parts.iter().any(|p| p.contains('/')) {
                return Err(invalid("systemd slice, prefix and name cannot contain '/'"));
            }
            return Ok(CgroupsPath::Systemd {
                slice: slice.to_owned(),
                prefix: parts[1].to_owned(),
                name: parts[2].to_owned(),
            });
        }
        if raw.contains(':') {
            return Err(invalid(
                "neither a cgroupfs path nor systemd slice:prefix:name",
            ));
        }
        if Path::new(raw)
            .components()
            .any(|c| c == std::path::Component::ParentDir)
        {
            return Err(invalid("contains '..'"));
        }
        Ok(CgroupsPath::Cgroupfs(PathBuf::from(raw)))
    }

    /// The pod-level cgroup as a path relative to a controller's mount point
    /// (absolute-looking, `/`-rooted): the sandbox container's parent for
    /// cgroupfs, the expanded slice for systemd (`a-b.slice` lives at
    /// `/a.slice/a-b.slice`). `None` when the sandbox sits at the root.
    pub fn pod_cgroup(&self) -> Option<PathBuf> {
        match self {
            CgroupsPath::Cgroupfs(p) => {
                let parent = p.parent()?;
                (parent != Path::new("/") && !parent.as_os_str().is_empty())
                    .then(|| parent.to_owned())
            }
            CgroupsPath::Systemd { slice, .. } => expand_slice(slice),
        }
    }
}

/// systemd's slice naming: each `-` separated prefix is an ancestor slice.
fn expand_slice(slice: &str) -> Option<PathBuf> {
    let stem = slice.strip_suffix(".slice")?;
    if stem.is_empty() || stem == "-" {
        return None;
    }
    let mut path = PathBuf::from("/");
    let mut prefix = String::new();
    for part in stem.split('-') {
        if part.is_empty() {
            return None;
        }
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
    }
    Some(path)
}

impl fmt::Display for CgroupsPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CgroupsPath::Cgroupfs(p) => write!(f, "{}", p.display()),
            CgroupsPath::Systemd {
                slice,
                prefix,
                name,
            } => write!(f, "{slice}:{prefix}:{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroupfs_pod_is_parent() {
        let p = CgroupsPath::parse("/kubepods/besteffort/pod12/abc").unwrap();
        assert_eq!(
            p.pod_cgroup(),
            Some(PathBuf::from("/kubepods/besteffort/pod12"))
        );
        assert_eq!(p.to_string(), "/kubepods/besteffort/pod12/abc");
        assert_eq!(CgroupsPath::parse("/abc").unwrap().pod_cgroup(), None);
    }

    #[test]
    fn systemd_slice_expands() {
        let p = CgroupsPath::parse("kubepods-besteffort-pod1_2.slice:cri-containerd:abc").unwrap();
        assert_eq!(
            p.pod_cgroup(),
            Some(PathBuf::from(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1_2.slice"
            ))
        );
        assert_eq!(
            p.to_string(),
            "kubepods-besteffort-pod1_2.slice:cri-containerd:abc"
        );
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "/a/../b",
            "a:b",
            "foo:cri:abc",
            "x.slice:cri:",
            "/a:b:c",
            // Found by the oci_spec fuzz target: expanded to "/kubepods/../../etc.slice".
            "kubepods/../../etc.slice:cri-containerd:abc",
        ] {
            assert!(CgroupsPath::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
