//! The `Hypervisor` seam: one trait, one implementation per VMM.
//!
//! A backend turns a [`VmSpec`] into a running VM whose guest vsock is
//! reachable through a hybrid-vsock Unix socket, and reports how the VM
//! ended. Everything else (agent dialing, deadlines, cleanup of the sandbox
//! directory) is the sandbox's job, shared by all backends.

pub mod husk_vmm;
pub mod qemu;
pub mod virtiofsd;

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use crate::error::Result;
use crate::host::KvmKind;
use crate::kernel_cmdline::KernelCmdline;

/// Which VMM runs a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// QEMU with hardware KVM.
    QemuKvm,
    /// QEMU with TCG (software emulation): slow, but runs on any host.
    QemuTcg,
    /// husk-vmm, our own KVM micro-VMM (hardware KVM only).
    HuskVmm,
}

impl BackendKind {
    /// The name used in configs and messages.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::QemuKvm => "qemu-kvm",
            BackendKind::QemuTcg => "qemu-tcg",
            BackendKind::HuskVmm => "husk-vmm",
        }
    }

    /// Parses a backend name; `auto` is handled by [`choose_backend`].
    pub fn parse(s: &str) -> Option<BackendKind> {
        match s {
            "qemu-kvm" => Some(BackendKind::QemuKvm),
            "qemu-tcg" => Some(BackendKind::QemuTcg),
            "husk-vmm" => Some(BackendKind::HuskVmm),
            _ => None,
        }
    }
}

/// Why a backend was chosen, for `husk check` and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendChoice {
    /// The backend.
    pub kind: BackendKind,
    /// Why.
    pub reason: String,
    /// Whether this choice is slow enough to warn about.
    pub degraded: bool,
}

/// Picks the backend for this host's KVM kind when the config says `auto`:
/// husk-vmm on hardware KVM when its binary is available (`husk_vmm`),
/// else QEMU+KVM there, and QEMU TCG everywhere else.
pub fn choose_backend(kvm: &KvmKind, husk_vmm: bool) -> BackendChoice {
    match kvm {
        KvmKind::Hardware { flag } if husk_vmm => BackendChoice {
            kind: BackendKind::HuskVmm,
            reason: format!("hardware virtualization ({flag}) and husk-vmm are available"),
            degraded: false,
        },
        KvmKind::Hardware { flag } => BackendChoice {
            kind: BackendKind::QemuKvm,
            reason: format!("hardware virtualization ({flag}) is available"),
            degraded: false,
        },
        other => BackendChoice {
            kind: BackendKind::QemuTcg,
            reason: format!(
                "{}: falling back to QEMU TCG (software emulation, much slower)",
                other.describe()
            ),
            degraded: true,
        },
    }
}

/// Everything a backend needs to start one VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Sandbox id (names the VM).
    pub id: String,
    /// Uncompressed ELF vmlinux with a PVH note.
    pub kernel: PathBuf,
    /// The initramfs whose /init is husk-agent.
    pub initramfs: PathBuf,
    /// Kernel command line (the backend may add its own words).
    pub cmdline: KernelCmdline,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Guest vsock context id.
    pub guest_cid: u32,
    /// Directory for this VM's sockets and logs (the sandbox's state dir).
    pub run_dir: PathBuf,
    /// Where the guest serial console is written.
    pub console_log: PathBuf,
    /// Host directory shared with the guest over virtio-fs (tag
    /// [`SHARED_FS_TAG`]), if any.
    pub shared_dir: Option<PathBuf>,
    /// NICs: an open tap (borrowed for the start call; the backend passes it to the VMM) and
    /// the MAC the guest's device gets. See [`crate::network`].
    pub nics: Vec<(std::os::fd::RawFd, String)>,
}

impl VmSpec {
    /// Checks what every backend needs before starting anything: kernel
    /// and initramfs present and non-empty, a sane VM size.
    pub fn validate(&self) -> Result<()> {
        check_file(
            "guest kernel",
            &self.kernel,
            "build it with guest-kernel/build.sh",
        )?;
        check_file(
            "initramfs",
            &self.initramfs,
            "build it with rootfs/build.sh",
        )?;
        if self.vcpus == 0 || self.memory_mib < 64 {
            return Err(crate::error::Error::Config(format!(
                "a VM needs at least 1 vCPU and 64 MiB (asked for {} and {} MiB)",
                self.vcpus, self.memory_mib
            )));
        }
        Ok(())
    }
}

/// Fails unless `path` is a non-empty regular file.
fn check_file(what: &'static str, path: &std::path::Path, hint: &'static str) -> Result<()> {
    let reason = match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => "not a regular file".to_string(),
        Ok(m) if m.len() == 0 => "empty".to_string(),
        Ok(_) => return Ok(()),
        Err(e) => e.to_string(),
    };
    Err(crate::error::Error::Artifact {
        what,
        path: path.to_path_buf(),
        reason,
        hint,
    })
}

/// virtio-fs tag of the sandbox's shared directory.
pub const SHARED_FS_TAG: &str = "husk";

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmExit {
    /// Which process ended first and how, in words.
    pub reason: String,
    /// The VMM's exit status, when it was the VMM.
    pub status: Option<ExitStatus>,
}

/// A running VM.
pub trait Vm: Send + std::fmt::Debug {
    /// The hybrid-vsock Unix socket that reaches the guest's vsock.
    fn vsock_uds(&self) -> PathBuf;
    /// `Some` once the VM (or a process it cannot live without) has ended.
    fn try_exit(&mut self) -> Result<Option<VmExit>>;
    /// Waits up to `timeout` for the VM to end by itself.
    fn wait_exit(&mut self, timeout: Duration) -> Result<Option<VmExit>>;
    /// Ends the VM at once and reaps every process it had.
    fn kill(&mut self) -> Result<VmExit>;
    /// Host pids of the VM's processes (VMM and helpers), for accounting.
    fn pids(&self) -> Vec<u32>;
}

/// A VMM that can start VMs.
pub trait Hypervisor: Send + Sync + std::fmt::Debug {
    /// The backend this is.
    fn kind(&self) -> BackendKind;
    /// Starts a VM. On error nothing it started is left running.
    fn start(&self, spec: &VmSpec) -> Result<Box<dyn Vm>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_kvm_only_with_hardware_virtualization() {
        let hw = choose_backend(&KvmKind::Hardware { flag: "vmx" }, false);
        assert_eq!(hw.kind, BackendKind::QemuKvm);
        assert!(!hw.degraded);
        let hw = choose_backend(&KvmKind::Hardware { flag: "svm" }, true);
        assert_eq!(hw.kind, BackendKind::HuskVmm);
        assert!(!hw.degraded);
        for k in [
            KvmKind::Pvm,
            KvmKind::Unknown,
            KvmKind::Absent { reason: "x".into() },
        ] {
            let c = choose_backend(&k, true);
            assert_eq!(c.kind, BackendKind::QemuTcg);
            assert!(c.degraded);
            assert!(c.reason.contains("TCG"));
        }
    }

    #[test]
    fn names_round_trip() {
        for k in [
            BackendKind::QemuKvm,
            BackendKind::QemuTcg,
            BackendKind::HuskVmm,
        ] {
            assert_eq!(BackendKind::parse(k.name()), Some(k));
        }
        assert_eq!(BackendKind::parse("firecracker"), None);
    }
}
