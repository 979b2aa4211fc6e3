//! A private containerd for one test: own root, state, socket, runc root,
//! CNI bridge network, cgroup root and images, configured with the `runc`
//! and `sidetunnel` runtime handlers. Stopping it (explicitly or on drop)
//! removes every pod through CRI first, then force-cleans whatever is left.
//!
//! Which containerd: the directory in `SIDETUNNEL_CONTAINERD_DIR` holding
//! `containerd`, `ctr` and `containerd-shim-runc-v2` (e.g. a 2.x release),
//! by default the distribution's `/usr/bin`. Its version (`containerd
//! --version`) selects the config schema (`version = 2` for 1.x, `version = 3`
//! with the split CRI plugins for 2.x), and that directory comes first on
//! containerd's PATH so it starts its own runc shim.

mod cleanup;
mod config;
mod import;
mod net;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub use config::POD_ANNOTATIONS;
pub use import::{import, import_content};

use crate::cri::Cri;

/// Environment variable naming the directory of the containerd under test.
pub const CONTAINERD_DIR_ENV: &str = "SIDETUNNEL_CONTAINERD_DIR";
/// Where the distribution installs containerd.
const DEFAULT_CONTAINERD_DIR: &str = "/usr/bin";
/// Debian's containernetworking-plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// containerd namespace the CRI plugin uses.
pub const K8S_NAMESPACE: &str = "k8s.io";
/// Shim binary containerd resolves for `io.containerd.sidetunnel.v1`.
pub const SIDETUNNEL_SHIM: &str = "containerd-shim-sidetunnel-v1";
/// Runtime handler names configured in the harness.
pub const RUNC: &str = "runc";
pub const SIDETUNNEL: &str = "sidetunnel";
pub const CRUN: &str = "crun";

const START_TIMEOUT: Duration = Duration::from_secs(45);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Directory of the containerd under test ([`CONTAINERD_DIR_ENV`], default `/usr/bin`).
pub fn containerd_dir() -> PathBuf {
    std::env::var_os(CONTAINERD_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_CONTAINERD_DIR), PathBuf::from)
}

/// The `containerd` binary under test.
pub fn containerd_bin() -> PathBuf {
    containerd_dir().join("containerd")
}

/// The `ctr` matching the containerd under test.
pub fn ctr_bin() -> PathBuf {
    containerd_dir().join("ctr")
}

/// containerd's own runc shim matching the containerd under test.
pub fn runc_shim_bin() -> PathBuf {
    containerd_dir().join("containerd-shim-runc-v2")
}

