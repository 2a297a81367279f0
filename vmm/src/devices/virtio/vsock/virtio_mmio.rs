//! Serving the vsock device in-process, behind husk-vmm's virtio-mmio transport.
//!
//! [`VsockMmioDevice`] is the [`VirtioDevice`] half the transport owns; [`VsockShared`] is the
//! same device state as seen by the VMM's event loop, which polls the muxer's fd and calls
//! [`VsockState::handle_backend_event`]. Both halves lock one mutex: vCPU threads lock it when
//! the guest kicks TX/RX (with the transport already locked), the event loop when a host socket
//! is ready (without the transport), so the lock order is always transport → vsock state.

use std::os::unix::io::RawFd;
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vmm_sys_util::epoll::EventSet;

use super::defs::{NUM_QUEUES, QUEUE_SIZE, RXQ_INDEX, TXQ_INDEX, VIRTIO_ID_VSOCK};
use super::{device_features, VsockDevice, VsockEpollListener, VsockMuxer};
use crate::devices::bus::lock;
use crate::devices::virtio::device::ActivateError;
use crate::devices::virtio::{GuestMem, VirtioDevice, VirtioInterrupt};

struct Active {
    mem: Arc<GuestMem>,
    queues: Vec<Queue>,
    interrupt: Arc<VirtioInterrupt>,
}

/// The vsock device and, once the driver started it, its queues.
pub struct VsockState {
    device: VsockDevice<VsockMuxer>,
    active: Option<Active>,
}

/// The vsock state shared by the transport and the event loop.
pub type VsockShared = Arc<Mutex<VsockState>>;

impl VsockState {
    /// The fd the event loop must poll for the host side (the muxer's epoll fd).
    pub fn backend_fd(&self) -> RawFd {
        self.device.backend().get_polled_fd()
    }

    /// The events to poll the backend fd for.
    pub fn backend_evset(&self) -> EventSet {
        self.device.backend().get_polled_evset()
    }

    /// The device.
    pub fn device(&self) -> &VsockDevice<VsockMuxer> {
        &self.device
    }

    /// The backend fd is ready: let the muxer work, then move its packets to the guest.
    pub fn handle_backend_event(&mut self, evset: EventSet) {
        self.device.notify_backend(evset);
        self.process_rx();
    }

    fn process_rx(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let Some(q) = a.queues.get_mut(RXQ_INDEX) else {
            return;
        };
        match self.device.process_rx(&*a.mem, q) {
            Ok(true) => a.interrupt.signal_used_queue(),
            Ok(false) => {}
            Err(e) => tracing::warn!("vsock: RX queue: {e}"),
        }
    }

    fn process_tx(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let Some(q) = a.queues.get_mut(TXQ_INDEX) else {
            return;
        };
        match self.device.process_tx(&*a.mem, q) {
            Ok(true) => a.interrupt.signal_used_queue(),
            Ok(false) => {}
            Err(e) => tracing::warn!("vsock: TX queue: {e}"),
        }
    }
}

/// The vsock device as a [`VirtioDevice`].
pub struct VsockMmioDevice {
    shared: VsockShared,
    queue_sizes: [u16; NUM_QUEUES],
}

impl VsockMmioDevice {
    /// Wrap `device`. Keep [`shared`](Self::shared) for the event loop.
    pub fn new(device: VsockDevice<VsockMuxer>) -> VsockMmioDevice {
        VsockMmioDevice {
            shared: Arc::new(Mutex::new(VsockState {
                device,
                active: None,
            })),
            queue_sizes: [QUEUE_SIZE; NUM_QUEUES],
        }
    }

    /// The state shared with the event loop.
    pub fn shared(&self) -> VsockShared {
        self.shared.clone()
    }
}

impl VirtioDevice for VsockMmioDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        device_features()
    }

    fn ack_features(&mut self, features: u64) {
        tracing::debug!("vsock: driver acked features {features:#x}");
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let state = lock(&self.shared);
        let bytes = u32::try_from(offset)
            .ok()
            .and_then(|o| state.device.read_config(o, data.len() as u32));
        match bytes {
            Some(b) => data.copy_from_slice(&b),
            None => data.fill(0),
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: Arc<GuestMem>,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got: queues.len(),
            });
        }
        let mut state = lock(&self.shared);
        state.active = Some(Active {
            mem,
            queues,
            interrupt,
        });
        // Host data may already be waiting (a CONNECT that arrived during boot).
        state.process_rx();
        Ok(())
    }

    fn queue_notify(&mut self, index: usize) {
        let mut state = lock(&self.shared);
        match index {
            TXQ_INDEX => {
                state.process_tx();
                state.process_rx();
            }
            RXQ_INDEX => state.process_rx(),
            _ => {}
        }
    }

    fn reset(&mut self) {
        lock(&self.shared).active = None;
    }
}
