//! virtio-fs (virtio device id 26, virtio spec 5.11) for husk-vmm: a vhost-user frontend for
//! virtiofsd, the counterpart of QEMU's `vhost-user-fs-device`.
//!
//! The guest's FUSE requests never pass through husk-vmm. The device only sets up a vhost-user
//! backend (virtiofsd, listening on a Unix socket) so that the backend can serve the guest's
//! queues directly out of guest memory:
//!
//! - [`vhost_user::FsFrontend`] connects to the socket when the VM is built and negotiates:
//!   `SET_OWNER`, `GET_FEATURES`, `GET_PROTOCOL_FEATURES` / `SET_PROTOCOL_FEATURES`,
//!   `GET_QUEUE_NUM`. What the backend offers decides the virtio features the guest sees.
//! - When the driver sets DRIVER_OK, [`device::Fs`] hands the backend the guest memory (the
//!   memfd behind [`crate::vstate::vm::Vm`], `SET_MEM_TABLE`) and each queue (`SET_VRING_NUM`,
//!   `_ADDR`, `_BASE`, `_CALL`, `_KICK`, `_ENABLE`).
//! - A guest kick (QueueNotify) becomes a write to the queue's kick eventfd. The backend
//!   signals used buffers on the queue's call eventfd; a small thread started with the device
//!   turns those into the virtio-mmio interrupt (ISR bit + irqfd).
//! - A driver reset stops every ring (`GET_VRING_BASE`) and resets the backend's state
//!   (`RESET_DEVICE`), so a later driver can start over.
//!
//! The configuration space (tag and number of request queues) is husk-vmm's own, as in QEMU;
//! the backend's `CONFIG` protocol feature is not used.
//!
//! Trust: the guest is hostile and virtiofsd is not trusted blindly either. Queue addresses from
//! the guest are checked against guest memory before they are translated; every value the
//! backend returns (features, queue count, ring bases) is range-checked; the socket has read and
//! write timeouts, so a stuck backend fails the activation (DEVICE_NEEDS_RESET) instead of
//! hanging a vCPU. A backend that hangs up is logged; the guest's requests then go unanswered
//! (virtiofsd exits when husk-vmm hangs up, and the runtime watches it).

pub mod device;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
pub mod vhost_user;

use std::path::PathBuf;

pub use device::Fs;
pub use vhost_user::FsFrontend;

/// Constants of the virtio-fs device.
pub mod defs {
    use std::time::Duration;

    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

    /// virtio device id of the file system device (virtio spec 5.11).
    pub const VIRTIO_ID_FS: u32 = 26;
    /// Index of the high-priority queue (FUSE_INTERRUPT, FUSE_FORGET).
    pub const HIPRIO_QUEUE: usize = 0;
    /// Index of the (only) request queue.
    pub const REQUEST_QUEUE: usize = 1;
    /// Request queues offered in the configuration space.
    pub const NUM_REQUEST_QUEUES: u32 = 1;
    /// Queues of the device: hiprio plus the request queues.
    pub const NUM_QUEUES: usize = 1 + NUM_REQUEST_QUEUES as usize;
    /// Largest queue size offered to the driver (`QueueNumMax`).
    pub const QUEUE_SIZE: u16 = 1024;
    /// Length of the tag field of the configuration space.
    pub const TAG_LEN: usize = 36;
    /// Size of the configuration space: tag, then `num_request_queues` (le32).
    pub const CONFIG_SIZE: usize = TAG_LEN + 4;

    /// vhost-user: the backend speaks protocol features (bit 30 of GET_FEATURES).
    pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
    /// virtio features husk-vmm may offer the guest, if the backend offers them too.
    pub const GUEST_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | (1 << VIRTIO_RING_F_EVENT_IDX);

    /// How long to keep trying to connect to the backend's socket (it may be just starting).
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// How long one vhost-user message or reply may take before the backend is given up on.
    pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
}

