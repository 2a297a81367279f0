//! containerd-shim-husk-v2: the containerd runtime `io.containerd.husk.v2`.
//!
//! containerd starts this binary (shim v2 protocol, sync ttrpc via the
//! `containerd-shim` crate); the long-lived shim owns one husk sandbox VM
//! and runs every container of the pod in it through husk-runtime. See
//! [`shim::HuskShim`] for `start`/`delete` and [`service::TaskService`] for
//! the Task API.

pub mod binlog;
pub mod cleanup;
pub mod config;
pub mod error;
pub mod io;
pub mod owner;
pub mod rootfs;
pub mod service;
pub mod shim;

pub use error::{Result, ShimError};

/// The runtime name containerd knows us by.
pub const RUNTIME_ID: &str = "io.containerd.husk.v2";

/// The annotation by which the CRI plugin groups a pod's containers.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
