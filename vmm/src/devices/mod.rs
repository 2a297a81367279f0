//! Emulated devices, one folder per device family.

pub mod virtio;
