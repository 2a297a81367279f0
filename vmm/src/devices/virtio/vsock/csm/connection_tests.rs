//! State machine tests on a socketpair: one end is the connection's host stream, the other is
//! the host application. The guest is played with owned packet buffers.

use std::io::{Read, Write};
use std::time::Duration;

use super::*;
use crate::devices::virtio::vsock::test_utils::{guest_hdr, PacketBuf};

const LOCAL: u32 = 1 << 30;
const PEER: u32 = 1024;

fn pair() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    (a, b)
}

fn send(c: &mut VsockConnection, hdr: &HeaderFields, data: &[u8]) {
    let mut p = PacketBuf::tx(hdr, data);
    c.send_pkt(&p.packet());
}

fn recv(c: &mut VsockConnection, room: usize) -> Option<(HeaderFields, Vec<u8>)> {
    let mut p = PacketBuf::rx(room);
    if c.recv_pkt(&mut p.packet()) {
        Some((p.header(), p.payload().to_vec()))
    } else {
        None
    }
}

fn g(op: u16) -> HeaderFields {
    guest_hdr(op, PEER, LOCAL)
}

/// A host-initiated connection after the guest's RESPONSE with `buf_alloc`.
fn established(buf_alloc: u32) -> (VsockConnection, UnixStream) {
    let (a, mut b) = pair();
    let mut c = VsockConnection::new_local_init(a, LOCAL, PEER, ConnTimeouts::default());
    let (req, _) = recv(&mut c, 0).unwrap();
    assert_eq!(req.op, uapi::VSOCK_OP_REQUEST);
    let mut resp = g(uapi::VSOCK_OP_RESPONSE);
    resp.buf_alloc = buf_alloc;
    send(&mut c, &resp, &[]);
    let mut line = vec![0u8; format!("OK {LOCAL}\n").len()];
    b.read_exact(&mut line).unwrap();
    assert_eq!(line, format!("OK {LOCAL}\n").as_bytes());
    (c, b)
}

#[test]
fn local_init_handshake() {
    let (a, _b) = pair();
    let mut c = VsockConnection::new_local_init(a, LOCAL, PEER, ConnTimeouts::default());
    assert_eq!(c.state(), ConnState::LocalInit);
    assert!(c.has_pending_rx());
    assert!(c.expiry().is_some());
    // Nothing to poll for but hang-ups while waiting for the guest.
    assert_eq!(c.get_polled_evset(), EventSet::empty());
    let (req, _) = recv(&mut c, 0).unwrap();
    assert_eq!(req.op, uapi::VSOCK_OP_REQUEST);
    assert_eq!((req.src_port, req.dst_port), (LOCAL, PEER));
    assert_eq!(req.buf_alloc, CONN_TX_BUF_SIZE);
    assert!(!c.has_pending_rx());
    assert_eq!(recv(&mut c, 0), None);

    let (c, _b) = established(4096);
    assert_eq!(c.state(), ConnState::Established);
    assert_eq!(c.expiry(), None);
    assert_eq!(c.peer_credit(), 4096);
    assert!(c.get_polled_evset().contains(EventSet::IN));
}

#[test]
fn peer_init_handshake() {
    let (a, mut b) = pair();
    let mut req = guest_hdr(uapi::VSOCK_OP_REQUEST, 5555, 80);
    req.buf_alloc = 1000;
    let mut c = VsockConnection::new_peer_init(a, &req, ConnTimeouts::default());
    assert_eq!((c.local_port(), c.peer_port()), (80, 5555));
    assert_eq!(c.state(), ConnState::PeerInit);
    let (resp, _) = recv(&mut c, 0).unwrap();
    assert_eq!(resp.op, uapi::VSOCK_OP_RESPONSE);
    assert_eq!((resp.src_port, resp.dst_port), (80, 5555));
    assert_eq!(c.state(), ConnState::Established);
    assert_eq!(c.peer_credit(), 1000);
    // No OK line on guest-initiated connections: the first bytes are the guest's.
    send(&mut c, &guest_hdr(uapi::VSOCK_OP_RW, 5555, 80), b"GET");
    let mut buf = [0u8; 3];
    b.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"GET");
}

