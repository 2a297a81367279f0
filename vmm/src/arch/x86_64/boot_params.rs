//! The Linux zero page (`struct boot_params`), the e820 memory map, and the PVH start info.
//!
//! Both boot protocols describe the same memory map: RAM below the EBDA, the EBDA (MP table)
//! reserved, RAM from 1 MiB to the MMIO gap, and RAM above 4 GiB when the guest is that big.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    ram_ranges, CMDLINE_START, EBDA_END, EBDA_START, HIMEM_START, PVH_INFO_START, PVH_MEMMAP_START,
    ZERO_PAGE_START,
};
use super::{ArchError, Result};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;
/// Most e820 entries the zero page holds.
pub const E820_MAX_ENTRIES: usize = 128;

/// `boot_flag` magic of the setup header.
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header` magic of the setup header ("HdrS").
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader`: an undefined boot loader.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Kernel alignment (16 MiB) stated for an ELF kernel without a setup header.
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// `loadflags`: the kernel was loaded high (at 1 MiB).
const LOADED_HIGH: u8 = 0x01;
/// `hvm_start_info.magic`.
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

/// One entry of the guest's physical memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The memory map of a guest with `mem_size` bytes of RAM.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: EBDA_END - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for (start, size) in ram_ranges(mem_size) {
        let start = start.max(HIMEM_START);
        let end = if start == HIMEM_START {
            size
        } else {
            start + size
        };
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

/// `boot_params` with `ByteValued`, so it can be written into guest memory.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
pub struct BootParams(pub boot_params);

// SAFETY: boot_params is a packed C struct of integers and arrays of integers: every bit pattern
// is valid and it has no padding bytes.
unsafe impl ByteValued for BootParams {}

/// What the zero page tells the kernel.
#[derive(Clone, Copy, Debug, Default)]
pub struct ZeroPageInput {
    /// The setup header read from a bzImage, or `None` for an ELF kernel.
    pub setup_header: Option<setup_header>,
    /// Length of the command line at [`CMDLINE_START`], NUL included.
    pub cmdline_size: u32,
    /// Initramfs `(address, size)`.
    pub initramfs: Option<(u64, u32)>,
    /// Guest RAM in bytes.
    pub mem_size: u64,
}

