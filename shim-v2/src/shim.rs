//! The shim binary's life cycle: `start` (spawn the long-lived shim for
//! a sandbox and print its address), `delete` (clean up after it), and
//! serving the Task API.

use std::path::PathBuf;
use std::sync::Arc;

use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{DeleteResponse, ExitSignal, Flags, StartOpts};

use crate::service::TaskService;

/// containerd's shim object for husk.
pub struct HuskShim {
    namespace: String,
    id: String,
    bundle: String,
    socket: String,
    exit: Arc<ExitSignal>,
}

/// The pod a bundle belongs to: the CRI sandbox-id annotation of its
/// config.json, else the container's own id.
pub fn grouping_id(bundle: &std::path::Path, id: &str) -> String {
    let spec = std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    spec.as_ref()
        .and_then(|s| s["annotations"][crate::SANDBOX_ID_ANNOTATION].as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or(id)
        .to_string()
}

/// Starts (or finds) the long-lived shim of this container's pod, writes
/// the `address` file in the bundle (the working directory) and returns the
/// address.
pub fn start_daemon(opts: StartOpts) -> containerd_shim::Result<String> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let grouping = grouping_id(&cwd, &opts.id);
    // containerd writes the runtime options (an Any) to our stdin; their
    // ConfigPath names the config file the shim reads.
    let config = runtime_options_config_path();
    let mut vars = Vec::new();
    if let Some(p) = &config {
        vars.push((crate::config::CONFIG_ENV, p.as_str()));
        std::fs::write(cwd.join(crate::config::BUNDLE_RECORD), p).map_err(|err| {
            containerd_shim::Error::IoError {
                context: "recording the config path in the bundle".into(),
                err,
            }
        })?;
    }
    let (_pid, address) = containerd_shim::spawn(opts, &grouping, vars)?;
    containerd_shim::util::write_address(&address)?;
    Ok(address)
}

/// The `ConfigPath` of the runtime options containerd passes on stdin to
/// `start`, if any (stdin is not read when it is a terminal).
fn runtime_options_config_path() -> Option<String> {
    use containerd_shim::protos::protobuf::Message;
    use std::io::{IsTerminal, Read};
    let mut stdin = std::io::stdin();
    if stdin.is_terminal() {
        return None;
    }
    let mut data = Vec::new();
    stdin.read_to_end(&mut data).ok()?;
    if data.is_empty() {
        return None;
    }
    let any =
        containerd_shim::protos::protobuf::well_known_types::any::Any::parse_from_bytes(&data)
            .ok()?;
    crate::config::options_config_path(&any.type_url, &any.value)
}

impl containerd_shim::Shim for HuskShim {
    type T = TaskService;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut containerd_shim::Config) -> Self {
        HuskShim {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            bundle: args.bundle.clone(),
            socket: args.socket.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        start_daemon(opts)
    }

    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let bundle = if self.bundle.is_empty() {
            std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."))
        } else {
            PathBuf::from(&self.bundle)
        };
        let run_root = crate::config::cleanup_run_root(&bundle);
        crate::cleanup::cleanup(&self.id, &bundle, &run_root);
        Ok(DeleteResponse {
            pid: 0,
            // As runc's shim: the task is gone as if SIGKILLed.
            exit_status: 128 + 9,
            exited_at: MessageField::some(Timestamp::now()),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        match TaskService::new(
            &self.namespace,
            &self.id,
            &self.socket,
            publisher,
            Arc::clone(&self.exit),
        ) {
            Ok(s) => s,
            Err(e) => {
                log::error!("starting the task service: {e}");
                std::process::exit(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouping_follows_the_cri_sandbox_annotation() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(grouping_id(d.path(), "c1"), "c1");
        std::fs::write(
            d.path().join("config.json"),
            r#"{"annotations":{"io.kubernetes.cri.sandbox-id":"pod1"}}"#,
        )
        .unwrap();
        assert_eq!(grouping_id(d.path(), "c1"), "pod1");
    }
}
