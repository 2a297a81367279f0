//! The `delete` action: what containerd runs after a shim is gone (also
//! after a crash): unmount the bundle's rootfs, and for the sandbox's own
//! id, kill what is left of the VM and remove its state directory and host
//! cgroup.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// The shim socket named in `<bundle>/address` (written by `start`).
fn shim_socket(bundle: &Path) -> Option<PathBuf> {
    let addr = std::fs::read_to_string(bundle.join("address")).ok()?;
    Some(PathBuf::from(addr.trim().trim_start_matches("unix://")))
}

/// Removes `path` if it is a Unix socket (a shim's listening socket).
pub fn remove_socket(path: &Path) {
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    if is_socket {
        if let Err(e) = std::fs::remove_file(path) {
            log::warn!("removing shim socket {path:?}: {e}");
        }
    }
}

/// Whether a shim answers a ttrpc State call for `id` on `sock` within 1 s
/// (an error reply counts: something answered). A bare connect is not
/// enough: containerd runs `delete` as soon as a killed shim's connection
/// breaks, and the dying shim's listener can still accept for a moment
/// (seen in CI); a shim that will never answer is dead.
fn shim_answers(sock: &Path, id: &str) -> bool {
    use containerd_shim::protos::shim_sync::{Client, TaskClient};
    use containerd_shim::protos::ttrpc;
    let Ok(client) = Client::connect(&format!("unix://{}", sock.display())) else {
        return false;
    };
    let req = containerd_shim::api::StateRequest {
        id: id.to_string(),
        ..Default::default()
    };
    match TaskClient::new(client).state(ttrpc::context::with_timeout(1_000_000_000), &req) {
        Ok(_) | Err(ttrpc::Error::RpcStatus(_)) => true,
        Err(_) => false,
    }
}

/// Cleans up after container `id` with bundle `bundle`, whose sandbox
/// state would be `<run_root>/<id>`. While a live shim answers at the
/// bundle's address, the sandbox is still in use by other containers of
/// the pod and stays; a dead shim's socket is removed.
pub fn cleanup(id: &str, bundle: &Path, run_root: &Path) {
    crate::rootfs::unmount(bundle);
    if let Some(sock) = shim_socket(bundle) {
        if shim_answers(&sock, id) {
            return;
        }
        remove_socket(&sock);
    }
    if husk_runtime::sandbox::validate_id(id).is_err() {
        return;
    }
    husk_runtime::remains::remove_sandbox_remains(&run_root.join(id));
    // The VM's processes are gone: its host cgroup can go too.
    if let Ok(Some(path)) = crate::config::cgroups_path(bundle) {
        husk_runtime::host_cgroup::HostCgroup::remove(&path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleanup_removes_a_dead_sandbox_dir_and_is_idempotent() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("run");
        let bundle = d.path().join("bundle");
        std::fs::create_dir_all(run.join("c1/shared")).unwrap();
        std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
        std::fs::write(bundle.join("address"), "unix:///nonexistent/sock").unwrap();
        cleanup("c1", &bundle, &run);
        assert!(!run.join("c1").exists());
        // A live shim's socket (something answers ttrpc there) stays, with
        // its sandbox.
        struct Live;
        impl containerd_shim::protos::shim_sync::Task for Live {}
        let sock = d.path().join("shim.sock");
        let mut server = containerd_shim::protos::ttrpc::Server::new()
            .bind(&format!("unix://{}", sock.display()))
            .unwrap()
            .register_service(containerd_shim::protos::shim_sync::create_task(
                std::sync::Arc::new(Live),
            ));
        server.start().unwrap();
        std::fs::write(bundle.join("address"), format!("unix://{}", sock.display())).unwrap();
        std::fs::create_dir_all(run.join("c1")).unwrap();
        cleanup("c1", &bundle, &run);
        assert!(sock.exists() && run.join("c1").exists());
        server.shutdown();
        // A socket that accepts but never answers (a shim being killed) and
        // one nobody listens on are dead shims': socket and sandbox go.
        let _ = std::fs::remove_file(&sock);
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let t0 = std::time::Instant::now();
        cleanup("c1", &bundle, &run);
        assert!(!sock.exists() && !run.join("c1").exists());
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(3),
            "{:?}",
            t0.elapsed()
        );
        drop(listener);
        std::fs::create_dir_all(run.join("c1")).unwrap();
        cleanup("c1", &bundle, &run);
        assert!(!run.join("c1").exists());
        cleanup("c1", &bundle, &run);
        // Ids husk would never have used are left alone.
        cleanup("../x", &bundle, &run);
    }
}
