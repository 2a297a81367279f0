//! The i8042 keyboard controller, reduced to what a guest uses to reboot: writing `0xfe`
//! (pulse reset line) to the command port 0x64 fires the reset event, which ends the VM.
//! Reads return "no data, buffer empty" so probing drivers give up quickly.

use vm_superio::I8042Device;

use super::EventFdTrigger;
use crate::devices::bus::BusDevice;

/// First port of the controller (data port 0x60); the command/status port is 0x64.
pub const I8042_PORT: u64 = 0x60;
/// Ports the controller occupies (0x60..=0x64).
pub const I8042_PORT_LEN: u64 = 5;
/// The reset command.
pub const CMD_RESET_CPU: u8 = 0xfe;

/// The i8042 device.
pub struct I8042 {
    inner: I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// A controller that signals `reset` when the guest pulses the reset line.
    pub fn new(reset: EventFdTrigger) -> I8042 {
        I8042 {
            inner: I8042Device::new(reset),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) => data[0] = self.inner.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [value]) = (u8::try_from(offset), data) {
            if let Err(e) = self.inner.write(off, *value) {
                tracing::warn!("i8042: cannot signal the reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_fires_the_event() {
        let reset = EventFdTrigger::new().unwrap();
        let mut dev = I8042::new(reset.clone());
        dev.write(4, &[0x01]);
        dev.write(0, &[CMD_RESET_CPU]);
        dev.write(4, &[CMD_RESET_CPU, 0]);
        assert!(reset.0.read().is_err(), "nothing fired yet");
        dev.write(4, &[CMD_RESET_CPU]);
        assert_eq!(reset.0.read().unwrap(), 1);
    }

    #[test]
    fn reads_do_not_panic() {
        let mut dev = I8042::new(EventFdTrigger::new().unwrap());
        let mut b = [0u8];
        dev.read(4, &mut b);
        dev.read(0, &mut b);
        dev.read(u64::MAX, &mut b);
        let mut w = [0u8; 2];
        dev.read(4, &mut w);
        assert_eq!(w, [0xff, 0xff]);
    }
}