#[test]
fn guest_rst_closes_at_once() {
    let (a, mut b) = pair();
    let mut c = VsockConnection::new_local_init(a, LOCAL, PEER, ConnTimeouts::default());
    recv(&mut c, 0).unwrap();
    send(&mut c, &g(uapi::VSOCK_OP_RST), &[]);
    assert!(c.is_closed());
    assert!(!c.has_pending_rx());
    drop(c);
    let mut buf = [0u8; 1];
    assert_eq!(b.read(&mut buf).unwrap(), 0);
}

#[test]
fn request_timeout() {
    let (a, _b) = pair();
    let mut c = VsockConnection::new_local_init(a, LOCAL, PEER, ConnTimeouts::default());
    let t = c.expiry().unwrap();
    c.on_expired(t - Duration::from_millis(1));
    assert_eq!(c.state(), ConnState::LocalInit);
    // Not yet sent to the guest: just closed.
    c.on_expired(t);
    assert!(c.is_closed());

    let (a, _b) = pair();
    let mut c = VsockConnection::new_local_init(a, LOCAL, PEER, ConnTimeouts::default());
    recv(&mut c, 0).unwrap();
    let t = c.expiry().unwrap();
    c.on_expired(t);
    assert_eq!(c.state(), ConnState::Killed);
    let (rst, _) = recv(&mut c, 0).unwrap();
    assert_eq!(rst.op, uapi::VSOCK_OP_RST);
    assert!(c.is_closed());
}

#[test]
fn host_data_respects_guest_credit() {
    let (mut c, mut b) = established(10);
    b.write_all(b"0123456789abcdef").unwrap();
    c.notify(EventSet::IN);
    assert!(c.has_pending_rx());
    // The RX buffer could take more; the credit could not.
    let (p, d) = recv(&mut c, 4096).unwrap();
    assert_eq!(
        (p.op, d.as_slice()),
        (uapi::VSOCK_OP_RW, &b"0123456789"[..])
    );
    assert_eq!(c.peer_credit(), 0);
    // Out of credit: ask once, then wait; do not poll the host stream meanwhile.
    let (p, _) = recv(&mut c, 4096).unwrap();
    assert_eq!(p.op, uapi::VSOCK_OP_CREDIT_REQUEST);
    assert!(!c.has_pending_rx());
    assert_eq!(recv(&mut c, 4096), None);
    assert!(!c.get_polled_evset().contains(EventSet::IN));

    // The guest consumed 4 bytes.
    let mut upd = g(uapi::VSOCK_OP_CREDIT_UPDATE);
    upd.buf_alloc = 10;
    upd.fwd_cnt = 4;
    send(&mut c, &upd, &[]);
    assert_eq!(c.peer_credit(), 4);
    assert!(c.has_pending_rx());
    let (p, d) = recv(&mut c, 4096).unwrap();
    assert_eq!((p.op, d.as_slice()), (uapi::VSOCK_OP_RW, &b"abcd"[..]));
    // Credit also rides on any guest packet, e.g. its data.
    let mut rw = g(uapi::VSOCK_OP_RW);
    rw.buf_alloc = 10;
    rw.fwd_cnt = 14;
    send(&mut c, &rw, b"x");
    let (p, d) = recv(&mut c, 4096).unwrap();
    assert_eq!((p.op, d.as_slice()), (uapi::VSOCK_OP_RW, &b"ef"[..]));
}

#[test]
fn hostile_credit_values_do_not_overflow() {
    let (mut c, mut b) = established(16);
    b.write_all(b"abc").unwrap();
    c.notify(EventSet::IN);
    recv(&mut c, 64).unwrap();
    // fwd_cnt beyond what was ever sent: in-flight wraps, credit is 0, nothing panics.
    let mut upd = g(uapi::VSOCK_OP_CREDIT_UPDATE);
    upd.buf_alloc = u32::MAX;
    upd.fwd_cnt = 1000;
    send(&mut c, &upd, &[]);
    assert_eq!(c.peer_credit(), u32::MAX - (3u32.wrapping_sub(1000)));
    upd.buf_alloc = 0;
    send(&mut c, &upd, &[]);
    assert_eq!(c.peer_credit(), 0);
}

