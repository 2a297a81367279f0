//! Test doubles for the virtio-fs device (feature `test-utils`): memfd-backed guest memory (what
//! a vhost-user backend needs), FUSE request/reply bytes, a guest driver for the virtio-mmio
//! registers, a fake vhost-user-fs backend that answers every request itself, and a real
//! virtiofsd started the way husk-runtime starts it.

use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::defs::{NUM_QUEUES, VHOST_USER_F_PROTOCOL_FEATURES};
use crate::devices::bus::{lock, BusDevice};
use crate::devices::virtio::mmio::defs as mmio;
use crate::devices::virtio::GuestMem;

/// Guest memory in one memfd, like husk-vmm's: `ranges` are `(guest address, length)`, laid out
/// one after the other in the file.
pub fn memfd_mem(ranges: &[(u64, usize)]) -> GuestMem {
    let fd = nix::sys::memfd::memfd_create(
        c"husk-test-guest-ram",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .expect("memfd_create");
    let file = File::from(fd);
    let total: usize = ranges.iter().map(|r| r.1).sum();
    file.set_len(total as u64).expect("size the memfd");
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for &(start, len) in ranges {
        let f = file.try_clone().expect("dup memfd");
        regions.push((GuestAddress(start), len, Some(FileOffset::new(f, offset))));
        offset += len as u64;
    }
    GuestMemoryMmap::from_ranges_with_files(&regions).expect("memfd guest memory")
}

/// FUSE opcode of INIT.
pub const FUSE_INIT: u32 = 26;
/// FUSE opcode of GETATTR.
pub const FUSE_GETATTR: u32 = 3;
/// Size of `fuse_in_header`.
pub const FUSE_IN_HEADER_LEN: usize = 40;
/// Size of `fuse_out_header`.
pub const FUSE_OUT_HEADER_LEN: usize = 16;
/// Size of `fuse_init_in` (protocol 7.36 and later).
pub const FUSE_INIT_IN_LEN: usize = 64;
/// The FUSE kernel protocol version the test requests speak.
pub const FUSE_MAJOR: u32 = 7;
/// Minor version of [`FUSE_MAJOR`].
pub const FUSE_MINOR: u32 = 38;

/// A `fuse_in_header` for `opcode` with `body_len` bytes after it.
pub fn fuse_in_header(opcode: u32, unique: u64, nodeid: u64, body_len: usize) -> Vec<u8> {
    let mut h = Vec::with_capacity(FUSE_IN_HEADER_LEN);
    h.extend_from_slice(&((FUSE_IN_HEADER_LEN + body_len) as u32).to_le_bytes());
    h.extend_from_slice(&opcode.to_le_bytes());
    h.extend_from_slice(&unique.to_le_bytes());
    h.extend_from_slice(&nodeid.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes()); // uid
    h.extend_from_slice(&0u32.to_le_bytes()); // gid
    h.extend_from_slice(&1u32.to_le_bytes()); // pid
    h.extend_from_slice(&0u16.to_le_bytes()); // total_extlen
    h.extend_from_slice(&0u16.to_le_bytes()); // padding
    h
}

/// The bytes of a FUSE_INIT request as the Linux driver sends it.
pub fn fuse_init_request(unique: u64) -> Vec<u8> {
    let mut r = fuse_in_header(FUSE_INIT, unique, 0, FUSE_INIT_IN_LEN);
    let mut body = [0u8; FUSE_INIT_IN_LEN];
    body[0..4].copy_from_slice(&FUSE_MAJOR.to_le_bytes());
    body[4..8].copy_from_slice(&FUSE_MINOR.to_le_bytes());
    body[8..12].copy_from_slice(&(128u32 * 1024).to_le_bytes()); // max_readahead
    r.extend_from_slice(&body);
    r
}

/// A `fuse_out_header`: total length, error (0 or a negative errno) and the request's unique.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FuseOutHeader {
    /// Length of the whole reply.
    pub len: u32,
    /// 0 or `-errno`.
    pub error: i32,
    /// The request it answers.
    pub unique: u64,
}

impl FuseOutHeader {
    /// Parse the first 16 bytes of a reply.
    pub fn parse(b: &[u8]) -> Option<FuseOutHeader> {
        let b = b.get(..FUSE_OUT_HEADER_LEN)?;
        Some(FuseOutHeader {
            len: u32::from_le_bytes(b[0..4].try_into().ok()?),
            error: i32::from_le_bytes(b[4..8].try_into().ok()?),
            unique: u64::from_le_bytes(b[8..16].try_into().ok()?),
        })
    }

    /// The header's bytes.
    pub fn to_bytes(self) -> [u8; FUSE_OUT_HEADER_LEN] {
        let mut b = [0u8; FUSE_OUT_HEADER_LEN];
        b[0..4].copy_from_slice(&self.len.to_le_bytes());
        b[4..8].copy_from_slice(&self.error.to_le_bytes());
        b[8..16].copy_from_slice(&self.unique.to_le_bytes());
        b
    }
}

