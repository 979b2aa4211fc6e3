//! The shim's process-level lifecycle (containerd's shim v2 `start` and
//! `delete` actions, and the long-running server): one shim per pod, grouped
//! by the CRI sandbox id, so every container of a pod shares the shim that
//! supervises the pod's proxy.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::asynchronous::monitor::{monitor_subscribe, monitor_unsubscribe};
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{ExitSignal, Shim};
use containerd_shim::monitor::{Subject, Topic};
use containerd_shim::mount::umount_recursive;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::ttrpc::context::with_duration;
use containerd_shim::util::{timestamp, write_str_to_file};
use containerd_shim::{Config, DeleteResponse, Error, Flags, StartOpts, io_error};
use runc::options::DeleteOpts;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::bootstrap::{self, StartInput};
use crate::config::NodeConfig;
use crate::container::INIT_PID_FILE;
use crate::options::RuntimeOptions;
use crate::sandbox::{Sandboxes, cleanup_after_crash};
use crate::settings::Settings;
use crate::task::TaskService;
use crate::{logging, runtime};

pub struct Service {
    id: String,
    namespace: String,
    debug: bool,
    exit: Arc<ExitSignal>,
}

type ShimResult<T> = containerd_shim::Result<T>;

fn other(msg: impl std::fmt::Display) -> containerd_shim::Error {
    containerd_shim::Error::Other(msg.to_string())
}

/// The pod a bundle belongs to (its sandbox id), or the container's own id.
fn grouping(bundle: &Path, id: &str) -> String {
    sidetunnel_oci::classify_bundle(bundle)
        .ok()
        .and_then(|r| r.sandbox_id().map(str::to_owned))
        .unwrap_or_else(|| id.to_owned())
}

