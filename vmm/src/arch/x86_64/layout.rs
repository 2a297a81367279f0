//! Guest physical memory layout. All addresses are guest physical.

/// The boot GDT (four 8-byte entries).
pub const GDT_ADDR: u64 = 0x500;
/// An empty IDT for the boot (limit 7): any exception before the kernel sets its own IDT is a
/// triple fault.
pub const IDT_ADDR: u64 = 0x520;
/// The PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// The PVH memory map (right after the start info).
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page map level 4 of the identity page tables.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table of the identity page tables.
pub const PDPTE_START: u64 = 0xa000;
/// First of the four page directories (2 MiB pages) that identity-map the first 4 GiB.
pub const PDE_START: u64 = 0xb000;
/// End of the page-table area (exclusive).
pub const PAGE_TABLES_END: u64 = PDE_START + 4 * 0x1000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line, NUL included (Linux x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area, where the MP table lives; reserved in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// End of the first RAM range (the legacy VGA/BIOS hole starts here).
pub const EBDA_END: u64 = 0xa0000;
/// Where the kernel and high memory start (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap: RAM above this goes to 4 GiB and up.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Base of the first virtio-mmio device; each device gets [`MMIO_DEVICE_SIZE`] bytes.
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// Address of the IOAPIC (for the MP table).
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Address of the local APIC (for the MP table).
pub const APIC_ADDR: u64 = 0xfee0_0000;
/// KVM's TSS area, three pages just below the BIOS area (set with `KVM_SET_TSS_ADDR`).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// IRQ of the serial port COM1.
pub const SERIAL_IRQ: u32 = 4;
/// IRQ of the first virtio-mmio device; the next ones count up.
pub const FIRST_VIRTIO_IRQ: u32 = 5;
/// Last usable IRQ (the IOAPIC has 24 pins).
pub const LAST_IRQ: u32 = 23;
/// Most vCPUs (the MP table and APIC ids stay small).
pub const MAX_VCPUS: u8 = 32;

/// The guest RAM ranges `(start, size)` for `size` bytes of RAM: below the MMIO gap first, the
/// rest from 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, size - MMIO_GAP_START)]
    }
}

/// The end (exclusive) of the RAM below the MMIO gap.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_GAP_START)
}

/// The MMIO window `(base, irq)` of the `index`th virtio-mmio device, or `None` past the IRQs.
pub fn virtio_mmio_slot(index: u32) -> Option<(u64, u32)> {
    let irq = FIRST_VIRTIO_IRQ.checked_add(index)?;
    if irq > LAST_IRQ {
        return None;
    }
    Some((
        MMIO_DEVICES_START + u64::from(index) * MMIO_DEVICE_SIZE,
        irq,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_is_split_around_the_mmio_gap() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(ram_ranges(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
        assert_eq!(low_ram_end(4 << 30), MMIO_GAP_START);
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let areas = [
            (GDT_ADDR, 32),
            (IDT_ADDR, 8),
            (PVH_INFO_START, 0x40),
            (PVH_MEMMAP_START, 0x100),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, PAGE_TABLES_END - PML4_START),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (EBDA_START, EBDA_END - EBDA_START),
        ];
        for (i, a) in areas.iter().enumerate() {
            for b in &areas[i + 1..] {
                assert!(
                    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                    "{a:x?} overlaps {b:x?}"
                );
            }
        }
        const {
            assert!(
                BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000
            )
        };
    }

    #[test]
    fn virtio_slots_end_at_the_last_irq() {
        assert_eq!(virtio_mmio_slot(0), Some((MMIO_DEVICES_START, 5)));
        assert_eq!(virtio_mmio_slot(1), Some((MMIO_DEVICES_START + 0x1000, 6)));
        assert_eq!(virtio_mmio_slot(18).map(|s| s.1), Some(23));
        assert_eq!(virtio_mmio_slot(19), None);
        assert_eq!(virtio_mmio_slot(u32::MAX), None);
    }
}