/// Write a 32-bit virtio-mmio register as the guest would.
pub fn w32(t: &mut dyn BusDevice, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

/// Read a 32-bit virtio-mmio register as the guest would.
pub fn r32(t: &mut dyn BusDevice, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// Guest addresses of one split queue's rings.
#[derive(Clone, Copy, Debug)]
pub struct Rings {
    /// Queue size.
    pub size: u16,
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
}

/// Play the Linux driver up to DRIVER_OK: ACKNOWLEDGE, DRIVER, the 64-bit feature words,
/// FEATURES_OK, each queue's size and rings, QueueReady, DRIVER_OK. Returns the device features
/// read and the final status.
pub fn driver_bring_up(
    t: &mut dyn BusDevice,
    driver_features: u64,
    queues: &[Rings],
) -> (u64, u32) {
    w32(t, mmio::STATUS, mmio::STATUS_ACKNOWLEDGE);
    w32(
        t,
        mmio::STATUS,
        mmio::STATUS_ACKNOWLEDGE | mmio::STATUS_DRIVER,
    );
    w32(t, mmio::DEVICE_FEATURES_SEL, 0);
    let lo = r32(t, mmio::DEVICE_FEATURES);
    w32(t, mmio::DEVICE_FEATURES_SEL, 1);
    let hi = r32(t, mmio::DEVICE_FEATURES);
    let offered = u64::from(lo) | (u64::from(hi) << 32);
    w32(t, mmio::DRIVER_FEATURES_SEL, 0);
    w32(t, mmio::DRIVER_FEATURES, driver_features as u32);
    w32(t, mmio::DRIVER_FEATURES_SEL, 1);
    w32(t, mmio::DRIVER_FEATURES, (driver_features >> 32) as u32);
    w32(t, mmio::STATUS, 0xb);
    for (i, q) in queues.iter().enumerate() {
        w32(t, mmio::QUEUE_SEL, i as u32);
        w32(t, mmio::QUEUE_NUM, u32::from(q.size));
        for (lo_reg, addr) in [
            (mmio::QUEUE_DESC_LOW, q.desc),
            (mmio::QUEUE_AVAIL_LOW, q.avail),
            (mmio::QUEUE_USED_LOW, q.used),
        ] {
            w32(t, lo_reg, addr as u32);
            w32(t, lo_reg + 4, (addr >> 32) as u32);
        }
        w32(t, mmio::QUEUE_READY, 1);
    }
    w32(t, mmio::STATUS, 0xf);
    (offered, r32(t, mmio::STATUS))
}

/// What the fake backend offers.
#[derive(Clone, Debug)]
pub struct FakeFsConfig {
    /// GET_FEATURES answer.
    pub features: u64,
    /// GET_PROTOCOL_FEATURES answer.
    pub protocol: VhostUserProtocolFeatures,
    /// Number of queues (GET_QUEUE_NUM answer).
    pub queues: usize,
}

impl Default for FakeFsConfig {
    /// What virtiofsd 1.14 offers (without `--tag`), plus `CONFIG`.
    fn default() -> Self {
        FakeFsConfig {
            features: (1 << VIRTIO_F_VERSION_1)
                | (1 << VIRTIO_RING_F_INDIRECT_DESC)
                | (1 << VIRTIO_RING_F_EVENT_IDX)
                | VHOST_USER_F_PROTOCOL_FEATURES
                | (1 << 26), // VHOST_F_LOG_ALL
            protocol: VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::BACKEND_REQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::LOG_SHMFD
                | VhostUserProtocolFeatures::RESET_DEVICE
                | VhostUserProtocolFeatures::CONFIG,
            queues: NUM_QUEUES,
        }
    }
}

/// What the fake backend saw.
#[derive(Clone, Debug, Default)]
pub struct FakeFsLog {
    /// SET_FEATURES values, in order.
    pub acked_features: Vec<u64>,
    /// RESET_DEVICE requests.
    pub resets: u32,
    /// `(queue, opcode, unique)` of each request answered.
    pub requests: Vec<(u16, u32, u64)>,
}

/// A vhost-user-fs backend that answers every FUSE request with a bare `fuse_out_header`
/// (error 0, the request's unique) and FUSE_INIT with a minimal `fuse_init_out`.
struct FakeFsBackend {
    config: FakeFsConfig,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    log: Arc<Mutex<FakeFsLog>>,
}

impl FakeFsBackend {
    fn answer(&mut self, queue: u16, vring: &VringRwLock) {
        let mem = self.mem.memory();
        let mut state = vring.get_mut();
        let mut used = false;
        while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            let mut request = Vec::new();
            for d in chain.clone().readable() {
                let mut buf = vec![0u8; (d.len() as usize).min(4096)];
                if mem.read_slice(&mut buf, d.addr()).is_ok() {
                    request.extend_from_slice(&buf);
                }
            }
            let opcode = request
                .get(4..8)
                .map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap_or_default()));
            let unique = request
                .get(8..16)
                .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
            let mut body = Vec::new();
            if opcode == FUSE_INIT {
                body.extend_from_slice(&FUSE_MAJOR.to_le_bytes());
                body.extend_from_slice(&FUSE_MINOR.to_le_bytes());
                body.resize(64, 0);
            }
            let header = FuseOutHeader {
                len: (FUSE_OUT_HEADER_LEN + body.len()) as u32,
                error: 0,
                unique,
            };
            let mut reply = header.to_bytes().to_vec();
            reply.extend_from_slice(&body);
            let mut written = 0usize;
            for d in chain.writable() {
                let n = (d.len() as usize).min(reply.len() - written);
                if n == 0
                    || mem
                        .write_slice(&reply[written..written + n], d.addr())
                        .is_err()
                {
                    break;
                }
                written += n;
            }
            lock(&self.log).requests.push((queue, opcode, unique));
            let _ = state.add_used(head, written as u32);
            used = true;
        }
        if used {
            let _ = state.signal_used_queue();
        }
    }
}

