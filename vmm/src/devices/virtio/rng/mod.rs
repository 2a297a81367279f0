//! virtio-rng (entropy device, virtio spec 5.4): one queue of device-writable buffers that the
//! device fills with bytes from the host's `getrandom(2)`.
//!
//! Buffers come from the guest: each descriptor address is checked against guest memory by the
//! write itself, read-only descriptors are skipped, and at most [`defs::MAX_BYTES_PER_CHAIN`]
//! bytes are produced per chain, so a guest cannot make the device allocate or loop without
//! bound.

pub mod device;

pub use device::Rng;

/// Constants of the rng device.
pub mod defs {
    /// virtio device id of the entropy device.
    pub const VIRTIO_ID_RNG: u32 = 4;
    /// Largest queue size offered.
    pub const QUEUE_SIZE: u16 = 256;
    /// Most random bytes written for one descriptor chain.
    pub const MAX_BYTES_PER_CHAIN: usize = 64 * 1024;
}
