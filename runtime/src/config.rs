//! Runtime configuration: boot artifacts, backend, VM size, where state
//! lives. Defaults come from the environment so tests and the CLI share them.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::host::{which, HostProbe};
use crate::hypervisor::husk_vmm::HuskVmm;
use crate::hypervisor::qemu::{Accel, Qemu};
use crate::hypervisor::{choose_backend, BackendChoice, BackendKind, Hypervisor};

/// Where `guest-kernel/build.sh` and `rootfs/build.sh` leave their output.
pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("HUSK_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/husk"))
}

/// Backend selection in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendSetting {
    /// Probe the host and pick the fastest backend that works.
    Auto,
    /// Use this backend or fail.
    Fixed(BackendKind),
}

impl BackendSetting {
    /// Parses `auto` or a backend name.
    pub fn parse(s: &str) -> Result<BackendSetting> {
        if s == "auto" {
            return Ok(BackendSetting::Auto);
        }
        BackendKind::parse(s)
            .map(BackendSetting::Fixed)
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown backend {s:?}; use auto, qemu-kvm or qemu-tcg (or husk-vmm)"
                ))
            })
    }
}

/// Everything needed to start sandboxes.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// ELF vmlinux.
    pub kernel: PathBuf,
    /// initramfs with husk-agent as /init.
    pub initramfs: PathBuf,
    /// Backend choice.
    pub backend: BackendSetting,
    /// vCPUs per sandbox.
    pub vcpus: u8,
    /// Guest memory per sandbox, MiB.
    pub memory_mib: u32,
    /// QEMU binary; found in PATH when unset.
    pub qemu_binary: Option<PathBuf>,
    /// `husk-vsock` binary; looked for beside the running executable, then
    /// in PATH, when unset.
    pub vsock_backend: Option<PathBuf>,
    /// `husk-vmm` binary; looked for beside the running executable, then in
    /// PATH, when unset (`HUSK_VMM`).
    pub husk_vmm: Option<PathBuf>,
    /// Directory under which each sandbox gets its state directory.
    pub run_root: PathBuf,
    /// How long a sandbox may take from spawn to a ready agent.
    pub boot_timeout: Duration,
    /// Extra kernel command-line words.
    pub kernel_params: String,
    /// Share a directory with the guest over virtio-fs (needed for
    /// containers).
    pub shared_fs: bool,
    /// virtiofsd binary; found in PATH, `~/.cargo/bin` or `/usr/libexec`
    /// when unset.
    pub virtiofsd: Option<PathBuf>,
    /// The pod's network namespace on the host (made by CNI), whose interfaces the VM takes
    /// over (see [`crate::network`]); `None`: the VM has loopback only.
    pub network_namespace: Option<PathBuf>,
    /// The VM's hostname, which containers that share the pod's UTS namespace see; `None`:
    /// the sandbox id.
    pub hostname: Option<String>,
}

impl RuntimeConfig {
    /// Defaults, overridden by `HUSK_KERNEL`, `HUSK_INITRAMFS`,
    /// `HUSK_BACKEND`, `HUSK_RUN_DIR`, `HUSK_KERNEL_PARAMS`.
    pub fn from_env() -> Result<RuntimeConfig> {
        let cache = default_cache_dir();
        let env_path = |k: &str, d: PathBuf| std::env::var_os(k).map(PathBuf::from).unwrap_or(d);
        let backend = match std::env::var("HUSK_BACKEND") {
            Ok(s) => BackendSetting::parse(&s)?,
            Err(_) => BackendSetting::Auto,
        };
        Ok(RuntimeConfig {
            kernel: env_path("HUSK_KERNEL", cache.join("vmlinux")),
            initramfs: env_path("HUSK_INITRAMFS", cache.join("initramfs.cpio")),
            backend,
            vcpus: 1,
            memory_mib: 256,
            qemu_binary: None,
            vsock_backend: None,
            husk_vmm: std::env::var_os("HUSK_VMM").map(PathBuf::from),
            run_root: env_path("HUSK_RUN_DIR", PathBuf::from("/run/husk")),
            boot_timeout: Duration::from_secs(30),
            kernel_params: std::env::var("HUSK_KERNEL_PARAMS").unwrap_or_default(),
            shared_fs: true,
            virtiofsd: std::env::var_os("HUSK_VIRTIOFSD").map(PathBuf::from),
            network_namespace: None,
            hostname: None,
        })
    }

