//! Runtime options containerd hands the shim (on stdin at `start`: as a bare
//! `Any` up to containerd 2.2, as an extension of `BootstrapParams` from 2.3
//! on, see `bootstrap.rs`; and in `CreateTaskRequest.options`), in the three
//! shapes containerd uses:
//!
//! * `containerd.runc.v1.Options` protobuf — when a platform reuses runc's
//!   options type for this runtime;
//! * `runtimeoptions.v1.Options` with `config_path` (containerd 1.6+: the CRI
//!   plugin's generic options for a non-runc runtime type, field 2);
//! * `runtimeoptions.v1.Options` with `config_body` (containerd 1.7+: the whole
//!   `[...runtimes.sidetunnel.options]` TOML table, field 3).
//!
//! The decoded options are stored in the bundle so the delete-after-crash path
//! (a fresh process with no request) runs the same OCI runtime with the same root.

use std::path::{Path, PathBuf};

use containerd_shim::api::Options as RuncOptions;
use containerd_shim::protos::protobuf::{CodedInputStream, Message, well_known_types::any::Any};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

const RUNC_OPTIONS: &str = "containerd.runc.v1.Options";
const GENERIC_OPTIONS: &str = "runtimeoptions.v1.Options";
/// Where the decoded options are kept inside a bundle.
const OPTIONS_FILE: &str = "sidetunnel-options.json";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeOptions {
    /// OCI runtime binary; overrides the node config's `runtime.binary`.
    pub binary_name: Option<String>,
    /// Root directory of the OCI runtime's state.
    pub root: Option<String>,
    pub systemd_cgroup: bool,
    pub no_pivot_root: bool,
    pub no_new_keyring: bool,
    pub io_uid: u32,
    pub io_gid: u32,
    /// cgroup the shim itself is placed in at `start`.
    pub shim_cgroup: Option<String>,
    /// Node config file; overrides `/etc/sidetunnel/config.toml`.
    pub config_path: Option<PathBuf>,
}

/// The TOML keys containerd's runc options use, plus `ConfigPath`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
struct TomlBody {
    type_url: Option<String>,
    config_path: Option<PathBuf>,
    binary_name: Option<String>,
    root: Option<String>,
    #[serde(default)]
    systemd_cgroup: bool,
    #[serde(default)]
    no_pivot_root: bool,
    #[serde(default)]
    no_new_keyring: bool,
    #[serde(default)]
    io_uid: u32,
    #[serde(default)]
    io_gid: u32,
    shim_cgroup: Option<String>,
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

impl RuntimeOptions {
    /// Decodes the `Any` containerd sent; an absent or empty value means defaults.
    pub fn from_any(any: Option<&Any>) -> Result<RuntimeOptions> {
        let Some(any) = any else {
            return Ok(RuntimeOptions::default());
        };
        if any.value.is_empty() {
            return Ok(RuntimeOptions::default());
        }
        let type_url = any.type_url.as_str();
        if type_url.ends_with(GENERIC_OPTIONS) {
            return Self::from_generic(&any.value);
        }
        if type_url.is_empty() || type_url.ends_with(RUNC_OPTIONS) {
            return Self::from_runc(&any.value);
        }
        Err(Error::InvalidArgument(format!(
            "unsupported runtime options type {type_url:?} (expected {RUNC_OPTIONS} or {GENERIC_OPTIONS})"
        )))
    }

    /// Whether `type_url` names one of the two options types this shim reads.
    pub fn is_known_type(type_url: &str) -> bool {
        type_url.ends_with(GENERIC_OPTIONS) || type_url.ends_with(RUNC_OPTIONS)
    }

    /// Decodes the bytes of a marshalled `Any` (what `start` receives on stdin).
    pub fn from_any_bytes(bytes: &[u8]) -> Result<RuntimeOptions> {
        if bytes.is_empty() {
            return Ok(RuntimeOptions::default());
        }
        let any = Any::parse_from_bytes(bytes)
            .map_err(|e| Error::InvalidArgument(format!("runtime options are not an Any: {e}")))?;
        Self::from_any(Some(&any))
    }

