//! seccomp-bpf filters for the `husk-vmm` and `husk-vsock` binaries.
//!
//! Both binaries parse guest-controlled data (virtio rings, vsock packets, MMIO accesses), so
//! after set-up each one narrows the system calls it may make to the few its run phase needs:
//! one allowlist per binary ([`rules`]), compiled with `seccompiler` and installed on every
//! thread of the process at once (`SECCOMP_FILTER_FLAG_TSYNC`):
//!
//! - `husk-vmm` installs it in [`crate::vmm::Vmm::run`] after the VM is built and the vCPU
//!   threads exist (parked), before any vCPU enters `KVM_RUN` and before the first API request
//!   is served. No thread is created afterwards, so `clone` is not allowed at all.
//! - `husk-vsock` installs it after both sockets are bound, before it accepts the frontend. The
//!   vhost-user daemon creates threads later, so `clone` is allowed with `CLONE_THREAD` only
//!   (no new processes), and a second filter makes `clone3` fail with `ENOSYS`, whose flags a
//!   filter cannot read; glibc then falls back to `clone`.
//!
//! Arguments are checked where that narrows something real: `ioctl` requests (`KVM_RUN`, the two
//! register reads of the emulation-failure report, the register and event calls that complete an
//! unemulated `int3`, `FIONBIO`), `socket` domains (`AF_UNIX`),
//! `mmap`/`mprotect` without `PROT_EXEC`, `fcntl` commands, `tgkill` signals.
//!
//! A call outside the list does not run: the kernel sends SIGSYS (`SECCOMP_RET_TRAP`), and the
//! handler ([`sigsys`]) writes `<binary>: seccomp: thread <tid> made the forbidden system call
//! <name> (<nr>)` to stderr and exits at once with [`EXIT_SECCOMP_VIOLATION`] (5), without
//! tearing down (socket files may stay behind; the caller owns their directory). A filter
//! failing to install is a set-up error (status 1). `--seccomp=off` runs without filters.

mod rules;
pub mod sigsys;

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule};

pub use rules::{vmm_rules, vsock_rules, DENIED_OPENS};

/// Exit status of a process killed by its seccomp filter (see [`sigsys`]).
pub const EXIT_SECCOMP_VIOLATION: i32 = 5;

/// Errors of building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The rules could not be compiled to BPF.
    #[error("cannot compile the seccomp filter: {0}")]
    Compile(#[source] seccompiler::BackendError),
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter: {0}; run with --seccomp=off on kernels without seccomp-bpf")]
    Install(#[source] seccompiler::Error),
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(#[source] std::io::Error),
}

/// `--seccomp`: whether the binary filters its system calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompLevel {
    /// The binary's allowlist (the default).
    #[default]
    Default,
    /// No filter.
    Off,
}

impl std::str::FromStr for SeccompLevel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "default" => Ok(SeccompLevel::Default),
            "off" => Ok(SeccompLevel::Off),
            _ => Err("use default or off".into()),
        }
    }
}

/// Which binary a jail is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binary {
    /// `husk-vmm`.
    Vmm,
    /// `husk-vsock`.
    Vsock,
}

impl Binary {
    fn name(self) -> &'static str {
        match self {
            Binary::Vmm => "husk-vmm",
            Binary::Vsock => "husk-vsock",
        }
    }
}

/// The compiled filters of one binary, ready to install.
#[derive(Debug)]
pub struct Jail {
    binary: Binary,
    filters: Vec<BpfProgram>,
    probe: bool,
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(SeccompError::Compile)?;
    let filter =
        SeccompFilter::new(rules, mismatch, matched, arch).map_err(SeccompError::Compile)?;
    BpfProgram::try_from(filter).map_err(SeccompError::Compile)
}

impl Jail {
    /// The filters of `binary`.
    pub fn new(binary: Binary) -> Result<Jail, SeccompError> {
        // Stacked filters: the most restrictive answer wins, so calls the
        // allowlist lets through are answered by the errno filters. Those go
        // first, so installing the allowlist needs no `seccomp` in it.
        let opens = DENIED_OPENS.iter().map(|nr| (*nr, vec![])).collect();
        let mut filters = vec![compile(
            opens,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EACCES as u32),
        )?];
        match binary {
            Binary::Vmm => filters.push(compile(
                vmm_rules(),
                SeccompAction::Trap,
                SeccompAction::Allow,
            )?),
            Binary::Vsock => {
                // `clone3` fails with ENOSYS (glibc then uses `clone`, which the
                // allowlist restricts to threads).
                let clone3 = [(libc::SYS_clone3, vec![])].into_iter().collect();
                filters.push(compile(
                    clone3,
                    SeccompAction::Allow,
                    SeccompAction::Errno(libc::ENOSYS as u32),
                )?);
                filters.push(compile(
                    vsock_rules(),
                    SeccompAction::Trap,
                    SeccompAction::Allow,
                )?);
            }
        }
        Ok(Jail {
            binary,
            filters,
            probe: false,
        })
    }

    /// Test hook (hidden `--debug-forbidden-syscall` flag): right after installing, make one
    /// system call the filter forbids (`socket(AF_INET, ...)`), which must end the process
    /// with [`EXIT_SECCOMP_VIOLATION`].
    pub fn with_probe(mut self, probe: bool) -> Jail {
        self.probe = probe;
        self
    }

    /// The compiled programs, in installation order.
    pub fn filters(&self) -> &[BpfProgram] {
        &self.filters
    }

    /// Install the SIGSYS handler and the filters on every thread of the process.
    pub fn install(&self) -> Result<(), SeccompError> {
        sigsys::install_handler(self.binary.name()).map_err(SeccompError::Handler)?;
        for f in &self.filters {
            seccompiler::apply_filter_all_threads(f).map_err(SeccompError::Install)?;
        }
        tracing::debug!(
            "seccomp: {} filters installed ({} instructions)",
            self.filters.len(),
            self.filters.iter().map(Vec::len).sum::<usize>()
        );
        if self.probe {
            forbidden_syscall();
        }
        Ok(())
    }
}

/// Make a system call that neither allowlist permits: an `AF_INET` socket. Without a filter it
/// simply succeeds and is closed.
pub fn forbidden_syscall() {
    // SAFETY: plain socket(2) with constant arguments; the fd, if any, is closed right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd >= 0 {
        // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
        unsafe { libc::close(fd) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_and_levels_parse() {
        let vmm = Jail::new(Binary::Vmm).unwrap();
        // The EACCES filter for opens, then the allowlist.
        assert_eq!(vmm.filters().len(), 2);
        assert!(vmm.filters()[1].len() > 50);
        let vsock = Jail::new(Binary::Vsock).unwrap();
        // Opens, clone3 (ENOSYS), the allowlist.
        assert_eq!(vsock.filters().len(), 3);
        assert_eq!("off".parse::<SeccompLevel>(), Ok(SeccompLevel::Off));
        assert_eq!("default".parse::<SeccompLevel>(), Ok(SeccompLevel::Default));
        assert!("strict".parse::<SeccompLevel>().is_err());
    }
}
