//! `RedirectConfig`: ports, marks and exclusions of the in-pod ruleset.
//! Defaults follow Istio ambient's in-pod conventions (ztunnel ports, mark
//! 0x539/0xfff, tproxy mark 0x111, routing table 100) so node ztunnels and
//! waypoints interoperate with sidetunnel pods.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sidetunnel_contract::ports;

use crate::Error;

/// Which inbound ports are captured to the proxy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PortSelection {
    /// Every port (Istio's `includeInboundPorts: "*"`, the default).
    #[default]
    All,
    /// Only these ports; an empty set captures no inbound traffic at all.
    Only(BTreeSet<u16>),
}

impl PortSelection {
    /// True when `port` is selected.
    pub fn contains(&self, port: u16) -> bool {
        match self {
            PortSelection::All => true,
            PortSelection::Only(ports) => ports.contains(&port),
        }
    }
}

// Serialized as "*" or a list of ports, the same shapes as the annotation.
impl Serialize for PortSelection {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PortSelection::All => s.serialize_str("*"),
            PortSelection::Only(ports) => ports.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for PortSelection {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Star(String),
            Ports(BTreeSet<u16>),
        }
        match Raw::deserialize(d)? {
            Raw::Star(s) if s == "*" => Ok(PortSelection::All),
            Raw::Star(s) => Err(serde::de::Error::custom(format!(
                "expected \"*\" or a list of ports, got {s:?}"
            ))),
            Raw::Ports(p) => Ok(PortSelection::Only(p)),
        }
    }
}

/// Everything `install` needs to program a pod's network namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedirectConfig {
    /// Proxy outbound capture listener (app outbound TCP is NAT-redirected here).
    pub outbound_port: u16,
    /// Proxy inbound plaintext listener (inbound TCP is TPROXY'd here).
    pub inbound_plaintext_port: u16,
    /// Proxy HBONE listener: reached directly, never redirected.
    pub hbone_port: u16,
    /// Proxy Prometheus metrics port: reached directly.
    pub metrics_port: u16,
    /// Proxy readiness port (`/healthz/ready`): reached directly.
    pub readiness_port: u16,
    /// Proxy DNS listener, used only when `dns_capture` is on.
    pub dns_port: u16,
    /// Mark the proxy puts on its own sockets (SO_MARK); such traffic is exempt.
    pub proxy_mark: u32,
    /// Mask applied to packet and connection marks before comparing.
    pub mark_mask: u32,
    /// Mark given to TPROXY'd packets and to connections the proxy opened,
    /// routed to the local table so transparent replies come back to it.
    pub tproxy_mark: u32,
    /// Policy-routing table holding the `local` default routes.
    pub route_table: u32,
    /// Priority of the `fwmark tproxy_mark lookup route_table` rule.
    pub rule_priority: u32,
    /// Capture UDP and TCP port 53 to `dns_port` (off by default).
    pub dns_capture: bool,
    /// Outbound destination ports that bypass the proxy.
    pub exclude_outbound_ports: BTreeSet<u16>,
    /// Outbound destination networks that bypass the proxy.
    pub exclude_outbound_ip_ranges: Vec<IpNet>,
    /// Inbound ports delivered straight to the app.
    pub exclude_inbound_ports: BTreeSet<u16>,
    /// Inbound ports captured to the proxy (others go straight to the app).
    pub include_inbound_ports: PortSelection,
    /// The node's own addresses, as seen inside the pod: inbound TCP from
    /// them (kubelet probes) reaches the app without the proxy. See
    /// docs/redirection.md for the trust trade-off.
    pub probe_source_addrs: Vec<IpAddr>,
    /// When non-empty, the probe exemption covers only these ports.
    pub probe_ports: BTreeSet<u16>,
}

impl Default for RedirectConfig {
    fn default() -> Self {
        RedirectConfig {
            outbound_port: ports::OUTBOUND,
            inbound_plaintext_port: ports::INBOUND_PLAINTEXT,
            hbone_port: ports::HBONE,
            metrics_port: ports::METRICS,
            readiness_port: ports::READINESS,
            dns_port: ports::DNS,
            proxy_mark: ports::MARK,
            mark_mask: 0xfff,
            tproxy_mark: 0x111,
            route_table: 100,
            rule_priority: 32764,
            dns_capture: false,
            exclude_outbound_ports: BTreeSet::new(),
            exclude_outbound_ip_ranges: Vec::new(),
            exclude_inbound_ports: BTreeSet::new(),
            include_inbound_ports: PortSelection::All,
            probe_source_addrs: Vec::new(),
            probe_ports: BTreeSet::new(),
        }
    }
}

impl RedirectConfig {
    /// The proxy's own inbound ports, which are never captured.
    pub fn proxy_inbound_ports(&self) -> [u16; 3] {
        [self.hbone_port, self.metrics_port, self.readiness_port]
    }

