//! The boot GDT and the KVM segment descriptors made from it.

use kvm_bindings::kvm_segment;

/// Build a GDT entry from its flags (access byte in bits 0..7, flags nibble in bits 12..15),
/// base and limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

fn bits(entry: u64, shift: u32, width: u32) -> u8 {
    ((entry >> shift) & ((1 << width) - 1)) as u8
}

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn limit(entry: u64) -> u32 {
    let raw = (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0xffff)) as u32;
    if bits(entry, 55, 1) == 1 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

/// The KVM segment for GDT entry `entry` at index `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let present = bits(entry, 47, 1);
    kvm_segment {
        base: base(entry),
        limit: limit(entry),
        selector: u16::from(index) * 8,
        type_: bits(entry, 40, 4),
        present,
        dpl: bits(entry, 45, 2),
        db: bits(entry, 54, 1),
        s: bits(entry, 44, 1),
        l: bits(entry, 53, 1),
        g: bits(entry, 55, 1),
        avl: bits(entry, 52, 1),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The boot GDT: null, 64-bit code, data, TSS.
pub fn boot_gdt() -> [u64; 4] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// The GDT for the PVH entry: null, flat 32-bit code, flat data, TSS.
pub fn pvh_gdt() -> [u64; 4] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(0xc09b, 0, 0xffff_ffff),
        gdt_entry(0xc093, 0, 0xffff_ffff),
        gdt_entry(0x008b, 0, 0x67),
    ]
}

/// Index of the code segment in [`boot_gdt`].
pub const CODE_INDEX: u8 = 1;
/// Index of the data segment in [`boot_gdt`].
pub const DATA_INDEX: u8 = 2;
/// Index of the TSS in [`boot_gdt`].
pub const TSS_INDEX: u8 = 3;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64_bit() {
        let gdt = boot_gdt();
        let cs = segment_from_gdt(gdt[CODE_INDEX as usize], CODE_INDEX);
        assert_eq!(gdt[1], 0x00af_9b00_0000_ffff);
        assert_eq!(cs.selector, 8);
        assert_eq!(
            (cs.l, cs.db, cs.g, cs.present, cs.s, cs.type_),
            (1, 0, 1, 1, 1, 0xb)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.base, 0);
    }

    #[test]
    fn data_and_tss_segments() {
        let gdt = boot_gdt();
        let ds = segment_from_gdt(gdt[2], DATA_INDEX);
        assert_eq!(gdt[2], 0x00cf_9300_0000_ffff);
        assert_eq!(
            (ds.selector, ds.type_, ds.db, ds.l, ds.unusable),
            (16, 3, 1, 0, 0)
        );
        let tss = segment_from_gdt(gdt[3], TSS_INDEX);
        assert_eq!((tss.selector, tss.type_, tss.s, tss.g), (24, 0xb, 0, 1));
        let null = segment_from_gdt(gdt[0], 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn base_and_limit_round_trip() {
        let e = gdt_entry(0x4093, 0x1234_5678, 0xabcde);
        let s = segment_from_gdt(e, 5);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcde);
        assert_eq!(s.selector, 40);
    }
}
