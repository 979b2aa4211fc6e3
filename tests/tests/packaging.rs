//! Packaging, checked on this machine:
//!
//! * `packaging/config.toml` (the documented example node config) parses
//!   with the shim's own parser (`shim/src/config.rs`, compiled in here: the
//!   shim is a binary crate), its commented optional keys too, and every
//!   value it shows equals the parser's default.
//! * The Debian package built by `packaging/deb/build.sh` installs with
//!   `dpkg -i` and generates the system's drop-in (keeping the node's CRI
//!   settings). The harness containerd, configured only through a drop-in
//!   that the *installed* generator made from the harness's own config
//!   (`imports`) and the system PATH, finds the installed shim; a pod with
//!   the installed proxy (real certificate and xDS from a real meshd) runs;
//!   `dpkg --purge` leaves nothing behind. A guard purges the package if
//!   the test fails half-way, so the machine is always restored.
//! * `packaging/install.sh` installs into, validates and uninstalls from
//!   private paths, keeping the CRI settings of the main config.

#[allow(dead_code)]
#[path = "../../shim/src/config.rs"]
mod shim_config;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use sidetunnel_tests::containerd::{self, BeforeStart, Containerd, Options, SIDETUNNEL};
use sidetunnel_tests::cri::{ContainerSpec, api::ContainerState};
use sidetunnel_tests::mesh::{self, MeshNode, NodeConfigParams};
use sidetunnel_tests::{bins, cmd, image, prereq};

const PKG: &str = "sidetunnel";
const WAIT: Duration = Duration::from_secs(120);
const INSTALLED: &[&str] = &[
    "/usr/bin/containerd-shim-sidetunnel-v1",
    "/usr/bin/sidetunnel-proxy",
    "/etc/sidetunnel/config.toml",
    "/etc/containerd/conf.d/sidetunnel.toml",
    "/usr/share/sidetunnel/containerd-dropin",
    "/usr/share/doc/sidetunnel/examples/config.toml",
    "/usr/share/doc/sidetunnel/examples/runtimeclass.yaml",
];
const DROPIN: &str = "/etc/containerd/conf.d/sidetunnel.toml";
const GENERATOR: &str = "/usr/share/sidetunnel/containerd-dropin";
const STATE_ROOT: &str = "/run/sidetunnel";

fn packaging_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging")
}

/// The example with its two machine-specific paths pointed at files that
/// exist here (the shim checks both).
fn example_loadable(dir: &Path, text: &str) -> PathBuf {
    let root = dir.join("root-cert.pem");
    std::fs::write(&root, "pem").unwrap();
    let text = text
        .replace(
            "\"/etc/sidetunnel/root-cert.pem\"",
            &format!("{:?}", root.display().to_string()),
        )
        .replace("\"/usr/bin/sidetunnel-proxy\"", "\"/bin/sh\"");
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn example_node_config_parses_with_the_shims_parser_and_shows_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(packaging_dir().join("config.toml")).unwrap();
    let example = shim_config::NodeConfig::load(&example_loadable(dir.path(), &text))
        .unwrap_or_else(|e| panic!("packaging/config.toml: {e}"));
    // Only the required keys (and the example's env): everything else the
    // example shows must be the default.
    let minimal = format!(
        "[mesh]\nxds_address = {:?}\nroot_cert = {:?}\n[proxy]\nbinary = \"/bin/sh\"\nenv = {{ SIDETUNNEL_LOG_LEVEL = \"info\" }}\n",
        example.mesh.xds_address,
        example.mesh.root_cert.display().to_string(),
    );
    let mpath = dir.path().join("minimal.toml");
    std::fs::write(&mpath, minimal).unwrap();
    let defaults = shim_config::NodeConfig::load(&mpath).unwrap();
    assert_eq!(
        format!("{example:?}"),
        format!("{defaults:?}"),
        "packaging/config.toml shows a value that is not the shim's default"
    );
    // The commented optional keys are valid too.
    let uncommented: String = text
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest) if rest.split_once(" = ").is_some_and(|(k, _)| is_key(k)) => rest,
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_ne!(uncommented, text, "no commented optional keys found");
    let c = shim_config::NodeConfig::load(&example_loadable(dir.path(), &uncommented))
        .unwrap_or_else(|e| panic!("packaging/config.toml with optional keys: {e}"));
    assert_eq!(c.mesh.node_name.as_deref(), Some("node-1"));
    assert!(c.mesh.ca_address.is_some() && c.runtime.root.is_some());
}

