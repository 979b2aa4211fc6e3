//! The task service containerd calls (task API v2), backed by the OCI runtime,
//! with the sandbox hooks wired in at the points where a pod's proxy must
//! exist (sandbox create), be ready (app container start) or go away
//! (sandbox kill/delete).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::api::{
    CreateTaskRequest, CreateTaskResponse, DeleteRequest, Empty, ExecProcessRequest, KillRequest,
    PauseRequest, ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest, StartResponse,
    StateRequest, StateResponse, Status, WaitRequest, WaitResponse,
};
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::event::Event;
use containerd_shim::protos::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, DeleteResponse, PidsRequest, PidsResponse,
    ProcessInfo, StatsRequest, StatsResponse, UpdateTaskRequest,
};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::shim::oci::ProcessDetails;
use containerd_shim::util::{convert_to_any, convert_to_timestamp};
use containerd_shim::{Task, TtrpcContext, TtrpcResult};
use tokio::sync::{Mutex, mpsc};
use tracing::{info, instrument, warn};

use crate::container::{Container, shares_pid_namespace};
use crate::error::{Error, Result};
use crate::options::RuntimeOptions;
use crate::runtime;
use crate::sandbox::Sandboxes;
use crate::settings::Settings;

pub type EventTx = mpsc::Sender<(String, Box<dyn MessageDyn>)>;

#[derive(Clone)]
pub struct TaskService {
    pub containers: Arc<Mutex<HashMap<String, Container>>>,
    events: EventTx,
    oom_tx: mpsc::Sender<String>,
    exit: Arc<ExitSignal>,
    settings: Arc<Settings>,
    sandboxes: Arc<Sandboxes>,
}

impl TaskService {
    pub fn new(
        events: EventTx,
        oom_tx: mpsc::Sender<String>,
        exit: Arc<ExitSignal>,
        settings: Arc<Settings>,
        sandboxes: Arc<Sandboxes>,
    ) -> TaskService {
        TaskService {
            containers: Arc::default(),
            events,
            oom_tx,
            exit,
            settings,
            sandboxes,
        }
    }

    async fn publish(&self, event: impl Event) {
        publish(&self.events, event).await;
    }

    async fn with<T>(
        &self,
        id: &str,
        f: impl AsyncFnOnce(&mut Container) -> Result<T>,
    ) -> Result<T> {
        let mut containers = self.containers.lock().await;
        let c = containers
            .get_mut(id)
            .ok_or_else(|| Error::ContainerNotFound(id.into()))?;
        f(c).await
    }

    async fn do_create(&self, req: &CreateTaskRequest) -> Result<u32> {
        let bundle = Path::new(&req.bundle);
        let opts = RuntimeOptions::from_any(req.options.as_ref())?;
        opts.save(bundle)?;
        let node = self.settings.node(opts.config_path.as_deref())?;
        let spec = sidetunnel_oci::Spec::load_bundle(bundle)
            .map_err(|e| Error::InvalidArgument(format!("bundle {}: {e}", bundle.display())))?;
        let role = sidetunnel_oci::classify(&spec)
            .map_err(|e| Error::InvalidArgument(format!("bundle {}: {e}", bundle.display())))?;
        let mut ropts = opts.clone();
        if ropts.root.is_none() {
            ropts.root = node.runtime.root.as_ref().map(|p| p.display().to_string());
        }
        let runc = runtime::build(
            &node.runtime.binary,
            &ropts,
            &self.settings.namespace,
            bundle,
        )?;

        // Redirection goes in before the sandbox (and so any app container) exists.
        let prepared = self.sandboxes.prepare(&req.id, &role, &node).await?;
        let mut containers = self.containers.lock().await;
        if containers.contains_key(&req.id) {
            return Err(Error::AlreadyExists(format!("container {}", req.id)));
        }
        let created = Container::create(
            req,
            runc,
            opts.no_pivot_root,
            opts.no_new_keyring,
            shares_pid_namespace(&spec),
        )
        .await;
        let c = match created {
            Ok(c) => c,
            Err(e) => {
                if let Some(p) = prepared {
                    self.sandboxes.abort(p).await;
                }
                return Err(e);
            }
        };
        let pid = c.init.pid;
        if let Some(p) = prepared
            && let Err(e) = self.sandboxes.launch(p, pid).await
        {
            let mut c = c;
            let _ = c.kill("", libc::SIGKILL as u32, true).await;
            c.init.status = Status::STOPPED;
            if let Err(de) = c.delete("").await {
                warn!(id = %req.id, "cleanup after failed sandbox hook: {de}");
            }
            self.sandboxes.remove(&req.id).await;
            return Err(e);
        }
        containers.insert(req.id.clone(), c);
        Ok(pid as u32)
    }

