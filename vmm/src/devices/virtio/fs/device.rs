//! [`Fs`]: the virtio-fs device as husk-vmm's transport sees it, and the thread that turns the
//! backend's call eventfds into guest interrupts.

use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::defs::{NUM_QUEUES, QUEUE_SIZE, VIRTIO_ID_FS};
use super::{FsConfigSpace, FsError, FsFrontend, Result};
use crate::devices::bus::lock;
use crate::devices::virtio::device::ActivateError;
use crate::devices::virtio::{GuestMem, VirtioDevice, VirtioInterrupt};

/// epoll token of the stop eventfd; queue `i`'s call eventfd has token `i`.
const TOKEN_STOP: u64 = u64::MAX;
/// epoll token of the vhost-user socket (hang-up only).
const TOKEN_SOCKET: u64 = u64::MAX - 1;

/// Where the interrupt thread delivers: the interrupt of the running driver, if any.
type IrqTarget = Arc<Mutex<Option<Arc<VirtioInterrupt>>>>;

/// The thread that waits on the backend's call eventfds.
struct IrqThread {
    stop: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl IrqThread {
    /// Start it. Everything it needs (eventfds, epoll) is made here, when the VM is built, so
    /// activation later creates no fds and no threads.
    fn spawn(
        calls: &[EventFd],
        socket: RawFd,
        target: IrqTarget,
        signalled: Arc<AtomicU64>,
    ) -> Result<IrqThread> {
        let io = |what| move |source| FsError::Io { what, source };
        let epoll = Epoll::new().map_err(io("epoll_create"))?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(io("eventfd"))?;
        epoll
            .ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_STOP),
            )
            .map_err(io("epoll_ctl"))?;
        let mut mine = Vec::with_capacity(calls.len());
        for (i, c) in calls.iter().enumerate() {
            let c = c.try_clone().map_err(io("dup eventfd"))?;
            epoll
                .ctl(
                    ControlOperation::Add,
                    c.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, i as u64),
                )
                .map_err(io("epoll_ctl"))?;
            mine.push(c);
        }
        // Only hang-ups: replies on the socket belong to the frontend.
        epoll
            .ctl(
                ControlOperation::Add,
                socket,
                EpollEvent::new(EventSet::READ_HANG_UP, TOKEN_SOCKET),
            )
            .map_err(io("epoll_ctl"))?;
        let handle = std::thread::Builder::new()
            .name("virtio-fs-irq".into())
            .spawn(move || irq_loop(&epoll, &mine, socket, &target, &signalled))
            .map_err(io("spawn the interrupt thread"))?;
        Ok(IrqThread {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for IrqThread {
    fn drop(&mut self) {
        if let Err(e) = self.stop.write(1) {
            tracing::warn!("virtio-fs: cannot stop the interrupt thread: {e}");
            return;
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn irq_loop(
    epoll: &Epoll,
    calls: &[EventFd],
    socket: RawFd,
    target: &IrqTarget,
    signalled: &AtomicU64,
) {
    let mut events = [EpollEvent::default(); 8];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("virtio-fs: epoll_wait: {e}; guest interrupts stop");
                return;
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_STOP => return,
                TOKEN_SOCKET => {
                    tracing::error!(
                        "virtio-fs: the vhost-user-fs backend hung up; the guest's shared \
                         directory no longer answers"
                    );
                    let _ = epoll.ctl(ControlOperation::Delete, socket, EpollEvent::default());
                }
                i => {
                    let Some(call) = usize::try_from(i).ok().and_then(|i| calls.get(i)) else {
                        continue;
                    };
                    // Non-blocking: a spurious wake-up reads EAGAIN and is ignored.
                    if call.read().is_err() {
                        continue;
                    }
                    signalled.fetch_add(1, Ordering::Relaxed);
                    let irq = lock(target).clone();
                    if let Some(irq) = irq {
                        irq.signal_used_queue();
                    }
                }
            }
        }
    }
}

/// The virtio-fs device: config space and features here, queues served by a vhost-user backend.
pub struct Fs {
    // Dropped first: the thread polls the frontend's socket fd, so it must end before the
    // frontend closes it.
    _irq: IrqThread,
    frontend: FsFrontend,
    config: FsConfigSpace,
    queue_sizes: [u16; NUM_QUEUES],
    acked: u64,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    target: IrqTarget,
    signalled: Arc<AtomicU64>,
    mem: Option<Arc<GuestMem>>,
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs")
            .field("frontend", &self.frontend)
            .field("acked", &format_args!("{:#x}", self.acked))
            .field("active", &self.mem.is_some())
            .finish()
    }
}

impl Fs {
    /// A virtio-fs device with tag `tag`, served by the vhost-user backend (virtiofsd) listening
    /// on `socket`. Connects and negotiates now, so a missing or unsuitable backend fails the
    /// VM build, not the guest's mount.
    pub fn new(socket: &Path, tag: &str) -> Result<Fs> {
        let config = FsConfigSpace::new(tag)?;
        let frontend = FsFrontend::connect(socket)?;
        Fs::with_frontend(frontend, config)
    }

    /// A device on an already negotiated frontend.
    pub fn with_frontend(frontend: FsFrontend, config: FsConfigSpace) -> Result<Fs> {
        let io = |what| move |source| FsError::Io { what, source };
        let mut kicks = Vec::with_capacity(NUM_QUEUES);
        let mut calls = Vec::with_capacity(NUM_QUEUES);
        for _ in 0..NUM_QUEUES {
            kicks.push(EventFd::new(EFD_NONBLOCK).map_err(io("eventfd"))?);
            calls.push(EventFd::new(EFD_NONBLOCK).map_err(io("eventfd"))?);
        }
        let target: IrqTarget = Arc::new(Mutex::new(None));
        let signalled = Arc::new(AtomicU64::new(0));
        let irq = IrqThread::spawn(
            &calls,
            frontend.socket_fd(),
            target.clone(),
            signalled.clone(),
        )?;
        Ok(Fs {
            _irq: irq,
            frontend,
            config,
            queue_sizes: [QUEUE_SIZE; NUM_QUEUES],
            acked: 0,
            kicks,
            calls,
            target,
            signalled,
            mem: None,
        })
    }

    /// The vhost-user side.
    pub fn frontend(&self) -> &FsFrontend {
        &self.frontend
    }

    /// The configuration space.
    pub fn config_space(&self) -> &FsConfigSpace {
        &self.config
    }

    /// Whether the backend runs the queues (the driver set DRIVER_OK and the backend took them).
    pub fn is_active(&self) -> bool {
        self.mem.is_some()
    }

    /// How many used-buffer notifications the backend has sent so far.
    pub fn calls_signalled(&self) -> u64 {
        self.signalled.load(Ordering::Relaxed)
    }

    /// Queue `index`'s kick eventfd, the one the backend waits on. A KVM ioeventfd on
    /// QueueNotify (datamatch `index`) may point at it directly.
    pub fn kick_eventfd(&self, index: usize) -> Option<&EventFd> {
        self.kicks.get(index)
    }

    fn drain_calls(&self) {
        for c in &self.calls {
            let _ = c.read();
        }
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        self.frontend.guest_features()
    }

    fn ack_features(&mut self, features: u64) {
        tracing::debug!("virtio-fs: driver acked features {features:#x}");
        self.acked = features & self.frontend.guest_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            "virtio-fs: {}-byte write to the read-only config space at {offset:#x} ignored",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: Arc<GuestMem>,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> std::result::Result<(), ActivateError> {
        if queues.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got: queues.len(),
            });
        }
        if self.mem.is_some() {
            self.reset();
        }
        self.drain_calls();
        *lock(&self.target) = Some(interrupt);
        if let Err(e) = self
            .frontend
            .start(&mem, &queues, self.acked, &self.kicks, &self.calls)
        {
            *lock(&self.target) = None;
            return Err(ActivateError::Device(e.to_string()));
        }
        self.mem = Some(mem);
        Ok(())
    }

    fn queue_notify(&mut self, index: usize) {
        if self.mem.is_none() {
            return;
        }
        if let Some(k) = self.kicks.get(index) {
            if let Err(e) = k.write(1) {
                tracing::warn!("virtio-fs: cannot kick queue {index}: {e}");
            }
        }
    }

    fn reset(&mut self) {
        if self.mem.take().is_some() {
            self.frontend.stop();
        }
        *lock(&self.target) = None;
        self.drain_calls();
        self.acked = 0;
    }
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;
