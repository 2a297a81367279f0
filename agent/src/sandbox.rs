//! Sandbox-wide setup in the guest: hostname, the shared filesystem and the pod's network.

use std::path::Path;

use nix::mount::{mount, MsFlags};

use crate::container::ContainerError;

/// Where the sandbox's virtio-fs share is mounted in the guest. The host
/// rewrites container rootfs and volume paths to lie under it.
pub const SHARED_DIR: &str = "/run/husk/shared";

/// Sets the hostname, mounts the shared filesystem `tag` (if any) and sets up the pod's
/// network (checked first, before anything changes).
pub fn create(
    hostname: &str,
    tag: &str,
    interfaces: &[husk_protocols::agent::NetInterface],
    routes: &[husk_protocols::agent::NetRoute],
) -> Result<(), ContainerError> {
    let (interfaces, routes) = crate::network::parse(interfaces, routes)?;
    if !hostname.is_empty() {
        nix::unistd::sethostname(hostname)
            .map_err(|e| ContainerError::InvalidArgument(format!("hostname {hostname:?}: {e}")))?;
    }
    if !tag.is_empty() {
        if tag.len() > 36 || !tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(ContainerError::InvalidArgument(format!(
                "invalid virtio-fs tag {tag:?}"
            )));
        }
        std::fs::create_dir_all(SHARED_DIR)
            .map_err(|e| ContainerError::Internal(format!("creating {SHARED_DIR}: {e}")))?;
        if !is_mountpoint(Path::new(SHARED_DIR)) {
            mount(
                Some(tag),
                SHARED_DIR,
                Some("virtiofs"),
                MsFlags::MS_NODEV,
                None::<&str>,
            )
            .map_err(|e| {
                ContainerError::Internal(format!("mounting virtio-fs {tag:?} on {SHARED_DIR}: {e}"))
            })?;
        }
    }
    if !interfaces.is_empty() {
        crate::network::configure(&interfaces, &routes)?;
    }
    Ok(())
}

fn is_mountpoint(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(p), p.parent().map(std::fs::metadata)) {
        (Ok(m), Some(Ok(parent))) => m.dev() != parent.dev(),
        _ => false,
    }
}
