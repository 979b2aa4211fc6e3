//! Runs `nft` / `ip` inside a target network namespace, for `show` (the
//! operator's view; installing never spawns). The child enters the
//! namespace with `setns` between fork and exec, so the caller's threads
//! (a tokio runtime's included) never change namespace.

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::Error;
use crate::netns::Netns;

impl Netns {
    /// Runs `program args` in the namespace, feeding `stdin`; returns stdout.
    pub(crate) fn run(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String, Error> {
        let exe = locate(program);
        let mut cmd = Command::new(&exe);
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let fd: RawFd = self.file.as_raw_fd();
        // SAFETY: the closure only makes the async-signal-safe setns(2)
        // syscall on an fd that stays open until exec (the File outlives
        // the spawn call).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let command = format!("{program} {}", args.join(" "));
        let mut child = cmd.spawn().map_err(|source| Error::Spawn {
            program: exe.display().to_string(),
            source,
        })?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // Scripts are a few KiB, far below the pipe buffer, and the
            // child reads all of stdin before it writes much.
            pipe.write_all(input.as_bytes())
                .map_err(|source| Error::Spawn {
                    program: exe.display().to_string(),
                    source,
                })?;
        }
        let out = child.wait_with_output().map_err(|source| Error::Spawn {
            program: exe.display().to_string(),
            source,
        })?;
        if !out.status.success() {
            return Err(Error::Command {
                command,
                netns: self.path.clone(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Finds `program` on PATH or in the sbin directories, which a shim started
/// by containerd may not have on its PATH.
fn locate(program: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(program))
}

/// True when a failed command's stderr says the object did not exist.
pub(crate) fn is_not_found(err: &Error) -> bool {
    matches!(err, Error::Command { stderr, .. }
        if stderr.contains("No such file or directory") || stderr.contains("No such process"))
}
