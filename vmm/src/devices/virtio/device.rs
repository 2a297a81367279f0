//! The seam between a virtio device and its transport.
//!
//! The transport ([`super::mmio::MmioTransport`]) owns the register protocol: feature
//! negotiation, queue set-up, device status. Once the driver sets DRIVER_OK it hands the device
//! the guest memory, the configured queues and the interrupt; from then on it forwards queue
//! notifications. The device never sees a register.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use crate::devices::legacy::EventFdTrigger;

/// Guest memory as the devices of husk-vmm see it.
pub type GuestMem = GuestMemoryMmap<()>;

/// Why a device refused to start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver configured a different number of queues than the device has.
    #[error("device expects {expected} queues, got {got}")]
    QueueCount {
        /// What the device has.
        expected: usize,
        /// What it got.
        got: usize,
    },
    /// Device-specific failure.
    #[error("{0}")]
    Device(String),
}

/// The interrupt of one virtio device: the ISR status bits and the line (an irqfd).
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    line: EventFdTrigger,
}

impl VirtioInterrupt {
    /// ISR bit: a used ring was updated.
    pub const USED_RING: u32 = 1;
    /// ISR bit: the configuration changed.
    pub const CONFIG_CHANGE: u32 = 2;

    /// An interrupt raised through `line`.
    pub fn new(line: EventFdTrigger) -> VirtioInterrupt {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            line,
        }
    }

    /// Set `bits` in the ISR status and raise the line.
    pub fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = vm_superio::Trigger::trigger(&self.line) {
            tracing::warn!("virtio: cannot raise the interrupt: {e}");
        }
    }

    /// Signal a used-ring update.
    pub fn signal_used_queue(&self) {
        self.signal(Self::USED_RING);
    }

    /// The ISR status.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledged `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The eventfd behind the line.
    pub fn line(&self) -> &EventFdTrigger {
        &self.line
    }
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (virtio spec 5).
    fn device_type(&self) -> u32;
    /// The largest size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits the device offers.
    fn device_features(&self) -> u64;
    /// The driver accepted `features` (a subset of [`device_features`](Self::device_features)).
    fn ack_features(&mut self, features: u64);
    /// Read the device configuration space; bytes outside it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write the device configuration space (ignored by read-only spaces).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Start the device: the driver set DRIVER_OK with these queues.
    fn activate(
        &mut self,
        mem: Arc<GuestMem>,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError>;
    /// The driver notified queue `index` (already checked to be a queue of the device).
    fn queue_notify(&mut self, index: usize);
    /// The driver reset the device: drop the queues, go back to the pre-activation state.
    fn reset(&mut self);
}