/// A containerd release version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Version {
    pub const fn new(major: u32, minor: u32, patch: u32) -> Version {
        Version {
            major,
            minor,
            patch,
        }
    }

    /// Parses `containerd --version` output, e.g. `containerd
    /// github.com/containerd/containerd 1.6.20~ds1 2.1` or `containerd
    /// github.com/containerd/containerd/v2 v2.3.4 db88095`.
    pub fn parse(output: &str) -> Option<Version> {
        let word = output.split_whitespace().nth(2)?;
        let mut nums = word.trim_start_matches('v').split('.').map(|part| {
            let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u32>().ok()
        });
        Some(Version::new(
            nums.next()??,
            nums.next()??,
            nums.next().flatten().unwrap_or(0),
        ))
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Version of the containerd under test (run once, then cached).
pub fn version() -> Result<Version> {
    static VERSION: std::sync::OnceLock<std::result::Result<Version, String>> =
        std::sync::OnceLock::new();
    VERSION
        .get_or_init(|| {
            let bin = containerd_bin();
            let out = Command::new(&bin)
                .arg("--version")
                .output()
                .map_err(|e| format!("running {} --version: {e}", bin.display()))?;
            let text = String::from_utf8_lossy(&out.stdout);
            Version::parse(&text).ok_or_else(|| {
                format!(
                    "no version in `{} --version` output {text:?}",
                    bin.display()
                )
            })
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// How to set up the harness containerd.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Binary to run as `containerd-shim-sidetunnel-v1`. When `None`,
    /// containerd finds the workspace's build of it on its PATH (the binary
    /// directory comes first). Given a path, the harness links it under that
    /// name into a directory placed first on containerd's PATH: containerd
    /// 1.6 ignores `runtime_path` (checked with 1.6.20).
    pub sidetunnel_shim: Option<PathBuf>,
    /// `ConfigPath` option passed to the `sidetunnel` shim.
    pub sidetunnel_config: Option<PathBuf>,
    /// Force a snapshotter; default: overlayfs when it mounts here, else native.
    pub snapshotter: Option<String>,
    /// containerd log level debug instead of info.
    pub debug: bool,
    /// Extra environment for containerd (and so for the shims it starts).
    pub env: Vec<(String, String)>,
    /// Files for containerd's top-level `imports` (e.g. an installed
    /// `/etc/containerd/conf.d/sidetunnel.toml` drop-in). When non-empty, the
    /// harness leaves the `sidetunnel` runtime to the imported files.
    pub imports: Vec<PathBuf>,
    /// containerd's PATH is the system PATH only (the workspace's binary
    /// directory is not prepended), so it finds an installed shim the way a
    /// node's containerd does.
    pub system_path_only: bool,
    /// Called with the rendered config file before containerd starts (e.g.
    /// to generate a drop-in from it, as a node's installer would).
    pub before_start: Option<BeforeStart>,
    /// containerd's registry host configuration directory (`config_path`:
    /// `<host>/hosts.toml`), e.g. to pull from a local registry.
    pub registry_config_path: Option<PathBuf>,
}

/// A hook run on the rendered `config.toml` before containerd starts.
#[derive(Clone)]
pub struct BeforeStart(pub std::sync::Arc<ConfigHook>);

/// The function behind [`BeforeStart`].
pub type ConfigHook = dyn Fn(&Path) -> Result<()> + Send + Sync;

impl std::fmt::Debug for BeforeStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BeforeStart(..)")
    }
}

/// A running private containerd. Field order matters for drop: the
/// containerd process is cleaned up before the slot and the directory go.
pub struct Containerd {
    child: Option<Child>,
    version: Version,
    launch: Launch,
    socket: PathBuf,
    snapshotter: String,
    log: PathBuf,
    root: PathBuf,
    state: PathBuf,
    runc_root: PathBuf,
    pod_logs: PathBuf,
    slot: net::Slot,
    dir: tempfile::TempDir,
}

/// How containerd is (re)started.
struct Launch {
    config_file: PathBuf,
    path: String,
    env: Vec<(String, String)>,
}

impl Launch {
    /// Starts containerd, appending its output to `log`.
    fn spawn(&self, log: &Path) -> Result<Child> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let bin = containerd_bin();
        Command::new(&bin)
            .arg("--config")
            .arg(&self.config_file)
            .env("PATH", &self.path)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))
    }
}

/// Can overlayfs be mounted with upper/work dirs below `dir`?
fn overlay_works(dir: &Path) -> bool {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    let probe = dir.join("overlay-probe");
    let [lower, upper, work, merged] = ["lower", "upper", "work", "merged"].map(|d| probe.join(d));
    for d in [&lower, &upper, &work, &merged] {
        if std::fs::create_dir_all(d).is_err() {
            return false;
        }
    }
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    let ok = mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        MsFlags::empty(),
        Some(data.as_str()),
    )
    .is_ok();
    if ok {
        let _ = umount2(&merged, MntFlags::MNT_DETACH);
    }
    let _ = std::fs::remove_dir_all(&probe);
    ok
}

