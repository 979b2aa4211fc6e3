//! The data-plane bench's output: medians per route, a Markdown table with
//! ztunnel's reference figures from issue 7 beside ours, and one JSON line
//! with every sample.

use std::fmt::Write as _;

use serde_json::{Map, Value, json};

use super::{Plan, Samples, Series};

/// The bench's result.
#[derive(Debug, Clone)]
pub struct Report {
    pub markdown: String,
    /// One line: `{"bench":"dataplane","meta":{…},"metrics":{…}}`.
    pub json: Value,
}

/// How the mesh figure is compared with the direct one.
#[derive(Clone, Copy)]
enum Cmp {
    /// mesh / direct (rates and throughput).
    Ratio,
    /// mesh − direct (latencies).
    Added,
    /// No direct figure (the proxies' own costs).
    MeshOnly,
}

struct Row {
    label: String,
    key: &'static str,
    unit: &'static str,
    decimals: usize,
    cmp: Cmp,
    /// ztunnel's figure from issue 7 (same kind of machine), or istio.io's.
    reference: &'static str,
}

fn rows(plan: &Plan) -> Vec<Row> {
    let bulk = plan.bulk.as_secs_f64();
    let iperf = bulk.ceil().max(1.0);
    let lat = plan.latency.as_secs_f64();
    let r = |label: String, key, unit, decimals, cmp, reference| Row {
        label,
        key,
        unit,
        decimals,
        cmp,
        reference,
    };
    use Cmp::*;
    let bulk_ref = "17–20 → 3.1–3.5 Gbit/s (0.18×)";
    vec![
        r(
            format!("bulk, single stream ({bulk} s, 128 KiB writes)"),
            "bulk_1_gbps",
            "Gbit/s",
            2,
            Ratio,
            bulk_ref,
        ),
        r(
            format!("bulk, single stream, iperf3 ({iperf} s)"),
            "iperf3_gbps",
            "Gbit/s",
            2,
            Ratio,
            bulk_ref,
        ),
        r(
            format!("bulk, 10 streams ({bulk} s)"),
            "bulk_10_gbps",
            "Gbit/s",
            2,
            Ratio,
            "–",
        ),
        r(
            format!("bulk, 100 streams ({bulk} s)"),
            "bulk_100_gbps",
            "Gbit/s",
            2,
            Ratio,
            "–",
        ),
        r(
            "proxy CPU per GB moved (single stream), A (client side)".into(),
            "cpu_s_per_gb_a",
            "CPU-s",
            2,
            MeshOnly,
            "1.4–1.6 CPU-s per proxy",
        ),
        r(
            "proxy CPU per GB moved (single stream), B (server side)".into(),
            "cpu_s_per_gb_b",
            "CPU-s",
            2,
            MeshOnly,
            "1.4–1.6 CPU-s per proxy",
        ),
        r(
            format!("1 KiB request/response, persistent connection, p50 ({lat} s closed loop)"),
            "rr_p50_us",
            "µs",
            0,
            Added,
            "+130–160 µs",
        ),
        r(
            "1 KiB request/response, persistent connection, p90".into(),
            "rr_p90_us",
            "µs",
            0,
            Added,
            "–",
        ),
        r(
            "1 KiB request/response, persistent connection, p99".into(),
            "rr_p99_us",
            "µs",
            0,
            Added,
            "+170–270 µs",
        ),
        r(
            "1 KiB request/response, persistent connection, requests/s".into(),
            "rr_per_s",
            "req/s",
            0,
            Ratio,
            "–",
        ),
        r(
            "proxy CPU per request (1 KiB, closed loop), A".into(),
            "rr_cpu_us_a",
            "µs",
            1,
            MeshOnly,
            "–",
        ),
        r(
            "proxy CPU per request (1 KiB, closed loop), B".into(),
            "rr_cpu_us_b",
            "µs",
            1,
            MeshOnly,
            "–",
        ),
        r(
            format!("1 KiB at 1000 req/s (paced, {lat} s), p50"),
            "paced_p50_us",
            "µs",
            0,
            Added,
            "–",
        ),
        r(
            "1 KiB at 1000 req/s (paced), p99".into(),
            "paced_p99_us",
            "µs",
            0,
            Added,
            "–",
        ),
        r(
            "proxy vCPU per 1000 req/s (1 KiB, paced), A".into(),
            "vcpu_per_krps_a",
            "vCPU",
            3,
            MeshOnly,
            "0.06 (istio.io; Envoy sidecar 0.20)",
        ),
        r(
            "proxy vCPU per 1000 req/s (1 KiB, paced), B".into(),
            "vcpu_per_krps_b",
            "vCPU",
            3,
            MeshOnly,
            "0.06 (istio.io; Envoy sidecar 0.20)",
        ),
        r(
            format!(
                "1 KiB, new connection per request (warm HBONE pool), p50 ({lat} s, one client)"
            ),
            "cpr_p50_us",
            "µs",
            0,
            Added,
            "+650 µs",
        ),
        r(
            "1 KiB, new connection per request, p99".into(),
            "cpr_p99_us",
            "µs",
            0,
            Added,
            "–",
        ),
        r(
            "1 KiB, new connection per request, connections/s".into(),
            "cpr_per_s",
            "conn/s",
            0,
            Ratio,
            "–",
        ),
        r(
            "proxy CPU per new connection (1 KiB echo), A".into(),
            "cpr_cpu_us_a",
            "µs",
            0,
            MeshOnly,
            "–",
        ),
        r(
            "proxy CPU per new connection (1 KiB echo), B".into(),
            "cpr_cpu_us_b",
            "µs",
            0,
            MeshOnly,
            "–",
        ),
        r(
            "proxy RSS idle (2-workload config), A".into(),
            "rss_idle_mib_a",
            "MiB",
            1,
            MeshOnly,
            "11.3 MiB",
        ),
        r(
            "proxy RSS idle (2-workload config), B".into(),
            "rss_idle_mib_b",
            "MiB",
            1,
            MeshOnly,
            "11.3 MiB",
        ),
        r(
            "proxy RSS under load (peak sampled every 50 ms), A".into(),
            "rss_load_mib_a",
            "MiB",
            1,
            MeshOnly,
            "–",
        ),
        r(
            "proxy RSS under load (peak sampled every 50 ms), B".into(),
            "rss_load_mib_b",
            "MiB",
            1,
            MeshOnly,
            "–",
        ),
        r(
            "proxy VmHWM after the runs, A".into(),
            "hwm_mib_a",
            "MiB",
            1,
            MeshOnly,
            "–",
        ),
        r(
            "proxy VmHWM after the runs, B".into(),
            "hwm_mib_b",
            "MiB",
            1,
            MeshOnly,
            "–",
        ),
        r(
            "proxy RSS per idle proxied connection, A".into(),
            "kib_per_idle_conn_a",
            "KiB",
            1,
            MeshOnly,
            "–",
        ),
        r(
            "proxy RSS per idle proxied connection, B".into(),
            "kib_per_idle_conn_b",
            "KiB",
            1,
            MeshOnly,
            "–",
        ),
        r(
            "proxy start → ready (spawn to /healthz/ready 200)".into(),
            "start_ready_ms",
            "ms",
            1,
            MeshOnly,
            "9 ms",
        ),
    ]
}