    fn from_runc(bytes: &[u8]) -> Result<RuntimeOptions> {
        let mut o = RuncOptions::new();
        let mut input = CodedInputStream::from_bytes(bytes);
        o.merge_from(&mut input)
            .map_err(|e| Error::InvalidArgument(format!("bad {RUNC_OPTIONS}: {e}")))?;
        Ok(RuntimeOptions {
            binary_name: non_empty(&o.binary_name),
            root: non_empty(&o.root),
            systemd_cgroup: o.systemd_cgroup,
            no_pivot_root: o.no_pivot_root,
            no_new_keyring: o.no_new_keyring,
            io_uid: o.io_uid,
            io_gid: o.io_gid,
            shim_cgroup: non_empty(&o.shim_cgroup),
            config_path: None,
        })
    }

    /// `runtimeoptions.v1.Options { string type_url = 1; string config_path = 2;
    /// bytes config_body = 3; }` — decoded by hand: no generated type exists
    /// for it in the shim protos.
    fn from_generic(bytes: &[u8]) -> Result<RuntimeOptions> {
        let bad = |e: &dyn std::fmt::Display| {
            Error::InvalidArgument(format!("bad {GENERIC_OPTIONS}: {e}"))
        };
        let mut input = CodedInputStream::from_bytes(bytes);
        let (mut config_path, mut body) = (String::new(), Vec::new());
        while let Some(tag) = input.read_raw_tag_or_eof().map_err(|e| bad(&e))? {
            match (tag >> 3, tag & 7) {
                (2, 2) => config_path = input.read_string().map_err(|e| bad(&e))?,
                (3, 2) => body = input.read_bytes().map_err(|e| bad(&e))?,
                (_, wire) => {
                    let wire = containerd_shim::protos::protobuf::rt::WireType::new(wire)
                        .ok_or_else(|| bad(&format!("wire type {wire}")))?;
                    input.skip_field(wire).map_err(|e| bad(&e))?;
                }
            }
        }
        let mut opts = if body.is_empty() {
            RuntimeOptions::default()
        } else {
            Self::from_toml(&body)?
        };
        if !config_path.is_empty() {
            opts.config_path = Some(PathBuf::from(config_path));
        }
        Ok(opts)
    }

    /// The TOML body containerd 1.7+ forwards (the runtime's `options` table).
    pub fn from_toml(body: &[u8]) -> Result<RuntimeOptions> {
        let text = std::str::from_utf8(body).map_err(|e| {
            Error::InvalidArgument(format!("runtime options body is not UTF-8: {e}"))
        })?;
        let t: TomlBody = toml::from_str(text)
            .map_err(|e| Error::InvalidArgument(format!("runtime options body: {e}")))?;
        let _ = t.type_url;
        Ok(RuntimeOptions {
            binary_name: t.binary_name.filter(|s| !s.is_empty()),
            root: t.root.filter(|s| !s.is_empty()),
            systemd_cgroup: t.systemd_cgroup,
            no_pivot_root: t.no_pivot_root,
            no_new_keyring: t.no_new_keyring,
            io_uid: t.io_uid,
            io_gid: t.io_gid,
            shim_cgroup: t.shim_cgroup.filter(|s| !s.is_empty()),
            config_path: t.config_path.filter(|p| !p.as_os_str().is_empty()),
        })
    }

    pub fn save(&self, bundle: &Path) -> Result<()> {
        let json = serde_json::to_vec(self).map_err(|e| Error::Io {
            context: "encode runtime options".into(),
            source: e.into(),
        })?;
        std::fs::write(bundle.join(OPTIONS_FILE), json).map_err(Error::io(format!(
            "write {OPTIONS_FILE} in {}",
            bundle.display()
        )))
    }

