//! [`VsockMuxer`]: the hybrid-vsock backend, multiplexing guest flows onto host Unix streams.
//!
//! Jobs, in the order a packet meets them:
//!
//! - Accept host clients on `<uds>` and read their `CONNECT <port>\n` line byte by byte
//!   (with a deadline); a valid line becomes a host-initiated connection.
//! - Route validated guest packets to their connection by (host port, guest port); a REQUEST
//!   for an unknown flow connects to `<uds>_<port>`; anything else for an unknown flow is
//!   answered with RST.
//! - Keep an RX queue of connections that have something for the guest, plus a bounded queue
//!   of stand-alone RSTs. [`VsockChannel::recv_pkt`] serves them round-robin.
//! - Keep each host stream's epoll interest in step with its connection (read only while the
//!   guest has credit and nothing is already pending; write only while bytes are buffered), so
//!   that a stalled guest or host never makes the event loop spin.
//! - Run deadlines (handshake, request, shutdown) from one timerfd armed for the earliest.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use tracing::{debug, info, warn};
use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::BitmapSlice;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::super::csm::{ConnTimeouts, VsockConnection};
use super::super::defs::{
    uapi, HANDSHAKE_TIMEOUT, HOST_PORT_BASE, MAX_CONNECTIONS, MAX_PENDING_HANDSHAKES,
    MAX_PENDING_RST,
};
use super::super::packet::HeaderFields;
use super::super::{Result, VsockBackend, VsockChannel, VsockEpollListener, VsockError};
use super::connect_line::{ConnectLineParser, ParseStep};
use super::{prepare_socket_path, ConnKey};

const LISTENER_TOKEN: u64 = u64::MAX;
const TIMER_TOKEN: u64 = u64::MAX - 1;
/// How long to stop accepting after accept() fails for lack of fds or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
const EPOLL_BATCH: usize = 64;

struct ConnEntry {
    conn: VsockConnection,
    /// The interest the stream is registered with, `None` when it is not in the epoll set.
    registered: Option<EventSet>,
    in_rxq: bool,
}

struct Handshake {
    stream: UnixStream,
    parser: ConnectLineParser,
    deadline: Instant,
}

enum FdOwner {
    Handshake,
    Conn(ConnKey),
}

/// The hybrid-vsock backend. See the [module docs](self) and [`super`].
pub struct VsockMuxer {
    uds_path: PathBuf,
    /// (device, inode) of the socket file we bound, to remove only our own file on drop.
    uds_id: Option<(u64, u64)>,
    listener: UnixListener,
    listener_paused_until: Option<Instant>,
    epoll: Epoll,
    timer: TimerFd,
    timer_deadline: Option<Instant>,
    conns: HashMap<ConnKey, ConnEntry>,
    fd_owner: HashMap<RawFd, FdOwner>,
    handshakes: HashMap<RawFd, Handshake>,
    rxq: VecDeque<ConnKey>,
    rst_queue: VecDeque<ConnKey>,
    next_local_port: u32,
    handshake_timeout: Duration,
    conn_timeouts: ConnTimeouts,
}

