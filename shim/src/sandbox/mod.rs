//! Sandbox hooks: what makes a `sidetunnel` pod different from a runc pod.
//! On sandbox create the pod's netns gets the redirection ruleset and then the
//! proxy is started inside it; app container starts wait for the proxy to be
//! ready; sandbox kill drains the proxy; sandbox delete removes the rules and
//! every file. Host-network pods and pods annotated
//! `sidetunnel.io/inject: "false"` are left exactly as runc would run them.

mod backoff;
mod channel;
pub mod crilog;
pub mod launch;
mod prefetch;
mod ready;
pub mod record;
mod spawn;
mod supervisor;
mod timeline;
mod token;
mod upgrade;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sidetunnel_contract::env as proxy_env;
use sidetunnel_oci::{PodInfo, Role};
use sidetunnel_redirect::RedirectConfig;
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::cgroup;
use crate::config::{NodeConfig, expand};
use crate::error::{Error, Result};
use backoff::Backoff;
use launch::LaunchSpec;
use record::{Paths, Record};
use supervisor::{ProxyPlan, ProxyState, Supervisor};
use timeline::Timeline;

/// A sandbox whose netns has the ruleset and whose proxy is about to start.
pub struct Prepared {
    id: String,
    pod: PodInfo,
    netns: PathBuf,
    redirect: RedirectConfig,
    node: Arc<NodeConfig>,
    ready_timeout: Duration,
    paths: Paths,
    /// `--xds-prefetch=…` from the pod's annotation, if any.
    prefetch_arg: Option<String>,
    timeline: Timeline,
}

struct Pod {
    pod: PodInfo,
    netns: PathBuf,
    redirect: RedirectConfig,
    paths: Paths,
    ready_timeout: Duration,
    readiness_port: u16,
    readiness_path: String,
    proxy: Supervisor,
    timeline: std::sync::Mutex<Timeline>,
}

#[derive(Default)]
pub struct Sandboxes {
    /// Injected sandboxes by sandbox container id.
    pods: Mutex<HashMap<String, Arc<Pod>>>,
    /// App container id → its sandbox id.
    members: Mutex<HashMap<String, String>>,
}

/// Readiness polling of an app container's start: first interval, doubling
/// up to the last. The cap bounds how late the gate opens after the proxy
/// became ready (a pod burst on a small node keeps proxies unready for tens
/// of milliseconds); a probe is one loopback connect from a short thread.
const READY_POLL_FIRST: Duration = Duration::from_millis(2);
const READY_POLL_MAX: Duration = Duration::from_millis(10);

fn pod_name(p: &PodInfo) -> String {
    format!("{}/{}", p.namespace, p.name)
}

impl Sandboxes {
    /// Before the runtime creates `id`: for an injected sandbox, install the
    /// redirection (failing the create if that fails); for an app container,
    /// remember its pod.
    pub async fn prepare(
        &self,
        id: &str,
        role: &Role,
        node: &Arc<NodeConfig>,
    ) -> Result<Option<Prepared>> {
        let pod = match role {
            Role::Sandbox(pod) => pod,
            Role::Container(c) => {
                self.members
                    .lock()
                    .await
                    .insert(id.to_owned(), c.sandbox_id.clone());
                return Ok(None);
            }
            Role::Standalone => return Ok(None),
        };
        let mut timeline = Timeline::default();
        timeline.mark("create");
        let Some(netns) = pod.netns_path.clone().filter(|_| !pod.host_network) else {
            info!(pod = %pod_name(pod), "host-network pod: no proxy");
            return Ok(None);
        };
        let settings = pod
            .settings()
            .map_err(|e| Error::InvalidArgument(format!("pod {}: {e}", pod_name(pod))))?;
        if !settings.inject {
            info!(pod = %pod_name(pod), "pod opted out (sidetunnel.io/inject=false): no proxy");
            return Ok(None);
        }
        let prefetch_arg = prefetch::proxy_arg(&settings.prefetch)
            .map_err(|e| Error::InvalidArgument(format!("pod {}: {e}", pod_name(pod))))?;
        let mut redirect = node.redirect.clone();
        redirect.apply_annotations(&pod.annotations).map_err(|e| {
            Error::InvalidArgument(format!(
                "pod {} redirection annotations: {e}",
                pod_name(pod)
            ))
        })?;
        let paths = Paths::new(&node.proxy.state_root, id);
        let prepared = Prepared {
            id: id.to_owned(),
            pod: pod.clone(),
            netns,
            redirect,
            ready_timeout: settings
                .ready_timeout
                .unwrap_or(node.proxy.readiness_timeout),
            node: node.clone(),
            paths,
            prefetch_arg,
            timeline,
        };
        prepare_dirs(&prepared).map_err(|e| {
            Error::Sandbox(format!(
                "pod {}: state directory {}: {e}",
                pod_name(pod),
                prepared.paths.dir.display()
            ))
        })?;
        let mut rec = base_record(&prepared);
        rec.state = "installing redirection".into();
        let _ = rec.save(&prepared.paths);
        run_redirect(Op::Install, &prepared.netns, &prepared.redirect)
            .await
            .map_err(|e| {
                let _ = std::fs::remove_dir_all(&prepared.paths.dir);
                Error::Sandbox(format!(
                    "pod {}: installing traffic redirection in {} failed, refusing to run the pod unprotected: {e}",
                    pod_name(pod),
                    prepared.netns.display()
                ))
            })?;
        info!(pod = %pod_name(pod), netns = %prepared.netns.display(), "redirection installed");
        let mut prepared = prepared;
        prepared.timeline.mark("rules");
        Ok(Some(prepared))
    }

