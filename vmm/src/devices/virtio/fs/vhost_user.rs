//! [`FsFrontend`]: the vhost-user conversation with virtiofsd, on the `vhost` crate's
//! [`Frontend`].
//!
//! Negotiation happens once, when the VM is built ([`FsFrontend::connect`]); [`FsFrontend::start`]
//! runs at each DRIVER_OK and [`FsFrontend::stop`] at each driver reset. Only what husk-vmm uses
//! is acked: protocol features `REPLY_ACK` (so every request is confirmed), `MQ` (to check the
//! backend has both queues) and `RESET_DEVICE`. Never `CONFIG` (husk-vmm serves the config
//! space), `BACKEND_REQ` (DAX windows), `LOG_*` (migration) or memory-slot updates.

use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::EventFd;

use super::defs::{
    CONNECT_TIMEOUT, GUEST_FEATURES, MESSAGE_TIMEOUT, NUM_QUEUES, QUEUE_SIZE, REQUEST_QUEUE,
    VHOST_USER_F_PROTOCOL_FEATURES,
};
use super::{FsError, Result};
use crate::devices::bus::lock;
use crate::devices::virtio::GuestMem;

/// The protocol features husk-vmm acks when the backend offers them.
pub fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::RESET_DEVICE
}

/// The virtio features to offer the guest, given what the backend offers: the intersection with
/// [`GUEST_FEATURES`]. A backend without `VIRTIO_F_VERSION_1` cannot serve a virtio-mmio v2
/// (modern) driver.
pub fn guest_features(backend_features: u64) -> Result<u64> {
    let offer = backend_features & GUEST_FEATURES;
    if offer & (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1) == 0 {
        return Err(FsError::Backend(format!(
            "it does not offer VIRTIO_F_VERSION_1 (features {backend_features:#x})"
        )));
    }
    Ok(offer)
}

/// Check the backend's answer to `GET_QUEUE_NUM`: it must serve the hiprio and request queues.
pub fn check_queue_num(n: u64) -> Result<()> {
    if n < NUM_QUEUES as u64 {
        return Err(FsError::Backend(format!(
            "it has {n} queues; virtio-fs needs {NUM_QUEUES} (hiprio + 1 request queue)"
        )));
    }
    Ok(())
}

/// The frontend's user address of `len` bytes of guest memory at `gpa`, which must lie inside
/// one memory region (the backend maps regions separately) and be `align`-aligned.
pub fn host_address(mem: &GuestMem, gpa: u64, len: u64, align: u64) -> Result<u64> {
    let bad = |why: &str| {
        Err(FsError::Queue(format!(
            "ring at {gpa:#x} ({len} bytes) {why}"
        )))
    };
    if align != 0 && gpa % align != 0 {
        return bad(&format!("is not {align}-byte aligned"));
    }
    let Some((region, offset)) = mem.to_region_addr(GuestAddress(gpa)) else {
        return bad("is outside guest memory");
    };
    let last = len
        .checked_sub(1)
        .and_then(|l| offset.0.checked_add(l))
        .map(MemoryRegionAddress);
    if last.and_then(|l| region.check_address(l)).is_none() {
        return bad("does not fit in one guest memory region");
    }
    match region.get_host_address(offset) {
        Ok(p) => Ok(p as u64),
        Err(e) => bad(&format!("has no host mapping: {e}")),
    }
}

