//! CPUID for each vCPU: what KVM supports (`KVM_GET_SUPPORTED_CPUID`), adjusted for this
//! vCPU's APIC id and the VM's vCPU count, with the hypervisor bit and the KVM leaves.
//!
//! The adjustments are pure functions over the entry list, so they are unit-tested with no KVM.

use kvm_bindings::kvm_cpuid_entry2;

/// CPUID.1:ECX bit 31: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:ECX bit 24: TSC deadline timer (KVM emulates it with the in-kernel LAPIC).
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// CPUID.1:EDX bit 28: more than one logical processor per package.
const EDX_HTT: u32 = 1 << 28;
/// KVM's signature leaf.
pub const KVM_SIGNATURE_LEAF: u32 = 0x4000_0000;
/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// Adjust the supported CPUID `entries` for vCPU `vcpu` (its APIC id) of a VM with `nr_vcpus`
/// vCPUs. Leaves the VMM does not understand are passed through unchanged.
pub fn filter_cpuid(entries: &mut Vec<kvm_cpuid_entry2>, vcpu: u8, nr_vcpus: u8) {
    let apic_id = u32::from(vcpu);
    let nr = u32::from(nr_vcpus.max(1));
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // EBX[31:24] initial APIC id, EBX[23:16] logical processors per package.
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((nr & 0xff) << 16);
                e.ecx |= ECX_HYPERVISOR | ECX_TSC_DEADLINE;
                if nr > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            4 => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
                let cache_level = (e.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { nr - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((nr - 1) << 26) | ((sharing & 0xfff) << 14);
            }
            0xb | 0x1f => {
                // Extended topology: one thread per core, `nr` cores per package.
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index;
                    }
                    1 => {
                        e.eax = shift_for(nr);
                        e.ebx = nr;
                        e.ecx = (2 << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            KVM_SIGNATURE_LEAF => {
                e.eax = e.eax.max(KVM_SIGNATURE_LEAF + 1);
                [e.ebx, e.ecx, e.edx] = KVM_SIGNATURE;
            }
            _ => {}
        }
    }
    if !entries.iter().any(|e| e.function == KVM_SIGNATURE_LEAF) {
        entries.push(kvm_cpuid_entry2 {
            function: KVM_SIGNATURE_LEAF,
            eax: KVM_SIGNATURE_LEAF + 1,
            ebx: KVM_SIGNATURE[0],
            ecx: KVM_SIGNATURE[1],
            edx: KVM_SIGNATURE[2],
            ..Default::default()
        });
    }
}

/// Bits needed to number `n` cores (the x2APIC id shift of the core level).
fn shift_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0x11,
            ebx: 0x0008_0800 | 0xff00_0000,
            ecx: 0x1,
            edx: 0x1,
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_gets_apic_id_count_and_hypervisor_bit() {
        let mut v = vec![entry(0, 0), entry(1, 0)];
        filter_cpuid(&mut v, 3, 4);
        let l1 = v[1];
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
        assert_eq!(v[0], entry(0, 0), "leaf 0 passes through");
        let mut one = vec![entry(1, 0)];
        filter_cpuid(&mut one, 0, 1);
        assert_eq!(one[0].edx & EDX_HTT, 0);
        assert_eq!(one[0].ebx >> 24, 0);
    }

    #[test]
    fn topology_leaves_name_the_vcpu() {
        let mut v = vec![entry(0xb, 0), entry(0xb, 1), entry(0xb, 2)];
        filter_cpuid(&mut v, 5, 6);
        assert!(v.iter().filter(|e| e.function == 0xb).all(|e| e.edx == 5));
        assert_eq!((v[0].eax, v[0].ebx, v[0].ecx), (0, 1, 0x100));
        assert_eq!((v[1].eax, v[1].ebx, v[1].ecx), (3, 6, 0x201));
        assert_eq!((v[2].eax, v[2].ebx, v[2].ecx), (0, 0, 2));
    }

    #[test]
    fn kvm_signature_leaf_is_present() {
        let mut v = vec![entry(1, 0)];
        filter_cpuid(&mut v, 0, 1);
        let sig = v.iter().find(|e| e.function == KVM_SIGNATURE_LEAF).unwrap();
        let mut s = Vec::new();
        for r in [sig.ebx, sig.ecx, sig.edx] {
            s.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&s[..9], b"KVMKVMKVM");
        let mut v = vec![entry(KVM_SIGNATURE_LEAF, 0)];
        filter_cpuid(&mut v, 0, 1);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].ebx, KVM_SIGNATURE[0]);
    }

    #[test]
    fn cache_leaf_counts_cores() {
        let mut l3 = entry(4, 3);
        l3.eax = (3 << 5) | 0x3; // level 3, unified
        let mut l1 = entry(4, 0);
        l1.eax = (1 << 5) | 0x1;
        let mut v = vec![l1, l3];
        filter_cpuid(&mut v, 0, 4);
        assert_eq!(v[0].eax >> 26, 3);
        assert_eq!((v[0].eax >> 14) & 0xfff, 0);
        assert_eq!((v[1].eax >> 14) & 0xfff, 3);
        assert_eq!(v[1].eax & 0x3fff, (3 << 5) | 0x3);
    }

    #[test]
    fn shift_for_counts() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(shift_for), [0, 1, 2, 2, 3, 3, 4]);
    }
}
