//! `husk-vsock`: the husk vsock device as a vhost-user backend for QEMU.
//!
//! ```text
//! husk-vsock --socket /run/vm/vhost-vsock.sock --uds /run/vm/vsock.sock [--guest-cid 3]
//! qemu ... -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
//!     -chardev socket,id=vs,path=/run/vm/vhost-vsock.sock \
//!     -device vhost-user-vsock-device,chardev=vs
//! ```
//!
//! Binds the hybrid vsock socket (`--uds`) and the vhost-user socket (`--socket`) before it
//! accepts, so a caller can wait for both files. Serves exactly one frontend and exits 0 when it
//! disconnects, removing both socket files. SIGTERM, SIGINT and SIGHUP also remove them and
//! exit 0. Bad arguments exit 2, setup failures exit 1. Once both sockets are bound, a seccomp
//! filter allows only the system calls the session needs; any other ends the process with
//! status 5 (`--seccomp=off` turns it off).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use husk_vmm::devices::virtio::vsock::defs::{MAX_GUEST_CID, MIN_GUEST_CID};
use husk_vmm::devices::virtio::vsock::vhost_user::{
    SocketFile, VhostUserVsockServer, VsockServerConfig,
};
use husk_vmm::seccomp::{Binary, Jail, SeccompLevel};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use tracing::{error, info};

/// husk vsock device served over vhost-user (hybrid vsock on the host side).
#[derive(Debug, Parser)]
#[command(name = "husk-vsock", version)]
struct Args {
    /// vhost-user socket to listen on; QEMU connects to it as a client.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Hybrid vsock socket for host clients (`CONNECT <port>\n`); guest connections to host
    /// port P go to `<PATH>_P`.
    #[arg(long, value_name = "PATH")]
    uds: PathBuf,
    /// The guest's CID.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(MIN_GUEST_CID..=MAX_GUEST_CID))]
    guest_cid: u64,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive list).
    #[arg(long, default_value = "info", value_name = "FILTER")]
    log_level: String,
    /// System-call filter once the sockets are bound: default (husk-vsock's allowlist;
    /// anything else ends the process with status 5) or off.
    #[arg(long, default_value = "default")]
    seccomp: SeccompLevel,
    /// Test hook: make a forbidden system call right after the filter is installed.
    #[arg(long, hide = true)]
    debug_forbidden_syscall: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.socket == args.uds {
        eprintln!("husk-vsock: --socket and --uds must be different paths");
        return ExitCode::from(2);
    }
    let filter = match tracing_subscriber::EnvFilter::try_new(&args.log_level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("husk-vsock: bad --log-level {:?}: {e}", args.log_level);
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .init();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("husk-vsock: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    // Block the exit signals before any thread starts, so only the waiter below receives them.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(s);
    }
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&signals), None)
        .context("cannot block termination signals")?;

    let config = VsockServerConfig {
        socket: args.socket.clone(),
        uds: args.uds.clone(),
        guest_cid: args.guest_cid,
    };
    let server = VhostUserVsockServer::bind(&config).context("cannot start the vsock backend")?;
    info!(
        socket = %args.socket.display(),
        uds = %args.uds.display(),
        guest_cid = args.guest_cid,
        "husk-vsock listening"
    );

    let files = server.socket_files();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || wait_for_signal(signals, files))
        .context("cannot start the signal thread")?;

    match args.seccomp {
        SeccompLevel::Default => Jail::new(Binary::Vsock)
            .and_then(|j| j.with_probe(args.debug_forbidden_syscall).install())
            .context("cannot filter system calls")?,
        SeccompLevel::Off if args.debug_forbidden_syscall => husk_vmm::seccomp::forbidden_syscall(),
        SeccompLevel::Off => {}
    }

    server.run().context("vhost-user session failed")?;
    info!("frontend disconnected; exiting");
    Ok(())
}

fn wait_for_signal(signals: SigSet, files: Vec<SocketFile>) {
    match signals.wait() {
        Ok(sig) => info!("received {sig}; removing sockets and exiting"),
        Err(e) => {
            error!("waiting for signals failed: {e}");
            return;
        }
    }
    for f in &files {
        f.remove_if_ours();
    }
    std::process::exit(0);
}
