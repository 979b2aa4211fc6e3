//! `cargo xtask bench dns` (issue 21, item 4): the latency the in-pod DNS
//! proxy adds, in one run, on the tests' topology (tests/src/topology.rs:
//! real meshd in istiod mode, pod A behind the ruleset with DNS capture, the
//! real `sidetunnel-proxy --dns-proxy true` in on-demand xDS mode) with the
//! tests' resolver on host X as the pod's nameserver. From an app socket in
//! pod A, per query (UDP, a fresh socket each, as glibc does):
//!
//! * `cached`: a Service name the proxy holds (answered from its store);
//! * `on_demand`: the first query of a ServiceEntry host the proxy never
//!   saw (subscribed `ns-a/<host>` on demand, answered when meshd's push
//!   arrives) — a distinct host per sample;
//! * `forwarded`: a name outside the mesh, through the proxy to the
//!   resolver (its negative on-demand answer already remembered);
//! * `direct`: the same name sent straight to the resolver from the same
//!   namespace, on a socket with the proxy's mark (uncaptured).
//!
//! Cached, forwarded and direct samples interleave. Prints a Markdown table
//! of medians and p90s and one JSON line (also `target/bench/dns.{md,json}`).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use sidetunnel_tests::dns::{Resolver, TYPE_A, addresses, query_udp_marked};
use sidetunnel_tests::topology::{
    A_IP, B_IP, Options, PROXY_MARK, Pod, PodPair, VIP, X_IP, inventory_with_addresses,
};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Samples of each measure (on-demand: that many distinct hosts).
    #[arg(long, default_value_t = 300)]
    samples: usize,
    /// Smoke run: 20 samples each.
    #[arg(long)]
    quick: bool,
    /// Use the binaries in this directory instead of building the shipped
    /// ones (`cargo xtask dist`).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

const CACHED: &str = "b.ns-b.svc.cluster.local";
const OUTSIDE: &str = "www.example.org";
const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 80);
const SENTINEL: &str = "sentinel.example.com";
const SENTINEL_IP: Ipv4Addr = Ipv4Addr::new(240, 241, 0, 1);

/// The on-demand hosts: `od-<i>.example.com`, VIP 240.240.<i/250>.<i%250+1>.
fn on_demand_host(i: usize) -> (String, Ipv4Addr) {
    (
        format!("od-{i}.example.com"),
        Ipv4Addr::new(240, 240, (i / 250) as u8, (i % 250 + 1) as u8),
    )
}

pub fn run(args: &Args) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the DNS bench needs root (network namespaces, nftables)");
    }
    let samples = if args.quick { 20 } else { args.samples.max(1) };
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => crate::dist::build(&[])?,
    };
    let (md, json) = bench(&bin_dir, samples)?;
    let out = crate::workspace::target_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("dns.md"), &md)?;
    std::fs::write(out.join("dns.json"), format!("{json}\n"))?;
    print!("{md}");
    println!("{json}");
    eprintln!("(also in {})", out.join("dns.md").display());
    Ok(())
}

