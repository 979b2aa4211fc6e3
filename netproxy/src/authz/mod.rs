//! L4 authorization: Istio AuthorizationPolicy semantics as ztunnel applies
//! them to a connection (source address and identity, destination address).
//!
//! Evaluation order (istio.io authorization-policy reference): any matching
//! DENY policy denies; otherwise, with no ALLOW policy the connection is
//! allowed; otherwise one ALLOW policy must match. Dry-run policies are
//! evaluated and logged, never enforced.
//!
//! Matching: a policy matches when any rule matches; a rule when all its
//! clauses match; a clause when any of its matches matches (an empty clause
//! matches, an empty match inside a non-empty clause does not); a match when
//! every field it sets matches: within a field any value may match, and no
//! value of a `not_*` field may match. Principals are compared without the
//! `spiffe://` prefix, and a connection without identity has empty
//! principal and namespace (so `presence` fails and `not_principals:
//! presence` — Istio's STRICT mTLS conversion — matches plaintext).
//! Scope (GLOBAL / NAMESPACE / WORKLOAD_SELECTOR) is resolved by the store
//! (`Store::policies_for`); this module evaluates the selected set.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use tracing::{debug, info};

use crate::identity::Identity;
use crate::state::{Policy, PolicyAction, PolicyMatch, ServiceAccountMatch, StringMatch};

/// What authorization sees of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    pub src: SocketAddr,
    /// The address the client wanted (pod IP and app port), not 15008.
    pub dst: SocketAddr,
    /// Peer identity verified by mTLS; `None` for plaintext.
    pub src_identity: Option<&'a Identity>,
}

impl fmt::Display for Connection<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.src_identity {
            Some(id) => write!(f, "{}({id})->{}", self.src, self.dst),
            None => write!(f, "{}(no identity)->{}", self.src, self.dst),
        }
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("denied by DENY policy {0}")]
    ExplicitDeny(String),
    #[error("no ALLOW policy matched")]
    NotAllowed,
}

/// Applies `policies` (already selected for the destination workload) to
/// `conn`.
pub fn check(policies: &[Arc<Policy>], conn: &Connection<'_>) -> Result<(), Denied> {
    let (mut allow, mut deny) = (Vec::new(), Vec::new());
    for p in policies {
        match (p.action, p.dry_run) {
            (PolicyAction::Deny, true) => {
                if matches(p, conn) {
                    info!(policy = %p.key(), %conn, "dry-run: DENY policy matches (not enforced)");
                }
            }
            (PolicyAction::Deny, false) => deny.push(p),
            (PolicyAction::Allow, _) => allow.push(p),
        }
    }
    if let Some(p) = deny.iter().find(|p| matches(p, conn)) {
        debug!(policy = %p.key(), %conn, "DENY policy matches");
        return Err(Denied::ExplicitDeny(p.key()));
    }

    let (dry_allow, allow): (Vec<_>, Vec<_>) = allow.into_iter().partition(|p| p.dry_run);
    if !dry_allow.is_empty() {
        match dry_allow.iter().find(|p| matches(p, conn)) {
            Some(p) => info!(policy = %p.key(), %conn, "dry-run: ALLOW policy matches"),
            None => info!(%conn, "dry-run: no dry-run ALLOW policy matches (would deny)"),
        }
    }
    if allow.is_empty() {
        return Ok(());
    }
    match allow.iter().find(|p| matches(p, conn)) {
        Some(p) => {
            debug!(policy = %p.key(), %conn, "ALLOW policy matches");
            Ok(())
        }
        None => {
            debug!(%conn, "no ALLOW policy matches");
            Err(Denied::NotAllowed)
        }
    }
}

/// Whether `policy`'s rules match `conn` (action and dry-run aside).
pub fn matches(policy: &Policy, conn: &Connection<'_>) -> bool {
    let principal = conn.src_identity.map(|i| i.to_string()).unwrap_or_default();
    let namespace = conn.src_identity.map(|i| i.namespace()).unwrap_or("");
    policy.rules.iter().any(|rule| {
        rule.iter().all(|clause| {
            clause.is_empty()
                || clause
                    .iter()
                    .any(|m| !is_empty(m) && match_one(m, conn, &principal, namespace))
        })
    })
}

fn match_one(m: &PolicyMatch, conn: &Connection<'_>, principal: &str, namespace: &str) -> bool {
    field(&m.destination_ips, &m.not_destination_ips, |p| {
        p.contains(conn.dst.ip())
    }) && field(&m.source_ips, &m.not_source_ips, |p| {
        p.contains(conn.src.ip())
    }) && field(&m.destination_ports, &m.not_destination_ports, |p| {
        *p == conn.dst.port()
    }) && field(&m.service_accounts, &m.not_service_accounts, |s| {
        service_account_matches(s, conn.src_identity)
    }) && field(&m.principals, &m.not_principals, |s| {
        principal_matches(s, principal)
    }) && field(&m.namespaces, &m.not_namespaces, |s| s.matches(namespace))
}

/// Positive values: unset or any matches; negative values: none matches.
fn field<T>(positive: &[T], negative: &[T], pred: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&pred)) && !negative.iter().any(&pred)
}

/// Istio writes principals without the scheme (`td/ns/x/sa/y`, and a
/// prefix `*foo` means `spiffe://*foo`): strip it, and fail when absent.
fn principal_matches(m: &StringMatch, principal: &str) -> bool {
    principal
        .strip_prefix("spiffe://")
        .is_some_and(|p| m.matches(p))
}

fn service_account_matches(m: &ServiceAccountMatch, id: Option<&Identity>) -> bool {
    id.is_some_and(|id| id.namespace() == m.namespace && id.service_account() == m.service_account)
}

fn is_empty(m: &PolicyMatch) -> bool {
    *m == PolicyMatch::default()
}

#[cfg(test)]
mod tests;
