//! The stdio listener: host connections on vsock port
//! [`husk_protocols::IO_VSOCK_PORT`] (or a Unix socket when the agent runs
//! on the host for tests). Each connection's first line names the process
//! and stream (`<container> <exec|-> <stream>\n`); the agent answers
//! `OK\n` and starts copying, or `ERR <reason>\n` and closes.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{
    accept, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};

use crate::container::Manager;

/// How long a host may take to send its header line.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Where to listen.
#[derive(Debug, Clone)]
pub enum IoAddr {
    /// Guest vsock port.
    Vsock(u32),
    /// Unix socket path (host-side tests).
    Unix(std::path::PathBuf),
}

/// Binds the listener and serves it on a thread.
pub fn spawn(addr: IoAddr, manager: Arc<Manager>) -> anyhow::Result<()> {
    let listener: OwnedFd = match &addr {
        IoAddr::Vsock(port) => {
            let fd = socket(
                AddressFamily::Vsock,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )?;
            bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &VsockAddr::new(libc::VMADDR_CID_ANY, *port),
            )?;
            listen(&fd, Backlog::new(128)?)?;
            fd
        }
        IoAddr::Unix(path) => {
            let _ = std::fs::remove_file(path);
            OwnedFd::from(std::os::unix::net::UnixListener::bind(path)?)
        }
    };
    std::thread::Builder::new()
        .name("io-listener".into())
        .spawn(move || loop {
            match accept(std::os::fd::AsRawFd::as_raw_fd(&listener)) {
                Ok(fd) => {
                    // SAFETY: accept(2) returned a new fd that nothing else owns.
                    let conn = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
                    let m = manager.clone();
                    let _ = std::thread::Builder::new()
                        .name("io-attach".into())
                        .spawn(move || attach(conn, &m));
                }
                Err(nix::Error::EINTR) | Err(nix::Error::ECONNABORTED) => {}
                Err(e) => {
                    tracing::error!("stdio listener failed: {e}");
                    return;
                }
            }
        })?;
    Ok(())
}

/// Reads one header line, at most `MAX_STDIO_HEADER` bytes, byte by byte so
/// that no stream data is consumed.
fn read_header(conn: &mut File) -> Result<String, String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match conn.read(&mut b) {
            Ok(0) => return Err("connection closed before the header".into()),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if line.len() + 1 >= husk_protocols::MAX_STDIO_HEADER => {
                return Err("header too long".into())
            }
            Ok(_) => line.push(b[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading header: {e}")),
        }
    }
    String::from_utf8(line).map_err(|_| "header is not UTF-8".into())
}

fn set_timeout(conn: &File, t: Option<Duration>) {
    let tv = t.map(|d| nix::sys::time::TimeVal::new(d.as_secs() as i64, 0));
    let tv = tv.unwrap_or_else(|| nix::sys::time::TimeVal::new(0, 0));
    let _ = nix::sys::socket::setsockopt(conn, nix::sys::socket::sockopt::ReceiveTimeout, &tv);
}

fn attach(mut conn: File, manager: &Manager) {
    set_timeout(&conn, Some(HEADER_TIMEOUT));
    let res = read_header(&mut conn).and_then(|line| {
        let (cid, eid, stream) = husk_protocols::parse_stdio_header(&line)
            .ok_or_else(|| format!("malformed stdio header {line:?}"))?;
        let p = manager.process(cid, eid).map_err(|e| e.to_string())?;
        let claimed = p.io.take(stream).map_err(|e| e.to_string())?;
        set_timeout(&conn, None);
        let ours = conn.try_clone().map_err(|e| e.to_string())?;
        // Answer before any copying starts so the host reads OK first.
        (&conn).write_all(b"OK\n").map_err(|e| e.to_string())?;
        claimed.start(ours).map_err(|e| e.to_string())
    });
    if let Err(e) = res {
        tracing::debug!("stdio attach refused: {e}");
        let _ = (&conn).write_all(format!("ERR {e}\n").as_bytes());
    }
}
