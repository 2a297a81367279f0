use super::*;
use crate::devices::virtio::vsock::test_utils::{
    guest_hdr, test_mem, TestBackend, TestDesc, TestQueue, TEST_GUEST_CID,
};
use virtio_queue::Queue;
use vm_memory::{Address, GuestMemoryMmap};

const RX_RINGS: u64 = 0x0;
const TX_RINGS: u64 = 0x8000;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x20_0000;

fn device() -> VsockDevice<TestBackend> {
    VsockDevice::new(TEST_GUEST_CID, TestBackend::new()).unwrap()
}

fn tx_queue(mem: &GuestMemoryMmap) -> (TestQueue<'_>, Queue) {
    let tq = TestQueue::new(mem, TX_RINGS, TX_BUFS, 16);
    let q = tq.create_queue();
    (tq, q)
}

fn rx_queue(mem: &GuestMemoryMmap) -> (TestQueue<'_>, Queue) {
    let tq = TestQueue::new(mem, RX_RINGS, RX_BUFS, 16);
    let q = tq.create_queue();
    (tq, q)
}

#[test]
fn rejects_reserved_cids_and_reports_config() {
    for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        assert!(matches!(
            VsockDevice::new(cid, TestBackend::new()),
            Err(VsockError::InvalidGuestCid(_))
        ));
    }
    let dev = VsockDevice::new(0x1234_5678, TestBackend::new()).unwrap();
    assert_eq!(dev.config_space(), 0x1234_5678u64.to_le_bytes());
    assert_eq!(
        dev.read_config(0, 8),
        Some(0x1234_5678u64.to_le_bytes().to_vec())
    );
    assert_eq!(dev.read_config(4, 4), Some(vec![0, 0, 0, 0]));
    assert_eq!(dev.read_config(0, 4), Some(vec![0x78, 0x56, 0x34, 0x12]));
    assert_eq!(dev.read_config(4, 8), None);
    assert_eq!(dev.read_config(u32::MAX, 2), None);
}

#[test]
fn tx_valid_packets_reach_the_backend() {
    let mem = test_mem();
    let (mut tq, mut q) = tx_queue(&mem);
    let mut dev = device();
    let h0 = tq.add_tx_packet(&guest_hdr(uapi::VSOCK_OP_REQUEST, 1000, 1024), &[]);
    let h1 = tq.add_tx_packet(&guest_hdr(uapi::VSOCK_OP_RW, 1000, 1024), b"hello vsock");
    assert!(dev.process_tx(&mem, &mut q).unwrap());

    let sent = &dev.backend().sent;
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].0.op, uapi::VSOCK_OP_REQUEST);
    assert_eq!(sent[1].0.op, uapi::VSOCK_OP_RW);
    assert_eq!(sent[1].0.len, 11);
    assert_eq!(sent[1].1, b"hello vsock");
    let used = tq.take_used();
    assert_eq!(
        used.iter().map(|u| (u.id(), u.len())).collect::<Vec<_>>(),
        vec![(u32::from(h0), 0), (u32::from(h1), 0)]
    );
    assert_eq!(dev.stats().tx_packets, 2);
    // Nothing new: no notification needed.
    assert!(!dev.process_tx(&mem, &mut q).unwrap());
}

#[test]
fn tx_single_descriptor_packet() {
    // Linux 6.2+ may put header and payload in one descriptor.
    let mem = test_mem();
    let (mut tq, mut q) = tx_queue(&mem);
    let mut dev = device();
    let mut hdr = guest_hdr(uapi::VSOCK_OP_RW, 1000, 1024);
    hdr.len = 3;
    let addr = tq.alloc(PKT_HEADER_SIZE as u32 + 3);
    let mut raw = hdr.to_raw().to_vec();
    raw.extend_from_slice(b"abc");
    mem.write_slice(&raw, vm_memory::GuestAddress(addr))
        .unwrap();
    tq.add_chain(&[TestDesc {
        addr,
        len: raw.len() as u32,
        write: false,
    }]);
    dev.process_tx(&mem, &mut q).unwrap();
    assert_eq!(dev.backend().sent[0].1, b"abc");
}

