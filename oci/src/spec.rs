//! The subset of the OCI runtime spec (`config.json`) sidetunnel reads.
//! Unknown fields are ignored so specs from any runtime version parse; the
//! bundle itself is handed to runc untouched.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Error, Result};

/// Largest `config.json` accepted. Real specs are a few tens of KiB; the cap
/// keeps a corrupt or hostile bundle from exhausting the shim's memory.
pub const MAX_SPEC_BYTES: u64 = 16 << 20;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    #[serde(default, deserialize_with = "null_default")]
    pub oci_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, deserialize_with = "null_default")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<Root>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linux: Option<Linux>,
    #[serde(default, deserialize_with = "null_default")]
    pub mounts: Vec<Mount>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Mount {
    #[serde(default, deserialize_with = "null_default")]
    pub destination: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Root {
    #[serde(default, deserialize_with = "null_default")]
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Linux {
    #[serde(default, deserialize_with = "null_default")]
    pub namespaces: Vec<Namespace>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroups_path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    /// `network`, `pid`, `ipc`, `uts`, `mount`, `user`, `cgroup`, `time`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Join this existing namespace; absent means the runtime creates one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
}

/// Go's encoding/json writes `null` for nil maps and slices; treat it as empty.
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Derived struct deserializers also accept JSON arrays; a spec must be an object.
fn parse(json: &[u8]) -> serde_json::Result<Spec> {
    let first = json.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|b| *b != b'{') {
        return Err(serde::de::Error::custom("expected a JSON object"));
    }
    serde_json::from_slice(json)
}

impl Spec {
    /// Parses a spec from JSON bytes.
    pub fn from_slice(json: &[u8]) -> Result<Spec> {
        parse(json).map_err(|source| Error::Parse { path: None, source })
    }

    /// Reads `<bundle>/config.json`.
    pub fn load_bundle(bundle: &Path) -> Result<Spec> {
        Self::load(&bundle.join("config.json"))
    }

    /// Reads a spec file, refusing files over [`MAX_SPEC_BYTES`].
    pub fn load(path: &Path) -> Result<Spec> {
        let read_err = |source| Error::Read {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mut buf = Vec::new();
        file.take(MAX_SPEC_BYTES + 1)
            .read_to_end(&mut buf)
            .map_err(read_err)?;
        if buf.len() as u64 > MAX_SPEC_BYTES {
            return Err(Error::TooLarge {
                path: path.to_owned(),
                size: buf.len() as u64,
                limit: MAX_SPEC_BYTES,
            });
        }
        parse(&buf).map_err(|source| Error::Parse {
            path: Some(path.to_owned()),
            source,
        })
    }

    /// The `linux.namespaces` entry of `kind`, if any.
    pub fn namespace(&self, kind: &str) -> Option<&Namespace> {
        self.linux
            .as_ref()?
            .namespaces
            .iter()
            .find(|ns| ns.kind == kind)
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.get(key).map(String::as_str)
    }
}
