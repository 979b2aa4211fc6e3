//! The raw settings as given on the command line, in the environment or in
//! the TOML file. One struct serves all three: clap fills it from flags and
//! env, serde from the file (keys are the flag names), and [`ProxyArgs::over`]
//! layers the command line over the file before [`ProxyArgs::resolve`]
//! applies defaults and validates.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;
use sidetunnel_contract as contract;

use super::parse::{duration_or, parse_mark, parse_size, string_or_int};
use super::{
    CertSource, Config, ConfigError, DEFAULT_MEMORY_BUDGET, DnsSettings, Endpoint, InboundPolicy,
    Limits, LogFormat, MAX_CONNECTIONS_CAP, MAX_COPY_BUFFER_BUDGET, MAX_MEMORY_BUDGET,
    MIN_MEMORY_BUDGET, PodIdentity, PoolConfig, Ports, XdsMode,
};

/// Settings of `sidetunnel-proxy run`. Every flag also reads the environment
/// variable shown and the file key of the same name as the flag.
/// Variables the shim sets are named by `sidetunnel_contract::env`, so the
/// two cannot drift apart; the others are the proxy's alone.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ProxyArgs {
    /// TOML file with any of these settings (keys = flag names); flags and
    /// environment variables override it.
    #[arg(long, env = "SIDETUNNEL_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Pod namespace (required).
    #[arg(long, env = contract::env::POD_NAMESPACE, help_heading = "Pod")]
    pub pod_namespace: Option<String>,
    /// Pod name (required).
    #[arg(long, env = contract::env::POD_NAME, help_heading = "Pod")]
    pub pod_name: Option<String>,
    /// Pod UID.
    #[arg(long, env = contract::env::POD_UID, help_heading = "Pod")]
    pub pod_uid: Option<String>,
    /// Pod service account [default: default].
    #[arg(long, env = contract::env::SERVICE_ACCOUNT, help_heading = "Pod")]
    pub service_account: Option<String>,
    /// Node the pod runs on.
    #[arg(long, env = contract::env::NODE_NAME, help_heading = "Pod")]
    pub node_name: Option<String>,
    /// Cluster ID sent to the CA and xDS server [default: Kubernetes].
    #[arg(long, env = contract::env::CLUSTER_ID, help_heading = "Pod")]
    pub cluster_id: Option<String>,
    /// SPIFFE trust domain [default: cluster.local].
    #[arg(long, env = contract::env::TRUST_DOMAIN, help_heading = "Pod")]
    pub trust_domain: Option<String>,
    /// Network of the pod (Istio multi-network) [default: ""].
    #[arg(long, env = "SIDETUNNEL_NETWORK", help_heading = "Pod")]
    pub network: Option<String>,
    /// Pod IPs, comma separated [default: discovered from the netns].
    #[arg(
        long = "pod-ip",
        env = "SIDETUNNEL_POD_IPS",
        value_delimiter = ',',
        help_heading = "Pod"
    )]
    #[serde(default)]
    pub pod_ips: Vec<String>,

    /// Control plane (xDS) address, `host:port` or `https://host:port` (required).
    #[arg(long, env = contract::env::XDS_ADDRESS, help_heading = "Control plane")]
    pub xds_address: Option<String>,
    /// TLS server name of the xDS server [default: host of --xds-address].
    #[arg(
        long,
        env = "SIDETUNNEL_XDS_SERVER_NAME",
        help_heading = "Control plane"
    )]
    pub xds_server_name: Option<String>,
    /// PEM roots that sign the xDS server certificate (required).
    #[arg(
        long,
        env = contract::env::XDS_ROOT_CERT,
        value_name = "FILE",
        help_heading = "Control plane"
    )]
    pub xds_root_cert: Option<PathBuf>,
    /// Address subscription mode.
    #[arg(
        long,
        env = "SIDETUNNEL_XDS_MODE",
        value_enum,
        help_heading = "Control plane"
    )]
    pub xds_mode: Option<XdsMode>,
    /// Istio CA address [default: --xds-address]; ignored with --cert-file.
    #[arg(long, env = contract::env::CA_ADDRESS, help_heading = "Certificates")]
    pub ca_address: Option<String>,
    /// TLS server name of the CA [default: host of --ca-address].
    #[arg(long, env = "SIDETUNNEL_CA_SERVER_NAME", help_heading = "Certificates")]
    pub ca_server_name: Option<String>,
    /// PEM roots that sign the CA server certificate [default: --xds-root-cert].
    #[arg(
        long,
        env = "SIDETUNNEL_CA_ROOT_CERT",
        value_name = "FILE",
        help_heading = "Certificates"
    )]
    pub ca_root_cert: Option<PathBuf>,
    /// Service-account token file for the CA and the xDS server, re-read on
    /// every request (required in CA mode, optional with --cert-file).
    #[arg(
        long,
        env = contract::env::TOKEN_FILE,
        value_name = "FILE",
        help_heading = "Certificates"
    )]
    pub token_file: Option<PathBuf>,
    /// Certificate-files mode: PEM chain of the workload certificate.
    #[arg(
        long,
        env = "SIDETUNNEL_CERT_FILE",
        value_name = "FILE",
        help_heading = "Certificates"
    )]
    pub cert_file: Option<PathBuf>,
    /// Certificate-files mode: PEM private key.
    #[arg(
        long,
        env = "SIDETUNNEL_KEY_FILE",
        value_name = "FILE",
        help_heading = "Certificates"
    )]
    pub key_file: Option<PathBuf>,
    /// Certificate-files mode: PEM trust roots of the mesh.
    #[arg(
        long,
        env = "SIDETUNNEL_ROOTS_FILE",
        value_name = "FILE",
        help_heading = "Certificates"
    )]
    pub roots_file: Option<PathBuf>,

    /// Outbound capture port [default: 15001].
    #[arg(long, env = contract::env::OUTBOUND_PORT, help_heading = "Ports")]
    pub outbound_port: Option<u16>,
    /// Inbound plaintext capture port [default: 15006].
    #[arg(
        long,
        env = contract::env::INBOUND_PLAINTEXT_PORT,
        help_heading = "Ports"
    )]
    pub inbound_plaintext_port: Option<u16>,
    /// Inbound HBONE port [default: 15008].
    #[arg(long, env = contract::env::HBONE_PORT, help_heading = "Ports")]
    pub hbone_port: Option<u16>,
    /// Prometheus metrics port [default: 15020].
    #[arg(long, env = contract::env::METRICS_PORT, help_heading = "Ports")]
    pub metrics_port: Option<u16>,
    /// Readiness port [default: 15021].
    #[arg(long, env = contract::env::READINESS_PORT, help_heading = "Ports")]
    pub readiness_port: Option<u16>,
    /// Packet mark on every proxy socket, exempted by the redirection rules
    /// [default: 0x539].
    #[arg(long, env = contract::env::MARK, help_heading = "Ports")]
    #[serde(default, deserialize_with = "string_or_int")]
    pub mark: Option<String>,

    /// Unix socket of the admin API (config dump, log level), created 0600;
    /// no admin API when unset.
    #[arg(
        long,
        env = contract::env::ADMIN_SOCKET,
        value_name = "PATH",
        help_heading = "Runtime"
    )]
    pub admin_socket: Option<PathBuf>,
    /// How long open connections may finish after SIGTERM [default: 5s].
    #[arg(
        long,
        env = "SIDETUNNEL_DRAIN_GRACE_PERIOD",
        value_name = "DURATION",
        help_heading = "Runtime"
    )]
    pub drain_grace_period: Option<String>,
    /// Timeout of upstream TCP connects [default: 10s].
    #[arg(
        long,
        env = "SIDETUNNEL_CONNECT_TIMEOUT",
        value_name = "DURATION",
        help_heading = "Runtime"
    )]
    pub connect_timeout: Option<String>,
    /// Longest wait for an on-demand xDS lookup of an unknown destination [default: 5s].
    #[arg(
        long,
        env = "SIDETUNNEL_ON_DEMAND_TIMEOUT",
        value_name = "DURATION",
        help_heading = "Runtime"
    )]
    pub on_demand_timeout: Option<String>,
    /// How long an on-demand destination may go unused before its xDS
    /// subscription is dropped [default: 10m].
    #[arg(
        long,
        env = "SIDETUNNEL_XDS_IDLE_TIMEOUT",
        value_name = "DURATION",
        help_heading = "Runtime"
    )]
    pub xds_idle_timeout: Option<String>,
    /// Destinations subscribed at start in on-demand mode, comma separated:
    /// IPs, `name.namespace.svc[.domain]` or `namespace/hostname`.
    #[arg(
        long,
        env = "SIDETUNNEL_XDS_PREFETCH",
        value_delimiter = ',',
        help_heading = "Runtime"
    )]
    #[serde(default)]
    pub xds_prefetch: Vec<String>,
    /// HBONE streams per pooled connection [default: 100].
    #[arg(long, env = "SIDETUNNEL_POOL_MAX_STREAMS", help_heading = "Runtime")]
    pub pool_max_streams: Option<u16>,
    /// Idle time before a pooled HBONE connection is closed [default: 5m].
    #[arg(
        long,
        env = "SIDETUNNEL_POOL_IDLE_TIMEOUT",
        value_name = "DURATION",
        help_heading = "Runtime"
    )]
    pub pool_idle_timeout: Option<String>,
    /// Most proxied connections at once (outbound, plaintext inbound and
    /// HBONE streams); more are refused at once [default: 16384].
    #[arg(long, env = "SIDETUNNEL_MAX_CONNECTIONS", help_heading = "Limits")]
    pub max_connections: Option<usize>,
    /// Memory the proxy should stay within (RSS); the defaults of the
    /// HTTP/2 windows and the copy-buffer budget are derived from it so
    /// that bulk traffic waits instead of being buffered past it
    /// [default: 32MiB].
    #[arg(
        long,
        env = "SIDETUNNEL_MEMORY_BUDGET",
        value_name = "SIZE",
        help_heading = "Limits"
    )]
    #[serde(default, deserialize_with = "string_or_int")]
    pub memory_budget: Option<String>,
    /// HTTP/2 receive window per HBONE stream: the most data one tunnelled
    /// connection may have buffered in the proxy [default: a share of
    /// --memory-budget, 1MiB for 32MiB].
    #[arg(
        long,
        env = "SIDETUNNEL_H2_STREAM_WINDOW",
        value_name = "SIZE",
        help_heading = "Limits"
    )]
    #[serde(default, deserialize_with = "string_or_int")]
    pub h2_stream_window: Option<String>,
    /// HTTP/2 receive window per HBONE connection, shared by its streams
    /// [default: a share of --memory-budget, 4MiB for 32MiB].
    #[arg(
        long,
        env = "SIDETUNNEL_H2_CONNECTION_WINDOW",
        value_name = "SIZE",
        help_heading = "Limits"
    )]
    #[serde(default, deserialize_with = "string_or_int")]
    pub h2_connection_window: Option<String>,
    /// Bytes all bulk copy buffers above 16 KiB may hold together; as more
    /// connections move bulk data, each gets smaller chunks. `0` keeps
    /// every connection at 16 KiB chunks [default: a share of
    /// --memory-budget, 8MiB for 32MiB].
    #[arg(
        long,
        env = "SIDETUNNEL_COPY_BUFFER_BUDGET",
        value_name = "SIZE",
        help_heading = "Limits"
    )]
    #[serde(default, deserialize_with = "string_or_int")]
    pub copy_buffer_budget: Option<String>,
    /// Tokio worker threads of the data path [default: 2].
    #[arg(long, env = "SIDETUNNEL_WORKER_THREADS", help_heading = "Runtime")]
    pub worker_threads: Option<usize>,
    /// Log format [default: text].
    #[arg(
        long,
        env = "SIDETUNNEL_LOG_FORMAT",
        value_enum,
        help_heading = "Runtime"
    )]
    pub log_format: Option<LogFormat>,
    /// Log filter: `target=level` directives, e.g. `info,access=debug` [default: info].
    #[arg(long, env = "SIDETUNNEL_LOG_LEVEL", help_heading = "Runtime")]
    pub log_level: Option<String>,

    /// Plaintext inbound mode (PeerAuthentication) [default: PERMISSIVE].
    #[arg(
        long,
        env = "SIDETUNNEL_INBOUND_POLICY",
        value_enum,
        help_heading = "Inbound"
    )]
    pub inbound_policy: Option<InboundPolicy>,
    /// Source addresses/CIDRs allowed in plaintext even under STRICT (the
    /// kubelet probe path), comma separated.
    #[arg(
        long = "probe-source",
        env = "SIDETUNNEL_PROBE_SOURCES",
        value_delimiter = ',',
        help_heading = "Inbound"
    )]
    #[serde(default)]
    pub probe_sources: Vec<String>,

    /// Run the DNS proxy: answer mesh hosts from xDS, forward the rest to
    /// the resolvers of --dns-resolv-conf [default: false].
    #[arg(long, env = contract::env::DNS_PROXY, value_name = "BOOL", help_heading = "DNS")]
    pub dns_proxy: Option<bool>,
    /// DNS proxy port on loopback (UDP and TCP) [default: 15053].
    #[arg(long, env = contract::env::DNS_PORT, help_heading = "DNS")]
    pub dns_port: Option<u16>,
    /// The pod's resolv.conf (required with --dns-proxy true).
    #[arg(
        long,
        env = contract::env::DNS_RESOLV_CONF,
        value_name = "FILE",
        help_heading = "DNS"
    )]
    pub dns_resolv_conf: Option<PathBuf>,
    /// Kubernetes cluster domain [default: cluster.local].
    #[arg(long, env = "SIDETUNNEL_DNS_CLUSTER_DOMAIN", help_heading = "DNS")]
    pub dns_cluster_domain: Option<String>,
    /// Longest wait of a DNS query for an on-demand xDS fetch [default: 1s].
    #[arg(
        long,
        env = "SIDETUNNEL_DNS_ON_DEMAND_TIMEOUT",
        value_name = "DURATION",
        help_heading = "DNS"
    )]
    pub dns_on_demand_timeout: Option<String>,
}