#[test]
fn tx_foreign_addresses_are_dropped() {
    let mem = test_mem();
    let (mut tq, mut q) = tx_queue(&mem);
    let mut dev = device();
    let mut bad_src = guest_hdr(uapi::VSOCK_OP_REQUEST, 1000, 1024);
    bad_src.src_cid = 4;
    let mut bad_dst = guest_hdr(uapi::VSOCK_OP_REQUEST, 1000, 1024);
    bad_dst.dst_cid = 1;
    tq.add_tx_packet(&bad_src, &[]);
    tq.add_tx_packet(&bad_dst, &[]);
    dev.process_tx(&mem, &mut q).unwrap();
    assert!(dev.backend().sent.is_empty());
    assert!(dev.backend().resets.is_empty());
    assert_eq!(dev.stats().tx_dropped, 2);
    assert_eq!(tq.take_used().len(), 2);
}

#[test]
fn tx_bad_fields_reset_the_flow() {
    let mem = test_mem();
    let (mut tq, mut q) = tx_queue(&mem);
    let mut dev = device();
    let mut bad_type = guest_hdr(uapi::VSOCK_OP_REQUEST, 1000, 1024);
    bad_type.type_ = 2;
    tq.add_tx_packet(&bad_type, &[]);
    tq.add_tx_packet(&guest_hdr(42, 1001, 1024), &[]);
    let mut bad_flags = guest_hdr(uapi::VSOCK_OP_SHUTDOWN, 1002, 1024);
    bad_flags.flags = 0x10;
    tq.add_tx_packet(&bad_flags, &[]);
    // Payload on a control op.
    tq.add_tx_packet(&guest_hdr(uapi::VSOCK_OP_CREDIT_UPDATE, 1003, 1024), b"xx");
    dev.process_tx(&mem, &mut q).unwrap();
    assert!(dev.backend().sent.is_empty());
    assert_eq!(
        dev.backend().resets,
        vec![(1024, 1000), (1024, 1001), (1024, 1002), (1024, 1003)]
    );
    assert_eq!(dev.stats().tx_reset, 4);
    assert_eq!(tq.take_used().len(), 4);
}

