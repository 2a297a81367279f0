//! husk-vmm: the virtual machine monitor of husk.
//!
//! Two things live here:
//!
//! - the virtio-vsock device ([`devices::virtio::vsock`]), written once: QEMU reaches it through
//!   the `husk-vsock` vhost-user backend binary, and husk's own VMM runs it in-process over
//!   virtio-mmio;
//! - husk's own KVM micro-VMM (the `husk-vmm` binary), built from the rust-vmm crates:
//!   [`arch`] (x86_64 boot layout and vCPU state), [`vstate`] (the KVM VM and its vCPU
//!   threads), [`devices`] (serial, i8042, virtio-mmio, virtio-rng, vsock), [`builder`] (config
//!   to running VM), [`vmm`] (the event loop and teardown), [`api`] (the control socket),
//!   [`config`] and [`seccomp`] (the system-call filters of both binaries).

pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod devices;
pub mod seccomp;
pub mod vmm;
pub mod vstate;
