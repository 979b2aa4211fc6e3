//! HBONE request headers: `:authority` parsing, `forwarded`, `baggage`,
//! `traceparent` — spelled exactly as ztunnel spells them.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// `baggage` header name.
pub const BAGGAGE: &str = "baggage";
/// `traceparent` header name (W3C trace context).
pub const TRACEPARENT: &str = "traceparent";

/// Why a CONNECT `:authority` was rejected (answered with 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    #[error("CONNECT request has no :authority")]
    Missing,
    #[error("CONNECT :authority {0:?} is not ip:port")]
    NotSocketAddr(String),
    #[error("CONNECT :authority {0:?} has port 0")]
    PortZero(String),
}

/// The destination of a CONNECT: `:authority` must be `ip:port` (IPv6 in
/// brackets), as ztunnel sends it for workload destinations.
pub fn parse_authority(uri: &http::Uri) -> Result<SocketAddr, AuthorityError> {
    let authority = uri.authority().ok_or(AuthorityError::Missing)?.as_str();
    let addr: SocketAddr = authority
        .parse()
        .map_err(|_| AuthorityError::NotSocketAddr(authority.to_owned()))?;
    if addr.port() == 0 {
        return Err(AuthorityError::PortZero(authority.to_owned()));
    }
    Ok(addr)
}

/// The `forwarded` header value ztunnel sends: `for="<ip:port>"`, IPv6 as
/// `for="[::1]:80"`, and `;host=<hostname>` when the client addressed a
/// service.
pub fn forwarded_header(src: SocketAddr, service_host: Option<&str>) -> String {
    match service_host {
        Some(host) => format!("for=\"{src}\";host={host}"),
        None => format!("for=\"{src}\""),
    }
}

/// The original client IP from a `forwarded` header: the `for=` of the first
/// element (RFC 7239), quoted or not, with or without a port, IPv6 with or
/// without brackets. `None` when absent or unparseable (obfuscated
/// identifiers such as `_hidden` or `unknown` included).
pub fn forwarded_for(value: &str) -> Option<IpAddr> {
    let first = value.split(',').next()?;
    let node = first.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        k.trim().eq_ignore_ascii_case("for").then_some(v.trim())
    })?;
    let node = node.strip_prefix('"').unwrap_or(node);
    let node = node.strip_suffix('"').unwrap_or(node);
    if let Ok(sa) = node.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    if let Some(inner) = node.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        return inner.parse().ok();
    }
    node.parse().ok()
}

/// The `host=` parameter of a `forwarded` header (the service hostname the
/// client addressed), as ztunnel reads it.
pub fn forwarded_host(value: &str) -> Option<String> {
    if !value.is_ascii() {
        return None;
    }
    value
        .split(';')
        .find_map(|part| part.trim().strip_prefix("host="))
        .map(|h| h.trim_matches('"').to_owned())
        .filter(|h| !h.is_empty())
}

/// A W3C `traceparent` (`00-<trace id>-<parent id>-<flags>`), generated per
/// outbound connection like ztunnel does.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    trace_id: u128,
    parent_id: u64,
    flags: u8,
}

impl TraceParent {
    /// A fresh random trace.
    pub fn random() -> Self {
        use rand::Rng;
        let mut rng = rand::rng();
        Self {
            trace_id: rng.random(),
            parent_id: rng.random(),
            flags: 0,
        }
    }

    /// Parses a version-00 traceparent.
    pub fn parse(value: &str) -> Option<Self> {
        let mut it = value.split('-');
        let (v, t, p, f) = (it.next()?, it.next()?, it.next()?, it.next()?);
        if it.next().is_some() || v != "00" || t.len() != 32 || p.len() != 16 || f.len() != 2 {
            return None;
        }
        // from_str_radix alone would also take a leading '+'.
        if ![t, p, f]
            .iter()
            .all(|s| s.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return None;
        }
        Some(Self {
            trace_id: u128::from_str_radix(t, 16).ok()?,
            parent_id: u64::from_str_radix(p, 16).ok()?,
            flags: u8::from_str_radix(f, 16).ok()?,
        })
    }