#[test]
fn guest_data_is_buffered_while_host_is_full() {
    let (mut c, mut b) = established(4096);
    let chunk = vec![0x5au8; 32 * 1024];
    let mut sent = 0usize;
    // Fill the socket buffer: the rest must wait in the connection.
    while c.tx_buffered() == 0 {
        send(&mut c, &g(uapi::VSOCK_OP_RW), &chunk);
        sent += chunk.len();
    }
    assert!(c.get_polled_evset().contains(EventSet::OUT));
    let buffered = c.tx_buffered();
    // The guest has not been credited for buffered bytes.
    let mut drained = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    while drained < sent {
        let n = b.read(&mut buf).unwrap();
        assert!(buf[..n].iter().all(|&x| x == 0x5a));
        drained += n;
        c.notify(EventSet::OUT);
    }
    assert_eq!(drained, sent);
    assert_eq!(c.tx_buffered(), 0);
    assert!(buffered > 0);
    assert!(!c.get_polled_evset().contains(EventSet::OUT));
    // Everything forwarded: the guest hears the new fwd_cnt.
    let (p, _) = recv(&mut c, 0).unwrap();
    assert_eq!(p.op, uapi::VSOCK_OP_CREDIT_UPDATE);
    assert_eq!(p.fwd_cnt as usize, sent);
}

#[test]
fn guest_overrun_is_reset() {
    let (mut c, _b) = established(4096);
    let chunk = vec![1u8; 64 * 1024];
    let mut n = 0;
    while c.state() == ConnState::Established {
        send(&mut c, &g(uapi::VSOCK_OP_RW), &chunk);
        n += 1;
        assert!(n < 100, "never reset");
    }
    assert!(c.tx_buffered() <= CONN_TX_BUF_SIZE as usize);
    let (p, _) = recv(&mut c, 0).unwrap();
    assert_eq!(p.op, uapi::VSOCK_OP_RST);
}

#[test]
fn host_eof_half_close_and_hangup() {
    // Half close: SHUTDOWN(SEND), guest data still flows to the host.
    let (mut c, b) = established(4096);
    b.shutdown(std::net::Shutdown::Write).unwrap();
    c.notify(EventSet::IN | EventSet::READ_HANG_UP);
    let (p, _) = recv(&mut c, 64).unwrap();
    assert_eq!(p.op, uapi::VSOCK_OP_SHUTDOWN);
    assert_eq!(p.flags, uapi::VSOCK_FLAGS_SHUTDOWN_SEND);
    assert_eq!(c.expiry(), None);
    send(&mut c, &g(uapi::VSOCK_OP_RW), b"ok");
    assert_eq!(c.state(), ConnState::Established);

    // Full close: SHUTDOWN(RCV|SEND) and a deadline for the guest's RST.
    let (mut c, b) = established(4096);
    drop(b);
    c.notify(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP);
    assert!(!c.wants_epoll());
    let (p, _) = recv(&mut c, 64).unwrap();
    assert_eq!(p.op, uapi::VSOCK_OP_SHUTDOWN);
    assert_eq!(p.flags, uapi::VSOCK_FLAGS_SHUTDOWN_BOTH);
    let t = c.expiry().unwrap();
    c.on_expired(t);
    let (p, _) = recv(&mut c, 64).unwrap();
    assert_eq!(p.op, uapi::VSOCK_OP_RST);
    assert!(c.is_closed());
}

#[test]
fn host_hangup_with_unread_data_delivers_it_first() {
    let (mut c, mut b) = established(4096);
    b.write_all(b"tail").unwrap();
    drop(b);
    c.notify(EventSet::IN | EventSet::HANG_UP);
    let (p, d) = recv(&mut c, 64).unwrap();
    assert_eq!((p.op, d.as_slice()), (uapi::VSOCK_OP_RW, &b"tail"[..]));
    let (p, _) = recv(&mut c, 64).unwrap();
    assert_eq!(p.op, uapi::VSOCK_OP_SHUTDOWN);
    assert_eq!(p.flags, uapi::VSOCK_FLAGS_SHUTDOWN_BOTH);
}

