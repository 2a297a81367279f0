//! Checks on guest-supplied packet headers.
//!
//! Parsing descriptor chains is the `virtio-vsock` crate's job (`VsockPacket::from_tx_virtq_chain`
//! and `from_rx_virtq_chain`); this module decides whether a parsed header is one a well-behaved
//! driver could have sent, and what to do when it is not: drop it (it does not name one of our
//! flows) or reset the flow it names.

use std::fmt;

use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::bitmap::BitmapSlice;

use super::defs::{uapi, HOST_CID, MAX_PKT_BUF_SIZE};

/// A copy of the fields of a `virtio_vsock_hdr`, taken once so that later checks and uses see the
/// same values even if the guest rewrites its buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeaderFields {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Op-specific flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever (wrapping).
    pub fwd_cnt: u32,
}

impl HeaderFields {
    /// Snapshot the header of a parsed packet.
    pub fn from_packet<B: BitmapSlice>(pkt: &VsockPacket<'_, B>) -> Self {
        HeaderFields {
            src_cid: pkt.src_cid(),
            dst_cid: pkt.dst_cid(),
            src_port: pkt.src_port(),
            dst_port: pkt.dst_port(),
            len: pkt.len(),
            type_: pkt.type_(),
            op: pkt.op(),
            flags: pkt.flags(),
            buf_alloc: pkt.buf_alloc(),
            fwd_cnt: pkt.fwd_cnt(),
        }
    }

