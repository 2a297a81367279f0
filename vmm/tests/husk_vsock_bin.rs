//! Runs the real `husk-vsock` binary. One test plays QEMU *and* the guest driver: it speaks
//! vhost-user to the binary with the `vhost` crate's `Frontend`, shares file-backed "guest"
//! memory with it, and drives the RX/TX virtqueues by hand, while host clients use the hybrid
//! vsock socket. No KVM, no QEMU.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::io::{AsRawFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use husk_vmm::devices::virtio::vsock::defs::{uapi, HOST_CID, RXQ_INDEX, TXQ_INDEX};
use husk_vmm::devices::virtio::vsock::packet::HeaderFields;
use husk_vmm::devices::virtio::vsock::test_utils::TestQueue;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const BIN: &str = env!("CARGO_BIN_EXE_husk-vsock");
const MEM_SIZE: usize = 4 << 20;
const QSIZE: u16 = 256;
const GUEST_CID: u64 = 42;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;

struct Daemon {
    child: Child,
    socket: PathBuf,
    uds: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start() -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vhost-vsock.sock");
        let uds = dir.path().join("vsock.sock");
        let child = Command::new(BIN)
            .arg("--socket")
            .arg(&socket)
            .arg("--uds")
            .arg(&uds)
            .args(["--guest-cid", &GUEST_CID.to_string(), "--log-level", "info"])
            // Set HUSK_TEST_LOG=1 to see the daemon's log.
            .stderr(if std::env::var_os("HUSK_TEST_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .unwrap();
        let d = Daemon {
            child,
            socket,
            uds,
            _dir: dir,
        };
        wait_until(Duration::from_secs(10), || {
            d.socket.exists() && d.uds.exists()
        });
        d
    }

    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "husk-vsock did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_until(within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "condition not met in {within:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Wait for an eventfd to be signalled and consume it.
fn wait_event(ev: &EventFd, within: Duration) {
    // SAFETY: the eventfd outlives this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(ev.as_raw_fd()) };
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    let ms = u16::try_from(within.as_millis()).unwrap_or(u16::MAX);
    let n = poll(&mut fds, PollTimeout::from(ms)).unwrap();
    assert!(n > 0, "no interrupt from the backend");
    ev.read().unwrap();
}

fn run_cmd(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

#[test]
fn bad_arguments_exit_2() {
    let out = run_cmd(&[]);
    assert_eq!(out.status.code(), Some(2));
    let out = run_cmd(&["--socket", "/tmp/a", "--uds", "/tmp/b", "--guest-cid", "2"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("guest-cid"));
    let out = run_cmd(&["--socket", "/tmp/a", "--uds", "/tmp/b", "--bogus"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run_cmd(&["--socket", "/tmp/same", "--uds", "/tmp/same"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run_cmd(&[
        "--socket",
        "/tmp/a",
        "--uds",
        "/tmp/b",
        "--log-level",
        "a=b=c",
    ]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn bind_failures_exit_1_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vhost.sock");
    let missing = dir.path().join("no/such/dir/vsock.sock");
    let out = run_cmd(&[
        "--socket",
        sock.to_str().unwrap(),
        "--uds",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no/such/dir/vsock.sock"), "{err}");
    assert!(!sock.exists());

    // A live listener on the vhost-user path is not stolen.
    let uds = dir.path().join("vsock.sock");
    let _busy = UnixListener::bind(&sock).unwrap();
    let out = run_cmd(&[
        "--socket",
        sock.to_str().unwrap(),
        "--uds",
        uds.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "{err}");
    assert!(
        !uds.exists(),
        "the hybrid socket must be cleaned up on failure"
    );
}

#[test]
fn sigterm_removes_sockets() {
    let mut d = Daemon::start();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(d.wait_exit(Duration::from_secs(5)).success());
    assert!(!d.socket.exists());
    assert!(!d.uds.exists());
}

#[test]
fn exits_when_the_frontend_disconnects() {
    let mut d = Daemon::start();
    let mut fe = Frontend::connect(&d.socket, 3).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    fe.set_features(features).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(pf).unwrap();
    drop(fe);
    assert!(d.wait_exit(Duration::from_secs(5)).success());
    assert!(!d.socket.exists());
    assert!(!d.uds.exists());
}

/// The guest side: shared memory and the two queues.
struct Guest {
    mem: GuestMemoryMmap,
    _file: File,
}

fn shared_memory(dir: &Path) -> Guest {
    let path = dir.join("guest-mem");
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.set_len(MEM_SIZE as u64).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
        GuestAddress(0),
        MEM_SIZE,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    Guest { mem, _file: file }
}

fn hva(mem: &GuestMemoryMmap, gpa: GuestAddress) -> u64 {
    mem.get_host_address(gpa).unwrap() as u64
}

struct Vring {
    kick: EventFd,
    call: EventFd,
}

fn setup_vring(fe: &mut Frontend, mem: &GuestMemoryMmap, q: &TestQueue<'_>, index: usize) -> Vring {
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    let mock = q.mock();
    fe.set_vring_num(index, QSIZE).unwrap();
    fe.set_vring_addr(
        index,
        &VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: hva(mem, mock.desc_table_addr()),
            used_ring_addr: hva(mem, mock.used_addr()),
            avail_ring_addr: hva(mem, mock.avail_addr()),
            log_addr: None,
        },
    )
    .unwrap();
    fe.set_vring_base(index, 0).unwrap();
    fe.set_vring_call(index, &call).unwrap();
    fe.set_vring_kick(index, &kick).unwrap();
    fe.set_vring_enable(index, true).unwrap();
    Vring { kick, call }
}

fn guest_hdr(op: u16, src_port: u32, dst_port: u32) -> HeaderFields {
    HeaderFields {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        type_: uapi::VSOCK_TYPE_STREAM,
        op,
        buf_alloc: 64 * 1024,
        ..Default::default()
    }
}

fn read_line(s: &mut UnixStream) -> String {
    let mut out = vec![];
    let mut b = [0u8; 1];
    while out.last() != Some(&b'\n') {
        assert_eq!(s.read(&mut b).unwrap(), 1);
        out.push(b[0]);
    }
    String::from_utf8(out).unwrap()
}

fn end_to_end(event_idx: bool) {
    let mut d = Daemon::start();
    let guest = shared_memory(d._dir.path());
    let mem = &guest.mem;

    let mut fe = Frontend::connect(&d.socket, 3).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    for f in [
        VIRTIO_F_VERSION_1,
        VHOST_USER_F_PROTOCOL_FEATURES,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
    ] {
        assert_ne!(features & f, 0, "feature {f:#x} not offered");
    }
    let mut acked = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES;
    if event_idx {
        acked |= VIRTIO_RING_F_EVENT_IDX;
    }
    fe.set_features(acked).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    assert!(pf.contains(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ));
    fe.set_protocol_features(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ)
        .unwrap();
    assert_eq!(fe.get_queue_num().unwrap(), 3);
    // QEMU reads the guest CID at realize time.
    let (_, cfg) = fe
        .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
        .unwrap();
    assert_eq!(cfg, GUEST_CID.to_le_bytes());

    let region = mem.iter().next().unwrap();
    let info = VhostUserMemoryRegionInfo {
        guest_phys_addr: region.start_addr().0,
        memory_size: region.len(),
        userspace_addr: region.as_ptr() as u64,
        mmap_offset: 0,
        mmap_handle: guest._file.as_raw_fd(),
    };
    fe.set_mem_table(&[info]).unwrap();

    let mut rxq = TestQueue::new(mem, 0x0, 0x10_0000, QSIZE);
    let mut txq = TestQueue::new(mem, 0x8000, 0x20_0000, QSIZE);
    let rx = setup_vring(&mut fe, mem, &rxq, RXQ_INDEX);
    let tx = setup_vring(&mut fe, mem, &txq, TXQ_INDEX);
    let wait = Duration::from_secs(5);

    // The guest driver posts RX buffers up front, as Linux does.
    let mut rx_bufs = std::collections::VecDeque::new();
    for _ in 0..32 {
        rx_bufs.push_back(rxq.add_rx_buffer(4096));
    }
    rx.kick.write(1).unwrap();

    let mut next_rx = |rxq: &mut TestQueue<'_>| -> (HeaderFields, Vec<u8>) {
        let deadline = Instant::now() + wait;
        loop {
            let used = rxq.take_used();
            if let Some(u) = used.first() {
                assert_eq!(used.len(), 1, "one packet at a time in this test");
                let (head, h, dp) = rx_bufs.pop_front().unwrap();
                assert_eq!(u.id(), u32::from(head));
                let (hdr, data) = rxq.read_rx_packet(h, dp);
                assert_eq!(u.len(), 44 + hdr.len);
                assert_eq!((hdr.src_cid, hdr.dst_cid), (HOST_CID, GUEST_CID));
                return (hdr, data);
            }
            assert!(Instant::now() < deadline, "no RX packet");
            // Like a driver with EVENT_IDX: ask for the next interrupt, then look once more
            // before sleeping.
            rxq.set_used_event(rxq.used_seen());
            if rxq.used_idx() != rxq.used_seen() {
                continue;
            }
            wait_event(&rx.call, wait);
        }
    };
    let send_tx = |txq: &mut TestQueue<'_>, hdr: &HeaderFields, data: &[u8]| {
        let head = txq.add_tx_packet(hdr, data);
        tx.kick.write(1).unwrap();
        let deadline = Instant::now() + wait;
        loop {
            if txq.take_used().iter().any(|u| u.id() == u32::from(head)) {
                return;
            }
            assert!(Instant::now() < deadline, "TX chain not returned");
            txq.set_used_event(txq.used_seen());
            if txq.used_idx() != txq.used_seen() {
                continue;
            }
            wait_event(&tx.call, wait);
        }
    };

    // Host -> guest: CONNECT, REQUEST, RESPONSE, OK.
    let mut client = UnixStream::connect(&d.uds).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    let (req, _) = next_rx(&mut rxq);
    assert_eq!(req.op, uapi::VSOCK_OP_REQUEST);
    assert_eq!(req.dst_port, 1024);
    let local = req.src_port;
    send_tx(
        &mut txq,
        &guest_hdr(uapi::VSOCK_OP_RESPONSE, 1024, local),
        &[],
    );
    assert_eq!(read_line(&mut client), format!("OK {local}\n"));

    // Data both ways.
    client.write_all(b"hello guest").unwrap();
    let (pkt, data) = next_rx(&mut rxq);
    assert_eq!(pkt.op, uapi::VSOCK_OP_RW);
    assert_eq!(data, b"hello guest");
    send_tx(
        &mut txq,
        &guest_hdr(uapi::VSOCK_OP_RW, 1024, local),
        b"hello host",
    );
    let mut buf = [0u8; 10];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello host");

    // Guest -> host: a listener on <uds>_5000.
    let listener = UnixListener::bind(format!("{}_5000", d.uds.display())).unwrap();
    send_tx(
        &mut txq,
        &guest_hdr(uapi::VSOCK_OP_REQUEST, 40000, 5000),
        &[],
    );
    let (resp, _) = next_rx(&mut rxq);
    assert_eq!(resp.op, uapi::VSOCK_OP_RESPONSE);
    assert_eq!((resp.src_port, resp.dst_port), (5000, 40000));
    let (mut host, _) = listener.accept().unwrap();
    send_tx(
        &mut txq,
        &guest_hdr(uapi::VSOCK_OP_RW, 40000, 5000),
        b"to host",
    );
    let mut buf = [0u8; 7];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"to host");

    // No listener in the host: RST.
    send_tx(
        &mut txq,
        &guest_hdr(uapi::VSOCK_OP_REQUEST, 40001, 5001),
        &[],
    );
    let (rst, _) = next_rx(&mut rxq);
    assert_eq!(rst.op, uapi::VSOCK_OP_RST);

    // A hostile packet (bad type) resets only its flow; the daemon lives on.
    let mut bad = guest_hdr(uapi::VSOCK_OP_RW, 1024, local);
    bad.type_ = 9;
    send_tx(&mut txq, &bad, b"x");
    let (rst, _) = next_rx(&mut rxq);
    assert_eq!(rst.op, uapi::VSOCK_OP_RST);
    assert_eq!(rst.src_port, local);
    let mut b = [0u8; 1];
    assert_eq!(client.read(&mut b).unwrap_or(0), 0);

    // QEMU goes away: the daemon exits 0 and removes its sockets.
    drop(fe);
    assert!(d.wait_exit(Duration::from_secs(5)).success());
    assert!(!d.socket.exists());
    assert!(!d.uds.exists());
}

#[test]
fn end_to_end_without_event_idx() {
    end_to_end(false);
}

#[test]
fn end_to_end_with_event_idx() {
    end_to_end(true);
}
