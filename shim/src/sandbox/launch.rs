//! The proxy's launcher: the shim re-executes itself as
//! `containerd-shim-sidetunnel-v1 __launch-proxy` with a [`LaunchSpec`] in the
//! environment. That fresh single-threaded process joins the pod's cgroups
//! and network namespace, takes a private mount namespace in which only its
//! own state directory is visible under the state root, becomes the proxy
//! user keeping just CAP_NET_ADMIN and CAP_NET_RAW (ambient), and execs the
//! proxy. Doing this in a re-exec rather than between fork and exec of the
//! multithreaded shim keeps all of it free of async-signal-safety limits.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub const ARG: &str = "__launch-proxy";
pub const ENV: &str = "SIDETUNNEL_LAUNCH_SPEC";

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

/// Child side: never returns. Errors go to stderr (the proxy's log) and
/// exit 127 so the supervisor records a failed start.
pub fn main() -> ! {
    let err = match std::env::var(ENV) {
        Ok(json) => match serde_json::from_str::<LaunchSpec>(&json) {
            Ok(spec) => run(&spec).unwrap_err(),
            Err(e) => format!("bad {ENV}: {e}"),
        },
        Err(_) => format!("{ENV} not set"),
    };
    eprintln!("sidetunnel proxy launcher: {err}");
    std::process::exit(127)
}

fn os<T>(what: &str, r: nix::Result<T>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

fn run(spec: &LaunchSpec) -> Result<std::convert::Infallible, String> {
    use nix::mount::{MsFlags, mount};
    use nix::sched::{CloneFlags, setns, unshare};

    let pid = std::process::id().to_string();
    for procs in &spec.cgroup_procs {
        std::fs::write(procs, &pid).map_err(|e| format!("join cgroup {}: {e}", procs.display()))?;
    }
    // Raise the soft limit up to the hard one; raising the hard limit would
    // need CAP_SYS_RESOURCE, which the shim may not have.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read/write a valid rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(format!(
            "getrlimit NOFILE: {}",
            std::io::Error::last_os_error()
        ));
    }
    limit.rlim_cur = spec.max_open_files.min(limit.rlim_max);
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(format!(
            "setrlimit NOFILE: {}",
            std::io::Error::last_os_error()
        ));
    }

    let netns = std::fs::File::open(&spec.netns)
        .map_err(|e| format!("open netns {}: {e}", spec.netns.display()))?;
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
        .map_err(|e| format!("open {}: {e}", spec.state_dir.display()))?;
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
        .map_err(|e| format!("mkdir {}: {e}", spec.state_dir.display()))?;
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

    drop_privileges(spec)?;
    std::env::set_current_dir(&spec.state_dir)
        .map_err(|e| format!("chdir {}: {e}", spec.state_dir.display()))?;

    let c = |s: &[u8]| CString::new(s).map_err(|_| "NUL in argument or environment".to_string());
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
    let e = nix::unistd::execve(&path, &argv, &envp).unwrap_err();
    Err(format!("exec {}: {e}", spec.binary.display()))
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