impl VhostUserBackendMut for FakeFsBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.config.queues
    }

    fn max_queue_size(&self) -> usize {
        32768
    }

    fn features(&self) -> u64 {
        self.config.features
    }

    fn acked_features(&mut self, features: u64) {
        lock(&self.log).acked_features.push(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.config.protocol
    }

    fn reset_device(&mut self) {
        lock(&self.log).resets += 1;
    }

    fn set_event_idx(&mut self, _enabled: bool) {}

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.mem = mem;
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if let Some(v) = vrings.get(usize::from(device_event)) {
            self.answer(device_event, v);
        }
        Ok(())
    }
}

/// A fake backend serving one frontend on a thread.
pub struct FakeFsServer {
    log: Arc<Mutex<FakeFsLog>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeFsServer {
    /// Listen on `socket` (which must not exist) and serve the first frontend that connects.
    pub fn start(socket: &Path, config: FakeFsConfig) -> FakeFsServer {
        let log = Arc::new(Mutex::new(FakeFsLog::default()));
        let backend = Arc::new(RwLock::new(FakeFsBackend {
            config,
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            log: log.clone(),
        }));
        let mut listener = Listener::new(socket, true).expect("bind the fake backend socket");
        let mut daemon = VhostUserDaemon::new(
            "fake-virtiofsd".into(),
            backend,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .expect("fake backend daemon");
        let thread = std::thread::spawn(move || {
            if daemon.start(&mut listener).is_ok() {
                let _ = daemon.wait();
            }
            for h in daemon.get_epoll_handlers() {
                h.send_exit_event();
            }
        });
        FakeFsServer {
            log,
            thread: Some(thread),
        }
    }

    /// What it saw so far.
    pub fn log(&self) -> FakeFsLog {
        lock(&self.log).clone()
    }

    /// Wait until the frontend hung up and the server ended.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The virtiofsd binary: `HUSK_VIRTIOFSD`, else `virtiofsd` in PATH, `~/.cargo/bin` or
/// `/usr/libexec`.
pub fn find_virtiofsd() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HUSK_VIRTIOFSD") {
        return Some(p.into());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let home = std::env::var_os("HOME").map(PathBuf::from);
    std::env::split_paths(&path)
        .map(|d| d.join("virtiofsd"))
        .chain(home.map(|h| h.join(".cargo/bin/virtiofsd")))
        .chain([PathBuf::from("/usr/libexec/virtiofsd")])
        .find(|p| p.is_file())
}

/// virtiofsd sharing `dir` on `sock`, started as husk-runtime starts it; killed (its whole
/// process group: the namespace sandbox forks) on drop.
pub struct Virtiofsd {
    child: Child,
}

impl Virtiofsd {
    /// Start `bin` sharing `dir` on `sock`; returns once the socket exists.
    pub fn start(bin: &Path, dir: &Path, sock: &Path) -> Virtiofsd {
        // The namespace sandbox needs root; elsewhere run without one.
        let root = nix::unistd::geteuid().is_root();
        let child = Command::new(bin)
            .arg("--socket-path")
            .arg(sock)
            .arg("--shared-dir")
            .arg(dir)
            .args(["--sandbox", if root { "namespace" } else { "none" }])
            .args(["--cache", "auto", "--announce-submounts"])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // HUSK_TEST_LOG=1 shows virtiofsd's log.
            .stderr(if std::env::var_os("HUSK_TEST_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .process_group(0)
            .spawn()
            .expect("spawn virtiofsd");
        let mut d = Virtiofsd { child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            if let Some(st) = d.child.try_wait().unwrap() {
                panic!("virtiofsd exited before creating its socket: {st}");
            }
            assert!(Instant::now() < deadline, "virtiofsd made no socket");
            std::thread::sleep(Duration::from_millis(5));
        }
        d
    }

    /// Kill its process group and reap it.
    pub fn kill(&mut self) {
        let pg = nix::unistd::Pid::from_raw(-(self.child.id() as i32));
        let _ = nix::sys::signal::kill(pg, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// Wait for virtiofsd to exit by itself (it does when its frontend hangs up).
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "virtiofsd did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}
