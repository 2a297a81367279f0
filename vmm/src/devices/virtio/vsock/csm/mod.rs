//! The per-connection state machine (CSM).
//!
//! One [`VsockConnection`] pairs a guest vsock flow (host port, guest port) with one host Unix
//! stream. It knows nothing about queues or epoll sets: the muxer feeds it guest packets
//! ([`VsockConnection::send_pkt`]), readiness of its stream ([`VsockConnection::notify`]) and
//! expired deadlines, and asks it for packets for the guest ([`VsockConnection::recv_pkt`]).
//!
//! Life of a connection:
//!
//! ```text
//!  host CONNECT ──> LocalInit ──(guest RESPONSE)──┐
//!                   │ (guest RST / timeout)         v
//!                   └──> Closed          Established ──(RST either way / errors)──> Killed ──> Closed
//!  guest REQUEST ──> PeerInit ──(our RESPONSE sent)──┘
//! ```
//!
//! Flow control follows the virtio-vsock credit scheme. Host → guest: we never put more bytes in
//! flight than the guest's `buf_alloc - (rx_cnt - fwd_cnt)`; when that is zero the host stream
//! is not read (its data waits in the kernel) and we ask once with CREDIT_REQUEST. Guest → host:
//! we advertise `buf_alloc` = [`CONN_TX_BUF_SIZE`](super::defs::CONN_TX_BUF_SIZE) and buffer what
//! the host stream cannot take yet, so nothing is dropped; `fwd_cnt` counts bytes written to the
//! host stream and a CREDIT_UPDATE goes out when it has moved far enough. A guest that sends past
//! its credit is reset.
//!
//! Closing: host EOF sends SHUTDOWN(SEND) when the host only half-closed, SHUTDOWN(RCV|SEND)
//! when it hung up; the guest answers the latter with RST (or we reset after
//! [`CONN_SHUTDOWN_TIMEOUT`]). Guest SHUTDOWN(SEND) shuts the
//! host stream's write side once buffered bytes are out; SHUTDOWN with both flags is acknowledged
//! with RST after that flush.

mod connection;
mod txbuf;

use std::time::Duration;

use super::defs::{CONN_REQUEST_TIMEOUT, CONN_SHUTDOWN_TIMEOUT};

pub use connection::VsockConnection;
pub use txbuf::TxBuf;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: REQUEST queued or sent, waiting for the guest's RESPONSE.
    LocalInit,
    /// Guest-initiated: the host stream is connected, our RESPONSE is queued.
    PeerInit,
    /// Data flows.
    Established,
    /// An RST for the guest is queued; the host stream is shut down.
    Killed,
    /// Nothing left to do: the muxer drops the connection.
    Closed,
}

/// Packets a connection has queued for the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PendingRx {
    pub request: bool,
    pub response: bool,
    pub rst: bool,
    /// The host stream may have data (or EOF) to read.
    pub rw: bool,
    pub credit_update: bool,
    /// SHUTDOWN with these flags (0: none queued).
    pub shutdown: u32,
}

/// Deadlines of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnTimeouts {
    /// How long a host-initiated connection waits for the guest's RESPONSE.
    pub request: Duration,
    /// How long a closing connection waits for the other side before it is reset.
    pub shutdown: Duration,
}

impl Default for ConnTimeouts {
    fn default() -> Self {
        ConnTimeouts {
            request: CONN_REQUEST_TIMEOUT,
            shutdown: CONN_SHUTDOWN_TIMEOUT,
        }
    }
}