impl Containerd {
    /// Starts containerd and waits until its CRI service answers.
    pub async fn start(opts: Options) -> Result<Containerd> {
        let started = Instant::now();
        let slot = net::Slot::claim()?;
        let dir = tempfile::Builder::new()
            .prefix("st-containerd-")
            .tempdir()
            .context("creating harness directory")?;
        let d = dir.path();
        let (root, state, runc_root) = (d.join("root"), d.join("state"), d.join("runc"));
        let (cni_conf, ipam, pod_logs) = (d.join("net.d"), d.join("ipam"), d.join("pods"));
        for p in [&root, &state, &runc_root, &cni_conf, &ipam, &pod_logs] {
            std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
        }
        let snapshotter = match &opts.snapshotter {
            Some(s) => s.clone(),
            None if overlay_works(d) => "overlayfs".into(),
            None => "native".into(),
        };
        let socket = d.join("containerd.sock");
        let crun = Path::new("/usr/bin/crun");
        let config_file = d.join("config.toml");
        let version = version()?;
        let text = config::render(&config::Params {
            version,
            root: &root,
            state: &state,
            socket: &socket,
            runc_root: &runc_root,
            cni_conf_dir: &cni_conf,
            cni_bin_dir: Path::new(CNI_BIN_DIR),
            snapshotter: &snapshotter,
            sandbox_image: crate::image::PAUSE,
            debug: opts.debug,
            sidetunnel_config: opts.sidetunnel_config.as_deref(),
            imports: &opts.imports,
            crun: crun.exists().then(|| crun.to_owned()),
            registry_config_path: opts.registry_config_path.as_deref(),
        });
        std::fs::write(&config_file, text)?;
        if let Some(hook) = &opts.before_start {
            (hook.0)(&config_file).context("before_start hook")?;
        }
        let conflist = config::cni_conflist(
            &slot.network_name(),
            &slot.bridge(),
            &slot.subnet().to_string(),
            &ipam,
        );
        std::fs::write(
            cni_conf.join("10-sidetunnel-test.conflist"),
            serde_json::to_vec_pretty(&conflist)?,
        )?;

        let log = d.join("containerd.log");
        File::create(&log)?;
        let mut path = if opts.system_path_only {
            SYSTEM_PATH.to_owned()
        } else {
            format!("{}:{SYSTEM_PATH}", crate::bins::dir().display())
        };
        // The containerd under test starts its own runc shim.
        let cd_dir = containerd_dir();
        if cd_dir != Path::new(DEFAULT_CONTAINERD_DIR) {
            path = format!("{}:{path}", cd_dir.display());
        }
        if let Some(shim) = &opts.sidetunnel_shim {
            let shim_dir = d.join("shim-bin");
            std::fs::create_dir_all(&shim_dir)?;
            std::os::unix::fs::symlink(shim, shim_dir.join(SIDETUNNEL_SHIM))
                .with_context(|| format!("linking {}", shim.display()))?;
            path = format!("{}:{path}", shim_dir.display());
        }
        let launch = Launch {
            config_file,
            path,
            env: opts.env.clone(),
        };
        let child = launch.spawn(&log)?;
        let mut c = Containerd {
            child: Some(child),
            version,
            launch,
            socket,
            snapshotter,
            log,
            root,
            state,
            runc_root,
            pod_logs,
            slot,
            dir,
        };
        c.wait_ready().await?;
        eprintln!(
            "harness: containerd {version} ({}) ready in {:?} (socket {}, snapshotter {}, subnet {}, bridge {})",
            cd_dir.display(),
            started.elapsed(),
            c.socket.display(),
            c.snapshotter,
            c.subnet(),
            c.bridge()
        );
        Ok(c)
    }