fn is_key(k: &str) -> bool {
    !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
}

/// PATH with the containerd under test first (`SIDETUNNEL_CONTAINERD_DIR`):
/// the scripts run `containerd` from PATH, as on a node.
fn containerd_path() -> String {
    format!(
        "{}:{}",
        containerd::containerd_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// `containerd config dump` of `config` by the containerd under test, with
/// 2.x's single-quoted strings in double quotes. Panics when containerd
/// rejects the file (a non-zero exit; warnings are only printed).
fn config_dump(config: &Path) -> String {
    let out = cmd::output_within(
        Command::new(containerd::containerd_bin())
            .arg("--config")
            .arg(config)
            .args(["config", "dump"]),
        Duration::from_secs(60),
    )
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "containerd rejects {}: {stderr}",
        config.display()
    );
    if !stderr.trim().is_empty() {
        eprintln!("containerd config dump {}: {stderr}", config.display());
    }
    String::from_utf8_lossy(&out.stdout).replace('\'', "\"")
}

/// The lines of table `header` (and its sub-tables) in a config dump.
fn dump_section(dump: &str, header: &str) -> String {
    let mut on = false;
    let mut out = String::new();
    for line in dump.lines().map(str::trim) {
        if line.starts_with('[') {
            on = line.starts_with(header.trim_end_matches(']'));
        }
        if on {
            out += line;
            out += "\n";
        }
    }
    out
}

/// Main configs `install.sh` meets on a node of the containerd under test:
/// 1.x reads only schema 2; 2.x also loads a 1.x-style schema-2 file
/// (migrated, with a warning) next to its own schema 3.
fn main_configs(version: containerd::Version) -> Vec<(&'static str, &'static str)> {
    let v2 = (
        "schema 2",
        "version = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = \"/custom/cni\"\n",
    );
    let v3 = (
        "schema 3",
        "version = 3\n\n[plugins.\"io.containerd.cri.v1.runtime\".cni]\n  bin_dir = \"/custom/cni\"\n",
    );
    if version.major >= 2 {
        vec![v2, v3]
    } else {
        vec![v2]
    }
}

#[test]
fn install_script_installs_validates_and_uninstalls_in_private_paths() {
    if !(prereq::binary(
        "install_sh",
        &containerd::containerd_bin().to_string_lossy(),
    ) && prereq::binary("install_sh", "sh"))
    {
        return;
    }
    let version = containerd::version().unwrap();
    for (what, main) in main_configs(version) {
        eprintln!("install.sh, containerd {version}, main config of {what}");
        install_script_with(version, main);
    }
}

fn install_script_with(version: containerd::Version, main: &str) {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    std::fs::write(d.join("config.toml"), main).unwrap();
    let script = packaging_dir().join("install.sh");
    let run = |extra: &[&str]| {
        let mut c = Command::new("sh");
        c.arg(&script)
            .env("PATH", containerd_path())
            .arg("--prefix")
            .arg(d.join("usr"))
            .arg("--containerd-config")
            .arg(d.join("config.toml"))
            .arg("--dropin-dir")
            .arg(d.join("conf.d"))
            .arg("--config-dir")
            .arg(d.join("etc"))
            .args(extra);
        cmd::output_within(&mut c, Duration::from_secs(60)).unwrap()
    };
    let bin_dir = bins::dir().display().to_string();
    // Without --add-import it refuses and says what to add.
    let out = run(&["--bin-dir", &bin_dir]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("imports = ["));
    let out = run(&["--bin-dir", &bin_dir, "--add-import"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("containerd config OK"), "{stdout}");
    assert!(stdout.contains("restart containerd"), "{stdout}");
    let cfg = std::fs::read_to_string(d.join("etc/config.toml")).unwrap();
    assert!(cfg.contains(&format!(
        "binary = \"{}/usr/bin/sidetunnel-proxy\"",
        d.display()
    )));
    let dropin = std::fs::read_to_string(d.join("conf.d/sidetunnel.toml")).unwrap();
    assert!(dropin.contains(&format!("ConfigPath = \"{}/etc/config.toml\"", d.display())));
    // The daemon itself loads the result: the merged config has the
    // sidetunnel handler and still the main config's CRI settings (1.x
    // replaces imported plugin sections whole, so there the drop-in carries
    // them; 2.x merges key by key).
    let dump = config_dump(&d.join("config.toml"));
    let plugin = if version.major >= 2 {
        "io.containerd.cri.v1.runtime"
    } else {
        "io.containerd.grpc.v1.cri"
    };
    let handler = dump_section(
        &dump,
        &format!("[plugins.\"{plugin}\".containerd.runtimes.sidetunnel]"),
    );
    assert!(
        handler.contains("runtime_type = \"io.containerd.sidetunnel.v1\"")
            && handler.contains(&format!("ConfigPath = \"{}/etc/config.toml\"", d.display())),
        "no sidetunnel handler in containerd {version}'s merged config:\n{dump}"
    );
    let cni = dump_section(&dump, &format!("[plugins.\"{plugin}\".cni]"));
    assert!(
        cni.contains("\"/custom/cni\""),
        "main config's CNI bin dir lost:\n{cni}"
    );
    if version.major < 2 {
        assert!(dropin.contains("bin_dir = \"/custom/cni\""), "{dropin}");
    }
    // The proxy uid can execute the installed proxy (checked by the shim).
    assert!(stdout.contains("proxy OK: "), "{stdout}");
    // Idempotent, and keeps the operator's config.
    let mine = format!("# mine\n{cfg}");
    std::fs::write(d.join("etc/config.toml"), &mine).unwrap();
    assert!(run(&["--bin-dir", &bin_dir]).status.success());
    assert_eq!(
        std::fs::read_to_string(d.join("etc/config.toml")).unwrap(),
        mine
    );
    // A proxy the proxy uid cannot execute: the install fails saying so.
    let proxy = d.join("usr/bin/sidetunnel-proxy");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "chmod 0700 '{p}' && '{shim}' check-proxy '{cfg}'",
            p = proxy.display(),
            shim = d.join("usr/bin/containerd-shim-sidetunnel-v1").display(),
            cfg = d.join("etc/config.toml").display()
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "check-proxy passed an unexecutable proxy"
    );
    assert!(
        err.contains(&proxy.display().to_string())
            && err.contains("uid 15000")
            && err.contains("EACCES"),
        "{err}"
    );
    assert!(run(&["--uninstall", "--purge"]).status.success());
    for p in [
        "usr/bin/containerd-shim-sidetunnel-v1",
        "conf.d/sidetunnel.toml",
        "etc",
    ] {
        assert!(!d.join(p).exists(), "{p} left after uninstall");
    }
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", PKG])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn dpkg(args: &[&str]) -> String {
    cmd::run_ok(Command::new("dpkg").args(args), WAIT)
        .unwrap_or_else(|e| panic!("dpkg {args:?}: {e:#}"))
}

/// Purges the package when dropped unless the test already did.
struct PurgeGuard;

impl Drop for PurgeGuard {
    fn drop(&mut self) {
        if installed() {
            let _ = cmd::output_within(Command::new("dpkg").args(["--purge", PKG]), WAIT);
        }
    }
}

#[test]
fn deb_installs_runs_a_pod_through_the_dropin_and_purges_cleanly() {
    let t = "packaging_deb";
    if !(mesh::node_prerequisites(t) && prereq::binary(t, "dpkg-deb")) {
        return;
    }
    // Never disturb a real installation.
    let clean = !installed() && INSTALLED.iter().all(|p| !Path::new(p).exists());
    if !prereq::check(
        t,
        clean,
        "sidetunnel is already installed on this machine (or its files exist)",
    ) {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let out = tempfile::tempdir().unwrap();
    let deb = cmd::run_ok(
        Command::new("sh")
            .arg(packaging_dir().join("deb/build.sh"))
            .arg("--bin-dir")
            .arg(bins::dir())
            .arg("--out-dir")
            .arg(out.path())
            .args(["--compression", "none"]),
        WAIT,
    )
    .expect("packaging/deb/build.sh");
    let deb = deb.trim();
    let _guard = PurgeGuard;
    dpkg(&["-i", deb]);
    assert!(installed());
    for p in INSTALLED {
        assert!(Path::new(p).is_file(), "{p} not installed");
    }
    let conffiles = cmd::run_ok(
        Command::new("dpkg-query").args(["-W", "-f", "${Conffiles}", PKG]),
        WAIT,
    )
    .unwrap();
    assert!(
        conffiles.contains("/etc/sidetunnel/config.toml"),
        "config.toml is not a conffile: {conffiles}"
    );
    // The system drop-in was generated from /etc/containerd/config.toml.
    let dropin = std::fs::read_to_string(DROPIN).unwrap();
    assert!(
        dropin.contains("runtime_type = \"io.containerd.sidetunnel.v1\"")
            && dropin.contains("ConfigPath = \"/etc/sidetunnel/config.toml\""),
        "{dropin}"
    );

    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(300), pod_through_dropin())
            .await
            .expect("pod through the installed runtime timed out")
    });

    dpkg(&["--purge", PKG]);
    assert!(!installed(), "still installed after purge");
    for p in INSTALLED.iter().chain(&["/etc/sidetunnel", STATE_ROOT]) {
        assert!(!Path::new(p).exists(), "{p} left after purge");
    }
}

