//! The guest-facing half of the vsock device: virtqueue processing.
//!
//! [`VsockDevice`] owns a backend and the guest CID. Its transport (the vhost-user glue today,
//! a virtio-mmio device in husk's VMM later) calls [`VsockDevice::process_tx`] when the guest
//! kicks TX, [`VsockDevice::process_rx`] when the guest kicks RX or the backend has data, and
//! raises the queue interrupt when either returns `true`.
//!
//! Both loops follow the EVENT_IDX discipline, which is also correct without EVENT_IDX: consume
//! the ring, re-enable notifications, and look again, because the driver may have added buffers
//! between the last pop and the re-enable. A ring whose `avail.idx` is garbage cannot make them
//! spin: a round that pops nothing ends the loop.

use tracing::{debug, trace};
use virtio_queue::{DescriptorChain, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::{Bytes, GuestMemory};
use vmm_sys_util::epoll::EventSet;

use super::defs::{self, uapi, HOST_CID, MAX_PKT_BUF_SIZE};
use super::packet::{op_name, validate_tx, HeaderFields, TxReject};
use super::{Result, VsockChannel, VsockEpollListener, VsockError};

/// Counters of what the guest sent that the device refused. They only grow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockDeviceStats {
    /// TX packets handed to the backend.
    pub tx_packets: u64,
    /// TX packets dropped (foreign addresses, unparseable chains that name no flow).
    pub tx_dropped: u64,
    /// TX packets whose flow was reset because the packet was malformed or out of protocol.
    pub tx_reset: u64,
    /// RX packets written for the guest.
    pub rx_packets: u64,
    /// RX buffers returned unused because the chain was unusable (read-only, too short).
    pub rx_bad_buffers: u64,
}

/// The virtio-vsock device: guest CID, a host backend, and the queue loops.
pub struct VsockDevice<B> {
    guest_cid: u64,
    backend: B,
    stats: VsockDeviceStats,
}

