//! x86_64 boot support: the guest physical memory layout, the Linux zero page and e820 map,
//! identity page tables, the boot GDT, CPUID filtering, boot MSRs, MP tables, and the initial
//! register state of each vCPU.
//!
//! The layout follows Firecracker's: low memory holds the boot structures (GDT, zero page,
//! page tables, command line), the kernel loads at 1 MiB, the initramfs sits at the top of the
//! RAM below the 32-bit MMIO gap, and virtio-mmio devices live in that gap.

pub mod boot_params;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod msrs;
pub mod paging;
pub mod regs;

/// Errors of the x86_64 boot set-up.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// Writing a boot structure into guest memory failed.
    #[error("cannot write the {what} into guest memory: {source}")]
    GuestWrite {
        /// Which structure.
        what: &'static str,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The guest memory is too small for the boot layout.
    #[error("guest memory of {size} bytes is too small: at least {min} bytes are needed")]
    MemoryTooSmall {
        /// The size asked for.
        size: u64,
        /// The least that works.
        min: u64,
    },
    /// A vCPU ioctl failed while its boot state was set.
    #[error("cannot set up vCPU {vcpu}: {what} failed: {source}")]
    Vcpu {
        /// vCPU index.
        vcpu: u8,
        /// The ioctl.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The CPUID table could not be built.
    #[error("cannot build the CPUID table: {0}")]
    Cpuid(String),
    /// Too many vCPUs for the MP table or the APIC id space.
    #[error("{0} vCPUs is too many: husk-vmm supports 1 to {max}", max = layout::MAX_VCPUS)]
    TooManyVcpus(u8),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, ArchError>;
