use std::io::Write;
use std::time::Duration;

use clap::Parser;

use super::*;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: ProxyArgs,
}

fn parse(extra: &[&str]) -> Result<Config, ConfigError> {
    let mut argv = vec![
        "test",
        "--pod-namespace",
        "ns1",
        "--pod-name",
        "pod-a",
        "--xds-address",
        "127.0.0.1:15010",
        "--xds-root-cert",
        "/roots.pem",
        "--token-file",
        "/token",
    ];
    argv.extend_from_slice(extra);
    Config::load(Cli::try_parse_from(argv).expect("clap parse").args)
}

#[test]
fn defaults_follow_istio_conventions() {
    let c = parse(&[]).unwrap();
    assert_eq!(c.ports, Ports::default());
    assert_eq!(c.ports.outbound, 15001);
    assert_eq!(c.ports.readiness, 15021);
    assert_eq!(c.mark, 0x539);
    assert_eq!(c.xds_mode, XdsMode::OnDemand);
    assert_eq!(c.inbound_policy, InboundPolicy::Permissive);
    assert_eq!(c.pod.service_account, "default");
    assert_eq!(c.pod.trust_domain, "cluster.local");
    assert_eq!(
        c.pod.spiffe_id(),
        "spiffe://cluster.local/ns/ns1/sa/default"
    );
    assert_eq!(c.xds.address, "https://127.0.0.1:15010");
    assert_eq!(c.xds.server_name, "127.0.0.1");
    assert_eq!(c.drain_grace_period, Duration::from_secs(5));
    assert_eq!(c.pool.max_streams_per_conn, 100);
    match c.cert_source {
        CertSource::IstioCa { ca } => {
            assert_eq!(ca.address, "https://127.0.0.1:15010");
            assert_eq!(ca.root_cert, std::path::PathBuf::from("/roots.pem"));
            assert_eq!(c.token_file, Some(std::path::PathBuf::from("/token")));
        }
        other => panic!("expected CA mode, got {other:?}"),
    }
}

#[test]
fn missing_required_names_the_flag() {
    let err =
        Config::load(Cli::try_parse_from(["t", "--pod-name", "p"]).unwrap().args).unwrap_err();
    assert!(err.to_string().contains("--pod-namespace"), "{err}");
    assert!(
        err.to_string().contains("SIDETUNNEL_POD_NAMESPACE"),
        "{err}"
    );
    // CA mode needs the token.
    let err = Config::load(
        Cli::try_parse_from([
            "t",
            "--pod-namespace",
            "n",
            "--pod-name",
            "p",
            "--xds-address",
            "h:1",
            "--xds-root-cert",
            "/r",
        ])
        .unwrap()
        .args,
    )
    .unwrap_err();
    assert!(err.to_string().contains("--token-file"), "{err}");
}

#[test]
fn bad_values_are_rejected_with_reason() {
    let cases: &[(&[&str], &str)] = &[
        (&["--mark", "0"], "--mark"),
        (&["--mark", "0xzz"], "--mark"),
        (
            &["--drain-grace-period", "5 parsecs"],
            "--drain-grace-period",
        ),
        (&["--hbone-port", "15001"], "same port as --outbound-port"),
        (&["--metrics-port", "0"], "port 0"),
        (&["--probe-source", "10.0.0.0/33"], "--probe-source"),
        (&["--pod-ip", "not-an-ip"], "--pod-ip"),
        (&["--log-level", "info,[[["], "--log-level"),
        (&["--service-account", "a/b"], "--service-account"),
        (&["--pool-max-streams", "0"], "--pool-max-streams"),
        (&["--cert-file", "/c.pem"], "needs all of"),
        (
            &[
                "--cert-file",
                "/c",
                "--key-file",
                "/k",
                "--roots-file",
                "/r",
                "--ca-address",
                "x:1",
            ],
            "drop --ca-address",
        ),
    ];
    for (extra, want) in cases {
        let err = parse(extra).expect_err(&format!("{extra:?} must fail"));
        assert!(err.to_string().contains(want), "{extra:?}: {err}");
    }
    let err = Config::load(
        Cli::try_parse_from([
            "t",
            "--pod-namespace",
            "n",
            "--pod-name",
            "p",
            "--xds-address",
            "http://cp:1",
            "--xds-root-cert",
            "/r",
            "--token-file",
            "/t",
        ])
        .unwrap()
        .args,
    )
    .unwrap_err();
    assert!(err.to_string().contains("plaintext"), "{err}");
}

