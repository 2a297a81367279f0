//! [`VsockConnection`]: one guest flow bound to one host Unix stream.

use std::io::ErrorKind;
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::io::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tracing::debug;
use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, WriteVolatile};
use vmm_sys_util::epoll::EventSet;

use super::super::defs::{uapi, CONN_CREDIT_UPDATE_THRESHOLD, CONN_TX_BUF_SIZE, MAX_PKT_BUF_SIZE};
use super::super::packet::HeaderFields;
use super::{ConnState, ConnTimeouts, PendingRx, TxBuf};

/// One vsock stream connection between a guest port and a host Unix stream.
#[derive(Debug)]
pub struct VsockConnection {
    stream: UnixStream,
    state: ConnState,
    local_port: u32,
    peer_port: u32,
    /// Our own bytes for the host stream (the `OK <port>\n` reply); go out before guest data and
    /// do not count toward `fwd_cnt`.
    ctrl_out: TxBuf,
    /// Guest data the host stream has not taken yet.
    tx_buf: TxBuf,
    /// Guest bytes written to the host stream, ever.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    last_fwd_cnt_to_peer: Wrapping<u32>,
    /// Bytes sent to the guest, ever.
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    pending: PendingRx,
    request_sent: bool,
    credit_requested: bool,
    /// Reading the host stream returned end-of-file.
    host_eof: bool,
    /// The host closed both directions (or its stream broke).
    host_hup: bool,
    host_write_shut: bool,
    /// SHUTDOWN flags the guest sent.
    guest_shut: u32,
    /// SHUTDOWN flags we sent.
    sent_shut: u32,
    expiry: Option<Instant>,
    timeouts: ConnTimeouts,
}

impl VsockConnection {
    fn new(
        stream: UnixStream,
        state: ConnState,
        local_port: u32,
        peer_port: u32,
        timeouts: ConnTimeouts,
    ) -> Self {
        VsockConnection {
            stream,
            state,
            local_port,
            peer_port,
            ctrl_out: TxBuf::new(),
            tx_buf: TxBuf::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_to_peer: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            pending: PendingRx::default(),
            request_sent: false,
            credit_requested: false,
            host_eof: false,
            host_hup: false,
            host_write_shut: false,
            guest_shut: 0,
            sent_shut: 0,
            expiry: None,
            timeouts,
        }
    }

    /// A host-initiated connection: `stream` sent `CONNECT <peer_port>`; a REQUEST from
    /// `local_port` is queued for the guest and must be answered within `timeouts.request`.
    /// The stream must be non-blocking.
    pub fn new_local_init(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        timeouts: ConnTimeouts,
    ) -> Self {
        let mut c = Self::new(
            stream,
            ConnState::LocalInit,
            local_port,
            peer_port,
            timeouts,
        );
        c.pending.request = true;
        c.expiry = Some(Instant::now() + timeouts.request);
        c
    }

    /// A guest-initiated connection whose (non-blocking) host stream is connected; a RESPONSE
    /// is queued. `req` is the guest's REQUEST header (its credit).
    pub fn new_peer_init(stream: UnixStream, req: &HeaderFields, timeouts: ConnTimeouts) -> Self {
        let mut c = Self::new(
            stream,
            ConnState::PeerInit,
            req.dst_port,
            req.src_port,
            timeouts,
        );
        c.peer_buf_alloc = req.buf_alloc;
        c.peer_fwd_cnt = Wrapping(req.fwd_cnt);
        c.pending.response = true;
        c
    }

    /// The state.
    pub fn state(&self) -> ConnState {
        self.state
    }

    /// Host-side port.
    pub fn local_port(&self) -> u32 {
        self.local_port
    }

    /// Guest-side port.
    pub fn peer_port(&self) -> u32 {
        self.peer_port
    }

    /// The host stream's fd.
    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Deadline after which [`on_expired`](Self::on_expired) must run.
    pub fn expiry(&self) -> Option<Instant> {
        self.expiry
    }

    /// Whether the connection is finished and can be dropped.
    pub fn is_closed(&self) -> bool {
        self.state == ConnState::Closed
    }

    /// Guest bytes waiting for the host stream.
    pub fn tx_buffered(&self) -> usize {
        self.tx_buf.len()
    }

    /// Bytes the guest can still take (its `buf_alloc` minus what is in flight), 0 if it
    /// reported nonsense.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether the host stream should stay in the epoll set. After a hang-up it must leave:
    /// epoll reports HUP whatever the interest, and the rest is driven by queued packets.
    pub fn wants_epoll(&self) -> bool {
        !matches!(self.state, ConnState::Killed | ConnState::Closed) && !self.host_hup
    }

