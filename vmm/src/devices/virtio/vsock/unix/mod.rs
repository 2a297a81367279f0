//! The host side of the vsock device: hybrid vsock over Unix sockets.
//!
//! Firecracker's convention, which husk-runtime's agent client speaks:
//!
//! - Host → guest: a host process connects to the muxer's socket `<uds>` and writes
//!   `CONNECT <port>\n`. The muxer picks a host-side port (from 2^30 up, unique among live
//!   connections), sends the guest a REQUEST for `<port>`, and on the guest's RESPONSE writes
//!   `OK <host port>\n` to the client; from then on bytes are relayed. If the guest answers RST
//!   (nobody listens), or does not answer within the request timeout, the client's stream is
//!   closed, so it sees EOF and retries.
//! - Guest → host: a guest connection to CID 2 port P makes the muxer connect to `<uds>_P`
//!   without blocking; success is answered with RESPONSE, failure with RST.
//!
//! [`muxer::VsockMuxer`] owns the listener, the clients still sending their CONNECT line
//! ([`connect_line`]) and the connections ([`super::csm`]), all in one epoll set whose fd the
//! embedding event loop polls.

pub mod connect_line;
pub mod muxer;

use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

pub use muxer::VsockMuxer;

use super::{Result, VsockError};

/// A connection's identity: host-side port and guest-side port.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConnKey {
    /// Host-side port (the guest's destination port for guest-initiated connections).
    pub local_port: u32,
    /// Guest-side port.
    pub peer_port: u32,
}

/// Make `path` free for `bind`: a leftover socket file that nobody listens on is removed; a
/// socket with a live listener, or a file that is not a socket, is an error.
pub fn prepare_socket_path(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(VsockError::BindUds {
                path: path.to_owned(),
                source: e,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(VsockError::BindUds {
            path: path.to_owned(),
            source: std::io::Error::new(
                ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(VsockError::SocketInUse(path.to_owned())),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(|source| VsockError::BindUds {
                path: path.to_owned(),
                source,
            })
        }
        Err(source) => Err(VsockError::BindUds {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn stale_socket_is_removed_live_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sock");
        prepare_socket_path(&p).unwrap();

        let l = UnixListener::bind(&p).unwrap();
        assert!(matches!(
            prepare_socket_path(&p),
            Err(VsockError::SocketInUse(_))
        ));
        drop(l);
        // The file stays behind after the listener is gone: stale, so it is removed.
        assert!(p.exists());
        prepare_socket_path(&p).unwrap();
        assert!(!p.exists());

        let f = dir.path().join("plain");
        std::fs::write(&f, b"x").unwrap();
        assert!(matches!(
            prepare_socket_path(&f),
            Err(VsockError::BindUds { .. })
        ));
    }
}