#[test]
fn cert_files_mode_and_overrides() {
    let argv = [
        "t",
        "--pod-namespace",
        "n",
        "--pod-name",
        "p",
        "--xds-address",
        "https://meshd.local:443",
        "--xds-root-cert",
        "/r",
        "--cert-file",
        "/c",
        "--key-file",
        "/k",
        "--roots-file",
        "/roots",
        "--mark",
        "1337",
        "--probe-source",
        "10.0.0.1,fd00::/64",
        "--inbound-policy",
        "strict",
        "--xds-mode",
        "wildcard",
        "--drain-grace-period",
        "250ms",
    ];
    let c = Config::load(Cli::try_parse_from(argv).unwrap().args).unwrap();
    assert_eq!(c.mark, 1337);
    assert_eq!(c.xds.server_name, "meshd.local");
    assert_eq!(c.inbound_policy, InboundPolicy::Strict);
    assert_eq!(c.xds_mode, XdsMode::Wildcard);
    assert_eq!(c.drain_grace_period, Duration::from_millis(250));
    assert_eq!(c.probe_sources.len(), 2);
    assert_eq!(c.probe_sources[0].to_string(), "10.0.0.1/32");
    assert!(matches!(c.cert_source, CertSource::Files { .. }));
}

#[test]
fn file_is_overridden_by_flags() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    writeln!(
        f,
        r#"
pod-namespace = "from-file"
pod-name = "p"
xds-address = "127.0.0.1:1"
xds-root-cert = "/r"
token-file = "/t"
mark = 4242
hbone-port = 16008
probe-sources = ["192.0.2.1"]
log-format = "json"
inbound-policy = "STRICT"
"#
    )
    .unwrap();
    let path = f.path().to_str().unwrap();
    let c = Config::load(
        Cli::try_parse_from(["t", "--config", path, "--pod-namespace", "from-flag"])
            .unwrap()
            .args,
    )
    .unwrap();
    assert_eq!(c.pod.namespace, "from-flag");
    assert_eq!(c.mark, 4242);
    assert_eq!(c.ports.hbone, 16008);
    assert_eq!(c.log_format, LogFormat::Json);
    assert_eq!(c.inbound_policy, InboundPolicy::Strict);
    assert_eq!(c.probe_sources[0].to_string(), "192.0.2.1/32");
}

#[test]
fn file_errors_name_the_file() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    writeln!(f, "no-such-key = 1").unwrap();
    let path = f.path().to_str().unwrap().to_string();
    let err =
        Config::load(Cli::try_parse_from(["t", "--config", &path]).unwrap().args).unwrap_err();
    assert!(err.to_string().contains(&path), "{err}");
    assert!(err.to_string().contains("no-such-key"), "{err}");
    let err = Config::load(
        Cli::try_parse_from(["t", "--config", "/nonexistent/x.toml"])
            .unwrap()
            .args,
    )
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/x.toml"), "{err}");
}

#[test]
fn duration_and_mark_parsers() {
    assert_eq!(parse_duration("15").unwrap(), Duration::from_secs(15));
    assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
    assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
    assert_eq!(parse_duration("10ms").unwrap(), Duration::from_millis(10));
    assert!(parse_duration("").is_err());
    assert!(parse_duration("-1s").is_err());
    assert!(parse_duration("99999999999999999999h").is_err());
    assert_eq!(parse_mark("0x539").unwrap(), 1337);
    assert_eq!(parse_mark("1337").unwrap(), 1337);
    assert!(parse_mark("0x").is_err());
}