/// Takes `a` unless it is empty/unset, else `b`.
macro_rules! layer {
    ($a:ident, $b:ident; $($opt:ident),* ; $($vec:ident),*) => {
        ProxyArgs {
            config: $a.config,
            $($opt: $a.$opt.or($b.$opt),)*
            $($vec: if $a.$vec.is_empty() { $b.$vec } else { $a.$vec },)*
        }
    };
}

impl ProxyArgs {
    /// Reads a TOML settings file.
    pub fn from_file(path: &Path) -> Result<ProxyArgs, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::ParseFile {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }

    /// These settings layered over `file`: a value set here wins.
    pub fn over(self, file: ProxyArgs) -> ProxyArgs {
        let cli = self;
        layer!(cli, file;
            pod_namespace, pod_name, pod_uid, service_account, node_name, cluster_id,
            trust_domain, network, xds_address, xds_server_name, xds_root_cert, xds_mode,
            ca_address, ca_server_name, ca_root_cert, token_file, cert_file, key_file,
            roots_file, outbound_port, inbound_plaintext_port, hbone_port, metrics_port,
            readiness_port, mark, admin_socket, drain_grace_period, connect_timeout,
            on_demand_timeout, pool_max_streams, pool_idle_timeout, worker_threads, log_format, log_level,
            inbound_policy, xds_idle_timeout, max_connections, memory_budget,
            h2_stream_window, h2_connection_window, copy_buffer_budget, dns_proxy, dns_port,
            dns_resolv_conf, dns_cluster_domain, dns_on_demand_timeout;
            pod_ips, probe_sources, xds_prefetch)
    }

