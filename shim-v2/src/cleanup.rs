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

/// Cleans up after container `id` with bundle `bundle`, whose sandbox
/// state would be `<run_root>/<id>`. While a live shim answers at the
/// bundle's address, the sandbox is still in use by other containers of
/// the pod and stays; a dead shim's socket is removed.
pub fn cleanup(id: &str, bundle: &Path, run_root: &Path) {
    crate::rootfs::unmount(bundle);
    if let Some(sock) = shim_socket(bundle) {
        if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
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
        // A dead shim's socket goes; a live shim's stays, with its sandbox.
        let sock = d.path().join("shim.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        std::fs::write(bundle.join("address"), format!("unix://{}", sock.display())).unwrap();
        std::fs::create_dir_all(run.join("c1")).unwrap();
        cleanup("c1", &bundle, &run);
        assert!(sock.exists() && run.join("c1").exists());
        drop(listener);
        cleanup("c1", &bundle, &run);
        assert!(!sock.exists() && !run.join("c1").exists());
        cleanup("c1", &bundle, &run);
        // Ids husk would never have used are left alone.
        cleanup("../x", &bundle, &run);
    }
}