/// Build the zero page.
pub fn build_zero_page(input: &ZeroPageInput) -> BootParams {
    let mut params = boot_params::default();
    let mut hdr = input.setup_header.unwrap_or_default();
    if input.setup_header.is_none() {
        hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        hdr.header = KERNEL_HDR_MAGIC;
        hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.loadflags |= LOADED_HIGH;
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    hdr.cmdline_size = input.cmdline_size;
    if let Some((addr, size)) = input.initramfs {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size;
    }
    params.hdr = hdr;
    let map = e820_map(input.mem_size);
    let mut table = [boot_e820_entry::default(); E820_MAX_ENTRIES];
    for (slot, e) in table.iter_mut().zip(map.iter()) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_table = table;
    params.e820_entries = map.len().min(E820_MAX_ENTRIES) as u8;
    BootParams(params)
}

/// Write the zero page at [`ZERO_PAGE_START`].
pub fn write_zero_page(mem: &GuestMemoryMmap, input: &ZeroPageInput) -> Result<()> {
    mem.write_obj(build_zero_page(input), GuestAddress(ZERO_PAGE_START))
        .map_err(|source| ArchError::GuestWrite {
            what: "zero page",
            source,
        })
}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct StartInfo(hvm_start_info);
// SAFETY: a repr(C) struct of integers whose fields leave no padding (56 bytes, checked by
// linux-loader); every bit pattern is valid.
unsafe impl ByteValued for StartInfo {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct MemmapEntry(hvm_memmap_table_entry);
// SAFETY: a repr(C) struct of integers (24 bytes, no padding); every bit pattern is valid.
unsafe impl ByteValued for MemmapEntry {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ModlistEntry(hvm_modlist_entry);
// SAFETY: a repr(C) struct of integers (32 bytes, no padding); every bit pattern is valid.
unsafe impl ByteValued for ModlistEntry {}

/// Where the PVH module list (the initramfs) is written, after the memory map.
pub const PVH_MODLIST_START: u64 = PVH_MEMMAP_START + 16 * 24;

/// Write the PVH `hvm_start_info`, its memory map and the initramfs module entry. The vCPU
/// starts at the PVH entry with `rbx` = [`PVH_INFO_START`].
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    initramfs: Option<(u64, u32)>,
) -> Result<()> {
    let werr = |source| ArchError::GuestWrite {
        what: "PVH start info",
        source,
    };
    let map = e820_map(mem_size);
    for (i, e) in map.iter().enumerate() {
        let entry = MemmapEntry(hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        });
        mem.write_obj(entry, GuestAddress(PVH_MEMMAP_START + 24 * i as u64))
            .map_err(werr)?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = initramfs {
        let m = ModlistEntry(hvm_modlist_entry {
            paddr: addr,
            size: u64::from(size),
            ..Default::default()
        });
        mem.write_obj(m, GuestAddress(PVH_MODLIST_START))
            .map_err(werr)?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    mem.write_obj(StartInfo(info), GuestAddress(PVH_INFO_START))
        .map_err(werr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START};

    #[test]
    fn e820_for_a_small_guest() {
        let m = e820_map(256 << 20);
        assert_eq!(
            m,
            vec![
                E820Entry {
                    addr: 0,
                    size: EBDA_START,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: EBDA_START,
                    size: EBDA_END - EBDA_START,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: HIMEM_START,
                    size: (256 << 20) - HIMEM_START,
                    kind: E820_RAM
                },
            ]
        );
    }

    #[test]
    fn e820_skips_the_mmio_gap() {
        let m = e820_map(4 << 30);
        assert_eq!(m.len(), 4);
        assert_eq!(m[2].addr + m[2].size, MMIO_GAP_START);
        assert_eq!(m[3].addr, MMIO_GAP_END);
        assert_eq!(m[3].size, (4 << 30) - MMIO_GAP_START);
        let ram: u64 = m
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(
            ram,
            (4 << 30) - (EBDA_END - EBDA_START) - (HIMEM_START - EBDA_END)
        );
    }

    #[test]
    fn zero_page_for_an_elf_kernel() {
        let p = build_zero_page(&ZeroPageInput {
            setup_header: None,
            cmdline_size: 12,
            initramfs: Some((0x0f00_0000, 0x1234)),
            mem_size: 256 << 20,
        })
        .0;
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 12);
        assert_eq!({ hdr.ramdisk_image }, 0x0f00_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x1234);
        assert_eq!({ hdr.kernel_alignment }, 0x0100_0000);
        assert_eq!(p.e820_entries, 3);
        let e = p.e820_table[2];
        assert_eq!(
            ({ e.addr }, { e.size }, { e.r#type }),
            (HIMEM_START, (256 << 20) - HIMEM_START, 1)
        );
        // The struct is exactly one page, as the kernel expects.
        assert_eq!(std::mem::size_of::<BootParams>(), 4096);
    }

    #[test]
    fn zero_page_keeps_a_bzimage_header() {
        let hdr = setup_header {
            boot_flag: 0xaa55,
            header: 0x5372_6448,
            version: 0x20f,
            setup_sects: 30,
            kernel_alignment: 0x20_0000,
            ..Default::default()
        };
        let p = build_zero_page(&ZeroPageInput {
            setup_header: Some(hdr),
            cmdline_size: 5,
            initramfs: None,
            mem_size: 128 << 20,
        })
        .0;
        let h = p.hdr;
        assert_eq!({ h.version }, 0x20f);
        assert_eq!({ h.setup_sects }, 30);
        assert_eq!({ h.kernel_alignment }, 0x20_0000);
        assert_eq!({ h.type_of_loader }, 0xff);
        assert_eq!({ h.ramdisk_size }, 0);
    }

    #[test]
    fn zero_page_and_pvh_info_land_in_guest_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let input = ZeroPageInput {
            cmdline_size: 3,
            mem_size: 1 << 20,
            ..Default::default()
        };
        write_zero_page(&mem, &input).unwrap();
        let magic: u32 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x202)).unwrap();
        assert_eq!(magic, 0x5372_6448);
        write_pvh_start_info(&mem, 1 << 20, Some((0x8_0000, 10))).unwrap();
        let magic: u32 = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(magic, XEN_HVM_START_MAGIC_VALUE);
        let entries: u32 = mem.read_obj(GuestAddress(PVH_INFO_START + 48)).unwrap();
        assert_eq!(entries, 2);
        let modaddr: u64 = mem.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!(modaddr, 0x8_0000);
    }
}
