//! What this host can run: the kind of KVM it has, kernel vhost-vsock,
//! QEMU, virtiofsd, the cgroup layout. Parsing is split from reading so the
//! decisions are unit-tested on recorded `/proc` text.

use std::path::{Path, PathBuf};

/// The virtualization the host's `/dev/kvm` offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmKind {
    /// Hardware virtualization (Intel VT-x `vmx` or AMD-V `svm`): unmodified
    /// Linux guests run at native speed.
    Hardware {
        /// `vmx` or `svm`.
        flag: &'static str,
    },
    /// Pagetable-based paravirtual KVM (`kvm_pvm`): ring-0 guest code is
    /// emulated instruction by instruction and unmodified Linux cannot boot.
    Pvm,
    /// `/dev/kvm` exists but the CPU reports no virtualization flag and no
    /// known software KVM is loaded.
    Unknown,
    /// No usable `/dev/kvm`.
    Absent {
        /// Why it cannot be used.
        reason: String,
    },
}

impl KvmKind {
    /// Whether an unmodified Linux guest can run under this KVM.
    pub fn runs_linux(&self) -> bool {
        matches!(self, KvmKind::Hardware { .. })
    }

    /// A short human description.
    pub fn describe(&self) -> String {
        match self {
            KvmKind::Hardware { flag } => format!("hardware KVM ({flag})"),
            KvmKind::Pvm => "PVM (paravirtual nested KVM; cannot boot unmodified Linux)".into(),
            KvmKind::Unknown => "/dev/kvm without vmx/svm (unknown kind)".into(),
            KvmKind::Absent { reason } => format!("no KVM ({reason})"),
        }
    }
}

/// Decides the KVM kind from the facts read off the host.
pub fn classify_kvm(
    dev_kvm_usable: Result<(), String>,
    cpuinfo: &str,
    pvm_loaded: bool,
) -> KvmKind {
    if let Err(reason) = dev_kvm_usable {
        return KvmKind::Absent { reason };
    }
    if let Some(flag) = virt_flag(cpuinfo) {
        return KvmKind::Hardware { flag };
    }
    if pvm_loaded {
        KvmKind::Pvm
    } else {
        KvmKind::Unknown
    }
}

/// The hardware virtualization flag in `/proc/cpuinfo`, if any.
pub fn virt_flag(cpuinfo: &str) -> Option<&'static str> {
    for line in cpuinfo.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        if key.trim() != "flags" {
            continue;
        }
        for f in value.split_ascii_whitespace() {
            match f {
                "vmx" => return Some("vmx"),
                "svm" => return Some("svm"),
                _ => {}
            }
        }
    }
    None
}

/// The TSC frequency in kHz as the first CPU's "cpu MHz" line gives it, for
/// `tsc_early_khz=` (microvm has no HPET or PM timer to calibrate against).
pub fn tsc_khz_from_cpuinfo(cpuinfo: &str) -> Option<u64> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        if key.trim() != "cpu MHz" {
            return None;
        }
        let mhz: f64 = value.trim().parse().ok()?;
        (mhz.is_finite() && mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
    })
}

/// The host's cgroup layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupLayout {
    /// Only cgroup v2 (unified) is mounted.
    V2,
    /// cgroup v1 controllers and a v2 hierarchy side by side.
    Hybrid,
    /// Only cgroup v1.
    V1,
    /// Neither is mounted.
    None,
}

/// Classifies `/proc/self/mounts` text.
pub fn cgroup_layout(mounts: &str) -> CgroupLayout {
    let (mut v1, mut v2) = (false, false);
    for line in mounts.lines() {
        match line.split_ascii_whitespace().nth(2) {
            Some("cgroup2") => v2 = true,
            Some("cgroup") => v1 = true,
            _ => {}
        }
    }
    match (v1, v2) {
        (false, true) => CgroupLayout::V2,
        (true, true) => CgroupLayout::Hybrid,
        (true, false) => CgroupLayout::V1,
        (false, false) => CgroupLayout::None,
    }
}

/// Finds `name` in `$PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

/// Whether `p` is a regular file with an execute bit.
pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Checks that `/dev/kvm` can be opened read-write.
fn dev_kvm_usable() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("/dev/kvm: {e}"))
}

/// Facts about this host that decide what husk can run.
#[derive(Debug, Clone)]
pub struct HostProbe {
    /// The KVM kind.
    pub kvm: KvmKind,
    /// Whether the kernel's vhost-vsock device is there.
    pub vhost_vsock: bool,
    /// The cgroup layout.
    pub cgroups: CgroupLayout,
    /// TSC frequency in kHz, when known.
    pub tsc_khz: Option<u64>,
}

impl HostProbe {
    /// Reads the facts off this host.
    pub fn detect() -> HostProbe {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let pvm = Path::new("/sys/module/kvm_pvm").exists();
        HostProbe {
            kvm: classify_kvm(dev_kvm_usable(), &cpuinfo, pvm),
            vhost_vsock: Path::new("/dev/vhost-vsock").exists(),
            cgroups: cgroup_layout(&mounts),
            tsc_khz: tsc_khz_from_cpuinfo(&cpuinfo),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTEL: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu MHz\t\t: 2600.000\nflags\t\t: fpu vme de pse vmx sse2\n";
    const PVM: &str =
        "processor\t: 0\ncpu MHz\t\t: 2099.998\nflags\t\t: fpu vme hypervisor sse2 avx\n";

    #[test]
    fn kvm_kind_from_flags_and_modules() {
        assert_eq!(
            classify_kvm(Ok(()), INTEL, false),
            KvmKind::Hardware { flag: "vmx" }
        );
        assert_eq!(
            classify_kvm(Ok(()), "flags : svm lm", true),
            KvmKind::Hardware { flag: "svm" }
        );
        assert_eq!(classify_kvm(Ok(()), PVM, true), KvmKind::Pvm);
        assert_eq!(classify_kvm(Ok(()), PVM, false), KvmKind::Unknown);
        let absent = classify_kvm(Err("no such file".into()), INTEL, false);
        assert!(matches!(absent, KvmKind::Absent { .. }));
        assert!(!absent.runs_linux());
        assert!(KvmKind::Hardware { flag: "vmx" }.runs_linux());
        assert!(!KvmKind::Pvm.runs_linux());
    }

    #[test]
    fn vmx_must_be_a_whole_word_in_flags() {
        assert_eq!(virt_flag("flags : vmxfoo svmbar"), None);
        assert_eq!(virt_flag("model name : vmx svm\nflags : sse"), None);
    }

    #[test]
    fn tsc_khz() {
        assert_eq!(tsc_khz_from_cpuinfo(INTEL), Some(2_600_000));
        assert_eq!(tsc_khz_from_cpuinfo(PVM), Some(2_099_998));
        assert_eq!(tsc_khz_from_cpuinfo("cpu MHz : nan"), None);
        assert_eq!(tsc_khz_from_cpuinfo("cpu MHz : -5"), None);
        assert_eq!(tsc_khz_from_cpuinfo(""), None);
    }

    #[test]
    fn cgroup_layouts() {
        let v2 = "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n";
        let v1 = "cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n";
        assert_eq!(cgroup_layout(v2), CgroupLayout::V2);
        assert_eq!(cgroup_layout(v1), CgroupLayout::V1);
        assert_eq!(cgroup_layout(&format!("{v1}{v2}")), CgroupLayout::Hybrid);
        assert_eq!(cgroup_layout("proc /proc proc rw 0 0"), CgroupLayout::None);
    }
}