impl VsockMuxer {
    /// Bind the hybrid vsock listener at `uds_path` (removing a stale socket file there) and set
    /// up the epoll set. Guest connections to port P go to `<uds_path>_P`.
    pub fn new<P: AsRef<Path>>(uds_path: P) -> Result<Self> {
        let uds_path = uds_path.as_ref().to_owned();
        prepare_socket_path(&uds_path)?;
        let listener = UnixListener::bind(&uds_path).map_err(|source| VsockError::BindUds {
            path: uds_path.clone(),
            source,
        })?;
        let uds_id = std::fs::metadata(&uds_path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        let mut muxer = Self::with_listener(listener, uds_path)?;
        muxer.uds_id = uds_id;
        Ok(muxer)
    }

    /// Use an already bound listener. The socket file is left alone on drop.
    pub fn with_listener(listener: UnixListener, uds_path: PathBuf) -> Result<Self> {
        let bind_err = |source| VsockError::BindUds {
            path: uds_path.clone(),
            source,
        };
        listener.set_nonblocking(true).map_err(bind_err)?;
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        let timer = TimerFd::new().map_err(VsockError::Timer)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )
            .map_err(VsockError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                timer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TIMER_TOKEN),
            )
            .map_err(VsockError::Epoll)?;
        Ok(VsockMuxer {
            uds_path,
            uds_id: None,
            listener,
            listener_paused_until: None,
            epoll,
            timer,
            timer_deadline: None,
            conns: HashMap::new(),
            fd_owner: HashMap::new(),
            handshakes: HashMap::new(),
            rxq: VecDeque::new(),
            rst_queue: VecDeque::new(),
            next_local_port: HOST_PORT_BASE,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            conn_timeouts: ConnTimeouts::default(),
        })
    }

    /// Change the deadlines (defaults: [`HANDSHAKE_TIMEOUT`] and [`ConnTimeouts::default`]).
    /// Applies to clients and connections that arrive afterwards.
    pub fn set_timeouts(&mut self, handshake: Duration, conn: ConnTimeouts) {
        self.handshake_timeout = handshake;
        self.conn_timeouts = conn;
    }

    /// The hybrid vsock socket path.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Number of host clients that have not finished their CONNECT line.
    pub fn pending_handshakes(&self) -> usize {
        self.handshakes.len()
    }

    /// The connection for a flow, for inspection.
    pub fn connection(&self, key: ConnKey) -> Option<&VsockConnection> {
        self.conns.get(&key).map(|e| &e.conn)
    }

    fn guest_port_path(&self, port: u32) -> PathBuf {
        let mut p: OsString = self.uds_path.as_os_str().to_owned();
        p.push(format!("_{port}"));
        PathBuf::from(p)
    }

    fn enqueue_rst(&mut self, key: ConnKey) {
        if self.rst_queue.len() < MAX_PENDING_RST {
            self.rst_queue.push_back(key);
        } else {
            debug!(?key, "vsock: RST queue full, dropping RST");
        }
    }

    fn alloc_local_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(HOST_PORT_BASE);
            if !self.conns.keys().any(|k| k.local_port == port) {
                return Some(port);
            }
        }
        None
    }

    fn add_conn(&mut self, key: ConnKey, conn: VsockConnection) {
        self.conns.insert(
            key,
            ConnEntry {
                conn,
                registered: None,
                in_rxq: false,
            },
        );
        self.sync(key);
    }

    /// Bring a connection's epoll registration, RX queue membership and timer in line with its
    /// state; drop it if it is closed.
    fn sync(&mut self, key: ConnKey) {
        let Some(entry) = self.conns.get_mut(&key) else {
            return;
        };
        let fd = entry.conn.fd();
        if entry.conn.is_closed() {
            if entry.registered.is_some() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    fd,
                    EpollEvent::new(EventSet::empty(), 0),
                );
                self.fd_owner.remove(&fd);
            }
            debug!(
                local_port = key.local_port,
                peer_port = key.peer_port,
                "vsock: connection closed"
            );
            self.conns.remove(&key);
            return;
        }
        let want = entry
            .conn
            .wants_epoll()
            .then(|| entry.conn.get_polled_evset());
        if want != entry.registered {
            let res = match (entry.registered, want) {
                (None, Some(ev)) => {
                    self.epoll
                        .ctl(ControlOperation::Add, fd, EpollEvent::new(ev, fd as u64))
                }
                (Some(_), Some(ev)) => {
                    self.epoll
                        .ctl(ControlOperation::Modify, fd, EpollEvent::new(ev, fd as u64))
                }
                (Some(_), None) => self.epoll.ctl(
                    ControlOperation::Delete,
                    fd,
                    EpollEvent::new(EventSet::empty(), 0),
                ),
                (None, None) => Ok(()),
            };
            match res {
                Ok(()) => {
                    if want.is_some() {
                        self.fd_owner.insert(fd, FdOwner::Conn(key));
                    } else {
                        self.fd_owner.remove(&fd);
                    }
                    entry.registered = want;
                }
                Err(e) => {
                    warn!(
                        ?key,
                        "vsock: cannot update epoll interest: {e}; resetting connection"
                    );
                    entry.conn.kill();
                    if entry.registered.is_some() {
                        let _ = self.epoll.ctl(
                            ControlOperation::Delete,
                            fd,
                            EpollEvent::new(EventSet::empty(), 0),
                        );
                        self.fd_owner.remove(&fd);
                        entry.registered = None;
                    }
                }
            }
        }
        if entry.conn.has_pending_rx() && !entry.in_rxq {
            entry.in_rxq = true;
            self.rxq.push_back(key);
        }
        if let Some(t) = entry.conn.expiry() {
            if self.timer_deadline.is_none_or_later(t) {
                self.arm_timer(t);
            }
        }
    }

    fn arm_timer(&mut self, t: Instant) {
        let dur = t
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        match self.timer.reset(dur, None) {
            Ok(()) => self.timer_deadline = Some(t),
            Err(e) => warn!("vsock: cannot arm timer: {e}"),
        }
    }

    /// Re-arm the timer for the earliest deadline (or disarm it). Also clears a fired timer.
    fn rearm_timer(&mut self) {
        let earliest = self
            .conns
            .values()
            .filter_map(|e| e.conn.expiry())
            .chain(self.handshakes.values().map(|h| h.deadline))
            .chain(self.listener_paused_until)
            .min();
        match earliest {
            Some(t) => self.arm_timer(t),
            None => {
                if let Err(e) = self.timer.clear() {
                    warn!("vsock: cannot disarm timer: {e}");
                }
                self.timer_deadline = None;
            }
        }
    }

    fn run_deadlines(&mut self, now: Instant) {
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, e)| e.conn.expiry().is_some_and(|t| t <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            if let Some(e) = self.conns.get_mut(&key) {
                e.conn.on_expired(now);
            }
            self.sync(key);
        }
        let stale: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in stale {
            debug!("vsock: host client sent no CONNECT line in time; closing it");
            self.drop_handshake(fd);
        }
        if self.listener_paused_until.is_some_and(|t| t <= now) {
            self.listener_paused_until = None;
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                self.listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            ) {
                warn!("vsock: cannot resume accepting host clients: {e}");
            }
        }
    }

    fn accept_host_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.handshakes.len() >= MAX_PENDING_HANDSHAKES
                        || self.conns.len() >= MAX_CONNECTIONS
                    {
                        debug!("vsock: too many host clients; refusing one");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        debug!("vsock: cannot make host client non-blocking: {e}");
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if let Err(e) = self.epoll.ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::IN, fd as u64),
                    ) {
                        warn!("vsock: cannot watch host client: {e}");
                        continue;
                    }
                    let deadline = Instant::now() + self.handshake_timeout;
                    self.fd_owner.insert(fd, FdOwner::Handshake);
                    self.handshakes.insert(
                        fd,
                        Handshake {
                            stream,
                            parser: ConnectLineParser::new(),
                            deadline,
                        },
                    );
                    if self.timer_deadline.is_none_or_later(deadline) {
                        self.arm_timer(deadline);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    // Out of fds or memory: the listener would stay readable and spin the
                    // event loop. Stop watching it for a moment.
                    warn!(
                        "vsock: accept on {} failed: {e}; pausing",
                        self.uds_path.display()
                    );
                    let _ = self.epoll.ctl(
                        ControlOperation::Delete,
                        self.listener.as_raw_fd(),
                        EpollEvent::new(EventSet::empty(), 0),
                    );
                    let until = Instant::now() + ACCEPT_BACKOFF;
                    self.listener_paused_until = Some(until);
                    if self.timer_deadline.is_none_or_later(until) {
                        self.arm_timer(until);
                    }
                    break;
                }
            }
        }
    }

    fn drop_handshake(&mut self, fd: RawFd) -> Option<UnixStream> {
        let hs = self.handshakes.remove(&fd)?;
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            fd,
            EpollEvent::new(EventSet::empty(), 0),
        );
        self.fd_owner.remove(&fd);
        Some(hs.stream)
    }

    fn read_handshake(&mut self, fd: RawFd) {
        let outcome = {
            let Some(hs) = self.handshakes.get_mut(&fd) else {
                return;
            };
            loop {
                let mut byte = [0u8; 1];
                match (&hs.stream).read(&mut byte) {
                    Ok(0) => break Err("closed before finishing its CONNECT line".to_string()),
                    Ok(_) => match hs.parser.push(byte[0]) {
                        ParseStep::NeedMore => continue,
                        ParseStep::Done(port) => break Ok(port),
                        ParseStep::Invalid(e) => break Err(e.to_string()),
                    },
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => break Err(e.to_string()),
                }
            }
        };
        let Some(stream) = self.drop_handshake(fd) else {
            return;
        };
        match outcome {
            Ok(port) => self.host_connect(stream, port),
            Err(why) => debug!("vsock: refusing host client: {why}"),
        }
    }

    /// A host client asked for guest port `peer_port`.
    fn host_connect(&mut self, stream: UnixStream, peer_port: u32) {
        if self.conns.len() >= MAX_CONNECTIONS {
            debug!("vsock: connection limit reached; refusing host client");
            return;
        }
        let Some(local_port) = self.alloc_local_port() else {
            debug!("vsock: no free host port; refusing host client");
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port,
        };
        debug!(local_port, peer_port, "vsock: host connects to guest");
        self.add_conn(
            key,
            VsockConnection::new_local_init(stream, local_port, peer_port, self.conn_timeouts),
        );
    }

    /// The guest asked to connect to host port `hdr.dst_port`.
    fn guest_connect(&mut self, hdr: &HeaderFields, key: ConnKey) {
        if self.conns.len() >= MAX_CONNECTIONS {
            debug!("vsock: connection limit reached; refusing guest connection");
            self.enqueue_rst(key);
            return;
        }
        let path = self.guest_port_path(hdr.dst_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                debug!(
                    local_port = key.local_port,
                    peer_port = key.peer_port,
                    "vsock: guest connected to {}",
                    path.display()
                );
                self.add_conn(
                    key,
                    VsockConnection::new_peer_init(stream, hdr, self.conn_timeouts),
                );
            }
            Err(e) => {
                debug!("vsock: guest connection to {} refused: {e}", path.display());
                self.enqueue_rst(key);
            }
        }
    }
}