    /// Decode a raw little-endian header. Only used to find out which flow a packet that
    /// `VsockPacket` refused (short chain, bad data descriptor) belongs to, so it can be reset.
    pub fn from_raw(raw: &[u8; PKT_HEADER_SIZE]) -> Self {
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&raw[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let u32_at = |o: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&raw[o..o + 4]);
            u32::from_le_bytes(b)
        };
        let u16_at = |o: usize| u16::from_le_bytes([raw[o], raw[o + 1]]);
        HeaderFields {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encode as a raw little-endian header (the inverse of [`from_raw`](Self::from_raw)).
    pub fn to_raw(&self) -> [u8; PKT_HEADER_SIZE] {
        let mut raw = [0u8; PKT_HEADER_SIZE];
        raw[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        raw[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        raw[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        raw[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        raw[24..28].copy_from_slice(&self.len.to_le_bytes());
        raw[28..30].copy_from_slice(&self.type_.to_le_bytes());
        raw[30..32].copy_from_slice(&self.op.to_le_bytes());
        raw[32..36].copy_from_slice(&self.flags.to_le_bytes());
        raw[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        raw[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        raw
    }

    /// Whether the addresses name a flow from this guest to the host (so a reset makes sense).
    pub fn is_guest_to_host(&self, guest_cid: u64) -> bool {
        self.src_cid == guest_cid && self.dst_cid == HOST_CID
    }
}

/// Why a TX header was refused, and what to do about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxReject {
    /// Drop the packet silently: it does not belong to one of this guest's flows to the host.
    Drop(RejectReason),
    /// Reset the flow the packet names.
    Reset(RejectReason),
}

/// What was wrong with a TX header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    /// `src_cid` is not the guest's CID.
    BadSrcCid(u64),
    /// `dst_cid` is not the host.
    BadDstCid(u64),
    /// Socket type other than STREAM.
    BadType(u16),
    /// Unknown operation.
    BadOp(u16),
    /// Payload on an op that carries none.
    UnexpectedPayload(u16, u32),
    /// Payload longer than the protocol allows.
    TooLong(u32),
    /// SHUTDOWN with unknown flag bits.
    BadShutdownFlags(u32),
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RejectReason::BadSrcCid(c) => write!(f, "source CID {c} is not the guest's"),
            RejectReason::BadDstCid(c) => write!(f, "destination CID {c} is not the host"),
            RejectReason::BadType(t) => write!(f, "socket type {t} is not STREAM"),
            RejectReason::BadOp(o) => write!(f, "unknown op {o}"),
            RejectReason::UnexpectedPayload(o, l) => write!(f, "op {o} carries {l} payload bytes"),
            RejectReason::TooLong(l) => write!(f, "payload of {l} bytes is over the limit"),
            RejectReason::BadShutdownFlags(fl) => write!(f, "SHUTDOWN flags {fl:#x}"),
        }
    }
}

/// Check a TX header against what a driver at `guest_cid` may send.
pub fn validate_tx(hdr: &HeaderFields, guest_cid: u64) -> Result<(), TxReject> {
    if hdr.src_cid != guest_cid {
        return Err(TxReject::Drop(RejectReason::BadSrcCid(hdr.src_cid)));
    }
    if hdr.dst_cid != HOST_CID {
        return Err(TxReject::Drop(RejectReason::BadDstCid(hdr.dst_cid)));
    }
    if hdr.type_ != uapi::VSOCK_TYPE_STREAM {
        return Err(TxReject::Reset(RejectReason::BadType(hdr.type_)));
    }
    match hdr.op {
        uapi::VSOCK_OP_RW => {
            if hdr.len > MAX_PKT_BUF_SIZE {
                return Err(TxReject::Reset(RejectReason::TooLong(hdr.len)));
            }
        }
        uapi::VSOCK_OP_REQUEST
        | uapi::VSOCK_OP_RESPONSE
        | uapi::VSOCK_OP_RST
        | uapi::VSOCK_OP_SHUTDOWN
        | uapi::VSOCK_OP_CREDIT_UPDATE
        | uapi::VSOCK_OP_CREDIT_REQUEST => {
            if hdr.len != 0 {
                return Err(TxReject::Reset(RejectReason::UnexpectedPayload(
                    hdr.op, hdr.len,
                )));
            }
            if hdr.op == uapi::VSOCK_OP_SHUTDOWN
                && hdr.flags & !uapi::VSOCK_FLAGS_SHUTDOWN_BOTH != 0
            {
                return Err(TxReject::Reset(RejectReason::BadShutdownFlags(hdr.flags)));
            }
        }
        other => return Err(TxReject::Reset(RejectReason::BadOp(other))),
    }
    Ok(())
}

/// Human-readable op name for logs.
pub fn op_name(op: u16) -> &'static str {
    match op {
        uapi::VSOCK_OP_REQUEST => "REQUEST",
        uapi::VSOCK_OP_RESPONSE => "RESPONSE",
        uapi::VSOCK_OP_RST => "RST",
        uapi::VSOCK_OP_SHUTDOWN => "SHUTDOWN",
        uapi::VSOCK_OP_RW => "RW",
        uapi::VSOCK_OP_CREDIT_UPDATE => "CREDIT_UPDATE",
        uapi::VSOCK_OP_CREDIT_REQUEST => "CREDIT_REQUEST",
        _ => "INVALID",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: u64 = 3;

    fn good(op: u16) -> HeaderFields {
        HeaderFields {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 1024,
            type_: uapi::VSOCK_TYPE_STREAM,
            op,
            ..Default::default()
        }
    }

    #[test]
    fn accepts_every_known_op() {
        for op in 1..=7 {
            assert_eq!(validate_tx(&good(op), CID), Ok(()), "op {op}");
        }
        let rw = HeaderFields {
            len: MAX_PKT_BUF_SIZE,
            ..good(uapi::VSOCK_OP_RW)
        };
        assert_eq!(validate_tx(&rw, CID), Ok(()));
    }

    #[test]
    fn drops_foreign_addresses() {
        let h = HeaderFields {
            src_cid: 4,
            ..good(uapi::VSOCK_OP_REQUEST)
        };
        assert_eq!(
            validate_tx(&h, CID),
            Err(TxReject::Drop(RejectReason::BadSrcCid(4)))
        );
        let h = HeaderFields {
            dst_cid: 1,
            ..good(uapi::VSOCK_OP_REQUEST)
        };
        assert_eq!(
            validate_tx(&h, CID),
            Err(TxReject::Drop(RejectReason::BadDstCid(1)))
        );
    }

    #[test]
    fn resets_bad_fields() {
        let cases = [
            (
                HeaderFields {
                    type_: 2,
                    ..good(uapi::VSOCK_OP_REQUEST)
                },
                RejectReason::BadType(2),
            ),
            (good(0), RejectReason::BadOp(0)),
            (good(8), RejectReason::BadOp(8)),
            (
                HeaderFields {
                    len: MAX_PKT_BUF_SIZE + 1,
                    ..good(uapi::VSOCK_OP_RW)
                },
                RejectReason::TooLong(MAX_PKT_BUF_SIZE + 1),
            ),
            (
                HeaderFields {
                    len: 5,
                    ..good(uapi::VSOCK_OP_REQUEST)
                },
                RejectReason::UnexpectedPayload(uapi::VSOCK_OP_REQUEST, 5),
            ),
            (
                HeaderFields {
                    flags: 4,
                    ..good(uapi::VSOCK_OP_SHUTDOWN)
                },
                RejectReason::BadShutdownFlags(4),
            ),
        ];
        for (h, why) in cases {
            assert_eq!(validate_tx(&h, CID), Err(TxReject::Reset(why)), "{h:?}");
        }
    }

    #[test]
    fn raw_decode_matches_layout() {
        let mut raw = [0u8; PKT_HEADER_SIZE];
        raw[0..8].copy_from_slice(&3u64.to_le_bytes());
        raw[8..16].copy_from_slice(&2u64.to_le_bytes());
        raw[16..20].copy_from_slice(&77u32.to_le_bytes());
        raw[20..24].copy_from_slice(&1024u32.to_le_bytes());
        raw[24..28].copy_from_slice(&9u32.to_le_bytes());
        raw[28..30].copy_from_slice(&1u16.to_le_bytes());
        raw[30..32].copy_from_slice(&5u16.to_le_bytes());
        raw[32..36].copy_from_slice(&3u32.to_le_bytes());
        raw[36..40].copy_from_slice(&4096u32.to_le_bytes());
        raw[40..44].copy_from_slice(&12u32.to_le_bytes());
        let h = HeaderFields::from_raw(&raw);
        assert_eq!(
            h,
            HeaderFields {
                src_cid: 3,
                dst_cid: 2,
                src_port: 77,
                dst_port: 1024,
                len: 9,
                type_: 1,
                op: 5,
                flags: 3,
                buf_alloc: 4096,
                fwd_cnt: 12,
            }
        );
        assert_eq!(h.to_raw(), raw);
        assert!(h.is_guest_to_host(3));
        assert!(!h.is_guest_to_host(4));
    }
}