    /// Checks the configuration is consistent; `install` calls it first.
    pub fn validate(&self) -> Result<(), Error> {
        let ports = [
            ("outbound_port", self.outbound_port),
            ("inbound_plaintext_port", self.inbound_plaintext_port),
            ("hbone_port", self.hbone_port),
            ("metrics_port", self.metrics_port),
            ("readiness_port", self.readiness_port),
            ("dns_port", self.dns_port),
        ];
        for (i, (name, port)) in ports.iter().enumerate() {
            if *port == 0 {
                return Err(Error::Config(format!("{name} must not be 0")));
            }
            if let Some((other, _)) = ports[..i].iter().find(|(_, p)| p == port) {
                return Err(Error::Config(format!("{name} and {other} are both {port}")));
            }
        }
        for (name, set) in [
            ("exclude_outbound_ports", &self.exclude_outbound_ports),
            ("exclude_inbound_ports", &self.exclude_inbound_ports),
            ("probe_ports", &self.probe_ports),
        ] {
            if set.contains(&0) {
                return Err(Error::Config(format!("{name} contains port 0")));
            }
        }
        if self.mark_mask == 0 {
            return Err(Error::Config("mark_mask must not be 0".into()));
        }
        for (name, mark) in [
            ("proxy_mark", self.proxy_mark),
            ("tproxy_mark", self.tproxy_mark),
        ] {
            if mark == 0 || mark & !self.mark_mask != 0 {
                return Err(Error::Config(format!(
                    "{name} {mark:#x} must be non-zero and inside mark_mask {:#x}",
                    self.mark_mask
                )));
            }
        }
        if self.proxy_mark == self.tproxy_mark {
            return Err(Error::Config(
                "proxy_mark and tproxy_mark must differ".into(),
            ));
        }
        // 0 is unspec; 253-255 are the kernel's default/main/local tables.
        if self.route_table == 0 || (253..=255).contains(&self.route_table) {
            return Err(Error::Config(format!(
                "route_table {} is reserved by the kernel",
                self.route_table
            )));
        }
        if self.rule_priority == 0 || self.rule_priority >= 32766 {
            return Err(Error::Config(format!(
                "rule_priority {} must be in 1..32766 (before the main table)",
                self.rule_priority
            )));
        }
        Ok(())
    }
}

impl fmt::Display for PortSelection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortSelection::All => f.write_str("*"),
            PortSelection::Only(p) => {
                let list: Vec<String> = p.iter().map(u16::to_string).collect();
                f.write_str(&list.join(","))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_istio_compatible() {
        let c = RedirectConfig::default();
        c.validate().unwrap();
        assert_eq!(
            (c.outbound_port, c.inbound_plaintext_port, c.hbone_port),
            (15001, 15006, 15008)
        );
        assert_eq!(
            (c.proxy_mark, c.mark_mask, c.tproxy_mark, c.route_table),
            (0x539, 0xfff, 0x111, 100)
        );
        assert!(!c.dns_capture);
    }

    #[test]
    fn validate_rejects_inconsistencies() {
        let bad = [
            RedirectConfig {
                outbound_port: 15006,
                ..Default::default()
            },
            RedirectConfig {
                hbone_port: 0,
                ..Default::default()
            },
            RedirectConfig {
                proxy_mark: 0x1539,
                ..Default::default()
            },
            RedirectConfig {
                tproxy_mark: 0x539,
                ..Default::default()
            },
            RedirectConfig {
                route_table: 254,
                ..Default::default()
            },
            RedirectConfig {
                rule_priority: 32766,
                ..Default::default()
            },
            RedirectConfig {
                exclude_inbound_ports: [0].into(),
                ..Default::default()
            },
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?} should be rejected");
        }
    }

    #[test]
    fn serde_round_trip_and_port_selection_shapes() {
        let c = RedirectConfig {
            include_inbound_ports: PortSelection::Only([80, 443].into()),
            exclude_outbound_ip_ranges: vec!["10.0.0.0/8".parse().unwrap()],
            probe_source_addrs: vec!["10.1.0.1".parse().unwrap()],
            ..Default::default()
        };
        let json = serde_json::to_string(&c).unwrap();
        assert!(
            json.contains(r#""include_inbound_ports":[80,443]"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<RedirectConfig>(&json).unwrap(), c);
        let d: RedirectConfig = serde_json::from_str(r#"{"include_inbound_ports":"*"}"#).unwrap();
        assert_eq!(d, RedirectConfig::default());
        assert!(
            serde_json::from_str::<RedirectConfig>(r#"{"include_inbound_ports":"80"}"#).is_err()
        );
        assert!(serde_json::from_str::<RedirectConfig>(r#"{"bogus":1}"#).is_err());
    }
}