#[test]
fn tx_malformed_chains_reset_or_drop() {
    let mem = test_mem();
    let (mut tq, mut q) = tx_queue(&mem);
    let mut dev = device();

    // 1. Oversized len: the header claims more than MAX_PKT_BUF_SIZE.
    let mut big = guest_hdr(uapi::VSOCK_OP_RW, 2000, 1024);
    big.len = MAX_PKT_BUF_SIZE + 1;
    let h = tq.alloc(PKT_HEADER_SIZE as u32);
    mem.write_slice(&big.to_raw(), vm_memory::GuestAddress(h))
        .unwrap();
    let d = tq.alloc(16);
    tq.add_chain(&[
        TestDesc {
            addr: h,
            len: PKT_HEADER_SIZE as u32,
            write: false,
        },
        TestDesc {
            addr: d,
            len: 16,
            write: false,
        },
    ]);

    // 2. Short chain: RW with len 8 but no data descriptor.
    let mut short = guest_hdr(uapi::VSOCK_OP_RW, 2001, 1024);
    short.len = 8;
    let h = tq.alloc(PKT_HEADER_SIZE as u32);
    mem.write_slice(&short.to_raw(), vm_memory::GuestAddress(h))
        .unwrap();
    tq.add_chain(&[TestDesc {
        addr: h,
        len: PKT_HEADER_SIZE as u32,
        write: false,
    }]);

    // 3. Data descriptor shorter than len.
    let mut trunc = guest_hdr(uapi::VSOCK_OP_RW, 2002, 1024);
    trunc.len = 100;
    let h = tq.alloc(PKT_HEADER_SIZE as u32);
    mem.write_slice(&trunc.to_raw(), vm_memory::GuestAddress(h))
        .unwrap();
    let d = tq.alloc(10);
    tq.add_chain(&[
        TestDesc {
            addr: h,
            len: PKT_HEADER_SIZE as u32,
            write: false,
        },
        TestDesc {
            addr: d,
            len: 10,
            write: false,
        },
    ]);

    // 4. Write-only data descriptor on TX.
    let mut wo = guest_hdr(uapi::VSOCK_OP_RW, 2003, 1024);
    wo.len = 4;
    let h = tq.alloc(PKT_HEADER_SIZE as u32);
    mem.write_slice(&wo.to_raw(), vm_memory::GuestAddress(h))
        .unwrap();
    let d = tq.alloc(4);
    tq.add_chain(&[
        TestDesc {
            addr: h,
            len: PKT_HEADER_SIZE as u32,
            write: false,
        },
        TestDesc {
            addr: d,
            len: 4,
            write: true,
        },
    ]);

    // 5. Write-only header descriptor on TX.
    let wh = guest_hdr(uapi::VSOCK_OP_REQUEST, 2004, 1024);
    let h = tq.alloc(PKT_HEADER_SIZE as u32);
    mem.write_slice(&wh.to_raw(), vm_memory::GuestAddress(h))
        .unwrap();
    tq.add_chain(&[TestDesc {
        addr: h,
        len: PKT_HEADER_SIZE as u32,
        write: true,
    }]);

    // 6. Head too short to hold a header: nothing to reset, dropped.
    let h = tq.alloc(PKT_HEADER_SIZE as u32);
    mem.write_slice(
        &guest_hdr(uapi::VSOCK_OP_REQUEST, 2005, 1024).to_raw(),
        vm_memory::GuestAddress(h),
    )
    .unwrap();
    tq.add_chain(&[TestDesc {
        addr: h,
        len: 20,
        write: false,
    }]);

    // 7. Header outside guest memory: dropped.
    tq.add_chain(&[TestDesc {
        addr: 0xFFFF_0000_0000,
        len: PKT_HEADER_SIZE as u32,
        write: false,
    }]);

    // 8. Malformed and from a foreign CID: dropped, not reset.
    let mut foreign = guest_hdr(uapi::VSOCK_OP_RW, 2007, 1024);
    foreign.src_cid = 9;
    foreign.len = 8;
    let h = tq.alloc(PKT_HEADER_SIZE as u32);
    mem.write_slice(&foreign.to_raw(), vm_memory::GuestAddress(h))
        .unwrap();
    tq.add_chain(&[TestDesc {
        addr: h,
        len: PKT_HEADER_SIZE as u32,
        write: false,
    }]);

    assert!(dev.process_tx(&mem, &mut q).unwrap());
    assert!(dev.backend().sent.is_empty());
    assert_eq!(
        dev.backend().resets,
        vec![
            (1024, 2000),
            (1024, 2001),
            (1024, 2002),
            (1024, 2003),
            (1024, 2004)
        ]
    );
    assert_eq!(dev.stats().tx_reset, 5);
    assert_eq!(dev.stats().tx_dropped, 3);
    // Every chain went back to the driver.
    assert_eq!(tq.take_used().len(), 8);
}

#[test]
fn tx_garbage_avail_index_does_not_hang() {
    let mem = test_mem();
    let (tq, mut q) = tx_queue(&mem);
    let mut dev = device();
    // avail.idx far ahead of anything the ring can hold.
    tq.mock().avail().idx().store(1000);
    assert!(!dev.process_tx(&mem, &mut q).unwrap());
    assert!(dev.backend().sent.is_empty());
}

