//! The `delete` action: what containerd runs after a shim is gone (also
//! after a crash): unmount the bundle's rootfs, and for the sandbox's own
//! id, kill what is left of the VM and remove its state directory.

use std::path::Path;

/// Host processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<i32> {
    let me = std::process::id();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| u32::try_from(pid).ok() != Some(me))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|raw| {
                    String::from_utf8_lossy(&raw)
                        .replace('\0', " ")
                        .contains(needle)
                })
                .unwrap_or(false)
        })
        .collect()
}

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
    let dir = run_root.join(id);
    if !dir.exists() {
        return;
    }
    // The VMM and its helpers die with the shim (PDEATHSIG); this is for
    // the case where they did not.
    let needle = format!("{}/", dir.display());
    for pid in processes_mentioning(&needle) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let mut mounts = husk_runtime::shared_fs::mounts_under(&dir);
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        log::warn!("removing {dir:?}: {e}");
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
        cleanup("c1", &bundle, &run);
        // Ids husk would never have used are left alone.
        cleanup("../x", &bundle, &run);
    }
}
