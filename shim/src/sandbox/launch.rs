//! The proxy's launcher: the shim re-executes itself as
//! `containerd-shim-sidetunnel-v1 __launch-proxy` with a [`LaunchSpec`] in the
//! environment. That fresh single-threaded process joins the pod's cgroups
//! and network namespace, takes a private mount namespace in which only its
//! own state directory is visible under the state root, becomes the proxy
//! user keeping just CAP_NET_ADMIN and CAP_NET_RAW (ambient), and execs the
//! proxy. Doing this in a re-exec rather than between fork and exec of the
//! multithreaded shim keeps all of it free of async-signal-safety limits.
//!
//! The proxy binary is opened first, while the launcher is still root, and
//! executed through that descriptor after privileges are dropped: the proxy
//! uid needs execute permission on the file only, not search permission on
//! every directory above it (a build under a 0700 home works), and the pod
//! runs exactly the file that was opened.
//!
//! The launcher reports how the start went on [`REPORT_FD`], a pipe whose
//! write end is close-on-exec: end of file with nothing written means the
//! proxy was executed; otherwise one [`LaunchFailure`] line says why not.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub const ARG: &str = "__launch-proxy";
pub const ENV: &str = "SIDETUNNEL_LAUNCH_SPEC";
/// Descriptor of the launcher's report pipe (see the module comment).
pub const REPORT_FD: i32 = 3;

const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchSpec {
    pub netns: PathBuf,
    /// `cgroup.procs` files of the pod's cgroups (each v1 hierarchy, or v2).
    pub cgroup_procs: Vec<PathBuf>,
    /// Hidden behind a tmpfs in the proxy's mount namespace …
    pub state_root: PathBuf,
    /// … except this directory, bound back at the same path.
    pub state_dir: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub binary: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub max_open_files: u64,
}

/// `containerd-shim-sidetunnel-v1 check-proxy [CONFIG]`: whether the node
/// config's proxy binary can be executed the way the launcher executes it
/// (opened as root, then executed as the proxy uid/gid with the launcher's
/// capabilities). A forked child does the exec; the moment it succeeds (the
/// close-on-exec report pipe closes) the proxy is killed: it never runs.
/// Exit 0 and one line when it can, else exit 1 and the reason (binary,
/// uid, errno). `sidetunnel-install` and the Debian package run it.
pub const CHECK_ARG: &str = "check-proxy";

pub fn check_main(args: &[String]) -> ! {
    let path = crate::config::NodeConfig::path(args.first().map(std::path::Path::new));
    let result = crate::config::NodeConfig::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|node| {
            let spec = LaunchSpec {
                netns: PathBuf::new(),
                cgroup_procs: Vec::new(),
                state_root: PathBuf::new(),
                state_dir: PathBuf::new(),
                uid: node.proxy.uid,
                gid: node.proxy.gid,
                binary: node.proxy.binary.clone(),
                args: vec!["--help".into()],
                env: Vec::new(),
                max_open_files: 0,
            };
            check(&spec).map(|()| {
                format!(
                    "{} is executable as uid {} gid {}",
                    spec.binary.display(),
                    spec.uid,
                    spec.gid
                )
            })
        });
    match result {
        Ok(line) => {
            println!("check-proxy: {line}");
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("check-proxy: {e}");
            std::process::exit(1)
        }
    }
}

fn check(spec: &LaunchSpec) -> Result<(), String> {
    use nix::unistd::{ForkResult, fork};
    use std::io::Read;
    let binary = open_binary(spec).map_err(|f| f.message)?;
    let (rx, tx) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: this process is single-threaded here (the shim's runtime is
    // only built for the shim service), so the child may run any code.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            drop(rx);
            let failure = (|| {
                let null = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/null")
                    .map_err(|e| LaunchFailure::setup(format!("open /dev/null: {e}")))?;
                for fd in [0, 1, 2] {
                    // SAFETY: dup2 onto the standard descriptors.
                    unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), fd) };
                }
                drop_privileges(spec).map_err(LaunchFailure::setup)?;
                exec(spec, &binary)
            })()
            .unwrap_err();
            let mut pipe = std::fs::File::from(tx);
            let _ = std::io::Write::write_all(
                &mut pipe,
                serde_json::to_string(&failure)
                    .unwrap_or_default()
                    .as_bytes(),
            );
            // SAFETY: leave without running the parent's exit handlers.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => {
            drop(tx);
            let mut text = String::new();
            let _ = std::fs::File::from(rx).read_to_string(&mut text);
            let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(child, None);
            if text.is_empty() {
                return Ok(());
            }
            Err(serde_json::from_str::<LaunchFailure>(&text)
                .map(|f| f.message)
                .unwrap_or(text))
        }
    }
}

