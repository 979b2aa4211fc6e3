//! One scenario's results as Markdown in the study's shape: config bytes
//! per client kind next to the study's rows, and how scoped config spreads
//! over all pods.

use std::fmt::Write as _;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use sidetunnel_meshd::scale::{self, Scenario, StudyRow};

use super::CLUSTER_K;

/// Bytes with the study's units (kB = 1000 B).
pub(super) fn bytes(n: f64) -> String {
    match n {
        n if n >= 1e9 => format!("{:.2} GB", n / 1e9),
        n if n >= 1e6 => format!("{:.2} MB", n / 1e6),
        n if n >= 1e3 => format!("{:.1} kB", n / 1e3),
        n => format!("{n:.0} B"),
    }
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "–".to_string(), |n| bytes(n as f64))
}

pub(super) fn num(v: &Value, what: &str) -> Result<f64> {
    v.as_f64().with_context(|| format!("{what} missing in {v}"))
}

fn study_row(name: &str, r: &StudyRow) -> String {
    format!(
        "| {name} | {} | {} | {} | {} | {} | {} |\n",
        opt(r.wds),
        opt(r.cds),
        opt(r.eds),
        opt(r.lds),
        opt(r.rds),
        bytes(r.total as f64)
    )
}

pub(super) fn markdown(sc: &Scenario, r: &Value) -> Result<String> {
    let study = scale::study(sc.name).context("study row")?;
    let mut md = String::new();
    let pods = sc.pods as f64;
    writeln!(
        md,
        "\n### Scenario {}: {} services / {} pods\n",
        sc.name, sc.services, sc.pods
    )?;
    md.push_str("| bytes per proxy | WDS | CDS | EDS | LDS | RDS | total |\n");
    md.push_str("| --- | --- | --- | --- | --- | --- | --- |\n");
    md.push_str(&study_row("Envoy sidecar (study)", &study.envoy_sidecar));
    md.push_str(&study_row(
        "ztunnel sidecar (study)",
        &study.ztunnel_sidecar,
    ));
    let row = |label: String, v: &Value| -> Result<String> {
        Ok(format!(
            "| {label} | {} | – | – | – | – | {} |\n",
            bytes(num(&v["address_bytes"], "address_bytes")?),
            bytes(num(&v["bytes"], "bytes")?)
        ))
    };
    let w = &r["wildcard"];
    md.push_str(&row("sidetunnel, full WDS (wildcard)".into(), w)?);
    for s in r["scoped"].as_array().into_iter().flatten() {
        let k = num(&s["k"], "k")?;
        md.push_str(&row(
            format!(
                "sidetunnel, scoped: pod → {k} service{}",
                if k == 1.0 { "" } else { "s" }
            ),
            s,
        )?);
    }
    md.push_str("\n(sidetunnel totals include the Authorization resources; WDS = Address.)\n\n");
    md.push_str(&spread_table(r, sc.pods)?);

    let full = num(&w["address_bytes"], "address_bytes")?;
    let scoped10 = r["scoped"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["k"] == json!(CLUSTER_K));
    let a = &r["apply"];
    let m = &r["model"]["cluster"];
    md.push_str("| measure | value |\n| --- | --- |\n");
    let mut line = |k: &str, v: String| writeln!(md, "| {k} | {v} |");
    if let Some(s) = scoped10 {
        let b = num(&s["bytes"], "bytes")?;
        line(
            "scoped config (pod → 10 services) / full WDS, bench pod",
            format!("{:.2} % ({} / {})", 100.0 * b / full, bytes(b), bytes(full)),
        )?;
    }
    let mean = r["model"]["spread"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["k"] == json!(CLUSTER_K))
        .map(|s| num(&s["mean"], "mean"))
        .transpose()?;
    if let Some(mean) = mean {
        line(
            "scoped config (pod → 10 services) / full WDS, mean over all pods",
            format!(
                "{:.2} % ({} / {})",
                100.0 * mean / full,
                bytes(mean),
                bytes(full)
            ),
        )?;
    }
    line(
        "decode + apply full snapshot, one core (median)",
        format!("{:.1} ms", num(&a["full_apply_ms_median"], "full apply")?),
    )?;
    line(
        "decode + apply one incremental update (median)",
        format!("{:.1} µs", num(&a["update_apply_us_median"], "update")?),
    )?;
    let rss = |v: &Value| -> Result<String> {
        Ok(format!(
            "{:.1} MB: heap+stacks {:.2} MB (before connecting {:.2} MB), binary's pages {:.1} MB",
            num(&v["rss_kb"], "rss")? / 1024.0,
            num(&v["rss_anon_kb"], "rss")? / 1024.0,
            num(&v["rss_anon_start_kb"], "rss")? / 1024.0,
            num(&v["rss_file_kb"], "rss")? / 1024.0,
        ))
    };
    line("xds_probe RSS after sync, full config", rss(w)?)?;
    if let Some(s) = scoped10 {
        line("xds_probe RSS after sync, scoped (10 services)", rss(s)?)?;
    }
    for p in r["proxy"].as_array().into_iter().flatten() {
        let what = if p["mode"] == json!("wildcard") {
            "full config (wildcard)".to_string()
        } else {
            format!("scoped, on-demand ({} services prefetched)", p["k"])
        };
        line(
            &format!("sidetunnel-proxy (release) RSS after sync, {what}"),
            format!(
                "{:.1} MB: RssAnon {:.2} MB, RssFile {:.2} MB ({} threads; received {}: {} workloads, {} services, {} policies)",
                num(&p["rss_kb"], "rss")? / 1024.0,
                num(&p["rss_anon_kb"], "rss")? / 1024.0,
                num(&p["rss_file_kb"], "rss")? / 1024.0,
                p["threads"],
                bytes(num(&p["bytes"], "bytes")?),
                p["workloads"],
                p["services"],
                p["policies"],
            ),
        )?;
    }
    line(
        "cluster: one full sync of all pods, Envoy sidecar (study)",
        bytes(study.envoy_sidecar.total as f64 * pods),
    )?;
    line(
        "cluster: one full sync of all pods, ztunnel sidecar (study)",
        bytes(study.ztunnel_sidecar.total as f64 * pods),
    )?;
    line(
        "cluster: one full sync of all pods, sidetunnel wildcard",
        bytes(num(&m["full_sync_wildcard"], "full sync")?),
    )?;
    line(
        "cluster: one full sync of all pods, sidetunnel scoped (each pod → 10 services)",
        bytes(num(&m["full_sync_scoped"], "scoped sync")?),
    )?;
    let churned = num(&m["churned_pods"], "churned")?;
    line(
        &format!("cluster: pushed when 1% of pods ({churned}) are replaced, wildcard"),
        bytes(num(&m["churn_push_wildcard"], "churn")?),
    )?;
    line(
        &format!("cluster: pushed when 1% of pods ({churned}) are replaced, scoped"),
        format!(
            "{} (to {} of {} proxies)",
            bytes(num(&m["churn_push_scoped"], "churn")?),
            m["churn_receivers_scoped"],
            sc.pods
        ),
    )?;
    Ok(md)
}

/// How scoped bytes spread over all pods (the model's `spread`), with the
/// bench pod's own bytes and rank.
fn spread_table(r: &Value, pods: usize) -> Result<String> {
    let mut md = String::new();
    let pod = &r["model"]["pod"]["index"];
    writeln!(
        md,
        "| scoped config over all {pods} pods | bench pod (no. {pod}) | rank | min | p10 | median | mean | p90 | max |"
    )?;
    md.push_str("| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for s in r["model"]["spread"].as_array().into_iter().flatten() {
        let Some(mine) = r["model"]["scoped"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["k"] == s["k"])
        else {
            continue;
        };
        let b = |k: &str| -> Result<String> { Ok(bytes(num(&s[k], k)?)) };
        writeln!(
            md,
            "| pod → {} service{} | {} | {} of {pods} below | {} | {} | {} | {} | {} | {} |",
            s["k"],
            if s["k"] == json!(1) { "" } else { "s" },
            bytes(num(&mine["bytes"], "bytes")?),
            mine["pods_below"],
            b("min")?,
            b("p10")?,
            b("median")?,
            b("mean")?,
            b("p90")?,
            b("max")?,
        )?;
    }
    md.push('\n');
    Ok(md)
}