#[test]
fn tx_with_event_idx() {
    let mem = test_mem();
    let (mut tq, mut q) = tx_queue(&mem);
    q.set_event_idx(true);
    let mut dev = device();
    tq.add_tx_packet(&guest_hdr(uapi::VSOCK_OP_REQUEST, 1, 1024), &[]);
    tq.add_tx_packet(&guest_hdr(uapi::VSOCK_OP_REQUEST, 2, 1024), &[]);
    dev.process_tx(&mem, &mut q).unwrap();
    assert_eq!(dev.backend().sent.len(), 2);
    // With EVENT_IDX the device publishes avail_event = next_avail so the driver kicks on the
    // next packet.
    let avail_event: u16 = mem
        .read_obj(tq.mock().used_addr().unchecked_add(4 + 8 * 16))
        .unwrap();
    assert_eq!(avail_event, 2);
    tq.add_tx_packet(&guest_hdr(uapi::VSOCK_OP_REQUEST, 3, 1024), &[]);
    dev.process_tx(&mem, &mut q).unwrap();
    assert_eq!(dev.backend().sent.len(), 3);
    assert_eq!(tq.take_used().len(), 3);
}

#[test]
fn rx_fills_buffers_in_order_and_keeps_the_rest() {
    let mem = test_mem();
    let (mut rq, mut q) = rx_queue(&mem);
    let mut dev = device();
    let mut h = guest_hdr(uapi::VSOCK_OP_RW, 1024, 1000);
    h.buf_alloc = 4096;
    h.fwd_cnt = 7;
    dev.backend_mut().rx.push_back((h, b"first".to_vec()));
    dev.backend_mut()
        .rx
        .push_back((guest_hdr(uapi::VSOCK_OP_RESPONSE, 1024, 1001), vec![]));
    let b0 = rq.add_rx_buffer(4096);
    let b1 = rq.add_rx_buffer(4096);
    let b2 = rq.add_rx_buffer(4096);
    assert!(dev.process_rx(&mem, &mut q).unwrap());

    let used = rq.take_used();
    assert_eq!(used.len(), 2);
    assert_eq!((used[0].id(), used[0].len()), (u32::from(b0.0), 44 + 5));
    assert_eq!((used[1].id(), used[1].len()), (u32::from(b1.0), 44));
    let (hdr, data) = rq.read_rx_packet(b0.1, b0.2);
    assert_eq!(hdr.src_cid, HOST_CID);
    assert_eq!(hdr.dst_cid, TEST_GUEST_CID);
    assert_eq!(hdr.type_, uapi::VSOCK_TYPE_STREAM);
    assert_eq!(hdr.op, uapi::VSOCK_OP_RW);
    assert_eq!((hdr.src_port, hdr.dst_port), (1024, 1000));
    assert_eq!((hdr.buf_alloc, hdr.fwd_cnt), (4096, 7));
    assert_eq!(data, b"first");
    let (hdr, _) = rq.read_rx_packet(b1.1, b1.2);
    assert_eq!(hdr.op, uapi::VSOCK_OP_RESPONSE);

    // The third buffer is still there for the next packet.
    dev.backend_mut()
        .rx
        .push_back((guest_hdr(uapi::VSOCK_OP_RST, 1024, 1002), vec![]));
    assert!(dev.process_rx(&mem, &mut q).unwrap());
    let used = rq.take_used();
    assert_eq!(used[0].id(), u32::from(b2.0));
    assert_eq!(dev.stats().rx_packets, 3);
}

#[test]
fn rx_waits_for_buffers_without_losing_packets() {
    let mem = test_mem();
    let (mut rq, mut q) = rx_queue(&mem);
    let mut dev = device();
    dev.backend_mut()
        .rx
        .push_back((guest_hdr(uapi::VSOCK_OP_REQUEST, 1 << 30, 1024), vec![]));
    assert!(!dev.process_rx(&mem, &mut q).unwrap());
    assert!(dev.has_pending_rx());
    let b = rq.add_rx_buffer(64);
    assert!(dev.process_rx(&mem, &mut q).unwrap());
    assert!(!dev.has_pending_rx());
    let (hdr, _) = rq.read_rx_packet(b.1, b.2);
    assert_eq!(hdr.op, uapi::VSOCK_OP_REQUEST);
    assert_eq!(hdr.dst_port, 1024);
}