/// Why the launcher could not execute the proxy, as sent on [`REPORT_FD`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchFailure {
    /// The proxy binary could not be opened or executed (as opposed to a
    /// failure while setting up the namespaces, cgroups or identity).
    pub exec: bool,
    /// errno of the failing call, when there was one.
    pub errno: Option<i32>,
    pub message: String,
}

impl LaunchFailure {
    fn setup(message: String) -> LaunchFailure {
        LaunchFailure {
            exec: false,
            errno: None,
            message,
        }
    }

    /// The same attempt fails the same way again: the binary is missing, not
    /// executable by the proxy uid, on a noexec mount, or not a program.
    /// Everything else (memory, a busy file being replaced, setup steps)
    /// may pass on a retry.
    pub fn is_permanent(&self) -> bool {
        use nix::errno::Errno;
        self.exec
            && self.errno.is_some_and(|e| {
                [
                    Errno::EACCES,
                    Errno::EPERM,
                    Errno::ENOENT,
                    Errno::ENOTDIR,
                    Errno::ENOEXEC,
                    Errno::ELOOP,
                    Errno::EISDIR,
                    Errno::ENAMETOOLONG,
                    Errno::ELIBBAD,
                ]
                .contains(&Errno::from_raw(e))
            })
    }
}

/// Child side: never returns. Errors go to stderr (the proxy's log) and to
/// the report pipe, and exit 127 so the supervisor records a failed start.
pub fn main() -> ! {
    let failure = match std::env::var(ENV) {
        Ok(json) => match serde_json::from_str::<LaunchSpec>(&json) {
            Ok(spec) => match run(&spec) {
                Ok(never) => match never {},
                Err(f) => f,
            },
            Err(e) => LaunchFailure::setup(format!("bad {ENV}: {e}")),
        },
        Err(_) => LaunchFailure::setup(format!("{ENV} not set")),
    };
    eprintln!("sidetunnel proxy launcher: {}", failure.message);
    report(&failure);
    std::process::exit(127)
}

/// Writes `failure` to the report pipe, if the supervisor gave one.
fn report(failure: &LaunchFailure) {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    // SAFETY: F_GETFD only probes whether the descriptor is open.
    if unsafe { libc::fcntl(REPORT_FD, libc::F_GETFD) } < 0 {
        return;
    }
    // SAFETY: REPORT_FD is open (checked above) and owned by nothing else in
    // this process; the process exits right after.
    let mut pipe = unsafe { std::fs::File::from_raw_fd(REPORT_FD) };
    if let Ok(line) = serde_json::to_string(failure) {
        let _ = writeln!(pipe, "{line}");
    }
}

fn os<T>(what: &str, r: nix::Result<T>) -> Result<T, LaunchFailure> {
    r.map_err(|e| LaunchFailure::setup(format!("{what}: {e}")))
}

/// A failure to open or execute the binary: names it, the uid and the errno.
fn exec_failure(spec: &LaunchSpec, step: &str, e: nix::errno::Errno) -> LaunchFailure {
    let hint = match e {
        nix::errno::Errno::EACCES => {
            ": the file is not executable by that uid or sits on a noexec mount"
        }
        nix::errno::Errno::ENOENT => ": no such file (check proxy.binary in the node config)",
        nix::errno::Errno::ENOEXEC => ": not a program this kernel can run",
        _ => "",
    };
    LaunchFailure {
        exec: true,
        errno: Some(e as i32),
        message: format!(
            "{step} proxy binary {} as uid {} gid {}: {e}{hint}",
            spec.binary.display(),
            spec.uid,
            spec.gid,
        ),
    }
}

/// Opens the proxy binary for execution through its descriptor. A script
/// (`#!`) keeps the descriptor across exec, because its interpreter opens
/// it by `/dev/fd/N`; a program does not, so nothing leaks into the proxy.
fn open_binary(spec: &LaunchSpec) -> Result<std::os::fd::OwnedFd, LaunchFailure> {
    use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl, open};
    use nix::sys::stat::Mode;
    let fd = open(
        &spec.binary,
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| exec_failure(spec, "open", e))?;
    let mut magic = [0u8; 2];
    let script = nix::sys::uio::pread(&fd, &mut magic, 0).is_ok_and(|n| n == 2 && &magic == b"#!");
    if script {
        fcntl(&fd, FcntlArg::F_SETFD(FdFlag::empty()))
            .map_err(|e| exec_failure(spec, "open", e))?;
    }
    Ok(fd)
}