#[test]
fn guest_shutdown_flags() {
    // RCV: stop reading the host.
    let (mut c, mut b) = established(4096);
    let mut s = g(uapi::VSOCK_OP_SHUTDOWN);
    s.flags = uapi::VSOCK_FLAGS_SHUTDOWN_RCV;
    send(&mut c, &s, &[]);
    b.write_all(b"ignored").unwrap();
    c.notify(EventSet::IN);
    assert!(!c.get_polled_evset().contains(EventSet::IN));
    assert_eq!(recv(&mut c, 64), None);

    // SEND: the host sees EOF after the buffered bytes.
    let (mut c, mut b) = established(4096);
    send(&mut c, &g(uapi::VSOCK_OP_RW), b"last");
    s.flags = uapi::VSOCK_FLAGS_SHUTDOWN_SEND;
    send(&mut c, &s, &[]);
    let mut out = vec![];
    b.read_to_end(&mut out).unwrap();
    assert_eq!(out, b"last");
    assert_eq!(c.state(), ConnState::Established);

    // Both: acknowledged with RST.
    let (mut c, mut b) = established(4096);
    s.flags = uapi::VSOCK_FLAGS_SHUTDOWN_BOTH;
    send(&mut c, &s, &[]);
    assert_eq!(c.state(), ConnState::Killed);
    let (p, _) = recv(&mut c, 0).unwrap();
    assert_eq!(p.op, uapi::VSOCK_OP_RST);
    let mut out = vec![];
    b.read_to_end(&mut out).unwrap();
    assert!(out.is_empty());
}

#[test]
fn credit_request_is_answered() {
    let (mut c, _b) = established(4096);
    send(&mut c, &g(uapi::VSOCK_OP_CREDIT_REQUEST), &[]);
    let (p, _) = recv(&mut c, 0).unwrap();
    assert_eq!(p.op, uapi::VSOCK_OP_CREDIT_UPDATE);
    assert_eq!(p.buf_alloc, CONN_TX_BUF_SIZE);
    assert_eq!(recv(&mut c, 0), None);
}

#[test]
fn out_of_protocol_ops_reset() {
    for op in [uapi::VSOCK_OP_REQUEST, uapi::VSOCK_OP_RESPONSE, 0, 99] {
        let (mut c, _b) = established(4096);
        send(&mut c, &g(op), &[]);
        assert_eq!(c.state(), ConnState::Killed, "op {op}");
        assert_eq!(recv(&mut c, 0).unwrap().0.op, uapi::VSOCK_OP_RST);
    }
    // Anything but RESPONSE or RST while waiting for the guest.
    let (a, _b) = pair();
    let mut c = VsockConnection::new_local_init(a, LOCAL, PEER, ConnTimeouts::default());
    recv(&mut c, 0).unwrap();
    send(&mut c, &g(uapi::VSOCK_OP_RW), b"x");
    assert_eq!(c.state(), ConnState::Killed);
}

#[test]
fn host_write_error_resets() {
    let (mut c, b) = established(4096);
    drop(b);
    send(&mut c, &g(uapi::VSOCK_OP_RW), b"into the void");
    assert_eq!(c.state(), ConnState::Killed);
    assert_eq!(recv(&mut c, 0).unwrap().0.op, uapi::VSOCK_OP_RST);
}

#[test]
fn stream_error_event_resets() {
    let (mut c, _b) = established(4096);
    c.notify(EventSet::ERROR);
    assert_eq!(c.state(), ConnState::Killed);
    assert!(!c.wants_epoll());
    assert_eq!(recv(&mut c, 0).unwrap().0.op, uapi::VSOCK_OP_RST);
    // Packets after the reset are ignored.
    send(&mut c, &g(uapi::VSOCK_OP_RW), b"late");
    assert!(c.is_closed());
}