#[test]
fn rx_bad_buffers_are_returned_and_skipped() {
    let mem = test_mem();
    let (mut rq, mut q) = rx_queue(&mem);
    let mut dev = device();
    dev.backend_mut()
        .rx
        .push_back((guest_hdr(uapi::VSOCK_OP_RW, 1024, 1000), b"data".to_vec()));
    // Read-only header descriptor.
    let a = rq.alloc(44);
    let d = rq.alloc(64);
    let bad_ro = rq.add_chain(&[
        TestDesc {
            addr: a,
            len: 44,
            write: false,
        },
        TestDesc {
            addr: d,
            len: 64,
            write: true,
        },
    ]);
    // Header-only chain.
    let a = rq.alloc(44);
    let bad_short = rq.add_chain(&[TestDesc {
        addr: a,
        len: 44,
        write: true,
    }]);
    // Read-only data descriptor.
    let a = rq.alloc(44);
    let d = rq.alloc(64);
    let bad_data = rq.add_chain(&[
        TestDesc {
            addr: a,
            len: 44,
            write: true,
        },
        TestDesc {
            addr: d,
            len: 64,
            write: false,
        },
    ]);
    let good = rq.add_rx_buffer(64);
    assert!(dev.process_rx(&mem, &mut q).unwrap());
    let used: Vec<(u32, u32)> = rq.take_used().iter().map(|u| (u.id(), u.len())).collect();
    assert_eq!(
        used,
        vec![
            (u32::from(bad_ro), 0),
            (u32::from(bad_short), 0),
            (u32::from(bad_data), 0),
            (u32::from(good.0), 48)
        ]
    );
    assert_eq!(dev.stats().rx_bad_buffers, 3);
    assert_eq!(rq.read_rx_packet(good.1, good.2).1, b"data");
}

#[test]
fn rx_payload_is_capped_by_the_buffer() {
    let mem = test_mem();
    let (mut rq, mut q) = rx_queue(&mem);
    let mut dev = device();
    dev.backend_mut()
        .rx
        .push_back((guest_hdr(uapi::VSOCK_OP_RW, 1024, 1000), vec![7u8; 100]));
    let b = rq.add_rx_buffer(16);
    dev.process_rx(&mem, &mut q).unwrap();
    let used = rq.take_used();
    assert_eq!(used[0].len(), 44 + 16);
    assert_eq!(rq.read_rx_packet(b.1, b.2).1, vec![7u8; 16]);
}

#[test]
fn backend_notification_is_forwarded() {
    let mut dev = device();
    dev.notify_backend(EventSet::IN);
    assert_eq!(dev.backend().notified, vec![EventSet::IN]);
}

/// A tiny deterministic PRNG (xorshift64*), so the hostile-guest test needs no extra crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[(self.next() % v.len() as u64) as usize]
    }
}

