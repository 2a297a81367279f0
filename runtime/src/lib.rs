//! husk-runtime: sandbox lifecycle for husk.
//!
//! A sandbox is one VM whose PID 1 is `husk-agent`. This crate starts it
//! through a [`hypervisor::Hypervisor`] backend (QEMU today; husk-vmm on
//! hosts with hardware KVM next), reaches the agent over hybrid vsock
//! ([`agent_client`]), and tears everything down on every path. The
//! containerd shim and the `husk` CLI are both built on it.

pub mod agent_client;
pub mod bundle;
pub mod config;
pub mod container;
pub mod error;
pub mod host;
pub mod host_cgroup;
pub mod hypervisor;
pub mod kernel_cmdline;
pub mod network;
pub mod process;
pub mod remains;
pub mod sandbox;
pub mod shared_fs;
pub mod stdio;

pub use config::RuntimeConfig;
pub use error::{Error, Result};
pub use sandbox::Sandbox;
pub use stdio::Stdio;