    /// The events to poll the host stream for (HUP and ERR are always reported).
    pub fn get_polled_evset(&self) -> EventSet {
        let mut ev = EventSet::empty();
        if !self.wants_epoll() {
            return ev;
        }
        if !self.ctrl_out.is_empty() || !self.tx_buf.is_empty() {
            ev |= EventSet::OUT;
        }
        if self.can_read_host() && !self.pending.rw && self.peer_credit() > 0 {
            ev |= EventSet::IN | EventSet::READ_HANG_UP;
        }
        ev
    }

    fn can_read_host(&self) -> bool {
        self.state == ConnState::Established
            && !self.host_eof
            && self.guest_shut & uapi::VSOCK_FLAGS_SHUTDOWN_RCV == 0
    }

    /// Whether [`recv_pkt`](Self::recv_pkt) would produce a packet.
    pub fn has_pending_rx(&self) -> bool {
        match self.state {
            ConnState::Closed => false,
            ConnState::Killed => self.pending.rst,
            _ => {
                let p = &self.pending;
                p.request
                    || p.response
                    || p.shutdown != 0
                    || p.credit_update
                    || (p.rw
                        && self.state == ConnState::Established
                        && (self.peer_credit() > 0 || !self.credit_requested))
            }
        }
    }

    /// Reset the connection: close the host side, and queue an RST for the guest if it knows
    /// about the connection.
    pub fn kill(&mut self) {
        match self.state {
            ConnState::Closed | ConnState::Killed => {}
            ConnState::LocalInit if !self.request_sent => {
                self.state = ConnState::Closed;
                self.pending = PendingRx::default();
            }
            _ => {
                self.state = ConnState::Killed;
                self.pending = PendingRx {
                    rst: true,
                    ..PendingRx::default()
                };
                self.expiry = None;
                let _ = self.stream.shutdown(Shutdown::Both);
            }
        }
    }

    /// Run the deadline: a REQUEST that got no answer or a close that did not finish resets.
    pub fn on_expired(&mut self, now: Instant) {
        if self.expiry.is_some_and(|t| t <= now) {
            debug!(
                local_port = self.local_port,
                peer_port = self.peer_port,
                state = ?self.state,
                "vsock: connection timed out"
            );
            self.expiry = None;
            self.kill();
        }
    }

