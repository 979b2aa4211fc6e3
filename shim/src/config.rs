//! The node config (`/etc/sidetunnel/config.toml`, or the runtime option
//! `ConfigPath`): where the mesh's control plane is, how the proxy is
//! launched, as whom, and how long app containers wait for it. Loaded and
//! validated when containerd starts the shim, so a broken node config fails
//! the pod's first `RunPodSandbox` with a message naming the bad key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use sidetunnel_redirect::RedirectConfig;

pub const DEFAULT_PATH: &str = "/etc/sidetunnel/config.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("node config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("node config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("node config {path}: {key}: {reason}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        reason: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub mesh: MeshConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub token: TokenConfig,
    #[serde(default)]
    pub upgrade: UpgradeConfig,
    /// Node-wide redirection settings; pod annotations refine them.
    #[serde(default)]
    pub redirect: RedirectConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshConfig {
    /// xDS (control plane) address, `host:port`.
    pub xds_address: String,
    /// Istio CA address; the xDS address when unset.
    #[serde(default)]
    pub ca_address: Option<String>,
    /// PEM roots that sign the control plane's and CA's certificates.
    pub root_cert: PathBuf,
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    #[serde(default = "default_cluster_id")]
    pub cluster_id: String,
    /// Name of this node, passed to the proxy (Istio's NODE_NAME).
    #[serde(default)]
    pub node_name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// OCI runtime binary (name on PATH or absolute path): runc or crun.
    #[serde(default = "default_runtime")]
    pub binary: String,
    /// State root of the OCI runtime; `/run/containerd/runc` when unset.
    #[serde(default)]
    pub root: Option<PathBuf>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            binary: default_runtime(),
            root: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Absolute path of the proxy executable.
    pub binary: PathBuf,
    /// Arguments; `{placeholder}`s are expanded per pod (see README).
    #[serde(default = "default_args")]
    pub args: Vec<String>,
    /// Extra environment; values may use the same placeholders.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Pass the `SIDETUNNEL_*` variables describing the pod and the mesh.
    #[serde(default = "yes")]
    pub standard_env: bool,
    /// Non-root identity the proxy runs as. The mesh never exempts traffic
    /// by UID, so any unprivileged uid works.
    #[serde(default = "default_id")]
    pub uid: u32,
    #[serde(default = "default_id")]
    pub gid: u32,
    /// Parent of the per-pod state directories (keys, admin socket).
    #[serde(default = "default_state_root")]
    pub state_root: PathBuf,
    /// How long an app container's start waits for the proxy to be ready.
    #[serde(default = "default_ready_timeout", deserialize_with = "duration")]
    pub readiness_timeout: Duration,
    #[serde(default = "default_readiness_port")]
    pub readiness_port: u16,
    #[serde(default = "default_readiness_path")]
    pub readiness_path: String,
    /// SIGTERM → SIGKILL grace when the pod stops.
    #[serde(default = "default_drain", deserialize_with = "duration")]
    pub drain_grace: Duration,
    #[serde(default = "default_backoff_initial", deserialize_with = "duration")]
    pub restart_backoff_initial: Duration,
    #[serde(default = "default_backoff_max", deserialize_with = "duration")]
    pub restart_backoff_max: Duration,
    /// RLIMIT_NOFILE of the proxy.
    #[serde(default = "default_nofile")]
    pub max_open_files: u64,
}

/// Live replacement of running proxies by a new `proxy.binary` (see
/// docs/operations.md, "Upgrading the proxy").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeConfig {
    /// Hand running pods over to a new proxy binary when the file at
    /// `proxy.binary` changes. Off: a new binary reaches a pod only when
    /// its proxy restarts.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How often each shim looks at `proxy.binary`.
    #[serde(default = "default_upgrade_check", deserialize_with = "duration")]
    pub check_interval: Duration,
    /// Pods of this node that may be mid-upgrade at once.
    #[serde(default = "default_upgrade_concurrency")]
    pub max_concurrent: u32,
    /// How long a new proxy has to become ready before the upgrade is
    /// abandoned (the old proxy keeps serving).
    #[serde(default = "default_upgrade_ready", deserialize_with = "duration")]
    pub ready_timeout: Duration,
}

impl Default for UpgradeConfig {
    fn default() -> Self {
        UpgradeConfig {
            enabled: true,
            check_interval: default_upgrade_check(),
            max_concurrent: default_upgrade_concurrency(),
            ready_timeout: default_upgrade_ready(),
        }
    }
}