#[async_trait]
impl Shim for Service {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, config: &mut Config) -> Self {
        // tracing is set up by create_task_service (it owns the log FIFO).
        config.no_setup_logger = true;
        Service {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            debug: args.debug,
            exit: Arc::default(),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> ShimResult<String> {
        let mut raw = Vec::new();
        std::io::stdin()
            .read_to_end(&mut raw)
            .map_err(io_error!(e, "read start input from stdin"))?;
        let input = StartInput::parse(&raw, &opts.id, &opts.namespace).map_err(other)?;
        let ropts = input.options();
        // Validate the node config now: a broken one fails the pod's first
        // RunPodSandbox with the reason, before anything runs.
        let path = NodeConfig::path(ropts.config_path.as_deref());
        NodeConfig::load(&path).map_err(other)?;

        let cwd = std::env::current_dir().map_err(io_error!(e, "current dir"))?;
        let group = grouping(&cwd, &opts.id);
        let mut address = containerd_shim::socket_address(&opts.address, &opts.namespace, &group);
        if let StartInput::Bootstrap(params) = &input {
            address = bootstrap::in_socket_dir(&address, params.socket_dir.as_deref());
        }
        let exe = std::env::current_exe().map_err(io_error!(e, "locate shim binary"))?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.current_dir(&cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .args([
                "-namespace",
                &opts.namespace,
                "-id",
                &opts.id,
                "-address",
                &opts.address,
            ])
            .args(["-socket", &address]);
        if opts.debug {
            cmd.arg("-debug");
        }
        if let StartInput::Bootstrap(params) = &input
            && !params.ttrpc_address.is_empty()
        {
            // The server publishes events there; containerd 2.3 still sets
            // TTRPC_ADDRESS too, but the bootstrap parameters are the contract.
            cmd.env("TTRPC_ADDRESS", &params.ttrpc_address);
        }
        let mut child = cmd.spawn().map_err(io_error!(e, "spawn shim server"))?;
        let pid = child.id().unwrap_or_default();
        if let Some(cg) = &ropts.shim_cgroup {
            containerd_shim::cgroup::add_task_to_cgroup(cg, pid)?;
        }
        // Best effort, and silent: containerd reads stdout and stderr of
        // `start` together as the response, so nothing else may be printed.
        let _ = containerd_shim::cgroup::adjust_oom_score(pid);
        // The server redirects its stdout once it listens (or found the
        // pod's shim already listening): EOF here means it is ready.
        if let Some(mut out) = child.stdout.take() {
            let mut sink = Vec::new();
            out.read_to_end(&mut sink)
                .await
                .map_err(io_error!(e, "wait for shim server"))?;
        }
        write_str_to_file("address", &address).await?;
        // The crate writes the returned string to stdout as it is; the
        // containerd 2.3+ response is a protobuf, so it is written here and
        // the crate is left nothing to add.
        let mut stdout = std::io::stdout().lock();
        stdout
            .write_all(&input.response(&address))
            .and_then(|()| stdout.flush())
            .map_err(io_error!(e, "write start response"))?;
        Ok(String::new())
    }

    async fn delete_shim(&mut self) -> ShimResult<DeleteResponse> {
        let bundle = std::env::current_dir().map_err(io_error!(e, "current dir"))?;
        let ropts = RuntimeOptions::load(&bundle);
        let node = NodeConfig::load(&NodeConfig::path(ropts.config_path.as_deref())).ok();
        let binary = node.as_ref().map_or("runc", |n| n.runtime.binary.as_str());
        let mut ropts2 = ropts.clone();
        if ropts2.root.is_none() {
            ropts2.root = node
                .as_ref()
                .and_then(|n| n.runtime.root.as_ref())
                .map(|p| p.display().to_string());
        }
        let runc = runtime::build(binary, &ropts2, &self.namespace, &bundle).map_err(other)?;
        if let Err(e) = runc
            .delete(&self.id, Some(&DeleteOpts::new().force(true)))
            .await
        {
            eprintln!("delete runtime container {}: {e}", self.id);
        }
        if let Err(e) = umount_recursive(bundle.join("rootfs").to_str(), 0) {
            eprintln!("unmount rootfs: {e}");
        }
        let state_root = node.as_ref().map_or_else(
            || std::path::PathBuf::from("/run/sidetunnel"),
            |n| n.proxy.state_root.clone(),
        );
        cleanup_after_crash(&state_root, &self.id).await;
        let pid = std::fs::read_to_string(bundle.join(INIT_PID_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(0);
        let mut r = DeleteResponse::new();
        r.set_exit_status(128 + libc::SIGKILL as u32);
        r.set_exited_at(timestamp()?);
        r.set_pid(pid);
        Ok(r)
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        logging::init(self.debug, &self.namespace, &self.id);
        let (events, events_rx) = mpsc::channel(256);
        let (oom_tx, oom_rx) = mpsc::channel(16);
        forward_events(publisher, self.namespace.clone(), events_rx);
        TaskService::spawn_oom_forwarder(events.clone(), oom_rx);
        let task = TaskService::new(
            events,
            oom_tx,
            self.exit.clone(),
            Arc::new(Settings::new(&self.namespace)),
            Arc::new(Sandboxes::default()),
        );
        match monitor_subscribe(Topic::Pid).await {
            Ok(mut sub) => {
                let t = task.clone();
                tokio::spawn(async move {
                    while let Some(ev) = sub.rx.recv().await {
                        if let Subject::Pid(pid) = ev.subject {
                            t.handle_exit(pid, ev.exit_code).await;
                        }
                    }
                    monitor_unsubscribe(sub.id).await.unwrap_or_default();
                });
            }
            Err(e) => warn!("exit monitor unavailable: {e}"),
        }
        info!(id = %self.id, namespace = %self.namespace, "shim serving");
        task
    }
}

fn forward_events(
    publisher: RemotePublisher,
    namespace: String,
    mut rx: mpsc::Receiver<(String, Box<dyn MessageDyn>)>,
) {
    tokio::spawn(async move {
        while let Some((topic, event)) = rx.recv().await {
            let ctx = with_duration(Duration::from_secs(5));
            if let Err(e) = publisher.publish(ctx, &topic, &namespace, event).await {
                warn!("publish {topic}: {e}");
            }
        }
    });
}
