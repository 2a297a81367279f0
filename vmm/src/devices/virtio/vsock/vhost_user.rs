//! Serving the vsock device to a vhost-user frontend (QEMU's `vhost-user-vsock-device`).
//!
//! QEMU keeps the virtio transport and the EVENT queue; it hands us guest memory (memfd regions,
//! so the guest must use `share=on` memory) and the RX and TX rings with their kick and call
//! eventfds. The `vhost-user-backend` crate runs one epoll thread that watches the kicks; we add
//! the muxer's epoll fd to it under [`BACKEND_EVENT`], so host connects and host data wake the
//! RX path without polling.
//!
//! Negotiated: virtio features from [`device_features`] plus `VHOST_USER_F_PROTOCOL_FEATURES`;
//! protocol features `CONFIG` (QEMU reads `guest_cid` with GET_CONFIG at realize time; without it
//! QEMU refuses the device) and `MQ` (GET_QUEUE_NUM answers [`NUM_QUEUES`]).

use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tracing::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::defs::{EVQ_INDEX, NUM_QUEUES, RXQ_INDEX, TXQ_INDEX, VHOST_USER_MAX_QUEUE_SIZE};
use super::unix::prepare_socket_path;
use super::{device_features, VsockDevice, VsockEpollListener, VsockError, VsockMuxer};

/// Event id of the muxer's epoll fd in the vhost-user epoll thread. Ids up to [`NUM_QUEUES`]
/// belong to the vrings and the library's own exit event.
pub const BACKEND_EVENT: u16 = NUM_QUEUES as u16 + 1;

/// Errors of the vhost-user vsock server.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserVsockError {
    /// The device or its muxer could not be set up.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// The vhost-user socket could not be bound.
    #[error("cannot listen on vhost-user socket {path}: {source}; remove the stale file or choose another --socket path")]
    BindSocket {
        /// The socket path.
        path: PathBuf,
        /// Why bind failed.
        #[source]
        source: io::Error,
    },
    /// The vhost-user daemon could not be created or failed while serving.
    #[error("vhost-user daemon failed: {0}")]
    Daemon(String),
    /// The muxer's fd could not be added to the vhost-user epoll thread.
    #[error("cannot register the vsock muxer with the vhost-user event loop: {0}")]
    RegisterBackend(#[source] io::Error),
}

/// The vsock device behind the vhost-user protocol.
pub struct VhostUserVsockBackend {
    device: VsockDevice<VsockMuxer>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
}

impl VhostUserVsockBackend {
    /// Wrap a device. Guest memory arrives later with SET_MEM_TABLE.
    pub fn new(device: VsockDevice<VsockMuxer>) -> Self {
        VhostUserVsockBackend {
            device,
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        }
    }

    /// The device.
    pub fn device(&self) -> &VsockDevice<VsockMuxer> {
        &self.device
    }

