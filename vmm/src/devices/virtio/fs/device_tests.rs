use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::legacy::EventFdTrigger;
use crate::devices::virtio::fs::defs::{CONFIG_SIZE, HIPRIO_QUEUE, REQUEST_QUEUE, TAG_LEN};
use crate::devices::virtio::fs::test_utils::*;
use crate::devices::virtio::mmio::{defs as mmio, MmioTransport};
use crate::devices::virtio::vsock::test_utils::{TestDesc, TestQueue};

const VERSION_1: u64 = 1 << 32;

/// Wait for the interrupt line (an eventfd) and consume it.
fn wait_line(line: &EventFdTrigger, within: Duration) {
    // SAFETY: the eventfd outlives this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(line.0.as_raw_fd()) };
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    let ms = PollTimeout::try_from(within.as_millis() as i32).unwrap();
    assert!(
        poll(&mut fds, ms).unwrap() > 0,
        "no interrupt within {within:?}"
    );
    line.0.read().unwrap();
}

fn wait_used(q: &TestQueue<'_>, idx: u16) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while q.used_idx() < idx {
        assert!(Instant::now() < deadline, "used idx stays {}", q.used_idx());
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn rings(q: &TestQueue<'_>, size: u16) -> Rings {
    let m = q.mock();
    Rings {
        size,
        desc: m.desc_table_addr().0,
        avail: m.avail_addr().0,
        used: m.used_addr().0,
    }
}

/// Post a FUSE request (readable) and a reply buffer (writable) on `q`.
fn post(q: &mut TestQueue<'_>, mem: &GuestMem, request: &[u8], reply_len: u32) -> (u16, u64) {
    let req = q.alloc(request.len() as u32);
    mem.write_slice(request, GuestAddress(req)).unwrap();
    let reply = q.alloc(reply_len);
    let head = q.add_chain(&[
        TestDesc {
            addr: req,
            len: request.len() as u32,
            write: false,
        },
        TestDesc {
            addr: reply,
            len: reply_len,
            write: true,
        },
    ]);
    (head, reply)
}

#[test]
fn config_space_and_identity_over_mmio() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fs.sock");
    let server = FakeFsServer::start(&sock, FakeFsConfig::default());
    let mem = Arc::new(memfd_mem(&[(0, 4 << 20)]));
    let line = EventFdTrigger::new().unwrap();
    let dev = Fs::new(&sock, "husk").unwrap();
    let mut t = MmioTransport::new(
        Box::new(dev),
        mem,
        Arc::new(VirtioInterrupt::new(line.clone())),
    );
    assert_eq!(r32(&mut t, mmio::DEVICE_ID), 26);
    let mut cfg = [0xffu8; CONFIG_SIZE + 4];
    t.read(mmio::CONFIG_SPACE, &mut cfg);
    assert_eq!(&cfg[..4], b"husk");
    assert!(cfg[4..TAG_LEN].iter().all(|&b| b == 0));
    assert_eq!(&cfg[TAG_LEN..CONFIG_SIZE], &[1, 0, 0, 0]);
    assert_eq!(
        &cfg[CONFIG_SIZE..],
        &[0, 0, 0, 0],
        "past the end reads zero"
    );
    // The space is read-only.
    w32(&mut t, mmio::STATUS, 3);
    t.write(mmio::CONFIG_SPACE, b"evil");
    let mut tag = [0u8; 4];
    t.read(mmio::CONFIG_SPACE, &mut tag);
    assert_eq!(&tag, b"husk");
    w32(&mut t, mmio::QUEUE_SEL, 1);
    assert_eq!(r32(&mut t, mmio::QUEUE_NUM_MAX), 1024);
    w32(&mut t, mmio::QUEUE_SEL, 2);
    assert_eq!(r32(&mut t, mmio::QUEUE_NUM_MAX), 0, "two queues only");
    drop(t);
    server.join();
}

#[test]
fn bad_tag_fails_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let e = Fs::new(&dir.path().join("none.sock"), "").unwrap_err();
    assert!(matches!(e, FsError::InvalidTag(_)), "{e}");
}

