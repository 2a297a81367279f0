//! [`MmioTransport`]: the register state machine of one virtio-mmio device.

use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};

use super::defs::*;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::{GuestMem, VirtioDevice, VirtioInterrupt};

/// One virtio device behind the virtio-mmio register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: Arc<GuestMem>,
    interrupt: Arc<VirtioInterrupt>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    config_generation: u32,
    activated: bool,
    stats: NotifyStats,
}

/// How the driver's queue notifications reached the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NotifyStats {
    /// Queues whose QueueNotify writes KVM signals on an ioeventfd.
    pub ioeventfd_queues: u32,
    /// Notifications delivered through an ioeventfd (no exit to the VMM).
    pub via_ioeventfd: u64,
    /// QueueNotify writes that exited to the VMM (MMIO exits on a vCPU thread).
    pub via_exit: u64,
}

impl MmioTransport {
    /// Put `device` behind a register window; `interrupt` is its IRQ.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: Arc<GuestMem>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> MmioTransport {
        let queues = fresh_queues(device.as_ref());
        MmioTransport {
            device,
            mem,
            interrupt,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            config_generation: 0,
            activated: false,
            stats: NotifyStats::default(),
        }
    }

    /// Number of queues of the device.
    pub fn num_queues(&self) -> usize {
        self.device.queue_max_sizes().len()
    }

    /// Record that KVM signals queue notifications of `queues` queues on ioeventfds.
    pub fn set_ioeventfd_queues(&mut self, queues: u32) {
        self.stats.ioeventfd_queues = queues;
    }

    /// How notifications arrived so far.
    pub fn notify_stats(&self) -> NotifyStats {
        self.stats
    }

    /// The ioeventfd of queue `index` fired `count` times (KVM coalesces writes that arrive
    /// before the VMM reads the eventfd: the queue is processed once).
    pub fn notify_from_ioeventfd(&mut self, index: usize, count: u64) {
        self.stats.via_ioeventfd += count;
        self.notify_queue(index);
    }

    fn notify_queue(&mut self, index: usize) {
        if self.activated && index < self.queues.len() {
            self.device.queue_notify(index);
        } else {
            tracing::debug!("virtio-mmio: notify of queue {index} ignored");
        }
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device runs (DRIVER_OK accepted).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.driver_features
    }

    /// The device.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK, while the selected
    /// queue is not ready.
    fn queue_setup_allowed(&self) -> bool {
        self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED) == STATUS_FEATURES_OK
    }

    fn update_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if !self.queue_setup_allowed() {
            tracing::debug!("virtio-mmio: queue write outside set-up ignored");
            return;
        }
        if let Some(q) = self.selected_queue() {
            if !q.ready() {
                f(q);
            }
        }
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.queues = fresh_queues(self.device.as_ref());
        self.interrupt.ack(u32::MAX);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & STATUS_FAILED != 0 {
            self.status |= STATUS_FAILED;
            return;
        }
        // The driver may only add bits, in order: ACK, DRIVER, FEATURES_OK, DRIVER_OK.
        if value & self.status != self.status & !STATUS_DEVICE_NEEDS_RESET {
            tracing::debug!(
                "virtio-mmio: status {value:#x} clears bits of {:#x}",
                self.status
            );
            return;
        }
        let steps = [
            (STATUS_ACKNOWLEDGE, 0),
            (STATUS_DRIVER, STATUS_ACKNOWLEDGE),
            (STATUS_FEATURES_OK, STATUS_DRIVER),
            (STATUS_DRIVER_OK, STATUS_FEATURES_OK),
        ];
        for (bit, needs) in steps {
            if value & bit == 0 || self.status & bit != 0 {
                continue;
            }
            if self.status & needs != needs {
                tracing::debug!("virtio-mmio: status bit {bit:#x} out of order");
                return;
            }
            match bit {
                STATUS_FEATURES_OK => {
                    if !self.features_acceptable() {
                        tracing::debug!(
                            "virtio-mmio: refusing driver features {:#x}",
                            self.driver_features
                        );
                        return;
                    }
                    self.device.ack_features(self.driver_features);
                }
                STATUS_DRIVER_OK if !self.activate() => {
                    self.status |= STATUS_DEVICE_NEEDS_RESET;
                    self.interrupt.signal(VirtioInterrupt::CONFIG_CHANGE);
                    return;
                }
                _ => {}
            }
            self.status |= bit;
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.device_features();
        self.driver_features & !offered == 0
            && self.driver_features & (1u64 << VIRTIO_F_VERSION_1) != 0
    }

    fn activate(&mut self) -> bool {
        let event_idx = self.driver_features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut handed = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter_mut().enumerate() {
            if q.ready() && !q.is_valid(&*self.mem) {
                tracing::warn!("virtio-mmio: queue {i} rings lie outside guest memory");
                return false;
            }
            q.set_event_idx(event_idx);
            match Queue::try_from(q.state()) {
                Ok(copy) => handed.push(copy),
                Err(e) => {
                    tracing::warn!("virtio-mmio: queue {i}: {e}");
                    return false;
                }
            }
        }
        match self
            .device
            .activate(self.mem.clone(), handed, self.interrupt.clone())
        {
            Ok(()) => {
                self.activated = true;
                true
            }
            Err(e) => {
                tracing::warn!("virtio-mmio: device did not start: {e}");
                false
            }
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            MAGIC_VALUE => MMIO_MAGIC_VALUE,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.device.device_type(),
            VENDOR => VENDOR_ID,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.device_features() as u32,
                1 => (self.device.device_features() >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            INTERRUPT_STATUS => self.interrupt.status(),
            STATUS => self.status,
            CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!("virtio-mmio: read of register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = v,
            DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            DRIVER_FEATURES => {
                if self.status & (STATUS_DRIVER | STATUS_FEATURES_OK) != STATUS_DRIVER {
                    tracing::debug!(
                        "virtio-mmio: driver features written in status {:#x}",
                        self.status
                    );
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            QUEUE_SEL => self.queue_sel = v,
            QUEUE_NUM => self.update_queue(|q| q.set_size(v as u16)),
            QUEUE_READY => {
                if v == 0 || v == 1 {
                    self.update_queue(|q| q.set_ready(v == 1));
                }
            }
            QUEUE_DESC_LOW => self.update_queue(|q| q.set_desc_table_address(Some(v), None)),
            QUEUE_DESC_HIGH => self.update_queue(|q| q.set_desc_table_address(None, Some(v))),
            QUEUE_AVAIL_LOW => self.update_queue(|q| q.set_avail_ring_address(Some(v), None)),
            QUEUE_AVAIL_HIGH => self.update_queue(|q| q.set_avail_ring_address(None, Some(v))),
            QUEUE_USED_LOW => self.update_queue(|q| q.set_used_ring_address(Some(v), None)),
            QUEUE_USED_HIGH => self.update_queue(|q| q.set_used_ring_address(None, Some(v))),
            QUEUE_NOTIFY => {
                self.stats.via_exit += 1;
                self.notify_queue(v as usize);
            }
            INTERRUPT_ACK => self.interrupt.ack(v),
            STATUS => self.set_status(v),
            _ => tracing::debug!("virtio-mmio: write of register {offset:#x}"),
        }
    }
}

fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device
        .queue_max_sizes()
        .iter()
        .filter_map(|&max| Queue::new(max).ok())
        .collect()
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            data.fill(0);
            self.device.read_config(offset - CONFIG_SPACE, data);
        } else if data.len() == 4 && offset % 4 == 0 {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            tracing::debug!("virtio-mmio: {}-byte read at {offset:#x}", data.len());
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if self.status & STATUS_DRIVER != 0 && self.status & STATUS_FAILED == 0 {
                self.device.write_config(offset - CONFIG_SPACE, data);
                self.config_generation = self.config_generation.wrapping_add(1);
            }
        } else if let (Ok(bytes), 0) = (<[u8; 4]>::try_from(data), offset % 4) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        } else {
            tracing::debug!("virtio-mmio: {}-byte write at {offset:#x}", data.len());
        }
    }
}

#[cfg(test)]
#[path = "transport_tests.rs"]
mod tests;
