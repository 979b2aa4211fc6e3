//! OCI images built locally, with no registry: a pause image and a
//! busybox-static app image, written as OCI image-layout archives and
//! imported into a containerd namespace with `ctr images import`
//! (`containerd::import`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};
use serde_json::json;

/// Sandbox image the harness containerd is configured with.
pub const PAUSE: &str = "localhost/sidetunnel/pause:test";
/// App image: busybox-static with all applets linked.
pub const BUSYBOX: &str = "localhost/sidetunnel/busybox:test";

/// Where Debian's busybox-static installs its binary.
pub const BUSYBOX_BIN: &str = "/bin/busybox";

const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Behaves like Kubernetes' pause: sleeps until signalled, exits 0 on TERM/INT.
const PAUSE_SCRIPT: &str = "#!/bin/sh\n\
trap 'exit 0' TERM INT\n\
while :; do sleep 2147483647 & wait $!; done\n";

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\nnogroup:x:65534:\n";

/// One entry of a single-layer root filesystem.
#[derive(Debug, Clone)]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    Symlink {
        path: String,
        target: String,
    },
    /// A hard link to `target`, an earlier entry's path in the layer.
    Hardlink {
        path: String,
        target: String,
    },
}

/// An image to build: one layer plus the runtime config.
#[derive(Debug, Clone)]
pub struct ImageDef {
    /// Full reference, e.g. `localhost/sidetunnel/busybox:test`.
    pub name: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub entries: Vec<Entry>,
    /// The config's `User` (empty: root).
    pub user: String,
}

fn base_dirs() -> Vec<Entry> {
    let dir = |path: &str, mode| Entry::Dir {
        path: path.into(),
        mode,
    };
    vec![
        dir("bin", 0o755),
        dir("dev", 0o755),
        dir("etc", 0o755),
        dir("proc", 0o555),
        dir("root", 0o700),
        dir("run", 0o755),
        dir("sbin", 0o755),
        dir("sys", 0o555),
        dir("tmp", 0o1777),
        dir("usr", 0o755),
        dir("usr/bin", 0o755),
        dir("usr/sbin", 0o755),
        dir("var", 0o755),
        Entry::File {
            path: "etc/passwd".into(),
            mode: 0o644,
            data: PASSWD.into(),
        },
        Entry::File {
            path: "etc/group".into(),
            mode: 0o644,
            data: GROUP.into(),
        },
    ]
}

fn busybox_entry() -> Result<Entry> {
    let data = std::fs::read(BUSYBOX_BIN)
        .with_context(|| format!("reading {BUSYBOX_BIN} (install busybox-static)"))?;
    Ok(Entry::File {
        path: "bin/busybox".into(),
        mode: 0o755,
        data,
    })
}

/// The pause image: busybox, `/bin/sh`, `/bin/sleep` and the `/pause` script.
pub fn pause() -> Result<ImageDef> {
    let mut entries = base_dirs();
    entries.push(busybox_entry()?);
    for applet in ["sh", "sleep"] {
        entries.push(Entry::Symlink {
            path: format!("bin/{applet}"),
            target: "/bin/busybox".into(),
        });
    }
    entries.push(Entry::File {
        path: "pause".into(),
        mode: 0o755,
        data: PAUSE_SCRIPT.into(),
    });
    Ok(ImageDef {
        name: PAUSE.into(),
        entrypoint: vec!["/pause".into()],
        cmd: vec![],
        entries,
        user: String::new(),
    })
}

/// The app image: busybox-static with every applet at its usual path.
pub fn busybox() -> Result<ImageDef> {
    let out = Command::new(BUSYBOX_BIN)
        .arg("--list-full")
        .output()
        .with_context(|| format!("running {BUSYBOX_BIN} --list-full"))?;
    ensure!(out.status.success(), "{BUSYBOX_BIN} --list-full failed");
    let mut entries = base_dirs();
    entries.push(busybox_entry()?);
    for path in String::from_utf8_lossy(&out.stdout).lines() {
        let path = path.trim().trim_start_matches('/');
        if path.is_empty() || path == "bin/busybox" || path.contains("..") {
            continue;
        }
        // Only the usual command directories (skips e.g. `linuxrc`).
        let top = path.split('/').next().unwrap_or_default();
        if !["bin", "sbin", "usr"].contains(&top) || !path.contains('/') {
            continue;
        }
        entries.push(Entry::Symlink {
            path: path.into(),
            target: "/bin/busybox".into(),
        });
    }
    Ok(ImageDef {
        name: BUSYBOX.into(),
        entrypoint: vec![],
        cmd: vec!["/bin/sh".into()],
        entries,
        user: String::new(),
    })
}

fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Fixed mtime so identical inputs give identical digests.
const MTIME: u64 = 1_700_000_000;

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(MTIME);
    h
}