    /// Applies defaults and validates.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let pod = PodIdentity {
            namespace: required(
                self.pod_namespace,
                "pod-namespace",
                contract::env::POD_NAMESPACE,
            )?,
            name: required(self.pod_name, "pod-name", contract::env::POD_NAME)?,
            uid: self.pod_uid,
            service_account: self.service_account.unwrap_or_else(|| "default".into()),
            node_name: self.node_name,
            cluster_id: self.cluster_id.unwrap_or_else(|| "Kubernetes".into()),
            trust_domain: self.trust_domain.unwrap_or_else(|| "cluster.local".into()),
            network: self.network.unwrap_or_default(),
            ips: self
                .pod_ips
                .iter()
                .map(|s| {
                    s.trim()
                        .parse::<IpAddr>()
                        .map_err(|e| ConfigError::invalid("pod-ip", s, e))
                })
                .collect::<Result<_, _>>()?,
        };
        for (flag, value) in [
            ("pod-namespace", &pod.namespace),
            ("pod-name", &pod.name),
            ("service-account", &pod.service_account),
            ("trust-domain", &pod.trust_domain),
        ] {
            check_name(flag, value)?;
        }

        let xds_address = required(self.xds_address, "xds-address", contract::env::XDS_ADDRESS)?;
        let (xds_address, xds_host) = super::parse::grpc_address("xds-address", &xds_address)?;
        let xds_root = required(
            self.xds_root_cert,
            "xds-root-cert",
            contract::env::XDS_ROOT_CERT,
        )?;
        let xds = Endpoint {
            address: xds_address.clone(),
            server_name: self.xds_server_name.unwrap_or(xds_host.clone()),
            root_cert: xds_root.clone(),
        };

        let cert_source = match (self.cert_file, self.key_file, self.roots_file) {
            (Some(cert), Some(key), Some(roots)) => {
                if self.ca_address.is_some() {
                    return Err(ConfigError::Conflict(
                        "--cert-file/--key-file/--roots-file select certificate-files mode; \
                         drop --ca-address"
                            .into(),
                    ));
                }
                CertSource::Files { cert, key, roots }
            }
            (None, None, None) => {
                let (address, host) = match self.ca_address {
                    Some(a) => super::parse::grpc_address("ca-address", &a)?,
                    None => (xds_address, xds_host),
                };
                let server_name = self.ca_server_name.or_else(|| {
                    // Same endpoint as xDS: reuse its server name.
                    (address == xds.address).then(|| xds.server_name.clone())
                });
                if self.token_file.is_none() {
                    return Err(ConfigError::Missing {
                        flag: "token-file",
                        env: contract::env::TOKEN_FILE,
                    });
                }
                CertSource::IstioCa {
                    ca: Endpoint {
                        address,
                        server_name: server_name.unwrap_or(host),
                        root_cert: self.ca_root_cert.unwrap_or(xds_root),
                    },
                }
            }
            _ => {
                return Err(ConfigError::Conflict(
                    "certificate-files mode needs all of --cert-file, --key-file and --roots-file"
                        .into(),
                ));
            }
        };

        let d = Ports::default();
        let ports = Ports {
            outbound: self.outbound_port.unwrap_or(d.outbound),
            inbound_plaintext: self.inbound_plaintext_port.unwrap_or(d.inbound_plaintext),
            hbone: self.hbone_port.unwrap_or(d.hbone),
            metrics: self.metrics_port.unwrap_or(d.metrics),
            readiness: self.readiness_port.unwrap_or(d.readiness),
        };
        check_ports(&ports)?;
        let dns = resolve_dns(
            self.dns_proxy,
            self.dns_port,
            self.dns_resolv_conf,
            self.dns_cluster_domain,
            self.dns_on_demand_timeout,
            &ports,
        )?;

        let mark = match self.mark {
            Some(m) => parse_mark(&m).map_err(|e| ConfigError::invalid("mark", &m, e))?,
            None => contract::ports::MARK,
        };

        let log_level = self.log_level.unwrap_or_else(|| "info".into());
        super::parse_log_filter(&log_level)
            .map_err(|e| ConfigError::invalid("log-level", &log_level, e))?;

        let pool_max_streams = self.pool_max_streams.unwrap_or(100);
        if pool_max_streams == 0 {
            return Err(ConfigError::invalid(
                "pool-max-streams",
                0,
                "must be at least 1",
            ));
        }

        let worker_threads = self.worker_threads.unwrap_or(2);
        if !(1..=64).contains(&worker_threads) {
            return Err(ConfigError::invalid(
                "worker-threads",
                worker_threads,
                "must be 1..=64",
            ));
        }

        let limits = resolve_limits(
            self.memory_budget,
            self.max_connections,
            self.h2_stream_window,
            self.h2_connection_window,
            self.copy_buffer_budget,
        )?;

        // Checked here so a bad entry fails the start with the flag named.
        sidetunnel_contract::prefetch::prefetch_names(&self.xds_prefetch, &pod.network)
            .map_err(|e| ConfigError::invalid("xds-prefetch", &e.entry, &e.reason))?;

        Ok(Config {
            pod,
            worker_threads,
            limits,
            xds,
            token_file: self.token_file,
            xds_mode: self.xds_mode.unwrap_or(XdsMode::OnDemand),
            cert_source,
            ports,
            mark,
            admin_socket: self.admin_socket,
            drain_grace_period: duration_or("drain-grace-period", self.drain_grace_period, 5)?,
            connect_timeout: duration_or("connect-timeout", self.connect_timeout, 10)?,
            on_demand_timeout: duration_or("on-demand-timeout", self.on_demand_timeout, 5)?,
            xds_idle_timeout: duration_or(
                "xds-idle-timeout",
                self.xds_idle_timeout,
                super::DEFAULT_XDS_IDLE_TIMEOUT.as_secs(),
            )?,
            xds_prefetch: self.xds_prefetch,
            pool: PoolConfig {
                max_streams_per_conn: pool_max_streams,
                idle_timeout: duration_or("pool-idle-timeout", self.pool_idle_timeout, 300)?,
            },
            log_format: self.log_format.unwrap_or(LogFormat::Text),
            log_level,
            inbound_policy: self.inbound_policy.unwrap_or(InboundPolicy::Permissive),
            probe_sources: self
                .probe_sources
                .iter()
                .map(|s| parse_net(s).map_err(|e| ConfigError::invalid("probe-source", s, e)))
                .collect::<Result<_, _>>()?,
            dns,
        })
    }
}