/// Median (mean of the middle two for an even count); `None` when empty.
pub fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

pub fn build(plan: &Plan, samples: &Samples, meta: Value) -> Report {
    let empty = Series::default();
    let mut md = String::new();
    let load = |k: &str| {
        meta[k]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    };
    let _ = writeln!(
        md,
        "\n### Data plane: through two proxies ({}) vs direct (medians of {} run{})\n",
        meta["proxy"].as_str().unwrap_or("?"),
        plan.runs,
        if plan.runs == 1 { "" } else { "s" }
    );
    let _ = writeln!(
        md,
        "{} CPUs, kernel {}; load average {} at start, {} at end; proxy args: {}\n",
        meta["nproc"],
        meta["kernel"].as_str().unwrap_or("?"),
        load("loadavg_start"),
        load("loadavg_end"),
        meta["proxy_args"]
    );
    md.push_str(
        "| measure | direct | through two proxies | proxies vs direct | ztunnel (issue 7) |\n",
    );
    md.push_str("| --- | --- | --- | --- | --- |\n");
    let mut metrics = Map::new();
    for row in rows(plan) {
        let s = samples.get(row.key).unwrap_or(&empty);
        let (d, m) = (median(&s.direct), median(&s.mesh));
        metrics.insert(
            row.key.to_string(),
            json!({
                "unit": row.unit,
                "direct": d,
                "mesh": m,
                "direct_runs": s.direct,
                "mesh_runs": s.mesh,
            }),
        );
        if d.is_none() && m.is_none() {
            continue;
        }
        let fmt = |v: Option<f64>| {
            v.map_or_else(
                || "–".to_string(),
                |v| format!("{v:.*} {}", row.decimals, row.unit),
            )
        };
        let cmp = match (row.cmp, d, m) {
            (Cmp::Ratio, Some(d), Some(m)) if d > 0.0 => format!("{:.2}×", m / d),
            (Cmp::Added, Some(d), Some(m)) => format!("{:+.0} µs", m - d),
            _ => "–".to_string(),
        };
        let direct = match row.cmp {
            Cmp::MeshOnly => "–".to_string(),
            _ => fmt(d),
        };
        let _ = writeln!(
            md,
            "| {} | {direct} | {} | {cmp} | {} |",
            row.label,
            fmt(m),
            row.reference
        );
    }
    let json = json!({ "bench": "dataplane", "meta": meta, "metrics": metrics });
    Report { markdown: md, json }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench_dataplane::workloads::Route;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn table_compares_routes_and_json_keeps_samples() {
        let mut s = Samples::new();
        for (d, m) in [(10.0, 3.0), (12.0, 4.0), (11.0, 3.5)] {
            s.entry("bulk_1_gbps").or_default().push(Route::Direct, d);
            s.entry("bulk_1_gbps").or_default().push(Route::Mesh, m);
        }
        s.entry("rr_p50_us").or_default().push(Route::Direct, 40.0);
        s.entry("rr_p50_us").or_default().push(Route::Mesh, 140.0);
        s.entry("start_ready_ms")
            .or_default()
            .push(Route::Mesh, 7.3);
        let plan = Plan {
            runs: 3,
            ..Plan::quick()
        };
        let r = build(
            &plan,
            &s,
            json!({"nproc": 2, "loadavg_start": [1.5, 1.0, 0.5]}),
        );
        let md = &r.markdown;
        assert!(
            md.contains(
                "| bulk, single stream (1 s, 128 KiB writes) | 11.00 Gbit/s | 3.50 Gbit/s | 0.32× |"
            ),
            "{md}"
        );
        assert!(md.contains("| 140 µs | +100 µs | +130–160 µs |"), "{md}");
        assert!(
            md.contains(
                "| proxy start → ready (spawn to /healthz/ready 200) | – | 7.3 ms | – | 9 ms |"
            ),
            "{md}"
        );
        assert!(md.contains("load average 1.5 1.0 0.5 at start"), "{md}");
        assert!(!md.contains("iperf3"), "rows without samples are left out");
        let m = &r.json["metrics"];
        assert_eq!(m["bulk_1_gbps"]["mesh"], 3.5);
        assert_eq!(m["bulk_1_gbps"]["direct_runs"], json!([10.0, 12.0, 11.0]));
        assert_eq!(m["iperf3_gbps"]["mesh"], Value::Null);
    }
}
