//! `husk-vmm`: husk's KVM micro-VMM.
//!
//! ```text
//! husk-vmm --kernel vmlinux --initramfs initramfs.cpio --cmdline "console=ttyS0 reboot=t" \
//!          --vcpus 1 --memory-mib 256 --console-log console.log \
//!          --vsock-uds vsock.sock --guest-cid 3 --api-socket api.sock \
//!          --fs-socket virtiofs.sock --fs-tag husk
//! husk-vmm --config vm.json
//! ```
//!
//! Exit status: 0 the guest powered off / rebooted / halted, or a stop was asked for (API
//! `shutdown`, SIGTERM); 1 VMM error; 2 bad arguments; 3 KVM_EXIT_INTERNAL_ERROR (the message
//! names the suberror and the instruction bytes at the guest RIP); 4 other fatal vCPU exits;
//! 5 a system call outside the seccomp allowlist (`--seccomp=off` turns the filter off).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use husk_vmm::config::{BootProtocol, BootSource, FsConfig, RawMode, VmConfig, VsockConfig};
use husk_vmm::seccomp::{Binary, Jail, SeccompLevel};
use husk_vmm::vmm::{EXIT_USAGE, EXIT_VMM_ERROR};

/// husk's KVM micro-VMM: boots a Linux kernel (or a raw image) with a serial console, an i8042
/// reset line, virtio-rng, virtio-vsock and virtio-fs (virtiofsd over vhost-user) over
/// virtio-mmio.
#[derive(Parser, Debug)]
#[command(name = "husk-vmm", version)]
struct Args {
    /// JSON config file (flags below are then not allowed, except --log-level).
    #[arg(long, conflicts_with_all = ["kernel", "raw_image"])]
    config: Option<PathBuf>,
    /// Kernel: ELF vmlinux (PVH note used if present) or bzImage.
    #[arg(long, conflicts_with = "raw_image")]
    kernel: Option<PathBuf>,
    /// initramfs (cpio, optionally gzip).
    #[arg(long, requires = "kernel")]
    initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0 reboot=t panic=-1")]
    cmdline: String,
    /// Kernel entry: auto (PVH if the ELF has the note), pvh, linux64.
    #[arg(long, default_value = "auto", value_parser = parse_protocol)]
    boot_protocol: BootProtocol,
    /// Raw machine code to run instead of a kernel (bring-up and tests).
    #[arg(long)]
    raw_image: Option<PathBuf>,
    /// Guest physical load and entry address of --raw-image.
    #[arg(long, value_parser = parse_u64, default_value = "0x10000")]
    raw_load_addr: u64,
    /// CPU mode at entry of --raw-image: long or real.
    #[arg(long, default_value = "long", value_parser = parse_mode)]
    raw_mode: RawMode,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory_mib: u32,
    /// File receiving the guest serial console.
    #[arg(long)]
    console_log: Option<PathBuf>,
    /// Hybrid-vsock Unix socket; adds a virtio-vsock device.
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    /// Guest CID of the vsock device.
    #[arg(long, default_value_t = 3)]
    guest_cid: u64,
    /// vhost-user socket of a virtio-fs backend (virtiofsd --socket-path); adds a virtio-fs
    /// device. It must be listening already.
    #[arg(long, requires = "fs_tag")]
    fs_socket: Option<PathBuf>,
    /// Tag of the virtio-fs device (what the guest mounts).
    #[arg(long, requires = "fs_socket")]
    fs_tag: Option<String>,
    /// Leave out the virtio-rng device.
    #[arg(long)]
    no_rng: bool,
    /// Control socket (line protocol: start, state, shutdown).
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Do not run the vCPUs until `start` arrives on the control socket.
    #[arg(long, requires = "api_socket")]
    wait_for_start: bool,
    /// No in-kernel irqchip/PIT: `hlt` then ends the VM (tiny test guests).
    #[arg(long)]
    no_irqchip: bool,
    /// No ioeventfds: every virtio queue notification is an MMIO exit to the VMM.
    #[arg(long)]
    no_ioeventfd: bool,
    /// Log filter (RUST_LOG syntax), logs go to stderr.
    #[arg(long, default_value = "warn")]
    log_level: String,
    /// System-call filter once the VM is built: default (husk-vmm's allowlist; anything else
    /// ends the process with status 5) or off.
    #[arg(long, default_value = "default")]
    seccomp: SeccompLevel,
    /// Test hook: make a forbidden system call right after the filter is installed.
    #[arg(long, hide = true)]
    debug_forbidden_syscall: bool,
}

