//! Per-spec results from critest's ginkgo JSON report
//! (`-ginkgo.json-report`).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Suite {
    #[serde(default)]
    spec_reports: Vec<Spec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Spec {
    #[serde(default)]
    container_hierarchy_texts: Option<Vec<String>>,
    #[serde(default)]
    leaf_node_type: String,
    #[serde(default)]
    leaf_node_text: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    failure: Option<Failure>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Failure {
    #[serde(default)]
    message: String,
}

/// Spec name (containers and leaf joined by spaces) → (state, failure message).
#[derive(Debug, Default)]
pub struct Results(pub BTreeMap<String, (String, String)>);

impl Results {
    pub fn load(path: &Path) -> Result<Results> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let suites: Vec<Suite> =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let mut out = BTreeMap::new();
        for spec in suites.into_iter().flat_map(|s| s.spec_reports) {
            if spec.leaf_node_type != "It" {
                continue;
            }
            let mut name = spec.container_hierarchy_texts.unwrap_or_default();
            name.push(spec.leaf_node_text);
            let msg = spec.failure.map(|f| f.message).unwrap_or_default();
            out.insert(name.join(" "), (spec.state, msg));
        }
        Ok(Results(out))
    }

    /// Specs in `state` (`passed`, `failed`, `skipped`, ...).
    pub fn with_state(&self, state: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(_, (s, _))| s == state)
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// `passed=N failed=N skipped=N` (other states named as they come).
    pub fn counts(&self) -> String {
        let mut c: BTreeMap<&str, usize> = BTreeMap::new();
        for (s, _) in self.0.values() {
            *c.entry(s.as_str()).or_default() += 1;
        }
        c.iter()
            .map(|(s, n)| format!("{s}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}
