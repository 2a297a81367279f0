//! PID 1 duties: mount the pseudo filesystems a container runtime needs
//! and take the VM down when the agent cannot go on (reaping is in
//! `reaper`).

use std::fs;
use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};

/// Errors of guest initialisation.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A mount the agent needs failed.
    #[error("mounting {fstype} on {target} failed: {source} (is the guest kernel built with it? see guest-kernel/husk.config)")]
    Mount {
        /// Filesystem type.
        fstype: &'static str,
        /// Mount point.
        target: &'static str,
        /// Underlying errno.
        source: nix::Error,
    },
    /// A mount point could not be created.
    #[error("creating mount point {target} failed: {source}")]
    MountPoint {
        /// Mount point.
        target: &'static str,
        /// Underlying error.
        source: std::io::Error,
    },
}

/// One pseudo filesystem to mount at boot.
struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// What the guest mounts before serving, in order.
const BOOT_MOUNTS: &[Mount] = &[
    Mount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    Mount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620"),
    },
    Mount {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("mode=1777"),
    },
    Mount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
    Mount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    Mount {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
];

/// Mounts proc, sys, dev, devpts, shm, run, tmp and the cgroup2 hierarchy.
pub fn mount_pseudo_filesystems() -> Result<(), InitError> {
    for m in BOOT_MOUNTS {
        if !Path::new(m.target).is_dir() {
            fs::create_dir_all(m.target).map_err(|source| InitError::MountPoint {
                target: m.target,
                source,
            })?;
        }
        mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data).map_err(|source| {
            InitError::Mount {
                fstype: m.fstype,
                target: m.target,
                source,
            }
        })?;
    }
    // /dev/ptmx must point into this devpts instance for ptys to work.
    let _ = fs::remove_file("/dev/ptmx");
    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    Ok(())
}

/// Ends the VM. Without ACPI the guest cannot power off, so the agent asks
/// for a reboot, which the VMM turns into an exit (`reboot=t` on the kernel
/// command line, `-no-reboot` in QEMU).
pub fn halt_vm() -> ! {
    nix::unistd::sync();
    let err = reboot(RebootMode::RB_AUTOBOOT).unwrap_err();
    // Unreachable unless we lack CAP_SYS_BOOT (not PID 1 of a VM).
    eprintln!("husk-agent: reboot(2) failed: {err}");
    std::process::exit(1);
}
