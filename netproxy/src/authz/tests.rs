//! Exhaustive unit tests of the L4 authorization semantics (mirrors the
//! cases ztunnel checks, plus ordering, dry-run and scope-free evaluation).

use std::net::IpAddr;
use std::sync::Arc;

use super::*;
use crate::state::{IpPrefix, PolicyScope};

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("td", ns, sa).unwrap()
}

fn conn<'a>(src: &str, dst: &str, ident: Option<&'a Identity>) -> Connection<'a> {
    Connection {
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        src_identity: ident,
    }
}

fn prefix(s: &str) -> IpPrefix {
    let (a, l) = s.split_once('/').unwrap();
    IpPrefix {
        address: a.parse::<IpAddr>().unwrap(),
        length: l.parse().unwrap(),
    }
}

fn policy(name: &str, action: PolicyAction, rules: Vec<Vec<Vec<PolicyMatch>>>) -> Arc<Policy> {
    Arc::new(Policy {
        name: name.into(),
        namespace: "ns".into(),
        scope: PolicyScope::Namespace,
        action,
        rules,
        dry_run: false,
    })
}

fn single(m: PolicyMatch) -> Vec<Vec<Vec<PolicyMatch>>> {
    vec![vec![vec![m]]]
}

fn allow_one(m: PolicyMatch) -> Policy {
    (*policy("p", PolicyAction::Allow, single(m))).clone()
}

/// (plaintext 127.0.0.1 → 127.0.0.2:8080, mTLS ns/account same addresses,
/// mTLS ns-alt/sa-alt 127.0.0.3 → 127.0.0.4:9090)
fn check_three(m: PolicyMatch, want: [bool; 3]) {
    let (a, b) = (id("namespace", "account"), id("ns-alt", "sa-alt"));
    let conns = [
        conn("127.0.0.1:1234", "127.0.0.2:8080", None),
        conn("127.0.0.1:1234", "127.0.0.2:8080", Some(&a)),
        conn("127.0.0.3:1234", "127.0.0.4:9090", Some(&b)),
    ];
    let p = allow_one(m.clone());
    for (c, w) in conns.iter().zip(want) {
        assert_eq!(matches(&p, c), w, "{m:?} on {c}");
    }
}

fn exact(s: &str) -> StringMatch {
    StringMatch::Exact(s.into())
}

#[test]
fn namespaces_and_negation() {
    let v = vec![exact("namespace")];
    check_three(
        PolicyMatch {
            namespaces: v.clone(),
            ..Default::default()
        },
        [false, true, false],
    );
    check_three(
        PolicyMatch {
            not_namespaces: v,
            ..Default::default()
        },
        [true, false, true],
    );
}

#[test]
fn service_accounts_and_negation() {
    let v = vec![ServiceAccountMatch {
        namespace: "namespace".into(),
        service_account: "account".into(),
    }];
    check_three(
        PolicyMatch {
            service_accounts: v.clone(),
            ..Default::default()
        },
        [false, true, false],
    );
    check_three(
        PolicyMatch {
            not_service_accounts: v,
            ..Default::default()
        },
        [true, false, true],
    );
}

#[test]
fn principals_and_negation() {
    let v = vec![exact("td/ns/namespace/sa/account")];
    check_three(
        PolicyMatch {
            principals: v.clone(),
            ..Default::default()
        },
        [false, true, false],
    );
    check_three(
        PolicyMatch {
            not_principals: v,
            ..Default::default()
        },
        [true, false, true],
    );
}

#[test]
fn principal_string_match_kinds() {
    let cases = [
        (
            StringMatch::Prefix("td/ns/namespace/".into()),
            [false, true, false],
        ),
        (
            StringMatch::Suffix("/sa/sa-alt".into()),
            [false, false, true],
        ),
        (StringMatch::Presence, [false, true, true]),
        // With the scheme written out it never matches: Istio strips it.
        (
            exact("spiffe://td/ns/namespace/sa/account"),
            [false, false, false],
        ),
    ];
    for (m, want) in cases {
        check_three(
            PolicyMatch {
                principals: vec![m],
                ..Default::default()
            },
            want,
        );
    }
    // STRICT mTLS as istiod converts it: deny anything without a principal.
    check_three(
        PolicyMatch {
            not_principals: vec![StringMatch::Presence],
            ..Default::default()
        },
        [true, false, false],
    );
}

#[test]
fn namespace_string_match_kinds() {
    check_three(
        PolicyMatch {
            namespaces: vec![StringMatch::Prefix("ns-".into())],
            ..Default::default()
        },
        [false, false, true],
    );
    check_three(
        PolicyMatch {
            namespaces: vec![StringMatch::Presence],
            ..Default::default()
        },
        [false, true, true],
    );
}

