//! Classification of real and realistic OCI specs: containerd 1.6 specs
//! captured from the test harness (paths rewritten to a node's usual ones)
//! and CRI-O specs built from CRI-O's sandbox/container creation code.

use std::path::{Path, PathBuf};

use sidetunnel_oci::{CgroupsPath, CriRuntime, Error, Role, Spec, classify, classify_bundle};

fn fixture(name: &str) -> Spec {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    Spec::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn sandbox(name: &str) -> sidetunnel_oci::PodInfo {
    match classify(&fixture(name)).unwrap() {
        Role::Sandbox(p) => p,
        other => panic!("{name}: expected sandbox, got {other:?}"),
    }
}

const CONTAINERD_SANDBOX: &str = "03999f2de673416a26cda4af6e3322e21a845f4766c89885d5cc94031ef7da38";
const CONTAINERD_UID: &str = "f70677a9-ba2c-4bed-8982-7202ad24f8e0";

#[test]
fn containerd_sandbox() {
    let p = sandbox("containerd-sandbox.json");
    assert_eq!(p.runtime, CriRuntime::Containerd);
    assert_eq!((p.namespace.as_str(), p.name.as_str()), ("shop", "web"));
    assert_eq!(p.uid, CONTAINERD_UID);
    assert_eq!(p.sandbox_id, CONTAINERD_SANDBOX);
    assert!(!p.host_network);
    let netns = p.netns_path.as_deref().unwrap().to_str().unwrap();
    assert!(netns.starts_with("/var/run/netns/cni-"), "{netns:?}");
    assert_eq!(
        p.log_directory,
        Some(PathBuf::from(format!(
            "/var/log/pods/shop_web_{CONTAINERD_UID}"
        )))
    );
    assert_eq!(
        p.resolv_conf,
        Some(PathBuf::from(format!(
            "/var/lib/containerd/io.containerd.grpc.v1.cri/sandboxes/{CONTAINERD_SANDBOX}/resolv.conf"
        )))
    );
    let cg = p.cgroup_path.as_ref().unwrap();
    assert_eq!(
        cg,
        &CgroupsPath::Cgroupfs(
            format!("/kubepods/besteffort/pod{CONTAINERD_UID}/{CONTAINERD_SANDBOX}").into()
        )
    );
    assert_eq!(
        cg.pod_cgroup(),
        Some(PathBuf::from(format!(
            "/kubepods/besteffort/pod{CONTAINERD_UID}"
        )))
    );
    // Forwarded by the runtime's pod_annotations allow-list.
    let settings = p.settings().unwrap();
    assert!(!settings.inject);
}

#[test]
fn containerd_container() {
    let Role::Container(c) = classify(&fixture("containerd-container.json")).unwrap() else {
        panic!("expected container");
    };
    assert_eq!(c.runtime, CriRuntime::Containerd);
    assert_eq!(c.sandbox_id, CONTAINERD_SANDBOX);
    assert_eq!(c.name.as_deref(), Some("app"));
    assert_eq!(c.pod_namespace.as_deref(), Some("shop"));
    assert_eq!(c.pod_name.as_deref(), Some("web"));
    assert_eq!(c.pod_uid.as_deref(), Some(CONTAINERD_UID));
}

#[test]
fn containerd_host_network_sandbox_has_no_netns() {
    let p = sandbox("containerd-sandbox-hostnetwork.json");
    assert!(p.host_network);
    assert_eq!(p.netns_path, None);
    assert_eq!(p.name, "hostnet2");
    assert!(p.settings().unwrap().inject, "default is inject");
}

#[test]
fn crio_sandbox() {
    let p = sandbox("crio-sandbox.json");
    assert_eq!(p.runtime, CriRuntime::CriO);
    assert_eq!(
        (p.namespace.as_str(), p.name.as_str()),
        ("bookinfo", "reviews-v1-7d9f8")
    );
    assert_eq!(p.uid, "8b6a3c1e-4f0e-4a37-9d52-2f1c0e7d9a11");
    assert!(p.sandbox_id.starts_with("5d2d0b6f"));
    assert_eq!(
        p.netns_path.as_deref(),
        Some(Path::new(
            "/var/run/netns/0f4b2b9c-4a3e-4c8e-bb1d-6c2e5e1a7f00"
        ))
    );
    assert_eq!(
        p.log_directory,
        Some(PathBuf::from(
            "/var/log/pods/bookinfo_reviews-v1-7d9f8_8b6a3c1e-4f0e-4a37-9d52-2f1c0e7d9a11"
        ))
    );
    let resolv = p.resolv_conf.as_deref().unwrap().to_str().unwrap();
    assert!(resolv.starts_with("/run/containers/storage/overlay-containers/5d2d0b6f"));
    assert!(resolv.ends_with("/userdata/resolv.conf"));
    assert_eq!(
        p.cgroup_path.as_ref().unwrap().pod_cgroup(),
        Some(PathBuf::from(
            "/kubepods.slice/kubepods-besteffort.slice/\
             kubepods-besteffort-pod8b6a3c1e_4f0e_4a37_9d52_2f1c0e7d9a11.slice"
        ))
    );
    // CRI-O copies every pod annotation into the spec.
    assert_eq!(
        p.settings().unwrap().prefetch,
        ["ratings.bookinfo.svc.cluster.local"]
    );
}

#[test]
fn crio_container() {
    let Role::Container(c) = classify(&fixture("crio-container.json")).unwrap() else {
        panic!("expected container");
    };
    assert_eq!(c.runtime, CriRuntime::CriO);
    assert!(c.sandbox_id.starts_with("5d2d0b6f"));
    assert_eq!(c.name.as_deref(), Some("reviews"));
    assert_eq!(c.pod_namespace.as_deref(), Some("bookinfo"));
    assert_eq!(
        c.pod_uid.as_deref(),
        Some("8b6a3c1e-4f0e-4a37-9d52-2f1c0e7d9a11")
    );
}

#[test]
fn crio_host_network_annotation_wins() {
    let mut spec = fixture("crio-sandbox.json");
    spec.annotations
        .insert("io.kubernetes.cri-o.HostNetwork".into(), "true".into());
    let Role::Sandbox(p) = classify(&spec).unwrap() else {
        panic!()
    };
    assert!(p.host_network);
    assert_eq!(p.netns_path, None);
}

#[test]
fn standalone_without_cri_annotations() {
    let spec = Spec::from_slice(br#"{"ociVersion":"1.0.2","process":{"args":["sh"]}}"#).unwrap();
    assert_eq!(classify(&spec).unwrap(), Role::Standalone);
    assert_eq!(classify(&spec).unwrap().sandbox_id(), None);
}

#[test]
fn go_nulls_and_unknown_fields_are_tolerated() {
    let spec = Spec::from_slice(
        br#"{"ociVersion":"1.1.0","annotations":null,"linux":{"namespaces":null,"cgroupsPath":"","future":{"x":1}},"vm":{}}"#,
    )
    .unwrap();
    assert!(spec.annotations.is_empty());
    assert_eq!(classify(&spec).unwrap(), Role::Standalone);
}

fn err_of(spec_json: &str) -> Error {
    match classify(&Spec::from_slice(spec_json.as_bytes()).unwrap()) {
        Err(e) => e,
        Ok(role) => panic!("accepted {spec_json}: {role:?}"),
    }
}

#[test]
fn malformed_specs_give_errors_naming_the_problem() {
    let cases = [
        (
            r#"{"annotations":{"io.kubernetes.cri.container-type":"pod"}}"#,
            "io.kubernetes.cri.container-type",
        ),
        (
            r#"{"annotations":{"io.kubernetes.cri.container-type":"sandbox","io.kubernetes.cri.sandbox-id":"x","io.kubernetes.cri.sandbox-name":"n","io.kubernetes.cri.sandbox-uid":"u"}}"#,
            "io.kubernetes.cri.sandbox-namespace",
        ),
        (
            r#"{"annotations":{"io.kubernetes.cri.container-type":"container"}}"#,
            "io.kubernetes.cri.sandbox-id",
        ),
        (
            r#"{"annotations":{"io.kubernetes.cri-o.ContainerType":"sandbox","io.kubernetes.cri-o.SandboxID":"x","io.kubernetes.cri-o.Metadata":"{not json"}}"#,
            "io.kubernetes.cri-o.Metadata",
        ),
        (
            r#"{"annotations":{"io.kubernetes.cri-o.ContainerType":"sandbox","io.kubernetes.cri-o.SandboxID":"x","io.kubernetes.cri-o.Namespace":"ns","io.kubernetes.cri-o.KubeName":"n"}}"#,
            "io.kubernetes.cri-o.Metadata",
        ),
        (
            r#"{"annotations":{"io.kubernetes.cri.container-type":"sandbox","io.kubernetes.cri.sandbox-id":"x","io.kubernetes.cri.sandbox-name":"n","io.kubernetes.cri.sandbox-namespace":"ns","io.kubernetes.cri.sandbox-uid":"u"},"linux":{"namespaces":[{"type":"network","path":"run/netns/x"}]}}"#,
            "run/netns/x",
        ),
        (
            r#"{"annotations":{"io.kubernetes.cri.container-type":"sandbox","io.kubernetes.cri.sandbox-id":"x","io.kubernetes.cri.sandbox-name":"n","io.kubernetes.cri.sandbox-namespace":"ns","io.kubernetes.cri.sandbox-uid":"u"},"linux":{"cgroupsPath":"/a/../b"}}"#,
            "/a/../b",
        ),
    ];
    for (json, needle) in cases {
        let msg = err_of(json).to_string();
        assert!(
            msg.contains(needle),
            "error for {json} lacks {needle:?}: {msg}"
        );
    }
}

#[test]
fn unparseable_bundles_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    // Missing config.json.
    let msg = classify_bundle(dir.path()).unwrap_err().to_string();
    assert!(msg.contains("config.json"), "{msg}");
    for bad in [
        "",
        "[]",
        "  [1]",
        "null",
        "{\"annotations\":{\"a\":1}}",
        "{\"linux\":{\"namespaces\":[{}]}}",
        "\u{0}",
    ] {
        std::fs::write(dir.path().join("config.json"), bad).unwrap();
        let msg = classify_bundle(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("invalid OCI runtime spec"), "{bad:?}: {msg}");
        assert!(msg.contains("config.json"), "{bad:?}: {msg}");
    }
    // Oversized file.
    let big = vec![b' '; (sidetunnel_oci::MAX_SPEC_BYTES + 1) as usize];
    std::fs::write(dir.path().join("config.json"), big).unwrap();
    let msg = classify_bundle(dir.path()).unwrap_err().to_string();
    assert!(msg.contains("limit"), "{msg}");
}
