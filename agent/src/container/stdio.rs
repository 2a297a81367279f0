//! A process's stdio inside the guest and how host streams attach to it.
//!
//! Without a terminal each stream is a pipe: the container gets one end, the
//! agent keeps the other until the host attaches a vsock connection for that
//! stream, then copies until EOF. Nothing is lost while no host is attached:
//! the pipe holds the bytes and the writer blocks. With a terminal the
//! container creates the pty itself (libcontainer) and sends its master to
//! the agent over a console socket; the host's `tty` stream is copied both
//! ways.

use std::fs::File;
use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, shutdown, ControlMessageOwned, MsgFlags, Shutdown};

/// The agent's ends of a process's stdio, each taken once by an attach.
#[derive(Debug, Default)]
pub struct ProcessIo {
    stdin: Mutex<Option<File>>,
    stdout: Mutex<Option<File>>,
    stderr: Mutex<Option<File>>,
    tty: Mutex<Option<File>>,
    tty_claimed: std::sync::atomic::AtomicBool,
}

/// The container's ends of its stdio pipes.
#[derive(Debug)]
pub struct ChildStdio {
    /// stdin (a pipe's read end, or /dev/null).
    pub stdin: OwnedFd,
    /// stdout (a pipe's write end).
    pub stdout: OwnedFd,
    /// stderr (a pipe's write end).
    pub stderr: OwnedFd,
}

fn pipe() -> io::Result<(File, File)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    Ok((File::from(r), File::from(w)))
}

impl ProcessIo {
    /// Pipes for a process without a terminal. `stdin`: whether the host
    /// will send stdin (else the process reads /dev/null).
    pub fn pipes(stdin: bool) -> io::Result<(ProcessIo, ChildStdio)> {
        let io = ProcessIo::default();
        let child_stdin = if stdin {
            let (r, w) = pipe()?;
            *io.stdin.lock().unwrap_or_else(|p| p.into_inner()) = Some(w);
            OwnedFd::from(r)
        } else {
            OwnedFd::from(File::open("/dev/null")?)
        };
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        *io.stdout.lock().unwrap_or_else(|p| p.into_inner()) = Some(out_r);
        *io.stderr.lock().unwrap_or_else(|p| p.into_inner()) = Some(err_r);
        Ok((
            io,
            ChildStdio {
                stdin: child_stdin,
                stdout: OwnedFd::from(out_w),
                stderr: OwnedFd::from(err_w),
            },
        ))
    }

    /// A terminal process's io, around the pty master.
    pub fn terminal(master: File) -> ProcessIo {
        let io = ProcessIo::default();
        *io.tty.lock().unwrap_or_else(|p| p.into_inner()) = Some(master);
        io
    }

    /// The pty master's raw fd, for resizing, if this is a terminal.
    pub fn with_tty<R>(&self, f: impl FnOnce(Option<&File>) -> R) -> R {
        let g = self.tty.lock().unwrap_or_else(|p| p.into_inner());
        f(g.as_ref())
    }

    /// Closes stdin if no host stream owns it yet.
    pub fn close_stdin(&self) {
        self.stdin.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Attaches a host connection as `stream` and starts copying. Each
    /// stream can be attached once.
    #[cfg(test)]
    pub fn attach(&self, stream: &str, conn: File) -> io::Result<()> {
        self.take(stream)?.start(conn)
    }

    /// Claims `stream` for a host connection; copying starts with
    /// [`Claimed::start`]. Fails if the stream is gone or was never there.
    pub fn take(&self, stream: &str) -> io::Result<Claimed> {
        let slot = match stream {
            "stdin" => &self.stdin,
            "stdout" => &self.stdout,
            "stderr" => &self.stderr,
            "tty" => &self.tty,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "unknown stream",
                ))
            }
        };
        let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
        let taken = match stream {
            // The master stays for resizes; copying works on a dup.
            "tty" => guard.as_ref().map(File::try_clone).transpose()?,
            _ => guard.take(),
        };
        let Some(end) = taken else {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{stream} is not available (already attached, closed, or not requested)"),
            ));
        };
        if stream == "tty" {
            // The master stays in its slot, so a flag marks the claim.
            if self
                .tty_claimed
                .swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "tty is already attached",
                ));
            }
        }
        Ok(match stream {
            "stdin" => Claimed::Input(end),
            "tty" => Claimed::Tty(end),
            _ => Claimed::Output(end),
        })
    }
}

