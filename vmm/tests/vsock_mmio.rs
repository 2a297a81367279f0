//! The in-process vsock device behind husk-vmm's virtio-mmio transport, with no KVM: the test
//! plays the guest driver (register writes, rings in test guest memory) and a host client on the
//! hybrid vsock socket, and runs the event-loop step (poll the muxer fd, then
//! `handle_backend_event`) itself.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use husk_vmm::devices::bus::BusDevice;
use husk_vmm::devices::legacy::EventFdTrigger;
use husk_vmm::devices::virtio::mmio::{defs, MmioTransport};
use husk_vmm::devices::virtio::vsock::defs::uapi;
use husk_vmm::devices::virtio::vsock::test_utils::{guest_hdr, test_mem, TestQueue, BUF_BASE};
use husk_vmm::devices::virtio::vsock::virtio_mmio::{VsockMmioDevice, VsockShared};
use husk_vmm::devices::virtio::vsock::{VsockDevice, VsockMuxer};
use husk_vmm::devices::virtio::VirtioInterrupt;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vmm_sys_util::epoll::EventSet;

fn w32(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn r32(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

/// One turn of the VMM event loop for the vsock device: wait for the muxer fd, let it work.
fn pump(shared: &VsockShared, timeout: Duration) {
    let fd = shared.lock().unwrap().backend_fd();
    // SAFETY: the muxer owns the fd and outlives this call.
    let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
    let mut fds = [PollFd::new(bfd, PollFlags::POLLIN)];
    let ms = PollTimeout::try_from(timeout.as_millis() as i32).unwrap();
    if poll(&mut fds, ms).unwrap() > 0 {
        shared.lock().unwrap().handle_backend_event(EventSet::IN);
    }
}

#[test]
fn vsock_over_virtio_mmio_connects_host_to_guest_and_moves_data() {
    let mem = Arc::new(test_mem());
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    let dev = VsockMmioDevice::new(VsockDevice::new(3, VsockMuxer::new(&uds).unwrap()).unwrap());
    let shared = dev.shared();
    let line = EventFdTrigger::new().unwrap();
    let irq = Arc::new(VirtioInterrupt::new(line.clone()));
    let mut t = MmioTransport::new(Box::new(dev), mem.clone(), irq.clone());

    assert_eq!(r32(&mut t, defs::DEVICE_ID), 19);
    assert_eq!(r32(&mut t, defs::CONFIG_SPACE), 3, "guest_cid low");
    assert_eq!(r32(&mut t, defs::CONFIG_SPACE + 4), 0, "guest_cid high");

    // Driver: negotiate VERSION_1 only, three queues of 16, DRIVER_OK.
    w32(&mut t, defs::STATUS, 1);
    w32(&mut t, defs::STATUS, 3);
    w32(&mut t, defs::DRIVER_FEATURES_SEL, 1);
    w32(&mut t, defs::DRIVER_FEATURES, 1);
    w32(&mut t, defs::STATUS, 0xb);
    assert_eq!(r32(&mut t, defs::STATUS), 0xb);
    let mut rxq = TestQueue::new(&mem, 0x0, BUF_BASE, 16);
    let mut txq = TestQueue::new(&mem, 0x4000, BUF_BASE + 0x8_0000, 16);
    let evq = TestQueue::new(&mem, 0x8000, BUF_BASE + 0x10_0000, 16);
    for (i, q) in [&rxq, &txq, &evq].into_iter().enumerate() {
        let m = q.mock();
        w32(&mut t, defs::QUEUE_SEL, i as u32);
        assert_eq!(r32(&mut t, defs::QUEUE_NUM_MAX), 256);
        w32(&mut t, defs::QUEUE_NUM, 16);
        w32(&mut t, defs::QUEUE_DESC_LOW, m.desc_table_addr().0 as u32);
        w32(&mut t, defs::QUEUE_AVAIL_LOW, m.avail_addr().0 as u32);
        w32(&mut t, defs::QUEUE_USED_LOW, m.used_addr().0 as u32);
        w32(&mut t, defs::QUEUE_READY, 1);
    }
    w32(&mut t, defs::STATUS, 0xf);
    assert_eq!(r32(&mut t, defs::STATUS), 0xf);
    assert!(t.is_activated());

    let (_, h0, _) = rxq.add_rx_buffer(4096);
    let (_, h1, d1) = rxq.add_rx_buffer(4096);
    w32(&mut t, defs::QUEUE_NOTIFY, 0);

    // Host: CONNECT 1024 → the guest sees a REQUEST.
    let mut client = UnixStream::connect(&uds).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while rxq.used_idx() < 1 {
        assert!(Instant::now() < deadline, "no REQUEST for the guest");
        pump(&shared, Duration::from_millis(100));
    }
    let (req, _) = rxq.read_rx_packet(h0, 0);
    assert_eq!(req.op, uapi::VSOCK_OP_REQUEST);
    assert_eq!((req.dst_port, req.dst_cid, req.src_cid), (1024, 3, 2));
    let host_port = req.src_port;
    assert_ne!(r32(&mut t, defs::INTERRUPT_STATUS) & 1, 0);
    w32(&mut t, defs::INTERRUPT_ACK, 1);

    // Guest: RESPONSE, then data.
    txq.add_tx_packet(&guest_hdr(uapi::VSOCK_OP_RESPONSE, 1024, host_port), &[]);
    txq.add_tx_packet(&guest_hdr(uapi::VSOCK_OP_RW, 1024, host_port), b"hello");
    w32(&mut t, defs::QUEUE_NOTIFY, 1);
    assert_eq!(txq.used_idx(), 2);
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut ok = String::new();
    reader.read_line(&mut ok).unwrap();
    assert_eq!(ok, format!("OK {host_port}\n"));
    let mut hello = [0u8; 5];
    reader.read_exact(&mut hello).unwrap();
    assert_eq!(&hello, b"hello");

    // Host data reaches the guest's next RX buffer.
    client.write_all(b"world").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while rxq.used_idx() < 2 {
        assert!(Instant::now() < deadline, "no data for the guest");
        pump(&shared, Duration::from_millis(100));
    }
    let (rw, data) = rxq.read_rx_packet(h1, d1);
    assert_eq!(
        (rw.op, rw.src_port, rw.dst_port),
        (uapi::VSOCK_OP_RW, host_port, 1024)
    );
    assert_eq!(data, b"world");
    assert!(line.0.read().unwrap() >= 1, "the interrupt line fired");

    // A driver reset drops the queues; the socket goes away with the device.
    w32(&mut t, defs::STATUS, 0);
    assert!(!t.is_activated());
    drop(t);
    drop(shared);
    assert!(!uds.exists());
}