    /// Applies an exit the reaper reported to whichever process had `pid`.
    pub async fn handle_exit(&self, pid: i32, code: i32) {
        let mut containers = self.containers.lock().await;
        for c in containers.values_mut() {
            if c.init.pid == pid && !c.init.has_exited() {
                if c.shared_pid_ns {
                    // Nothing else reaps the container's other processes.
                    if let Err(e) = c.kill("", libc::SIGKILL as u32, true).await {
                        tracing::debug!(id = %c.id, "kill remaining processes: {e}");
                    }
                }
                c.init.set_exited(code);
                for e in c.execs.values_mut() {
                    if e.proc.pid == 0 {
                        e.proc.set_exited(255);
                    }
                }
                let ev = exit_event(&c.id, &c.init);
                publish(&self.events, ev).await;
                return;
            }
            if let Some(e) = c
                .execs
                .values_mut()
                .find(|e| e.proc.pid == pid && !e.proc.has_exited())
            {
                e.proc.set_exited(code);
                let ev = exit_event(&c.id, &e.proc);
                publish(&self.events, ev).await;
                return;
            }
        }
    }

    pub fn spawn_oom_forwarder(events: EventTx, mut rx: mpsc::Receiver<String>) {
        tokio::spawn(async move {
            while let Some(id) = rx.recv().await {
                info!(container = %id, "OOM event");
                publish(
                    &events,
                    TaskOOM {
                        container_id: id,
                        ..Default::default()
                    },
                )
                .await;
            }
        });
    }
}

fn exit_event(container_id: &str, p: &crate::process::Proc) -> TaskExit {
    TaskExit {
        container_id: container_id.to_owned(),
        id: p.id.clone(),
        pid: p.pid as u32,
        exit_status: p.exit_code as u32,
        exited_at: Some(convert_to_timestamp(p.exited_at)).into(),
        ..Default::default()
    }
}

pub async fn publish(events: &EventTx, event: impl Event) {
    let topic = event.topic();
    if let Err(e) = events.send((topic.clone(), Box::new(event))).await {
        warn!("queue event {topic}: {e}");
    }
}