#[test]
fn requests_reach_the_backend_and_replies_raise_the_interrupt_across_resets() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fs.sock");
    let server = FakeFsServer::start(&sock, FakeFsConfig::default());
    let mem = Arc::new(memfd_mem(&[(0, 4 << 20)]));
    let line = EventFdTrigger::new().unwrap();
    let mut t = MmioTransport::new(
        Box::new(Fs::new(&sock, "husk").unwrap()),
        mem.clone(),
        Arc::new(VirtioInterrupt::new(line.clone())),
    );

    for round in 0..2u64 {
        let base = round * 0x10_0000;
        let mut hiprio = TestQueue::new(&mem, base, base + 0x8_0000, 16);
        let mut req = TestQueue::new(&mem, base + 0x1_0000, base + 0xa_0000, 64);
        let (offered, status) =
            driver_bring_up(&mut t, VERSION_1, &[rings(&hiprio, 16), rings(&req, 64)]);
        assert_eq!(offered, (1 << 32) | (1 << 28) | (1 << 29));
        assert_eq!(status, 0xf, "DRIVER_OK accepted (round {round})");

        let unique = 7 + round;
        let (head, reply) = post(&mut req, &mem, &fuse_init_request(unique), 256);
        w32(&mut t, mmio::QUEUE_NOTIFY, REQUEST_QUEUE as u32);
        wait_line(&line, Duration::from_secs(5));
        wait_used(&req, 1);
        let used = req.take_used();
        assert_eq!((used[0].id(), used[0].len()), (u32::from(head), 80));
        let mut out = [0u8; 80];
        mem.read_slice(&mut out, GuestAddress(reply)).unwrap();
        let h = FuseOutHeader::parse(&out).unwrap();
        assert_eq!((h.len, h.error, h.unique), (80, 0, unique));
        assert_eq!(
            &out[16..24],
            &[7, 0, 0, 0, 38, 0, 0, 0],
            "fuse_init_out 7.38"
        );
        // The line may have fired for an earlier round's reply: poll the
        // status bit itself.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while r32(&mut t, mmio::INTERRUPT_STATUS) & 1 != 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "no used-buffer interrupt"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        w32(&mut t, mmio::INTERRUPT_ACK, 1);

        // The hiprio queue works too.
        post(
            &mut hiprio,
            &mem,
            &fuse_in_header(FUSE_GETATTR, 99, 1, 0),
            64,
        );
        w32(&mut t, mmio::QUEUE_NOTIFY, HIPRIO_QUEUE as u32);
        wait_used(&hiprio, 1);

        let log = server.log();
        assert_eq!(log.acked_features.last(), Some(&(VERSION_1 | (1 << 30))));
        assert_eq!(
            &log.requests[log.requests.len() - 2..],
            &[(1, FUSE_INIT, unique), (0, FUSE_GETATTR, 99)]
        );
        // Driver reset: rings stopped, backend state reset; a new driver can start over.
        w32(&mut t, mmio::STATUS, 0);
        assert!(!t.is_activated());
        assert_eq!(server.log().resets, round as u32 + 1);
    }
    drop(t);
    server.join();
}

fn queue(size: u16, desc: u64, avail: u64, used: u64, ready: bool) -> Queue {
    let mut q = Queue::new(size.max(16)).unwrap();
    q.try_set_size(size).unwrap();
    q.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
    q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
    q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    q.set_ready(ready);
    q
}

#[test]
fn hostile_queue_layouts_are_refused_before_the_backend_hears_of_them() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fs.sock");
    let server = FakeFsServer::start(&sock, FakeFsConfig::default());
    let mem = Arc::new(memfd_mem(&[(0, 1 << 20), (0x1000_0000, 1 << 20)]));
    let irq = Arc::new(VirtioInterrupt::new(EventFdTrigger::new().unwrap()));
    let mut dev = Fs::new(&sock, "husk").unwrap();
    dev.ack_features(VERSION_1);
    let good = || queue(16, 0x1000, 0x2000, 0x3000, true);
    let cases: Vec<(Vec<Queue>, &str)> = vec![
        (vec![good()], "expects 2 queues"),
        (
            vec![good(), queue(16, 0x4000, 0x5000, 0x6000, false)],
            "not ready",
        ),
        // Used ring straddles the end of the first region.
        (
            vec![good(), queue(64, 0x4000, 0x5000, (1 << 20) - 0x100, true)],
            "one guest memory region",
        ),
        (
            vec![good(), queue(16, 0x20_0000, 0x5000, 0x6000, true)],
            "outside guest memory",
        ),
        // Descriptor table runs past the end of RAM.
        (
            vec![good(), queue(16, (1 << 20) - 0x80, 0x5000, 0x6000, true)],
            "one guest memory region",
        ),
        (
            vec![good(), queue(2048, 0x4000, 0x1_0000, 0x2_0000, true)],
            "size 2048",
        ),
    ];
    for (queues, why) in cases {
        let e = dev.activate(mem.clone(), queues, irq.clone()).unwrap_err();
        assert!(e.to_string().contains(why), "{why}: {e}");
        assert!(!dev.is_active());
    }
    assert!(
        server.log().acked_features.is_empty(),
        "nothing reached the backend"
    );
    // After all that, a good layout still starts.
    dev.activate(
        mem.clone(),
        vec![
            good(),
            queue(16, 0x1000_0000, 0x1000_1000, 0x1000_2000, true),
        ],
        irq.clone(),
    )
    .unwrap();
    assert!(dev.is_active());
    assert_eq!(dev.frontend().started_queues(), &[0, 1]);
    dev.reset();
    assert!(!dev.is_active());
    drop(dev);
    server.join();
}
