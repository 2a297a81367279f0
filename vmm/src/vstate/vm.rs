//! The KVM VM: guest memory in a memfd (so a vhost-user backend could map it), registered as KVM
//! memory slots, the in-kernel irqchip (PIC + IOAPIC + LAPICs) and PIT.

use std::fs::File;
use std::sync::Arc;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::{kvm_err, Result, VstateError};
use crate::arch::x86_64::layout::{ram_ranges, KVM_TSS_ADDRESS};
use crate::devices::virtio::GuestMem;

/// A KVM VM and its memory.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    mem: Arc<GuestMem>,
    mem_size: u64,
    memfd: File,
    irqchip: bool,
    supported_cpuid: CpuId,
    msr_list: Vec<u32>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("mem_size", &self.mem_size)
            .field("irqchip", &self.irqchip)
            .finish()
    }
}

fn create_memory(size: u64) -> Result<(GuestMem, File)> {
    let err = |reason: String| VstateError::Memory {
        size_mib: size >> 20,
        reason,
    };
    let fd = nix::sys::memfd::memfd_create(
        c"husk-guest-ram",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .map_err(|e| err(format!("memfd_create: {e}")))?;
    let file = File::from(fd);
    file.set_len(size)
        .map_err(|e| err(format!("ftruncate: {e}")))?;
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (start, len) in ram_ranges(size) {
        let f = file
            .try_clone()
            .map_err(|e| err(format!("dup memfd: {e}")))?;
        regions.push((
            GuestAddress(start),
            len as usize,
            Some(FileOffset::new(f, offset)),
        ));
        offset += len;
    }
    let mem = GuestMem::from_ranges_with_files(&regions).map_err(|e| err(e.to_string()))?;
    Ok((mem, file))
}

impl Vm {
    /// Open KVM, create the VM with `mem_size` bytes of RAM, and (with `irqchip`) the in-kernel
    /// interrupt controllers and PIT. Without `irqchip` a `hlt` exits to the VMM, which tiny test
    /// guests use to stop.
    pub fn new(mem_size: u64, irqchip: bool) -> Result<Vm> {
        let kvm = Kvm::new().map_err(VstateError::OpenKvm)?;
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let (mem, memfd) = create_memory(mem_size)?;
        for (slot, region) in mem.iter().enumerate() {
            let host =
                mem.get_host_address(region.start_addr())
                    .map_err(|e| VstateError::Memory {
                        size_mib: mem_size >> 20,
                        reason: e.to_string(),
                    })?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping of `region.len()` bytes owned by `mem`, which
            // the Vm keeps alive for as long as the VM fd exists.
            unsafe { fd.set_user_memory_region(r) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        if irqchip {
            fd.create_irq_chip()
                .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let msr_list = kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
        Ok(Vm {
            kvm,
            fd,
            mem: Arc::new(mem),
            mem_size,
            memfd,
            irqchip,
            supported_cpuid,
            msr_list,
        })
    }

    /// The VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The KVM system fd.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Guest memory.
    pub fn memory(&self) -> &Arc<GuestMem> {
        &self.mem
    }

    /// Guest RAM in bytes.
    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }

    /// The memfd behind guest memory (offset 0 = guest address 0; RAM above 4 GiB follows).
    pub fn memfd(&self) -> &File {
        &self.memfd
    }

    /// Whether the in-kernel irqchip exists.
    pub fn has_irqchip(&self) -> bool {
        self.irqchip
    }

    /// What `KVM_GET_SUPPORTED_CPUID` reported.
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// MSRs KVM can save and restore.
    pub fn msr_list(&self) -> &[u32] {
        &self.msr_list
    }

    /// Make 4-byte guest writes of `datamatch` to MMIO address `addr` signal `evt` inside KVM
    /// (`KVM_IOEVENTFD`) instead of exiting to the VMM.
    pub fn register_ioeventfd(&self, evt: &EventFd, addr: u64, datamatch: u32) -> Result<()> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(kvm_err("KVM_IOEVENTFD"))
    }

    /// Make writes to `evt` raise interrupt `gsi` (no-op without an irqchip).
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<()> {
        if !self.irqchip {
            return Ok(());
        }
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(kvm_err("KVM_IRQFD"))
    }
}
