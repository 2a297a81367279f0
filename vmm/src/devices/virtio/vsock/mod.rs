//! The husk virtio-vsock device, written once and served two ways.
//!
//! A guest talks to the host over vsock through three virtqueues: RX (index 0, device → driver),
//! TX (index 1, driver → device) and EVENT (index 2, transport resets). Every packet is a 44-byte
//! `virtio_vsock_hdr` followed, for `OP_RW`, by payload bytes. This module turns those packets into
//! byte streams on host Unix sockets and back.
//!
//! The code is split by who it faces, so that the same device runs behind QEMU today (as a
//! vhost-user backend, `husk-vsock`) and inside husk's own KVM VMM later (over virtio-mmio):
//!
//! - [`device`]: the guest-facing side. [`device::VsockDevice`] drains the TX queue, parses each
//!   descriptor chain with the `virtio-vsock` crate's `VsockPacket`, validates every header field
//!   against what a well-behaved driver may send ([`packet`]), and hands good packets to a
//!   [`VsockBackend`]. It fills the RX queue from the backend. It is generic over
//!   `vm_memory::GuestMemory` and `virtio_queue::QueueT` and knows nothing of vhost-user or KVM.
//! - [`csm`]: the per-connection state machine: the REQUEST/RESPONSE handshake, RW data,
//!   credit-based flow control (`buf_alloc`/`fwd_cnt` both ways), SHUTDOWN and RST.
//! - [`unix`]: [`unix::VsockMuxer`], the host side. It implements [`VsockBackend`] over Unix
//!   sockets with the Firecracker "hybrid vsock" convention: host processes connect to one socket
//!   and write `CONNECT <port>\n`; guest connections to CID 2 port P land on `<uds>_P`.
//! - [`vhost_user`]: the glue that serves [`device::VsockDevice`] to a vhost-user frontend
//!   (QEMU's `vhost-user-vsock-device`) with the `vhost-user-backend` crate.
//! - [`virtio_mmio`]: the glue that serves it in-process behind husk-vmm's virtio-mmio
//!   transport, with the muxer's fd on the VMM's event loop.
//!
//! What wakes it: the backend owns one epoll fd (the listener, every host stream, a timer).
//! The embedding event loop polls that fd and calls [`VsockEpollListener::notify`], then lets the
//! device fill the RX queue. Guest kicks on TX/RX call the device directly. Nothing busy-waits
//! and nothing sleeps: timeouts (handshake, request, shutdown) run off a timerfd.
//!
//! The guest is not trusted. A malformed or out-of-protocol packet ends that one connection
//! (the guest gets an RST) or is dropped; it never panics or stops the device.

pub mod csm;
pub mod device;
pub mod packet;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
pub mod unix;
pub mod vhost_user;
pub mod virtio_mmio;

use std::os::unix::io::RawFd;
use std::path::PathBuf;

use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::BitmapSlice;
use vmm_sys_util::epoll::EventSet;

pub use device::VsockDevice;
pub use unix::VsockMuxer;

/// Constants of the vsock device: virtio ids and queue layout, the wire protocol's ops, types and
/// flags, and husk's own limits and timeouts.
pub mod defs {
    use std::time::Duration;

    /// virtio device id of vsock (virtio spec 5.10).
    pub const VIRTIO_ID_VSOCK: u32 = 19;
    /// The host's CID. Guest packets must be addressed to it; packets to the guest come from it.
    pub const HOST_CID: u64 = 2;
    /// Smallest CID a guest may have (0, 1 and 2 are reserved).
    pub const MIN_GUEST_CID: u64 = 3;
    /// CIDs are 32 bits on the Linux side (`u32::MAX` is `VMADDR_CID_ANY`).
    pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