/// Connect to a Unix stream socket without blocking; a listener whose backlog is full counts as
/// a refusal.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}

trait DeadlineExt {
    /// Whether the armed deadline is absent or later than `t`.
    fn is_none_or_later(&self, t: Instant) -> bool;
}

impl DeadlineExt for Option<Instant> {
    fn is_none_or_later(&self, t: Instant) -> bool {
        match self {
            None => true,
            Some(armed) => *armed > t,
        }
    }
}

impl VsockChannel for VsockMuxer {
    fn recv_pkt<B: BitmapSlice>(&mut self, pkt: &mut VsockPacket<'_, B>) -> Result<()> {
        if let Some(key) = self.rst_queue.pop_front() {
            pkt.set_src_port(key.local_port)
                .set_dst_port(key.peer_port)
                .set_type(uapi::VSOCK_TYPE_STREAM)
                .set_op(uapi::VSOCK_OP_RST)
                .set_len(0);
            return Ok(());
        }
        // Visit each queued connection at most once per call: one that keeps something pending
        // but cannot produce it into this buffer (say, a zero-length data descriptor) goes back
        // to the end of the queue and must not make this loop spin.
        for _ in 0..self.rxq.len() {
            let Some(key) = self.rxq.pop_front() else {
                break;
            };
            let Some(entry) = self.conns.get_mut(&key) else {
                continue;
            };
            entry.in_rxq = false;
            let sent = entry.conn.recv_pkt(pkt);
            self.sync(key);
            if sent {
                return Ok(());
            }
        }
        Err(VsockError::NoData)
    }

