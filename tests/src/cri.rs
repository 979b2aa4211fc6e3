//! A CRI client that plays kubelet against containerd's CRI socket:
//! RunPodSandbox → CreateContainer → StartContainer → ExecSync →
//! ContainerStatus → StopPodSandbox → RemovePodSandbox, every call bounded.

mod config;
pub mod log;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hyper_util::rt::TokioIo;
use sidetunnel_cri_api::v1 as cri;
use sidetunnel_cri_api::v1::image_service_client::ImageServiceClient;
use sidetunnel_cri_api::v1::runtime_service_client::RuntimeServiceClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

pub use config::{ContainerSpec, PodConfig, new_uid};
pub use sidetunnel_cri_api::v1 as api;

/// Bound for calls that start processes (sandbox creation runs CNI and,
/// with sidetunnel, waits for the proxy).
pub const SLOW_CALL: Duration = Duration::from_secs(120);
/// Bound for every other call.
pub const CALL: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct Cri {
    rt: RuntimeServiceClient<Channel>,
    img: ImageServiceClient<Channel>,
}

/// A sandbox created by [`Cri::run_pod`].
#[derive(Debug, Clone)]
pub struct Pod {
    pub id: String,
    pub config: PodConfig,
    /// The exact PodSandboxConfig sent (CreateContainer needs it again).
    pub sandbox_config: cri::PodSandboxConfig,
}

/// A container created by [`Cri::create_container`].
#[derive(Debug, Clone)]
pub struct Container {
    pub id: String,
    pub name: String,
    /// Absolute path of its CRI log file.
    pub log_path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Pod {
    pub fn log_directory(&self) -> PathBuf {
        self.config.log_directory()
    }
}

async fn bounded<T>(
    what: &str,
    limit: Duration,
    fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Err(_) => bail!("CRI {what}: no answer within {limit:?}"),
        Ok(Err(status)) => bail!("CRI {what}: {} ({:?})", status.message(), status.code()),
        Ok(Ok(resp)) => Ok(resp.into_inner()),
    }
}

