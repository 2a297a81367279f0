//! Emulated devices, one folder per device family: [`legacy`] (serial, i8042) on the port-I/O
//! bus and [`virtio`] devices behind virtio-mmio on the MMIO bus ([`bus`]).

pub mod bus;
pub mod legacy;
pub mod virtio;
