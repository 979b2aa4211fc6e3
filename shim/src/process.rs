//! One process the shim tracks — a container's init or an exec — with its
//! lifecycle state, exit status and the channel `Wait` listens on.

use containerd_shim::api::{StateResponse, Status};
use containerd_shim::util::convert_to_timestamp;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::stdio::Stdio;

pub struct Proc {
    pub id: String,
    pub pid: i32,
    pub status: Status,
    pub exit_code: i32,
    pub exited_at: Option<OffsetDateTime>,
    pub stdio: Stdio,
    /// pty master of a terminal process (for resize).
    pub console: Option<std::fs::File>,
    exited: watch::Sender<bool>,
}

impl Proc {
    pub fn new(id: &str, stdio: Stdio) -> Proc {
        Proc {
            id: id.to_owned(),
            pid: 0,
            status: Status::CREATED,
            exit_code: 0,
            exited_at: None,
            stdio,
            console: None,
            exited: watch::channel(false).0,
        }
    }

    pub fn set_exited(&mut self, code: i32) {
        self.status = Status::STOPPED;
        self.exit_code = code;
        self.exited_at = Some(OffsetDateTime::now_utc());
        self.console = None;
        self.exited.send_replace(true);
    }

    pub fn has_exited(&self) -> bool {
        self.exited_at.is_some()
    }

    /// Resolves once the process has exited (immediately if it has).
    pub fn exit_watch(&self) -> watch::Receiver<bool> {
        self.exited.subscribe()
    }

    pub fn state(&self, bundle: &str) -> StateResponse {
        let mut r = StateResponse::new();
        r.id = self.id.clone();
        r.bundle = bundle.to_owned();
        r.pid = self.pid as u32;
        r.set_status(self.status);
        r.stdin = self.stdio.stdin.clone();
        r.stdout = self.stdio.stdout.clone();
        r.stderr = self.stdio.stderr.clone();
        r.terminal = self.stdio.terminal;
        r.exit_status = self.exit_code as u32;
        if self.exited_at.is_some() {
            r.exited_at = Some(convert_to_timestamp(self.exited_at)).into();
        }
        r
    }

    pub fn resize(&self, height: u32, width: u32) -> std::io::Result<()> {
        let Some(console) = &self.console else {
            return Ok(());
        };
        let ws = libc::winsize {
            ws_row: height as u16,
            ws_col: width as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        use std::os::fd::AsRawFd;
        // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer on a valid fd.
        let rc = unsafe { libc::ioctl(console.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}