    /// Options saved by `create`; defaults when none were saved.
    pub fn load(bundle: &Path) -> RuntimeOptions {
        std::fs::read(bundle.join(OPTIONS_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An `Any` as containerd sends it (also used by bootstrap's tests).
    pub(crate) fn any(type_url: &str, value: Vec<u8>) -> Any {
        Any {
            type_url: type_url.into(),
            value,
            ..Default::default()
        }
    }

    /// Encodes `runtimeoptions.v1.Options` the way containerd's gogo code does.
    fn generic(config_path: &str, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut field = |num: u8, bytes: &[u8]| {
            if bytes.is_empty() {
                return;
            }
            out.push((num << 3) | 2);
            let mut len = bytes.len();
            while len >= 0x80 {
                out.push((len as u8) | 0x80);
                len >>= 7;
            }
            out.push(len as u8);
            out.extend_from_slice(bytes);
        };
        field(1, b"io.containerd.sidetunnel.v1.Options");
        field(2, config_path.as_bytes());
        field(3, body);
        out
    }

    #[test]
    fn none_and_empty_mean_defaults() {
        assert_eq!(
            RuntimeOptions::from_any(None).unwrap(),
            RuntimeOptions::default()
        );
        let a = any(RUNC_OPTIONS, vec![]);
        assert_eq!(
            RuntimeOptions::from_any(Some(&a)).unwrap(),
            RuntimeOptions::default()
        );
        assert_eq!(
            RuntimeOptions::from_any_bytes(&[]).unwrap(),
            RuntimeOptions::default()
        );
    }

    #[test]
    fn runc_protobuf_options() {
        let o = RuncOptions {
            binary_name: "crun".into(),
            root: "/run/x".into(),
            systemd_cgroup: true,
            io_uid: 7,
            ..Default::default()
        };
        let a = any("containerd.runc.v1.Options", o.write_to_bytes().unwrap());
        let got = RuntimeOptions::from_any_bytes(&a.write_to_bytes().unwrap()).unwrap();
        assert_eq!(got.binary_name.as_deref(), Some("crun"));
        assert_eq!(got.root.as_deref(), Some("/run/x"));
        assert!(got.systemd_cgroup);
        assert_eq!(got.io_uid, 7);
        assert_eq!(got.config_path, None);
    }

    #[test]
    fn generic_options_with_config_path() {
        let a = any(GENERIC_OPTIONS, generic("/etc/st/node.toml", b""));
        let got = RuntimeOptions::from_any(Some(&a)).unwrap();
        assert_eq!(got.config_path, Some(PathBuf::from("/etc/st/node.toml")));
        assert_eq!(got.binary_name, None);
    }

    #[test]
    fn generic_options_with_toml_body() {
        let body = b"BinaryName = \"crun\"\nSystemdCgroup = false\nConfigPath = \"/x.toml\"\n";
        let a = any(GENERIC_OPTIONS, generic("", body));
        let got = RuntimeOptions::from_any(Some(&a)).unwrap();
        assert_eq!(got.binary_name.as_deref(), Some("crun"));
        assert_eq!(got.config_path, Some(PathBuf::from("/x.toml")));
    }

    #[test]
    fn toml_body_rejects_unknown_keys_with_their_name() {
        let err = RuntimeOptions::from_toml(b"BinaryNam = \"crun\"").unwrap_err();
        assert!(err.to_string().contains("BinaryNam"), "{err}");
    }

    #[test]
    fn unknown_type_is_an_error() {
        let a = any("example.com/Other", vec![1, 2]);
        let err = RuntimeOptions::from_any(Some(&a)).unwrap_err();
        assert!(err.to_string().contains("example.com/Other"), "{err}");
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let o = RuntimeOptions {
            binary_name: Some("crun".into()),
            ..Default::default()
        };
        o.save(dir.path()).unwrap();
        assert_eq!(RuntimeOptions::load(dir.path()), o);
        assert_eq!(
            RuntimeOptions::load(&dir.path().join("missing")),
            RuntimeOptions::default()
        );
    }
}
