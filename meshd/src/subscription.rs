//! Per-stream, per-type delta xDS subscription state with istiod's
//! semantics: wildcard vs on-demand, sticky resolution of on-demand names
//! (`network/IP`, `namespace/hostname`, uid) to canonical names, node-local
//! workloads for a client naming its node, what the client holds (name →
//! version, updated optimistically so a NACKed version is not resent), and
//! computing the next response for a request or for an inventory change.
//! meshd's extensions ([`Extensions`]) change it where docs/istiod-fidelity.md
//! says. Pure logic: no I/O, unit-tested here.

use std::collections::{BTreeSet, HashMap};

use sidetunnel_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, Resource};

use crate::mode::Extensions;
use crate::snapshot::{Kind, Snapshot, TypeDiff, TypeUrl};

const WILDCARD: &str = "*";

/// What a response carries.
#[derive(Debug, Default, PartialEq)]
pub struct Outgoing {
    pub resources: Vec<Resource>,
    pub removed: Vec<String>,
}

impl Outgoing {
    pub fn is_empty(&self) -> bool {
        self.resources.is_empty() && self.removed.is_empty()
    }
}

/// How a non-initial request was classified.
#[derive(Debug, PartialEq)]
pub enum Reaction {
    /// Subscriptions changed: send this response (possibly empty: istiod
    /// always answers a subscription request).
    Respond(Outgoing),
    /// ACK of the last response.
    Ack,
    /// NACK with the client's reason.
    Nack(String),
    /// Response nonce of an older response, or a no-op request.
    Ignore,
}

/// What a stream's watches know about their client and server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    pub extensions: Extensions,
    /// The client's `NODE_NAME` node metadata, if any: istiod then sends an
    /// on-demand Address client every workload on that node
    /// (`AdditionalPodSubscriptions`).
    pub node_name: Option<String>,
}

#[derive(Debug)]
pub struct Watch {
    pub type_url: TypeUrl,
    opts: Options,
    wildcard: bool,
    /// On-demand names, as the client wrote them plus the canonical names
    /// they resolved to (istiod keeps both, so later changes are pushed).
    names: BTreeSet<String>,
    /// Canonical name → version the client holds (as far as we know).
    sent: HashMap<String, String>,
    nonce_sent: Option<String>,
}

impl Watch {
    /// State from the first request of a type on a stream, and the response
    /// to it (always sent).
    pub fn first(
        t: TypeUrl,
        req: &DeltaDiscoveryRequest,
        snap: &Snapshot,
        opts: &Options,
    ) -> (Self, Outgoing) {
        let mut names: BTreeSet<String> = req.resource_names_subscribe.iter().cloned().collect();
        names.extend(req.initial_resource_versions.keys().cloned());
        for n in &req.resource_names_unsubscribe {
            names.remove(n);
        }
        // "*" subscribed, or no names at all: wildcard (ztunnel's on-demand
        // start subscribes and unsubscribes "*" to mean "nothing").
        let wildcard = names.remove(WILDCARD) || req.resource_names_subscribe.is_empty();
        let mut w = Watch {
            type_url: t,
            opts: opts.clone(),
            wildcard,
            names,
            sent: req.initial_resource_versions.clone(),
            nonce_sent: None,
        };
        let requested: Vec<String> = req
            .resource_names_subscribe
            .iter()
            .filter(|n| *n != WILDCARD)
            .cloned()
            .collect();
        let out = w.full(snap, &requested, true);
        (w, out)
    }

