//! Per-pod redirect settings from pod annotations. Istio's names are
//! honoured where they exist (`traffic.sidecar.istio.io/*`,
//! `ambient.istio.io/dns-capture`); sidetunnel-only knobs live under
//! `sidetunnel.io/`. Any value we cannot honour is an error, so a pod never
//! runs with weaker redirection than its annotations asked for.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::{Error, PortSelection, RedirectConfig};

pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
pub const ISTIO_DNS_CAPTURE: &str = "ambient.istio.io/dns-capture";
pub const DNS_CAPTURE: &str = "sidetunnel.io/dns-capture";
pub const PROBE_PORTS: &str = "sidetunnel.io/probe-ports";

/// Istio sidecar traffic annotations we deliberately do not implement. They
/// would only narrow capture, so ignoring them keeps the pod protected; we
/// log them so the operator knows.
const IGNORED_ISTIO_PREFIX: &str = "traffic.sidecar.istio.io/";

impl RedirectConfig {
    /// Default configuration with the pod's annotations applied.
    pub fn from_annotations(annotations: &BTreeMap<String, String>) -> Result<Self, Error> {
        let mut cfg = RedirectConfig::default();
        cfg.apply_annotations(annotations)?;
        Ok(cfg)
    }

    /// Applies pod annotations on top of `self` (e.g. a shim-provided base
    /// carrying the node addresses). On error `self` is left unchanged.
    pub fn apply_annotations(
        &mut self,
        annotations: &BTreeMap<String, String>,
    ) -> Result<(), Error> {
        let mut next = self.clone();
        for (key, value) in annotations {
            match key.as_str() {
                EXCLUDE_OUTBOUND_PORTS => next.exclude_outbound_ports = ports(key, value)?,
                EXCLUDE_INBOUND_PORTS => next.exclude_inbound_ports = ports(key, value)?,
                PROBE_PORTS => next.probe_ports = ports(key, value)?,
                INCLUDE_INBOUND_PORTS => {
                    next.include_inbound_ports = if value.trim() == "*" {
                        PortSelection::All
                    } else {
                        PortSelection::Only(ports(key, value)?)
                    }
                }
                EXCLUDE_OUTBOUND_IP_RANGES => {
                    next.exclude_outbound_ip_ranges = ip_ranges(key, value)?
                }
                ISTIO_DNS_CAPTURE | DNS_CAPTURE => next.dns_capture = boolean(key, value)?,
                k if k.starts_with(IGNORED_ISTIO_PREFIX) => {
                    tracing::warn!(
                        annotation = k,
                        "Istio traffic annotation not supported by sidetunnel; ignored (capture stays on)"
                    );
                }
                _ => {}
            }
        }
        if let (Some(a), Some(b)) = (
            annotations.get(ISTIO_DNS_CAPTURE),
            annotations.get(DNS_CAPTURE),
        ) && boolean(ISTIO_DNS_CAPTURE, a)? != boolean(DNS_CAPTURE, b)?
        {
            return Err(invalid(
                DNS_CAPTURE,
                b,
                &format!("contradicts {ISTIO_DNS_CAPTURE}={a:?}"),
            ));
        }
        next.validate()?;
        *self = next;
        Ok(())
    }
}

