//! Per-pod settings carried by pod annotations. containerd forwards them to
//! the shim only when the runtime's `pod_annotations` allow-list matches
//! (`sidetunnel.io/*`, `traffic.sidecar.istio.io/*`); unknown keys under
//! those prefixes are ignored, malformed values are errors.

use std::collections::BTreeMap;
use std::time::Duration;

use ipnet::IpNet;

use crate::error::{Error, Result};

/// `"false"` opts the pod out: the shim then behaves exactly like runc.
pub const INJECT: &str = "sidetunnel.io/inject";
/// Comma-separated hostnames or IPs whose workload/service records the proxy
/// subscribes to before reporting ready (saves the first connection's
/// on-demand round trip).
pub const PREFETCH: &str = "sidetunnel.io/prefetch";
/// How long app container start waits for the proxy, e.g. `"10s"`, `"500ms"`.
pub const READY_TIMEOUT: &str = "sidetunnel.io/ready-timeout";
/// Istio's sidecar traffic annotations, honoured with Istio's meaning.
pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";

/// Longest name accepted in the prefetch list (a DNS name's limit).
const MAX_NAME: usize = 253;
/// Upper bound on a readiness timeout a pod may ask for.
const MAX_READY_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSettings {
    pub inject: bool,
    pub prefetch: Vec<String>,
    /// Overrides the node config's readiness timeout when set.
    pub ready_timeout: Option<Duration>,
    pub exclude_outbound_ports: Vec<u16>,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ip_ranges: Vec<IpNet>,
}

impl Default for PodSettings {
    fn default() -> Self {
        PodSettings {
            inject: true,
            prefetch: Vec::new(),
            ready_timeout: None,
            exclude_outbound_ports: Vec::new(),
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ip_ranges: Vec::new(),
        }
    }
}

impl PodSettings {
    pub fn from_annotations(ann: &BTreeMap<String, String>) -> Result<PodSettings> {
        let get = |k: &str| ann.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
        let mut s = PodSettings::default();
        if let Some(v) = get(INJECT) {
            s.inject = parse_bool(INJECT, v)?;
        }
        if let Some(v) = get(PREFETCH) {
            s.prefetch = list(v)
                .map(|name| check_name(v, name))
                .collect::<Result<_>>()?;
            s.prefetch.dedup();
        }
        if let Some(v) = get(READY_TIMEOUT) {
            let d = parse_duration(v).ok_or_else(|| {
                Error::invalid(
                    READY_TIMEOUT,
                    v,
                    "expected a duration like 10s, 500ms or 2m",
                )
            })?;
            if d.is_zero() || d > MAX_READY_TIMEOUT {
                return Err(Error::invalid(
                    READY_TIMEOUT,
                    v,
                    "must be between 1ms and 10m",
                ));
            }
            s.ready_timeout = Some(d);
        }
        if let Some(v) = get(EXCLUDE_OUTBOUND_PORTS) {
            s.exclude_outbound_ports = ports(EXCLUDE_OUTBOUND_PORTS, v)?;
        }
        if let Some(v) = get(EXCLUDE_INBOUND_PORTS) {
            s.exclude_inbound_ports = ports(EXCLUDE_INBOUND_PORTS, v)?;
        }
        if let Some(v) = get(EXCLUDE_OUTBOUND_IP_RANGES) {
            s.exclude_outbound_ip_ranges = list(v)
                .map(|r| {
                    r.parse::<IpNet>()
                        .or_else(|_| r.parse::<std::net::IpAddr>().map(IpNet::from))
                        .map_err(|_| {
                            Error::invalid(
                                EXCLUDE_OUTBOUND_IP_RANGES,
                                v,
                                format!("{r:?} is not an IP range"),
                            )
                        })
                })
                .collect::<Result<_>>()?;
        }
        Ok(s)
    }
}

fn list(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(Error::invalid(key, v, "expected \"true\" or \"false\"")),
    }
}

fn check_name(whole: &str, name: &str) -> Result<String> {
    let ok = name.len() <= MAX_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '/'));
    if ok {
        Ok(name.to_owned())
    } else {
        Err(Error::invalid(
            PREFETCH,
            whole,
            format!("{name:?} is not a hostname, IP or namespace/name"),
        ))
    }
}

fn ports(key: &str, v: &str) -> Result<Vec<u16>> {
    list(v)
        .map(|p| match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(Error::invalid(
                key,
                v,
                format!("{p:?} is not a port (1-65535)"),
            )),
        })
        .collect()
}

/// Go-style single-unit durations: `ms`, `s`, `m`.
fn parse_duration(v: &str) -> Option<Duration> {
    let split = v.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> Result<PodSettings> {
        let map = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        PodSettings::from_annotations(&map)
    }

    #[test]
    fn defaults_inject() {
        assert_eq!(settings(&[]).unwrap(), PodSettings::default());
        assert!(settings(&[]).unwrap().inject);
    }

    #[test]
    fn parses_all_keys() {
        let s = settings(&[
            (INJECT, "False"),
            (
                PREFETCH,
                " reviews.default.svc.cluster.local, 10.0.0.7 ,,default/ratings",
            ),
            (READY_TIMEOUT, "1500ms"),
            (EXCLUDE_OUTBOUND_PORTS, "5432, 6379"),
            (EXCLUDE_INBOUND_PORTS, "9090"),
            (
                EXCLUDE_OUTBOUND_IP_RANGES,
                "169.254.169.254/32,fd00::/8,10.1.2.3",
            ),
            ("sidetunnel.io/unknown", "ignored"),
        ])
        .unwrap();
        assert!(!s.inject);
        assert_eq!(
            s.prefetch,
            [
                "reviews.default.svc.cluster.local",
                "10.0.0.7",
                "default/ratings"
            ]
        );
        assert_eq!(s.ready_timeout, Some(Duration::from_millis(1500)));
        assert_eq!(s.exclude_outbound_ports, [5432, 6379]);
        assert_eq!(s.exclude_inbound_ports, [9090]);
        assert_eq!(
            s.exclude_outbound_ip_ranges,
            [
                "169.254.169.254/32".parse::<IpNet>().unwrap(),
                "fd00::/8".parse().unwrap(),
                "10.1.2.3/32".parse().unwrap()
            ]
        );
    }

    #[test]
    fn rejects_malformed_values_naming_the_key() {
        for (k, v) in [
            (INJECT, "no"),
            (PREFETCH, "a b"),
            (READY_TIMEOUT, "10"),
            (READY_TIMEOUT, "0s"),
            (READY_TIMEOUT, "2h"),
            (READY_TIMEOUT, "99999999999999999999m"),
            (EXCLUDE_OUTBOUND_PORTS, "0"),
            (EXCLUDE_INBOUND_PORTS, "70000"),
            (EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/33"),
        ] {
            let err = settings(&[(k, v)]).unwrap_err().to_string();
            assert!(err.contains(k), "{k}={v}: {err}");
        }
    }
}
