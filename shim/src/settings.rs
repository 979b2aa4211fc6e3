//! Per-shim-process settings: the containerd namespace and the node config,
//! loaded once per config path (a shim serves one pod for its lifetime).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::config::NodeConfig;
use crate::error::{Error, Result};

pub struct Settings {
    pub namespace: String,
    cache: Mutex<HashMap<PathBuf, Arc<NodeConfig>>>,
}

impl Settings {
    pub fn new(namespace: &str) -> Settings {
        Settings {
            namespace: namespace.to_owned(),
            cache: Mutex::default(),
        }
    }

    /// The node config at `config_path` (runtime option) or the default path.
    pub fn node(&self, config_path: Option<&Path>) -> Result<Arc<NodeConfig>> {
        let path = NodeConfig::path(config_path);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get(&path) {
            return Ok(c.clone());
        }
        let cfg = Arc::new(
            NodeConfig::load(&path).map_err(|e| Error::FailedPrecondition(e.to_string()))?,
        );
        cache.insert(path, cfg.clone());
        Ok(cfg)
    }
}
