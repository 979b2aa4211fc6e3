//! What the demo reads back from each pod's proxy (identity from the admin
//! config dump, TCP and xDS metrics from `:15020/metrics`) and the summary
//! it prints. The mTLS line is a check, not a claim: the demo fails unless
//! the server's proxy counted inbound connections with
//! `connection_security_policy="mutual_tls"` and both SPIFFE principals.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sidetunnel_tests::mesh::{self, metrics};

const ADDRESS_URL: &str = "type.googleapis.com/istio.workload.Address";
const AUTHORIZATION_URL: &str = "type.googleapis.com/istio.security.Authorization";
const OPENED: &str = "istio_tcp_connections_opened_total";
const METRICS_PORT: u16 = 15020;

#[derive(Debug, Clone, Default)]
pub struct PodReport {
    pub name: String,
    pub ip: Option<IpAddr>,
    pub sandbox: String,
    /// RunPodSandbox (redirection + proxy launch included).
    pub sandbox_time: Duration,
    /// RunPodSandbox → app container running (proxy readiness included).
    pub start_time: Duration,
    pub proxy_pid: i32,
    pub proxy_rss_kib: u64,
    /// SPIFFE identity of the proxy's certificate.
    pub identity: String,
    pub address_bytes: u64,
    pub authorization_bytes: u64,
    /// Workloads and services the proxy holds.
    pub workloads: usize,
    pub services: usize,
    /// (source principal, destination principal, count) of mTLS connections
    /// this proxy reported as destination (inbound) and as source (outbound).
    pub inbound_mtls: Vec<(String, String, f64)>,
    pub outbound_mtls: Vec<(String, String, f64)>,
}

/// The demo's result.
#[derive(Debug)]
pub struct Report {
    pub pods: Vec<PodReport>,
    /// (what, address, reply).
    pub traffic: Vec<(String, SocketAddr, String)>,
    pub full_address_bytes: usize,
    pub full_address_count: usize,
    pub full_authorization_bytes: usize,
    pub control_plane: SocketAddr,
}

/// Reads identity, config and metrics of the pod's proxy into `r`.
pub fn fill_from_proxy(r: &mut PodReport, state_root: &Path) -> Result<()> {
    let dump = mesh::admin_get(&mesh::admin_socket(state_root, &r.sandbox), "/config_dump")
        .with_context(|| format!("{}: proxy admin API", r.name))?;
    let dump: serde_json::Value = serde_json::from_str(&dump)?;
    r.identity = dump["certificates"][0]["identity"]
        .as_str()
        .with_context(|| format!("{}: no certificate in the proxy's config dump", r.name))?
        .to_owned();
    r.workloads = dump["workloads"].as_array().map_or(0, Vec::len);
    r.services = dump["services"].as_array().map_or(0, Vec::len);
    let ip = r.ip.context("pod without IP")?;
    let text = mesh::http_get(SocketAddr::new(ip, METRICS_PORT), "/metrics")
        .with_context(|| format!("{}: proxy metrics", r.name))?;
    let samples = metrics::parse(&text);
    let bytes = |url| metrics::sum(&samples, "istio_xds_message_bytes_total", &[("url", url)]);
    r.address_bytes = bytes(ADDRESS_URL) as u64;
    r.authorization_bytes = bytes(AUTHORIZATION_URL) as u64;
    let mtls = |reporter| {
        metrics::select(
            &samples,
            OPENED,
            &[
                ("reporter", reporter),
                ("connection_security_policy", "mutual_tls"),
            ],
        )
        .into_iter()
        .map(|s| {
            (
                s.label("source_principal").to_owned(),
                s.label("destination_principal").to_owned(),
                s.value,
            )
        })
        .collect::<Vec<_>>()
    };
    r.inbound_mtls = mtls("destination");
    r.outbound_mtls = mtls("source");
    Ok(())
}

impl Report {
    /// Fails unless the server's proxy saw mTLS from the client's identity.
    pub fn check_mtls(&self) -> Result<()> {
        let find = |n: &str| self.pods.iter().find(|p| p.name.ends_with(n));
        let (Some(server), Some(client)) = (find("/server"), find("/client")) else {
            bail!("demo pods missing from the report");
        };
        let seen: f64 = server
            .inbound_mtls
            .iter()
            .filter(|(src, dst, _)| *src == client.identity && *dst == server.identity)
            .map(|(_, _, n)| n)
            .sum();
        if seen < self.traffic.len() as f64 {
            bail!(
                "the server's proxy reported {seen} mutual_tls connections from {} (expected {}); \
                 its inbound mTLS metrics: {:?}",
                client.identity,
                self.traffic.len(),
                server.inbound_mtls
            );
        }
        Ok(())
    }
}

fn kib(bytes: u64) -> String {
    format!("{:.1} KiB", bytes as f64 / 1024.0)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "\n=== sidetunnel demo summary ===")?;
        writeln!(
            f,
            "control plane: sidetunnel-meshd at {}",
            self.control_plane
        )?;
        for p in &self.pods {
            writeln!(
                f,
                "pod {}: ip {} identity {}",
                p.name,
                p.ip.map(|i| i.to_string()).unwrap_or_default(),
                p.identity
            )?;
            writeln!(
                f,
                "  start: RunPodSandbox {:.2?} (redirection + proxy launch), RunPodSandbox -> app running {:.2?} (incl. publishing the pod to meshd); proxy pid {} RSS {:.1} MiB",
                p.sandbox_time,
                p.start_time,
                p.proxy_pid,
                p.proxy_rss_kib as f64 / 1024.0
            )?;
        }
        for (what, addr, reply) in &self.traffic {
            writeln!(f, "traffic: client -> {what} {addr}: ok ({reply:?})")?;
        }
        for p in &self.pods {
            for (src, dst, n) in &p.inbound_mtls {
                writeln!(
                    f,
                    "mTLS: {} proxy accepted {n} connection(s) with connection_security_policy=\"mutual_tls\" source_principal=\"{src}\" destination_principal=\"{dst}\"",
                    p.name
                )?;
            }
        }
        let full = self.full_address_bytes as u64;
        for p in &self.pods {
            writeln!(
                f,
                "xDS: {} proxy received Address {} ({} workloads, {} services held) + Authorization {}; full WDS of this mesh: Address {} ({} resources) + Authorization {} -> {:.2}% of the Address bytes",
                p.name,
                kib(p.address_bytes),
                p.workloads,
                p.services,
                kib(p.authorization_bytes),
                kib(full),
                self.full_address_count,
                kib(self.full_authorization_bytes as u64),
                100.0 * p.address_bytes as f64 / full.max(1) as f64
            )?;
        }
        writeln!(f, "demo: ok")
    }
}
