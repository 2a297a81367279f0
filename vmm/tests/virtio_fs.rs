//! husk-vmm's virtio-fs device (vhost-user frontend) against a real virtiofsd, with no KVM and
//! no Linux guest: the test plays the guest driver on the virtio-mmio registers and puts real
//! FUSE requests (INIT, LOOKUP, OPEN, READ) in the request queue's rings in memfd guest memory.
//! virtiofsd reads them out of that memory, answers into it, and signals the call eventfd, which
//! the device turns into the virtio-mmio interrupt.
//!
//! Skips (with a printed reason) only when virtiofsd is not installed; with virtiofsd present,
//! every failure is a test failure.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use husk_vmm::devices::legacy::EventFdTrigger;
use husk_vmm::devices::virtio::fs::defs::REQUEST_QUEUE;
use husk_vmm::devices::virtio::fs::test_utils::{
    driver_bring_up, find_virtiofsd, fuse_in_header, fuse_init_request, memfd_mem, r32, w32,
    FuseOutHeader, Rings, Virtiofsd,
};
use husk_vmm::devices::virtio::fs::Fs;
use husk_vmm::devices::virtio::mmio::{defs as mmio, MmioTransport};
use husk_vmm::devices::virtio::vsock::test_utils::{TestDesc, TestQueue};
use husk_vmm::devices::virtio::{GuestMem, VirtioInterrupt};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vm_memory::{Bytes, GuestAddress};

const FUSE_LOOKUP: u32 = 1;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_ROOT_ID: u64 = 1;
/// High RAM, as husk-vmm places it above the 4 GiB boundary: replies land there.
const HIGH: u64 = 0x1_0000_0000;
const CONTENT: &[u8] = b"hello from the host, through virtiofsd, into guest memory\n";

/// Shared dir, socket and virtiofsd; `None` (after printing why) when virtiofsd is absent.
fn setup(test: &str) -> Option<(tempfile::TempDir, PathBuf, Virtiofsd)> {
    let Some(bin) = find_virtiofsd() else {
        eprintln!(
            "SKIP {test}: virtiofsd is not installed (cargo install virtiofsd, or HUSK_VIRTIOFSD)"
        );
        return None;
    };
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join("hello.txt"), CONTENT).unwrap();
    let sock = tmp.path().join("virtiofs.sock");
    let fsd = Virtiofsd::start(&bin, &shared, &sock);
    Some((tmp, sock, fsd))
}

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

/// The guest side: memory, the two queues, and where replies go.
struct Driver<'a> {
    mem: &'a GuestMem,
    hiprio: TestQueue<'a>,
    req: TestQueue<'a>,
    next_reply: u64,
}

