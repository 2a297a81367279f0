//! Legacy PC devices on the port-I/O bus: the 8250 serial port and the i8042 controller (only
//! its reset line). The PIC, PIT and IOAPIC are KVM's in-kernel ones.

pub mod i8042;
pub mod serial;

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line or event raised by writing an eventfd (an irqfd for interrupts).
#[derive(Clone, Debug)]
pub struct EventFdTrigger(pub Arc<EventFd>);

impl EventFdTrigger {
    /// A trigger on a new non-blocking eventfd.
    pub fn new() -> std::io::Result<EventFdTrigger> {
        Ok(EventFdTrigger(Arc::new(EventFd::new(libc::EFD_NONBLOCK)?)))
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