fn default_upgrade_check() -> Duration {
    Duration::from_secs(10)
}
fn default_upgrade_concurrency() -> u32 {
    2
}
fn default_upgrade_ready() -> Duration {
    Duration::from_secs(60)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Where the pod's service-account token is on the node. `{pod_uid}`,
    /// `{pod_namespace}`, `{pod_name}` are expanded; one path component may be
    /// `*` (the projected volume's generated name).
    #[serde(default = "default_token_template")]
    pub path_template: String,
    /// Fail the sandbox when no token is found (otherwise the proxy starts
    /// without one and must use certificate files).
    #[serde(default)]
    pub required: bool,
    /// How often the shim re-copies the token the kubelet rotates.
    #[serde(default = "default_token_refresh", deserialize_with = "duration")]
    pub refresh_interval: Duration,
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig {
            path_template: default_token_template(),
            required: false,
            refresh_interval: default_token_refresh(),
        }
    }
}

fn default_trust_domain() -> String {
    "cluster.local".into()
}
fn default_cluster_id() -> String {
    "Kubernetes".into()
}
fn default_runtime() -> String {
    "runc".into()
}
fn default_args() -> Vec<String> {
    vec!["run".into()]
}
fn yes() -> bool {
    true
}
fn default_id() -> u32 {
    15000
}
fn default_state_root() -> PathBuf {
    PathBuf::from("/run/sidetunnel")
}
fn default_ready_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_readiness_port() -> u16 {
    sidetunnel_contract::ports::READINESS
}
fn default_readiness_path() -> String {
    sidetunnel_contract::readiness::PATH.into()
}
fn default_drain() -> Duration {
    Duration::from_secs(5)
}
fn default_backoff_initial() -> Duration {
    Duration::from_millis(200)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(30)
}
fn default_nofile() -> u64 {
    65536
}
fn default_token_template() -> String {
    "/var/lib/kubelet/pods/{pod_uid}/volumes/kubernetes.io~projected/istio-token/istio-token".into()
}
fn default_token_refresh() -> Duration {
    Duration::from_secs(60)
}

/// Placeholders the proxy's args and env may use.
pub const PLACEHOLDERS: &[&str] = &[
    "sandbox_id",
    "pod_namespace",
    "pod_name",
    "pod_uid",
    "service_account",
    "state_dir",
    "admin_socket",
    "token_file",
];
const TOKEN_PLACEHOLDERS: &[&str] = &["pod_uid", "pod_namespace", "pod_name"];

/// `"30s"`, `"500ms"`, `"2m"`, `"1h"` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "" | "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).ok_or_else(|| {
        serde::de::Error::custom(format!("invalid duration {s:?} (use e.g. 30s, 500ms, 2m)"))
    })
}

/// Expands `{name}` placeholders; an unknown name is an error naming it.
pub fn expand(template: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("unclosed '{{' in {template:?}"))?;
        let name = &after[..close];
        let value = lookup(name)
            .ok_or_else(|| format!("unknown placeholder {{{name}}} in {template:?}"))?;
        out.push_str(&value);
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn check_placeholders(template: &str, allowed: &[&str]) -> Result<(), String> {
    expand(template, |n| allowed.contains(&n).then(String::new)).map(drop)
}

impl NodeConfig {
    /// Reads and validates the node config at `path`.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let cfg = NodeConfig::read(path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Reads the node config at `path` without checking the files it names
    /// (at install time the mesh root certificate may not be there yet).
    pub fn read(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let cfg: NodeConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Ok(cfg)
    }

