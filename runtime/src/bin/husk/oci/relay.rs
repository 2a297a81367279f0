//! What a relay process (the monitor of a container's init, or of an exec)
//! needs besides the agent: the caller's stdio or a host pty handed to the
//! console socket, and signals forwarded to the guest process.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{Context, Result};
use husk_runtime::stdio::Stdio;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal};

/// Takes the sync fd a parent husk passed down, marking it close-on-exec
/// again so the VM's helper processes do not inherit it (the parent reads
/// it to EOF).
pub fn take_sync_fd(fd: i32) -> std::fs::File {
    // SAFETY: the parent husk passed this fd number open (close-on-exec
    // cleared) for this process alone; nothing else here owns it.
    let f = std::fs::File::from(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    let _ = nix::fcntl::fcntl(
        f.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    f
}

/// A host pty whose master went to the caller's console socket; the slave
/// stays here, in raw mode, so the only line discipline that acts is the
/// guest's.
#[derive(Debug)]
pub struct HostPty {
    slave: OwnedFd,
}

impl HostPty {
    /// Opens a pty, sends its master over `console_socket` with
    /// SCM_RIGHTS (as runc does), and keeps the slave.
    pub fn to_console_socket(console_socket: &Path) -> Result<HostPty> {
        let pty = nix::pty::openpty(None, None).context("opening a pty")?;
        let mut t = nix::sys::termios::tcgetattr(&pty.slave).context("reading pty modes")?;
        nix::sys::termios::cfmakeraw(&mut t);
        nix::sys::termios::tcsetattr(&pty.slave, nix::sys::termios::SetArg::TCSANOW, &t)
            .context("making the pty raw")?;
        let sock = UnixStream::connect(console_socket).with_context(|| {
            format!(
                "connecting to the console socket {}",
                console_socket.display()
            )
        })?;
        let name = nix::unistd::ttyname(&pty.slave)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "/dev/ptmx".into());
        let fds = [pty.master.as_raw_fd()];
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
        let iov = [std::io::IoSlice::new(name.as_bytes())];
        nix::sys::socket::sendmsg::<()>(
            sock.as_raw_fd(),
            &iov,
            &cmsg,
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .context("sending the pty master over the console socket")?;
        Ok(HostPty { slave: pty.slave })
    }

    /// Makes the pty this process's controlling terminal in a new session,
    /// so a resize of the master raises SIGWINCH here.
    pub fn become_controlling_terminal(&self) -> Result<()> {
        let me = nix::unistd::getpid();
        if nix::unistd::getsid(None).ok() != Some(me) {
            nix::unistd::setsid().context("setsid")?;
        }
        // SAFETY: TIOCSCTTY takes an int argument (0: do not steal) and
        // only reads it; the fd is a valid open pty slave.
        let rc = unsafe { libc::ioctl(self.slave.as_raw_fd(), libc::TIOCSCTTY, 0) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("TIOCSCTTY");
        }
        Ok(())
    }

    /// The stdio to give a terminal process.
    pub fn stdio(&self) -> Result<Stdio> {
        Ok(Stdio {
            stdin: Some(File::from(self.slave.try_clone()?)),
            stdout: Some(File::from(self.slave.try_clone()?)),
            stderr: None,
            terminal: true,
        })
    }

    /// Another fd of the slave.
    pub fn slave(&self) -> Result<OwnedFd> {
        Ok(self.slave.try_clone()?)
    }
}

/// The fd whose window size a terminal process follows: the host pty's
/// slave, or the caller's own terminal on fd 0 (foreground `run`/`exec -t`
/// without a console socket). None for processes without a terminal.
pub fn terminal_fd(pty: Option<&HostPty>, terminal: bool) -> Result<Option<OwnedFd>> {
    if let Some(p) = pty {
        return Ok(Some(p.slave()?));
    }
    if !terminal {
        return Ok(None);
    }
    let stdin = std::io::stdin();
    if !nix::unistd::isatty(stdin.as_raw_fd()).unwrap_or(false) {
        return Ok(None);
    }
    Ok(Some(stdin.as_fd().try_clone_to_owned()?))
}

/// Puts the caller's terminal on fd 0 in raw mode while it lives (the
/// guest's line discipline is the one that acts), restoring it on drop.
#[derive(Debug)]
pub struct RawTerminal {
    saved: nix::sys::termios::Termios,
}

impl RawTerminal {
    /// Raw mode on fd 0 if it is a terminal.
    pub fn on_stdin() -> Option<RawTerminal> {
        let stdin = std::io::stdin();
        let saved = nix::sys::termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        nix::sys::termios::cfmakeraw(&mut raw);
        nix::sys::termios::tcsetattr(stdin.as_fd(), nix::sys::termios::SetArg::TCSANOW, &raw)
            .ok()?;
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin().as_fd(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.saved,
        );
    }
}

/// The window size of a terminal fd, if it is one and has a size.
pub fn window_size(fd: BorrowedFd<'_>) -> Option<(u32, u32)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into the pointed-to local.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0 && ws.ws_col > 0)
        .then(|| (u32::from(ws.ws_row), u32::from(ws.ws_col)))
}

/// This process's own stdin/stdout/stderr for a process's stdio (dups, so
/// the originals can be pointed at /dev/null).
pub fn inherited_stdio(terminal: bool) -> Result<Stdio> {
    let dup = |fd: i32| -> Result<File> {
        // SAFETY: 0, 1 and 2 are open for the life of the process (a caller
        // that closed one gets an error from the dup, not undefined
        // behaviour); the borrow ends before this returns.
        let b = unsafe { BorrowedFd::borrow_raw(fd) };
        Ok(File::from(
            b.try_clone_to_owned()
                .with_context(|| format!("duplicating fd {fd}"))?,
        ))
    };
    Ok(Stdio {
        stdin: Some(dup(0)?),
        stdout: Some(dup(1)?),
        stderr: if terminal { None } else { Some(dup(2)?) },
        terminal,
    })
}

/// Points fds 0, 1 and 2 at /dev/null, so only the copies hold the
/// caller's stdio (and it sees EOF when they end).
pub fn detach_std_fds() -> Result<()> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for fd in 0..3 {
        // SAFETY: dup2 onto 0..=2 replaces this process's standard fds,
        // which nothing else in this process owns as an OwnedFd.
        if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
            return Err(std::io::Error::last_os_error()).context("dup2 /dev/null");
        }
    }
    Ok(())
}