/// Uncompressed layer tar (media type `application/vnd.oci.image.layer.v1.tar`).
fn layer_tar(entries: &[Entry]) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            Entry::Dir { path, mode } => {
                let mut h = header(tar::EntryType::Directory, *mode, 0);
                b.append_data(&mut h, format!("{path}/"), std::io::empty())?;
            }
            Entry::File { path, mode, data } => {
                let mut h = header(tar::EntryType::Regular, *mode, data.len() as u64);
                b.append_data(&mut h, path, data.as_slice())?;
            }
            Entry::Symlink { path, target } => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                b.append_link(&mut h, path, target)?;
            }
            Entry::Hardlink { path, target } => {
                let mut h = header(tar::EntryType::Link, 0o755, 0);
                b.append_link(&mut h, path, target)?;
            }
        }
    }
    Ok(b.into_inner()?)
}

/// Docker/OCI architecture name of this machine.
pub fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

struct Blob {
    digest: String,
    data: Vec<u8>,
}

impl Blob {
    fn new(data: Vec<u8>) -> Blob {
        Blob {
            digest: format!("sha256:{}", sha256_hex(&data)),
            data,
        }
    }
    fn json(value: serde_json::Value) -> Blob {
        Blob::new(serde_json::to_vec(&value).expect("serialising JSON value"))
    }
}

/// Writes `def` as an OCI image-layout tar archive at `out`.
pub fn write_oci_archive(def: &ImageDef, out: &Path) -> Result<()> {
    let layer = Blob::new(layer_tar(&def.entries)?);
    let config = Blob::json(json!({
        "architecture": oci_arch(),
        "os": "linux",
        "config": {
            "Env": [PATH_ENV],
            "Entrypoint": def.entrypoint,
            "Cmd": def.cmd,
            "WorkingDir": "/",
            "User": def.user,
        },
        "rootfs": { "type": "layers", "diff_ids": [layer.digest] },
        "history": [{ "created_by": "sidetunnel-tests image builder" }],
    }));
    let manifest = Blob::json(json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config.digest,
            "size": config.data.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer.digest,
            "size": layer.data.len(),
        }],
    }));
    let tag = def
        .name
        .rsplit_once(':')
        .map(|(_, t)| t)
        .unwrap_or("latest");
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest.digest,
            "size": manifest.data.len(),
            "platform": { "architecture": oci_arch(), "os": "linux" },
            "annotations": {
                "io.containerd.image.name": def.name,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    });
    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut b = tar::Builder::new(std::io::BufWriter::new(file));
    let mut add = |path: String, data: &[u8]| -> std::io::Result<()> {
        let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
        b.append_data(&mut h, path, data)
    };
    add("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json".into(), &serde_json::to_vec(&index)?)?;
    for blob in [&layer, &config, &manifest] {
        let hex = blob.digest.trim_start_matches("sha256:");
        add(format!("blobs/sha256/{hex}"), &blob.data)?;
    }
    b.into_inner()?.into_inner().map_err(|e| e.into_error())?;
    Ok(())
}

/// Builds the test images as OCI archives in `dir` and returns their names and
/// archive paths: `[pause, busybox]`.
pub fn build_all(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for def in [pause()?, busybox()?] {
        let file = dir.join(format!("{}.oci.tar", def.name.replace(['/', ':'], "_")));
        write_oci_archive(&def, &file)?;
        out.push((def.name, file));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_is_a_valid_oci_layout() {
        let dir = tempfile::tempdir().unwrap();
        let def = ImageDef {
            name: "localhost/x/y:t1".into(),
            entrypoint: vec!["/pause".into()],
            cmd: vec![],
            entries: vec![
                Entry::Dir {
                    path: "bin".into(),
                    mode: 0o755,
                },
                Entry::File {
                    path: "pause".into(),
                    mode: 0o755,
                    data: b"#!/bin/sh\n".to_vec(),
                },
                Entry::Symlink {
                    path: "bin/sh".into(),
                    target: "/bin/busybox".into(),
                },
            ],
            user: String::new(),
        };
        let file = dir.path().join("a.tar");
        write_oci_archive(&def, &file).unwrap();
        let mut ar = tar::Archive::new(std::fs::File::open(&file).unwrap());
        let mut files = std::collections::BTreeMap::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            files.insert(e.path().unwrap().display().to_string(), data);
        }
        // Every blob is stored under its own digest.
        for (path, data) in &files {
            if let Some(hex) = path.strip_prefix("blobs/sha256/") {
                assert_eq!(hex, sha256_hex(data), "{path}");
            }
        }
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
        let m = &index["manifests"][0];
        assert_eq!(
            m["annotations"]["io.containerd.image.name"],
            "localhost/x/y:t1"
        );
        assert_eq!(m["annotations"]["org.opencontainers.image.ref.name"], "t1");
        let hex = m["digest"].as_str().unwrap().trim_start_matches("sha256:");
        let manifest: serde_json::Value =
            serde_json::from_slice(&files[&format!("blobs/sha256/{hex}")]).unwrap();
        let chex = manifest["config"]["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:");
        let config: serde_json::Value =
            serde_json::from_slice(&files[&format!("blobs/sha256/{chex}")]).unwrap();
        assert_eq!(config["config"]["Entrypoint"][0], "/pause");
        // Uncompressed layer: diff_id equals the layer digest.
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            manifest["layers"][0]["digest"]
        );
    }
}
