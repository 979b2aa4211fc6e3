//! The real `sidetunnel-proxy` (release build) after sync, for `cargo xtask
//! bench xds`: the proxy runs in its own network namespace, its control
//! plane and CA a `sidetunnel-meshd` serving the scenario on that
//! namespace's loopback. Scoped: on-demand mode (the proxy's default) with
//! the pod's destinations as its prefetch list, so it holds the same set a
//! pod that already used them holds; wildcard: `--xds-mode wildcard`. Once
//! the admin API shows the certificate, the config synced and exactly the
//! expected resources held, the proxy's memory is read from
//! `/proc/PID/status` (VmRSS split into RssAnon and RssFile).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sidetunnel_tests::netns::NetNs;
use sidetunnel_tests::{mesh, procstat};

use super::Meshd;

/// Longest wait for the proxy to hold its config (wildcard C on a loaded
/// 2-core machine takes seconds).
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);
/// Time after sync before memory is read, so start-up work has settled.
const SETTLE: Duration = Duration::from_secs(1);
/// TLS name in meshd's serving certificate.
const SERVER_NAME: &str = "istiod.istio-system.svc";

/// Binaries and files of one scenario run.
pub struct Setup<'a> {
    pub proxy: &'a Path,
    pub meshd: &'a Path,
    /// `sidetunnel-meshd serve --mode`.
    pub mode: sidetunnel_meshd::mode::Mode,
    /// meshd's state directory (`init`), holding `root-cert.pem`.
    pub state: &'a Path,
    pub inventory: &'a Path,
    /// The pod's bearer token file.
    pub token: &'a Path,
    /// Where logs and the admin socket go.
    pub dir: &'a Path,
}

/// The pod the proxy runs for.
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub ips: Vec<String>,
}

/// What the proxy must hold once synced.
pub enum Want {
    /// Every Address resource: `workloads` + `services` of them.
    Wildcard { workloads: usize, services: usize },
    /// Exactly these Address names (workload uids and `ns/hostname`) and
    /// policies (`ns/name`); `dests` go on the prefetch list.
    Scoped {
        dests: Vec<String>,
        addresses: BTreeSet<String>,
        policies: BTreeSet<String>,
    },
}

/// Whether the proxy can be measured here (it needs a network namespace);
/// the reason when not.
pub fn unavailable() -> Option<&'static str> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (a network namespace for the proxy)");
    }
    let ip = Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !ip.is_ok_and(|s| s.success()) {
        return Some("needs iproute2 (`ip`)");
    }
    None
}

/// Runs the proxy for `pod` until it holds `want`; returns its memory and
/// xDS counters as JSON. `label` names log files.
pub fn measure(s: &Setup<'_>, pod: &Pod, want: &Want, label: &str) -> Result<Value> {
    let ns = NetNs::new("xdsbench");
    let mut serve = ns.command(&s.meshd.to_string_lossy());
    serve
        .arg("serve")
        .arg("--dir")
        .arg(s.state)
        .arg("--inventory")
        .arg(s.inventory)
        .args(["--listen", "127.0.0.1:0", "--mode", s.mode.as_str()])
        .env("RUST_LOG", "warn");
    let meshd = Meshd::start(serve, &s.dir.join(format!("meshd-{label}.log")))?;

    let admin = s.dir.join(format!("admin-{label}.sock"));
    let _ = std::fs::remove_file(&admin);
    let mut c = ns.command(&s.proxy.to_string_lossy());
    c.args(["--pod-name", &pod.name, "--pod-namespace", &pod.namespace]);
    c.args(["--service-account", &pod.service_account]);
    c.args(["--node-name", &pod.node]);
    if !pod.ips.is_empty() {
        c.args(["--pod-ip", &pod.ips.join(",")]);
    }
    c.args(["--xds-address", &format!("https://{}", meshd.addr)]);
    c.args(["--xds-server-name", SERVER_NAME]);
    c.arg("--xds-root-cert").arg(s.state.join("root-cert.pem"));
    c.arg("--token-file").arg(s.token);
    c.arg("--admin-socket").arg(&admin);
    c.args(["--log-level", "warn"]);
    match want {
        Want::Wildcard { .. } => c.args(["--xds-mode", "wildcard"]),
        Want::Scoped { dests, .. } => c
            .args(["--xds-mode", "on-demand"])
            .args(["--xds-prefetch", &dests.join(",")]),
    };
    let log = s.dir.join(format!("proxy-{label}.log"));
    let child = c
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("starting {}", s.proxy.display()))?;
    // `ip netns exec` execs the program: the child's pid is the proxy's.
    let proxy = Proxy { child, log };
    let started = Instant::now();
    let dump = proxy.wait_holding(&admin, want)?;
    let synced_ms = started.elapsed().as_secs_f64() * 1e3;
    std::thread::sleep(SETTLE);
    let pid = proxy.child.id() as i32;
    let kib = |field: &str| {
        procstat::status_kib(pid, field).with_context(|| format!("{field} of the proxy"))
    };
    let counters = &dump["xds"]["counters"];
    Ok(json!({
        "mode": match want { Want::Wildcard { .. } => "wildcard", Want::Scoped { .. } => "on-demand" },
        "k": match want { Want::Wildcard { .. } => Value::Null, Want::Scoped { dests, .. } => json!(dests.len()) },
        "workloads": dump["workloads"].as_array().map_or(0, Vec::len),
        "services": dump["services"].as_array().map_or(0, Vec::len),
        "policies": dump["policies"].as_array().map_or(0, Vec::len),
        "bytes": counters["bytesReceived"],
        "address_bytes": counters["addressBytes"],
        "ready_ms": synced_ms,
        "rss_kb": kib("VmRSS")?,
        "rss_anon_kb": kib("RssAnon")?,
        "rss_file_kb": kib("RssFile")?,
        "rss_peak_kb": kib("VmHWM")?,
        "threads": kib("Threads")?,
    }))
}

