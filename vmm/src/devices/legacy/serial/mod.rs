//! The 8250 UART on COM1 (port 0x3f8, IRQ 4): guest output goes to the console log.
//!
//! The register model is vm-superio's `Serial`; this wrapper puts it on the port bus, raises
//! its interrupt through an irqfd, and ignores accesses that are not one byte wide (the guest
//! chooses the width).

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::EventFdTrigger;
use crate::devices::bus::BusDevice;

/// COM1's base port.
pub const COM1_PORT: u64 = 0x3f8;
/// Ports the UART occupies.
pub const COM_PORT_LEN: u64 = 8;

/// The serial port device.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialDevice {
    /// A UART that writes guest output to `out` and raises `irq`.
    pub fn new(irq: EventFdTrigger, out: Box<dyn Write + Send>) -> SerialDevice {
        SerialDevice {
            serial: Serial::new(irq, out),
        }
    }

    /// Feed host input to the guest (received-data FIFO).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) if u64::from(off) < COM_PORT_LEN => data[0] = self.serial.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [value]) = (u8::try_from(offset), data) {
            if u64::from(off) < COM_PORT_LEN {
                if let Err(e) = self.serial.write(off, *value) {
                    tracing::debug!("serial: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guest_output_reaches_the_sink_and_raises_the_irq() {
        let sink = Sink::default();
        let irq = EventFdTrigger::new().unwrap();
        let mut dev = SerialDevice::new(irq.clone(), Box::new(sink.clone()));
        // Enable the THR-empty interrupt (IER bit 1).
        dev.write(1, &[0x02]);
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        assert!(irq.0.read().unwrap() >= 1);
        // LSR: THR empty and line idle.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let sink = Sink::default();
        let mut dev = SerialDevice::new(EventFdTrigger::new().unwrap(), Box::new(sink.clone()));
        dev.write(0, b"ab");
        dev.write(8, b"c");
        dev.write(u64::MAX, b"d");
        let mut w = [0u8; 2];
        dev.read(0, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        let mut b = [0u8];
        dev.read(300, &mut b);
        assert_eq!(b, [0xff]);
        assert!(sink.0.lock().unwrap().is_empty());
    }

    #[test]
    fn input_is_readable_by_the_guest() {
        let mut dev = SerialDevice::new(EventFdTrigger::new().unwrap(), Box::new(Sink::default()));
        assert_eq!(dev.enqueue_input(b"k"), 1);
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert_eq!(b, [b'k']);
    }
}
