//! The VM configuration: read from a JSON file (`--config`) or built from flags by the binary.
//!
//! ```json
//! {
//!   "boot": {"kind": "linux", "kernel": "/var/cache/husk/vmlinux",
//!            "initramfs": "initramfs.cpio", "cmdline": "console=ttyS0 reboot=t"},
//!   "vcpus": 1, "memory_mib": 256, "console_log": "console.log",
//!   "vsock": {"uds": "vsock.sock", "guest_cid": 3}, "api_socket": "api.sock",
//!   "fs": {"socket": "virtiofs.sock", "tag": "husk"}
//! }
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::arch::x86_64::layout::{CMDLINE_MAX_SIZE, MAX_VCPUS, MMIO_GAP_START};

/// Errors in a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid JSON for [`VmConfig`].
    #[error("config file {path} is invalid: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// How a Linux kernel is entered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootProtocol {
    /// PVH when the ELF kernel has a PVH note, else the 64-bit Linux boot protocol.
    #[default]
    Auto,
    /// The PVH entry (32-bit, paging off, `hvm_start_info`); ELF kernels with a PVH note only.
    Pvh,
    /// The 64-bit Linux boot protocol (long mode, zero page in `rsi`).
    Linux64,
}

/// CPU mode in which a raw image starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RawMode {
    /// 16-bit real mode, segment bases 0.
    Real,
    /// 64-bit long mode, identity-mapped first 4 GiB, flat segments.
    Long,
}

/// What the VM boots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum BootSource {
    /// A Linux kernel: ELF vmlinux (optionally with a PVH note) or bzImage.
    Linux {
        /// The kernel image.
        kernel: PathBuf,
        /// The initramfs, loaded at the top of low RAM.
        #[serde(default)]
        initramfs: Option<PathBuf>,
        /// The kernel command line (the VMM appends `virtio_mmio.device=` words).
        #[serde(default)]
        cmdline: String,
        /// Entry protocol.
        #[serde(default)]
        protocol: BootProtocol,
    },
    /// Machine code loaded at `load_addr` and entered there (tests and bring-up).
    Raw {
        /// The code.
        image: PathBuf,
        /// Guest physical load (and entry) address.
        load_addr: u64,
        /// CPU mode at entry.
        mode: RawMode,
    },
}

/// The guest's vsock device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The hybrid-vsock Unix socket (host → guest: `CONNECT <port>\n`).
    pub uds: PathBuf,
    /// The guest's CID.
    pub guest_cid: u64,
}

/// The guest's virtio-fs device, served by a vhost-user-fs backend (virtiofsd).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// The backend's vhost-user socket (virtiofsd's `--socket-path`); it must be listening when
    /// the VM is built.
    pub socket: PathBuf,
    /// The tag the guest mounts (`mount -t virtiofs <tag> <dir>`): 1 to 36 bytes, no NUL.
    pub tag: String,
}

fn default_vcpus() -> u8 {
    1
}
fn default_memory() -> u32 {
    256
}
fn yes() -> bool {
    true
}

/// A whole VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// What to boot.
    pub boot: BootSource,
    /// vCPUs (1 to 32).
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Guest RAM in MiB.
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    /// File that receives the serial console (none: discarded).
    #[serde(default)]
    pub console_log: Option<PathBuf>,
    /// The vsock device.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// Add a virtio-rng device.
    #[serde(default = "yes")]
    pub rng: bool,
    /// The virtio-fs device (a shared directory served by virtiofsd).
    #[serde(default)]
    pub fs: Option<FsConfig>,
    /// The control socket.
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    /// Wait for `start` on the control socket before running the vCPUs.
    #[serde(default)]
    pub wait_for_start: bool,
    /// Use KVM's in-kernel irqchip and PIT. Off only for tiny test guests: then `hlt` stops the
    /// VM and no interrupts are delivered.
    #[serde(default = "yes")]
    pub irqchip: bool,
    /// Register an ioeventfd per virtio queue so that queue notifications do not exit to the
    /// VMM. Off (or where KVM refuses it): notifications are MMIO exits.
    #[serde(default = "yes")]
    pub ioeventfd: bool,
}

impl VmConfig {
    /// Read a JSON config file.
    pub fn from_file(path: &Path) -> Result<VmConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Guest RAM in bytes.
    pub fn mem_bytes(&self) -> u64 {
        u64::from(self.memory_mib) << 20
    }