    fn send_pkt<B: BitmapSlice>(&mut self, pkt: &VsockPacket<'_, B>) -> Result<()> {
        let hdr = HeaderFields::from_packet(pkt);
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if let Some(entry) = self.conns.get_mut(&key) {
            if hdr.op == uapi::VSOCK_OP_REQUEST {
                debug!(
                    ?key,
                    "vsock: guest REQUEST for a live connection; resetting it"
                );
                entry.conn.kill();
            } else {
                entry.conn.send_pkt(pkt);
            }
            self.sync(key);
            return Ok(());
        }
        match hdr.op {
            uapi::VSOCK_OP_REQUEST => self.guest_connect(&hdr, key),
            uapi::VSOCK_OP_RST => {}
            _ => self.enqueue_rst(key),
        }
        Ok(())
    }

    fn reset_flow(&mut self, local_port: u32, peer_port: u32) {
        let key = ConnKey {
            local_port,
            peer_port,
        };
        if let Some(entry) = self.conns.get_mut(&key) {
            entry.conn.kill();
            self.sync(key);
        } else {
            self.enqueue_rst(key);
        }
    }

    fn has_pending_rx(&self) -> bool {
        !self.rst_queue.is_empty() || !self.rxq.is_empty()
    }
}

impl VsockEpollListener for VsockMuxer {
    fn get_polled_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn get_polled_evset(&self) -> EventSet {
        EventSet::IN
    }

    fn notify(&mut self, _evset: EventSet) {
        let mut events = [EpollEvent::default(); EPOLL_BATCH];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => 0,
            Err(e) => {
                warn!("vsock: epoll_wait on the muxer failed: {e}");
                0
            }
        };
        let mut timer_fired = false;
        for ev in &events[..n] {
            let evset = ev.event_set();
            match ev.data() {
                LISTENER_TOKEN => self.accept_host_clients(),
                TIMER_TOKEN => timer_fired = true,
                token => {
                    let fd = token as RawFd;
                    match self.fd_owner.get(&fd) {
                        Some(FdOwner::Handshake) => self.read_handshake(fd),
                        Some(FdOwner::Conn(key)) => {
                            let key = *key;
                            if let Some(entry) = self.conns.get_mut(&key) {
                                entry.conn.notify(evset);
                            }
                            self.sync(key);
                        }
                        None => {}
                    }
                }
            }
        }
        if timer_fired {
            self.run_deadlines(Instant::now());
            // Always re-arm after a fire: it also resets the timerfd's readable state.
            self.rearm_timer();
        }
    }
}

impl VsockBackend for VsockMuxer {}

impl Drop for VsockMuxer {
    fn drop(&mut self) {
        let Some((dev, ino)) = self.uds_id else {
            return;
        };
        if let Ok(m) = std::fs::metadata(&self.uds_path) {
            if m.dev() == dev && m.ino() == ino {
                if let Err(e) = std::fs::remove_file(&self.uds_path) {
                    info!("vsock: cannot remove {}: {e}", self.uds_path.display());
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "muxer_tests.rs"]
mod tests;