fn parse_u64(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|e| e.to_string())
}

fn parse_mode(s: &str) -> Result<RawMode, String> {
    match s {
        "long" => Ok(RawMode::Long),
        "real" => Ok(RawMode::Real),
        _ => Err("use long or real".into()),
    }
}

fn parse_protocol(s: &str) -> Result<BootProtocol, String> {
    match s {
        "auto" => Ok(BootProtocol::Auto),
        "pvh" => Ok(BootProtocol::Pvh),
        "linux64" => Ok(BootProtocol::Linux64),
        _ => Err("use auto, pvh or linux64".into()),
    }
}

fn config_from(args: &Args) -> Result<VmConfig> {
    if let Some(path) = &args.config {
        return Ok(VmConfig::from_file(path)?);
    }
    let boot = match (&args.kernel, &args.raw_image) {
        (Some(kernel), None) => BootSource::Linux {
            kernel: kernel.clone(),
            initramfs: args.initramfs.clone(),
            cmdline: args.cmdline.clone(),
            protocol: args.boot_protocol,
        },
        (None, Some(image)) => BootSource::Raw {
            image: image.clone(),
            load_addr: args.raw_load_addr,
            mode: args.raw_mode,
        },
        _ => bail!("give --kernel, --raw-image or --config"),
    };
    Ok(VmConfig {
        boot,
        vcpus: args.vcpus,
        memory_mib: args.memory_mib,
        console_log: args.console_log.clone(),
        vsock: args.vsock_uds.clone().map(|uds| VsockConfig {
            uds,
            guest_cid: args.guest_cid,
        }),
        rng: !args.no_rng,
        fs: match (&args.fs_socket, &args.fs_tag) {
            (Some(socket), Some(tag)) => Some(FsConfig {
                socket: socket.clone(),
                tag: tag.clone(),
            }),
            _ => None,
        },
        api_socket: args.api_socket.clone(),
        wait_for_start: args.wait_for_start,
        irqchip: !args.no_irqchip,
        ioeventfd: !args.no_ioeventfd,
    })
}

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log_level))
        .with_writer(std::io::stderr)
        .init();
    let config = match config_from(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("husk-vmm: {e:#}");
            std::process::exit(EXIT_USAGE);
        }
    };
    let code = match run(&config, &args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("husk-vmm: {e:#}");
            EXIT_VMM_ERROR
        }
    };
    std::process::exit(code);
}

fn run(config: &VmConfig, args: &Args) -> Result<i32> {
    // A SIGTERM while the VM is being built waits for the event loop, which tears down cleanly.
    husk_vmm::vmm::block_stop_signals().context("cannot block stop signals")?;
    let jail = match args.seccomp {
        SeccompLevel::Default => {
            Some(Jail::new(Binary::Vmm)?.with_probe(args.debug_forbidden_syscall))
        }
        SeccompLevel::Off => {
            if args.debug_forbidden_syscall {
                husk_vmm::seccomp::forbidden_syscall();
            }
            None
        }
    };
    let mut vmm = husk_vmm::builder::build(config).context("cannot build the VM")?;
    if let Some(jail) = jail {
        vmm.set_seccomp(jail);
    }
    let end = vmm.run();
    // Tear down (vCPU threads joined, devices closed, socket files removed) before exiting.
    drop(vmm);
    let code = end.exit_code();
    if code == 0 {
        eprintln!("husk-vmm: {}", end.message());
    } else {
        eprintln!("husk-vmm: error: {}", end.message());
    }
    Ok(code)
}
