//! The `delete` action: what containerd runs after a shim is gone (also
//! after a crash): unmount the bundle's rootfs, and for the sandbox's own
//! id, kill what is left of the VM and remove its state directory.

use std::path::Path;

/// Whether a live shim still answers at the address in `<bundle>/address`
/// (then the sandbox is still in use by other containers of the pod).
fn shim_alive(bundle: &Path) -> bool {
    let Ok(addr) = std::fs::read_to_string(bundle.join("address")) else {
        return false;
    };
    let path = addr.trim().trim_start_matches("unix://");
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

/// Cleans up after container `id` with bundle `bundle`, whose sandbox
/// state would be `<run_root>/<id>`.
pub fn cleanup(id: &str, bundle: &Path, run_root: &Path) {
    crate::rootfs::unmount(bundle);
    if husk_runtime::sandbox::validate_id(id).is_err() || shim_alive(bundle) {
        return;
    }
    husk_runtime::remains::remove_sandbox_remains(&run_root.join(id));
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
        cleanup("c1", &bundle, &run);
        // Ids husk would never have used are left alone.
        cleanup("../x", &bundle, &run);
    }
}