/// The harness containerd gets its `sidetunnel` runtime only from a drop-in
/// the installed generator made from the harness's config (the system's
/// drop-in carries the system's CRI settings), and the system PATH: it must
/// find /usr/bin/containerd-shim-sidetunnel-v1, which runs
/// /usr/bin/sidetunnel-proxy per the installed config (rewritten, as an
/// operator would, to point at this test's meshd).
async fn pod_through_dropin() {
    let mut node = MeshNode::init(&bins::path("sidetunnel-meshd")).unwrap();
    let conf_d = tempfile::tempdir().unwrap();
    let out = conf_d.path().join("sidetunnel.toml");
    let generate = BeforeStart(Arc::new(move |config: &Path| {
        cmd::run_ok(
            Command::new(GENERATOR)
                .env("PATH", containerd_path())
                .arg("--containerd-config")
                .arg(config)
                .arg("--out")
                .arg(&out),
            WAIT,
        )
        .map(drop)
    }));
    let h = Containerd::start_with_images(Options {
        // A glob: the file does not exist yet when the config is rendered.
        imports: vec![conf_d.path().join("*.toml")],
        system_path_only: true,
        before_start: Some(generate),
        ..Default::default()
    })
    .await
    .unwrap();
    node.serve(&h).unwrap();
    let config = node
        .node_config(
            &h,
            &NodeConfigParams {
                proxy_binary: "/usr/bin/sidetunnel-proxy".into(),
                state_root: STATE_ROOT.into(),
                readiness_timeout: "60s".into(),
                log_level: "info".into(),
            },
        )
        .unwrap();
    std::fs::write("/etc/sidetunnel/config.toml", config).unwrap();

    let res = async {
        let mut cri = h.cri().await?;
        let pc = h.pod_config("pkg-web", SIDETUNNEL).namespace("pkg");
        node.mint_token("pkg", "pkg-web", &pc.uid, "web")?;
        let app = ContainerSpec::new("app", image::BUSYBOX).command(&["sleep", "3600"]);
        let (pod, c, took) = cri.run_pod_with_container(&pc, &app).await?;
        eprintln!("packaging: RunPodSandbox -> app running in {took:?}");
        cri.wait_container_state(&c.id, ContainerState::ContainerRunning, WAIT)
            .await?;
        // The shim containerd started is the installed one, and so is the proxy.
        let shims = h.shim_pids();
        anyhow::ensure!(!shims.is_empty(), "no shim process");
        for pid in shims {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
            anyhow::ensure!(
                exe == Path::new("/usr/bin/containerd-shim-sidetunnel-v1"),
                "shim runs {}",
                exe.display()
            );
        }
        let proxy = mesh::proxy_pid(Path::new(STATE_ROOT), &pod.id)?;
        let exe = std::fs::read_link(format!("/proc/{proxy}/exe"))?;
        anyhow::ensure!(
            exe == Path::new("/usr/bin/sidetunnel-proxy"),
            "proxy runs {}",
            exe.display()
        );
        let dump = mesh::admin_get(
            &mesh::admin_socket(Path::new(STATE_ROOT), &pod.id),
            "/config_dump",
        )?;
        anyhow::ensure!(
            dump.contains("spiffe://cluster.local/ns/pkg/sa/web"),
            "proxy has no certificate for its identity: {dump}"
        );
        cri.stop_pod(&pod.id).await?;
        cri.remove_pod(&pod.id).await?;
        anyhow::ensure!(
            !Path::new(STATE_ROOT).join(&pod.id).exists(),
            "pod state left"
        );
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = &res {
        eprintln!(
            "{e:#}\ncontainerd log tail:\n{}\nmeshd log tail:\n{}",
            h.log_tail(40),
            node.log_tail(20)
        );
    }
    h.shutdown().await.unwrap();
    res.unwrap();
}