/// The DNS proxy settings, when `--dns-proxy true`.
fn resolve_dns(
    enabled: Option<bool>,
    port: Option<u16>,
    resolv_conf: Option<PathBuf>,
    cluster_domain: Option<String>,
    on_demand_timeout: Option<String>,
    ports: &Ports,
) -> Result<Option<DnsSettings>, ConfigError> {
    if enabled != Some(true) {
        return Ok(None);
    }
    let port = port.unwrap_or(contract::ports::DNS);
    if port == 0 {
        return Err(ConfigError::invalid(
            "dns-port",
            port,
            "port 0 is not allowed",
        ));
    }
    // The DNS listeners are UDP and TCP on loopback; only the TCP ports
    // can clash.
    if let Some(p) = [
        ports.outbound,
        ports.inbound_plaintext,
        ports.hbone,
        ports.metrics,
        ports.readiness,
    ]
    .into_iter()
    .find(|p| *p == port)
    {
        return Err(ConfigError::invalid(
            "dns-port",
            port,
            format!("port {p} is taken by another listener"),
        ));
    }
    let resolv_conf = required(
        resolv_conf,
        "dns-resolv-conf",
        contract::env::DNS_RESOLV_CONF,
    )?;
    let cluster_domain = cluster_domain
        .unwrap_or_else(|| "cluster.local".into())
        .trim_end_matches('.')
        .to_ascii_lowercase();
    check_name("dns-cluster-domain", &cluster_domain)?;
    let on_demand_timeout = match on_demand_timeout {
        None => super::DEFAULT_DNS_ON_DEMAND_TIMEOUT,
        Some(s) => super::parse_duration(&s)
            .map_err(|e| ConfigError::invalid("dns-on-demand-timeout", &s, e))?,
    };
    Ok(Some(DnsSettings {
        port,
        resolv_conf,
        cluster_domain,
        on_demand_timeout,
    }))
}

