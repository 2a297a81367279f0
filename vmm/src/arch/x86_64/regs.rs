//! The initial state of a vCPU: general registers, segment registers and control registers for
//! the chosen entry mode, FPU, CPUID, MSRs and the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_regs, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::cpuid::filter_cpuid;
use super::gdt::{boot_gdt, pvh_gdt, segment_from_gdt, CODE_INDEX, DATA_INDEX, TSS_INDEX};
use super::layout::{BOOT_STACK_POINTER, GDT_ADDR, IDT_ADDR, PML4_START};
use super::msrs::boot_msr_entries;
use super::{ArchError, Result};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_NW: u64 = 1 << 29;
const X86_CR0_CD: u64 = 1 << 30;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Where and how a vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// 64-bit long mode with identity paging (Linux 64-bit boot protocol: `rsi` = zero page).
    Long {
        /// Entry address.
        rip: u64,
        /// Value of `rsi` (the zero page for Linux).
        rsi: u64,
    },
    /// 32-bit protected mode, paging off (PVH: `rbx` = `hvm_start_info`).
    Pvh {
        /// Entry address.
        rip: u64,
        /// Value of `rbx`.
        rbx: u64,
    },
    /// 16-bit real mode with all segment bases 0.
    Real {
        /// Entry offset (below 64 KiB).
        rip: u64,
    },
}

fn vcpu_err(vcpu: u8, what: &'static str) -> impl Fn(kvm_ioctls::Error) -> ArchError {
    move |source| ArchError::Vcpu { vcpu, what, source }
}

/// Set CPUID: `supported` filtered for vCPU `id` of `nr_vcpus`.
pub fn setup_cpuid(vcpu: &VcpuFd, supported: &CpuId, id: u8, nr_vcpus: u8) -> Result<()> {
    let mut entries = supported.as_slice().to_vec();
    filter_cpuid(&mut entries, id, nr_vcpus);
    let cpuid = CpuId::from_entries(&entries).map_err(|e| ArchError::Cpuid(format!("{e:?}")))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(vcpu_err(id, "KVM_SET_CPUID2"))
}

/// Set the boot MSRs that KVM lists in `supported`. Returns how many KVM accepted; KVM stops at
/// the first one it refuses, which is logged, not fatal.
pub fn setup_msrs(vcpu: &VcpuFd, id: u8, supported: &[u32]) -> Result<usize> {
    let entries = boot_msr_entries(|i| supported.contains(&i));
    let msrs = Msrs::from_entries(&entries).map_err(|e| ArchError::Cpuid(format!("{e:?}")))?;
    let set = vcpu.set_msrs(&msrs).map_err(vcpu_err(id, "KVM_SET_MSRS"))?;
    if set < entries.len() {
        tracing::warn!(
            "vCPU {id}: KVM accepted {set} of {} boot MSRs (refused {:#x})",
            entries.len(),
            entries[set].index
        );
    }
    Ok(set)
}

/// Set FPU state: x87 control word and MXCSR at their reset values.
pub fn setup_fpu(vcpu: &VcpuFd, id: u8) -> Result<()> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(vcpu_err(id, "KVM_SET_FPU"))
}

/// Set the general registers for `entry`.
pub fn setup_regs(vcpu: &VcpuFd, id: u8, entry: EntryPoint) -> Result<()> {
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        EntryPoint::Long { rip, rsi } => {
            regs.rip = rip;
            regs.rsi = rsi;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
        }
        EntryPoint::Pvh { rip, rbx } => {
            regs.rip = rip;
            regs.rbx = rbx;
        }
        EntryPoint::Real { rip } => {
            regs.rip = rip;
            regs.rsp = BOOT_STACK_POINTER;
        }
    }
    vcpu.set_regs(&regs).map_err(vcpu_err(id, "KVM_SET_REGS"))
}

/// Write the boot GDT (and an empty IDT) into guest memory for `entry`.
pub fn write_gdt(mem: &GuestMemoryMmap, entry: EntryPoint) -> Result<()> {
    let gdt = match entry {
        EntryPoint::Pvh { .. } => pvh_gdt(),
        _ => boot_gdt(),
    };
    let werr = |source| ArchError::GuestWrite {
        what: "GDT",
        source,
    };
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(werr)?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR)).map_err(werr)
}