#[test]
fn xds_scoping_flags_parse_and_validate() {
    let c = parse(&[]).unwrap();
    assert_eq!(c.xds_idle_timeout, crate::config::DEFAULT_XDS_IDLE_TIMEOUT);
    assert!(c.xds_prefetch.is_empty());

    let c = parse(&[
        "--xds-idle-timeout",
        "90s",
        "--xds-prefetch",
        "10.0.0.7,reviews.shop.svc",
    ])
    .unwrap();
    assert_eq!(c.xds_idle_timeout, Duration::from_secs(90));
    assert_eq!(c.xds_prefetch, vec!["10.0.0.7", "reviews.shop.svc"]);

    let bad = parse(&["--xds-prefetch", "example.com"]).unwrap_err();
    assert!(bad.to_string().contains("xds-prefetch"), "{bad}");
    assert!(parse(&["--xds-idle-timeout", "soon"]).is_err());
}

#[test]
fn limits_default_parse_and_validate() {
    let c = parse(&[]).unwrap();
    assert_eq!(c.limits, Limits::default());
    assert_eq!(c.limits.memory_budget, 32 << 20);
    assert_eq!(c.limits.max_connections, 16384);
    assert_eq!(c.limits.stream_window, 1 << 20);
    assert_eq!(c.limits.connection_window, 4 << 20);
    assert_eq!(c.limits.copy_buffer_budget, 8 << 20);

    let c = parse(&[
        "--max-connections",
        "100",
        "--h2-stream-window",
        "256KiB",
        "--h2-connection-window",
        "1048576",
        "--copy-buffer-budget",
        "1MiB",
    ])
    .unwrap();
    assert_eq!(
        c.limits,
        Limits {
            memory_budget: 32 << 20,
            max_connections: 100,
            stream_window: 256 << 10,
            connection_window: 1 << 20,
            copy_buffer_budget: 1 << 20,
        }
    );

    for (args, flag, reason) in [
        (&["--max-connections", "0"][..], "max-connections", "1..="),
        (&["--memory-budget", "8MiB"][..], "memory-budget", "16MiB"),
        (&["--memory-budget", "65GiB"][..], "memory-budget", "64GiB"),
        (
            &["--memory-budget", "lots"][..],
            "memory-budget",
            "expected bytes",
        ),
        (
            &["--copy-buffer-budget", "65GiB"][..],
            "copy-buffer-budget",
            "at most 64GiB",
        ),
        (
            &["--copy-buffer-budget", "32MB"][..],
            "copy-buffer-budget",
            "unknown unit",
        ),
        (
            &["--max-connections", "99999999"][..],
            "max-connections",
            "1..=",
        ),
        (
            &["--h2-stream-window", "1KiB"][..],
            "h2-stream-window",
            "65535",
        ),
        (
            &["--h2-stream-window", "2GiB"][..],
            "h2-stream-window",
            "65535",
        ),
        (
            &["--h2-stream-window", "4MB"][..],
            "h2-stream-window",
            "unit",
        ),
        (
            &[
                "--h2-stream-window",
                "8MiB",
                "--h2-connection-window",
                "4MiB",
            ][..],
            "h2-connection-window",
            "at least --h2-stream-window",
        ),
    ] {
        match parse(args) {
            Err(ConfigError::Invalid {
                flag: f, reason: r, ..
            }) => {
                assert_eq!(f, flag, "{args:?}");
                assert!(r.contains(reason), "{args:?}: {r}");
            }
            other => panic!("{args:?}: expected invalid --{flag}, got {other:?}"),
        }
    }
}