/// Why the virtio-fs device could not be set up or started.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag is empty, too long or contains a NUL byte.
    #[error("invalid virtio-fs tag {0:?}: it must be 1 to 36 bytes of UTF-8 without NUL")]
    InvalidTag(String),
    /// The backend's socket could not be reached.
    #[error("cannot connect to the vhost-user-fs backend at {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A vhost-user request failed (the backend refused it, hung up, or did not answer).
    #[error("vhost-user-fs {request} failed: {source}")]
    Request {
        /// The request.
        request: &'static str,
        /// Why.
        #[source]
        source: vhost::Error,
    },
    /// The backend answered, but with something husk-vmm cannot use.
    #[error("vhost-user-fs backend: {0}")]
    Backend(String),
    /// The guest configured its queues in a way the device cannot hand to the backend.
    #[error("virtio-fs: {0}")]
    Queue(String),
    /// An eventfd, epoll or thread could not be created.
    #[error("virtio-fs: {what}: {source}")]
    Io {
        /// What was being set up.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Result of the virtio-fs device.
pub type Result<T> = std::result::Result<T, FsError>;

/// The virtio-fs configuration space (virtio spec 5.11.4): a NUL-padded tag and the number of
/// request queues.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsConfigSpace {
    bytes: [u8; defs::CONFIG_SIZE],
}

impl FsConfigSpace {
    /// The space for `tag` (what the guest passes to `mount -t virtiofs <tag>`).
    pub fn new(tag: &str) -> Result<FsConfigSpace> {
        let raw = tag.as_bytes();
        if raw.is_empty() || raw.len() > defs::TAG_LEN || raw.contains(&0) {
            return Err(FsError::InvalidTag(tag.to_string()));
        }
        let mut bytes = [0u8; defs::CONFIG_SIZE];
        bytes[..raw.len()].copy_from_slice(raw);
        bytes[defs::TAG_LEN..].copy_from_slice(&defs::NUM_REQUEST_QUEUES.to_le_bytes());
        Ok(FsConfigSpace { bytes })
    }

    /// The whole space.
    pub fn as_bytes(&self) -> &[u8; defs::CONFIG_SIZE] {
        &self.bytes
    }

    /// Read `data.len()` bytes at `offset`; bytes past the end of the space read as zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| self.bytes.get(o))
                .copied()
                .unwrap_or(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::defs::*;
    use super::*;

    #[test]
    fn config_space_is_tag_then_le32_queue_count() {
        let c = FsConfigSpace::new("husk").unwrap();
        let b = c.as_bytes();
        assert_eq!(&b[..4], b"husk");
        assert!(b[4..TAG_LEN].iter().all(|&x| x == 0), "NUL padded");
        assert_eq!(&b[TAG_LEN..], &1u32.to_le_bytes());

        let mut word = [0u8; 4];
        c.read(TAG_LEN as u64, &mut word);
        assert_eq!(u32::from_le_bytes(word), NUM_REQUEST_QUEUES);
        let mut tag = [0xffu8; 8];
        c.read(0, &mut tag);
        assert_eq!(&tag, b"husk\0\0\0\0");
        // Reads that straddle or pass the end give zeros there, never a panic.
        let mut tail = [0xffu8; 8];
        c.read(CONFIG_SIZE as u64 - 2, &mut tail);
        assert_eq!(tail, [0, 0, 0, 0, 0, 0, 0, 0]);
        c.read(u64::MAX - 1, &mut tail);
        assert_eq!(tail, [0; 8]);
        let mut one = [0xffu8; 1];
        c.read(1, &mut one);
        assert_eq!(one, [b'u']);
    }

    #[test]
    fn tag_of_exactly_36_bytes_is_not_nul_terminated() {
        let tag = "a".repeat(TAG_LEN);
        let c = FsConfigSpace::new(&tag).unwrap();
        assert_eq!(&c.as_bytes()[..TAG_LEN], tag.as_bytes());
    }

    #[test]
    fn bad_tags_are_refused() {
        for bad in ["", "a\0b", &"x".repeat(TAG_LEN + 1)] {
            let e = FsConfigSpace::new(bad).unwrap_err();
            assert!(matches!(e, FsError::InvalidTag(_)), "{bad:?}: {e}");
        }
        // 36 bytes of UTF-8 is fine even when that is fewer characters.
        FsConfigSpace::new(&"é".repeat(18)).unwrap();
        assert!(FsConfigSpace::new(&"é".repeat(19)).is_err());
    }
}