#[test]
fn source_ips_and_negation() {
    let v = vec![prefix("127.0.0.1/32")];
    check_three(
        PolicyMatch {
            source_ips: v.clone(),
            ..Default::default()
        },
        [true, true, false],
    );
    check_three(
        PolicyMatch {
            not_source_ips: v,
            ..Default::default()
        },
        [false, false, true],
    );
    check_three(
        PolicyMatch {
            source_ips: vec![prefix("127.0.0.0/30")],
            ..Default::default()
        },
        [true, true, true],
    );
}

#[test]
fn destination_ips_and_negation() {
    let v = vec![prefix("127.0.0.2/32")];
    check_three(
        PolicyMatch {
            destination_ips: v.clone(),
            ..Default::default()
        },
        [true, true, false],
    );
    check_three(
        PolicyMatch {
            not_destination_ips: v,
            ..Default::default()
        },
        [false, false, true],
    );
}

#[test]
fn destination_ports_and_negation() {
    check_three(
        PolicyMatch {
            destination_ports: vec![8080],
            ..Default::default()
        },
        [true, true, false],
    );
    check_three(
        PolicyMatch {
            not_destination_ports: vec![8080],
            ..Default::default()
        },
        [false, false, true],
    );
    check_three(
        PolicyMatch {
            destination_ports: vec![1, 9090],
            ..Default::default()
        },
        [false, false, true],
    );
}

#[test]
fn ipv6_prefixes_and_family_mismatch() {
    let p = allow_one(PolicyMatch {
        source_ips: vec![prefix("fd00::/64")],
        ..Default::default()
    });
    assert!(matches(&p, &conn("[fd00::5]:1", "[fd00::9]:80", None)));
    assert!(!matches(&p, &conn("[fd01::5]:1", "[fd00::9]:80", None)));
    assert!(!matches(&p, &conn("10.0.0.1:1", "10.0.0.2:80", None)));
}

#[test]
fn positive_and_negative_in_one_field_both_apply() {
    // Prefix allows the namespace family, the negation carves one out.
    let m = PolicyMatch {
        namespaces: vec![StringMatch::Prefix("ns".into())],
        not_namespaces: vec![exact("ns-alt")],
        ..Default::default()
    };
    let p = allow_one(m);
    let (a, b) = (id("ns-one", "x"), id("ns-alt", "x"));
    assert!(matches(&p, &conn("1.1.1.1:1", "2.2.2.2:2", Some(&a))));
    assert!(!matches(&p, &conn("1.1.1.1:1", "2.2.2.2:2", Some(&b))));
}

#[test]
fn fields_within_a_match_are_anded() {
    let p = allow_one(PolicyMatch {
        namespaces: vec![exact("namespace")],
        destination_ports: vec![8080],
        ..Default::default()
    });
    let a = id("namespace", "account");
    assert!(matches(&p, &conn("1.1.1.1:1", "2.2.2.2:8080", Some(&a))));
    assert!(!matches(&p, &conn("1.1.1.1:1", "2.2.2.2:9090", Some(&a))));
}

#[test]
fn empty_structures() {
    let plain = conn("127.0.0.1:1", "127.0.0.2:2", None);
    // A clause whose only match is empty does not match.
    assert!(!matches(&allow_one(PolicyMatch::default()), &plain));
    // An empty clause matches; a rule without clauses matches.
    assert!(matches(
        &policy("e", PolicyAction::Allow, vec![vec![vec![]]]),
        &plain
    ));
    assert!(matches(
        &policy("e", PolicyAction::Allow, vec![vec![]]),
        &plain
    ));
    // A policy without rules never matches.
    assert!(!matches(&policy("e", PolicyAction::Allow, vec![]), &plain));
    // An empty match next to a real one is skipped, not a wildcard.
    let p = policy(
        "e",
        PolicyAction::Allow,
        vec![vec![vec![
            PolicyMatch::default(),
            PolicyMatch {
                destination_ports: vec![9],
                ..Default::default()
            },
        ]]],
    );
    assert!(!matches(&p, &plain));
    assert!(matches(&p, &conn("127.0.0.1:1", "127.0.0.2:9", None)));
}

