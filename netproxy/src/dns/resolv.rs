//! The pod's resolver configuration, read from its `resolv.conf` (the shim
//! copies the one containerd or CRI-O made for the sandbox): upstream
//! nameservers, search domains, `ndots`, and the per-try timeout and
//! attempts the forwarder uses. Same reading as glibc: the last `search`
//! or `domain` line wins, at most three nameservers, unknown options and
//! lines are ignored; a file naming no nameserver is an error, since the
//! proxy would have nowhere to send names outside the mesh.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// glibc's MAXNS.
const MAX_NAMESERVERS: usize = 3;
/// glibc caps `ndots` at 15.
const MAX_NDOTS: u8 = 15;

/// The parsed configuration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ResolvConf {
    pub nameservers: Vec<SocketAddr>,
    /// Search domains, lower case, without the final dot.
    pub search: Vec<String>,
    pub ndots: u8,
    /// Per-try timeout (`options timeout:N`, default 5s as glibc).
    pub timeout: Duration,
    /// Tries per nameserver (`options attempts:N`, default 2 as glibc).
    pub attempts: u8,
}

/// Why a resolv.conf was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ResolvError {
    #[error("line {line}: nameserver {value:?} is not an IP address")]
    Nameserver { line: usize, value: String },
    #[error("no nameserver line")]
    NoNameserver,
}

/// Parses resolv.conf text.
pub fn parse(text: &str) -> Result<ResolvConf, ResolvError> {
    let mut conf = ResolvConf {
        nameservers: Vec::new(),
        search: Vec::new(),
        ndots: 1,
        timeout: Duration::from_secs(5),
        attempts: 2,
    };
    for (i, line) in text.lines().enumerate() {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                let value = words.next().unwrap_or("");
                let ip: IpAddr = value.parse().map_err(|_| ResolvError::Nameserver {
                    line: i + 1,
                    value: value.to_string(),
                })?;
                if conf.nameservers.len() < MAX_NAMESERVERS {
                    conf.nameservers.push(SocketAddr::new(ip, 53));
                }
            }
            Some("search") | Some("domain") => {
                conf.search = words
                    .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
                    .filter(|d| !d.is_empty())
                    .collect();
            }
            Some("options") => {
                for opt in words {
                    let number = |prefix: &str| -> Option<u8> {
                        let n: u32 = opt.strip_prefix(prefix)?.parse().ok()?;
                        Some(n.min(u8::MAX as u32) as u8)
                    };
                    if let Some(n) = number("ndots:") {
                        conf.ndots = n.min(MAX_NDOTS);
                    } else if let Some(n) = number("timeout:") {
                        conf.timeout = Duration::from_secs(n.clamp(1, 30).into());
                    } else if let Some(n) = number("attempts:") {
                        conf.attempts = n.clamp(1, 5);
                    }
                }
            }
            _ => {}
        }
    }
    if conf.nameservers.is_empty() {
        return Err(ResolvError::NoNameserver);
    }
    Ok(conf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_kubernetes_resolv_conf() {
        let c = parse(
            "search ns-a.svc.cluster.local svc.cluster.local cluster.local\n\
             nameserver 10.96.0.10\n\
             options ndots:5 timeout:2 attempts:3 edns0\n",
        )
        .unwrap();
        assert_eq!(c.nameservers, ["10.96.0.10:53".parse().unwrap()]);
        assert_eq!(
            c.search,
            [
                "ns-a.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local"
            ]
        );
        assert_eq!(
            (c.ndots, c.timeout, c.attempts),
            (5, Duration::from_secs(2), 3)
        );
    }

    #[test]
    fn glibc_rules_last_search_wins_three_servers_capped_values() {
        let c = parse(
            "# comment\nsearch a.example\ndomain B.Example.\n\
             nameserver 10.0.0.1\nnameserver fd00::1 # v6\nnameserver 10.0.0.3\nnameserver 10.0.0.4\n\
             options ndots:99 attempts:0 timeout:1000\nsortlist 10.0.0.0\n",
        )
        .unwrap();
        assert_eq!(c.search, ["b.example"]);
        assert_eq!(c.nameservers.len(), 3);
        assert_eq!(c.nameservers[1], "[fd00::1]:53".parse().unwrap());
        assert_eq!(
            (c.ndots, c.attempts, c.timeout),
            (15, 1, Duration::from_secs(30))
        );
    }

    #[test]
    fn refuses_bad_or_missing_nameservers() {
        assert_eq!(
            parse("nameserver dns.example\n"),
            Err(ResolvError::Nameserver {
                line: 1,
                value: "dns.example".into()
            })
        );
        assert_eq!(parse("search x\n"), Err(ResolvError::NoNameserver));
    }
}