/// A stdio end claimed for one host connection.
#[derive(Debug)]
pub enum Claimed {
    /// Host bytes go into this (stdin pipe).
    Input(File),
    /// This goes to the host (stdout/stderr pipe).
    Output(File),
    /// A pty master: both ways.
    Tty(File),
}

impl Claimed {
    /// Starts copying between this end and the host connection.
    pub fn start(self, conn: File) -> io::Result<()> {
        match self {
            Claimed::Input(end) => spawn_copy(conn, end, false),
            Claimed::Output(end) => spawn_copy(end, conn, true),
            Claimed::Tty(master) => {
                let master_in = master.try_clone()?;
                let conn_in = conn.try_clone()?;
                spawn_copy(master, conn, true)?;
                spawn_copy(conn_in, master_in, false)
            }
        }
    }
}

/// Copies `from` to `to` on a thread until EOF (or EIO from a pty master
/// whose slave is gone). With `shutdown_to`, `to` is a socket whose write
/// side is shut afterwards so the host sees EOF.
fn spawn_copy(mut from: File, mut to: File, shutdown_to: bool) -> io::Result<()> {
    std::thread::Builder::new()
        .name("stdio".into())
        .spawn(move || {
            // Output (pipe or pty to socket) may splice; input (socket to
            // pipe) must not: see `husk_protocols::copy_plain`.
            let res = if shutdown_to {
                io::copy(&mut from, &mut to)
            } else {
                husk_protocols::copy_plain(&mut from, &mut to)
            };
            match res {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EIO) => {}
                Err(e) => tracing::debug!("stdio copy ended: {e}"),
            }
            if shutdown_to {
                let _ = shutdown(to.as_raw_fd(), Shutdown::Write);
            }
        })
        .map(drop)
}

/// Sets a terminal's window size (TIOCSWINSZ on the pty master).
pub fn resize(master: &File, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which points
    // to a live local; the fd is owned by `master` for the whole call.
    let r = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Waits for libcontainer to send the pty master over `listener`
/// (SCM_RIGHTS), as runc's `--console-socket` protocol does.
pub fn receive_pty_master(listener: &UnixListener, timeout: Duration) -> io::Result<File> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no pty from the container",
                    ));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e),
        }
    };
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut buf = [0u8; 256];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds: Vec<RawFd> = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(r) = c {
            fds.extend(r);
        }
    }
    let mut it = fds.into_iter();
    let master = it.next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "console socket message had no fd",
        )
    })?;
    for extra in it {
        // SAFETY: `extra` was just received via SCM_RIGHTS and is owned by
        // nobody else; wrapping it closes it.
        drop(unsafe { OwnedFd::from_raw_fd(extra) });
    }
    // SAFETY: as above, `master` is a fresh fd owned only by us.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(master) }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    fn file(s: UnixStream) -> File {
        File::from(OwnedFd::from(s))
    }

    #[test]
    fn stdout_reaches_the_host_and_ends_with_eof() {
        let (io, child) = ProcessIo::pipes(false).unwrap();
        let (host, agent) = UnixStream::pair().unwrap();
        io.attach("stdout", file(agent)).unwrap();
        let mut w = File::from(child.stdout);
        w.write_all(b"hello\n").unwrap();
        drop(w);
        drop(child.stderr);
        let mut got = String::new();
        (&host).read_to_string(&mut got).unwrap();
        assert_eq!(got, "hello\n");
        // A stream attaches once.
        let (_h, a) = UnixStream::pair().unwrap();
        assert!(io.attach("stdout", file(a)).is_err());
    }

    #[test]
    fn host_stdin_eof_reaches_the_process() {
        let (io, child) = ProcessIo::pipes(true).unwrap();
        let (host, agent) = UnixStream::pair().unwrap();
        io.attach("stdin", file(agent)).unwrap();
        (&host).write_all(b"data").unwrap();
        host.shutdown(std::net::Shutdown::Write).unwrap();
        let mut r = File::from(child.stdin);
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"data");
    }

    #[test]
    fn unrequested_stdin_is_dev_null_and_unknown_streams_fail() {
        let (io, child) = ProcessIo::pipes(false).unwrap();
        let mut r = File::from(child.stdin);
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert!(got.is_empty());
        let (_h, a) = UnixStream::pair().unwrap();
        assert!(io.attach("stdin", file(a)).is_err());
        let (_h, a) = UnixStream::pair().unwrap();
        assert!(io.attach("bogus", file(a)).is_err());
    }
}
