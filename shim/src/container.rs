//! A container the shim runs through the OCI runtime: its init process, its
//! execs, and the runtime commands behind create/start/exec/kill/delete.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use containerd_shim::api::{CreateTaskRequest, ExecProcessRequest, Status};
use containerd_shim::mount::umount_recursive;
use containerd_shim::util::mount_rootfs;
use runc::Runc;
use runc::options::{CreateOpts, DeleteOpts, ExecOpts, KillOpts};

use crate::error::{Error, Result};
use crate::process::Proc;
use crate::runtime;
use crate::stdio::{ConsoleSocket, Stdio, pump_console};

pub const INIT_PID_FILE: &str = "init.pid";

pub struct Exec {
    pub proc: Proc,
    spec: oci_spec::runtime::Process,
}

pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub runc: Runc,
    pub init: Proc,
    pub execs: HashMap<String, Exec>,
    /// The container joins another's PID namespace (or the host's): its
    /// processes outlive init, so they are killed when init exits.
    pub shared_pid_ns: bool,
    pub no_pivot_root: bool,
    pub no_new_keyring: bool,
}

fn stdio_of(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> Stdio {
    Stdio {
        stdin: stdin.into(),
        stdout: stdout.into(),
        stderr: stderr.into(),
        terminal,
    }
}

fn read_pid(path: &Path) -> Result<i32> {
    let text =
        std::fs::read_to_string(path).map_err(Error::io(format!("read {}", path.display())))?;
    text.trim().parse().map_err(|_| Error::Runtime {
        op: "read pid file",
        msg: format!("{} holds {text:?}", path.display()),
    })
}

impl Container {
    /// Mounts the rootfs and runs `runtime create`.
    pub async fn create(
        req: &CreateTaskRequest,
        runc: Runc,
        no_pivot_root: bool,
        no_new_keyring: bool,
        shared_pid_ns: bool,
    ) -> Result<Container> {
        let bundle = PathBuf::from(&req.bundle);
        if !req.rootfs.is_empty() {
            let rootfs = bundle.join("rootfs");
            std::fs::create_dir_all(&rootfs)
                .map_err(Error::io(format!("mkdir {}", rootfs.display())))?;
            for m in &req.rootfs {
                mount_rootfs(m, &rootfs)
                    .await
                    .map_err(Error::shim(format!("mount rootfs {}", rootfs.display())))?;
            }
        }
        let stdio = stdio_of(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        let mut c = Container {
            id: req.id.clone(),
            bundle,
            runc,
            init: Proc::new(&req.id, stdio),
            execs: HashMap::new(),
            shared_pid_ns,
            no_pivot_root,
            no_new_keyring,
        };
        if let Err(e) = c.runtime_create().await {
            c.unmount_rootfs();
            return Err(e);
        }
        Ok(c)
    }

    async fn runtime_create(&mut self) -> Result<()> {
        let pid_file = self.bundle.join(INIT_PID_FILE);
        let mut opts = CreateOpts::new()
            .pid_file(&pid_file)
            .no_pivot(self.no_pivot_root)
            .no_new_keyring(self.no_new_keyring)
            .detach(false);
        let console = if self.init.stdio.terminal {
            let s = ConsoleSocket::new()?;
            opts = opts.console_socket(s.path());
            Some(s)
        } else {
            opts = opts.io(self.init.stdio.runtime_io()?);
            None
        };
        self.runc
            .create(&self.id, &self.bundle, Some(&opts))
            .await
            .map_err(|e| runtime::describe(&self.bundle, "OCI runtime create", e))?;
        if let Some(s) = console {
            let master = s.receive().await?;
            let exited = self.init.exit_watch();
            self.init.console = Some(pump_console(master, &self.init.stdio, exited).await?);
        }
        self.init.pid = read_pid(&pid_file)?;
        Ok(())
    }

    pub fn process(&self, exec_id: &str) -> Result<&Proc> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs
            .get(exec_id)
            .map(|e| &e.proc)
            .ok_or_else(|| Error::ExecNotFound {
                id: self.id.clone(),
                exec_id: exec_id.into(),
            })
    }

    pub fn bundle_str(&self) -> String {
        self.bundle.display().to_string()
    }

    /// Starts init (`runtime start`) or a registered exec (`runtime exec`).
    pub async fn start(&mut self, exec_id: &str) -> Result<i32> {
        if exec_id.is_empty() {
            if self.init.status != Status::CREATED {
                return Err(Error::FailedPrecondition(format!(
                    "container {} is {:?}, not created",
                    self.id, self.init.status
                )));
            }
            self.runc
                .start(&self.id)
                .await
                .map_err(|e| runtime::describe(&self.bundle, "OCI runtime start", e))?;
            if !self.init.has_exited() {
                self.init.status = Status::RUNNING;
            }
            return Ok(self.init.pid);
        }
        if self.init.has_exited() {
            return Err(Error::FailedPrecondition(format!(
                "container {} has exited",
                self.id
            )));
        }
        let pid_file = self.bundle.join(format!("{exec_id}.pid"));
        let exec = self
            .execs
            .get_mut(exec_id)
            .ok_or_else(|| Error::ExecNotFound {
                id: self.id.clone(),
                exec_id: exec_id.into(),
            })?;
        let mut opts = ExecOpts::new().pid_file(&pid_file).detach(true);
        let console = if exec.proc.stdio.terminal {
            let s = ConsoleSocket::new()?;
            opts = opts.console_socket(s.path());
            Some(s)
        } else {
            opts = opts.io(exec.proc.stdio.runtime_io()?);
            None
        };
        self.runc
            .exec(&self.id, &exec.spec, Some(&opts))
            .await
            .map_err(|e| runtime::describe(&self.bundle, "OCI runtime exec", e))?;
        if let Some(s) = console {
            let master = s.receive().await?;
            let exited = exec.proc.exit_watch();
            exec.proc.console = Some(pump_console(master, &exec.proc.stdio, exited).await?);
        }
        exec.proc.pid = read_pid(&pid_file)?;
        let _ = std::fs::remove_file(&pid_file);
        if !exec.proc.has_exited() {
            exec.proc.status = Status::RUNNING;
        }
        Ok(exec.proc.pid)
    }

    pub fn add_exec(&mut self, req: &ExecProcessRequest) -> Result<()> {
        if self.execs.contains_key(&req.exec_id) {
            return Err(Error::AlreadyExists(format!("exec {}", req.exec_id)));
        }
        if self.init.has_exited() {
            return Err(Error::FailedPrecondition(format!(
                "container {} has exited",
                self.id
            )));
        }
        let raw = req
            .spec
            .as_ref()
            .map(|a| a.value.as_slice())
            .unwrap_or_default();
        let mut spec: oci_spec::runtime::Process = serde_json::from_slice(raw)
            .map_err(|e| Error::InvalidArgument(format!("exec process spec: {e}")))?;
        spec.set_terminal(Some(req.terminal));
        let stdio = stdio_of(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        self.execs.insert(
            req.exec_id.clone(),
            Exec {
                proc: Proc::new(&req.exec_id, stdio),
                spec,
            },
        );
        Ok(())
    }

    pub async fn kill(&self, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        if exec_id.is_empty() {
            let opts = KillOpts::new().all(all);
            return self
                .runc
                .kill(&self.id, signal, Some(&opts))
                .await
                .map_err(|e| runtime::kill_error(&self.bundle, e));
        }
        let p = self.process(exec_id)?;
        if p.pid <= 0 {
            return Err(Error::FailedPrecondition(format!(
                "exec {exec_id} is not started"
            )));
        }
        if p.has_exited() {
            return Err(Error::ProcessFinished);
        }
        let sig = nix::sys::signal::Signal::try_from(signal as i32)
            .map_err(|_| Error::InvalidArgument(format!("signal {signal}")))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid), sig).map_err(|e| match e {
            nix::errno::Errno::ESRCH => Error::ProcessFinished,
            e => Error::io(format!("kill exec {exec_id}"))(e.into()),
        })
    }

    /// Deletes init (runtime state, rootfs) or forgets an exec.
    pub async fn delete(&mut self, exec_id: &str) -> Result<Proc> {
        if !exec_id.is_empty() {
            let p = self.process(exec_id)?;
            if p.status == Status::RUNNING {
                return Err(Error::FailedPrecondition(format!(
                    "exec {exec_id} is still running"
                )));
            }
            return Ok(self
                .execs
                .remove(exec_id)
                .map(|e| e.proc)
                .expect("checked above"));
        }
        if self.init.status == Status::RUNNING || self.init.status == Status::PAUSED {
            return Err(Error::FailedPrecondition(format!(
                "container {} must be stopped before delete",
                self.id
            )));
        }
        if let Err(e) = self
            .runc
            .delete(&self.id, Some(&DeleteOpts::new().force(true)))
            .await
        {
            let text = e.to_string().to_lowercase();
            if !text.contains("does not exist") && !text.contains("not found") {
                return Err(runtime::describe(&self.bundle, "OCI runtime delete", e));
            }
        }
        self.unmount_rootfs();
        let mut proc = Proc::new(&self.id, self.init.stdio.clone());
        std::mem::swap(&mut proc, &mut self.init);
        Ok(proc)
    }

    fn unmount_rootfs(&self) {
        let rootfs = self.bundle.join("rootfs");
        if let Err(e) = umount_recursive(rootfs.to_str(), 0) {
            tracing::warn!(container = %self.id, "unmount {}: {e}", rootfs.display());
        }
    }

    pub async fn pause(&mut self) -> Result<()> {
        if self.init.status != Status::RUNNING {
            return Err(Error::FailedPrecondition(format!(
                "cannot pause a {:?} container",
                self.init.status
            )));
        }
        self.runc
            .pause(&self.id)
            .await
            .map_err(|e| runtime::describe(&self.bundle, "OCI runtime pause", e))?;
        self.init.status = Status::PAUSED;
        Ok(())
    }

    pub async fn resume(&mut self) -> Result<()> {
        if self.init.status != Status::PAUSED {
            return Err(Error::FailedPrecondition(format!(
                "cannot resume a {:?} container",
                self.init.status
            )));
        }
        self.runc
            .resume(&self.id)
            .await
            .map_err(|e| runtime::describe(&self.bundle, "OCI runtime resume", e))?;
        self.init.status = Status::RUNNING;
        Ok(())
    }

    pub async fn update(&self, resources: &oci_spec::runtime::LinuxResources) -> Result<()> {
        if self.init.pid <= 0 || self.init.has_exited() {
            return Err(Error::FailedPrecondition(format!(
                "container {} is not running",
                self.id
            )));
        }
        self.runc
            .update(&self.id, resources)
            .await
            .map_err(|e| runtime::describe(&self.bundle, "OCI runtime update", e))
    }

    pub async fn pids(&self) -> Result<Vec<usize>> {
        self.runc
            .ps(&self.id)
            .await
            .map_err(|e| runtime::describe(&self.bundle, "OCI runtime ps", e))
    }
}

/// Whether the spec joins an existing PID namespace (or has none of its own).
pub fn shares_pid_namespace(spec: &sidetunnel_oci::Spec) -> bool {
    match &spec.linux {
        None => true,
        Some(l) => !l
            .namespaces
            .iter()
            .any(|n| n.kind == "pid" && n.path.is_none()),
    }
}