    /// The sandbox could not be created: undo `prepare`.
    pub async fn abort(&self, p: Prepared) {
        cleanup(&p.paths, Some(&p.netns), Some(&p.redirect)).await;
    }

    /// The sandbox exists (init `pause_pid`): start its proxy.
    pub async fn launch(&self, mut p: Prepared, pause_pid: i32) -> Result<()> {
        p.timeline.mark("sandbox");
        let name = pod_name(&p.pod);
        let plan = match plan(&p, pause_pid) {
            Ok(plan) => plan,
            Err(e) => {
                cleanup(&p.paths, Some(&p.netns), Some(&p.redirect)).await;
                return Err(Error::Sandbox(format!(
                    "pod {name}: cannot start the proxy: {e}"
                )));
            }
        };
        let proxy = Supervisor::start(plan);
        let pod = Pod {
            timeline: std::sync::Mutex::new(p.timeline),
            readiness_port: p.redirect.readiness_port,
            readiness_path: p.node.proxy.readiness_path.clone(),
            pod: p.pod,
            netns: p.netns,
            redirect: p.redirect,
            paths: p.paths,
            ready_timeout: p.ready_timeout,
            proxy,
        };
        self.pods.lock().await.insert(p.id, Arc::new(pod));
        Ok(())
    }

    /// The sandbox's own start: a proxy that can never start fails it now,
    /// naming why, instead of leaving app containers to wait behind a
    /// restart loop. Waiting here rather than at create lets the launcher
    /// run while containerd moves from create to start.
    pub async fn started(&self, id: &str) -> Result<()> {
        let Some(pod) = self.pods.lock().await.get(id).cloned() else {
            return Ok(());
        };
        if let Err(f) = pod.proxy.first_start().await {
            // No restart loop: containerd deletes the failed sandbox, and
            // its delete removes the rules and files.
            pod.proxy.stop().await;
            return Err(Error::Sandbox(format!(
                "pod {}: the sidetunnel proxy cannot start: {}",
                pod_name(&pod.pod),
                f.message
            )));
        }
        let mut t = pod.timeline.lock().unwrap_or_else(|p| p.into_inner());
        if t.mark("proxy_exec") {
            t.save(&pod.paths);
        }
        Ok(())
    }