/// The proxy process, stopped on drop.
struct Proxy {
    child: Child,
    log: PathBuf,
}

impl Proxy {
    /// Polls the admin API until the proxy is ready and holds `want`.
    fn wait_holding(&self, admin: &Path, want: &Want) -> Result<Value> {
        let deadline = Instant::now() + SYNC_TIMEOUT;
        let mut last = String::from("admin socket not up");
        while Instant::now() < deadline {
            match mesh::admin_get(admin, "/config_dump") {
                Ok(text) => {
                    let dump: Value = serde_json::from_str(&text).context("config dump")?;
                    match holds(&dump, want) {
                        Ok(()) => return Ok(dump),
                        Err(why) => last = why,
                    }
                }
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!(
            "sidetunnel-proxy did not hold its config within {SYNC_TIMEOUT:?}: {last}; log {}",
            self.log.display()
        )
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Why `dump` does not (yet) show the proxy ready with exactly `want`.
fn holds(dump: &Value, want: &Want) -> Result<(), String> {
    if dump["certificates"].as_array().is_none_or(Vec::is_empty) {
        return Err("no certificate yet".into());
    }
    if dump["xds"]["status"]["synced"] != json!(true) {
        return Err(format!("xDS not synced: {}", dump["xds"]["status"]));
    }
    let list = |k: &str, f: &dyn Fn(&Value) -> String| -> BTreeSet<String> {
        dump[k].as_array().into_iter().flatten().map(f).collect()
    };
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let workloads = list("workloads", &|w| s(&w["uid"]));
    let services = list("services", &|v| {
        format!("{}/{}", s(&v["namespace"]), s(&v["hostname"]))
    });
    let policies = list("policies", &|p| {
        format!("{}/{}", s(&p["namespace"]), s(&p["name"]))
    });
    match want {
        Want::Wildcard {
            workloads: w,
            services: sv,
        } if (workloads.len(), services.len()) == (*w, *sv) => Ok(()),
        Want::Wildcard { .. } => Err(format!(
            "holds {} workloads and {} services",
            workloads.len(),
            services.len()
        )),
        Want::Scoped {
            addresses,
            policies: want_policies,
            ..
        } => {
            let held: BTreeSet<String> = workloads.union(&services).cloned().collect();
            if &held == addresses && &policies == want_policies {
                Ok(())
            } else {
                Err(format!(
                    "holds {} addresses and {} policies, the model {} and {} (missing {:?}, extra {:?})",
                    held.len(),
                    policies.len(),
                    addresses.len(),
                    want_policies.len(),
                    addresses.difference(&held).take(3).collect::<Vec<_>>(),
                    held.difference(addresses).take(3).collect::<Vec<_>>(),
                ))
            }
        }
    }
}
