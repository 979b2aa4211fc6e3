//! A process's stdio as containerd passes it: FIFO paths (handed straight to
//! the runtime, so the container writes into containerd's FIFOs without a copy
//! through the shim) or a terminal, whose pty master the runtime sends back
//! over a console socket and the shim then pumps to and from the FIFOs.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use runc::io::{FIFO, Io, NullIo};
use tokio::fs::OpenOptions;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixListener;
use tokio::sync::watch;

use crate::error::{Error, Result};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stdio {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl Stdio {
    fn is_null(&self) -> bool {
        self.stdin.is_empty() && self.stdout.is_empty() && self.stderr.is_empty()
    }

    /// The runtime-side IO for a non-terminal process.
    pub fn runtime_io(&self) -> Result<Arc<dyn Io>> {
        if self.is_null() {
            return Ok(Arc::new(
                NullIo::new().map_err(Error::io("open /dev/null"))?,
            ));
        }
        for p in [&self.stdin, &self.stdout, &self.stderr] {
            if let Some((scheme, _)) = p.split_once("://")
                && scheme != "fifo"
            {
                return Err(Error::InvalidArgument(format!(
                    "stdio URI scheme {scheme:?} is not supported (only FIFOs)"
                )));
            }
        }
        let path = |s: &str| {
            let s = s.strip_prefix("fifo://").unwrap_or(s);
            (!s.is_empty()).then(|| s.to_owned())
        };
        Ok(Arc::new(FIFO {
            stdin: path(&self.stdin),
            stdout: path(&self.stdout),
            stderr: path(&self.stderr),
        }))
    }
}

/// A socket the runtime connects to, to hand over a new process's pty master.
pub struct ConsoleSocket {
    listener: UnixListener,
    dir: tempfile::TempDir,
}

impl ConsoleSocket {
    pub fn new() -> Result<ConsoleSocket> {
        let dir = tempfile::Builder::new()
            .prefix("sidetunnel-pty")
            .tempdir_in(std::env::temp_dir())
            .map_err(Error::io("create console socket dir"))?;
        let listener = UnixListener::bind(dir.path().join("pty.sock"))
            .map_err(Error::io("bind console socket"))?;
        Ok(ConsoleSocket { listener, dir })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("pty.sock")
    }

    /// Receives the pty master the runtime sent (it sends during create/exec).
    pub async fn receive(self) -> Result<OwnedFd> {
        let accept = self.listener.accept();
        let (stream, _) = tokio::time::timeout(std::time::Duration::from_secs(10), accept)
            .await
            .map_err(|_| Error::Runtime {
                op: "receive console",
                msg: "the runtime did not send the pty master within 10s".into(),
            })?
            .map_err(Error::io("accept on console socket"))?;
        let stream = stream.into_std().map_err(Error::io("console stream"))?;
        stream
            .set_nonblocking(false)
            .map_err(Error::io("console stream"))?;
        let fd = tokio::task::spawn_blocking(move || receive_fd(stream.as_raw_fd()))
            .await
            .map_err(|e| Error::Sandbox(format!("console receiver task: {e}")))??;
        Ok(fd)
    }
}

fn receive_fd(sock: RawFd) -> Result<OwnedFd> {
    let mut buf = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 2]);
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(|e| Error::io("receive pty master")(e.into()))?;
    for cmsg in msg
        .cmsgs()
        .map_err(|e| Error::io("receive pty master")(e.into()))?
    {
        if let ControlMessageOwned::ScmRights(fds) = cmsg
            && let Some(&fd) = fds.first()
        {
            for &extra in &fds[1..] {
                // SAFETY: received fds are ours to close.
                drop(unsafe { OwnedFd::from_raw_fd(extra) });
            }
            // SAFETY: the kernel just installed this fd in our table.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    Err(Error::Runtime {
        op: "receive console",
        msg: "no file descriptor in the console socket message".into(),
    })
}

/// Pumps the terminal: stdin FIFO → pty master, pty master → stdout FIFO.
/// Returns the master (kept for resize). Copies stop when `exited` flips.
pub async fn pump_console(
    master: OwnedFd,
    stdio: &Stdio,
    exited: watch::Receiver<bool>,
) -> Result<std::fs::File> {
    let master = std::fs::File::from(master);
    if !stdio.stdin.is_empty() {
        let input = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&stdio.stdin)
            .await
            .map_err(Error::io(format!("open stdin {}", stdio.stdin)))?;
        let to = tokio::fs::File::from_std(master.try_clone().map_err(Error::io("dup pty"))?);
        spawn_copy(input, to, Some(exited), None);
    }
    if !stdio.stdout.is_empty() {
        let out = OpenOptions::new()
            .write(true)
            .open(&stdio.stdout)
            .await
            .map_err(Error::io(format!("open stdout {}", stdio.stdout)))?;
        // A read end of our own keeps the FIFO open across a containerd
        // restart, so the copy does not die with EPIPE meanwhile.
        let keep = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&stdio.stdout)
            .await
            .map_err(Error::io(format!("open stdout {}", stdio.stdout)))?;
        let from = tokio::fs::File::from_std(master.try_clone().map_err(Error::io("dup pty"))?);
        // No cancellation: the pty reports EIO once the process and its
        // children are gone, after the last output was read.
        spawn_copy(from, out, None, Some(keep));
    }
    Ok(master)
}

fn spawn_copy<R, W>(
    mut from: R,
    mut to: W,
    exited: Option<watch::Receiver<bool>>,
    keep: Option<tokio::fs::File>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        tokio::select! {
            r = tokio::io::copy(&mut from, &mut to) => {
                if let Err(e) = r && e.raw_os_error() != Some(libc::EIO) {
                    tracing::debug!("console copy ended: {e}");
                }
            }
            _ = async {
                match exited {
                    Some(mut rx) => drop(rx.wait_for(|e| *e).await),
                    None => std::future::pending().await,
                }
            } => {}
        }
        drop(keep);
    });
}
