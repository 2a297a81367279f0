//! Identity page tables for the boot (first 4 GiB in 2 MiB pages), and a page-table walker that
//! translates a guest virtual address the way the guest's MMU would (used to read the
//! instruction bytes at a failing RIP).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{PDE_START, PDPTE_START, PML4_START};
use super::{ArchError, Result};

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_PAGE_SIZE: u64 = 1 << 7;
/// Bits 12..51 of a table entry: the physical address.
const PTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Number of page directories (each maps 1 GiB).
const IDENTITY_MAPPED_GIB: u64 = 4;

/// Write PML4, PDPT and four page directories that identity-map `[0, 4 GiB)` with 2 MiB pages.
/// CR3 is [`PML4_START`].
pub fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<()> {
    let werr = |source| ArchError::GuestWrite {
        what: "page tables",
        source,
    };
    mem.write_obj(
        PDPTE_START | PTE_PRESENT | PTE_WRITABLE,
        GuestAddress(PML4_START),
    )
    .map_err(werr)?;
    for gib in 0..IDENTITY_MAPPED_GIB {
        let pd = PDE_START + gib * 0x1000;
        mem.write_obj(
            pd | PTE_PRESENT | PTE_WRITABLE,
            GuestAddress(PDPTE_START + gib * 8),
        )
        .map_err(werr)?;
        let mut table = [0u8; 4096];
        for (i, chunk) in table.chunks_exact_mut(8).enumerate() {
            let addr = (gib << 30) | ((i as u64) << 21);
            let entry = addr | PTE_PRESENT | PTE_WRITABLE | PTE_PAGE_SIZE;
            chunk.copy_from_slice(&entry.to_le_bytes());
        }
        mem.write_slice(&table, GuestAddress(pd)).map_err(werr)?;
    }
    Ok(())
}

/// How the guest's MMU translates addresses right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagingMode {
    /// Real mode or protected mode without paging: linear = physical.
    None,
    /// 32-bit paging (CR0.PG, no PAE).
    Bits32,
    /// PAE paging (CR4.PAE, not long mode).
    Pae,
    /// 4-level long-mode paging.
    Level4,
}

impl PagingMode {
    /// The mode from CR0, CR4 and EFER.
    pub fn from_regs(cr0: u64, cr4: u64, efer: u64) -> PagingMode {
        const CR0_PG: u64 = 1 << 31;
        const CR4_PAE: u64 = 1 << 5;
        const EFER_LMA: u64 = 1 << 10;
        if cr0 & CR0_PG == 0 {
            PagingMode::None
        } else if efer & EFER_LMA != 0 {
            PagingMode::Level4
        } else if cr4 & CR4_PAE != 0 {
            PagingMode::Pae
        } else {
            PagingMode::Bits32
        }
    }
}

/// Translate the linear address `gva` to a guest physical address by walking the guest's page
/// tables from `cr3`. `None` if a level is not present or unreadable. Every table entry comes
/// from guest memory, so nothing here trusts it beyond reading.
pub fn translate(mem: &GuestMemoryMmap, mode: PagingMode, cr3: u64, gva: u64) -> Option<u64> {
    match mode {
        PagingMode::None => Some(gva),
        PagingMode::Bits32 => {
            let gva = gva & 0xffff_ffff;
            let pde: u32 = mem
                .read_obj(GuestAddress(
                    (cr3 & 0xffff_f000) + ((gva >> 22) & 0x3ff) * 4,
                ))
                .ok()?;
            let pde = u64::from(pde);
            if pde & PTE_PRESENT == 0 {
                return None;
            }
            if pde & PTE_PAGE_SIZE != 0 {
                return Some((pde & 0xffc0_0000) | (gva & 0x3f_ffff));
            }
            let pte: u32 = mem
                .read_obj(GuestAddress(
                    (pde & 0xffff_f000) + ((gva >> 12) & 0x3ff) * 4,
                ))
                .ok()?;
            let pte = u64::from(pte);
            (pte & PTE_PRESENT != 0).then_some((pte & 0xffff_f000) | (gva & 0xfff))
        }
        PagingMode::Pae => {
            let gva = gva & 0xffff_ffff;
            let pdpte: u64 = mem
                .read_obj(GuestAddress((cr3 & 0xffff_ffe0) + ((gva >> 30) & 3) * 8))
                .ok()?;
            if pdpte & PTE_PRESENT == 0 {
                return None;
            }
            walk_from(mem, pdpte & PTE_ADDR_MASK, gva, &[21, 12])
        }
        PagingMode::Level4 => walk_from(mem, cr3 & PTE_ADDR_MASK, gva, &[39, 30, 21, 12]),
    }
}

