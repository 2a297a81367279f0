//! The MSRs each vCPU starts with (as Firecracker): SYSENTER/SYSCALL state cleared, TSC zero,
//! fast strings on, MTRRs on with write-back as the default type.

use kvm_bindings::kvm_msr_entry;

/// IA32_SYSENTER_CS.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// IA32_SYSENTER_ESP.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// IA32_SYSENTER_EIP.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// STAR (SYSCALL segments).
pub const MSR_STAR: u32 = 0xc000_0081;
/// LSTAR (64-bit SYSCALL target).
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// CSTAR (compat SYSCALL target).
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// SFMASK (SYSCALL RFLAGS mask).
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// KERNEL_GS_BASE.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// IA32_TSC.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_MISC_ENABLE.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_MTRR_DEF_TYPE.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

/// The boot MSRs, keeping only those whose index `supported` says KVM can set.
pub fn boot_msr_entries(supported: impl Fn(u32) -> bool) -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
    .into_iter()
    .filter(|(index, _)| supported(*index))
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_msrs_are_left_out() {
        let all = boot_msr_entries(|_| true);
        assert_eq!(all.len(), 11);
        let misc = all
            .iter()
            .find(|e| e.index == MSR_IA32_MISC_ENABLE)
            .unwrap();
        assert_eq!(misc.data, 1);
        let mtrr = all.iter().find(|e| e.index == MSR_MTRR_DEF_TYPE).unwrap();
        assert_eq!(mtrr.data, 0x806);
        let some = boot_msr_entries(|i| i != MSR_MTRR_DEF_TYPE && i != MSR_IA32_TSC);
        assert_eq!(some.len(), 9);
        assert!(some.iter().all(|e| e.index != MSR_MTRR_DEF_TYPE));
    }
}