#[test]
fn matches_in_clause_are_ored_and_clauses_anded() {
    let ns = |n: &str| PolicyMatch {
        namespaces: vec![exact(n)],
        ..Default::default()
    };
    let port = PolicyMatch {
        destination_ports: vec![80],
        ..Default::default()
    };
    let p = policy(
        "n",
        PolicyAction::Allow,
        vec![vec![vec![ns("a"), ns("b")], vec![port]]],
    );
    let (a, b, bad) = (id("a", "s"), id("b", "s"), id("bad", "s"));
    assert!(matches(&p, &conn("1.1.1.1:1", "2.2.2.2:80", Some(&a))));
    assert!(matches(&p, &conn("1.1.1.1:1", "2.2.2.2:80", Some(&b))));
    assert!(!matches(&p, &conn("1.1.1.1:1", "2.2.2.2:80", Some(&bad))));
    assert!(!matches(&p, &conn("1.1.1.1:1", "2.2.2.2:81", Some(&a))));
}

#[test]
fn rules_are_ored() {
    let ns = |n: &str| {
        vec![vec![PolicyMatch {
            namespaces: vec![exact(n)],
            ..Default::default()
        }]]
    };
    let p = policy("r", PolicyAction::Allow, vec![ns("a"), ns("b")]);
    let (a, b, c) = (id("a", "s"), id("b", "s"), id("c", "s"));
    assert!(matches(&p, &conn("1.1.1.1:1", "2.2.2.2:80", Some(&a))));
    assert!(matches(&p, &conn("1.1.1.1:1", "2.2.2.2:80", Some(&b))));
    assert!(!matches(&p, &conn("1.1.1.1:1", "2.2.2.2:80", Some(&c))));
}

fn sa_rule(sa: &str) -> Vec<Vec<Vec<PolicyMatch>>> {
    single(PolicyMatch {
        service_accounts: vec![ServiceAccountMatch {
            namespace: "ns".into(),
            service_account: sa.into(),
        }],
        ..Default::default()
    })
}

#[test]
fn decision_order() {
    let (good, denied, other) = (id("ns", "good"), id("ns", "denyacct"), id("ns", "other"));
    let c = |i| conn("10.0.0.1:5000", "10.0.0.2:80", Some(i));
    let allow = policy("allow", PolicyAction::Allow, sa_rule("good"));
    let allow_denied = policy("allow-denied", PolicyAction::Allow, sa_rule("denyacct"));
    let deny = policy("deny", PolicyAction::Deny, sa_rule("denyacct"));

    // No policies: allow.
    assert_eq!(check(&[], &c(&other)), Ok(()));
    // Only DENY policies that do not match: allow.
    assert_eq!(check(std::slice::from_ref(&deny), &c(&other)), Ok(()));
    // Any ALLOW policy: default deny for non-matching.
    assert_eq!(
        check(std::slice::from_ref(&allow), &c(&other)),
        Err(Denied::NotAllowed)
    );
    assert_eq!(check(std::slice::from_ref(&allow), &c(&good)), Ok(()));
    // DENY wins over a matching ALLOW, whatever the order.
    for set in [
        vec![allow_denied.clone(), deny.clone()],
        vec![deny.clone(), allow_denied.clone()],
    ] {
        assert_eq!(
            check(&set, &c(&denied)),
            Err(Denied::ExplicitDeny("ns/deny".into()))
        );
    }
    // Several ALLOW policies: any may match.
    assert_eq!(
        check(&[allow.clone(), allow_denied.clone()], &c(&good)),
        Ok(())
    );
    // Plaintext against an identity-based ALLOW: denied.
    assert_eq!(
        check(&[allow], &conn("10.0.0.1:5000", "10.0.0.2:80", None)),
        Err(Denied::NotAllowed)
    );
}

#[test]
fn dry_run_is_never_enforced() {
    let dry = |action, rules| {
        let mut p = (*policy("dry", action, rules)).clone();
        p.dry_run = true;
        Arc::new(p)
    };
    let wildcard = vec![vec![vec![]]];
    let i = id("ns", "x");
    let c = conn("10.0.0.1:1", "10.0.0.2:80", Some(&i));
    // A matching dry-run DENY does not deny.
    assert_eq!(
        check(&[dry(PolicyAction::Deny, wildcard.clone())], &c),
        Ok(())
    );
    // A non-matching dry-run ALLOW does not turn on default deny.
    assert_eq!(
        check(&[dry(PolicyAction::Allow, sa_rule("nobody"))], &c),
        Ok(())
    );
    // Dry-run ALLOW next to an enforced one that does not match: still denied.
    assert_eq!(
        check(
            &[
                dry(PolicyAction::Allow, wildcard),
                policy("real", PolicyAction::Allow, sa_rule("nobody"))
            ],
            &c
        ),
        Err(Denied::NotAllowed)
    );
}

#[test]
fn connection_display_names_identity() {
    let i = id("ns", "sa");
    let s = conn("10.0.0.1:1", "10.0.0.2:80", Some(&i)).to_string();
    assert_eq!(s, "10.0.0.1:1(spiffe://td/ns/ns/sa/sa)->10.0.0.2:80");
}