/// The windows and the copy-buffer budget follow `--memory-budget` unless
/// set: sending (copy buffers, the peer's connection window) and receiving
/// (own connection window) take two thirds of what the budget leaves after
/// the reserve; 104 MiB gives back ztunnel's windows and the former 32 MiB
/// copy budget; explicit flags win.
#[test]
fn memory_budget_derives_the_buffer_limits() {
    for budget in [16u64 << 20, 32 << 20, 100 << 20, 1 << 30, 64 << 30] {
        let c = parse(&["--memory-budget", &budget.to_string()]).unwrap();
        let l = c.limits;
        assert_eq!(l.memory_budget, budget);
        let buffers = budget - MEMORY_BUDGET_RESERVE;
        let growing = l.copy_buffer_budget + 2 * u64::from(l.connection_window);
        assert!(
            growing <= buffers * 2 / 3 || l.connection_window == 16 << 20,
            "{budget}: {l:?}"
        );
        assert!(l.stream_window >= 65_535 && l.stream_window <= l.connection_window);
        assert!(l.connection_window <= 16 << 20 && l.stream_window <= 4 << 20);
    }
    let old = parse(&["--memory-budget", "104MiB"]).unwrap().limits;
    assert_eq!(
        (
            old.stream_window,
            old.connection_window,
            old.copy_buffer_budget
        ),
        (4 << 20, 16 << 20, 32 << 20)
    );
    let small = parse(&["--memory-budget", "16MiB"]).unwrap().limits;
    assert!(small.connection_window < 4 << 20 && small.copy_buffer_budget < 8 << 20);

    // An explicit stream window above the derived connection window pulls
    // the derived one up instead of failing the start.
    let c = parse(&["--memory-budget", "16MiB", "--h2-stream-window", "4MiB"]).unwrap();
    assert_eq!(c.limits.stream_window, 4 << 20);
    assert_eq!(c.limits.connection_window, 4 << 20);
    let c = parse(&[
        "--memory-budget",
        "16MiB",
        "--h2-connection-window",
        "16MiB",
        "--copy-buffer-budget",
        "32MiB",
    ])
    .unwrap();
    assert_eq!(c.limits.connection_window, 16 << 20);
    assert_eq!(c.limits.copy_buffer_budget, 32 << 20);
    assert_eq!(c.limits.stream_window, small.stream_window);
    assert!(c.limits.exceeds_budget());
    assert!(!small.exceeds_budget() && !old.exceeds_budget());
    // Smaller explicit limits stay within the budget.
    let c = parse(&[
        "--copy-buffer-budget",
        "1MiB",
        "--h2-stream-window",
        "256KiB",
    ])
    .unwrap();
    assert!(!c.limits.exceeds_budget());
}

#[test]
fn limits_from_the_file_are_overridden_by_flags() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    writeln!(
        f,
        "max-connections = 7\nh2-stream-window = \"1MiB\"\nh2-connection-window = 8388608\n\
         copy-buffer-budget = \"4MiB\"\nmemory-budget = \"64MiB\""
    )
    .unwrap();
    let path = f.path().to_str().unwrap();
    let c = parse(&["--config", path]).unwrap();
    assert_eq!(c.limits.max_connections, 7);
    assert_eq!(c.limits.stream_window, 1 << 20);
    assert_eq!(c.limits.connection_window, 8 << 20);
    assert_eq!(c.limits.copy_buffer_budget, 4 << 20);
    assert_eq!(c.limits.memory_budget, 64 << 20);
    let c = parse(&[
        "--config",
        path,
        "--max-connections",
        "9",
        "--copy-buffer-budget",
        "0",
    ])
    .unwrap();
    assert_eq!(c.limits.max_connections, 9);
    assert_eq!(c.limits.copy_buffer_budget, 0);
    let c = parse(&["--config", path, "--memory-budget", "16MiB"]).unwrap();
    assert_eq!(c.limits.memory_budget, 16 << 20);
}