impl Cri {
    /// Connects to a CRI socket (containerd's gRPC socket).
    pub async fn connect(socket: &Path) -> Result<Cri> {
        let path = socket.to_owned();
        let connector = tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        });
        // The URI is required by tonic but unused: the connector dials the socket.
        let endpoint =
            Endpoint::from_static("http://localhost").connect_timeout(Duration::from_secs(5));
        let channel = endpoint.connect_with_connector(connector);
        let channel = tokio::time::timeout(Duration::from_secs(10), channel)
            .await
            .with_context(|| format!("connecting to {}: timed out", socket.display()))?
            .with_context(|| format!("connecting to {}", socket.display()))?;
        Ok(Cri {
            rt: RuntimeServiceClient::new(channel.clone()),
            img: ImageServiceClient::new(channel),
        })
    }

    pub async fn version(&mut self) -> Result<cri::VersionResponse> {
        let req = cri::VersionRequest {
            version: "v1".into(),
        };
        bounded("Version", CALL, self.rt.version(req)).await
    }

    /// Whether the image store has `image`.
    pub async fn image_present(&mut self, image: &str) -> Result<bool> {
        let req = cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            verbose: false,
        };
        let resp = bounded("ImageStatus", CALL, self.img.image_status(req)).await?;
        Ok(resp.image.is_some())
    }

    /// Waits until CRI's image cache lists `image` (imports reach it via events).
    pub async fn wait_image(&mut self, image: &str, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while !self.image_present(image).await? {
            if Instant::now() > deadline {
                bail!("image {image} not visible to CRI after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// RunPodSandbox, creating the pod's log directory first as kubelet does.
    pub async fn run_pod(&mut self, config: &PodConfig) -> Result<Pod> {
        let dir = config.log_directory();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let sandbox_config = config.to_cri();
        let req = cri::RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: config.runtime_handler.clone(),
        };
        let what = format!(
            "RunPodSandbox({}, handler {})",
            config.name, config.runtime_handler
        );
        let resp = bounded(&what, SLOW_CALL, self.rt.run_pod_sandbox(req)).await?;
        Ok(Pod {
            id: resp.pod_sandbox_id,
            config: config.clone(),
            sandbox_config,
        })
    }

    pub async fn pod_status(&mut self, pod_id: &str) -> Result<cri::PodSandboxStatus> {
        let req = cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.into(),
            verbose: false,
        };
        let resp = bounded("PodSandboxStatus", CALL, self.rt.pod_sandbox_status(req)).await?;
        resp.status
            .with_context(|| format!("PodSandboxStatus({pod_id}) returned no status"))
    }

    /// The pod's primary IP as reported by CNI ("" for host-network pods).
    pub async fn pod_ip(&mut self, pod_id: &str) -> Result<String> {
        Ok(self
            .pod_status(pod_id)
            .await?
            .network
            .map(|n| n.ip)
            .unwrap_or_default())
    }

    pub async fn create_container(&mut self, pod: &Pod, spec: &ContainerSpec) -> Result<Container> {
        let config = pod.config.container_config(spec);
        let log_path = pod.log_directory().join(&config.log_path);
        let req = cri::CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(config),
            sandbox_config: Some(pod.sandbox_config.clone()),
        };
        let what = format!("CreateContainer({})", spec.name);
        let resp = bounded(&what, SLOW_CALL, self.rt.create_container(req)).await?;
        Ok(Container {
            id: resp.container_id,
            name: spec.name.clone(),
            log_path,
        })
    }

    pub async fn start_container(&mut self, id: &str) -> Result<()> {
        let req = cri::StartContainerRequest {
            container_id: id.into(),
        };
        bounded("StartContainer", SLOW_CALL, self.rt.start_container(req)).await?;
        Ok(())
    }

    /// CreateContainer + StartContainer.
    pub async fn run_container(&mut self, pod: &Pod, spec: &ContainerSpec) -> Result<Container> {
        let c = self.create_container(pod, spec).await?;
        self.start_container(&c.id).await?;
        Ok(c)
    }

    /// What kubelet does for a new pod with one container, timed from
    /// RunPodSandbox until ContainerStatus reports the container running.
    pub async fn run_pod_with_container(
        &mut self,
        config: &PodConfig,
        spec: &ContainerSpec,
    ) -> Result<(Pod, Container, Duration)> {
        let started = Instant::now();
        let pod = self.run_pod(config).await?;
        let container = self.run_container(&pod, spec).await?;
        self.wait_container_state(&container.id, cri::ContainerState::ContainerRunning, CALL)
            .await?;
        Ok((pod, container, started.elapsed()))
    }

    pub async fn container_status(&mut self, id: &str) -> Result<cri::ContainerStatus> {
        let req = cri::ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        };
        let resp = bounded("ContainerStatus", CALL, self.rt.container_status(req)).await?;
        resp.status
            .with_context(|| format!("ContainerStatus({id}) returned no status"))
    }

    /// Polls ContainerStatus until the container is in `state`.
    pub async fn wait_container_state(
        &mut self,
        id: &str,
        state: cri::ContainerState,
        limit: Duration,
    ) -> Result<cri::ContainerStatus> {
        let deadline = Instant::now() + limit;
        loop {
            let status = self.container_status(id).await?;
            if status.state == state as i32 {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "container {id} not {state:?} after {limit:?}: state {:?}, reason {:?}, message {:?}, exit {}",
                    cri::ContainerState::try_from(status.state),
                    status.reason,
                    status.message,
                    status.exit_code
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// ExecSync with a `timeout` for the command itself.
    pub async fn exec_sync(
        &mut self,
        id: &str,
        cmd: &[&str],
        timeout: Duration,
    ) -> Result<ExecOutput> {
        let req = cri::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
            timeout: timeout.as_secs().max(1) as i64,
        };
        let what = format!("ExecSync({cmd:?})");
        let resp = bounded(&what, timeout + CALL, self.rt.exec_sync(req)).await?;
        Ok(ExecOutput {
            exit_code: resp.exit_code,
            stdout: String::from_utf8_lossy(&resp.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&resp.stderr).into_owned(),
        })
    }

    /// ExecSync that must exit 0; returns stdout.
    pub async fn exec_ok(&mut self, id: &str, cmd: &[&str]) -> Result<String> {
        let out = self.exec_sync(id, cmd, Duration::from_secs(20)).await?;
        if out.exit_code != 0 {
            bail!(
                "exec {cmd:?} exited {}: {}",
                out.exit_code,
                out.stderr.trim()
            );
        }
        Ok(out.stdout)
    }

    /// StopContainer: SIGTERM, then SIGKILL after `grace`.
    pub async fn stop_container(&mut self, id: &str, grace: Duration) -> Result<()> {
        let req = cri::StopContainerRequest {
            container_id: id.into(),
            timeout: grace.as_secs() as i64,
        };
        bounded(
            "StopContainer",
            grace + SLOW_CALL,
            self.rt.stop_container(req),
        )
        .await?;
        Ok(())
    }

    pub async fn remove_container(&mut self, id: &str) -> Result<()> {
        let req = cri::RemoveContainerRequest {
            container_id: id.into(),
        };
        bounded("RemoveContainer", SLOW_CALL, self.rt.remove_container(req)).await?;
        Ok(())
    }

    pub async fn stop_pod(&mut self, pod_id: &str) -> Result<()> {
        let req = cri::StopPodSandboxRequest {
            pod_sandbox_id: pod_id.into(),
        };
        bounded("StopPodSandbox", SLOW_CALL, self.rt.stop_pod_sandbox(req)).await?;
        Ok(())
    }

    pub async fn remove_pod(&mut self, pod_id: &str) -> Result<()> {
        let req = cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.into(),
        };
        bounded(
            "RemovePodSandbox",
            SLOW_CALL,
            self.rt.remove_pod_sandbox(req),
        )
        .await?;
        Ok(())
    }

    /// Ids of all pod sandboxes.
    pub async fn list_pods(&mut self) -> Result<Vec<String>> {
        let req = cri::ListPodSandboxRequest { filter: None };
        let resp = bounded("ListPodSandbox", CALL, self.rt.list_pod_sandbox(req)).await?;
        Ok(resp.items.into_iter().map(|p| p.id).collect())
    }

    /// Ids of all containers, optionally of one pod.
    pub async fn list_containers(&mut self, pod_id: Option<&str>) -> Result<Vec<String>> {
        let req = cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                pod_sandbox_id: pod_id.unwrap_or_default().into(),
                ..Default::default()
            }),
        };
        let resp = bounded("ListContainers", CALL, self.rt.list_containers(req)).await?;
        Ok(resp.containers.into_iter().map(|c| c.id).collect())
    }
}

impl Container {
    /// Full stdout lines logged so far.
    pub fn stdout_lines(&self) -> Result<Vec<String>> {
        Ok(log::lines(&log::read(&self.log_path)?, "stdout"))
    }

    /// Waits until a stdout line contains `needle`.
    pub async fn wait_log(&self, needle: &str, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(lines) = self.stdout_lines()
                && lines.iter().any(|l| l.contains(needle))
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{:?} not in {} after {limit:?}; log: {:?}",
                    needle,
                    self.log_path.display(),
                    std::fs::read_to_string(&self.log_path).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Median of measured durations (upper median for an even count).
pub fn median(samples: &[Duration]) -> Duration {
    let mut v = samples.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}