    /// The trace id (for access logs).
    pub fn trace_id(&self) -> u128 {
        self.trace_id
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Workload metadata carried in the `baggage` header (OpenTelemetry keys, as
/// ztunnel writes them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baggage {
    pub cluster_id: Option<String>,
    pub namespace: Option<String>,
    /// Kind of workload (`deployment`, `pod`, …) → `k8s.<kind>.name`.
    pub workload_kind: Option<String>,
    pub workload_name: Option<String>,
    pub service_name: Option<String>,
    pub service_version: Option<String>,
    pub region: Option<String>,
    pub zone: Option<String>,
}

impl Baggage {
    /// The header value: `k8s.cluster.name=…,k8s.namespace.name=…,
    /// k8s.<kind>.name=…,service.name=…,service.version=…,cloud.region=…,
    /// cloud.availability_zone=…` (absent fields omitted).
    pub fn to_header(&self) -> String {
        let kind = self.workload_kind.as_deref().unwrap_or("deployment");
        let workload_key = format!("k8s.{kind}.name");
        [
            ("k8s.cluster.name", &self.cluster_id),
            ("k8s.namespace.name", &self.namespace),
            (workload_key.as_str(), &self.workload_name),
            ("service.name", &self.service_name),
            ("service.version", &self.service_version),
            ("cloud.region", &self.region),
            ("cloud.availability_zone", &self.zone),
        ]
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
        .collect::<Vec<_>>()
        .join(",")
    }

    /// Parses a header value; unknown keys are ignored.
    pub fn parse(value: &str) -> Self {
        let mut b = Baggage::default();
        for item in value.split(',') {
            let Some((k, v)) = item.trim().split_once('=') else {
                continue;
            };
            let v = v.trim();
            if v.is_empty() {
                continue;
            }
            let v = Some(v.to_owned());
            match k.trim() {
                "k8s.cluster.name" => b.cluster_id = v,
                "k8s.namespace.name" => b.namespace = v,
                "service.name" => b.service_name = v,
                "service.version" => b.service_version = v,
                "cloud.region" => b.region = v,
                "cloud.availability_zone" => b.zone = v,
                k => {
                    if let Some(kind) = k.strip_prefix("k8s.").and_then(|r| r.strip_suffix(".name"))
                    {
                        b.workload_kind = Some(kind.to_owned());
                        b.workload_name = v;
                    }
                }
            }
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_matches_ztunnel() {
        assert_eq!(
            forwarded_header("127.0.0.1:80".parse().unwrap(), None),
            r#"for="127.0.0.1:80""#
        );
        assert_eq!(
            forwarded_header("[::1]:80".parse().unwrap(), None),
            r#"for="[::1]:80""#
        );
        assert_eq!(
            forwarded_header("127.0.0.1:80".parse().unwrap(), Some("example.com")),
            r#"for="127.0.0.1:80";host=example.com"#
        );
    }

    #[test]
    fn forwarded_for_parsing() {
        let ip = |s: &str| forwarded_for(s);
        assert_eq!(
            ip(r#"for="10.0.0.1:4000""#),
            Some("10.0.0.1".parse().unwrap())
        );
        assert_eq!(
            ip(r#"for="[2001:db8::1]:80""#),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(
            ip(r#"for="[2001:db8::1]""#),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(
            ip("for=192.0.2.60;proto=http"),
            Some("192.0.2.60".parse().unwrap())
        );
        assert_eq!(
            ip("For=\"10.1.1.1\", for=10.2.2.2"),
            Some("10.1.1.1".parse().unwrap())
        );
        assert_eq!(
            ip(r#"host=x;for="10.0.0.1:1""#),
            Some("10.0.0.1".parse().unwrap())
        );
        assert_eq!(ip("for=unknown"), None);
        assert_eq!(ip("for=_hidden"), None);
        assert_eq!(ip("by=10.0.0.1"), None);
        assert_eq!(ip(""), None);
        // Round trip with what we send.
        let src: SocketAddr = "[fd00::5]:1234".parse().unwrap();
        assert_eq!(ip(&forwarded_header(src, Some("a.b.svc"))), Some(src.ip()));
    }

    #[test]
    fn forwarded_host_parsing() {
        assert_eq!(
            forwarded_host(r#"for="1.1.1.1:1";host=example.com"#).as_deref(),
            Some("example.com")
        );
        assert_eq!(
            forwarded_host(r#"for=x;host="a.b";proto=https"#).as_deref(),
            Some("a.b")
        );
        assert_eq!(forwarded_host("for=x;host=;proto=https"), None);
        assert_eq!(forwarded_host(r#"for=for;host=host;proto="pröto""#), None);
    }

    #[test]
    fn authority_parsing() {
        let p = |s: &str| parse_authority(&s.parse::<http::Uri>().unwrap());
        assert_eq!(p("10.0.0.1:8080"), Ok("10.0.0.1:8080".parse().unwrap()));
        assert_eq!(p("[fd00::1]:443"), Ok("[fd00::1]:443".parse().unwrap()));
        assert_eq!(
            p("http://10.0.0.1:80/x"),
            Ok("10.0.0.1:80".parse().unwrap())
        );
        assert!(matches!(
            p("example.com:80"),
            Err(AuthorityError::NotSocketAddr(_))
        ));
        assert!(matches!(
            p("10.0.0.1"),
            Err(AuthorityError::NotSocketAddr(_))
        ));
        assert!(matches!(p("10.0.0.1:0"), Err(AuthorityError::PortZero(_))));
        assert!(matches!(p("/path"), Err(AuthorityError::Missing)));
    }

    #[test]
    fn traceparent_format() {
        let t = TraceParent::random();
        let s = t.to_string();
        assert_eq!(s.len(), 55);
        assert!(s.starts_with("00-") && s.ends_with("-00"));
        assert_eq!(TraceParent::parse(&s), Some(t));
        assert_eq!(TraceParent::parse("00-zz-11-00"), None);
        // Found by the hbone_request fuzz target.
        assert_eq!(
            TraceParent::parse("00-00000000000000000000000000000001-0000000008000001-+0"),
            None
        );
        assert_eq!(
            TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
                .map(|t| t.trace_id()),
            Some(0x0af7651916cd43dd8448eb211c80319c)
        );
    }

    #[test]
    fn baggage_round_trip() {
        let b = Baggage {
            cluster_id: Some("Kubernetes".into()),
            namespace: Some("default".into()),
            workload_kind: Some("deployment".into()),
            workload_name: Some("ratings-v1".into()),
            service_name: Some("ratings".into()),
            service_version: Some("v1".into()),
            region: None,
            zone: Some("z1".into()),
        };
        let h = b.to_header();
        assert_eq!(
            h,
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=ratings-v1,service.name=ratings,service.version=v1,cloud.availability_zone=z1"
        );
        assert_eq!(Baggage::parse(&h), b);
        assert_eq!(Baggage::parse("junk,,=x"), Baggage::default());
    }
}
