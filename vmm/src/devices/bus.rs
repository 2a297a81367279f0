//! Address buses: the port-I/O bus and the MMIO bus. A vCPU exit for an address is routed to the
//! device whose range holds it, with the offset into that range. Addresses and access sizes come
//! from the guest: an access that hits no device reads as all-ones and is otherwise ignored.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset` into the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors of bus set-up.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Two devices claim overlapping ranges, or a range is empty or wraps.
    #[error("bus range {base:#x}+{len:#x} is empty, wraps, or overlaps another device")]
    Overlap {
        /// Base of the refused range.
        base: u64,
        /// Length of the refused range.
        len: u64,
    },
}

type Shared = Arc<Mutex<dyn BusDevice>>;

/// A bus: non-overlapping ranges, each owned by a device.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, Shared)>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r: Vec<(u64, u64)> = self.ranges.iter().map(|(b, (l, _))| (*b, *l)).collect();
        f.debug_struct("Bus").field("ranges", &r).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Bus {
        Bus::default()
    }

    /// Give `[base, base + len)` to `device`.
    pub fn insert(&mut self, base: u64, len: u64, device: Shared) -> Result<(), BusError> {
        let err = BusError::Overlap { base, len };
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        if len == 0 {
            return Err(err);
        }
        if let Some((b, (l, _))) = self.ranges.range(..end).next_back() {
            if b + l > base {
                return Err(err);
            }
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    /// The device owning `addr` and the offset of `addr` in its range, if the whole access of
    /// `size` bytes fits in that range.
    fn resolve(&self, addr: u64, size: usize) -> Option<(&Shared, u64)> {
        let (base, (len, dev)) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(size as u64)?;
        (end <= *len).then_some((dev, offset))
    }

    /// Route a guest read. Returns whether a device took it; if not, `data` is all-ones.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((dev, offset)) => {
                lock(dev).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Route a guest write. Returns whether a device took it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((dev, offset)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Lock a device, recovering from a poisoned lock (a device that panicked keeps its state).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Rec {
        writes: Vec<(u64, Vec<u8>)>,
    }
    impl BusDevice for Rec {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlaps() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Rec::default()));
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        assert!(bus
            .insert(0x3f0, 9, Arc::new(Mutex::new(Rec::default())))
            .is_err());
        assert!(bus
            .insert(0x3ff, 1, Arc::new(Mutex::new(Rec::default())))
            .is_err());
        assert!(bus
            .insert(0x400, 0, Arc::new(Mutex::new(Rec::default())))
            .is_err());
        assert!(bus
            .insert(u64::MAX, 2, Arc::new(Mutex::new(Rec::default())))
            .is_err());
        bus.insert(0x400, 1, Arc::new(Mutex::new(Rec::default())))
            .unwrap();
        bus.insert(0x3f0, 8, Arc::new(Mutex::new(Rec::default())))
            .unwrap();

        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b, [5]);
        assert!(bus.write(0x3f8, b"x"));
        assert_eq!(a.lock().unwrap().writes, vec![(0, b"x".to_vec())]);
        // Straddling the end of a range, or hitting nothing: all-ones, not taken.
        let mut w = [0u8; 4];
        assert!(!bus.read(0x3fe, &mut w));
        assert_eq!(w, [0xff; 4]);
        assert!(!bus.read(0x80, &mut b));
        assert!(!bus.write(0x80, &[0]));
        assert!(!bus.write(u64::MAX, &[0, 0]));
    }
}