    /// Index of the RX queue (device writes packets for the guest).
    pub const RXQ_INDEX: usize = 0;
    /// Index of the TX queue (guest's packets for the device).
    pub const TXQ_INDEX: usize = 1;
    /// Index of the EVENT queue (transport-reset events; unused by husk so far).
    pub const EVQ_INDEX: usize = 2;
    /// Number of virtqueues of the virtio device (RX, TX, EVENT).
    pub const NUM_QUEUES: usize = 3;
    /// Largest queue size the in-process device offers (`QueueNumMax`).
    pub const QUEUE_SIZE: u16 = 256;
    /// Largest queue size accepted from a vhost-user frontend: any valid split ring. The
    /// frontend chooses (QEMU 7.2's vhost-user-vsock asks for 1024).
    pub const VHOST_USER_MAX_QUEUE_SIZE: u16 = 32768;

    /// Size in bytes of the virtio-vsock config space: `le64 guest_cid`.
    pub const CONFIG_SPACE_SIZE: usize = 8;

    /// Largest payload in one packet, both ways (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
    pub const MAX_PKT_BUF_SIZE: u32 = 64 * 1024;

    /// Wire constants from `include/uapi/linux/virtio_vsock.h`.
    pub mod uapi {
        /// Socket type: stream (the only type husk supports).
        pub const VSOCK_TYPE_STREAM: u16 = 1;
        /// Connection request.
        pub const VSOCK_OP_REQUEST: u16 = 1;
        /// Connection accepted.
        pub const VSOCK_OP_RESPONSE: u16 = 2;
        /// Connection reset / refused.
        pub const VSOCK_OP_RST: u16 = 3;
        /// One or both directions closed (see the `SHUTDOWN_F_*` flags).
        pub const VSOCK_OP_SHUTDOWN: u16 = 4;
        /// Data.
        pub const VSOCK_OP_RW: u16 = 5;
        /// Unsolicited credit (buf_alloc/fwd_cnt) update.
        pub const VSOCK_OP_CREDIT_UPDATE: u16 = 6;
        /// Ask the peer for a credit update.
        pub const VSOCK_OP_CREDIT_REQUEST: u16 = 7;
        /// SHUTDOWN flag: the sender will receive no more data.
        pub const VSOCK_FLAGS_SHUTDOWN_RCV: u32 = 1;
        /// SHUTDOWN flag: the sender will send no more data.
        pub const VSOCK_FLAGS_SHUTDOWN_SEND: u32 = 2;
        /// Both SHUTDOWN flags.
        pub const VSOCK_FLAGS_SHUTDOWN_BOTH: u32 = 3;
    }

    /// Receive buffer we advertise per connection (`buf_alloc`): the most guest → host bytes we
    /// hold for a host socket that is not reading.
    pub const CONN_TX_BUF_SIZE: u32 = 256 * 1024;
    /// Send a CREDIT_UPDATE once this many bytes were forwarded since the guest last heard our
    /// `fwd_cnt`.
    pub const CONN_CREDIT_UPDATE_THRESHOLD: u32 = 64 * 1024;
    /// How long a host-initiated connection waits for the guest's RESPONSE.
    pub const CONN_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
    /// How long a closing connection waits for the other side (guest RST, host draining) before
    /// it is reset.
    pub const CONN_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
    /// How long a host client has to send its `CONNECT <port>\n` line.
    pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
    /// Longest accepted `CONNECT <port>\n` line, newline included.
    pub const CONNECT_LINE_MAX: usize = 32;
    /// Most live connections; guest or host attempts beyond it are refused.
    pub const MAX_CONNECTIONS: usize = 1024;
    /// Most host clients that have connected but not yet sent their CONNECT line.
    pub const MAX_PENDING_HANDSHAKES: usize = 64;
    /// Most queued RSTs for packets that belong to no connection; beyond it new ones are dropped.
    pub const MAX_PENDING_RST: usize = 256;
    /// First host-side port handed to host-initiated connections (as in Firecracker).
    pub const HOST_PORT_BASE: u32 = 1 << 30;
}

