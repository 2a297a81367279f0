//! The Intel MultiProcessor Specification 1.4 tables: how a guest without ACPI learns about its
//! vCPUs, the IOAPIC and the ISA interrupt routing. Written at [`EBDA_START`], where Linux scans.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR, LAST_IRQ, MAX_VCPUS};
use super::{ArchError, Result};

const MPC_SPEC: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
const BUS_ID_ISA: u8 = 0;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// The MP floating pointer followed by the MP configuration table, for `nr_vcpus` vCPUs whose
/// APIC ids are 0..nr_vcpus.
pub fn build_mptable(nr_vcpus: u8) -> Result<Vec<u8>> {
    if nr_vcpus == 0 || nr_vcpus > MAX_VCPUS {
        return Err(ArchError::TooManyVcpus(nr_vcpus));
    }
    let ioapic_id = nr_vcpus + 1;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..nr_vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, BUS_ID_ISA]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    for irq in 0..=LAST_IRQ as u8 {
        entries.extend_from_slice(&[MP_INTSRC, MP_IRQ_INT, 0, 0, BUS_ID_ISA, irq, ioapic_id, irq]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_LINTSRC, MP_IRQ_EXTINT, 0, 0, BUS_ID_ISA, 0, 0, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_IRQ_NMI, 0, 0, BUS_ID_ISA, 0, 0xff, 1]);
    count += 2;

    let table_addr = EBDA_START as u32 + 16;
    let mut table: Vec<u8> = Vec::new();
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.extend_from_slice(&[MPC_SPEC, 0]); // checksum patched below
    table.extend_from_slice(b"HUSK    ");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(16 + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&table_addr.to_le_bytes());
    out.extend_from_slice(&[1, MPC_SPEC, 0, 0, 0, 0, 0, 0]);
    out[10] = checksum(&out[..16]);
    out.extend_from_slice(&table);
    Ok(out)
}

/// Write the MP tables for `nr_vcpus` vCPUs into guest memory.
pub fn write_mptable(mem: &GuestMemoryMmap, nr_vcpus: u8) -> Result<()> {
    let bytes = build_mptable(nr_vcpus)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(|source| ArchError::GuestWrite {
            what: "MP table",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::EBDA_END;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_are_well_formed() {
        for n in [1u8, 2, MAX_VCPUS] {
            let t = build_mptable(n).unwrap();
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            assert_eq!(
                u32::from_le_bytes(t[4..8].try_into().unwrap()),
                EBDA_START as u32 + 16
            );
            let table = &t[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "table checksum");
            let count = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(count, u16::from(n) + 1 + 1 + 24 + 2);
            // Processor entries: the first one boots.
            assert_eq!(table[44], MP_PROCESSOR);
            assert_eq!(table[47], CPU_ENABLED | CPU_BOOTPROCESSOR);
            if n > 1 {
                assert_eq!((table[64 + 1], table[64 + 3]), (1, CPU_ENABLED));
            }
            assert!((t.len() as u64) <= EBDA_END - EBDA_START);
        }
        assert!(build_mptable(0).is_err());
        assert!(build_mptable(MAX_VCPUS + 1).is_err());
    }
}
