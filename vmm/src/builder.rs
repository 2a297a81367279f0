//! From a [`VmConfig`] to a [`Vmm`] ready to run: guest memory, the kernel (or raw image),
//! initramfs, command line and boot structures, the devices on their buses, and the vCPUs.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::api::ApiServer;
use crate::arch::x86_64::boot_params::{write_pvh_start_info, write_zero_page, ZeroPageInput};
use crate::arch::x86_64::layout::{
    low_ram_end, virtio_mmio_slot, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO_DEVICE_SIZE,
    PVH_INFO_START, SERIAL_IRQ, ZERO_PAGE_START,
};
use crate::arch::x86_64::mptable::write_mptable;
use crate::arch::x86_64::paging::write_identity_page_tables;
use crate::arch::x86_64::regs::{write_gdt, EntryPoint};
use crate::arch::x86_64::ArchError;
use crate::config::{BootProtocol, BootSource, ConfigError, RawMode, VmConfig};
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::i8042::{I8042, I8042_PORT, I8042_PORT_LEN};
use crate::devices::legacy::serial::{SerialDevice, COM1_PORT, COM_PORT_LEN};
use crate::devices::legacy::EventFdTrigger;
use crate::devices::virtio::fs::{Fs, FsError};
use crate::devices::virtio::mmio::{register_queue_notifiers, MmioTransport, QueueNotifier};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::virtio_mmio::{VsockMmioDevice, VsockShared};
use crate::devices::virtio::vsock::{VsockDevice, VsockError, VsockMuxer};
use crate::devices::virtio::{GuestMem, VirtioDevice, VirtioInterrupt};
use crate::vmm::Vmm;
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::Vm;
use crate::vstate::VstateError;