    /// Restarts containerd as a service manager would (SIGTERM, then the
    /// same command line), leaving its shims and their containers running;
    /// returns once CRI answers again. containerd re-attaches to the running
    /// shims through the addresses recorded in their bundles.
    pub async fn restart(&mut self) -> Result<()> {
        let mut child = self.child.take().context("containerd is not running")?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + STOP_TIMEOUT;
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.child = Some(self.launch.spawn(&self.log)?);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last_err = String::from("socket not created");
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "containerd exited during start-up ({status}); log:\n{}",
                    self.log_tail(60)
                );
            }
            if self.socket.exists() {
                match Cri::connect(&self.socket).await {
                    Ok(mut cri) => match cri.version().await {
                        Ok(_) => return Ok(()),
                        Err(e) => last_err = format!("{e:#}"),
                    },
                    Err(e) => last_err = format!("{e:#}"),
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd CRI not ready after {START_TIMEOUT:?} ({last_err}); log:\n{}",
                    self.log_tail(60)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts containerd and imports the pause and busybox test images.
    pub async fn start_with_images(opts: Options) -> Result<Containerd> {
        let c = Self::start(opts).await?;
        c.import_test_images().await?;
        Ok(c)
    }

    /// Builds and imports the test images into the CRI namespace, then waits
    /// until CRI lists them.
    pub async fn import_test_images(&self) -> Result<()> {
        let started = Instant::now();
        let (socket, snapshotter, dir) = (
            self.socket.clone(),
            self.snapshotter.clone(),
            self.dir.path().join("images"),
        );
        let names = tokio::task::spawn_blocking(move || -> Result<Vec<String>> {
            std::fs::create_dir_all(&dir)?;
            let mut names = Vec::new();
            for (name, archive) in crate::image::build_all(&dir)? {
                import(&socket, K8S_NAMESPACE, &snapshotter, &archive)?;
                names.push(name);
            }
            Ok(names)
        })
        .await??;
        let mut cri = self.cri().await?;
        for name in &names {
            cri.wait_image(name, Duration::from_secs(30)).await?;
        }
        eprintln!(
            "harness: images {names:?} imported in {:?}",
            started.elapsed()
        );
        Ok(())
    }

    /// A kubelet-shaped pod config whose logs and cgroup live in this harness.
    pub fn pod_config(&self, name: &str, runtime_handler: &str) -> crate::cri::PodConfig {
        crate::cri::PodConfig::new(name, runtime_handler, &self.pod_logs, &self.cgroup_root())
    }

    /// A new CRI client on this containerd.
    pub async fn cri(&self) -> Result<Cri> {
        Cri::connect(&self.socket).await
    }

    /// Version of this containerd.
    pub fn version(&self) -> Version {
        self.version
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn state(&self) -> &Path {
        &self.state
    }
    /// Harness directory (everything private to this containerd is below it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    pub fn snapshotter(&self) -> &str {
        &self.snapshotter
    }
    /// Root of kubelet-style pod log directories (`<ns>_<name>_<uid>`).
    pub fn pod_log_root(&self) -> &Path {
        &self.pod_logs
    }
    /// cgroup under which [`crate::cri::PodConfig`] puts pods (`<root>/pod<uid>`).
    pub fn cgroup_root(&self) -> String {
        self.slot.cgroup_root()
    }
    pub fn subnet(&self) -> ipnet::Ipv4Net {
        self.slot.subnet()
    }
    /// The bridge's own address: the pods' default gateway, reachable from
    /// pods for services the test runs in the host namespace.
    pub fn gateway(&self) -> std::net::Ipv4Addr {
        let n = u32::from(self.slot.subnet().network());
        (n + 1).into()
    }
    pub fn bridge(&self) -> String {
        self.slot.bridge()
    }
    /// runc state root of the `runc` handler (`<root>/k8s.io/<container id>`).
    pub fn runc_root(&self) -> &Path {
        &self.runc_root
    }
    /// containerd's process id (`None` once stopped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Last `lines` lines of containerd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Shim processes started by this containerd (they carry its socket path
    /// in their command line).
    pub fn shim_pids(&self) -> Vec<i32> {
        cleanup::pids_with_arg(&self.socket.to_string_lossy())
    }

    /// The shim process serving sandbox `sandbox_id` (its `-id` argument).
    pub fn shim_pid_of(&self, sandbox_id: &str) -> Option<i32> {
        let pids = self.shim_pids();
        cleanup::pids_with_arg(sandbox_id)
            .into_iter()
            .find(|p| pids.contains(p))
    }

    /// Processes in the harness's pod cgroups (containers, pause, proxies
    /// placed in pod cgroups).
    pub fn pod_cgroup_pids(&self) -> Vec<i32> {
        cleanup::cgroup_pids(&self.cgroup_root())
    }

    /// Removes all pods through CRI, stops containerd and cleans up. Errors
    /// from the CRI phase are returned after the forced cleanup still ran.
    pub async fn shutdown(mut self) -> Result<()> {
        let res = self.remove_all_pods().await;
        self.force_cleanup();
        res
    }

    async fn remove_all_pods(&self) -> Result<()> {
        if self.child.is_none() {
            return Ok(());
        }
        let mut cri = self.cri().await?;
        for pod in cri.list_pods().await? {
            cri.stop_pod(&pod).await?;
            cri.remove_pod(&pod).await?;
        }
        Ok(())
    }

    /// Bundle directory containerd creates for task `id` (sandbox or
    /// container) before calling the shim; holds `config.json` and `rootfs`.
    pub fn task_bundle(&self, id: &str) -> PathBuf {
        self.tasks_dir().join(id)
    }

    fn tasks_dir(&self) -> PathBuf {
        self.state
            .join("io.containerd.runtime.v2.task")
            .join(K8S_NAMESPACE)
    }

    /// Mount points below the harness directory (rootfs, shm, ...).
    pub fn mounts(&self) -> Vec<PathBuf> {
        cleanup::mounts_under(self.dir.path())
    }

    /// (sandbox id, netns path) of sandbox task bundles still on disk.
    fn bundle_sandboxes(&self) -> Vec<(String, Option<PathBuf>)> {
        let Ok(entries) = std::fs::read_dir(self.tasks_dir()) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| match sidetunnel_oci::classify_bundle(&e.path()) {
                Ok(sidetunnel_oci::Role::Sandbox(pod)) => Some((pod.sandbox_id, pod.netns_path)),
                _ => None,
            })
            .collect()
    }

    /// Stops containerd, kills what it left running and removes every trace.
    fn force_cleanup(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let sandboxes = self.bundle_sandboxes();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + STOP_TIMEOUT;
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        cleanup::kill_all(&self.shim_pids());
        cleanup::remove_cgroup_tree(&self.cgroup_root());
        for (id, netns) in &sandboxes {
            if let Some(ns) = netns {
                cleanup::remove_netns(ns);
            }
            cleanup::remove_cni_cache(&format!("cni-loopback-{id}-"));
        }
        cleanup::remove_cni_cache(&format!("{}-", self.slot.network_name()));
        cleanup::unmount_under(self.dir.path());
        net::delete_link(&self.bridge());
    }

    /// Blocking variant of the CRI phase of [`Self::shutdown`], for `Drop`
    /// (which may run inside or outside a tokio runtime).
    fn remove_all_pods_blocking(&self) {
        if self.child.is_none() {
            return;
        }
        let socket = self.socket.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let res = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| {
                    rt.block_on(async {
                        let mut cri = Cri::connect(&socket).await?;
                        for pod in cri.list_pods().await? {
                            let _ = cri.stop_pod(&pod).await;
                            cri.remove_pod(&pod).await?;
                        }
                        anyhow::Ok(())
                    })
                });
            let _ = tx.send(res);
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("harness cleanup: removing pods via CRI: {e:#}"),
            Err(_) => eprintln!("harness cleanup: removing pods via CRI timed out"),
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.remove_all_pods_blocking();
        self.force_cleanup();
    }
}