    /// The config file to use: the runtime option's `ConfigPath` or the default.
    pub fn path(config_path: Option<&Path>) -> PathBuf {
        config_path.map_or_else(|| PathBuf::from(DEFAULT_PATH), Path::to_owned)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            reason,
        };
        let m = &self.mesh;
        if m.xds_address.trim().is_empty() {
            return Err(invalid("mesh.xds_address", "must not be empty".into()));
        }
        if m.ca_address.as_deref().is_some_and(|a| a.trim().is_empty()) {
            return Err(invalid(
                "mesh.ca_address",
                "must not be empty when set".into(),
            ));
        }
        if !m.root_cert.is_absolute() || !m.root_cert.is_file() {
            return Err(invalid(
                "mesh.root_cert",
                format!(
                    "{} is not an existing file (absolute path)",
                    m.root_cert.display()
                ),
            ));
        }
        let td_ok = !m.trust_domain.is_empty()
            && m.trust_domain
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c));
        if !td_ok {
            return Err(invalid(
                "mesh.trust_domain",
                format!(
                    "{:?} is not a SPIFFE trust domain (lowercase letters, digits, '-', '.', '_')",
                    m.trust_domain
                ),
            ));
        }
        if m.cluster_id.trim().is_empty() {
            return Err(invalid("mesh.cluster_id", "must not be empty".into()));
        }
        if self.runtime.binary.trim().is_empty() {
            return Err(invalid("runtime.binary", "must not be empty".into()));
        }
        let p = &self.proxy;
        if !p.binary.is_absolute() {
            return Err(invalid(
                "proxy.binary",
                format!("{} is not an absolute path", p.binary.display()),
            ));
        }
        if !is_executable(&p.binary) {
            return Err(invalid(
                "proxy.binary",
                format!("{} is not an executable file", p.binary.display()),
            ));
        }
        if p.uid == 0 || p.gid == 0 {
            return Err(invalid(
                "proxy.uid",
                "the proxy must not run as root (uid and gid must be non-zero)".into(),
            ));
        }
        if !p.state_root.is_absolute() {
            return Err(invalid(
                "proxy.state_root",
                "must be an absolute path".into(),
            ));
        }
        if p.readiness_timeout.is_zero() {
            return Err(invalid(
                "proxy.readiness_timeout",
                "must be positive".into(),
            ));
        }
        if p.readiness_port == 0 {
            return Err(invalid("proxy.readiness_port", "must not be 0".into()));
        }
        if !p.readiness_path.starts_with('/') {
            return Err(invalid(
                "proxy.readiness_path",
                "must start with '/'".into(),
            ));
        }
        if p.restart_backoff_initial.is_zero() || p.restart_backoff_max < p.restart_backoff_initial
        {
            return Err(invalid(
                "proxy.restart_backoff_max",
                "backoff must be positive and max >= initial".into(),
            ));
        }
        for a in &p.args {
            check_placeholders(a, PLACEHOLDERS).map_err(|e| invalid("proxy.args", e))?;
        }
        for (k, v) in &p.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(invalid("proxy.env", format!("bad variable name {k:?}")));
            }
            check_placeholders(v, PLACEHOLDERS).map_err(|e| invalid("proxy.env", e))?;
        }
        let t = &self.token;
        if !t.path_template.starts_with('/') {
            return Err(invalid(
                "token.path_template",
                "must be an absolute path".into(),
            ));
        }
        check_placeholders(&t.path_template, TOKEN_PLACEHOLDERS)
            .map_err(|e| invalid("token.path_template", e))?;
        if t.path_template.split('/').filter(|c| *c == "*").count() > 1 {
            return Err(invalid(
                "token.path_template",
                "at most one '*' component".into(),
            ));
        }
        if t.refresh_interval.is_zero() {
            return Err(invalid("token.refresh_interval", "must be positive".into()));
        }
        let u = &self.upgrade;
        if u.check_interval.is_zero() {
            return Err(invalid("upgrade.check_interval", "must be positive".into()));
        }
        if u.max_concurrent == 0 {
            return Err(invalid(
                "upgrade.max_concurrent",
                "must be at least 1 (set upgrade.enabled = false to turn upgrades off)".into(),
            ));
        }
        if u.ready_timeout.is_zero() {
            return Err(invalid("upgrade.ready_timeout", "must be positive".into()));
        }
        self.redirect
            .validate()
            .map_err(|e| invalid("redirect", e.to_string()))?;
        Ok(())
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("root.pem"), "pem").unwrap();
            Fixture { dir }
        }
        fn load(&self, body: &str) -> Result<NodeConfig, ConfigError> {
            let text = body.replace(
                "@ROOT@",
                &self.dir.path().join("root.pem").display().to_string(),
            );
            let path = self.dir.path().join("config.toml");
            std::fs::write(&path, text).unwrap();
            NodeConfig::load(&path)
        }
    }

    const MINIMAL: &str = r#"