/// Write end of the signal pipe, for the handler.
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe; `b` is a live local byte.
        unsafe { libc::write(fd, std::ptr::addr_of!(b).cast(), 1) };
    }
}

/// Signals a relay forwards to its guest process (SIGKILL and SIGSTOP
/// cannot be caught; SIGWINCH becomes a resize).
const FORWARDED: [Signal; 10] = [
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGTERM,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGALRM,
    Signal::SIGCONT,
    Signal::SIGWINCH,
    Signal::SIGTSTP,
];

/// Catches the forwarded signals and calls `forward` for each on a thread
/// of its own. Handlers go back to default in children on exec.
pub fn forward_signals(forward: impl Fn(Signal) + Send + 'static) -> Result<()> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("signal pipe")?;
    SIGNAL_PIPE.store(w.as_raw_fd(), Ordering::Relaxed);
    std::mem::forget(w);
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for s in FORWARDED {
        // SAFETY: the handler only loads an atomic and calls write(2).
        unsafe { nix::sys::signal::sigaction(s, &action) }
            .with_context(|| format!("installing a handler for {s}"))?;
    }
    std::thread::Builder::new()
        .name("husk-signals".into())
        .spawn(move || {
            let mut f = File::from(r);
            let mut b = [0u8; 1];
            while std::io::Read::read(&mut f, &mut b).is_ok_and(|n| n == 1) {
                if let Ok(s) = Signal::try_from(i32::from(b[0])) {
                    forward(s);
                }
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}
