//! Test doubles for the vsock device: guest memory, a driver-side view of split queues, packet
//! buffers, and a recording backend. Built for `cfg(test)` and with the `test-utils` feature.

use std::collections::VecDeque;
use std::os::unix::io::{AsRawFd, RawFd};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::{Descriptor as SplitDescriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::defs::{uapi, HOST_CID};
use super::packet::HeaderFields;
use super::{Result, VsockBackend, VsockChannel, VsockEpollListener, VsockError};

/// The guest CID the tests use.
pub const TEST_GUEST_CID: u64 = 3;
/// Size of [`test_mem`].
pub const TEST_MEM_SIZE: usize = 0x40_0000;
/// Where [`TestQueue`] buffers start (the rings live below).
pub const BUF_BASE: u64 = 0x10_0000;

/// Guest memory for tests: 4 MiB at guest address 0.
pub fn test_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), TEST_MEM_SIZE)]).expect("test memory")
}

/// A header as a well-behaved guest driver would send it.
pub fn guest_hdr(op: u16, src_port: u32, dst_port: u32) -> HeaderFields {
    HeaderFields {
        src_cid: TEST_GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: uapi::VSOCK_TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

/// One descriptor of a test chain.
#[derive(Clone, Copy, Debug)]
pub struct TestDesc {
    /// Guest address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// The driver's side of a split queue in [`test_mem`]: posts chains, reads the used ring.
pub struct TestQueue<'a> {
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    mem: &'a GuestMemoryMmap,
    size: u16,
    next_desc: u16,
    next_buf: u64,
    used_seen: u16,
}

impl<'a> TestQueue<'a> {
    /// A queue of `size` entries whose rings start at guest address `base`, with buffers
    /// allocated from `buf_base` upward.
    pub fn new(mem: &'a GuestMemoryMmap, base: u64, buf_base: u64, size: u16) -> Self {
        TestQueue {
            mock: MockSplitQueue::create(mem, GuestAddress(base), size),
            mem,
            size,
            next_desc: 0,
            next_buf: buf_base,
            used_seen: 0,
        }
    }

    /// A device-side `Queue` configured on these rings.
    pub fn create_queue(&self) -> Queue {
        self.mock.create_queue().expect("queue")
    }

    /// Reserve `len` bytes of guest memory for a buffer.
    pub fn alloc(&mut self, len: u32) -> u64 {
        let addr = self.next_buf;
        self.next_buf += u64::from(len.max(1)).next_multiple_of(16);
        assert!(
            self.next_buf <= TEST_MEM_SIZE as u64,
            "test memory exhausted"
        );
        addr
    }

    /// Post one chain; returns its head index.
    pub fn add_chain(&mut self, descs: &[TestDesc]) -> u16 {
        let start = self.next_desc;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let last = i + 1 == descs.len();
                let mut flags = 0u16;
                if !last {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                if d.write {
                    flags |= VRING_DESC_F_WRITE as u16;
                }
                let next = if last { 0 } else { start + i as u16 + 1 };
                RawDescriptor::from(SplitDescriptor::new(d.addr, d.len, flags, next))
            })
            .collect();
        assert!(
            usize::from(start) + descs.len() <= usize::from(self.size),
            "test queue descriptor table full"
        );
        self.mock.add_desc_chains(&raw, start).expect("add chain");
        self.next_desc = start + descs.len() as u16;
        start
    }

    /// Post a TX packet as Linux does: header descriptor, then (if any) one data descriptor.
    pub fn add_tx_packet(&mut self, hdr: &HeaderFields, data: &[u8]) -> u16 {
        let mut hdr = *hdr;
        hdr.len = data.len() as u32;
        let h = self.alloc(PKT_HEADER_SIZE as u32);
        self.mem
            .write_slice(&hdr.to_raw(), GuestAddress(h))
            .expect("write header");
        let mut descs = vec![TestDesc {
            addr: h,
            len: PKT_HEADER_SIZE as u32,
            write: false,
        }];
        if !data.is_empty() {
            let d = self.alloc(data.len() as u32);
            self.mem
                .write_slice(data, GuestAddress(d))
                .expect("write data");
            descs.push(TestDesc {
                addr: d,
                len: data.len() as u32,
                write: false,
            });
        }
        self.add_chain(&descs)
    }

    /// Post an RX buffer: a header descriptor and a `data_len` data descriptor, both writable.
    /// Returns the head index and the two addresses.
    pub fn add_rx_buffer(&mut self, data_len: u32) -> (u16, u64, u64) {
        let h = self.alloc(PKT_HEADER_SIZE as u32);
        let d = self.alloc(data_len);
        let head = self.add_chain(&[
            TestDesc {
                addr: h,
                len: PKT_HEADER_SIZE as u32,
                write: true,
            },
            TestDesc {
                addr: d,
                len: data_len,
                write: true,
            },
        ]);
        (head, h, d)
    }

    /// The driver-side rings.
    pub fn mock(&self) -> &MockSplitQueue<'a, GuestMemoryMmap> {
        &self.mock
    }

    /// EVENT_IDX, driver side: ask for an interrupt once the device's used index passes `idx`
    /// (writes `used_event` at the end of the available ring).
    pub fn set_used_event(&self, idx: u16) {
        let addr = self.mock.avail_addr().0 + 4 + 2 * u64::from(self.size);
        self.mem
            .write_obj(idx, GuestAddress(addr))
            .expect("write used_event");
    }

    /// How many used elements [`take_used`](Self::take_used) has returned so far (wrapping).
    pub fn used_seen(&self) -> u16 {
        self.used_seen
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        self.mock.used().idx().load()
    }

    /// Used elements not returned by an earlier call.
    pub fn take_used(&mut self) -> Vec<VirtqUsedElem> {
        let idx = self.used_idx();
        let mut out = vec![];
        while self.used_seen != idx {
            let i = usize::from(self.used_seen % self.size);
            out.push(self.mock.used().ring().ref_at(i).expect("used elem").load());
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// Read a packet the device wrote into an RX buffer at `hdr_addr`/`data_addr`.
    pub fn read_rx_packet(&self, hdr_addr: u64, data_addr: u64) -> (HeaderFields, Vec<u8>) {
        let mut raw = [0u8; PKT_HEADER_SIZE];
        self.mem
            .read_slice(&mut raw, GuestAddress(hdr_addr))
            .expect("read header");
        let hdr = HeaderFields::from_raw(&raw);
        let mut data = vec![0u8; hdr.len as usize];
        self.mem
            .read_slice(&mut data, GuestAddress(data_addr))
            .expect("read data");
        (hdr, data)
    }
}

/// An owned packet (header + data buffer) for feeding the state machine and the muxer without
/// queues.
#[derive(Clone, Debug)]
pub struct PacketBuf {
    hdr: Vec<u8>,
    data: Vec<u8>,
}

impl PacketBuf {
    /// An empty RX buffer with room for `data_len` payload bytes.
    pub fn rx(data_len: usize) -> Self {
        PacketBuf {
            hdr: vec![0; PKT_HEADER_SIZE],
            data: vec![0; data_len],
        }
    }

    /// A guest TX packet; `hdr.len` is set from `data`.
    pub fn tx(hdr: &HeaderFields, data: &[u8]) -> Self {
        let mut hdr = *hdr;
        hdr.len = data.len() as u32;
        PacketBuf {
            hdr: hdr.to_raw().to_vec(),
            data: data.to_vec(),
        }
    }

    /// The buffer as a `VsockPacket`, with its header fields loaded.
    pub fn packet(&mut self) -> VsockPacket<'_, ()> {
        let raw: [u8; PKT_HEADER_SIZE] = self.hdr.as_slice().try_into().expect("header size");
        let data = if self.data.is_empty() {
            None
        } else {
            Some(self.data.as_mut_slice())
        };
        // SAFETY: `hdr` and `data` are owned by `self`, which stays mutably borrowed for the
        // packet's lifetime, so the memory outlives the packet and nothing else touches it.
        let mut pkt = unsafe { VsockPacket::new(self.hdr.as_mut_slice(), data) }
            .expect("header buffer has PKT_HEADER_SIZE bytes");
        pkt.set_header_from_raw(&raw).expect("header write");
        pkt
    }

    /// The header as last written through [`packet`](Self::packet).
    pub fn header(&self) -> HeaderFields {
        let raw: [u8; PKT_HEADER_SIZE] = self.hdr.as_slice().try_into().expect("header size");
        HeaderFields::from_raw(&raw)
    }

    /// The payload named by the header's `len`.
    pub fn payload(&self) -> &[u8] {
        let len = (self.header().len as usize).min(self.data.len());
        &self.data[..len]
    }
}

/// A backend double: records what the device hands it and replays scripted RX packets.
pub struct TestBackend {
    /// Packets the device passed to `send_pkt`.
    pub sent: Vec<(HeaderFields, Vec<u8>)>,
    /// Flows the device asked to reset (host port, guest port).
    pub resets: Vec<(u32, u32)>,
    /// Packets to give the guest, in order.
    pub rx: VecDeque<(HeaderFields, Vec<u8>)>,
    /// Events passed to `notify`.
    pub notified: Vec<EventSet>,
    evfd: EventFd,
}

impl Default for TestBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl TestBackend {
    /// An empty backend.
    pub fn new() -> Self {
        TestBackend {
            sent: vec![],
            resets: vec![],
            rx: VecDeque::new(),
            notified: vec![],
            evfd: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        }
    }
}

impl VsockChannel for TestBackend {
    fn recv_pkt<B: BitmapSlice>(&mut self, pkt: &mut VsockPacket<'_, B>) -> Result<()> {
        let Some((hdr, data)) = self.rx.pop_front() else {
            return Err(VsockError::NoData);
        };
        let mut len = 0u32;
        if !data.is_empty() {
            if let Some(slice) = pkt.data_slice() {
                let n = data.len().min(slice.len());
                slice.copy_from(&data[..n]);
                len = n as u32;
            }
        }
        pkt.set_src_port(hdr.src_port)
            .set_dst_port(hdr.dst_port)
            .set_op(hdr.op)
            .set_flags(hdr.flags)
            .set_buf_alloc(hdr.buf_alloc)
            .set_fwd_cnt(hdr.fwd_cnt)
            .set_len(len);
        Ok(())
    }

    fn send_pkt<B: BitmapSlice>(&mut self, pkt: &VsockPacket<'_, B>) -> Result<()> {
        let hdr = HeaderFields::from_packet(pkt);
        let mut data = vec![0u8; hdr.len as usize];
        if let Some(slice) = pkt.data_slice() {
            let n = slice.copy_to(&mut data);
            data.truncate(n);
        }
        self.sent.push((hdr, data));
        Ok(())
    }

    fn reset_flow(&mut self, local_port: u32, peer_port: u32) {
        self.resets.push((local_port, peer_port));
    }

    fn has_pending_rx(&self) -> bool {
        !self.rx.is_empty()
    }
}

impl VsockEpollListener for TestBackend {
    fn get_polled_fd(&self) -> RawFd {
        self.evfd.as_raw_fd()
    }

    fn get_polled_evset(&self) -> EventSet {
        EventSet::IN
    }

    fn notify(&mut self, evset: EventSet) {
        self.notified.push(evset);
    }
}

impl VsockBackend for TestBackend {}