    /// Which backend this config gets on this host for a VM with NICs (`with_nics`: the pod's
    /// network namespace has interfaces) or without, and why.
    pub fn backend_choice(&self, host: &HostProbe, with_nics: bool) -> Result<BackendChoice> {
        match self.backend {
            // husk-vmm serves the shared directory through virtiofsd as
            // QEMU does, so auto picks it where it runs, except for VMs with
            // NICs: husk-vmm has no virtio-net device yet.
            BackendSetting::Auto => Ok(choose_backend(
                &host.kvm,
                self.husk_vmm().is_ok() && !with_nics,
            )),
            BackendSetting::Fixed(BackendKind::HuskVmm) if !host.kvm.runs_linux() => {
                Err(Error::BackendUnavailable {
                    backend: "husk-vmm",
                    reason: format!("{}; use qemu-tcg or auto", host.kvm.describe()),
                })
            }
            BackendSetting::Fixed(BackendKind::QemuKvm) if !host.kvm.runs_linux() => {
                Err(Error::BackendUnavailable {
                    backend: "qemu-kvm",
                    reason: format!("{}; use qemu-tcg or auto", host.kvm.describe()),
                })
            }
            BackendSetting::Fixed(kind) => Ok(BackendChoice {
                kind,
                reason: "set in the configuration".into(),
                degraded: kind == BackendKind::QemuTcg,
            }),
        }
    }

    /// The QEMU binary to run.
    pub fn qemu_binary(&self) -> Result<PathBuf> {
        match &self.qemu_binary {
            Some(p) => Ok(p.clone()),
            None => which("qemu-system-x86_64").ok_or_else(|| Error::Artifact {
                what: "QEMU",
                path: "qemu-system-x86_64".into(),
                reason: "not found in PATH".into(),
                hint: "install it: apt-get install qemu-system-x86",
            }),
        }
    }

