//! A CRI v1 client for tests and benchmarks: the kubelet's side of containerd's CRI plugin
//! (see [`crate::containerd::Builder::cri`]), over its Unix socket, driven synchronously.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatus, ContainerStatusRequest,
    CreateContainerRequest, ImageSpec, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata, RemovePodSandboxRequest,
    RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::containerd::IMAGE;

pub use k8s_cri::v1;

/// A CRI client on containerd's socket; calls go through [`cri_call!`](crate::cri_call).
pub struct Cri {
    /// The runtime the calls block on.
    pub rt: tokio::runtime::Runtime,
    /// The gRPC client.
    pub client: RuntimeServiceClient<Channel>,
}

/// One CRI call on a [`Cri`], blocking: `cri_call!(cri, method, request)` gives the reply or
/// the gRPC status.
#[macro_export]
macro_rules! cri_call {
    ($c:expr, $method:ident, $req:expr) => {
        $c.rt
            .block_on($c.client.$method($req))
            .map(|r| r.into_inner())
    };
}

impl Cri {
    /// Connects to the CRI service on `sock` (containerd's gRPC socket).
    pub fn connect(sock: &Path) -> Cri {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let sock = sock.to_path_buf();
        let channel = rt
            .block_on(
                // The URI is a placeholder: the connector dials the Unix socket.
                Endpoint::from_static("http://[::]:50051").connect_with_connector(
                    tower::service_fn(move |_: Uri| {
                        let sock = sock.clone();
                        async move {
                            let s = tokio::net::UnixStream::connect(sock).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                        }
                    }),
                ),
            )
            .expect("connecting to containerd's CRI service");
        Cri {
            rt,
            client: RuntimeServiceClient::new(channel),
        }
    }

    /// RunPodSandbox of `pod` with the runtime handler `handler` (a RuntimeClass's handler);
    /// the pod's id.
    pub fn run_pod(&mut self, pod: &PodSandboxConfig, handler: &str) -> Result<String, String> {
        crate::cri_call!(
            self,
            run_pod_sandbox,
            RunPodSandboxRequest {
                config: Some(pod.clone()),
                runtime_handler: handler.into(),
            }
        )
        .map(|r| r.pod_sandbox_id)
        .map_err(|e| format!("RunPodSandbox: {e}"))
    }

    /// CreateContainer of `config` in pod `pod_id` (whose config is `pod`), then
    /// StartContainer; the container's id. Errors name the call that failed.
    pub fn create_and_start(
        &mut self,
        pod_id: &str,
        pod: &PodSandboxConfig,
        config: ContainerConfig,
    ) -> Result<String, String> {
        let id = crate::cri_call!(
            self,
            create_container,
            CreateContainerRequest {
                pod_sandbox_id: pod_id.into(),
                config: Some(config),
                sandbox_config: Some(pod.clone()),
            }
        )
        .map_err(|e| format!("CreateContainer: {e}"))?
        .container_id;
        crate::cri_call!(
            self,
            start_container,
            StartContainerRequest {
                container_id: id.clone(),
            }
        )
        .map_err(|e| format!("StartContainer {id}: {e}"))?;
        Ok(id)
    }

    /// StopPodSandbox then RemovePodSandbox of `pod_id` (which also removes its containers),
    /// as the kubelet tears a pod down.
    pub fn stop_and_remove_pod(&mut self, pod_id: &str) -> Result<(), String> {
        crate::cri_call!(
            self,
            stop_pod_sandbox,
            StopPodSandboxRequest {
                pod_sandbox_id: pod_id.into(),
            }
        )
        .map_err(|e| format!("StopPodSandbox: {e}"))?;
        crate::cri_call!(
            self,
            remove_pod_sandbox,
            RemovePodSandboxRequest {
                pod_sandbox_id: pod_id.into(),
            }
        )
        .map(|_| ())
        .map_err(|e| format!("RemovePodSandbox: {e}"))
    }

    /// Polls ContainerStatus until container `id` has exited; its status. Panics after
    /// `timeout`.
    pub fn wait_exited(&mut self, id: &str, timeout: Duration) -> ContainerStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let s = crate::cri_call!(
                self,
                container_status,
                ContainerStatusRequest {
                    container_id: id.to_string(),
                    verbose: false,
                }
            )
            .expect("ContainerStatus")
            .status
            .expect("a container status");
            if s.state == ContainerState::ContainerExited as i32 {
                return s;
            }
            assert!(Instant::now() < deadline, "container {id} still {s:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Stops and removes a pod if the test fails, as the kubelet would: so CNI tears down its
/// network namespace and veth (containerd's own clean-up of a failed test does not go
/// through CRI).
pub struct RemovePodOnPanic {
    /// containerd's socket.
    pub sock: PathBuf,
    /// The pod's id.
    pub id: String,
}

impl Drop for RemovePodOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = Cri::connect(&self.sock).stop_and_remove_pod(&self.id);
        }
    }
}

/// Waits up to 60 s until the CRI log file `path` has a line for `stream` (`stdout` or
/// `stderr`) with exactly `text`, as containerd writes them (`<time> <stream> F <text>`);
/// returns the whole file, or what it held at the deadline as the error.
pub fn wait_for_log_line(path: &Path, stream: &str, text: &str) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        let found = log.lines().any(|l| {
            let f: Vec<&str> = l.splitn(4, ' ').collect();
            f.len() == 4 && f[1] == stream && f[2] == "F" && f[3] == text
        });
        if found {
            return Ok(log);
        }
        if Instant::now() >= deadline {
            return Err(format!("no {stream} line {text:?} in {path:?}: {log:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A pod's config as the kubelet gives it: `name` (also its uid and hostname), logs under
/// `logs`, the network namespace mode (`Node`: `hostNetwork`, no hostname).
pub fn pod_config(name: &str, logs: &Path, network: NamespaceMode) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        // The kubelet leaves the hostname out for pods on the node's network.
        hostname: if network == NamespaceMode::Node {
            String::new()
        } else {
            name.into()
        },
        log_directory: logs.display().to_string(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: network as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A container's config: busybox running `sh -c script`, logging to `<name>.log`.
pub fn container_config(name: &str, script: &str) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: IMAGE.into(),
            ..Default::default()
        }),
        command: vec!["sh".into(), "-c".into(), script.into()],
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}