/// Connect to `path`, retrying while the socket exists but nobody listens yet (a backend that
/// has bound but not yet called `listen`).
fn connect_socket(path: &Path) -> Result<UnixStream> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(source) => {
                return Err(FsError::Connect {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
}

#[derive(Default)]
struct WatchdogState {
    deadline: Option<Instant>,
    fired: bool,
    quit: bool,
}

/// Ends a vhost-user request that takes too long by shutting the socket down.
///
/// Socket timeouts cannot do it: the `vhost` crate retries `EAGAIN` until the message is
/// complete, so a backend that never answers would hold the calling vCPU thread forever. The
/// watchdog thread is started with the connection, so a request arms it without creating
/// anything.
struct Watchdog {
    state: Arc<(Mutex<WatchdogState>, Condvar)>,
    handle: Option<JoinHandle<()>>,
}

impl Watchdog {
    fn spawn(socket: UnixStream) -> Result<Watchdog> {
        let state = Arc::new((Mutex::new(WatchdogState::default()), Condvar::new()));
        let shared = state.clone();
        let handle = std::thread::Builder::new()
            .name("virtio-fs-watchdog".into())
            .spawn(move || watch(&shared, &socket))
            .map_err(|source| FsError::Io {
                what: "spawn the vhost-user watchdog",
                source,
            })?;
        Ok(Watchdog {
            state,
            handle: Some(handle),
        })
    }

    /// Run request `name` (`f`), closing the connection if it takes longer than `timeout`.
    fn run<T>(
        &self,
        name: &'static str,
        timeout: Duration,
        f: impl FnOnce() -> vhost::Result<T>,
    ) -> Result<T> {
        let (m, cv) = &*self.state;
        lock(m).deadline = Some(Instant::now() + timeout);
        cv.notify_all();
        let r = f();
        let fired = {
            let mut s = lock(m);
            s.deadline = None;
            s.fired
        };
        r.map_err(|source| {
            if fired {
                FsError::Backend(format!(
                    "no answer to {name} within {timeout:?}; the connection was closed"
                ))
            } else {
                FsError::Request {
                    request: name,
                    source,
                }
            }
        })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (m, cv) = &*self.state;
        lock(m).quit = true;
        cv.notify_all();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn watch(state: &(Mutex<WatchdogState>, Condvar), socket: &UnixStream) {
    let (m, cv) = state;
    let mut s = lock(m);
    loop {
        if s.quit {
            return;
        }
        s = match s.deadline {
            None => cv.wait(s).unwrap_or_else(|e| e.into_inner()),
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    tracing::error!("virtio-fs: the vhost-user-fs backend does not answer");
                    let _ = socket.shutdown(std::net::Shutdown::Both);
                    s.fired = true;
                    s.deadline = None;
                    s
                } else {
                    cv.wait_timeout(s, d - now)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0)
                }
            }
        };
    }
}

/// One vhost-user connection to a virtio-fs backend, negotiated.
pub struct FsFrontend {
    frontend: Frontend,
    watchdog: Watchdog,
    timeout: Duration,
    socket: PathBuf,
    backend_features: u64,
    guest_features: u64,
    protocol: Option<VhostUserProtocolFeatures>,
    started: Vec<usize>,
}

impl std::fmt::Debug for FsFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsFrontend")
            .field("socket", &self.socket)
            .field(
                "backend_features",
                &format_args!("{:#x}", self.backend_features),
            )
            .field("protocol", &self.protocol)
            .field("started", &self.started)
            .finish()
    }
}

impl FsFrontend {
    /// Connect to the backend listening on `path` (retrying for
    /// [`CONNECT_TIMEOUT`](super::defs::CONNECT_TIMEOUT)) and negotiate.
    pub fn connect(path: &Path) -> Result<FsFrontend> {
        FsFrontend::connect_with_timeout(path, MESSAGE_TIMEOUT)
    }

    /// [`connect`](Self::connect) with another limit on each reply than
    /// [`MESSAGE_TIMEOUT`](super::defs::MESSAGE_TIMEOUT).
    pub fn connect_with_timeout(path: &Path, message_timeout: Duration) -> Result<FsFrontend> {
        let stream = connect_socket(path)?;
        let watched = stream.try_clone().map_err(|source| FsError::Io {
            what: "dup the vhost-user socket",
            source,
        })?;
        let mut fe = FsFrontend {
            frontend: Frontend::from_stream(stream, NUM_QUEUES as u64),
            watchdog: Watchdog::spawn(watched)?,
            timeout: message_timeout,
            socket: path.to_owned(),
            backend_features: 0,
            guest_features: 0,
            protocol: None,
            started: Vec::new(),
        };
        fe.negotiate()?;
        Ok(fe)
    }

    /// Run one request under the watchdog.
    fn call<T>(
        &mut self,
        name: &'static str,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T> {
        let frontend = &mut self.frontend;
        self.watchdog.run(name, self.timeout, || f(frontend))
    }