/// Walk 64-bit-entry tables starting at `table`, one level per shift in `shifts`.
fn walk_from(mem: &GuestMemoryMmap, mut table: u64, gva: u64, shifts: &[u32]) -> Option<u64> {
    for (level, &shift) in shifts.iter().enumerate() {
        let index = (gva >> shift) & 0x1ff;
        let entry: u64 = mem.read_obj(GuestAddress(table + index * 8)).ok()?;
        if entry & PTE_PRESENT == 0 {
            return None;
        }
        let last = level + 1 == shifts.len();
        // Large pages: 1 GiB at shift 30, 2 MiB at shift 21.
        if last || ((shift == 30 || shift == 21) && entry & PTE_PAGE_SIZE != 0) {
            let page_mask = (1u64 << shift) - 1;
            return Some((entry & PTE_ADDR_MASK & !page_mask) | (gva & page_mask));
        }
        table = entry & PTE_ADDR_MASK;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    #[test]
    fn identity_tables_map_the_first_4_gib() {
        let m = mem();
        write_identity_page_tables(&m).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        for gib in 0..4u64 {
            let pdpte: u64 = m.read_obj(GuestAddress(PDPTE_START + gib * 8)).unwrap();
            assert_eq!(pdpte, (PDE_START + gib * 0x1000) | 3);
        }
        let pde1: u64 = m.read_obj(GuestAddress(PDE_START + 8)).unwrap();
        assert_eq!(pde1, 0x20_0000 | 0x83);
        for addr in [
            0u64,
            0x1234,
            0x10_0000,
            0x3fff_ffff,
            0xd000_0000,
            0xffff_fffc,
        ] {
            assert_eq!(
                translate(&m, PagingMode::Level4, PML4_START, addr),
                Some(addr)
            );
        }
        // Above 4 GiB nothing is mapped.
        assert_eq!(translate(&m, PagingMode::Level4, PML4_START, 1 << 32), None);
    }

    #[test]
    fn walker_follows_4k_and_1g_pages() {
        let m = mem();
        // PML4 at 0x1000 -> PDPT at 0x2000; PDPT[1] is a 1 GiB page at 0x8000_0000;
        // PDPT[0] -> PD at 0x3000; PD[0] -> PT at 0x4000; PT[5] -> 0x20_0000.
        m.write_obj(0x2000u64 | 3, GuestAddress(0x1000)).unwrap();
        m.write_obj(0x8000_0000u64 | 0x83, GuestAddress(0x2008))
            .unwrap();
        m.write_obj(0x3000u64 | 3, GuestAddress(0x2000)).unwrap();
        m.write_obj(0x4000u64 | 3, GuestAddress(0x3000)).unwrap();
        m.write_obj(0x20_0000u64 | 3, GuestAddress(0x4000 + 5 * 8))
            .unwrap();
        let t = |gva| translate(&m, PagingMode::Level4, 0x1000, gva);
        assert_eq!(t(0x5123), Some(0x20_0123));
        assert_eq!(t(0x6000), None);
        assert_eq!(t((1 << 30) + 0x42), Some(0x8000_0042));
        // A table pointer outside guest memory ends the walk, it does not panic.
        m.write_obj(0xdead_b000u64 | 3, GuestAddress(0x1008))
            .unwrap();
        assert_eq!(t(1 << 39), None);
    }

    #[test]
    fn paging_mode_from_control_registers() {
        assert_eq!(PagingMode::from_regs(0x11, 0, 0), PagingMode::None);
        assert_eq!(PagingMode::from_regs(0x8000_0011, 0, 0), PagingMode::Bits32);
        assert_eq!(PagingMode::from_regs(0x8000_0011, 0x20, 0), PagingMode::Pae);
        assert_eq!(
            PagingMode::from_regs(0x8000_0011, 0x20, 0x500),
            PagingMode::Level4
        );
    }

    #[test]
    fn walker_32bit_and_pae() {
        let m = mem();
        // 32-bit: PD at 0x1000, PD[1] = 4 MiB page at 0x40_0000 -> covers 0x40_0000..
        m.write_obj(0x40_0000u32 | 0x83, GuestAddress(0x1004))
            .unwrap();
        assert_eq!(
            translate(&m, PagingMode::Bits32, 0x1000, 0x40_0010),
            Some(0x40_0010)
        );
        assert_eq!(translate(&m, PagingMode::Bits32, 0x1000, 0x80_0000), None);
        // PAE: PDPT at 0x2000 -> PD at 0x3000, PD[0] = 2 MiB page at 0x20_0000.
        m.write_obj(0x3000u64 | 1, GuestAddress(0x2000)).unwrap();
        m.write_obj(0x20_0000u64 | 0x83, GuestAddress(0x3000))
            .unwrap();
        assert_eq!(
            translate(&m, PagingMode::Pae, 0x2000, 0x1234),
            Some(0x20_1234)
        );
    }
}