    fn process_tx(&mut self, vrings: &[VringRwLock]) {
        let Some(vring) = vrings.get(TXQ_INDEX) else {
            return;
        };
        let mem = self.mem.memory();
        let mut state = vring.get_mut();
        if !state.get_queue().ready() {
            return;
        }
        match self.device.process_tx(&*mem, state.get_queue_mut()) {
            Ok(true) => {
                if let Err(e) = state.signal_used_queue() {
                    warn!("vsock: cannot signal the TX queue: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => warn!("vsock: TX queue: {e}"),
        }
    }

    fn process_rx(&mut self, vrings: &[VringRwLock]) {
        if !self.device.has_pending_rx() {
            return;
        }
        let Some(vring) = vrings.get(RXQ_INDEX) else {
            return;
        };
        let mem = self.mem.memory();
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return;
        }
        match self.device.process_rx(&*mem, state.get_queue_mut()) {
            Ok(true) => {
                if let Err(e) = state.signal_used_queue() {
                    warn!("vsock: cannot signal the RX queue: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => warn!("vsock: RX queue: {e}"),
        }
    }
}

impl VhostUserBackendMut for VhostUserVsockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        VHOST_USER_MAX_QUEUE_SIZE as usize
    }

    fn features(&self) -> u64 {
        device_features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&mut self, features: u64) {
        debug!("vsock: frontend acked virtio features {features:#x}");
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&mut self, enabled: bool) {
        // The queue loops in `device` are correct with and without EVENT_IDX; the library
        // switches the queues themselves.
        debug!("vsock: EVENT_IDX {}", if enabled { "on" } else { "off" });
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.device.read_config(offset, size).unwrap_or_default()
    }

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
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        // Never return an error for guest-caused trouble: an error stops the event thread.
        match device_event {
            e if e as usize == RXQ_INDEX => self.process_rx(vrings),
            e if e as usize == TXQ_INDEX => {
                self.process_tx(vrings);
                self.process_rx(vrings);
            }
            e if e as usize == EVQ_INDEX => {}
            BACKEND_EVENT => {
                self.device.notify_backend(evset);
                self.process_rx(vrings);
            }
            other => debug!("vsock: unexpected event id {other}"),
        }
        Ok(())
    }
}

/// A socket file this process created; removed again only if it is still the same file.
#[derive(Clone, Debug)]
pub struct SocketFile {
    path: PathBuf,
    id: Option<(u64, u64)>,
}

impl SocketFile {
    fn record(path: &Path) -> Self {
        SocketFile {
            path: path.to_owned(),
            id: std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino())),
        }
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Remove the file if it is still the one we bound.
    pub fn remove_if_ours(&self) {
        let Some((dev, ino)) = self.id else {
            return;
        };
        if let Ok(m) = std::fs::metadata(&self.path) {
            if m.dev() == dev && m.ino() == ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// What [`VhostUserVsockServer::bind`] needs.
#[derive(Clone, Debug)]
pub struct VsockServerConfig {
    /// vhost-user socket; we listen, the frontend (QEMU) connects.
    pub socket: PathBuf,
    /// Hybrid vsock socket for host clients (`CONNECT <port>\n`); guest connections go to
    /// `<uds>_<port>`.
    pub uds: PathBuf,
    /// The guest's CID, reported through the config space.
    pub guest_cid: u64,
}

type Daemon = VhostUserDaemon<Arc<RwLock<VhostUserVsockBackend>>>;

/// A bound vhost-user vsock server: both sockets exist; [`run`](Self::run) serves one frontend.
pub struct VhostUserVsockServer {
    daemon: Daemon,
    listener: Listener,
    files: Vec<SocketFile>,
}

impl VhostUserVsockServer {
    /// Bind the hybrid vsock socket, then the vhost-user socket (stale socket files are
    /// replaced, live ones are an error), and start the event thread.
    pub fn bind(config: &VsockServerConfig) -> Result<Self, VhostUserVsockError> {
        let muxer = VsockMuxer::new(&config.uds)?;
        let uds_file = SocketFile::record(&config.uds);
        let backend_fd = muxer.get_polled_fd();
        let backend_events = muxer.get_polled_evset();
        let device = VsockDevice::new(config.guest_cid, muxer)?;
        let backend = Arc::new(RwLock::new(VhostUserVsockBackend::new(device)));

        prepare_socket_path(&config.socket)?;
        let socket = UnixListener::bind(&config.socket).map_err(|source| {
            VhostUserVsockError::BindSocket {
                path: config.socket.clone(),
                source,
            }
        })?;
        let socket_file = SocketFile::record(&config.socket);
        let files = vec![socket_file, uds_file];

        let daemon = match Daemon::new(
            "husk-vsock".to_string(),
            backend,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        ) {
            Ok(d) => d,
            Err(e) => {
                files[0].remove_if_ours();
                return Err(VhostUserVsockError::Daemon(e.to_string()));
            }
        };
        for handler in daemon.get_epoll_handlers() {
            if let Err(e) =
                handler.register_listener(backend_fd, backend_events, u64::from(BACKEND_EVENT))
            {
                files[0].remove_if_ours();
                return Err(VhostUserVsockError::RegisterBackend(e));
            }
        }
        Ok(VhostUserVsockServer {
            daemon,
            listener: Listener::from(socket),
            files,
        })
    }

    /// The socket files this server created (vhost-user first, then hybrid vsock), e.g. for a
    /// signal handler that must clean up.
    pub fn socket_files(&self) -> Vec<SocketFile> {
        self.files.clone()
    }

    /// Accept one frontend and serve it until it disconnects. A clean disconnect is `Ok`.
    pub fn run(mut self) -> Result<(), VhostUserVsockError> {
        info!(
            "vsock: waiting for a vhost-user frontend on {}",
            self.files[0].path().display()
        );
        self.daemon
            .start(&mut self.listener)
            .map_err(|e| VhostUserVsockError::Daemon(e.to_string()))?;
        info!("vsock: frontend connected");
        let result = self.daemon.wait();
        for handler in self.daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        match result {
            Ok(()) => Ok(()),
            Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => Ok(()),
            Err(e) => Err(VhostUserVsockError::Daemon(e.to_string())),
        }
    }
}

impl Drop for VhostUserVsockServer {
    fn drop(&mut self) {
        // The muxer removes the hybrid socket itself when the backend is dropped; removing it
        // here too makes that independent of who still holds the backend.
        for f in &self.files {
            f.remove_if_ours();
        }
    }
}
