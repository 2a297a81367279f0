//! The virtio-mmio transport (virtio spec 4.2, register layout version 2, "modern").
//!
//! Each device gets a 4 KiB window in the MMIO gap and an IRQ; the guest learns about it from a
//! `virtio_mmio.device=4K@<base>:<irq>` word on the kernel command line. The driver:
//!
//! 1. reads MagicValue, Version, DeviceID;
//! 2. writes Status ACKNOWLEDGE, then DRIVER;
//! 3. reads DeviceFeatures (two 32-bit halves via DeviceFeaturesSel), writes DriverFeatures;
//! 4. sets FEATURES_OK and reads Status back: the bit stays only if the features are a subset of
//!    the offer and include VERSION_1;
//! 5. per queue: QueueSel, QueueNumMax, QueueNum, the three ring addresses, QueueReady = 1;
//! 6. sets DRIVER_OK: the transport checks every ready queue against guest memory and activates
//!    the device ([`super::VirtioDevice::activate`]);
//! 7. kicks queues with QueueNotify, reads InterruptStatus and writes InterruptACK.
//!
//! Every register access comes from the guest: unknown offsets, wrong widths, out-of-order
//! status bits, queue set-up after DRIVER_OK or bad ring addresses are ignored or refused
//! (DEVICE_NEEDS_RESET), never a panic.
//!
//! Queue notifications take the fast path where KVM allows it ([`notify`]): an ioeventfd per
//! queue on the QueueNotify address, matched on the queue index, so the guest's write completes
//! inside KVM and the VMM's event loop processes the queue. Where registration fails, or with
//! `ioeventfd: false`, the write is an MMIO exit handled on the vCPU thread, as every other
//! register. [`NotifyStats`] counts both paths.

pub mod notify;
mod transport;

pub use notify::{register_queue_notifiers, QueueNotifier};
pub use transport::{MmioTransport, NotifyStats};

/// Register offsets and values of virtio-mmio version 2.
pub mod defs {
    /// "virt", little endian.
    pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
    /// Register layout version 2 (modern).
    pub const MMIO_VERSION: u32 = 2;
    /// Vendor id reported by husk's devices.
    pub const VENDOR_ID: u32 = 0x4b53_5548; // "HUSK"

    /// 0x000 R: magic.
    pub const MAGIC_VALUE: u64 = 0x000;
    /// 0x004 R: version.
    pub const VERSION: u64 = 0x004;
    /// 0x008 R: device id.
    pub const DEVICE_ID: u64 = 0x008;
    /// 0x00c R: vendor id.
    pub const VENDOR: u64 = 0x00c;
    /// 0x010 R: device features (32 bits chosen by DEVICE_FEATURES_SEL).
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// 0x014 W.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// 0x020 W: driver features.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// 0x024 W.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// 0x030 W: queue select.
    pub const QUEUE_SEL: u64 = 0x030;
    /// 0x034 R: largest size of the selected queue (0: no such queue).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// 0x038 W: size of the selected queue.
    pub const QUEUE_NUM: u64 = 0x038;
    /// 0x044 RW: the selected queue is ready.
    pub const QUEUE_READY: u64 = 0x044;
    /// 0x050 W: notify a queue (value = queue index).
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// 0x060 R: interrupt status.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// 0x064 W: interrupt acknowledge.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// 0x070 RW: device status.
    pub const STATUS: u64 = 0x070;
    /// 0x080/0x084 W: descriptor table address.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// High half.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// 0x090/0x094 W: available ring (driver area) address.
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    /// High half.
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    /// 0x0a0/0x0a4 W: used ring (device area) address.
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    /// High half.
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    /// 0x0fc R: configuration generation.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// 0x100: device configuration space.
    pub const CONFIG_SPACE: u64 = 0x100;
    /// Size of the register window.
    pub const WINDOW_SIZE: u64 = 0x1000;

    /// Status: the guest noticed the device.
    pub const STATUS_ACKNOWLEDGE: u32 = 1;
    /// Status: the guest has a driver.
    pub const STATUS_DRIVER: u32 = 2;
    /// Status: the driver is ready.
    pub const STATUS_DRIVER_OK: u32 = 4;
    /// Status: features negotiated.
    pub const STATUS_FEATURES_OK: u32 = 8;
    /// Status: the device hit an error and needs a reset.
    pub const STATUS_DEVICE_NEEDS_RESET: u32 = 64;
    /// Status: the driver gave up.
    pub const STATUS_FAILED: u32 = 128;
}