    /// istiod's Authorization: every client gets every policy, whatever it
    /// subscribed (`WorkloadRBACGenerator`).
    fn all_policies(&self) -> bool {
        self.type_url == TypeUrl::Authorization && !self.opts.extensions.uid_scoped_authorization
    }

    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }

    /// Canonical names the client holds.
    pub fn held(&self) -> impl Iterator<Item = &str> {
        self.sent.keys().map(String::as_str)
    }

    pub fn set_nonce(&mut self, nonce: String) {
        self.nonce_sent = Some(nonce);
    }

    /// Handles a later request on the stream.
    pub fn on_request(&mut self, req: &DeltaDiscoveryRequest, snap: &Snapshot) -> Reaction {
        if !self.opts.extensions.answer_repeated_subscriptions {
            return self.on_request_istiod(req, snap);
        }
        // Subscription changes count whatever else the request carries: the
        // delta protocol lets a client put them in an ACK or NACK too.
        let mut requested = Vec::new();
        let mut wildcard_added = false;
        for n in &req.resource_names_subscribe {
            if n == WILDCARD {
                wildcard_added |= !self.wildcard;
                self.wildcard = true;
            } else {
                self.names.insert(n.clone());
                requested.push(n.clone());
            }
        }
        for n in &req.resource_names_unsubscribe {
            if n == WILDCARD {
                self.wildcard = false;
            } else {
                self.names.remove(n);
                // The client drops it itself; forget it without a removal.
                self.sent.remove(n);
            }
        }
        if !requested.is_empty() || wildcard_added {
            return Reaction::Respond(self.full(snap, &requested, true));
        }
        if let Some(err) = &req.error_detail {
            return Reaction::Nack(format!("code {}: {}", err.code, err.message));
        }
        self.ack_or_ignore(req)
    }

    fn ack_or_ignore(&self, req: &DeltaDiscoveryRequest) -> Reaction {
        let acked = !req.response_nonce.is_empty()
            && self.nonce_sent.as_deref() == Some(req.response_nonce.as_str());
        if acked {
            Reaction::Ack
        } else {
            Reaction::Ignore
        }
    }

    /// istiod's `shouldRespondDelta` + `deltaWatchedResources`: a NACK or a
    /// request with an expired nonce is not answered and its subscription
    /// changes are dropped; otherwise the request is answered only if it
    /// changed the subscribed set. For Authorization the set istiod
    /// compares against is the policies the client holds (istiod replaces
    /// it with the names it sent after every response), so a workload uid
    /// subscribed again is answered again.
    fn on_request_istiod(&mut self, req: &DeltaDiscoveryRequest, snap: &Snapshot) -> Reaction {
        if let Some(err) = &req.error_detail {
            return Reaction::Nack(format!("code {}: {}", err.code, err.message));
        }
        if !req.response_nonce.is_empty()
            && self.nonce_sent.as_deref() != Some(req.response_nonce.as_str())
        {
            return Reaction::Ignore;
        }
        let all_policies = self.all_policies();
        let mut changed = false;
        let mut requested = Vec::new();
        for n in &req.resource_names_subscribe {
            if n == WILDCARD {
                changed |= !self.wildcard;
                self.wildcard = true;
            } else {
                changed |= if all_policies {
                    !self.sent.contains_key(n)
                } else {
                    self.names.insert(n.clone())
                };
                requested.push(n.clone());
            }
        }
        for n in &req.resource_names_unsubscribe {
            if n == WILDCARD {
                changed |= self.wildcard;
                self.wildcard = false;
            } else {
                changed |= if all_policies {
                    self.sent.contains_key(n)
                } else {
                    self.names.remove(n)
                };
                self.sent.remove(n);
            }
        }
        if changed {
            Reaction::Respond(self.full(snap, &requested, true))
        } else {
            self.ack_or_ignore(req)
        }
    }

    /// The response for an inventory change (`diff` between the snapshot
    /// this stream last saw and `snap`); empty when nothing it watches changed.
    pub fn on_change(&mut self, snap: &Snapshot, diff: Option<&TypeDiff>) -> Outgoing {
        match diff {
            Some(d) if self.wildcard || self.all_policies() => {
                let mut out = Outgoing::default();
                for name in &d.changed {
                    if let Some(r) = snap.resource(self.type_url, name)
                        && self.sent.get(name) != Some(&r.version)
                    {
                        self.sent.insert(name.clone(), r.version.clone());
                        out.resources.push(self.wire(r));
                    }
                }
                for name in &d.removed {
                    if self.sent.remove(name).is_some() {
                        out.removed.push(name.clone());
                    }
                }
                out
            }
            // On-demand sets are small: recompute them (an IP may now
            // resolve to another workload, a service may have new members).
            _ => self.full(snap, &[], false),
        }
    }

    /// The resource as sent: istiod sets no version on policies.
    fn wire(&self, mut r: Resource) -> Resource {
        if self.type_url == TypeUrl::Authorization && !self.opts.extensions.versioned_authorization
        {
            r.version.clear();
        }
        r
    }

    /// Recomputes what the client should hold and returns the difference.
    /// `requested` names are (re)sent even if the client should have them,
    /// or reported removed if they resolve to nothing. `request`: this
    /// answers a request (istiod then resends every policy).
    fn full(&mut self, snap: &Snapshot, requested: &[String], request: bool) -> Outgoing {
        let t = self.type_url;
        let all_policies = self.all_policies();
        let mut desired = BTreeSet::new();
        let mut forced = BTreeSet::new();
        let mut unresolved = Vec::new();
        if self.wildcard || all_policies {
            desired.extend(snap.table(t).keys().cloned());
            if all_policies && request && !self.opts.extensions.versioned_authorization {
                forced.extend(desired.iter().cloned());
            }
        } else {
            for n in &self.names {
                snap.resolve(t, n, &mut desired);
            }
            if t == TypeUrl::Authorization && self.names.iter().any(|n| is_workload_uid(snap, n)) {
                // Test-only: `raw:` policies cannot be attributed to any
                // workload, so every uid-scoped subscription carries them
                // (fault tests serve broken policies this way).
                desired.extend(raw_names(snap, t));
            }
            if t == TypeUrl::Address
                && let Some(node) = &self.opts.node_name
            {
                // istiod's AdditionalPodSubscriptions: node-local workloads.
                desired.extend(snap.workloads_on_node(node).cloned());
            }
            // Sticky: keep following what the names resolved to.
            self.names.extend(desired.iter().cloned());
        }
        for n in requested {
            let found = if all_policies {
                // istiod ignores Authorization names: one that is not a
                // policy comes back removed.
                snap.get(t, n).is_some()
            } else {
                snap.resolve(t, n, &mut forced)
            };
            if !found {
                unresolved.push(n.clone());
            }
        }
        let aliases: BTreeSet<&str> = desired
            .iter()
            .filter_map(|n| snap.get(t, n))
            .flat_map(|e| e.aliases.iter().map(String::as_str))
            .collect();

        let mut out = Outgoing::default();
        let mut sent = HashMap::with_capacity(desired.len());
        for name in &desired {
            let Some(r) = snap.resource(t, name) else {
                continue;
            };
            if forced.contains(name) || self.sent.get(name) != Some(&r.version) {
                sent.insert(name.clone(), r.version.clone());
                out.resources.push(self.wire(r));
            } else {
                sent.insert(name.clone(), r.version);
            }
        }
        let mut removed: BTreeSet<String> = self
            .sent
            .keys()
            .filter(|n| !desired.contains(*n) && !aliases.contains(n.as_str()))
            .cloned()
            .collect();
        removed.extend(
            unresolved
                .into_iter()
                .filter(|n| !aliases.contains(n.as_str())),
        );
        out.removed = removed.into_iter().collect();
        self.sent = sent;
        out
    }
}