/// Runs the measures with the binaries in `bin_dir`: (Markdown, JSON).
pub fn bench(bin_dir: &Path, samples: usize) -> Result<(String, Value)> {
    ensure!(samples <= 60_000, "at most 60000 samples (distinct VIPs)");
    let work = crate::workspace::target_dir().join("bench/dns-work");
    std::fs::create_dir_all(&work)?;
    let resolv = work.join("resolv.conf");
    std::fs::write(
        &resolv,
        format!(
            "search ns-a.svc.cluster.local svc.cluster.local cluster.local\n\
             nameserver {X_IP}\noptions ndots:5\n"
        ),
    )?;
    let mut opts = Options::new(bin_dir);
    opts.outside_host = true;
    opts.dns_capture = true;
    opts.log_level = "warn".into();
    opts.proxy_args = vec![
        "--dns-proxy".into(),
        "true".into(),
        "--dns-resolv-conf".into(),
        resolv.display().to_string(),
    ];
    crate::step("starting meshd, pods A and B with DNS capture and the DNS proxy");
    let pair = PodPair::start(opts)?;
    let mut inv = inventory_with_addresses(&A_IP.to_string(), &B_IP.to_string(), &VIP.to_string());
    for i in 0..samples {
        let (host, vip) = on_demand_host(i);
        let _ = write!(
            inv,
            "  - name: od-{i}\n    namespace: ns-a\n    hostname: {host}\n    vips: [{vip}]\n    ports: {{443: 443}}\n"
        );
    }
    // A sentinel host: once A resolves it, meshd serves the new inventory
    // (it polls the file; under load that can take a while, and a change
    // landing mid-measure would be measured too).
    let _ = write!(
        inv,
        "  - name: sentinel\n    namespace: ns-a\n    hostname: {SENTINEL}\n    vips: [{SENTINEL_IP}]\n"
    );
    pair.set_inventory(&inv)?;
    let resolver = Resolver::start(
        pair.outside().context("host X")?,
        SocketAddr::new(X_IP.into(), 53),
        &[(OUTSIDE, OUTSIDE_IP)],
    )?;
    let ns_server = SocketAddr::new(X_IP.into(), 53);
    let query = |name: &str, mark: Option<u32>, want: Ipv4Addr| -> Result<f64> {
        let name = name.to_string();
        pair.ns(Pod::A).run(move || {
            let t0 = Instant::now();
            let r = query_udp_marked(ns_server, &name, TYPE_A, mark)
                .with_context(|| format!("query {name}"))?;
            let us = t0.elapsed().as_secs_f64() * 1e6;
            let got = addresses(&r);
            ensure!(
                got == [IpAddr::V4(want)],
                "{name}: answered {got:?} (rcode {}, {:?}), want {want}",
                r.rcode,
                r.answers
            );
            Ok(us)
        })
    };

    let deadline = Instant::now() + Duration::from_secs(60);
    while query(SENTINEL, None, SENTINEL_IP).is_err() {
        ensure!(
            Instant::now() < deadline,
            "meshd did not serve the bench inventory in 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Warm-up: the Service fetched on demand, the outside name's negative
    // on-demand answer remembered, sockets and caches hot.
    for _ in 0..3 {
        query(CACHED, None, VIP)?;
        query(OUTSIDE, None, OUTSIDE_IP)?;
        query(OUTSIDE, Some(PROXY_MARK), OUTSIDE_IP)?;
    }
    let before = resolver.queries();
    crate::step(&format!(
        "{samples} samples: cached, forwarded, direct (interleaved)"
    ));
    let (mut cached, mut forwarded, mut direct) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..samples {
        // Rotate the order so no route always follows the same one.
        for k in 0..3 {
            match (i + k) % 3 {
                0 => cached.push(query(CACHED, None, VIP).map_err(|e| {
                    let _ = pair.save_logs(&work.join("logs"));
                    e.context(format!("sample {i}"))
                })?),
                1 => forwarded.push(query(OUTSIDE, None, OUTSIDE_IP)?),
                _ => direct.push(query(OUTSIDE, Some(PROXY_MARK), OUTSIDE_IP)?),
            }
        }
    }
    ensure!(
        resolver.queries() - before == 2 * samples,
        "the resolver saw {} queries, expected {} (forwarded + direct only)",
        resolver.queries() - before,
        2 * samples
    );
    crate::step(&format!("{samples} on-demand hosts, first query each"));
    let mut on_demand = Vec::new();
    for i in 0..samples {
        let (host, vip) = on_demand_host(i);
        on_demand.push(query(&host, None, vip)?);
    }
    let metrics = pair.metrics(Pod::A)?;
    let samples_m = sidetunnel_tests::mesh::metrics::parse(&metrics);
    let on_demand_answers = sidetunnel_tests::mesh::metrics::sum(
        &samples_m,
        "sidetunnel_dns_queries_total",
        &[("outcome", "answered_on_demand")],
    );
    // The sentinel, the Service of the warm-up and every on-demand host.
    ensure!(
        on_demand_answers as usize > samples,
        "{on_demand_answers} answers on demand, expected at least {}",
        samples + 1
    );
    drop(resolver);
    drop(pair);

    let rows = [
        ("cached", "Service name held by the proxy", &cached),
        (
            "on_demand",
            "ServiceEntry host, first query (on-demand xDS)",
            &on_demand,
        ),
        ("forwarded", "outside name through the proxy", &forwarded),
        ("direct", "same name straight to the resolver", &direct),
    ];
    let mut md = format!(
        "\n### DNS proxy: query latency from pod A, µs ({samples} samples each, UDP, one fresh socket per query)\n\n\
         | query | median | p90 |\n| --- | --- | --- |\n"
    );
    let mut metrics = serde_json::Map::new();
    for (key, label, v) in rows {
        let (p50, p90) = (quantile(v, 0.5), quantile(v, 0.9));
        let _ = writeln!(md, "| {label} (`{key}`) | {p50:.0} | {p90:.0} |");
        metrics.insert(
            key.into(),
            json!({"median_us": p50, "p90_us": p90, "n": v.len()}),
        );
    }
    let added = quantile(&forwarded, 0.5) - quantile(&direct, 0.5);
    let _ = writeln!(
        md,
        "\nForwarding adds {added:.0} µs at the median over the resolver alone."
    );
    let json = json!({
        "bench": "dns",
        "meta": {
            "samples": samples,
            "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            "commit": crate::workspace::git_head(),
        },
        "metrics": metrics,
    });
    Ok((md, json))
}

/// The `q` quantile (nearest rank) of `v`; 0 when empty.
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use sidetunnel_tests::{bins, prereq};

    #[test]
    fn quantiles_by_nearest_rank() {
        let v = [5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(quantile(&v, 0.5), 3.0);
        assert_eq!(quantile(&v, 0.9), 5.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }

    /// The bench's smoke: a few samples on the debug binaries.
    #[test]
    fn quick_dns_bench_produces_table_and_json() {
        let t = "quick_dns_bench_produces_table_and_json";
        if !(prereq::root(t) && prereq::binary(t, "nft") && prereq::binary(t, "ip")) {
            return;
        }
        let (md, json) = bench(&bins::dir(), 5).unwrap();
        for key in ["cached", "on_demand", "forwarded", "direct"] {
            assert!(md.contains(&format!("`{key}`")), "{md}");
            assert!(json["metrics"][key]["median_us"].as_f64().unwrap() > 0.0);
        }
    }
}