    /// The `husk-vsock` backend binary to run.
    pub fn vsock_backend(&self) -> Result<PathBuf> {
        if let Some(p) = &self.vsock_backend {
            return Ok(p.clone());
        }
        let beside = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("husk-vsock")));
        beside
            .filter(|p| crate::host::is_executable(p))
            .or_else(|| which("husk-vsock"))
            .ok_or_else(|| Error::Artifact {
                what: "vsock backend",
                path: "husk-vsock".into(),
                reason: "not found beside this program nor in PATH".into(),
                hint: "build it with `cargo build --release -p husk-vmm` or run the README set-up",
            })
    }

    /// The `husk-vmm` binary to run.
    pub fn husk_vmm(&self) -> Result<PathBuf> {
        if let Some(p) = &self.husk_vmm {
            return Ok(p.clone());
        }
        let beside = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("husk-vmm")));
        beside
            .filter(|p| crate::host::is_executable(p))
            .or_else(|| which("husk-vmm"))
            .ok_or_else(|| Error::Artifact {
                what: "husk-vmm",
                path: "husk-vmm".into(),
                reason: "not found beside this program nor in PATH".into(),
                hint: "build it with `cargo build --release -p husk-vmm`",
            })
    }

    /// The virtiofsd binary, if one can be found.
    pub fn virtiofsd(&self) -> Option<PathBuf> {
        if let Some(p) = &self.virtiofsd {
            return Some(p.clone());
        }
        which("virtiofsd").or_else(|| {
            let home = std::env::var_os("HOME").map(PathBuf::from);
            home.map(|h| h.join(".cargo/bin/virtiofsd"))
                .into_iter()
                .chain([PathBuf::from("/usr/libexec/virtiofsd")])
                .find(|p| crate::host::is_executable(p))
        })
    }

    /// Builds the hypervisor this config selects on this host.
    pub fn hypervisor(&self, host: &HostProbe, with_nics: bool) -> Result<Box<dyn Hypervisor>> {
        let choice = self.backend_choice(host, with_nics)?;
        if choice.degraded {
            tracing::warn!("{}", choice.reason);
        }
        let accel = match choice.kind {
            BackendKind::QemuKvm => Accel::Kvm,
            BackendKind::QemuTcg => Accel::Tcg,
            BackendKind::HuskVmm => {
                return Ok(Box::new(HuskVmm {
                    binary: self.husk_vmm()?,
                    virtiofsd: self.virtiofsd(),
                }))
            }
        };
        Ok(Box::new(Qemu {
            binary: self.qemu_binary()?,
            vsock_backend: self.vsock_backend()?,
            virtiofsd: self.virtiofsd(),
            accel,
            tsc_khz: host.tsc_khz,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{CgroupLayout, KvmKind};

    fn host(kvm: KvmKind) -> HostProbe {
        HostProbe {
            kvm,
            vhost_vsock: false,
            cgroups: CgroupLayout::V2,
            tsc_khz: Some(1000),
        }
    }

    #[test]
    fn backend_setting_parsing() {
        assert_eq!(BackendSetting::parse("auto").unwrap(), BackendSetting::Auto);
        assert_eq!(
            BackendSetting::parse("qemu-tcg").unwrap(),
            BackendSetting::Fixed(BackendKind::QemuTcg)
        );
        let e = BackendSetting::parse("xen").unwrap_err();
        assert!(e.to_string().contains("auto, qemu-kvm or qemu-tcg"));
    }

    #[test]
    fn forcing_kvm_on_pvm_is_refused_with_a_reason() {
        let mut c = RuntimeConfig::from_env().unwrap();
        c.backend = BackendSetting::Fixed(BackendKind::QemuKvm);
        let e = c.backend_choice(&host(KvmKind::Pvm), false).unwrap_err();
        assert!(e.to_string().contains("PVM"), "{e}");
        assert!(c
            .backend_choice(&host(KvmKind::Hardware { flag: "svm" }), false)
            .is_ok());
        c.backend = BackendSetting::Auto;
        assert_eq!(
            c.backend_choice(&host(KvmKind::Pvm), false).unwrap().kind,
            BackendKind::QemuTcg
        );
    }

    #[test]
    fn auto_picks_qemu_for_a_vm_with_nics() {
        let mut c = RuntimeConfig::from_env().unwrap();
        c.backend = BackendSetting::Auto;
        c.husk_vmm = Some("/bin/true".into());
        let hw = host(KvmKind::Hardware { flag: "vmx" });
        assert_eq!(
            c.backend_choice(&hw, true).unwrap().kind,
            BackendKind::QemuKvm
        );
        assert_eq!(
            c.backend_choice(&hw, false).unwrap().kind,
            BackendKind::HuskVmm
        );
    }

    #[test]
    fn auto_picks_husk_vmm_on_hardware_kvm_with_or_without_a_shared_dir() {
        let mut c = RuntimeConfig::from_env().unwrap();
        c.backend = BackendSetting::Auto;
        c.husk_vmm = Some("/bin/true".into());
        let hw = host(KvmKind::Hardware { flag: "vmx" });
        for shared_fs in [false, true] {
            c.shared_fs = shared_fs;
            assert_eq!(
                c.backend_choice(&hw, false).unwrap().kind,
                BackendKind::HuskVmm
            );
            assert_eq!(
                c.backend_choice(&host(KvmKind::Pvm), false).unwrap().kind,
                BackendKind::QemuTcg
            );
        }
    }
}