    /// Check ranges and consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return bad(format!(
                "vcpus must be 1 to {MAX_VCPUS}, not {}",
                self.vcpus
            ));
        }
        if !self.irqchip && self.vcpus > 1 {
            return bad("more than one vCPU needs the irqchip (to start the others)".into());
        }
        if self.memory_mib < 2 {
            return bad(format!(
                "memory_mib must be at least 2, not {}",
                self.memory_mib
            ));
        }
        if u64::from(self.memory_mib) > (1 << 20) {
            return bad(format!("memory_mib {} is more than 1 TiB", self.memory_mib));
        }
        if let Some(v) = &self.vsock {
            if !(3..=u64::from(u32::MAX - 1)).contains(&v.guest_cid) {
                return bad(format!(
                    "guest_cid {} is reserved or too large",
                    v.guest_cid
                ));
            }
        }
        if let Some(f) = &self.fs {
            if f.socket.as_os_str().is_empty() {
                return bad("fs.socket is empty".into());
            }
            if let Err(e) = crate::devices::virtio::fs::FsConfigSpace::new(&f.tag) {
                return bad(e.to_string());
            }
        }
        if self.wait_for_start && self.api_socket.is_none() {
            return bad("wait_for_start needs an api_socket to receive `start`".into());
        }
        match &self.boot {
            BootSource::Linux { cmdline, .. } => {
                if self.memory_mib < 16 {
                    return bad("a Linux guest needs at least 16 MiB".into());
                }
                if cmdline.len() >= CMDLINE_MAX_SIZE / 2 {
                    return bad(format!(
                        "the kernel command line is {} bytes; keep it under {}",
                        cmdline.len(),
                        CMDLINE_MAX_SIZE / 2
                    ));
                }
            }
            BootSource::Raw {
                load_addr, mode, ..
            } => {
                let low_end = self.mem_bytes().min(MMIO_GAP_START);
                if *load_addr >= low_end {
                    return bad(format!("load_addr {load_addr:#x} is outside guest RAM"));
                }
                if *mode == RawMode::Real && *load_addr >= 0x1_0000 {
                    return bad("a real-mode image must load below 64 KiB".into());
                }
                if *mode == RawMode::Long && *load_addr < 0x1_0000 {
                    return bad(
                        "a long-mode image must load at 64 KiB or above (boot tables live below)"
                            .into(),
                    );
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(load_addr: u64, mode: RawMode) -> VmConfig {
        VmConfig {
            boot: BootSource::Raw {
                image: "x".into(),
                load_addr,
                mode,
            },
            vcpus: 1,
            memory_mib: 16,
            console_log: None,
            vsock: None,
            rng: true,
            fs: None,
            api_socket: None,
            wait_for_start: false,
            irqchip: true,
            ioeventfd: true,
        }
    }

    #[test]
    fn json_with_defaults() {
        let c: VmConfig = serde_json::from_str(
            r#"{"boot": {"kind": "linux", "kernel": "/k", "cmdline": "console=ttyS0"},
                "vsock": {"uds": "/tmp/v.sock", "guest_cid": 3}}"#,
        )
        .unwrap();
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.memory_mib, 256);
        assert!(c.rng && c.irqchip && !c.wait_for_start);
        assert_eq!(
            c.boot,
            BootSource::Linux {
                kernel: "/k".into(),
                initramfs: None,
                cmdline: "console=ttyS0".into(),
                protocol: BootProtocol::Auto
            }
        );
        c.validate().unwrap();
        assert!(serde_json::from_str::<VmConfig>(
            r#"{"boot": {"kind": "linux", "kernel": "/k"}, "cpus": 2}"#
        )
        .is_err());
    }

    #[test]
    fn validation() {
        raw(0x10000, RawMode::Long).validate().unwrap();
        raw(0x1000, RawMode::Real).validate().unwrap();
        assert!(raw(0x1000, RawMode::Long).validate().is_err());
        assert!(raw(0x10000, RawMode::Real).validate().is_err());
        assert!(raw(16 << 20, RawMode::Long).validate().is_err());
        let mut c = raw(0x10000, RawMode::Long);
        c.vcpus = 0;
        assert!(c.validate().is_err());
        c.vcpus = 2;
        c.irqchip = false;
        assert!(c.validate().is_err());
        let mut c = raw(0x10000, RawMode::Long);
        c.vsock = Some(VsockConfig {
            uds: "u".into(),
            guest_cid: 2,
        });
        assert!(c.validate().is_err());
        let mut c = raw(0x10000, RawMode::Long);
        c.wait_for_start = true;
        assert!(c.validate().is_err());
    }

    #[test]
    fn fs_device_config() {
        let c: VmConfig = serde_json::from_str(
            r#"{"boot": {"kind": "linux", "kernel": "/k"},
                "fs": {"socket": "/run/x/virtiofs.sock", "tag": "husk"}}"#,
        )
        .unwrap();
        assert_eq!(
            c.fs,
            Some(FsConfig {
                socket: "/run/x/virtiofs.sock".into(),
                tag: "husk".into()
            })
        );
        c.validate().unwrap();
        assert!(serde_json::from_str::<VmConfig>(
            r#"{"boot": {"kind": "linux", "kernel": "/k"}, "fs": {"socket": "/s"}}"#
        )
        .is_err());
        for (socket, tag, why) in [
            ("/s", "", "tag"),
            ("/s", "a\0b", "tag"),
            ("/s", &"t".repeat(37), "tag"),
            ("", "husk", "fs.socket"),
        ] {
            let mut c = raw(0x10000, RawMode::Long);
            c.fs = Some(FsConfig {
                socket: socket.into(),
                tag: tag.into(),
            });
            let e = c.validate().unwrap_err();
            assert!(e.to_string().contains(why), "{e}");
        }
    }
}