/// Whether Authorization subscription name `name` is a workload uid (the
/// scoped form) rather than a policy's `namespace/name`: a workload of the
/// snapshot, or istiod's uid shape `<cluster>//<Kind>/<ns>/<name>` (the
/// workload may not exist yet).
fn is_workload_uid(snap: &Snapshot, name: &str) -> bool {
    name.contains("//")
        || snap
            .get(TypeUrl::Address, name)
            .is_some_and(|e| e.kind == Kind::Workload)
}

/// Names of the resources of type `t` served verbatim (inventory `raw:`).
fn raw_names(snap: &Snapshot, t: TypeUrl) -> impl Iterator<Item = String> + '_ {
    snap.table(t)
        .iter()
        .filter(|(_, e)| e.kind == Kind::Raw)
        .map(|(n, _)| n.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{self, Context};
    use crate::mode::Mode;
    use sidetunnel_proto::google::rpc::Status;

    fn opts(mode: Mode) -> Options {
        Options {
            extensions: mode.extensions(),
            node_name: None,
        }
    }

    fn extended() -> Options {
        opts(Mode::Extended)
    }

    fn istiod() -> Options {
        opts(Mode::Istiod)
    }

    const INV: &str = r#"
workloads:
  - {name: a1, namespace: ns, addresses: [10.0.0.1], services: {ns/a.ns.svc.cluster.local: {80: 8080}}}
  - {name: a2, namespace: ns, addresses: [10.0.0.2], services: {ns/a.ns.svc.cluster.local: {80: 8080}}}
  - {name: b1, namespace: ns, addresses: [10.0.0.3], labels: {app: b}}
  - {name: c1, namespace: other, addresses: [10.0.0.4], network: n2}
services:
  - {name: a, namespace: ns, vips: [172.16.0.1], ports: {80: 8080}}
  - {name: b, namespace: ns, vips: [172.16.0.2], ports: {90: 9090}, selector: {app: b}}
policies:
  - {name: p1, namespace: ns}
  - {name: p2, namespace: ns, selector: {matchLabels: {app: b}}}
"#;

    fn ctx() -> Context {
        Context {
            cluster_id: "K".into(),
            trust_domain: "cluster.local".into(),
        }
    }

    fn snap(text: &str) -> Snapshot {
        inventory::parse(&ctx(), text).unwrap()
    }

    fn req(sub: &[&str], unsub: &[&str]) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: TypeUrl::Address.as_str().into(),
            resource_names_subscribe: sub.iter().map(|s| s.to_string()).collect(),
            resource_names_unsubscribe: unsub.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn names(o: &Outgoing) -> Vec<&str> {
        o.resources.iter().map(|r| r.name.as_str()).collect()
    }

    fn respond(r: Reaction) -> Outgoing {
        match r {
            Reaction::Respond(o) => o,
            other => panic!("expected a response, got {other:?}"),
        }
    }

    #[test]
    fn wildcard_gets_everything_with_aliases() {
        for mode in Mode::ALL {
            let o = opts(mode);
            let s = snap(INV);
            let (w, out) = Watch::first(TypeUrl::Address, &req(&[], &[]), &s, &o);
            assert!(w.is_wildcard());
            assert_eq!(
                names(&out),
                [
                    "K//Pod/ns/a1",
                    "K//Pod/ns/a2",
                    "K//Pod/ns/b1",
                    "K//Pod/other/c1",
                    "ns/a.ns.svc.cluster.local",
                    "ns/b.ns.svc.cluster.local"
                ]
            );
            let c1 = &out.resources[3];
            assert_eq!(c1.aliases, ["n2/10.0.0.4"]);
            assert_eq!(out.resources[4].aliases, ["/172.16.0.1"]);
            assert!(out.removed.is_empty());
            let (w, out) = Watch::first(TypeUrl::Address, &req(&["*"], &[]), &s, &o);
            assert!(w.is_wildcard());
            assert_eq!(out.resources.len(), 6);
            let (_, out) = Watch::first(TypeUrl::Authorization, &req(&[], &[]), &s, &o);
            assert_eq!(names(&out), ["ns/p1", "ns/p2"]);
        }
    }

    #[test]
    fn on_demand_resolution() {
        for mode in Mode::ALL {
            let o = opts(mode);
            let s = snap(INV);
            // ztunnel's on-demand start: subscribe and unsubscribe "*".
            let (mut w, out) = Watch::first(TypeUrl::Address, &req(&["*"], &["*"]), &s, &o);
            assert!(!w.is_wildcard());
            assert!(out.is_empty());

            // A workload IP: the workload under its uid, alias included.
            let out = respond(w.on_request(&req(&["/10.0.0.3"], &[]), &s));
            assert_eq!(names(&out), ["K//Pod/ns/b1"]);
            assert_eq!(out.resources[0].aliases, ["/10.0.0.3"]);
            assert!(out.removed.is_empty());

            // A VIP: the service and all its workloads.
            let out = respond(w.on_request(&req(&["/172.16.0.1"], &[]), &s));
            assert_eq!(
                names(&out),
                ["K//Pod/ns/a1", "K//Pod/ns/a2", "ns/a.ns.svc.cluster.local"]
            );
            // A hostname: the selector-derived membership counts too.
            let out = respond(w.on_request(&req(&["ns/b.ns.svc.cluster.local"], &[]), &s));
            assert_eq!(names(&out), ["K//Pod/ns/b1", "ns/b.ns.svc.cluster.local"]);
            // A uid; the wrong network; an unknown IP.
            let out = respond(w.on_request(
                &req(&["K//Pod/other/c1", "/10.0.0.4", "/10.9.9.9"], &[]),
                &s,
            ));
            assert_eq!(names(&out), ["K//Pod/other/c1"]);
            assert_eq!(out.removed, ["/10.0.0.4", "/10.9.9.9"]);
            let held: BTreeSet<&str> = w.held().collect();
            assert_eq!(held.len(), 6);
        }
    }

    #[test]
    fn extended_ack_nack_and_stale_nonces() {
        let o = extended();
        let s = snap(INV);
        let (mut w, _) = Watch::first(TypeUrl::Address, &req(&[], &[]), &s, &o);
        w.set_nonce("n1".into());
        let mut ack = req(&[], &[]);
        ack.response_nonce = "n1".into();
        assert_eq!(w.on_request(&ack, &s), Reaction::Ack);
        ack.response_nonce = "n0".into();
        assert_eq!(w.on_request(&ack, &s), Reaction::Ignore);
        let mut nack = ack.clone();
        nack.response_nonce = "n1".into();
        nack.error_detail = Some(Status {
            code: 3,
            message: "bad workload".into(),
            ..Default::default()
        });
        assert_eq!(
            w.on_request(&nack, &s),
            Reaction::Nack("code 3: bad workload".into())
        );
        // Names subscribed in an ACK or a NACK are answered all the same.
        for (nonce, error) in [("n1", None), ("n1", nack.error_detail.clone())] {
            let mut r = req(&["/10.9.9.9"], &[]);
            r.response_nonce = nonce.into();
            r.error_detail = error;
            assert_eq!(respond(w.on_request(&r, &s)).removed, ["/10.9.9.9"]);
        }
        // A NACKed version is not resent on an unrelated change.
        let s2 = snap(&INV.replace("10.0.0.4]", "10.0.0.5]"));
        let d = s2.diff_from(&s);
        let out = w.on_change(&s2, Some(&d.addresses));
        assert_eq!(names(&out), ["K//Pod/other/c1"]);
    }

    #[test]
    fn reconnect_with_initial_versions() {
        for mode in Mode::ALL {
            let o = opts(mode);
            let s = snap(INV);
            let (w0, full) = Watch::first(TypeUrl::Address, &req(&[], &[]), &s, &o);
            assert!(w0.is_wildcard());
            let mut r = req(&[], &[]);
            for res in &full.resources {
                r.initial_resource_versions
                    .insert(res.name.clone(), res.version.clone());
            }
            r.initial_resource_versions
                .insert("K//Pod/ns/gone".into(), "x".into());
            // One stale version.
            r.initial_resource_versions
                .insert("K//Pod/ns/a1".into(), "old".into());
            let (_, out) = Watch::first(TypeUrl::Address, &r, &s, &o);
            assert_eq!(names(&out), ["K//Pod/ns/a1"]);
            assert_eq!(out.removed, ["K//Pod/ns/gone"]);

            // ztunnel on-demand reconnect: empty versions, requested aliases kept.
            let mut r = req(&["*"], &["*"]);
            for n in ["/10.0.0.3", "K//Pod/ns/b1", "/10.0.0.99"] {
                r.initial_resource_versions.insert(n.into(), String::new());
            }
            let (w, out) = Watch::first(TypeUrl::Address, &r, &s, &o);
            assert!(!w.is_wildcard());
            assert_eq!(names(&out), ["K//Pod/ns/b1"]);
            assert_eq!(out.removed, ["/10.0.0.99"]);
        }
    }

    #[test]
    fn changes_reach_only_subscribers() {
        for mode in Mode::ALL {
            let o = opts(mode);
            let s1 = snap(INV);
            let (mut wild, _) = Watch::first(TypeUrl::Address, &req(&[], &[]), &s1, &o);
            let (mut a_only, _) =
                Watch::first(TypeUrl::Address, &req(&["/172.16.0.1"], &[]), &s1, &o);
            let (mut c_only, _) =
                Watch::first(TypeUrl::Address, &req(&["/10.0.0.3"], &[]), &s1, &o);
            // a2 moves node, a1 is deleted, a3 is added to service a.
            let text = INV
                .replace(
                    "  - {name: a1, namespace: ns, addresses: [10.0.0.1], services: {ns/a.ns.svc.cluster.local: {80: 8080}}}\n",
                    "",
                )
                .replace(
                    "{name: a2, namespace: ns,",
                    "{name: a2, node: n9, namespace: ns,",
                )
                .replace(
                    "services:\n",
                    "  - {name: a3, namespace: ns, addresses: [10.0.0.7], services: {ns/a.ns.svc.cluster.local: {80: 8080}}}\nservices:\n",
                );
            let s2 = snap(&text);
            let d = s2.diff_from(&s1);
            let out = wild.on_change(&s2, Some(&d.addresses));
            assert_eq!(names(&out), ["K//Pod/ns/a2", "K//Pod/ns/a3"]);
            assert_eq!(out.removed, ["K//Pod/ns/a1"]);
            let out = a_only.on_change(&s2, Some(&d.addresses));
            assert_eq!(names(&out), ["K//Pod/ns/a2", "K//Pod/ns/a3"]);
            assert_eq!(out.removed, ["K//Pod/ns/a1"]);
            let out = c_only.on_change(&s2, Some(&d.addresses));
            assert!(out.is_empty(), "{out:?}");
            // Policies untouched: nothing for an Authorization watch.
            let (mut pw, _) = Watch::first(TypeUrl::Authorization, &req(&[], &[]), &s1, &o);
            assert!(pw.on_change(&s2, Some(&d.policies)).is_empty());
            // Without a diff (stream lagged) wildcard recomputes fully.
            let (mut wild2, _) = Watch::first(TypeUrl::Address, &req(&[], &[]), &s1, &o);
            let out = wild2.on_change(&s2, None);
            assert_eq!(names(&out), ["K//Pod/ns/a2", "K//Pod/ns/a3"]);
            assert_eq!(out.removed, ["K//Pod/ns/a1"]);
        }
    }

    #[test]
    fn extended_policies_for_a_workload() {
        let o = extended();
        let s = snap(&format!(
            "{INV}  - {{name: mesh, namespace: istio-system, action: Deny}}\n  - {{name: p3, namespace: other}}\n"
        ));
        let mut r = req(&["*"], &["*"]);
        r.type_url = TypeUrl::Authorization.as_str().into();
        let (mut w, out) = Watch::first(TypeUrl::Authorization, &r, &s, &o);
        assert!(out.is_empty());
        // b1 is selected by p2, lives in ns (p1), and mesh-wide policies apply.
        let out = respond(w.on_request(&req(&["K//Pod/ns/b1"], &[]), &s));
        assert_eq!(names(&out), ["istio-system/mesh", "ns/p1", "ns/p2"]);
        // a1 is not selected by p2; by name works as in istiod.
        let (mut w, _) = Watch::first(TypeUrl::Authorization, &r, &s, &o);
        let out = respond(w.on_request(&req(&["K//Pod/ns/a1", "other/p3"], &[]), &s));
        assert_eq!(names(&out), ["istio-system/mesh", "ns/p1", "other/p3"]);
    }

    #[test]
    fn extended_raw_policies_reach_every_uid_scoped_subscription() {
        let o = extended();
        let raw = "raw:\n  - {name: ns/broken, type: Authorization, base64: 'CAE='}\n  - {name: ns/x, type: Address, base64: ''}\n";
        let s = snap(&format!("{INV}{raw}"));
        let mut r = req(&["*"], &["*"]);
        r.type_url = TypeUrl::Authorization.as_str().into();
        // By uid (even one not in the inventory yet): its policies plus the
        // raw Authorization resources, never raw Addresses.
        for uid in ["K//Pod/ns/a1", "K//Pod/ns/not-yet"] {
            let (mut w, _) = Watch::first(TypeUrl::Authorization, &r, &s, &o);
            let out = respond(w.on_request(&req(&[uid], &[]), &s));
            let want: &[&str] = if uid.ends_with("a1") {
                &["ns/broken", "ns/p1"]
            } else {
                &["ns/broken"]
            };
            assert_eq!(names(&out), want, "{uid}");
        }
        // By policy name only: just that policy.
        let (mut w, _) = Watch::first(TypeUrl::Authorization, &r, &s, &o);
        let out = respond(w.on_request(&req(&["ns/p2"], &[]), &s));
        assert_eq!(names(&out), ["ns/p2"]);
        // A new raw policy is pushed to the uid-scoped watch only.
        let (mut by_uid, _) = Watch::first(TypeUrl::Authorization, &r, &s, &o);
        respond(by_uid.on_request(&req(&["K//Pod/ns/a1"], &[]), &s));
        let s2 = snap(&format!(
            "{INV}{raw}  - {{name: ns/broken2, type: Authorization, base64: ''}}\n"
        ));
        let d = s2.diff_from(&s);
        assert_eq!(
            names(&by_uid.on_change(&s2, Some(&d.policies))),
            ["ns/broken2"]
        );
        assert!(w.on_change(&s2, Some(&d.policies)).is_empty());
    }

    #[test]
    fn extended_unsubscribe_and_resubscribe() {
        let o = extended();
        let s = snap(INV);
        let (mut w, _) = Watch::first(TypeUrl::Address, &req(&["*"], &["*"]), &s, &o);
        respond(w.on_request(&req(&["/10.0.0.3"], &[]), &s));
        assert_eq!(
            w.on_request(&req(&[], &["/10.0.0.3", "K//Pod/ns/b1"]), &s),
            Reaction::Ignore
        );
        assert_eq!(w.held().count(), 0);
        // A repeated request is answered again (the client asked: it lacks it).
        let out = respond(w.on_request(&req(&["/10.0.0.3"], &[]), &s));
        assert_eq!(names(&out), ["K//Pod/ns/b1"]);
        let out = respond(w.on_request(&req(&["/10.0.0.3"], &[]), &s));
        assert_eq!(names(&out), ["K//Pod/ns/b1"]);
        // Switching to wildcard sends the rest.
        let out = respond(w.on_request(&req(&["*"], &[]), &s));
        assert_eq!(out.resources.len(), 5);
    }

    #[test]
    fn istiod_sends_every_policy_and_removes_other_names() {
        let o = istiod();
        let s = snap(&format!(
            "{INV}  - {{name: mesh, namespace: istio-system, action: Deny}}\n  - {{name: p3, namespace: other}}\n"
        ));
        let all = ["istio-system/mesh", "ns/p1", "ns/p2", "other/p3"];
        let mut r = req(&["*"], &["*"]);
        r.type_url = TypeUrl::Authorization.as_str().into();
        // On-demand start: every policy all the same, without versions.
        let (mut w, out) = Watch::first(TypeUrl::Authorization, &r, &s, &o);
        assert_eq!(names(&out), all);
        assert!(out.resources.iter().all(|r| r.version.is_empty()));
        assert!(out.removed.is_empty());
        // A workload uid: every policy again, the uid removed.
        w.set_nonce("n1".into());
        let out = respond(w.on_request(&req(&["K//Pod/ns/b1"], &[]), &s));
        assert_eq!(names(&out), all);
        assert_eq!(out.removed, ["K//Pod/ns/b1"]);
        // Asked again: answered again (istiod's set holds policy names only).
        let out = respond(w.on_request(&req(&["K//Pod/ns/b1", "other/p3"], &[]), &s));
        assert_eq!(names(&out), all);
        assert_eq!(out.removed, ["K//Pod/ns/b1"]);
        // A policy name the client holds: nothing changed, no answer.
        assert_eq!(w.on_request(&req(&["ns/p1"], &[]), &s), Reaction::Ignore);
        // A policy change reaches every client, a scoped name or not.
        let s2 = snap(&format!(
            "{INV}  - {{name: mesh, namespace: istio-system, action: Allow}}\n"
        ));
        let d = s2.diff_from(&s);
        let out = w.on_change(&s2, Some(&d.policies));
        assert_eq!(names(&out), ["istio-system/mesh"]);
        assert_eq!(out.removed, ["other/p3"]);
        // Reconnect with what it holds: everything resent, unknown names removed.
        let mut r = req(&["K//Pod/ns/b1"], &[]);
        r.type_url = TypeUrl::Authorization.as_str().into();
        r.initial_resource_versions
            .insert("ns/gone".into(), String::new());
        let (_, out) = Watch::first(TypeUrl::Authorization, &r, &s2, &o);
        assert_eq!(names(&out), ["istio-system/mesh", "ns/p1", "ns/p2"]);
        assert_eq!(out.removed, ["K//Pod/ns/b1", "ns/gone"]);
    }

    #[test]
    fn istiod_answers_only_subscription_changes() {
        let o = istiod();
        let s = snap(INV);
        let (mut w, _) = Watch::first(TypeUrl::Address, &req(&["*"], &["*"]), &s, &o);
        w.set_nonce("n1".into());
        let out = respond(w.on_request(&req(&["/10.0.0.3"], &[]), &s));
        assert_eq!(names(&out), ["K//Pod/ns/b1"]);
        // Subscribed already: istiod does not answer.
        assert_eq!(
            w.on_request(&req(&["/10.0.0.3"], &[]), &s),
            Reaction::Ignore
        );
        assert_eq!(
            w.on_request(&req(&["K//Pod/ns/b1"], &[]), &s),
            Reaction::Ignore
        );
        // Unsubscribing is answered (empty), then asking again is answered.
        let out = respond(w.on_request(&req(&[], &["/10.0.0.3"]), &s));
        assert!(out.is_empty(), "{out:?}");
        let out = respond(w.on_request(&req(&["/10.0.0.3"], &[]), &s));
        assert_eq!(names(&out), ["K//Pod/ns/b1"]);
        // A NACK, or an expired nonce, drops the request's subscriptions.
        let mut nack = req(&["/10.0.0.1"], &[]);
        nack.response_nonce = "n1".into();
        nack.error_detail = Some(Status {
            code: 3,
            message: "bad".into(),
            ..Default::default()
        });
        assert!(matches!(w.on_request(&nack, &s), Reaction::Nack(_)));
        let mut stale = req(&["/10.0.0.1"], &[]);
        stale.response_nonce = "n0".into();
        assert_eq!(w.on_request(&stale, &s), Reaction::Ignore);
        // Still unsubscribed: a plain request for it is a change.
        let mut ack = req(&["/10.0.0.1"], &[]);
        ack.response_nonce = "n1".into();
        assert_eq!(names(&respond(w.on_request(&ack, &s))), ["K//Pod/ns/a1"]);
    }

    #[test]
    fn node_name_brings_every_workload_on_the_node() {
        let s = snap(
            &INV.replace(
                "{name: a2, namespace: ns,",
                "{name: a2, node: v1, namespace: ns,",
            )
            .replace(
                "{name: c1, namespace: other,",
                "{name: c1, node: v1, namespace: other,",
            ),
        );
        for mode in Mode::ALL {
            let mut o = opts(mode);
            o.node_name = Some("v1".into());
            let (mut w, out) = Watch::first(TypeUrl::Address, &req(&["*"], &["*"]), &s, &o);
            assert_eq!(names(&out), ["K//Pod/ns/a2", "K//Pod/other/c1"], "{mode}");
            let out = respond(w.on_request(&req(&["/10.0.0.3"], &[]), &s));
            assert_eq!(names(&out), ["K//Pod/ns/b1"], "{mode}");
            // Without NODE_NAME: nothing at start.
            let (_, out) = Watch::first(TypeUrl::Address, &req(&["*"], &["*"]), &s, &opts(mode));
            assert!(out.is_empty(), "{mode}");
        }
    }
}
