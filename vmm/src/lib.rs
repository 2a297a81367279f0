//! husk-vmm: the virtual machine monitor pieces of husk.
//!
//! So far this is the virtio-vsock device ([`devices::virtio::vsock`]), written once as a
//! library: QEMU reaches it through the `husk-vsock` vhost-user backend binary, and husk's own
//! KVM VMM will run the same device code in-process over virtio-mmio.

pub mod devices;
