//! Cleaning up after a sandbox whose owner is gone (crashed shim, killed
//! monitor): kill what is left of the VM, unmount the share, remove the
//! directory. Idempotent; never fails, only logs.

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

/// Removes what a dead sandbox left in `dir` (its state directory under
/// the run dir): processes whose command line names the directory (the
/// VMM and helpers die with their owner by PDEATHSIG; this is for when
/// they did not), mounts under it, then the directory itself.
pub fn remove_sandbox_remains(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let needle = format!("{}/", dir.display());
    for pid in processes_mentioning(&needle) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    // A killed QEMU takes a moment to tear down its guest memory: wait
    // (bounded) until none is left, so callers find nothing behind.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !processes_mentioning(&needle).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let mut mounts = crate::shared_fs::mounts_under(dir);
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("removing {dir:?}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_a_dead_sandbox_dir_and_is_idempotent() {
        let d = tempfile::tempdir().unwrap();
        let sb = d.path().join("sb");
        std::fs::create_dir_all(sb.join("shared/c1")).unwrap();
        remove_sandbox_remains(&sb);
        assert!(!sb.exists());
        remove_sandbox_remains(&sb);
    }
}