/// Set segment and control registers for `entry`. The GDT must be in memory ([`write_gdt`]);
/// for [`EntryPoint::Long`] the identity page tables too.
pub fn setup_sregs(vcpu: &VcpuFd, id: u8, entry: EntryPoint) -> Result<()> {
    let mut sregs = vcpu.get_sregs().map_err(vcpu_err(id, "KVM_GET_SREGS"))?;
    match entry {
        EntryPoint::Real { .. } => {
            for seg in [
                &mut sregs.cs,
                &mut sregs.ds,
                &mut sregs.es,
                &mut sregs.fs,
                &mut sregs.gs,
                &mut sregs.ss,
            ] {
                seg.base = 0;
                seg.selector = 0;
            }
        }
        EntryPoint::Long { .. } | EntryPoint::Pvh { .. } => {
            let gdt = match entry {
                EntryPoint::Pvh { .. } => pvh_gdt(),
                _ => boot_gdt(),
            };
            let code = segment_from_gdt(gdt[CODE_INDEX as usize], CODE_INDEX);
            let data = segment_from_gdt(gdt[DATA_INDEX as usize], DATA_INDEX);
            let tss = segment_from_gdt(gdt[TSS_INDEX as usize], TSS_INDEX);
            sregs.gdt.base = GDT_ADDR;
            sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
            sregs.idt.base = IDT_ADDR;
            sregs.idt.limit = 7;
            sregs.cs = code;
            sregs.ds = data;
            sregs.es = data;
            sregs.fs = data;
            sregs.gs = data;
            sregs.ss = data;
            sregs.tr = tss;
            sregs.cr0 = (sregs.cr0 & !(X86_CR0_CD | X86_CR0_NW)) | X86_CR0_PE | X86_CR0_ET;
            if let EntryPoint::Long { .. } = entry {
                sregs.cr3 = PML4_START;
                sregs.cr4 |= X86_CR4_PAE;
                sregs.cr0 |= X86_CR0_PG;
                sregs.efer |= EFER_LME | EFER_LMA;
            } else {
                sregs.cr4 = 0;
                sregs.efer = 0;
            }
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(vcpu_err(id, "KVM_SET_SREGS"))
}

/// Local APIC register offsets of the LINT0/LINT1 local vector table entries.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Wire LINT0 as ExtINT (the PIC) and LINT1 as NMI, as a PC BIOS leaves them.
pub fn setup_lint(vcpu: &VcpuFd, id: u8) -> Result<()> {
    let mut lapic = vcpu.get_lapic().map_err(vcpu_err(id, "KVM_GET_LAPIC"))?;
    for (off, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let mut raw = [0u8; 4];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = lapic.regs[off + i] as u8;
        }
        let v = set_delivery_mode(u32::from_le_bytes(raw), mode);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic)
        .map_err(vcpu_err(id, "KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_mode_bits() {
        assert_eq!(
            set_delivery_mode(0x0001_0000, APIC_MODE_EXTINT),
            0x0001_0700
        );
        assert_eq!(set_delivery_mode(0x0000_0700, APIC_MODE_NMI), 0x0000_0400);
    }

    #[test]
    fn gdt_is_written_for_each_mode() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        write_gdt(&mem, EntryPoint::Long { rip: 0, rsi: 0 }).unwrap();
        let cs: u64 = mem.read_obj(GuestAddress(GDT_ADDR + 8)).unwrap();
        assert_eq!(cs, boot_gdt()[1]);
        write_gdt(&mem, EntryPoint::Pvh { rip: 0, rbx: 0 }).unwrap();
        let cs: u64 = mem.read_obj(GuestAddress(GDT_ADDR + 8)).unwrap();
        assert_eq!(cs, pvh_gdt()[1]);
        let seg = segment_from_gdt(cs, 1);
        assert_eq!((seg.db, seg.l, seg.limit), (1, 0, 0xffff_ffff));
    }
}
