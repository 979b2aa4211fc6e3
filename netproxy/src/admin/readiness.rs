//! Readiness: named checks that must all pass before the proxy reports
//! ready (the shim gates app containers on it). Checks are closures over
//! the components' own state, so readiness can also be lost again (e.g. a
//! certificate expiring without renewal).

use std::sync::{Arc, RwLock};

type Check = Arc<dyn Fn() -> bool + Send + Sync>;

/// Shared set of readiness checks. Clone freely.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Arc<RwLock<Vec<(&'static str, Check)>>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("pending", &self.pending())
            .finish()
    }
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a check named `name` (shown while it fails).
    pub fn add(&self, name: &'static str, check: impl Fn() -> bool + Send + Sync + 'static) {
        self.checks
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push((name, Arc::new(check)));
    }

    /// Names of the checks that currently fail; empty means ready.
    pub fn pending(&self) -> Vec<&'static str> {
        self.checks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, c)| !c())
            .map(|(n, _)| *n)
            .collect()
    }

    pub fn is_ready(&self) -> bool {
        self.pending().is_empty()
    }
}
