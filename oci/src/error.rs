//! Errors raised while reading a bundle or interpreting its annotations.

use std::path::PathBuf;

/// Everything that can be wrong with a bundle's `config.json` as far as
/// sidetunnel is concerned. Messages name the file, key or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading OCI spec {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("OCI spec {path} is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("invalid OCI runtime spec{}: {source}", origin(.path))]
    Parse {
        path: Option<PathBuf>,
        source: serde_json::Error,
    },
    #[error("{runtime} {role} spec lacks annotation {key}")]
    MissingAnnotation {
        runtime: &'static str,
        role: &'static str,
        key: &'static str,
    },
    #[error("annotation {key}={value:?}: {reason}")]
    InvalidAnnotation {
        key: String,
        value: String,
        reason: String,
    },
    #[error("network namespace path {0:?} is not absolute")]
    RelativeNetns(PathBuf),
    #[error("cgroups path {path:?}: {reason}")]
    InvalidCgroupsPath { path: String, reason: &'static str },
}

fn origin(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| format!(" {}", p.display()))
        .unwrap_or_default()
}

impl Error {
    pub(crate) fn invalid(key: &str, value: &str, reason: impl Into<String>) -> Self {
        Error::InvalidAnnotation {
            key: key.to_owned(),
            value: value.to_owned(),
            reason: reason.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
