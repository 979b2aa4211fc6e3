//! The paper projection: scenario C's measured per-object costs scaled to
//! 50,000 pods / 10,000 services, as a Markdown table and JSON.

use std::fmt::Write as _;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use sidetunnel_meshd::scale;

use super::CLUSTER_K;
use super::report::{bytes, num};

/// Target of the paper projection.
const PROJECT_PODS: f64 = 50_000.0;
const PROJECT_SERVICES: f64 = 10_000.0;

/// Paper projection to 50,000 pods / 10,000 services from scenario C's
/// measured per-object costs (same shape: 5 pods per service, policies in
/// proportion to services, each pod talking to 10 services drawn
/// uniformly, so each service has pods × 10 / services subscribers).
pub(super) fn project(c: &Value) -> Result<(String, Value)> {
    let o = &c["model"]["per_object"];
    let w = num(&o["workload"], "workload")?;
    let s = num(&o["service"], "service")?;
    let p = num(&o["policy"], "policy")?;
    let ea = num(&o["address_envelope"], "envelope")?;
    let ez = num(&o["authorization_envelope"], "envelope")?;
    let removal = num(&o["workload_removal"], "removal")?;
    let scale_up = PROJECT_SERVICES / num(&c["services"], "services")?;
    let policies = num(&o["policies"], "policies")? * scale_up;
    let pods_per_service = PROJECT_PODS / PROJECT_SERVICES;
    let k = CLUSTER_K as f64;
    let scoped10 = c["scoped"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["k"] == json!(CLUSTER_K))
        .context("no scoped row with 10 services in scenario C")?;
    let own_policies = num(&scoped10["policies"], "policies")?;

    let full = ea + PROJECT_PODS * w + PROJECT_SERVICES * s + ez + policies * p;
    let scoped = w + k * (s + pods_per_service * w) + own_policies * p + (1.0 + k) * ea + ez;
    let churned = PROJECT_PODS / 100.0;
    let one = 2.0 * ea + removal + w;
    let subscribers = PROJECT_PODS * k / PROJECT_SERVICES;
    let study = scale::study("C").context("study row")?;
    let v = json!({
        "pods": PROJECT_PODS,
        "services": PROJECT_SERVICES,
        "full_bytes_per_proxy": full,
        "scoped_bytes_per_proxy": scoped,
        "full_sync_wildcard": full * PROJECT_PODS,
        "full_sync_scoped": scoped * PROJECT_PODS,
        "churn_push_wildcard": churned * one * (PROJECT_PODS - 1.0),
        "churn_push_scoped": churned * one * subscribers,
        "envoy_sidecar_linear": study.envoy_sidecar.total as f64 * scale_up,
        "ztunnel_sidecar_linear": study.ztunnel_sidecar.total as f64 * scale_up,
    });
    let mut md = String::new();
    writeln!(
        md,
        "\n### Paper projection: {PROJECT_PODS:.0} pods / {PROJECT_SERVICES:.0} services (from scenario C's per-object costs)\n"
    )?;
    md.push_str("| | per proxy | one full sync, all pods | pushed when 1% of pods are replaced |\n| --- | --- | --- | --- |\n");
    let row = |md: &mut String, name: &str, per: f64, churn: Option<f64>| {
        writeln!(
            md,
            "| {name} | {} | {} | {} |",
            bytes(per),
            bytes(per * PROJECT_PODS),
            churn.map_or_else(|| "–".to_string(), bytes)
        )
    };
    row(
        &mut md,
        "Envoy sidecar (study ×10, linear)",
        num(&v["envoy_sidecar_linear"], "envoy")?,
        None,
    )?;
    row(
        &mut md,
        "ztunnel sidecar (study ×10, linear)",
        num(&v["ztunnel_sidecar_linear"], "ztunnel")?,
        None,
    )?;
    row(
        &mut md,
        "sidetunnel wildcard",
        full,
        Some(num(&v["churn_push_wildcard"], "churn")?),
    )?;
    row(
        &mut md,
        "sidetunnel scoped (pod → 10 services)",
        scoped,
        Some(num(&v["churn_push_scoped"], "churn")?),
    )?;
    writeln!(
        md,
        "\nPer object (scenario C, bytes inside a response): workload {w:.0}, service {s:.0}, policy {p:.0}, workload removal {removal:.0}, response envelope {ea:.0}."
    )?;
    Ok((md, v))
}