#[async_trait]
impl Task for TaskService {
    #[instrument(skip_all, fields(id = %req.id))]
    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let r = self
            .with(&req.id, async |c| {
                let mut s = c.process(&req.exec_id)?.state(&c.bundle_str());
                if c.init.status == Status::PAUSED && s.status() == Status::RUNNING {
                    s.set_status(Status::PAUSED);
                }
                Ok(s)
            })
            .await?;
        Ok(r)
    }

    #[instrument(skip_all, fields(id = %req.id))]
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        info!(bundle = %req.bundle, terminal = req.terminal, "create");
        let pid = self
            .do_create(&req)
            .await
            .inspect_err(|e| warn!("create failed: {e}"))?;
        self.publish(TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: Some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            })
            .into(),
            checkpoint: req.checkpoint.clone(),
            pid,
            ..Default::default()
        })
        .await;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    #[instrument(skip_all, fields(id = %req.id, exec_id = %req.exec_id))]
    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        if req.exec_id.is_empty() {
            self.sandboxes
                .started(&req.id)
                .await
                .inspect_err(|e| warn!("sandbox start refused: {e}"))?;
            // Outside the containers lock: this can take the readiness timeout.
            self.sandboxes
                .await_ready(&req.id)
                .await
                .inspect_err(|e| warn!("start refused: {e}"))?;
        }
        let pid = self
            .with(&req.id, async |c| c.start(&req.exec_id).await)
            .await?;
        if req.exec_id.is_empty() {
            self.publish(TaskStart {
                container_id: req.id.clone(),
                pid: pid as u32,
                ..Default::default()
            })
            .await;
            if let Err(e) = crate::oom::watch(req.id.clone(), pid, self.oom_tx.clone()) {
                warn!("OOM monitoring unavailable: {e}");
            }
        } else {
            self.publish(TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid: pid as u32,
                ..Default::default()
            })
            .await;
        }
        info!(pid, "started");
        Ok(StartResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    #[instrument(skip_all, fields(id = %req.id, exec_id = %req.exec_id))]
    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        let proc = self
            .with(&req.id, async |c| c.delete(&req.exec_id).await)
            .await?;
        if req.exec_id.is_empty() {
            self.containers.lock().await.remove(&req.id);
            self.sandboxes.remove(&req.id).await;
        }
        let ts = convert_to_timestamp(proc.exited_at);
        if req.exec_id.is_empty() {
            self.publish(TaskDelete {
                container_id: req.id.clone(),
                pid: proc.pid as u32,
                exit_status: proc.exit_code as u32,
                exited_at: Some(ts.clone()).into(),
                ..Default::default()
            })
            .await;
        }
        info!(exit_status = proc.exit_code, "deleted");
        let mut r = DeleteResponse::new();
        r.pid = proc.pid as u32;
        r.exit_status = proc.exit_code as u32;
        r.exited_at = Some(ts).into();
        Ok(r)
    }

    #[instrument(skip_all, fields(id = %req.id))]
    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let processes = self
            .with(&req.id, async |c| {
                let pids = c.pids().await?;
                let mut out = Vec::with_capacity(pids.len());
                for pid in pids {
                    let mut info = ProcessInfo {
                        pid: pid as u32,
                        ..Default::default()
                    };
                    if let Some((exec_id, _)) =
                        c.execs.iter().find(|(_, e)| e.proc.pid == pid as i32)
                    {
                        let d = ProcessDetails {
                            exec_id: exec_id.clone(),
                            ..Default::default()
                        };
                        let value = d
                            .write_to_bytes()
                            .map_err(|e| Error::Sandbox(e.to_string()))?;
                        info.info = Some(Any {
                            type_url: d.descriptor_dyn().full_name().to_owned(),
                            value,
                            ..Default::default()
                        })
                        .into();
                    }
                    out.push(info);
                }
                Ok(out)
            })
            .await?;
        Ok(PidsResponse {
            processes,
            ..Default::default()
        })
    }

    #[instrument(skip_all, fields(id = %req.id))]
    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        self.with(&req.id, async |c| c.pause().await).await?;
        self.publish(TaskPaused {
            container_id: req.id.clone(),
            ..Default::default()
        })
        .await;
        Ok(Empty::new())
    }

    #[instrument(skip_all, fields(id = %req.id))]
    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        self.with(&req.id, async |c| c.resume().await).await?;
        self.publish(TaskResumed {
            container_id: req.id.clone(),
            ..Default::default()
        })
        .await;
        Ok(Empty::new())
    }

    #[instrument(skip_all, fields(id = %req.id, exec_id = %req.exec_id, signal = req.signal, all = req.all))]
    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        let terminating = [libc::SIGKILL, libc::SIGTERM, libc::SIGINT, libc::SIGQUIT];
        if req.exec_id.is_empty() && terminating.contains(&(req.signal as i32)) {
            // The pod is stopping: drain the proxy before the sandbox goes.
            self.sandboxes.stop(&req.id).await;
        }
        self.with(&req.id, async |c| {
            c.kill(&req.exec_id, req.signal, req.all).await
        })
        .await?;
        Ok(Empty::new())
    }

    #[instrument(skip_all, fields(id = %req.id, exec_id = %req.exec_id))]
    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        self.with(&req.id, async |c| c.add_exec(&req)).await?;
        self.publish(TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
        .await;
        Ok(Empty::new())
    }

    #[instrument(skip_all, fields(id = %req.id, exec_id = %req.exec_id))]
    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        self.with(&req.id, async |c| {
            c.process(&req.exec_id)?
                .resize(req.height, req.width)
                .map_err(Error::io("resize pty"))
        })
        .await?;
        Ok(Empty::new())
    }

    #[instrument(skip_all, fields(id = %req.id, exec_id = %req.exec_id))]
    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        // stdin FIFOs are handed to the process itself; containerd closing
        // its write end is what delivers EOF. Only check the process exists.
        self.with(&req.id, async |c| c.process(&req.exec_id).map(drop))
            .await?;
        Ok(Empty::new())
    }

    #[instrument(skip_all, fields(id = %req.id))]
    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let raw = req
            .resources
            .as_ref()
            .map(|a| a.value.as_slice())
            .unwrap_or_default();
        let resources: oci_spec::runtime::LinuxResources = serde_json::from_slice(raw)
            .map_err(|e| Error::InvalidArgument(format!("resources: {e}")))?;
        self.with(&req.id, async |c| c.update(&resources).await)
            .await?;
        Ok(Empty::new())
    }

    #[instrument(skip_all, fields(id = %req.id, exec_id = %req.exec_id))]
    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let mut rx = self
            .with(&req.id, async |c| Ok(c.process(&req.exec_id)?.exit_watch()))
            .await?;
        let _ = rx.wait_for(|e| *e).await;
        let (code, at) = self
            .with(&req.id, async |c| {
                let p = c.process(&req.exec_id)?;
                Ok((p.exit_code, p.exited_at))
            })
            .await?;
        Ok(WaitResponse {
            exit_status: code as u32,
            exited_at: Some(convert_to_timestamp(at)).into(),
            ..Default::default()
        })
    }

    #[instrument(skip_all, fields(id = %req.id))]
    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let pid = self.with(&req.id, async |c| Ok(c.init.pid)).await?;
        if pid <= 0 {
            return Err(
                Error::FailedPrecondition(format!("container {} has no process", req.id)).into(),
            );
        }
        let metrics = tokio::task::spawn_blocking(move || {
            let cg = containerd_shim::cgroup::get_cgroup(pid as u32)?;
            containerd_shim::cgroup::collect_metrics(&cg)
        })
        .await
        .map_err(|e| Error::Sandbox(format!("stats task: {e}")))?
        .map_err(Error::shim("collect cgroup metrics"))?;
        let any = convert_to_any(Box::new(metrics)).map_err(Error::shim("encode metrics"))?;
        Ok(StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }

    #[instrument(skip_all, fields(id = %req.id))]
    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        let task_pid = self
            .with(&req.id, async |c| Ok(c.init.pid))
            .await
            .unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: task_pid as u32,
            ..Default::default()
        })
    }

    #[instrument(skip_all)]
    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        if !self.containers.lock().await.is_empty() {
            return Ok(Empty::new());
        }
        self.sandboxes.stop_all().await;
        info!("no containers left; shutting down");
        self.exit.signal();
        Ok(Empty::new())
    }
}