    fn negotiate(&mut self) -> Result<()> {
        self.call("SET_OWNER", |f| f.set_owner())?;
        let backend_features = self.call("GET_FEATURES", |f| f.get_features())?;
        self.guest_features = guest_features(backend_features)?;
        self.backend_features = backend_features;
        if backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let offered = self.call("GET_PROTOCOL_FEATURES", |f| f.get_protocol_features())?;
            let acked = offered & wanted_protocol_features();
            self.call("SET_PROTOCOL_FEATURES", |f| f.set_protocol_features(acked))?;
            if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every request that has no reply of its own is now confirmed by the backend.
                self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if acked.contains(VhostUserProtocolFeatures::MQ) {
                let n = self.call("GET_QUEUE_NUM", |f| f.get_queue_num())?;
                check_queue_num(n)?;
            }
            self.protocol = Some(acked);
        }
        tracing::debug!(
            "virtio-fs: backend {} features {backend_features:#x}, protocol {:?}",
            self.socket.display(),
            self.protocol
        );
        Ok(())
    }

    /// The backend's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// What the backend answered to `GET_FEATURES`.
    pub fn backend_features(&self) -> u64 {
        self.backend_features
    }

    /// The virtio features offered to the guest.
    pub fn guest_features(&self) -> u64 {
        self.guest_features
    }

    /// The acked protocol features; `None` when the backend has none.
    pub fn protocol_features(&self) -> Option<VhostUserProtocolFeatures> {
        self.protocol
    }

    /// The queues handed to the backend by the last [`start`](Self::start).
    pub fn started_queues(&self) -> &[usize] {
        &self.started
    }

    /// The socket's fd (polled for hang-up).
    pub fn socket_fd(&self) -> RawFd {
        self.frontend.as_raw_fd()
    }

    /// Hand the backend the guest memory and the driver's queues, and let it run them. `acked`
    /// is what the driver accepted; `kicks[i]` and `calls[i]` are queue `i`'s eventfds. On an
    /// error the queues that were started are stopped again.
    pub fn start(
        &mut self,
        mem: &GuestMem,
        queues: &[Queue],
        acked: u64,
        kicks: &[EventFd],
        calls: &[EventFd],
    ) -> Result<()> {
        if queues.len() != NUM_QUEUES || kicks.len() != NUM_QUEUES || calls.len() != NUM_QUEUES {
            return Err(FsError::Queue(format!(
                "{} queues, {} kick and {} call eventfds; need {NUM_QUEUES} of each",
                queues.len(),
                kicks.len(),
                calls.len()
            )));
        }
        if !queues[REQUEST_QUEUE].ready() {
            return Err(FsError::Queue("the request queue is not ready".into()));
        }
        // Check every queue before the backend hears of any.
        let mut rings = Vec::with_capacity(NUM_QUEUES);
        for (i, q) in queues.iter().enumerate() {
            if q.ready() {
                rings.push((i, ring_config(mem, q)?));
            }
        }
        let r = self.start_rings(mem, acked, &rings, kicks, calls);
        if r.is_err() {
            self.stop();
        }
        r
    }

    fn start_rings(
        &mut self,
        mem: &GuestMem,
        acked: u64,
        rings: &[(usize, (VringConfigData, u16))],
        kicks: &[EventFd],
        calls: &[EventFd],
    ) -> Result<()> {
        let protocol_bit = if self.protocol.is_some() {
            VHOST_USER_F_PROTOCOL_FEATURES
        } else {
            0
        };
        let features = (acked & self.guest_features) | protocol_bit;
        self.call("SET_FEATURES", |f| f.set_features(features))?;
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| {
                FsError::Queue(format!(
                    "guest memory cannot be shared (no memfd behind it?): {e}"
                ))
            })?;
        self.call("SET_MEM_TABLE", |f| f.set_mem_table(&regions))?;
        for &(i, (config, base)) in rings {
            self.call("SET_VRING_NUM", |f| f.set_vring_num(i, config.queue_size))?;
            self.call("SET_VRING_ADDR", |f| f.set_vring_addr(i, &config))?;
            self.call("SET_VRING_BASE", |f| f.set_vring_base(i, base))?;
            self.call("SET_VRING_CALL", |f| f.set_vring_call(i, &calls[i]))?;
            self.call("SET_VRING_KICK", |f| f.set_vring_kick(i, &kicks[i]))?;
            self.started.push(i);
        }
        if self.protocol.is_some() {
            // With protocol features, rings start disabled (vhost-user spec, "Ring states").
            for &(i, _) in rings {
                self.call("SET_VRING_ENABLE", |f| f.set_vring_enable(i, true))?;
            }
        }
        Ok(())
    }

    /// Stop every started ring (`GET_VRING_BASE`) and reset the backend's device state. Failures
    /// are logged: the backend may already be gone.
    pub fn stop(&mut self) {
        for i in std::mem::take(&mut self.started) {
            match self.call("GET_VRING_BASE", |f| f.get_vring_base(i)) {
                Ok(base) if base <= u32::from(u16::MAX) => {
                    tracing::debug!("virtio-fs: queue {i} stopped at {base}")
                }
                Ok(base) => tracing::warn!("virtio-fs: backend returned ring base {base:#x}"),
                Err(e) => tracing::warn!("virtio-fs: GET_VRING_BASE {i}: {e}"),
            }
        }
        let reset = self
            .protocol
            .is_some_and(|p| p.contains(VhostUserProtocolFeatures::RESET_DEVICE));
        if reset {
            if let Err(e) = self.call("RESET_DEVICE", |f| f.reset_device()) {
                tracing::warn!("virtio-fs: RESET_DEVICE: {e}");
            }
        }
    }
}

/// The vhost-user ring description of a ready queue, and its next available index.
fn ring_config(mem: &GuestMem, q: &Queue) -> Result<(VringConfigData, u16)> {
    let size = q.size();
    if size == 0 || !size.is_power_of_two() || size > QUEUE_SIZE || size > q.max_size() {
        return Err(FsError::Queue(format!("queue size {size} is invalid")));
    }
    let n = u64::from(size);
    // Split virtqueue layout (virtio spec 2.7): 16-byte descriptors, avail and used rings with
    // a 4-byte header and a 2-byte event field.
    let desc = host_address(mem, q.desc_table(), 16 * n, 16)?;
    let avail = host_address(mem, q.avail_ring(), 6 + 2 * n, 2)?;
    let used = host_address(mem, q.used_ring(), 6 + 8 * n, 4)?;
    Ok((
        VringConfigData {
            queue_max_size: q.max_size(),
            queue_size: size,
            flags: 0,
            desc_table_addr: desc,
            used_ring_addr: used,
            avail_ring_addr: avail,
            log_addr: None,
        },
        q.next_avail(),
    ))
}

#[cfg(test)]
#[path = "vhost_user_tests.rs"]
mod tests;