fn run(spec: &LaunchSpec) -> Result<std::convert::Infallible, LaunchFailure> {
    use nix::mount::{MsFlags, mount};
    use nix::sched::{CloneFlags, setns, unshare};

    // The report pipe must not reach the proxy: closed by the exec that
    // starts it, which is how the supervisor learns the exec succeeded.
    // SAFETY: only the flags of a descriptor number are changed (EBADF
    // when the supervisor gave none).
    unsafe { libc::fcntl(REPORT_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    let binary = open_binary(spec)?;

    let pid = std::process::id().to_string();
    for procs in &spec.cgroup_procs {
        std::fs::write(procs, &pid)
            .map_err(|e| LaunchFailure::setup(format!("join cgroup {}: {e}", procs.display())))?;
    }
    // Raise the soft limit up to the hard one; raising the hard limit would
    // need CAP_SYS_RESOURCE, which the shim may not have.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read/write a valid rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(LaunchFailure::setup(format!(
            "getrlimit NOFILE: {}",
            std::io::Error::last_os_error()
        )));
    }
    limit.rlim_cur = spec.max_open_files.min(limit.rlim_max);
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(LaunchFailure::setup(format!(
            "setrlimit NOFILE: {}",
            std::io::Error::last_os_error()
        )));
    }

    let netns = std::fs::File::open(&spec.netns)
        .map_err(|e| LaunchFailure::setup(format!("open netns {}: {e}", spec.netns.display())))?;
    os("setns(net)", setns(&netns, CloneFlags::CLONE_NEWNET))?;
    drop(netns);

    os("unshare(mount)", unshare(CloneFlags::CLONE_NEWNS))?;
    os(
        "make / private",
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        ),
    )?;
    let own = std::fs::File::open(&spec.state_dir)
        .map_err(|e| LaunchFailure::setup(format!("open {}: {e}", spec.state_dir.display())))?;
    os(
        "mount tmpfs over state root",
        mount(
            Some("tmpfs"),
            &spec.state_root,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("mode=0755,size=64k"),
        ),
    )?;
    std::fs::create_dir_all(&spec.state_dir)
        .map_err(|e| LaunchFailure::setup(format!("mkdir {}: {e}", spec.state_dir.display())))?;
    let source = format!("/proc/self/fd/{}", own.as_raw_fd());
    os(
        "bind own state dir",
        mount(
            Some(source.as_str()),
            &spec.state_dir,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        ),
    )?;
    drop(own);

    drop_privileges(spec).map_err(LaunchFailure::setup)?;
    std::env::set_current_dir(&spec.state_dir)
        .map_err(|e| LaunchFailure::setup(format!("chdir {}: {e}", spec.state_dir.display())))?;

    exec(spec, &binary)
}

/// Executes the opened proxy binary with the spec's arguments and
/// environment; returns only on failure.
fn exec(
    spec: &LaunchSpec,
    binary: &std::os::fd::OwnedFd,
) -> Result<std::convert::Infallible, LaunchFailure> {
    let c = |s: &[u8]| {
        CString::new(s)
            .map_err(|_| LaunchFailure::setup("NUL in argument or environment".to_string()))
    };
    let path = c(spec.binary.as_os_str().as_bytes())?;
    let mut argv = vec![path.clone()];
    for a in &spec.args {
        argv.push(c(a.as_bytes())?);
    }
    let envp = spec
        .env
        .iter()
        .map(|(k, v)| c(format!("{k}={v}").as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let e = nix::unistd::execveat(
        binary,
        c"",
        &argv,
        &envp,
        nix::fcntl::AtFlags::AT_EMPTY_PATH,
    )
    .unwrap_err();
    Err(exec_failure(spec, "execute", e))
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn prctl(op: libc::c_int, a: libc::c_ulong, b: libc::c_ulong) -> Result<(), String> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(op, a, b, 0 as libc::c_ulong, 0 as libc::c_ulong) } != 0 {
        return Err(format!("prctl({op}): {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn drop_privileges(spec: &LaunchSpec) -> Result<(), String> {
    let os = |what: &str, r: nix::Result<()>| r.map_err(|e| format!("{what}: {e}"));
    use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};
    let keep = [CAP_NET_ADMIN, CAP_NET_RAW];
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    for cap in (0..=last).filter(|c| !keep.contains(c)) {
        prctl(libc::PR_CAPBSET_DROP, cap.into(), 0)?;
    }
    prctl(libc::PR_SET_KEEPCAPS, 1, 0)?;
    os("setgroups", setgroups(&[Gid::from_raw(spec.gid)]))?;
    let (g, u) = (Gid::from_raw(spec.gid), Uid::from_raw(spec.uid));
    os("setresgid", setresgid(g, g, g))?;
    os("setresuid", setresuid(u, u, u))?;
    let mask = keep.iter().fold(0u32, |m, c| m | (1 << c));
    let header = CapHeader {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let data = [
        CapData {
            effective: mask,
            permitted: mask,
            inheritable: mask,
        },
        CapData::default(),
    ];
    // SAFETY: capset reads a v3 header and two data structs.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(format!("capset: {}", std::io::Error::last_os_error()));
    }
    for cap in keep {
        prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
            cap.into(),
        )?;
    }
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0)?;
    Ok(())
}