impl<'a> Driver<'a> {
    fn new(mem: &'a GuestMem, base: u64) -> Driver<'a> {
        Driver {
            mem,
            hiprio: TestQueue::new(mem, base, base + 0x8_0000, 16),
            req: TestQueue::new(mem, base + 0x1_0000, base + 0xc_0000, 128),
            next_reply: HIGH + base,
        }
    }

    fn rings(&self) -> [Rings; 2] {
        [(&self.hiprio, 16), (&self.req, 128)].map(|(q, size)| {
            let m = q.mock();
            Rings {
                size,
                desc: m.desc_table_addr().0,
                avail: m.avail_addr().0,
                used: m.used_addr().0,
            }
        })
    }

    /// Send `request` on the request queue, kick, wait for the interrupt and the used element;
    /// return the reply bytes as the device reported them.
    fn roundtrip(
        &mut self,
        t: &mut MmioTransport,
        line: &EventFdTrigger,
        request: &[u8],
    ) -> Vec<u8> {
        let addr = self.req.alloc(request.len() as u32);
        self.mem.write_slice(request, GuestAddress(addr)).unwrap();
        let reply = self.next_reply;
        self.next_reply += 0x2000;
        self.mem
            .write_slice(&[0xaa; 4096], GuestAddress(reply))
            .unwrap();
        let head = self.req.add_chain(&[
            TestDesc {
                addr,
                len: request.len() as u32,
                write: false,
            },
            TestDesc {
                addr: reply,
                len: 4096,
                write: true,
            },
        ]);
        // EVENT_IDX (when negotiated): ask for an interrupt for this very buffer.
        self.req.set_used_event(self.req.used_seen());
        w32(t, mmio::QUEUE_NOTIFY, REQUEST_QUEUE as u32);
        wait_line(line, Duration::from_secs(10));
        assert_eq!(r32(t, mmio::INTERRUPT_STATUS) & 1, 1, "used-ring ISR bit");
        w32(t, mmio::INTERRUPT_ACK, 1);
        let used = self.req.take_used();
        assert_eq!(used.len(), 1, "one answer per request");
        assert_eq!(used[0].id(), u32::from(head));
        let len = used[0].len() as usize;
        assert!((16..=4096).contains(&len), "used length {len}");
        let mut out = vec![0u8; len];
        self.mem.read_slice(&mut out, GuestAddress(reply)).unwrap();
        out
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// FUSE_INIT, then read `hello.txt` with LOOKUP, OPEN and READ; check every reply.
fn init_and_read_file(
    d: &mut Driver<'_>,
    t: &mut MmioTransport,
    line: &EventFdTrigger,
    unique: u64,
) {
    let out = d.roundtrip(t, line, &fuse_init_request(unique));
    let h = FuseOutHeader::parse(&out).unwrap();
    assert_eq!((h.error, h.unique), (0, unique), "FUSE_INIT reply {h:?}");
    assert_eq!(h.len as usize, out.len(), "header length = used length");
    assert!(out.len() >= 16 + 24, "fuse_init_out: {} bytes", out.len());
    assert_eq!(u32_at(&out, 16), 7, "FUSE major version");
    assert!(u32_at(&out, 20) >= 27, "FUSE minor {}", u32_at(&out, 20));

    let name = b"hello.txt\0";
    let mut lookup = fuse_in_header(FUSE_LOOKUP, unique + 1, FUSE_ROOT_ID, name.len());
    lookup.extend_from_slice(name);
    let out = d.roundtrip(t, line, &lookup);
    let h = FuseOutHeader::parse(&out).unwrap();
    assert_eq!((h.error, h.unique), (0, unique + 1), "LOOKUP {h:?}");
    // fuse_entry_out: nodeid, generation, entry_valid, attr_valid, 2 × nsec, then fuse_attr
    // (ino, size, ...).
    let nodeid = u64_at(&out, 16);
    assert_ne!(nodeid, 0);
    assert_eq!(
        u64_at(&out, 16 + 48),
        CONTENT.len() as u64,
        "size of hello.txt"
    );

    let mut open = fuse_in_header(FUSE_OPEN, unique + 2, nodeid, 8);
    open.extend_from_slice(&(libc::O_RDONLY as u32).to_le_bytes());
    open.extend_from_slice(&0u32.to_le_bytes());
    let out = d.roundtrip(t, line, &open);
    let h = FuseOutHeader::parse(&out).unwrap();
    assert_eq!((h.error, h.unique), (0, unique + 2), "OPEN {h:?}");
    let fh = u64_at(&out, 16);

    let mut read = fuse_in_header(FUSE_READ, unique + 3, nodeid, 40);
    read.extend_from_slice(&fh.to_le_bytes());
    read.extend_from_slice(&0u64.to_le_bytes()); // offset
    read.extend_from_slice(&4000u32.to_le_bytes()); // size
    read.extend_from_slice(&[0u8; 20]); // read_flags, lock_owner, flags, padding
    let out = d.roundtrip(t, line, &read);
    let h = FuseOutHeader::parse(&out).unwrap();
    assert_eq!((h.error, h.unique), (0, unique + 3), "READ {h:?}");
    assert_eq!(&out[16..], CONTENT, "the file's bytes, in guest memory");
}

#[test]
fn virtiofsd_serves_fuse_requests_from_guest_memory() {
    let Some((_tmp, sock, mut fsd)) = setup("virtiofsd_serves_fuse_requests_from_guest_memory")
    else {
        return;
    };
    // Two regions of one memfd at different file offsets, as husk-vmm lays out RAM around
    // the MMIO gap.
    let mem = Arc::new(memfd_mem(&[(0, 4 << 20), (HIGH, 4 << 20)]));
    let line = EventFdTrigger::new().unwrap();
    let dev = Fs::new(&sock, "husk").expect("connect to virtiofsd");
    assert_eq!(dev.frontend().guest_features() & (1 << 32), 1 << 32);
    let mut t = MmioTransport::new(
        Box::new(dev),
        mem.clone(),
        Arc::new(VirtioInterrupt::new(line.clone())),
    );
    assert_eq!(r32(&mut t, mmio::DEVICE_ID), 26);

    for round in 0..2u64 {
        // Fresh rings each round, as a new driver after a reset would set up.
        let mut d = Driver::new(&mem, round * 0x20_0000);
        let mut offered = 0;
        w32(&mut t, mmio::DEVICE_FEATURES_SEL, 1);
        offered |= u64::from(r32(&mut t, mmio::DEVICE_FEATURES)) << 32;
        w32(&mut t, mmio::DEVICE_FEATURES_SEL, 0);
        offered |= u64::from(r32(&mut t, mmio::DEVICE_FEATURES));
        // Like Linux: take everything offered (VERSION_1, INDIRECT_DESC, EVENT_IDX).
        let (_, status) = driver_bring_up(&mut t, offered, &d.rings());
        assert_eq!(status, 0xf, "DRIVER_OK accepted in round {round}");
        init_and_read_file(&mut d, &mut t, &line, 100 * (round + 1));
        // Driver reset: rings stopped (GET_VRING_BASE) and virtiofsd's FUSE session reset
        // (RESET_DEVICE), so the next round's FUSE_INIT starts a new session.
        w32(&mut t, mmio::STATUS, 0);
        assert!(!t.is_activated());
    }
    // The VMM goes away: virtiofsd sees the hang-up and exits cleanly.
    drop(t);
    let st = fsd.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "virtiofsd: {st}");
}

#[test]
fn dead_virtiofsd_costs_the_device_not_the_vmm() {
    let Some((_tmp, sock, mut fsd)) = setup("dead_virtiofsd_costs_the_device_not_the_vmm") else {
        return;
    };
    let mem = Arc::new(memfd_mem(&[(0, 4 << 20), (HIGH, 4 << 20)]));
    let line = EventFdTrigger::new().unwrap();
    let mut t = MmioTransport::new(
        Box::new(Fs::new(&sock, "husk").unwrap()),
        mem.clone(),
        Arc::new(VirtioInterrupt::new(line.clone())),
    );
    let mut d = Driver::new(&mem, 0);
    let (_, status) = driver_bring_up(&mut t, 1 << 32, &d.rings());
    assert_eq!(status, 0xf);
    let out = d.roundtrip(&mut t, &line, &fuse_init_request(1));
    assert_eq!(FuseOutHeader::parse(&out).unwrap().error, 0);

    fsd.kill();
    // Kicks into the void, a reset and a new start: errors, quickly, never a panic or a hang.
    w32(&mut t, mmio::QUEUE_NOTIFY, REQUEST_QUEUE as u32);
    let start = Instant::now();
    w32(&mut t, mmio::STATUS, 0);
    let d = Driver::new(&mem, 0x20_0000);
    let (_, status) = driver_bring_up(&mut t, 1 << 32, &d.rings());
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        status & mmio::STATUS_DRIVER_OK,
        0,
        "no DRIVER_OK without a backend"
    );
    assert_ne!(
        status & mmio::STATUS_DEVICE_NEEDS_RESET,
        0,
        "DEVICE_NEEDS_RESET"
    );
    assert!(!t.is_activated());
}

/// Prints the round-trip time of a FUSE request through the device and virtiofsd (kick eventfd
/// → virtiofsd → used ring → call eventfd → interrupt thread → ISR + irqfd), as the guest would
/// see it minus the exits.
#[test]
fn fuse_round_trip_time() {
    let Some((_tmp, sock, _fsd)) = setup("fuse_round_trip_time") else {
        return;
    };
    let mem = Arc::new(memfd_mem(&[(0, 4 << 20), (HIGH, 4 << 20)]));
    let line = EventFdTrigger::new().unwrap();
    let mut t = MmioTransport::new(
        Box::new(Fs::new(&sock, "husk").unwrap()),
        mem.clone(),
        Arc::new(VirtioInterrupt::new(line.clone())),
    );
    let mut d = Driver::new(&mem, 0);
    let (_, status) = driver_bring_up(&mut t, 1 << 32, &d.rings());
    assert_eq!(status, 0xf);
    d.roundtrip(&mut t, &line, &fuse_init_request(1));
    const FUSE_GETATTR: u32 = 3;
    let mut times = Vec::new();
    for i in 0..50u64 {
        let mut req = fuse_in_header(FUSE_GETATTR, 10 + i, FUSE_ROOT_ID, 16);
        req.extend_from_slice(&[0u8; 16]); // fuse_getattr_in
        let start = Instant::now();
        let out = d.roundtrip(&mut t, &line, &req);
        times.push(start.elapsed());
        let h = FuseOutHeader::parse(&out).unwrap();
        assert_eq!((h.error, h.unique), (0, 10 + i), "GETATTR {h:?}");
        // fuse_attr_out: attr_valid, attr_valid_nsec, dummy, then fuse_attr; mode at 60.
        let mode = u32_at(&out, 16 + 16 + 60);
        assert_eq!(
            mode & libc::S_IFMT,
            libc::S_IFDIR,
            "the root is a directory"
        );
    }
    times.sort();
    eprintln!(
        "FUSE GETATTR round trip through the device: median {:?}, p90 {:?} (50 requests)",
        times[times.len() / 2],
        times[times.len() * 9 / 10]
    );
}
