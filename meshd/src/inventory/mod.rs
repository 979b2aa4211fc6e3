//! The mesh inventory: a YAML file of workloads, services and authorization
//! policies (format in meshd/README.md), parsed, validated and converted to
//! an indexed [`Snapshot`] of encoded xDS resources.

pub mod convert;
pub mod model;

use std::path::Path;

pub use convert::{Context, ConvertError};
pub use model::Inventory;

use crate::snapshot::Snapshot;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("parsing inventory: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("invalid inventory: {0}")]
    Invalid(#[from] ConvertError),
}

/// Parses and converts inventory YAML text. An empty document is an empty mesh.
pub fn parse(ctx: &Context, text: &str) -> Result<Snapshot, LoadError> {
    Ok(convert::convert(ctx, &parse_model(text)?)?)
}

/// Parses inventory YAML text into the model, without converting it.
pub fn parse_model(text: &str) -> Result<Inventory, LoadError> {
    if text.trim().is_empty() {
        Ok(Inventory::default())
    } else {
        Ok(serde_yaml::from_str(text)?)
    }
}

/// Reads, parses and converts an inventory file.
pub fn load(ctx: &Context, path: &Path) -> Result<Snapshot, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(ctx, &text)
}