/// Why a VM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// KVM or guest memory set-up failed.
    #[error(transparent)]
    Vstate(#[from] VstateError),
    /// Boot structures could not be written.
    #[error(transparent)]
    Arch(#[from] ArchError),
    /// A file could not be read or created.
    #[error("cannot use {what} {path}: {source}")]
    File {
        /// What the file is for.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel image could not be loaded.
    #[error("cannot load kernel {path}: {source}")]
    Kernel {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The boot layout does not fit.
    #[error("{0}")]
    Layout(String),
    /// The command line is invalid.
    #[error("invalid kernel command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    /// A device could not be placed on a bus.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The vsock device could not be set up.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// The virtio-fs device could not reach or agree with its vhost-user backend.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// The control socket could not be bound.
    #[error("cannot listen on the API socket {path}: {source}")]
    Api {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Result of building.
pub type Result<T> = std::result::Result<T, BuildError>;

fn open(what: &'static str, path: &Path) -> Result<File> {
    File::open(path).map_err(|source| BuildError::File {
        what,
        path: path.to_owned(),
        source,
    })
}

/// The devices the builder made, for the [`Vmm`].
pub struct Devices {
    /// Port-I/O bus (serial, i8042).
    pub pio: Arc<Bus>,
    /// MMIO bus (virtio-mmio windows).
    pub mmio: Arc<Bus>,
    /// The i8042 reset event.
    pub reset_evt: EventFdTrigger,
    /// The vsock device state, for the event loop.
    pub vsock: Option<VsockShared>,
    /// `virtio_mmio.device=` words for the command line.
    pub cmdline_words: Vec<(u64, u32)>,
    /// Each virtio-mmio transport with its base address (for the API's `stats`).
    pub transports: Vec<(u64, Arc<Mutex<MmioTransport>>)>,
    /// The ioeventfds of the queues (QueueNotify without an exit), for the event loop.
    pub notifiers: Vec<QueueNotifier>,
}

fn irq_line(vm: &Vm, gsi: u32) -> Result<EventFdTrigger> {
    let t = EventFdTrigger::new().map_err(BuildError::EventFd)?;
    vm.register_irqfd(&t.0, gsi)?;
    Ok(t)
}

fn build_devices(config: &VmConfig, vm: &Vm) -> Result<Devices> {
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let out: Box<dyn std::io::Write + Send> = match &config.console_log {
        Some(p) => Box::new(File::create(p).map_err(|source| BuildError::File {
            what: "console log",
            path: p.clone(),
            source,
        })?),
        None => Box::new(std::io::sink()),
    };
    let serial = SerialDevice::new(irq_line(vm, SERIAL_IRQ)?, out);
    pio.insert(COM1_PORT, COM_PORT_LEN, Arc::new(Mutex::new(serial)))?;
    let reset_evt = EventFdTrigger::new().map_err(BuildError::EventFd)?;
    pio.insert(
        I8042_PORT,
        I8042_PORT_LEN,
        Arc::new(Mutex::new(I8042::new(reset_evt.clone()))),
    )?;

    let mut virtio: Vec<Box<dyn VirtioDevice>> = Vec::new();
    if config.rng {
        virtio.push(Box::new(Rng::new()));
    }
    let mut vsock = None;
    if let Some(v) = &config.vsock {
        let muxer = VsockMuxer::new(&v.uds)?;
        let dev = VsockMmioDevice::new(VsockDevice::new(v.guest_cid, muxer)?);
        vsock = Some(dev.shared());
        virtio.push(Box::new(dev));
    }
    if let Some(f) = &config.fs {
        virtio.push(Box::new(Fs::new(&f.socket, &f.tag)?));
    }
    let mut cmdline_words = Vec::new();
    let mut transports = Vec::new();
    let mut notifiers = Vec::new();
    for (i, dev) in virtio.into_iter().enumerate() {
        let (base, irq) = virtio_mmio_slot(i as u32)
            .ok_or_else(|| BuildError::Layout("too many virtio devices".into()))?;
        let interrupt = Arc::new(VirtioInterrupt::new(irq_line(vm, irq)?));
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            dev,
            vm.memory().clone(),
            interrupt,
        )));
        if config.ioeventfd {
            notifiers.extend(register_queue_notifiers(vm, base, &transport));
        }
        mmio.insert(base, MMIO_DEVICE_SIZE, transport.clone())?;
        cmdline_words.push((base, irq));
        transports.push((base, transport));
    }
    Ok(Devices {
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        reset_evt,
        vsock,
        cmdline_words,
        transports,
        notifiers,
    })
}

/// Load the initramfs at the top of low RAM, above the kernel. Returns `(address, size)`.
fn load_initramfs(
    mem: &GuestMem,
    path: &Path,
    kernel_end: u64,
    mem_size: u64,
) -> Result<(u64, u32)> {
    let mut f = open("initramfs", path)?;
    let size = f
        .metadata()
        .map_err(|source| BuildError::File {
            what: "initramfs",
            path: path.to_owned(),
            source,
        })?
        .len();
    let top = low_ram_end(mem_size);
    let addr = top.checked_sub(size).map(|a| a & !0xfff);
    let addr = match addr {
        Some(a) if a >= kernel_end && size <= u64::from(u32::MAX) => a,
        _ => {
            return Err(BuildError::Layout(format!(
                "the initramfs ({size} bytes) does not fit between the kernel end ({kernel_end:#x}) and the end of low RAM ({top:#x}); give the VM more memory"
            )))
        }
    };
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| BuildError::File {
            what: "initramfs",
            path: path.to_owned(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok((addr, size as u32))
}

struct LinuxBoot<'a> {
    kernel: &'a Path,
    initramfs: Option<&'a PathBuf>,
    cmdline: &'a str,
    protocol: BootProtocol,
    vcpus: u8,
}

fn load_linux(vm: &Vm, boot: LinuxBoot<'_>, mmio_words: &[(u64, u32)]) -> Result<EntryPoint> {
    let mem = vm.memory();
    let mut f = open("kernel", boot.kernel)?;
    let mut magic = [0u8; 4];
    let io = |source| BuildError::File {
        what: "kernel",
        path: boot.kernel.to_owned(),
        source,
    };
    f.read_exact(&mut magic).map_err(io)?;
    f.seek(SeekFrom::Start(0)).map_err(io)?;
    let kerr = |source| BuildError::Kernel {
        path: boot.kernel.to_owned(),
        source,
    };
    let is_elf = magic == *b"\x7fELF";
    let loaded = if is_elf {
        Elf::load(&**mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(kerr)?
    } else {
        BzImage::load(&**mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(kerr)?
    };
    let initramfs = match boot.initramfs {
        Some(p) => Some(load_initramfs(mem, p, loaded.kernel_end, vm.mem_size())?),
        None => None,
    };

    let mut cmdline = Cmdline::try_from(boot.cmdline, CMDLINE_MAX_SIZE)?;
    for (base, irq) in mmio_words {
        cmdline.add_virtio_mmio_device(MMIO_DEVICE_SIZE, GuestAddress(*base), *irq, None)?;
    }
    load_cmdline(&**mem, GuestAddress(CMDLINE_START), &cmdline).map_err(kerr)?;
    let cmdline_size = cmdline.as_cstring()?.as_bytes_with_nul().len() as u32;

    write_zero_page(
        mem,
        &ZeroPageInput {
            setup_header: loaded.setup_header,
            cmdline_size,
            initramfs,
            mem_size: vm.mem_size(),
        },
    )?;
    if vm.has_irqchip() {
        write_mptable(mem, boot.vcpus)?;
    }
    let pvh = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) if is_elf => Some(addr.0),
        _ => None,
    };
    let entry = match (boot.protocol, pvh) {
        (BootProtocol::Auto | BootProtocol::Pvh, Some(rip)) => {
            write_pvh_start_info(mem, vm.mem_size(), initramfs)?;
            EntryPoint::Pvh {
                rip,
                rbx: PVH_INFO_START,
            }
        }
        (BootProtocol::Pvh, None) => {
            return Err(BuildError::Layout(format!(
                "{} has no PVH entry note; use protocol linux64",
                boot.kernel.display()
            )))
        }
        _ => {
            let rip = if is_elf {
                loaded.kernel_load.0
            } else {
                loaded.kernel_load.0 + 0x200
            };
            EntryPoint::Long {
                rip,
                rsi: ZERO_PAGE_START,
            }
        }
    };
    Ok(entry)
}

fn load_raw(vm: &Vm, image: &Path, load_addr: u64, mode: RawMode) -> Result<EntryPoint> {
    let mem = vm.memory();
    let mut f = open("raw image", image)?;
    let mut code = Vec::new();
    f.read_to_end(&mut code)
        .map_err(|source| BuildError::File {
            what: "raw image",
            path: image.to_owned(),
            source,
        })?;
    mem.write_slice(&code, GuestAddress(load_addr))
        .map_err(|e| {
            BuildError::Layout(format!("raw image does not fit at {load_addr:#x}: {e}"))
        })?;
    Ok(match mode {
        RawMode::Real => EntryPoint::Real { rip: load_addr },
        RawMode::Long => EntryPoint::Long {
            rip: load_addr,
            rsi: 0,
        },
    })
}

/// Build the VM described by `config`. Nothing runs until [`Vmm::run`].
pub fn build(config: &VmConfig) -> Result<Vmm> {
    config.validate()?;
    let vm = Vm::new(config.mem_bytes(), config.irqchip)?;
    let devices = build_devices(config, &vm)?;
    let entry = match &config.boot {
        BootSource::Linux {
            kernel,
            initramfs,
            cmdline,
            protocol,
        } => load_linux(
            &vm,
            LinuxBoot {
                kernel,
                initramfs: initramfs.as_ref(),
                cmdline,
                protocol: *protocol,
                vcpus: config.vcpus,
            },
            &devices.cmdline_words,
        )?,
        BootSource::Raw {
            image,
            load_addr,
            mode,
        } => load_raw(&vm, image, *load_addr, *mode)?,
    };
    write_gdt(vm.memory(), entry)?;
    if let EntryPoint::Long { .. } = entry {
        write_identity_page_tables(vm.memory())?;
    }
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for id in 0..config.vcpus {
        let vcpu = Vcpu::new(&vm, id)?;
        vcpu.configure(&vm, config.vcpus, (id == 0).then_some(entry))?;
        vcpus.push(vcpu);
    }
    // Bound last: once the API socket exists, the VM is built and its vsock socket listens.
    let api = match &config.api_socket {
        Some(p) => Some(ApiServer::bind(p).map_err(|source| BuildError::Api {
            path: p.clone(),
            source,
        })?),
        None => None,
    };
    Vmm::new(vm, vcpus, devices, api, config.wait_for_start).map_err(BuildError::EventFd)
}
