//! ioeventfds for QueueNotify.
//!
//! For each queue of a device, an eventfd is registered with `KVM_IOEVENTFD` on the address of
//! the QueueNotify register (`base + 0x50`), length 4, matching the queue index as data. A guest
//! write of that index then only signals the eventfd and the vCPU goes on without leaving KVM;
//! the VMM's event loop polls the eventfds ([`QueueNotifier::fd`]) and hands each notification
//! to the transport ([`QueueNotifier::handle`]), which checks it exactly as the register path
//! does (device activated, queue exists). Writes that match no ioeventfd (another value, another
//! width) still exit to the VMM and take the register path.
//!
//! Registration can fail (a KVM without ioeventfd, the kernel's limit on ioeventfds): then that
//! queue keeps the MMIO-exit path and a warning says so.

use std::io::ErrorKind;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::defs::QUEUE_NOTIFY;
use super::MmioTransport;
use crate::devices::bus::lock;
use crate::vstate::vm::Vm;

/// The ioeventfd of one queue and the transport it notifies.
pub struct QueueNotifier {
    evt: EventFd,
    transport: Arc<Mutex<MmioTransport>>,
    index: usize,
}

impl QueueNotifier {
    /// The eventfd to poll for readability.
    pub fn fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }

    /// The queue index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The eventfd is readable: consume it and notify the queue once.
    pub fn handle(&self) {
        match self.evt.read() {
            Ok(count) => lock(&self.transport).notify_from_ioeventfd(self.index, count),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => tracing::warn!("virtio-mmio: queue {} ioeventfd: {e}", self.index),
        }
    }
}

/// Register an ioeventfd for every queue of the device at `base`. Returns the notifiers that
/// KVM accepted; queues left out keep the MMIO-exit path (logged).
pub fn register_queue_notifiers(
    vm: &Vm,
    base: u64,
    transport: &Arc<Mutex<MmioTransport>>,
) -> Vec<QueueNotifier> {
    let queues = lock(transport).num_queues();
    let mut out = Vec::with_capacity(queues);
    for index in 0..queues {
        let evt = match EventFd::new(EFD_NONBLOCK) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(
                    "virtio-mmio at {base:#x}: no eventfd for queue {index} ({e}); its notifications exit to the VMM"
                );
                continue;
            }
        };
        if let Err(e) = vm.register_ioeventfd(&evt, base + QUEUE_NOTIFY, index as u32) {
            tracing::warn!(
                "virtio-mmio at {base:#x}: {e}; notifications of queue {index} exit to the VMM"
            );
            continue;
        }
        out.push(QueueNotifier {
            evt,
            transport: transport.clone(),
            index,
        });
    }
    lock(transport).set_ioeventfd_queues(out.len() as u32);
    out
}