[mesh]
xds_address = "istiod.istio-system.svc:15012"
root_cert = "@ROOT@"
[proxy]
binary = "/bin/sh"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Fixture::new().load(MINIMAL).unwrap();
        assert_eq!(c.mesh.trust_domain, "cluster.local");
        assert_eq!(c.mesh.cluster_id, "Kubernetes");
        assert_eq!(c.runtime.binary, "runc");
        assert_eq!(c.proxy.uid, 15000);
        assert_eq!(c.proxy.readiness_timeout, Duration::from_secs(30));
        assert_eq!(c.proxy.args, vec!["run".to_string()]);
        assert_eq!(c.redirect, RedirectConfig::default());
    }

    #[test]
    fn upgrade_settings_default_and_are_checked() {
        let f = Fixture::new();
        let c = f.load(MINIMAL).unwrap();
        assert!(c.upgrade.enabled);
        assert_eq!(c.upgrade.check_interval, Duration::from_secs(10));
        assert_eq!(c.upgrade.max_concurrent, 2);
        let c = f
            .load(&format!(
                "{MINIMAL}[upgrade]\ncheck_interval = \"500ms\"\nenabled = false\n"
            ))
            .unwrap();
        assert_eq!(c.upgrade.check_interval, Duration::from_millis(500));
        assert!(!c.upgrade.enabled);
        let err = f
            .load(&format!("{MINIMAL}[upgrade]\nmax_concurrent = 0\n"))
            .unwrap_err();
        assert!(err.to_string().contains("upgrade.max_concurrent"), "{err}");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Fixture::new()
            .load(&format!("{MINIMAL}readiness_timeot = \"5s\"\n"))
            .unwrap_err();
        assert!(err.to_string().contains("readiness_timeot"), "{err}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = NodeConfig::load(Path::new("/nonexistent/sidetunnel.toml")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/sidetunnel.toml"),
            "{err}"
        );
    }

    #[test]
    fn rejects_root_proxy() {
        let err = Fixture::new()
            .load(&format!("{MINIMAL}uid = 0\n"))
            .unwrap_err();
        assert!(err.to_string().contains("must not run as root"), "{err}");
    }

    #[test]
    fn rejects_bad_duration_and_placeholder() {
        let f = Fixture::new();
        let err = f
            .load(&format!("{MINIMAL}readiness_timeout = \"soon\"\n"))
            .unwrap_err();
        assert!(err.to_string().contains("invalid duration"), "{err}");
        let err = f
            .load(&format!("{MINIMAL}args = [\"--pod={{pod}}\"]\n"))
            .unwrap_err();
        assert!(err.to_string().contains("{pod}"), "{err}");
    }

    #[test]
    fn rejects_missing_root_cert_and_relative_binary() {
        let f = Fixture::new();
        let err = f
            .load(&MINIMAL.replace("@ROOT@", "/nonexistent.pem"))
            .unwrap_err();
        assert!(err.to_string().contains("mesh.root_cert"), "{err}");
        let err = f
            .load(&MINIMAL.replace("/bin/sh", "sidetunnel-proxy"))
            .unwrap_err();
        assert!(err.to_string().contains("proxy.binary"), "{err}");
    }

    #[test]
    fn rejects_bad_trust_domain_and_token_template() {
        let f = Fixture::new();
        let err = f
            .load(&MINIMAL.replace("[proxy]", "trust_domain = \"Bad Domain\"\n[proxy]"))
            .unwrap_err();
        assert!(err.to_string().contains("mesh.trust_domain"), "{err}");
        let err = f
            .load(&format!(
                "{MINIMAL}[token]\npath_template = \"/a/{{state_dir}}/t\"\n"
            ))
            .unwrap_err();
        assert!(err.to_string().contains("token.path_template"), "{err}");
    }

    #[test]
    fn redirect_table_is_validated_by_the_redirect_crate() {
        let c = Fixture::new()
            .load(&format!("{MINIMAL}[redirect]\noutbound_port = 16001\n"))
            .unwrap();
        assert_eq!(c.redirect.outbound_port, 16001);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("7d"), None);
        assert_eq!(parse_duration(""), None);
    }

    #[test]
    fn expands_placeholders() {
        let v = expand("--ns={pod_namespace}/x", |n| {
            (n == "pod_namespace").then(|| "default".into())
        });
        assert_eq!(v.unwrap(), "--ns=default/x");
        assert!(expand("{nope}", |_| None).unwrap_err().contains("{nope}"));
        assert!(expand("{open", |_| None).unwrap_err().contains("unclosed"));
    }
}