    /// Readiness of the host stream.
    pub fn notify(&mut self, evset: EventSet) {
        if !self.wants_epoll() {
            return;
        }
        if evset.contains(EventSet::ERROR) {
            debug!(local_port = self.local_port, "vsock: host stream error");
            self.kill();
            return;
        }
        if evset.contains(EventSet::OUT) {
            self.flush_host();
            if !self.wants_epoll() {
                return;
            }
        }
        if evset.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP)
            && self.can_read_host()
        {
            self.pending.rw = true;
        }
        if evset.contains(EventSet::HANG_UP) {
            self.on_host_hangup();
        }
    }

    fn on_host_hangup(&mut self) {
        self.host_hup = true;
        match self.state {
            // The client gave up before the guest answered.
            ConnState::LocalInit => self.kill(),
            // Read the rest (and EOF) once the RESPONSE is out.
            ConnState::PeerInit => {}
            ConnState::Established => {
                if !self.ctrl_out.is_empty() || !self.tx_buf.is_empty() {
                    // Guest data can no longer be delivered.
                    self.kill();
                } else if !self.can_read_host() {
                    self.queue_shutdown(uapi::VSOCK_FLAGS_SHUTDOWN_BOTH);
                } else {
                    self.pending.rw = true;
                }
            }
            ConnState::Killed | ConnState::Closed => {}
        }
    }

    fn queue_shutdown(&mut self, flags: u32) {
        if (self.sent_shut | self.pending.shutdown) & flags != flags {
            self.pending.shutdown |= flags;
        }
    }

    /// Take one validated guest packet addressed to this connection.
    pub fn send_pkt<B: BitmapSlice>(&mut self, pkt: &VsockPacket<'_, B>) {
        let hdr = HeaderFields::from_packet(pkt);
        if hdr.op == uapi::VSOCK_OP_RST {
            // The guest reset (or refused) the connection; drop the host side at once.
            self.state = ConnState::Closed;
            self.pending = PendingRx::default();
            return;
        }
        if matches!(self.state, ConnState::Killed | ConnState::Closed) {
            return;
        }
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
        match (self.state, hdr.op) {
            (ConnState::LocalInit, uapi::VSOCK_OP_RESPONSE) => {
                self.state = ConnState::Established;
                self.expiry = None;
                self.ctrl_out
                    .push(format!("OK {}\n", self.local_port).as_bytes());
                self.flush_host();
            }
            (ConnState::Established, uapi::VSOCK_OP_RW) => self.guest_data(pkt, hdr.len),
            (ConnState::Established, uapi::VSOCK_OP_SHUTDOWN) => {
                self.guest_shut |= hdr.flags & uapi::VSOCK_FLAGS_SHUTDOWN_BOTH;
                if self.guest_shut & uapi::VSOCK_FLAGS_SHUTDOWN_RCV != 0 {
                    self.pending.rw = false;
                }
                self.finish_shutdown_if_flushed();
            }
            (ConnState::Established, uapi::VSOCK_OP_CREDIT_UPDATE) => {}
            (ConnState::Established, uapi::VSOCK_OP_CREDIT_REQUEST) => {
                self.pending.credit_update = true;
            }
            (state, op) => {
                debug!(
                    local_port = self.local_port,
                    peer_port = self.peer_port,
                    ?state,
                    op,
                    "vsock: guest packet out of protocol; resetting"
                );
                self.kill();
            }
        }
    }

    fn guest_data<B: BitmapSlice>(&mut self, pkt: &VsockPacket<'_, B>, len: u32) {
        if self.guest_shut & uapi::VSOCK_FLAGS_SHUTDOWN_SEND != 0 {
            debug!(
                local_port = self.local_port,
                "vsock: guest sent data after SHUTDOWN(SEND)"
            );
            self.kill();
            return;
        }
        if len == 0 {
            return;
        }
        let Some(data) = pkt
            .data_slice()
            .and_then(|d| d.subslice(0, len as usize).ok())
        else {
            // The device only passes RW packets whose data descriptor covers `len`.
            self.kill();
            return;
        };
        let data = &data;
        if self.tx_buf.len() + data.len() > CONN_TX_BUF_SIZE as usize {
            debug!(
                local_port = self.local_port,
                buffered = self.tx_buf.len(),
                len,
                "vsock: guest overran the credit it was given; resetting"
            );
            self.kill();
            return;
        }
        let mut written = 0usize;
        if self.ctrl_out.is_empty() && self.tx_buf.is_empty() {
            match (&self.stream).write_volatile(data) {
                Ok(n) => written = n,
                Err(VolatileMemoryError::IOError(e)) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => {
                    debug!(
                        local_port = self.local_port,
                        "vsock: host stream write failed: {e}"
                    );
                    self.kill();
                    return;
                }
            }
        }
        self.fwd_cnt += Wrapping(written as u32);
        if written < data.len() {
            match data.offset(written) {
                Ok(rest) => self.tx_buf.push_volatile(&rest),
                Err(_) => {
                    self.kill();
                    return;
                }
            }
        }
        self.check_credit_update();
    }

    /// Write buffered bytes to the host stream.
    fn flush_host(&mut self) {
        let res = self.ctrl_out.flush_to(&self.stream).and_then(|_| {
            if self.ctrl_out.is_empty() {
                self.tx_buf.flush_to(&self.stream)
            } else {
                Ok(0)
            }
        });
        match res {
            Ok(n) => {
                self.fwd_cnt += Wrapping(n as u32);
                self.check_credit_update();
                self.finish_shutdown_if_flushed();
            }
            Err(e) => {
                debug!(
                    local_port = self.local_port,
                    "vsock: host stream write failed: {e}"
                );
                self.kill();
            }
        }
    }

    fn check_credit_update(&mut self) {
        if (self.fwd_cnt - self.last_fwd_cnt_to_peer).0 >= CONN_CREDIT_UPDATE_THRESHOLD {
            self.pending.credit_update = true;
        }
    }

    fn finish_shutdown_if_flushed(&mut self) {
        if self.state != ConnState::Established || self.guest_shut == 0 {
            return;
        }
        if !self.ctrl_out.is_empty() || !self.tx_buf.is_empty() {
            if self.guest_shut == uapi::VSOCK_FLAGS_SHUTDOWN_BOTH && self.expiry.is_none() {
                self.expiry = Some(Instant::now() + self.timeouts.shutdown);
            }
            return;
        }
        if self.guest_shut & uapi::VSOCK_FLAGS_SHUTDOWN_SEND != 0 && !self.host_write_shut {
            let _ = self.stream.shutdown(Shutdown::Write);
            self.host_write_shut = true;
        }
        if self.guest_shut == uapi::VSOCK_FLAGS_SHUTDOWN_BOTH {
            // The guest closed: acknowledge with RST, as Linux expects.
            self.kill();
        }
    }

    /// Produce the next packet for the guest into `pkt` (header zeroed by the device). Returns
    /// whether a packet was written.
    pub fn recv_pkt<B: BitmapSlice>(&mut self, pkt: &mut VsockPacket<'_, B>) -> bool {
        let Some((op, flags, len)) = self.next_rx(pkt) else {
            return false;
        };
        pkt.set_src_port(self.local_port)
            .set_dst_port(self.peer_port)
            .set_type(uapi::VSOCK_TYPE_STREAM)
            .set_op(op)
            .set_flags(flags)
            .set_len(len)
            .set_buf_alloc(CONN_TX_BUF_SIZE)
            .set_fwd_cnt(self.fwd_cnt.0);
        self.last_fwd_cnt_to_peer = self.fwd_cnt;
        self.pending.credit_update = false;
        true
    }

    fn next_rx<B: BitmapSlice>(&mut self, pkt: &mut VsockPacket<'_, B>) -> Option<(u16, u32, u32)> {
        match self.state {
            ConnState::Closed => return None,
            ConnState::Killed => {
                if !self.pending.rst {
                    return None;
                }
                self.pending = PendingRx::default();
                self.state = ConnState::Closed;
                return Some((uapi::VSOCK_OP_RST, 0, 0));
            }
            _ => {}
        }
        if self.pending.request {
            self.pending.request = false;
            self.request_sent = true;
            return Some((uapi::VSOCK_OP_REQUEST, 0, 0));
        }
        if self.pending.response {
            self.pending.response = false;
            self.state = ConnState::Established;
            if self.host_hup {
                self.pending.rw = true;
            }
            return Some((uapi::VSOCK_OP_RESPONSE, 0, 0));
        }
        if self.pending.rw && self.state == ConnState::Established {
            if let Some(out) = self.read_host(pkt) {
                return Some(out);
            }
        }
        if self.pending.shutdown != 0 {
            let flags = self.pending.shutdown;
            self.pending.shutdown = 0;
            return Some(self.shutdown_packet(flags));
        }
        if self.pending.credit_update {
            return Some((uapi::VSOCK_OP_CREDIT_UPDATE, 0, 0));
        }
        None
    }

    fn shutdown_packet(&mut self, flags: u32) -> (u16, u32, u32) {
        self.sent_shut |= flags;
        if self.sent_shut == uapi::VSOCK_FLAGS_SHUTDOWN_BOTH && self.expiry.is_none() {
            // Wait for the guest's RST, but not forever.
            self.expiry = Some(Instant::now() + self.timeouts.shutdown);
        }
        (uapi::VSOCK_OP_SHUTDOWN, flags, 0)
    }

    /// Read host data into the packet. `None`: nothing to send from the host side now.
    fn read_host<B: BitmapSlice>(
        &mut self,
        pkt: &mut VsockPacket<'_, B>,
    ) -> Option<(u16, u32, u32)> {
        let credit = self.peer_credit();
        if credit == 0 {
            if self.credit_requested {
                return None;
            }
            self.credit_requested = true;
            return Some((uapi::VSOCK_OP_CREDIT_REQUEST, 0, 0));
        }
        let data = pkt.data_slice()?;
        let max = data
            .len()
            .min(credit as usize)
            .min(MAX_PKT_BUF_SIZE as usize);
        let mut dst = data.subslice(0, max).ok()?;
        let res = (&self.stream).read_volatile(&mut dst);
        match res {
            Ok(0) if max > 0 => {
                self.pending.rw = false;
                self.host_eof = true;
                if !self.host_hup && peer_hung_up(&self.stream) {
                    self.host_hup = true;
                }
                let flags = if self.host_hup {
                    uapi::VSOCK_FLAGS_SHUTDOWN_BOTH
                } else {
                    uapi::VSOCK_FLAGS_SHUTDOWN_SEND
                } | self.pending.shutdown;
                self.pending.shutdown = 0;
                Some(self.shutdown_packet(flags))
            }
            Ok(0) => None,
            Ok(n) => {
                self.rx_cnt += Wrapping(n as u32);
                Some((uapi::VSOCK_OP_RW, 0, n as u32))
            }
            Err(VolatileMemoryError::IOError(e)) if e.kind() == ErrorKind::WouldBlock => {
                self.pending.rw = false;
                None
            }
            Err(e) => {
                debug!(
                    local_port = self.local_port,
                    "vsock: host stream read failed: {e}"
                );
                self.kill();
                self.pending = PendingRx::default();
                self.state = ConnState::Closed;
                Some((uapi::VSOCK_OP_RST, 0, 0))
            }
        }
    }
}

/// Whether the other end of `stream` closed both directions (not just its write side).
fn peer_hung_up(stream: &UnixStream) -> bool {
    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::empty())];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
        Err(_) => false,
    }
}

#[cfg(test)]
#[path = "connection_tests.rs"]
mod tests;
