//! virtio devices. Each device lives in its own folder with the same roles in each: `mod.rs`
//! (story, constants in `defs`, errors, seam traits), `device.rs` (queue processing), the
//! device's host side, and `test_utils.rs`.

pub mod vsock;