impl<B> VsockDevice<B> {
    /// Create the device for a guest with CID `guest_cid` (3 ..= 2^32-2).
    pub fn new(guest_cid: u64, backend: B) -> Result<Self> {
        if !(defs::MIN_GUEST_CID..=defs::MAX_GUEST_CID).contains(&guest_cid) {
            return Err(VsockError::InvalidGuestCid(guest_cid));
        }
        Ok(VsockDevice {
            guest_cid,
            backend,
            stats: VsockDeviceStats::default(),
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The virtio config space: `le64 guest_cid`.
    pub fn config_space(&self) -> [u8; defs::CONFIG_SPACE_SIZE] {
        self.guest_cid.to_le_bytes()
    }

    /// Read `size` bytes of config space at `offset`; `None` if the range is outside it.
    pub fn read_config(&self, offset: u32, size: u32) -> Option<Vec<u8>> {
        let cfg = self.config_space();
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(usize::try_from(size).ok()?)?;
        cfg.get(start..end).map(<[u8]>::to_vec)
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Counters of refused and handled packets.
    pub fn stats(&self) -> VsockDeviceStats {
        self.stats
    }
}

impl<B: VsockEpollListener> VsockDevice<B> {
    /// Forward readiness of the backend's fd ([`VsockEpollListener::get_polled_fd`]) to it.
    /// Call [`process_rx`](Self::process_rx) afterwards.
    pub fn notify_backend(&mut self, evset: EventSet) {
        self.backend.notify(evset);
    }
}

impl<B: VsockChannel> VsockDevice<B> {
    /// Whether the backend has packets waiting for RX buffers.
    pub fn has_pending_rx(&self) -> bool {
        self.backend.has_pending_rx()
    }

    /// Drain the TX queue into the backend. Returns whether the driver must be notified.
    ///
    /// Every chain is returned to the driver (with used length 0), good or bad.
    pub fn process_tx<M: GuestMemory, Q: QueueT>(
        &mut self,
        mem: &M,
        queue: &mut Q,
    ) -> Result<bool> {
        let mut used_any = false;
        loop {
            queue.disable_notification(mem)?;
            let mut popped = 0usize;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                popped += 1;
                let head = chain.head_index();
                self.handle_tx_chain(mem, chain);
                queue.add_used(mem, head, 0)?;
                used_any = true;
            }
            if !queue.enable_notification(mem)? || popped == 0 {
                break;
            }
        }
        Ok(used_any && queue.needs_notification(mem)?)
    }

    /// Fill RX buffers with the backend's pending packets. Returns whether the driver must be
    /// notified.
    ///
    /// If the backend has more to send than there are buffers, notifications are re-enabled so the
    /// driver kicks when it posts more.
    pub fn process_rx<M: GuestMemory, Q: QueueT>(
        &mut self,
        mem: &M,
        queue: &mut Q,
    ) -> Result<bool> {
        let mut used_any = false;
        loop {
            let mut popped = 0usize;
            let mut out_of_buffers = false;
            while self.backend.has_pending_rx() {
                let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
                    out_of_buffers = true;
                    break;
                };
                popped += 1;
                let head = chain.head_index();
                match self.fill_rx_chain(mem, &mut chain) {
                    RxFill::Written(len) => {
                        queue.add_used(mem, head, len)?;
                        used_any = true;
                        self.stats.rx_packets += 1;
                    }
                    RxFill::BadBuffer => {
                        queue.add_used(mem, head, 0)?;
                        used_any = true;
                        self.stats.rx_bad_buffers += 1;
                    }
                    RxFill::NothingToSend => {
                        // Give the buffer back to the ring, untouched.
                        queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                        break;
                    }
                }
            }
            if !out_of_buffers {
                break;
            }
            // Starved: ask the driver to kick when it adds buffers, and look once more in case it
            // already has. A round that found nothing to pop ends it (bad avail index).
            if !queue.enable_notification(mem)? || popped == 0 {
                break;
            }
        }
        Ok(used_any && queue.needs_notification(mem)?)
    }

    fn handle_tx_chain<M: GuestMemory>(&mut self, mem: &M, mut chain: DescriptorChain<&M>) {
        let probe = chain.clone();
        match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_BUF_SIZE) {
            Ok(pkt) => {
                let hdr = HeaderFields::from_packet(&pkt);
                match validate_tx(&hdr, self.guest_cid) {
                    Ok(()) => {
                        trace!(
                            op = op_name(hdr.op),
                            src_port = hdr.src_port,
                            dst_port = hdr.dst_port,
                            len = hdr.len,
                            "vsock: guest packet"
                        );
                        self.stats.tx_packets += 1;
                        if let Err(e) = self.backend.send_pkt(&pkt) {
                            debug!("vsock: backend refused a guest packet: {e}");
                        }
                    }
                    Err(TxReject::Drop(why)) => {
                        debug!("vsock: dropping guest packet: {why}");
                        self.stats.tx_dropped += 1;
                    }
                    Err(TxReject::Reset(why)) => {
                        debug!(
                            src_port = hdr.src_port,
                            dst_port = hdr.dst_port,
                            "vsock: resetting flow after bad guest packet: {why}"
                        );
                        self.stats.tx_reset += 1;
                        self.backend.reset_flow(hdr.dst_port, hdr.src_port);
                    }
                }
            }
            Err(e) => match peek_header(mem, probe) {
                Some(hdr) if hdr.is_guest_to_host(self.guest_cid) => {
                    debug!(
                        src_port = hdr.src_port,
                        dst_port = hdr.dst_port,
                        "vsock: resetting flow after unparseable guest packet: {e}"
                    );
                    self.stats.tx_reset += 1;
                    self.backend.reset_flow(hdr.dst_port, hdr.src_port);
                }
                _ => {
                    debug!("vsock: dropping unparseable guest packet: {e}");
                    self.stats.tx_dropped += 1;
                }
            },
        }
    }

    fn fill_rx_chain<M: GuestMemory>(
        &mut self,
        mem: &M,
        chain: &mut DescriptorChain<&M>,
    ) -> RxFill {
        // No upper bound on the buffer size here: we never write more than MAX_PKT_BUF_SIZE
        // (the backend caps each packet), and refusing big buffers would starve the guest.
        let mut pkt = match VsockPacket::from_rx_virtq_chain(mem, chain, u32::MAX) {
            Ok(pkt) => pkt,
            Err(e) => {
                debug!("vsock: unusable RX buffer from the guest: {e}");
                return RxFill::BadBuffer;
            }
        };
        if let Err(e) = pkt.set_header_from_raw(&[0u8; PKT_HEADER_SIZE]) {
            debug!("vsock: cannot write RX header: {e}");
            return RxFill::BadBuffer;
        }
        match self.backend.recv_pkt(&mut pkt) {
            Ok(()) => {
                pkt.set_src_cid(HOST_CID)
                    .set_dst_cid(self.guest_cid)
                    .set_type(uapi::VSOCK_TYPE_STREAM);
                trace!(
                    op = op_name(pkt.op()),
                    src_port = pkt.src_port(),
                    dst_port = pkt.dst_port(),
                    len = pkt.len(),
                    "vsock: packet for the guest"
                );
                RxFill::Written(PKT_HEADER_SIZE as u32 + pkt.len())
            }
            Err(VsockError::NoData) => RxFill::NothingToSend,
            Err(e) => {
                debug!("vsock: backend failed to produce a packet: {e}");
                RxFill::NothingToSend
            }
        }
    }
}

enum RxFill {
    Written(u32),
    BadBuffer,
    NothingToSend,
}

/// Read the header of a chain that `VsockPacket` refused, if its head is long enough.
fn peek_header<M: GuestMemory>(mem: &M, mut chain: DescriptorChain<&M>) -> Option<HeaderFields> {
    let head = chain.next()?;
    if (head.len() as usize) < PKT_HEADER_SIZE {
        return None;
    }
    let mut raw = [0u8; PKT_HEADER_SIZE];
    mem.read_slice(&mut raw, head.addr()).ok()?;
    Some(HeaderFields::from_raw(&raw))
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;
