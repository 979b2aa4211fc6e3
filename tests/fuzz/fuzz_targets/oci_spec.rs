//! An OCI runtime spec (`config.json` written by containerd or CRI-O from
//! the kubelet's pod spec) → parse → sandbox/container classification →
//! per-pod settings from annotations → the pod cgroup the shim writes to.
//! Checks that derived filesystem paths cannot escape: the network
//! namespace path is absolute and the pod cgroup has no `..` component.
#![no_main]

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use sidetunnel_oci::{CgroupsPath, PodSettings, Role, Spec, classify};

fn assert_contained(what: &str, p: &Path) {
    assert!(
        !p.components().any(|c| c == Component::ParentDir),
        "{what} {p:?} escapes with '..'"
    );
}

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = Spec::from_slice(data) else {
        return;
    };
    let _ = PodSettings::from_annotations(&spec.annotations);
    if let Some(raw) = spec.linux.as_ref().and_then(|l| l.cgroups_path.as_deref())
        && let Ok(cg) = CgroupsPath::parse(raw)
        && let Some(pod) = cg.pod_cgroup()
    {
        // (A relative cgroupsPath, which runc accepts, yields a relative
        // pod cgroup; what matters is that it cannot climb out.)
        assert_contained("pod cgroup", &pod);
    }
    let Ok(role) = classify(&spec) else {
        return;
    };
    let _ = role.sandbox_id();
    if let Role::Sandbox(pod) = role {
        assert!(!pod.sandbox_id.is_empty());
        if let Some(netns) = &pod.netns_path {
            assert!(netns.is_absolute(), "netns path {netns:?} is relative");
        }
        if let Some(cg) = pod.cgroup_path.as_ref().and_then(CgroupsPath::pod_cgroup) {
            assert_contained("pod cgroup", &cg);
        }
        let _ = pod.settings();
    }
});