    /// Before an app container starts: wait until its pod's proxy is ready.
    pub async fn await_ready(&self, id: &str) -> Result<()> {
        let Some(sandbox) = self.members.lock().await.get(id).cloned() else {
            return Ok(());
        };
        let Some(pod) = self.pods.lock().await.get(&sandbox).cloned() else {
            return Ok(());
        };
        // When the app asked to start: `ready` minus this is how long the
        // proxy held the app back (zero when it was ready first).
        pod.timeline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .mark("app_start");
        let deadline = tokio::time::Instant::now() + pod.ready_timeout;
        let mut last_probe = String::from("not probed yet");
        // Probes start close together: the proxy is usually ready within
        // tens of milliseconds of the sandbox, and every millisecond here
        // is added to the pod's start.
        let mut poll = READY_POLL_FIRST;
        let mut states = pod.proxy.state.clone();
        loop {
            // Seen: a change from here on ends the wait below.
            states.borrow_and_update();
            let state = pod.proxy.current();
            match state {
                ProxyState::Running { .. } => {
                    match ready::probe(&pod.netns, pod.readiness_port, &pod.readiness_path).await {
                        Ok(()) => {
                            let mut t = pod.timeline.lock().unwrap_or_else(|p| p.into_inner());
                            if t.mark("ready") {
                                t.save(&pod.paths);
                            }
                            return Ok(());
                        }
                        Err(e) => last_probe = e,
                    }
                }
                ProxyState::Stopped => {
                    return Err(Error::FailedPrecondition(format!(
                        "pod {}: the sidetunnel proxy is stopped (pod is shutting down)",
                        pod_name(&pod.pod)
                    )));
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                let rec = Record::load(&pod.paths).unwrap_or_default();
                return Err(Error::Sandbox(format!(
                    "pod {}: proxy not ready after {:?}: last state: {state}; last readiness check (127.0.0.1:{}{} in the pod netns): {last_probe}; restarts: {}",
                    pod_name(&pod.pod),
                    pod.ready_timeout,
                    pod.readiness_port,
                    pod.readiness_path,
                    rec.restarts
                )));
            }
            // A state change (started, restarted, stopped) is acted on at
            // once; a running proxy that is not ready yet is probed again
            // after `poll`.
            if let Ok(Err(_)) = tokio::time::timeout(poll, states.changed()).await {
                // The supervisor is gone: plain polling until the deadline.
                tokio::time::sleep(poll).await;
            }
            poll = (poll * 2).min(READY_POLL_MAX);
        }
    }

    /// Sandbox kill: drain and stop its proxy (no-op for other containers).
    pub async fn stop(&self, id: &str) {
        let pod = self.pods.lock().await.get(id).cloned();
        if let Some(pod) = pod {
            pod.proxy.stop().await;
        }
    }

    /// Container delete: for a sandbox, stop the proxy, remove the rules and files.
    pub async fn remove(&self, id: &str) {
        self.members.lock().await.remove(id);
        let pod = self.pods.lock().await.remove(id);
        if let Some(pod) = pod {
            pod.proxy.stop().await;
            cleanup(&pod.paths, Some(&pod.netns), Some(&pod.redirect)).await;
            info!(pod = %pod_name(&pod.pod), "sandbox resources removed");
        }
    }

    pub async fn stop_all(&self) {
        let ids: Vec<String> = self.pods.lock().await.keys().cloned().collect();
        for id in ids {
            self.remove(&id).await;
        }
    }
}

fn base_record(p: &Prepared) -> Record {
    Record {
        sandbox_id: p.id.clone(),
        pod: pod_name(&p.pod),
        netns: Some(p.netns.clone()),
        redirect: Some(p.redirect.clone()),
        ..Default::default()
    }
}

/// `<root>/<id>` root-owned 0711; `<root>/<id>/proxy` proxy-owned 0700.
fn prepare_dirs(p: &Prepared) -> std::io::Result<()> {
    let root = &p.node.proxy.state_root;
    std::fs::create_dir_all(root)?;
    std::fs::create_dir_all(&p.paths.dir)?;
    std::fs::set_permissions(&p.paths.dir, std::fs::Permissions::from_mode(0o711))?;
    std::fs::create_dir_all(&p.paths.proxy_dir)?;
    std::fs::set_permissions(&p.paths.proxy_dir, std::fs::Permissions::from_mode(0o700))?;
    std::os::unix::fs::chown(
        &p.paths.proxy_dir,
        Some(p.node.proxy.uid),
        Some(p.node.proxy.gid),
    )?;
    Ok(())
}

/// With DNS capture on, the proxy's DNS server forwards what the mesh does
/// not answer to the pod's own resolvers: it gets a copy of the
/// resolv.conf the runtime wrote for the pod (the proxy runs outside the
/// pod's mount namespace). Without one, capture would send the app's DNS to
/// a proxy with nowhere to forward it: the sandbox fails instead.
fn copy_resolv_conf(p: &Prepared) -> std::result::Result<PathBuf, String> {
    let src = p.pod.resolv_conf.as_ref().ok_or(
        "DNS capture is on but the sandbox spec names no resolv.conf \
         (no /etc/resolv.conf mount, no CRI-O ResolvPath)",
    )?;
    let dst = p.paths.proxy_dir.join("resolv.conf");
    std::fs::copy(src, &dst).map_err(|e| format!("copy resolv.conf {}: {e}", src.display()))?;
    std::os::unix::fs::chown(&dst, Some(p.node.proxy.uid), Some(p.node.proxy.gid))
        .map_err(|e| format!("chown {}: {e}", dst.display()))?;
    Ok(dst)
}

/// Builds the launch plan: cgroups of the pause process, identity, token,
/// arguments and environment.
fn plan(p: &Prepared, pause_pid: i32) -> std::result::Result<ProxyPlan, String> {
    let node = &p.node;
    let px = &node.proxy;
    let cgroup_procs: Vec<PathBuf> = cgroup::of_pid(pause_pid)
        .map_err(|e| format!("cgroups of the sandbox (pid {pause_pid}): {e}"))?
        .into_iter()
        .map(|d| d.path.join("cgroup.procs"))
        .filter(|p| p.exists())
        .collect();
    if cgroup_procs.is_empty() {
        return Err(format!("no cgroup found for the sandbox (pid {pause_pid})"));
    }

    let roots = p.paths.proxy_dir.join("root-cert.pem");
    std::fs::copy(&node.mesh.root_cert, &roots)
        .map_err(|e| format!("copy root cert {}: {e}", node.mesh.root_cert.display()))?;
    std::os::unix::fs::chown(&roots, Some(px.uid), Some(px.gid)).map_err(|e| e.to_string())?;

    let pod = &p.pod;
    let kubelet_token = token::locate(
        &node.token.path_template,
        &pod.uid,
        &pod.namespace,
        &pod.name,
    );
    let token_copy = p.paths.proxy_dir.join("token");
    let (token, service_account) = match &kubelet_token {
        Some(src) => {
            let jwt = token::copy(src, &token_copy, px.uid, px.gid)
                .map_err(|e| format!("copy service-account token {}: {e}", src.display()))?;
            let sa = token::service_account(&jwt).unwrap_or_else(|| {
                warn!(pod = %pod_name(pod), "service account not found in the token; using \"default\"");
                "default".into()
            });
            (
                Some((src.clone(), token_copy.clone(), node.token.refresh_interval)),
                sa,
            )
        }
        None if node.token.required => {
            return Err(format!(
                "no service-account token for pod uid {} at {} (token.required = true)",
                pod.uid, node.token.path_template
            ));
        }
        None => {
            warn!(pod = %pod_name(pod), template = %node.token.path_template, "no service-account token found");
            (None, "default".into())
        }
    };

    let admin_socket = p.paths.proxy_dir.join("admin.sock");
    let lookup = |k: &str| -> Option<String> {
        Some(match k {
            "sandbox_id" => p.id.clone(),
            "pod_namespace" => pod.namespace.clone(),
            "pod_name" => pod.name.clone(),
            "pod_uid" => pod.uid.clone(),
            "service_account" => service_account.clone(),
            "state_dir" => p.paths.proxy_dir.display().to_string(),
            "admin_socket" => admin_socket.display().to_string(),
            "token_file" => token
                .as_ref()
                .map(|t| t.1.display().to_string())
                .unwrap_or_default(),
            _ => return None,
        })
    };
    let mut args = px
        .args
        .iter()
        .map(|a| expand(a, lookup))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    args.extend(p.prefetch_arg.clone());
    let mut env: Vec<(String, String)> = vec![(
        "PATH".into(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
    )];
    if px.standard_env {
        let r = &p.redirect;
        let mut std_env = vec![
            (proxy_env::POD_NAMESPACE, pod.namespace.clone()),
            (proxy_env::POD_NAME, pod.name.clone()),
            (proxy_env::POD_UID, pod.uid.clone()),
            (proxy_env::SERVICE_ACCOUNT, service_account.clone()),
            (proxy_env::CLUSTER_ID, node.mesh.cluster_id.clone()),
            (proxy_env::TRUST_DOMAIN, node.mesh.trust_domain.clone()),
            (proxy_env::XDS_ADDRESS, node.mesh.xds_address.clone()),
            (proxy_env::XDS_ROOT_CERT, roots.display().to_string()),
            (proxy_env::ADMIN_SOCKET, admin_socket.display().to_string()),
            (proxy_env::OUTBOUND_PORT, r.outbound_port.to_string()),
            (
                proxy_env::INBOUND_PLAINTEXT_PORT,
                r.inbound_plaintext_port.to_string(),
            ),
            (proxy_env::HBONE_PORT, r.hbone_port.to_string()),
            (proxy_env::METRICS_PORT, r.metrics_port.to_string()),
            (proxy_env::READINESS_PORT, r.readiness_port.to_string()),
            (proxy_env::MARK, format!("{:#x}", r.proxy_mark)),
        ];
        if let Some(ca) = &node.mesh.ca_address {
            std_env.push((proxy_env::CA_ADDRESS, ca.clone()));
        }
        if let Some(n) = &node.mesh.node_name {
            std_env.push((proxy_env::NODE_NAME, n.clone()));
        }
        if let Some(t) = &token {
            std_env.push((proxy_env::TOKEN_FILE, t.1.display().to_string()));
        }
        if r.dns_capture {
            let resolv = copy_resolv_conf(p)?;
            std_env.push((proxy_env::DNS_PROXY, "true".into()));
            std_env.push((proxy_env::DNS_PORT, r.dns_port.to_string()));
            std_env.push((proxy_env::DNS_RESOLV_CONF, resolv.display().to_string()));
        }
        env.extend(std_env.into_iter().map(|(k, v)| (k.to_owned(), v)));
    }
    for (k, v) in &px.env {
        let v = expand(v, lookup)?;
        env.retain(|(ek, _)| ek != k);
        env.push((k.clone(), v));
    }

    let mut rec = base_record(p);
    rec.state = "starting".into();
    Ok(ProxyPlan {
        launch: LaunchSpec {
            netns: p.netns.clone(),
            cgroup_procs,
            state_root: px.state_root.clone(),
            state_dir: p.paths.proxy_dir.clone(),
            uid: px.uid,
            gid: px.gid,
            binary: px.binary.clone(),
            args,
            env,
            max_open_files: px.max_open_files,
        },
        paths: p.paths.clone(),
        log_file: pod.log_directory.as_deref().map(crilog::log_path),
        drain: px.drain_grace,
        backoff: Backoff::new(px.restart_backoff_initial, px.restart_backoff_max),
        token,
        record: rec,
        upgrade: node.upgrade.clone(),
    })
}

#[derive(Clone, Copy)]
enum Op {
    Install,
    Remove,
}

/// Installs or removes the redirection in `netns`, in this process over
/// netlink (nothing spawned, so nothing races the subreaper); on the
/// blocking pool because the kernel may load nftables modules meanwhile.
async fn run_redirect(
    op: Op,
    netns: &Path,
    cfg: &RedirectConfig,
) -> std::result::Result<(), String> {
    let (netns, cfg) = (netns.to_path_buf(), cfg.clone());
    tokio::task::spawn_blocking(move || match op {
        Op::Install => sidetunnel_redirect::install(&netns, &cfg),
        Op::Remove => sidetunnel_redirect::remove(&netns, &cfg),
    })
    .await
    .map_err(|e| format!("redirection task: {e}"))?
    .map_err(|e| e.to_string())
}

/// Removes the ruleset (when the netns still exists) and the state directory.
pub async fn cleanup(paths: &Paths, netns: Option<&Path>, redirect: Option<&RedirectConfig>) {
    if let (Some(netns), Some(cfg)) = (netns, redirect)
        && netns.exists()
        && let Err(e) = run_redirect(Op::Remove, netns, cfg).await
    {
        warn!(netns = %netns.display(), "removing redirection: {e}");
    }
    if let Err(e) = std::fs::remove_dir_all(&paths.dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!("remove {}: {e}", paths.dir.display());
    }
}

/// Delete-after-crash: whatever a dead shim left for sandbox `id`.
pub async fn cleanup_after_crash(state_root: &Path, id: &str) {
    let paths = Paths::new(state_root, id);
    let Some(rec) = Record::load(&paths) else {
        if paths.dir.exists() {
            cleanup(&paths, None, None).await;
        }
        return;
    };
    record::kill_recorded(&rec);
    cleanup(&paths, rec.netns.as_deref(), rec.redirect.as_ref()).await;
    info!(sandbox = id, pod = %rec.pod, "cleaned up sandbox resources after shim exit");
}