#[test]
fn hostile_guest_cannot_break_the_device() {
    use crate::devices::virtio::vsock::unix::VsockMuxer;
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};

    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let _l = UnixListener::bind(format!("{}_80", uds.display())).unwrap();
    let mut dev = VsockDevice::new(TEST_GUEST_CID, VsockMuxer::new(&uds).unwrap()).unwrap();
    let mem = test_mem();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut clients = vec![];

    for batch in 0..24u64 {
        // Some host clients too, so packets hit live connections.
        let mut c = UnixStream::connect(&uds).unwrap();
        c.write_all(b"CONNECT 1024\n").unwrap();
        clients.push(c);
        dev.notify_backend(EventSet::IN);

        let mut txq = TestQueue::new(&mem, batch * 0x4000, 0x10_0000 + batch * 0x1_0000, 256);
        let mut q = txq.create_queue();
        let mut rxq = TestQueue::new(&mem, 0x6_0000 + batch * 0x4000, 0x30_0000, 256);
        let mut r = rxq.create_queue();
        for _ in 0..8 {
            rxq.add_rx_buffer(256);
        }
        for _ in 0..100 {
            let hdr = HeaderFields {
                src_cid: rng.pick(&[TEST_GUEST_CID, TEST_GUEST_CID, 0, 2, u64::MAX]),
                dst_cid: rng.pick(&[HOST_CID, HOST_CID, HOST_CID, 3, 1]),
                src_port: rng.pick(&[1000, 1001, 1024, u32::MAX]),
                dst_port: rng.pick(&[80, 81, 1 << 30, (1 << 30) + 1, 0]),
                len: 0,
                type_: rng.pick(&[1, 1, 1, 2, 0xffff]),
                op: (rng.next() % 9) as u16,
                flags: rng.pick(&[0, 1, 2, 3, 0xffff_ffff]),
                buf_alloc: rng.pick(&[0, 1, 4096, u32::MAX]),
                fwd_cnt: rng.next() as u32,
            };
            let data_len = rng.pick(&[0usize, 1, 100, 200]);
            let data = vec![0xa5u8; data_len];
            match rng.next() % 4 {
                // Well-formed chain (fields may still be nonsense).
                0 | 1 => {
                    txq.add_tx_packet(&hdr, &data);
                }
                // Header claims a length the chain does not have.
                2 => {
                    let mut h2 = hdr;
                    h2.len = rng.pick(&[1u32, 300, MAX_PKT_BUF_SIZE + 1, u32::MAX]);
                    let a = txq.alloc(PKT_HEADER_SIZE as u32);
                    mem.write_slice(&h2.to_raw(), vm_memory::GuestAddress(a))
                        .unwrap();
                    txq.add_chain(&[TestDesc {
                        addr: a,
                        len: PKT_HEADER_SIZE as u32,
                        write: false,
                    }]);
                }
                // Wrong permissions or sizes.
                _ => {
                    let a = txq.alloc(PKT_HEADER_SIZE as u32);
                    mem.write_slice(&hdr.to_raw(), vm_memory::GuestAddress(a))
                        .unwrap();
                    txq.add_chain(&[TestDesc {
                        addr: a,
                        len: rng.pick(&[0u32, 8, 44, u32::MAX]),
                        write: rng.next() % 2 == 0,
                    }]);
                }
            }
        }
        dev.process_tx(&mem, &mut q).unwrap();
        dev.notify_backend(EventSet::IN);
        dev.process_rx(&mem, &mut r).unwrap();
        assert_eq!(txq.take_used().len(), 100, "every TX chain is returned");
    }

    // Still healthy: a clean host -> guest connection works end to end.
    let mut rxq = TestQueue::new(&mem, 0xF_0000, 0x38_0000, 1024);
    let mut r = rxq.create_queue();
    let mut txq = TestQueue::new(&mem, 0xE_0000, 0x3C_0000, 256);
    let mut q = txq.create_queue();
    let mut posted = std::collections::HashMap::new();
    for _ in 0..64 {
        let b = rxq.add_rx_buffer(256);
        posted.insert(u32::from(b.0), (b.1, b.2));
    }
    let mut c = UnixStream::connect(&uds).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    c.write_all(b"CONNECT 7777\n").unwrap();
    let mut req = None;
    for _ in 0..200 {
        dev.notify_backend(EventSet::IN);
        dev.process_rx(&mem, &mut r).unwrap();
        for u in rxq.take_used() {
            let (h, d) = posted[&u.id()];
            let (hdr, _) = rxq.read_rx_packet(h, d);
            if hdr.op == uapi::VSOCK_OP_REQUEST && hdr.dst_port == 7777 {
                req = Some(hdr);
            }
            let b = rxq.add_rx_buffer(256);
            posted.insert(u32::from(b.0), (b.1, b.2));
        }
        if req.is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let req = req.expect("REQUEST for the new client");
    txq.add_tx_packet(
        &crate::devices::virtio::vsock::test_utils::guest_hdr(
            uapi::VSOCK_OP_RESPONSE,
            7777,
            req.src_port,
        ),
        &[],
    );
    dev.process_tx(&mem, &mut q).unwrap();
    let mut line = vec![0u8; format!("OK {}\n", req.src_port).len()];
    c.read_exact(&mut line).unwrap();
    assert_eq!(line, format!("OK {}\n", req.src_port).as_bytes());
    drop(clients);
}