fn invalid(key: &str, value: &str, reason: &str) -> Error {
    Error::Annotation {
        key: key.to_string(),
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// Comma-separated list items, trimmed; an empty or blank value is an empty list.
fn items(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn ports(key: &str, value: &str) -> Result<BTreeSet<u16>, Error> {
    items(value)
        .map(|item| match item.parse::<u16>() {
            Ok(0) => Err(invalid(key, value, "port 0 is not a valid port")),
            Ok(p) => Ok(p),
            Err(_) => Err(invalid(
                key,
                value,
                &format!("{item:?} is not a port number (expected comma-separated ports 1-65535)"),
            )),
        })
        .collect()
}

fn ip_ranges(key: &str, value: &str) -> Result<Vec<IpNet>, Error> {
    if value.trim() == "*" {
        // Istio's "exclude everything": explicit, so honoured.
        return Ok(vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()]);
    }
    items(value)
        .map(|item| {
            // A bare address means that single host.
            item.parse::<IpNet>()
                .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| {
                    invalid(
                        key,
                        value,
                        &format!(
                            "{item:?} is not a CIDR (e.g. 10.0.0.0/8, fd00::/8) or an IP address"
                        ),
                    )
                })
        })
        .collect()
}

fn boolean(key: &str, value: &str) -> Result<bool, Error> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(invalid(key, value, "expected \"true\" or \"false\"")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<RedirectConfig, Error> {
        let map = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        RedirectConfig::from_annotations(&map)
    }

    fn err_text(pairs: &[(&str, &str)]) -> String {
        parse(pairs).expect_err("should be rejected").to_string()
    }

    #[test]
    fn no_annotations_is_default() {
        assert_eq!(parse(&[]).unwrap(), RedirectConfig::default());
    }

    #[test]
    fn valid_values() {
        let c = parse(&[
            (EXCLUDE_OUTBOUND_PORTS, "9090, 5432,9090"),
            (
                EXCLUDE_OUTBOUND_IP_RANGES,
                "10.0.0.0/8,fd00::/8 ,192.168.1.7,10.1.2.3/16",
            ),
            (EXCLUDE_INBOUND_PORTS, "8081"),
            (INCLUDE_INBOUND_PORTS, "80,443"),
            (ISTIO_DNS_CAPTURE, "True"),
            (PROBE_PORTS, "8080"),
            ("unrelated.example/key", "whatever"),
        ])
        .unwrap();
        assert_eq!(c.exclude_outbound_ports, [5432, 9090].into());
        let nets: Vec<String> = c
            .exclude_outbound_ip_ranges
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            nets,
            ["10.0.0.0/8", "fd00::/8", "192.168.1.7/32", "10.1.0.0/16"]
        );
        assert_eq!(c.exclude_inbound_ports, [8081].into());
        assert_eq!(
            c.include_inbound_ports,
            PortSelection::Only([80, 443].into())
        );
        assert!(c.dns_capture);
        assert_eq!(c.probe_ports, [8080].into());
    }

    #[test]
    fn edge_cases() {
        // Empty values mean empty lists; includeInboundPorts "" captures nothing (Istio semantics).
        let c = parse(&[(EXCLUDE_OUTBOUND_PORTS, ""), (INCLUDE_INBOUND_PORTS, " ")]).unwrap();
        assert!(c.exclude_outbound_ports.is_empty());
        assert_eq!(
            c.include_inbound_ports,
            PortSelection::Only(BTreeSet::new())
        );
        assert_eq!(
            parse(&[(INCLUDE_INBOUND_PORTS, " * ")])
                .unwrap()
                .include_inbound_ports,
            PortSelection::All
        );
        let star = parse(&[(EXCLUDE_OUTBOUND_IP_RANGES, "*")]).unwrap();
        assert_eq!(star.exclude_outbound_ip_ranges.len(), 2);
        assert_eq!(
            parse(&[(EXCLUDE_INBOUND_PORTS, "65535,1")])
                .unwrap()
                .exclude_inbound_ports,
            [1, 65535].into()
        );
        assert!(
            !parse(&[(DNS_CAPTURE, "false"), (ISTIO_DNS_CAPTURE, "FALSE")])
                .unwrap()
                .dns_capture
        );
        // Unsupported Istio annotations are ignored (they could only narrow capture).
        assert_eq!(
            parse(&[(
                "traffic.sidecar.istio.io/includeOutboundIPRanges",
                "10.0.0.0/8"
            )])
            .unwrap(),
            RedirectConfig::default()
        );
    }

    #[test]
    fn invalid_values_name_key_and_reason() {
        let e = err_text(&[(EXCLUDE_OUTBOUND_PORTS, "80,http")]);
        assert!(
            e.contains(EXCLUDE_OUTBOUND_PORTS) && e.contains("\"http\" is not a port number"),
            "{e}"
        );
        assert!(err_text(&[(EXCLUDE_INBOUND_PORTS, "65536")]).contains("not a port number"));
        assert!(err_text(&[(EXCLUDE_INBOUND_PORTS, "-1")]).contains("not a port number"));
        assert!(err_text(&[(EXCLUDE_INBOUND_PORTS, "0")]).contains("port 0"));
        assert!(err_text(&[(INCLUDE_INBOUND_PORTS, "80-90")]).contains("not a port number"));
        assert!(err_text(&[(INCLUDE_INBOUND_PORTS, "*,80")]).contains("not a port number"));
        let e = err_text(&[(EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/33")]);
        assert!(e.contains("not a CIDR"), "{e}");
        assert!(err_text(&[(EXCLUDE_OUTBOUND_IP_RANGES, "example.com")]).contains("not a CIDR"));
        assert!(err_text(&[(ISTIO_DNS_CAPTURE, "yes")]).contains("\"true\" or \"false\""));
        assert!(
            err_text(&[(DNS_CAPTURE, "true"), (ISTIO_DNS_CAPTURE, "false")])
                .contains("contradicts")
        );
    }

    #[test]
    fn apply_keeps_base_and_is_atomic_on_error() {
        let mut base = RedirectConfig {
            probe_source_addrs: vec!["10.0.0.1".parse().unwrap()],
            ..Default::default()
        };
        let good: BTreeMap<_, _> = [(EXCLUDE_INBOUND_PORTS.to_string(), "81".to_string())].into();
        base.apply_annotations(&good).unwrap();
        assert_eq!(base.exclude_inbound_ports, [81].into());
        assert_eq!(base.probe_source_addrs.len(), 1);
        let before = base.clone();
        let bad: BTreeMap<_, _> = [
            (EXCLUDE_INBOUND_PORTS.to_string(), "82".to_string()),
            (EXCLUDE_OUTBOUND_PORTS.to_string(), "x".to_string()),
        ]
        .into();
        assert!(base.apply_annotations(&bad).is_err());
        assert_eq!(base, before);
    }
}
