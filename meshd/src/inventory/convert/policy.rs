//! One AuthorizationPolicy of the inventory converted into Istio's
//! `Authorization` proto (rules, matches, string and CIDR matches), and
//! which workloads a selector policy selects.

use sidetunnel_proto::istio::security::{
    self as sec, Authorization, ServiceAccountMatch, StringMatch, string_match::MatchType,
};

use super::fields::{enum_value, ip_bytes, parse_ip, port, required};
use super::{ROOT_NAMESPACE, Result};
use crate::inventory::model;

/// AuthorizationPolicy string match: `abc*` prefix, `*abc` suffix, `*`
/// presence, else exact.
pub(super) fn string_match(s: &str) -> StringMatch {
    let m = if s == "*" {
        MatchType::Presence(())
    } else if let Some(p) = s.strip_suffix('*') {
        MatchType::Prefix(p.into())
    } else if let Some(p) = s.strip_prefix('*') {
        MatchType::Suffix(p.into())
    } else {
        MatchType::Exact(s.into())
    };
    StringMatch {
        match_type: Some(m),
    }
}

pub(super) fn cidr(field: &str, s: &str) -> Result<sec::Address> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => {
            let ip = parse_ip(field, ip)?;
            let len: u32 = len
                .parse()
                .map_err(|_| format!("{field}: invalid prefix length in {s:?}"))?;
            (ip, len)
        }
        None => {
            let ip = parse_ip(field, s)?;
            (ip, if ip.is_ipv4() { 32 } else { 128 })
        }
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(format!("{field}: prefix length {len} too long in {s:?}"));
    }
    Ok(sec::Address {
        address: ip_bytes(ip),
        length: len,
    })
}

pub(super) fn sa_match(field: &str, s: &str) -> Result<ServiceAccountMatch> {
    let (ns, sa) = s
        .split_once('/')
        .filter(|(n, a)| !n.is_empty() && !a.is_empty())
        .ok_or_else(|| format!("{field}: {s:?} is not namespace/serviceaccount"))?;
    Ok(ServiceAccountMatch {
        namespace: ns.into(),
        service_account: sa.into(),
    })
}

pub(super) fn convert_match(field: &str, m: &model::Match) -> Result<sec::Match> {
    let strings = |v: &[String]| v.iter().map(|s| string_match(s)).collect();
    let cidrs = |name: &str, v: &[String]| -> Result<Vec<sec::Address>> {
        v.iter()
            .enumerate()
            .map(|(i, s)| cidr(&format!("{field}.{name}[{i}]"), s))
            .collect()
    };
    let sas = |name: &str, v: &[String]| -> Result<Vec<ServiceAccountMatch>> {
        v.iter()
            .enumerate()
            .map(|(i, s)| sa_match(&format!("{field}.{name}[{i}]"), s))
            .collect()
    };
    let port_list = |name: &str, v: &[u32]| -> Result<Vec<u32>> {
        v.iter()
            .map(|p| port(&format!("{field}.{name}"), *p))
            .collect()
    };
    Ok(sec::Match {
        namespaces: strings(&m.namespaces),
        not_namespaces: strings(&m.not_namespaces),
        service_accounts: sas("serviceAccounts", &m.service_accounts)?,
        not_service_accounts: sas("notServiceAccounts", &m.not_service_accounts)?,
        principals: strings(&m.principals),
        not_principals: strings(&m.not_principals),
        source_ips: cidrs("sourceIps", &m.source_ips)?,
        not_source_ips: cidrs("notSourceIps", &m.not_source_ips)?,
        destination_ips: cidrs("destinationIps", &m.destination_ips)?,
        not_destination_ips: cidrs("notDestinationIps", &m.not_destination_ips)?,
        destination_ports: port_list("destinationPorts", &m.destination_ports)?,
        not_destination_ports: port_list("notDestinationPorts", &m.not_destination_ports)?,
        ..Default::default()
    })
}

pub(super) fn convert_policy(p: &model::Policy) -> Result<Authorization> {
    required("name", &p.name)?;
    required("namespace", &p.namespace)?;
    let scope = match &p.scope {
        Some(s) => enum_value(
            "scope",
            s,
            sec::Scope::from_str_name,
            &["Global", "Namespace", "WorkloadSelector"],
        )?,
        None if p.selector.is_some() => sec::Scope::WorkloadSelector.into(),
        None if p.namespace == ROOT_NAMESPACE => sec::Scope::Global.into(),
        None => sec::Scope::Namespace.into(),
    };
    let is_selector = scope == i32::from(sec::Scope::WorkloadSelector);
    match &p.selector {
        None if is_selector => return Err("scope WorkloadSelector needs a selector".into()),
        Some(_) if !is_selector => {
            return Err("a selector is only valid with scope WorkloadSelector".into());
        }
        Some(s) if s.match_labels.is_empty() && s.workloads.is_empty() => {
            return Err("selector: set matchLabels and/or workloads".into());
        }
        _ => {}
    }
    let rules = p
        .rules
        .iter()
        .enumerate()
        .map(|(r, rule)| {
            Ok(sec::Rule {
                clauses: rule
                    .clauses
                    .iter()
                    .enumerate()
                    .map(|(c, clause)| {
                        Ok(sec::Clause {
                            matches: clause
                                .matches
                                .iter()
                                .enumerate()
                                .map(|(m, mm)| {
                                    convert_match(
                                        &format!("rules[{r}].clauses[{c}].matches[{m}]"),
                                        mm,
                                    )
                                })
                                .collect::<Result<_>>()?,
                        })
                    })
                    .collect::<Result<_>>()?,
            })
        })
        .collect::<Result<_>>()?;
    Ok(Authorization {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        scope,
        action: match &p.action {
            Some(a) => enum_value("action", a, sec::Action::from_str_name, &["Allow", "Deny"])?,
            None => sec::Action::Allow.into(),
        },
        rules,
        dry_run: p.dry_run,
        ..Default::default()
    })
}

pub(super) fn selects(p: &model::Policy, w: &model::Workload) -> bool {
    let Some(sel) = &p.selector else {
        return false;
    };
    if p.namespace != ROOT_NAMESPACE && p.namespace != w.namespace {
        return false;
    }
    let labels_ok = sel
        .match_labels
        .iter()
        .all(|(k, v)| w.labels.get(k) == Some(v));
    let names_ok = sel.workloads.is_empty() || sel.workloads.contains(&w.name);
    labels_ok && names_ok
}
