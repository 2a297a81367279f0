use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::devices::legacy::EventFdTrigger;
use crate::devices::virtio::device::ActivateError;
use crate::devices::virtio::mmio::defs;
use crate::devices::virtio::rng::Rng;

const VERSION_1: u64 = 1 << 32;

fn mem() -> Arc<GuestMem> {
    Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap())
}

fn r32(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn w32(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

#[derive(Default)]
struct Calls {
    acked: Option<u64>,
    activated: usize,
    notified: Vec<usize>,
    resets: usize,
    config: Vec<u8>,
}

/// A device double with two queues and 8 bytes of writable config.
struct Fake(Arc<Mutex<Calls>>);

impl VirtioDevice for Fake {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn device_features(&self) -> u64 {
        VERSION_1 | 0b101
    }
    fn ack_features(&mut self, f: u64) {
        self.0.lock().unwrap().acked = Some(f);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = &self.0.lock().unwrap().config;
        for (i, b) in data.iter_mut().enumerate() {
            *b = c.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let c = &mut self.0.lock().unwrap().config;
        for (i, b) in data.iter().enumerate() {
            if let Some(x) = c.get_mut(offset as usize + i) {
                *x = *b;
            }
        }
    }
    fn activate(
        &mut self,
        _mem: Arc<GuestMem>,
        queues: Vec<Queue>,
        _irq: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        assert_eq!(queues.len(), 2);
        self.0.lock().unwrap().activated += 1;
        Ok(())
    }
    fn queue_notify(&mut self, index: usize) {
        self.0.lock().unwrap().notified.push(index);
    }
    fn reset(&mut self) {
        self.0.lock().unwrap().resets += 1;
    }
}

fn fake() -> (MmioTransport, Arc<Mutex<Calls>>, Arc<VirtioInterrupt>) {
    let calls = Arc::new(Mutex::new(Calls {
        config: vec![1, 2, 3, 4, 5, 6, 7, 8],
        ..Default::default()
    }));
    let irq = Arc::new(VirtioInterrupt::new(EventFdTrigger::new().unwrap()));
    let t = MmioTransport::new(Box::new(Fake(calls.clone())), mem(), irq.clone());
    (t, calls, irq)
}

/// Steps 1-4 of the driver sequence, accepting `features`.
fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
    w32(t, defs::STATUS, defs::STATUS_ACKNOWLEDGE);
    w32(
        t,
        defs::STATUS,
        defs::STATUS_ACKNOWLEDGE | defs::STATUS_DRIVER,
    );
    w32(t, defs::DRIVER_FEATURES_SEL, 0);
    w32(t, defs::DRIVER_FEATURES, features as u32);
    w32(t, defs::DRIVER_FEATURES_SEL, 1);
    w32(t, defs::DRIVER_FEATURES, (features >> 32) as u32);
    w32(t, defs::STATUS, 0b1011);
    r32(t, defs::STATUS)
}

/// Set up queue `sel` of `size` at desc/avail/used addresses.
fn setup_queue(t: &mut MmioTransport, sel: u32, size: u32, base: u64) {
    w32(t, defs::QUEUE_SEL, sel);
    w32(t, defs::QUEUE_NUM, size);
    w32(t, defs::QUEUE_DESC_LOW, base as u32);
    w32(t, defs::QUEUE_DESC_HIGH, 0);
    w32(t, defs::QUEUE_AVAIL_LOW, (base + 0x1000) as u32);
    w32(t, defs::QUEUE_AVAIL_HIGH, 0);
    w32(t, defs::QUEUE_USED_LOW, (base + 0x2000) as u32);
    w32(t, defs::QUEUE_USED_HIGH, 0);
    w32(t, defs::QUEUE_READY, 1);
}

#[test]
fn identification_registers() {
    let (mut t, _, _) = fake();
    assert_eq!(r32(&mut t, defs::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(r32(&mut t, defs::VERSION), 2);
    assert_eq!(r32(&mut t, defs::DEVICE_ID), 42);
    assert_eq!(r32(&mut t, defs::VENDOR), defs::VENDOR_ID);
    w32(&mut t, defs::DEVICE_FEATURES_SEL, 0);
    assert_eq!(r32(&mut t, defs::DEVICE_FEATURES), 0b101);
    w32(&mut t, defs::DEVICE_FEATURES_SEL, 1);
    assert_eq!(r32(&mut t, defs::DEVICE_FEATURES), 1);
    w32(&mut t, defs::DEVICE_FEATURES_SEL, 7);
    assert_eq!(r32(&mut t, defs::DEVICE_FEATURES), 0);
    w32(&mut t, defs::QUEUE_SEL, 1);
    assert_eq!(r32(&mut t, defs::QUEUE_NUM_MAX), 8);
    w32(&mut t, defs::QUEUE_SEL, 2);
    assert_eq!(r32(&mut t, defs::QUEUE_NUM_MAX), 0);
}

#[test]
fn odd_widths_and_offsets_are_harmless() {
    let (mut t, _, _) = fake();
    let mut b = [0xaau8; 2];
    t.read(defs::MAGIC_VALUE, &mut b);
    assert_eq!(b, [0, 0]);
    let mut b = [0xaau8; 4];
    t.read(0x2, &mut b);
    assert_eq!(b, [0; 4]);
    t.read(0xfe0, &mut b);
    t.write(defs::STATUS, &[1]);
    t.write(0x71, &1u32.to_le_bytes());
    assert_eq!(r32(&mut t, defs::STATUS), 0);
    let mut big = [0u8; 8];
    t.read(u64::MAX - 8, &mut big);
    t.write(u64::MAX - 8, &big);
    // Config: 8 bytes, the rest reads as zero.
    let mut c = [0u8; 4];
    t.read(defs::CONFIG_SPACE + 6, &mut c);
    assert_eq!(c, [7, 8, 0, 0]);
}

#[test]
fn features_ok_needs_a_subset_with_version_1() {
    let (mut t, calls, _) = fake();
    // Not offered: bit 1.
    assert_eq!(
        negotiate(&mut t, VERSION_1 | 0b10) & defs::STATUS_FEATURES_OK,
        0
    );
    assert!(calls.lock().unwrap().acked.is_none());
    w32(&mut t, defs::STATUS, 0);
    // Legacy driver (no VERSION_1).
    assert_eq!(negotiate(&mut t, 0b1) & defs::STATUS_FEATURES_OK, 0);
    w32(&mut t, defs::STATUS, 0);
    assert_eq!(negotiate(&mut t, VERSION_1 | 0b100), 0b1011);
    assert_eq!(calls.lock().unwrap().acked, Some(VERSION_1 | 0b100));
    assert_eq!(t.acked_features(), VERSION_1 | 0b100);
    // Features are frozen after FEATURES_OK.
    w32(&mut t, defs::DRIVER_FEATURES_SEL, 0);
    w32(&mut t, defs::DRIVER_FEATURES, 0b1);
    assert_eq!(t.acked_features(), VERSION_1 | 0b100);
}

#[test]
fn status_bits_must_come_in_order() {
    let (mut t, calls, _) = fake();
    w32(&mut t, defs::STATUS, defs::STATUS_DRIVER);
    assert_eq!(r32(&mut t, defs::STATUS), 0);
    w32(
        &mut t,
        defs::STATUS,
        defs::STATUS_ACKNOWLEDGE | defs::STATUS_DRIVER_OK,
    );
    assert_eq!(r32(&mut t, defs::STATUS), defs::STATUS_ACKNOWLEDGE);
    assert_eq!(calls.lock().unwrap().activated, 0);
    // Dropping a bit without a reset is ignored.
    w32(&mut t, defs::STATUS, defs::STATUS_DRIVER);
    assert_eq!(r32(&mut t, defs::STATUS), defs::STATUS_ACKNOWLEDGE);
    w32(&mut t, defs::STATUS, defs::STATUS_FAILED);
    assert_ne!(r32(&mut t, defs::STATUS) & defs::STATUS_FAILED, 0);
}

#[test]
fn queue_setup_only_between_features_ok_and_driver_ok() {
    let (mut t, calls, _) = fake();
    // Before FEATURES_OK: ignored.
    w32(&mut t, defs::QUEUE_SEL, 0);
    w32(&mut t, defs::QUEUE_READY, 1);
    assert_eq!(r32(&mut t, defs::QUEUE_READY), 0);
    negotiate(&mut t, VERSION_1);
    setup_queue(&mut t, 0, 16, 0x10000);
    setup_queue(&mut t, 1, 8, 0x20000);
    assert_eq!(r32(&mut t, defs::QUEUE_READY), 1);
    // Notify before DRIVER_OK is ignored.
    w32(&mut t, defs::QUEUE_NOTIFY, 0);
    w32(&mut t, defs::STATUS, 0b1111);
    assert_eq!(r32(&mut t, defs::STATUS), 0b1111);
    assert!(t.is_activated());
    assert_eq!(calls.lock().unwrap().activated, 1);
    // After DRIVER_OK the queue registers are frozen.
    w32(&mut t, defs::QUEUE_SEL, 0);
    w32(&mut t, defs::QUEUE_READY, 0);
    assert_eq!(r32(&mut t, defs::QUEUE_READY), 1);
    w32(&mut t, defs::QUEUE_NOTIFY, 1);
    w32(&mut t, defs::QUEUE_NOTIFY, 2);
    w32(&mut t, defs::QUEUE_NOTIFY, u32::MAX);
    assert_eq!(calls.lock().unwrap().notified, vec![1]);
    // Reset returns to the start and resets the device.
    w32(&mut t, defs::STATUS, 0);
    assert_eq!(r32(&mut t, defs::STATUS), 0);
    assert_eq!(r32(&mut t, defs::QUEUE_READY), 0);
    assert_eq!(calls.lock().unwrap().resets, 1);
    assert!(!t.is_activated());
}

#[test]
fn rings_outside_guest_memory_are_refused_at_driver_ok() {
    let (mut t, calls, irq) = fake();
    negotiate(&mut t, VERSION_1);
    setup_queue(&mut t, 0, 16, 0xffff_0000);
    w32(&mut t, defs::STATUS, 0b1111);
    let s = r32(&mut t, defs::STATUS);
    assert_eq!(s & defs::STATUS_DRIVER_OK, 0);
    assert_ne!(s & defs::STATUS_DEVICE_NEEDS_RESET, 0);
    assert_eq!(calls.lock().unwrap().activated, 0);
    assert_ne!(irq.status() & VirtioInterrupt::CONFIG_CHANGE, 0);
    // Rings that start inside guest memory but whose used ring lies past its end.
    w32(&mut t, defs::STATUS, 0);
    negotiate(&mut t, VERSION_1);
    setup_queue(&mut t, 0, 16, 0xfe000);
    w32(&mut t, defs::STATUS, 0b1111);
    assert_eq!(r32(&mut t, defs::STATUS) & defs::STATUS_DRIVER_OK, 0);
}

#[test]
fn config_space_is_written_through_the_device() {
    let (mut t, calls, _) = fake();
    t.write(defs::CONFIG_SPACE, &[9]);
    assert_eq!(calls.lock().unwrap().config[0], 1, "no driver yet");
    negotiate(&mut t, VERSION_1);
    let g = r32(&mut t, defs::CONFIG_GENERATION);
    t.write(defs::CONFIG_SPACE + 1, &[9, 9]);
    assert_eq!(&calls.lock().unwrap().config[..4], &[1, 9, 9, 4]);
    assert_ne!(r32(&mut t, defs::CONFIG_GENERATION), g);
}

#[test]
fn rng_fills_a_guest_buffer_end_to_end() {
    let m = mem();
    let line = EventFdTrigger::new().unwrap();
    let irq = Arc::new(VirtioInterrupt::new(line.clone()));
    let mut t = MmioTransport::new(Box::new(Rng::new()), m.clone(), irq.clone());
    assert_eq!(r32(&mut t, defs::DEVICE_ID), 4);
    assert_eq!(negotiate(&mut t, VERSION_1), 0b1011);
    setup_queue(&mut t, 0, 4, 0x10000);
    w32(&mut t, defs::STATUS, 0b1111);
    assert!(t.is_activated());

    // Descriptor 0: 48 writable bytes at 0x40000; descriptor 1: read-only (skipped).
    let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
        m.write_obj(addr, GuestAddress(0x10000 + 16 * i)).unwrap();
        m.write_obj(len, GuestAddress(0x10000 + 16 * i + 8))
            .unwrap();
        m.write_obj(flags, GuestAddress(0x10000 + 16 * i + 12))
            .unwrap();
        m.write_obj(next, GuestAddress(0x10000 + 16 * i + 14))
            .unwrap();
    };
    desc(0, 0x40000, 48, 2, 0);
    desc(1, 0x50000, 16, 0, 0);
    desc(2, 0xdead_0000, 16, 2, 0); // outside guest memory
    for (slot, head) in [0u16, 1, 2].iter().enumerate() {
        m.write_obj(*head, GuestAddress(0x11004 + 2 * slot as u64))
            .unwrap();
    }
    m.write_obj(3u16, GuestAddress(0x11002)).unwrap();
    w32(&mut t, defs::QUEUE_NOTIFY, 0);

    let used_idx: u16 = m.read_obj(GuestAddress(0x12002)).unwrap();
    assert_eq!(used_idx, 3);
    let lens: Vec<u32> = (0..3)
        .map(|i| m.read_obj(GuestAddress(0x12004 + 8 * i + 4)).unwrap())
        .collect();
    assert_eq!(lens, vec![48, 0, 0]);
    let mut out = [0u8; 48];
    m.read_slice(&mut out, GuestAddress(0x40000)).unwrap();
    assert!(out.iter().any(|b| *b != 0), "random bytes arrived");
    assert_eq!(r32(&mut t, defs::INTERRUPT_STATUS), 1);
    assert!(line.0.read().unwrap() >= 1);
    w32(&mut t, defs::INTERRUPT_ACK, 1);
    assert_eq!(r32(&mut t, defs::INTERRUPT_STATUS), 0);
}

#[test]
fn notifications_from_ioeventfds_are_gated_and_counted_like_register_writes() {
    let (mut t, calls, _) = fake();
    assert_eq!(t.num_queues(), 2);
    // Before DRIVER_OK: counted, not delivered.
    t.notify_from_ioeventfd(0, 1);
    assert!(calls.lock().unwrap().notified.is_empty());
    assert_eq!(negotiate(&mut t, VERSION_1), 0b1011);
    setup_queue(&mut t, 0, 16, 0x10000);
    setup_queue(&mut t, 1, 8, 0x20000);
    w32(&mut t, defs::STATUS, 0b1111);
    assert!(t.is_activated());
    // KVM coalesced three writes: one delivery, three counted.
    t.notify_from_ioeventfd(1, 3);
    t.notify_from_ioeventfd(7, 1);
    w32(&mut t, defs::QUEUE_NOTIFY, 0);
    w32(&mut t, defs::QUEUE_NOTIFY, 9);
    assert_eq!(calls.lock().unwrap().notified, vec![1, 0]);
    t.set_ioeventfd_queues(2);
    assert_eq!(
        t.notify_stats(),
        NotifyStats {
            ioeventfd_queues: 2,
            via_ioeventfd: 5,
            via_exit: 2,
        }
    );
}
