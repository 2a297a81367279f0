//! Architecture support: guest memory layout and the boot-time state of vCPUs.
//!
//! husk-vmm runs x86_64 guests only; everything lives in [`x86_64`].

pub mod x86_64;