/// `--memory-budget`, `--max-connections`, the HTTP/2 windows and the
/// copy-buffer budget, validated; unset windows and copy budget are the
/// memory budget's shares.
fn resolve_limits(
    memory_budget: Option<String>,
    max_connections: Option<usize>,
    stream_window: Option<String>,
    connection_window: Option<String>,
    copy_buffer_budget: Option<String>,
) -> Result<Limits, ConfigError> {
    let memory_budget = match memory_budget {
        None => DEFAULT_MEMORY_BUDGET,
        Some(s) => {
            let n = parse_size(&s).map_err(|e| ConfigError::invalid("memory-budget", &s, e))?;
            if !(MIN_MEMORY_BUDGET..=MAX_MEMORY_BUDGET).contains(&n) {
                return Err(ConfigError::invalid(
                    "memory-budget",
                    &s,
                    "must be 16MiB ..= 64GiB",
                ));
            }
            n
        }
    };
    let d = Limits::within(memory_budget, Limits::default().max_connections);
    let max_connections = max_connections.unwrap_or(d.max_connections);
    if !(1..=MAX_CONNECTIONS_CAP).contains(&max_connections) {
        return Err(ConfigError::invalid(
            "max-connections",
            max_connections,
            format!("must be 1..={MAX_CONNECTIONS_CAP}"),
        ));
    }
    let window = |flag, v: Option<String>, default: u32| -> Result<u32, ConfigError> {
        let Some(s) = v else { return Ok(default) };
        let n = parse_size(&s).map_err(|e| ConfigError::invalid(flag, &s, e))?;
        // HTTP/2 (RFC 9113 §6.9): windows range from the protocol's initial
        // 65,535 bytes up to 2^31-1.
        if !(65_535..=(i32::MAX as u64)).contains(&n) {
            return Err(ConfigError::invalid(
                flag,
                &s,
                "must be 65535 bytes ..= 2GiB-1 (HTTP/2 limits)",
            ));
        }
        Ok(n as u32)
    };
    let stream_window = window("h2-stream-window", stream_window, d.stream_window)?;
    // A derived connection window never refuses an explicit stream window:
    // it grows to hold one stream.
    let connection_window = window(
        "h2-connection-window",
        connection_window,
        d.connection_window.max(stream_window),
    )?;
    if connection_window < stream_window {
        return Err(ConfigError::invalid(
            "h2-connection-window",
            connection_window,
            format!("must be at least --h2-stream-window ({stream_window})"),
        ));
    }
    let copy_buffer_budget = match copy_buffer_budget {
        None => d.copy_buffer_budget,
        Some(s) => {
            let n =
                parse_size(&s).map_err(|e| ConfigError::invalid("copy-buffer-budget", &s, e))?;
            if n > MAX_COPY_BUFFER_BUDGET {
                return Err(ConfigError::invalid(
                    "copy-buffer-budget",
                    &s,
                    "must be at most 64GiB",
                ));
            }
            n
        }
    };
    Ok(Limits {
        memory_budget,
        max_connections,
        stream_window,
        connection_window,
        copy_buffer_budget,
    })
}

