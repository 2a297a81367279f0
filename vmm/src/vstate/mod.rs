//! KVM state: the VM ([`vm::Vm`]: guest memory, irqchip, PIT) and its vCPUs ([`vcpu::Vcpu`],
//! one thread each, running `KVM_RUN` and routing exits to the buses).

pub mod vcpu;
pub mod vm;

/// Errors of the KVM set-up.
#[derive(Debug, thiserror::Error)]
pub enum VstateError {
    /// /dev/kvm could not be opened.
    #[error(
        "cannot open /dev/kvm: {0}; is KVM available and are you allowed to use it (group kvm)?"
    )]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be created.
    #[error("cannot create {size_mib} MiB of guest memory: {reason}")]
    Memory {
        /// Size asked for.
        size_mib: u64,
        /// Why.
        reason: String,
    },
    /// Boot state of a vCPU.
    #[error(transparent)]
    Arch(#[from] crate::arch::x86_64::ArchError),
    /// A vCPU thread could not be started.
    #[error("cannot start the thread of vCPU {0}: {1}")]
    Thread(u8, #[source] std::io::Error),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, VstateError>;

pub(crate) fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VstateError {
    move |source| VstateError::Kvm { what, source }
}