/// The virtio feature bits the vsock device offers (the vhost-user glue adds
/// `VHOST_USER_F_PROTOCOL_FEATURES`).
///
/// `VIRTIO_F_VERSION_1` (modern device), `VIRTIO_RING_F_INDIRECT_DESC` (indirect descriptor tables
/// are read by `virtio-queue`) and `VIRTIO_RING_F_EVENT_IDX` (the queue loops in [`device`]
/// re-check the ring after re-enabling notifications and use `needs_notification`).
pub fn device_features() -> u64 {
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
    (1u64 << VIRTIO_F_VERSION_1)
        | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
        | (1u64 << VIRTIO_RING_F_EVENT_IDX)
}

/// Errors of the vsock device and its host backend.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The backend has no packet for the guest right now. Callers that poll treat it as "done".
    #[error("no packet is pending for the guest")]
    NoData,
    /// The guest CID is reserved or out of range.
    #[error(
        "guest CID {0} is not usable: pick a CID from {min} to {max} (0-2 are reserved)",
        min = defs::MIN_GUEST_CID,
        max = defs::MAX_GUEST_CID
    )]
    InvalidGuestCid(u64),
    /// A virtqueue could not be read or written in guest memory.
    #[error("virtqueue access failed: {0}; the driver set up a queue outside guest memory or the memory table is stale")]
    Queue(#[from] virtio_queue::Error),
    /// The epoll set of the muxer could not be created or changed.
    #[error("vsock muxer epoll operation failed: {0}; check the open-file limit (ulimit -n)")]
    Epoll(#[source] std::io::Error),
    /// The timer of the muxer could not be created or armed.
    #[error("vsock muxer timer failed: {0}")]
    Timer(#[source] vmm_sys_util::errno::Error),
    /// The hybrid vsock listener could not be bound.
    #[error("cannot listen on hybrid vsock socket {path}: {source}; remove the stale file or choose another --uds path")]
    BindUds {
        /// The socket path.
        path: PathBuf,
        /// Why bind or listen failed.
        #[source]
        source: std::io::Error,
    },
    /// A socket path is already served by a live process.
    #[error("socket {0} is in use by a running process; stop it or choose another path")]
    SocketInUse(PathBuf),
}

/// Convenience result for this module.
pub type Result<T> = std::result::Result<T, VsockError>;

/// The packet channel between the device and its host backend.
///
/// The device guarantees that every packet given to [`send_pkt`](Self::send_pkt) was parsed from
/// a readable descriptor chain and passed [`packet::validate_tx`]: the source CID is the guest's,
/// the destination is the host, the type is STREAM, the op is known, and only RW carries data.
pub trait VsockChannel {
    /// Fill `pkt`, an RX buffer the guest posted, with the next packet for the guest.
    ///
    /// The header arrives zeroed; the implementation sets ports, op, len, flags, `buf_alloc` and
    /// `fwd_cnt` (the device sets the CIDs and type afterwards). Returns [`VsockError::NoData`]
    /// when there is nothing to send, in which case the device hands the buffer back unused.
    fn recv_pkt<B: BitmapSlice>(&mut self, pkt: &mut VsockPacket<'_, B>) -> Result<()>;

    /// Take one validated packet from the guest.
    fn send_pkt<B: BitmapSlice>(&mut self, pkt: &VsockPacket<'_, B>) -> Result<()>;

    /// The guest sent an unusable packet (malformed chain, bad field) on the flow from guest port
    /// `peer_port` to host port `local_port`: end that connection and reset it.
    fn reset_flow(&mut self, local_port: u32, peer_port: u32);

    /// Whether [`recv_pkt`](Self::recv_pkt) would have something to send.
    fn has_pending_rx(&self) -> bool;
}

/// Something the embedding event loop must poll on behalf of the device.
pub trait VsockEpollListener {
    /// The fd to poll.
    fn get_polled_fd(&self) -> RawFd;
    /// The events to poll for.
    fn get_polled_evset(&self) -> EventSet;
    /// Called when the fd is ready with `evset`.
    fn notify(&mut self, evset: EventSet);
}

/// A host backend for the vsock device: a packet channel that is driven by its own fd.
pub trait VsockBackend: VsockChannel + VsockEpollListener + Send {}