fn required<T>(v: Option<T>, flag: &'static str, env: &'static str) -> Result<T, ConfigError> {
    v.ok_or(ConfigError::Missing { flag, env })
}

/// Kubernetes names and trust domains end up inside SPIFFE URIs and metric
/// labels: refuse empty values and characters that would change the URI.
fn check_name(flag: &'static str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty() {
        return Err(ConfigError::invalid(flag, value, "must not be empty"));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
    {
        return Err(ConfigError::invalid(
            flag,
            value,
            format!("character {c:?} not allowed"),
        ));
    }
    Ok(())
}

fn check_ports(p: &Ports) -> Result<(), ConfigError> {
    let all = [
        ("outbound-port", p.outbound),
        ("inbound-plaintext-port", p.inbound_plaintext),
        ("hbone-port", p.hbone),
        ("metrics-port", p.metrics),
        ("readiness-port", p.readiness),
    ];
    for (i, (flag, port)) in all.iter().enumerate() {
        if *port == 0 {
            return Err(ConfigError::invalid(flag, port, "port 0 is not allowed"));
        }
        if let Some((other, _)) = all[..i].iter().find(|(_, q)| q == port) {
            return Err(ConfigError::invalid(
                flag,
                port,
                format!("same port as --{other}"),
            ));
        }
    }
    Ok(())
}

/// A CIDR or a bare address (a host route).
fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| "expected an IP address or CIDR".to_string())
}