#[test]
fn size_parser() {
    assert_eq!(parse_size("65536").unwrap(), 65536);
    assert_eq!(parse_size("256KiB").unwrap(), 256 << 10);
    assert_eq!(parse_size(" 4MiB ").unwrap(), 4 << 20);
    assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
    assert!(parse_size("").is_err());
    assert!(parse_size("4mb").is_err());
    assert!(parse_size("-1").is_err());
    assert!(parse_size("99999999999999999999GiB").is_err());
}

/// The xDS node metadata the proxy sends: exactly these keys, and no
/// `NODE_NAME` in on-demand mode even when the node name is configured
/// (istiod would push every workload of the node: on a virtual node, every
/// pod of the platform). In wildcard mode it is sent when configured.
#[test]
fn xds_node_metadata_never_asks_istiod_for_node_wide_pushes() {
    let ips = ["10.0.0.7".parse().unwrap()];
    let node_md = |c: &Config| {
        crate::xds::XdsConfig::from_proxy_config(c, &ips)
            .node
            .metadata()
    };
    let keys = |m: &std::collections::BTreeMap<String, String>| {
        m.keys().map(String::as_str).collect::<Vec<_>>().join(",")
    };
    let on_demand = parse(&["--node-name", "virtual-node-1"]).unwrap();
    assert_eq!(on_demand.xds_mode, XdsMode::OnDemand);
    let m = node_md(&on_demand);
    assert_eq!(
        keys(&m),
        "CLUSTER_ID,INSTANCE_IPS,ISTIO_VERSION,NAME,NAMESPACE,SERVICE_ACCOUNT"
    );
    assert_eq!(m["NAME"], "pod-a");
    assert_eq!(m["NAMESPACE"], "ns1");
    assert_eq!(m["INSTANCE_IPS"], "10.0.0.7");
    let m = node_md(&parse(&[]).unwrap());
    assert!(!m.contains_key("NODE_NAME"));

    let wildcard = parse(&["--node-name", "node-1", "--xds-mode", "wildcard"]).unwrap();
    assert_eq!(node_md(&wildcard)["NODE_NAME"], "node-1");
    let wildcard = parse(&["--xds-mode", "wildcard"]).unwrap();
    assert!(!node_md(&wildcard).contains_key("NODE_NAME"));
}

#[test]
fn dns_proxy_is_off_by_default_and_needs_a_resolv_conf() {
    assert_eq!(parse(&[]).unwrap().dns, None);
    assert_eq!(parse(&["--dns-proxy", "false"]).unwrap().dns, None);
    let e = parse(&["--dns-proxy", "true"]).unwrap_err().to_string();
    assert!(e.contains("--dns-resolv-conf"), "{e}");
    let d = parse(&["--dns-proxy", "true", "--dns-resolv-conf", "/r"])
        .unwrap()
        .dns
        .unwrap();
    assert_eq!(d.port, 15053);
    assert_eq!(d.cluster_domain, "cluster.local");
    assert_eq!(d.on_demand_timeout, DEFAULT_DNS_ON_DEMAND_TIMEOUT);
    let d = parse(&[
        "--dns-proxy",
        "true",
        "--dns-resolv-conf",
        "/r",
        "--dns-port",
        "5353",
        "--dns-cluster-domain",
        "Corp.Example.",
        "--dns-on-demand-timeout",
        "250ms",
    ])
    .unwrap()
    .dns
    .unwrap();
    assert_eq!(
        (d.port, d.cluster_domain.as_str(), d.on_demand_timeout),
        (5353, "corp.example", Duration::from_millis(250))
    );
    for (flag, value) in [
        ("--dns-port", "15001"),
        ("--dns-port", "0"),
        ("--dns-cluster-domain", "a/b"),
        ("--dns-on-demand-timeout", "soon"),
    ] {
        let e = parse(&[
            "--dns-proxy",
            "true",
            "--dns-resolv-conf",
            "/r",
            flag,
            value,
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains(&flag[2..]), "{flag} {value}: {e}");
    }
}
