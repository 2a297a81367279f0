//! virtio devices. Each device lives in its own folder with the same roles in each: `mod.rs`
//! (story, constants in `defs`, errors, seam traits), `device.rs` (queue processing), the
//! device's host side, and `test_utils.rs`.
//!
//! [`device::VirtioDevice`] is the seam between a device and its transport; the transport of
//! husk-vmm is [`mmio`] (virtio-mmio, register layout version 2).

pub mod device;
pub mod fs;
pub mod mmio;
pub mod rng;
pub mod vsock;

pub use device::{GuestMem, VirtioDevice, VirtioInterrupt};
