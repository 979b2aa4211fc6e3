//! Istio's ztunnel as the pods' proxy in place of `sidetunnel-proxy`, so the
//! data-plane bench can measure both on the same wire (issue 7). The binary
//! is one the caller built from upstream source; nothing of ztunnel is part
//! of this repository. Each pod runs its own ztunnel in "dedicated" mode
//! against the same meshd (xDS and CA), behind the same redirection ruleset:
//! its sockets carry the same mark (1337 = 0x539) and it binds upstream
//! connections to the client's address (`ENABLE_ORIG_SRC`), as ours does.
//! Everything is set through ztunnel's documented environment variables.
//! One pod may run ztunnel and the other sidetunnel: HBONE interop on a
//! real wire (docs/hbone-interop.md).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use super::{PROXY_MARK, Pod};
use crate::mesh::XDS_SERVER_NAME;

/// What one pod's ztunnel is given.
pub struct Setup<'a> {
    pub bin: &'a Path,
    /// meshd's xDS and CA address.
    pub control_plane: SocketAddr,
    pub root_cert: &'a Path,
    /// The pod's bearer token file (ztunnel re-reads it).
    pub token: &'a Path,
    /// `RUST_LOG` filter.
    pub log_level: &'a str,
    /// Extra `KEY=VALUE` environment, e.g. `ZTUNNEL_WORKER_THREADS=1`.
    pub env: &'a [String],
}

/// The command running ztunnel for `pod`; refuses an `env` entry without
/// `=`.
pub fn command(s: &Setup<'_>, pod: Pod) -> anyhow::Result<Command> {
    let url = format!("https://{}", s.control_plane);
    let mut cmd = Command::new(s.bin);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("PROXY_MODE", "dedicated")
        .env(
            "PROXY_WORKLOAD_INFO",
            format!(
                "{}/{}/{}",
                pod.namespace(),
                pod.name(),
                pod.service_account()
            ),
        )
        .env("POD_NAME", pod.name())
        .env("POD_NAMESPACE", pod.namespace())
        .env("SERVICE_ACCOUNT", pod.service_account())
        .env("INSTANCE_IP", pod.ip().to_string())
        .env("XDS_ADDRESS", &url)
        .env("CA_ADDRESS", &url)
        .env("ALT_XDS_HOSTNAME", XDS_SERVER_NAME)
        .env("ALT_CA_HOSTNAME", XDS_SERVER_NAME)
        .env("XDS_ROOT_CA", s.root_cert)
        .env("CA_ROOT_CA", s.root_cert)
        .env("AUTH_TOKEN", s.token)
        .env("PACKET_MARK", PROXY_MARK.to_string())
        .env("ENABLE_ORIG_SRC", "true")
        .env("RUST_LOG", s.log_level);
    for kv in s.env {
        let Some((k, v)) = kv.split_once('=') else {
            anyhow::bail!("ztunnel setting {kv:?} is not KEY=VALUE");
        };
        cmd.env(k, v);
    }
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(cmd: &Command, key: &str) -> Option<String> {
        cmd.get_envs()
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.map(|v| v.to_string_lossy().into_owned()))
    }

    #[test]
    fn dedicated_mode_for_the_pod_with_our_mark() {
        let env = ["ZTUNNEL_WORKER_THREADS=1".to_string()];
        let s = Setup {
            bin: Path::new("/bin/ztunnel"),
            control_plane: "10.88.0.1:15012".parse().unwrap(),
            root_cert: Path::new("/x/root-cert.pem"),
            token: Path::new("/x/token"),
            log_level: "info",
            env: &env,
        };
        let cmd = command(&s, Pod::B).unwrap();
        assert_eq!(env_of(&cmd, "PROXY_MODE").as_deref(), Some("dedicated"));
        assert_eq!(
            env_of(&cmd, "PROXY_WORKLOAD_INFO").as_deref(),
            Some("ns-b/b/sa-b")
        );
        assert_eq!(env_of(&cmd, "PACKET_MARK").as_deref(), Some("1337"));
        assert_eq!(
            env_of(&cmd, "XDS_ADDRESS").as_deref(),
            Some("https://10.88.0.1:15012")
        );
        assert_eq!(env_of(&cmd, "ZTUNNEL_WORKER_THREADS").as_deref(), Some("1"));
        let bad = ["ZTUNNEL_WORKER_THREADS".to_string()];
        let err = command(&Setup { env: &bad, ..s }, Pod::A).unwrap_err();
        assert!(err.to_string().contains("KEY=VALUE"), "{err}");
    }
}
