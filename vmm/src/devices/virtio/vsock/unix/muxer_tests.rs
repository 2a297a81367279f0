//! Muxer tests with real Unix sockets in a temporary directory; the guest is played by calls to
//! `send_pkt`/`recv_pkt` with owned packet buffers.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::io::BorrowedFd;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::*;
use crate::devices::virtio::vsock::csm::{ConnState, ConnTimeouts};
use crate::devices::virtio::vsock::defs::{uapi, CONN_TX_BUF_SIZE, MAX_PKT_BUF_SIZE};
use crate::devices::virtio::vsock::test_utils::{guest_hdr, PacketBuf};

const GUEST_PORT: u32 = 49152;

struct Harness {
    _dir: tempfile::TempDir,
    uds: PathBuf,
    muxer: VsockMuxer,
}

fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    let muxer = VsockMuxer::new(&uds).unwrap();
    Harness {
        _dir: dir,
        uds,
        muxer,
    }
}

impl Harness {
    /// Wait (bounded) until the muxer's fd is ready, then let it handle its events.
    fn pump(&mut self, timeout_ms: u16) -> bool {
        // SAFETY: the fd belongs to `self.muxer`, which outlives this borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(self.muxer.get_polled_fd()) };
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        let ready = poll(&mut fds, PollTimeout::from(timeout_ms)).unwrap() > 0;
        if ready {
            self.muxer.notify(EventSet::IN);
        }
        ready
    }

    /// Handle everything that is ready now.
    fn pump_all(&mut self) {
        while self.pump(0) {}
    }

    fn send(&mut self, hdr: &HeaderFields, data: &[u8]) {
        let mut buf = PacketBuf::tx(hdr, data);
        self.muxer.send_pkt(&buf.packet()).unwrap();
    }

    fn recv(&mut self) -> Option<(HeaderFields, Vec<u8>)> {
        self.recv_into(MAX_PKT_BUF_SIZE as usize)
    }

    fn recv_into(&mut self, room: usize) -> Option<(HeaderFields, Vec<u8>)> {
        if !self.muxer.has_pending_rx() {
            return None;
        }
        let mut buf = PacketBuf::rx(room);
        match self.muxer.recv_pkt(&mut buf.packet()) {
            Ok(()) => Some((buf.header(), buf.payload().to_vec())),
            Err(VsockError::NoData) => None,
            Err(e) => panic!("recv_pkt: {e}"),
        }
    }

    /// Pump until the guest gets a packet (or fail after ~2 s).
    fn expect_packet(&mut self) -> (HeaderFields, Vec<u8>) {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            if let Some(p) = self.recv() {
                return p;
            }
            assert!(Instant::now() < deadline, "no packet for the guest");
            self.pump(50);
        }
    }

    fn expect_no_packet(&mut self) {
        self.pump_all();
        assert_eq!(self.recv(), None);
    }

    fn host_client(&self, line: &[u8]) -> UnixStream {
        let mut s = UnixStream::connect(&self.uds).unwrap();
        s.write_all(line).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    }

    /// Host connects to guest port `port`; the guest accepts. Returns the client stream and the
    /// host-side port.
    fn open_host_to_guest(&mut self, port: u32) -> (UnixStream, u32) {
        let mut client = self.host_client(format!("CONNECT {port}\n").as_bytes());
        let (req, _) = self.expect_packet();
        assert_eq!(req.op, uapi::VSOCK_OP_REQUEST);
        assert_eq!(req.dst_port, port);
        let local = req.src_port;
        self.send(&guest_hdr(uapi::VSOCK_OP_RESPONSE, port, local), &[]);
        let line = read_line(&mut client);
        assert_eq!(line, format!("OK {local}\n"));
        (client, local)
    }
}

fn read_line(s: &mut UnixStream) -> String {
    let mut out = vec![];
    let mut b = [0u8; 1];
    while out.last() != Some(&b'\n') {
        assert_eq!(s.read(&mut b).unwrap(), 1, "stream ended before newline");
        out.push(b[0]);
    }
    String::from_utf8(out).unwrap()
}

fn read_exact_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).unwrap();
    v
}

fn assert_eof(s: &mut UnixStream) {
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => {}
        Ok(n) => panic!("expected EOF, read {n} bytes"),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("expected EOF, got {e}"),
    }
}

#[test]
fn host_to_guest_handshake_and_relay() {
    let mut h = harness();
    let (mut client, local) = h.open_host_to_guest(1024);
    assert!(local >= HOST_PORT_BASE);
    let key = ConnKey {
        local_port: local,
        peer_port: 1024,
    };
    assert_eq!(
        h.muxer.connection(key).unwrap().state(),
        ConnState::Established
    );

    client.write_all(b"ping").unwrap();
    let (pkt, data) = h.expect_packet();
    assert_eq!(pkt.op, uapi::VSOCK_OP_RW);
    assert_eq!((pkt.src_port, pkt.dst_port), (local, 1024));
    assert_eq!(pkt.buf_alloc, CONN_TX_BUF_SIZE);
    assert_eq!(data, b"ping");

    h.send(&guest_hdr(uapi::VSOCK_OP_RW, 1024, local), b"pong");
    assert_eq!(read_exact_n(&mut client, 4), b"pong");
}

#[test]
fn host_ports_are_unique() {
    let mut h = harness();
    let (_a, pa) = h.open_host_to_guest(1024);
    let (_b, pb) = h.open_host_to_guest(1024);
    assert_ne!(pa, pb);
    assert_eq!(h.muxer.connection_count(), 2);
}

#[test]
fn bytes_after_connect_line_are_kept() {
    let mut h = harness();
    let mut client = h.host_client(b"CONNECT 7\nearly");
    let (req, _) = h.expect_packet();
    h.send(&guest_hdr(uapi::VSOCK_OP_RESPONSE, 7, req.src_port), &[]);
    assert_eq!(read_line(&mut client), format!("OK {}\n", req.src_port));
    let (pkt, data) = h.expect_packet();
    assert_eq!(pkt.op, uapi::VSOCK_OP_RW);
    assert_eq!(data, b"early");
}

#[test]
fn guest_rst_closes_host_client() {
    let mut h = harness();
    let mut client = h.host_client(b"CONNECT 1024\n");
    let (req, _) = h.expect_packet();
    // Nobody listens in the guest.
    h.send(&guest_hdr(uapi::VSOCK_OP_RST, 1024, req.src_port), &[]);
    assert_eof(&mut client);
    assert_eq!(h.muxer.connection_count(), 0);
    h.expect_no_packet();
}

#[test]
fn connect_line_in_pieces() {
    let mut h = harness();
    let mut client = h.host_client(b"CONN");
    h.pump_all();
    assert_eq!(h.muxer.pending_handshakes(), 1);
    assert_eq!(h.recv(), None);
    client.write_all(b"ECT 10").unwrap();
    h.pump_all();
    assert_eq!(h.recv(), None);
    client.write_all(b"24\n").unwrap();
    let (req, _) = h.expect_packet();
    assert_eq!(req.op, uapi::VSOCK_OP_REQUEST);
    assert_eq!(req.dst_port, 1024);
    assert_eq!(h.muxer.pending_handshakes(), 0);
}

#[test]
fn garbage_and_overlong_lines_are_closed() {
    let mut h = harness();
    let mut a = h.host_client(b"GET / HTTP/1.0\r\n\r\n");
    let mut b = h.host_client(&[b'C'; 1]);
    b.write_all(b"ONNECT 1111111111111111111111111111111111111\n")
        .unwrap();
    let mut c = h.host_client(b"CONNECT 99999999999\n");
    for s in [&mut a, &mut b, &mut c] {
        h.pump_all();
        assert_eof(s);
    }
    assert_eq!(h.muxer.pending_handshakes(), 0);
    assert_eq!(h.muxer.connection_count(), 0);
    h.expect_no_packet();
}

#[test]
fn silent_client_times_out() {
    let mut h = harness();
    h.muxer
        .set_timeouts(Duration::from_millis(100), ConnTimeouts::default());
    let mut client = h.host_client(b"CONNECT");
    h.pump_all();
    assert_eq!(h.muxer.pending_handshakes(), 1);
    // The timer wakes the muxer; no polling.
    assert!(h.pump(2000));
    h.pump_all();
    assert_eq!(h.muxer.pending_handshakes(), 0);
    assert_eof(&mut client);
}

#[test]
fn unanswered_request_times_out() {
    let mut h = harness();
    let t = ConnTimeouts {
        request: Duration::from_millis(100),
        shutdown: Duration::from_millis(100),
    };
    h.muxer.set_timeouts(Duration::from_secs(2), t);
    // 1. The guest saw the REQUEST but never answered: it gets an RST, the client EOF.
    let mut client = h.host_client(b"CONNECT 1024\n");
    let (req, _) = h.expect_packet();
    let (rst, _) = h.expect_packet();
    assert_eq!(rst.op, uapi::VSOCK_OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (req.src_port, 1024));
    assert_eof(&mut client);
    assert_eq!(h.muxer.connection_count(), 0);

    // 2. The guest never took the REQUEST (no RX buffers): the client is just closed.
    let mut client = h.host_client(b"CONNECT 1024\n");
    let deadline = Instant::now() + Duration::from_secs(2);
    while h.muxer.connection_count() == 0 {
        assert!(Instant::now() < deadline);
        h.pump(50);
    }
    while h.muxer.connection_count() == 1 {
        assert!(Instant::now() < deadline);
        h.pump(50);
    }
    assert_eof(&mut client);
    assert_eq!(h.muxer.connection_count(), 0);
    h.expect_no_packet();
}

#[test]
fn guest_to_host_connect_and_relay() {
    let mut h = harness();
    let listener = UnixListener::bind(format!("{}_5000", h.uds.display())).unwrap();
    h.send(&guest_hdr(uapi::VSOCK_OP_REQUEST, GUEST_PORT, 5000), &[]);
    let (resp, _) = h.expect_packet();
    assert_eq!(resp.op, uapi::VSOCK_OP_RESPONSE);
    assert_eq!((resp.src_port, resp.dst_port), (5000, GUEST_PORT));
    let (mut host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();

    h.send(
        &guest_hdr(uapi::VSOCK_OP_RW, GUEST_PORT, 5000),
        b"from guest",
    );
    assert_eq!(read_exact_n(&mut host, 10), b"from guest");
    host.write_all(b"from host").unwrap();
    let (pkt, data) = h.expect_packet();
    assert_eq!(pkt.op, uapi::VSOCK_OP_RW);
    assert_eq!(data, b"from host");
}

#[test]
fn guest_connect_without_listener_is_reset() {
    let mut h = harness();
    h.send(&guest_hdr(uapi::VSOCK_OP_REQUEST, GUEST_PORT, 6000), &[]);
    let (rst, _) = h.expect_packet();
    assert_eq!(rst.op, uapi::VSOCK_OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (6000, GUEST_PORT));
    assert_eq!(h.muxer.connection_count(), 0);
}

#[test]
fn packets_for_unknown_flows() {
    let mut h = harness();
    h.send(&guest_hdr(uapi::VSOCK_OP_RW, 1, 2), b"x");
    let (rst, _) = h.expect_packet();
    assert_eq!(rst.op, uapi::VSOCK_OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (2, 1));
    // Never answer an RST with an RST.
    h.send(&guest_hdr(uapi::VSOCK_OP_RST, 1, 2), &[]);
    h.expect_no_packet();
    // A flood is bounded.
    for i in 0..(MAX_PENDING_RST as u32 + 50) {
        h.send(&guest_hdr(uapi::VSOCK_OP_CREDIT_UPDATE, i, 2), &[]);
    }
    let mut n = 0;
    while h.recv().is_some() {
        n += 1;
    }
    assert_eq!(n, MAX_PENDING_RST);
}

#[test]
fn reset_flow_kills_a_live_connection() {
    let mut h = harness();
    let (mut client, local) = h.open_host_to_guest(1024);
    h.muxer.reset_flow(local, 1024);
    let (rst, _) = h.expect_packet();
    assert_eq!(rst.op, uapi::VSOCK_OP_RST);
    assert_eof(&mut client);
    assert_eq!(h.muxer.connection_count(), 0);
}

#[test]
fn small_guest_credit_makes_host_data_wait() {
    let mut h = harness();
    let mut client = h.host_client(b"CONNECT 1024\n");
    let (req, _) = h.expect_packet();
    let local = req.src_port;
    let mut resp = guest_hdr(uapi::VSOCK_OP_RESPONSE, 1024, local);
    resp.buf_alloc = 8;
    h.send(&resp, &[]);
    read_line(&mut client);

    let message: Vec<u8> = (0..20u8).collect();
    client.write_all(&message).unwrap();
    let mut got = vec![];

    let (p, d) = h.expect_packet();
    assert_eq!((p.op, d.len()), (uapi::VSOCK_OP_RW, 8));
    got.extend(d);
    // Credit exhausted: one CREDIT_REQUEST, then silence.
    let (p, _) = h.expect_packet();
    assert_eq!(p.op, uapi::VSOCK_OP_CREDIT_REQUEST);
    h.expect_no_packet();

    while got.len() < message.len() {
        // The guest application read everything so far: it reports the new fwd_cnt.
        let fwd_cnt = got.len() as u32;
        let mut upd = guest_hdr(uapi::VSOCK_OP_CREDIT_UPDATE, 1024, local);
        upd.buf_alloc = 8;
        upd.fwd_cnt = fwd_cnt;
        h.send(&upd, &[]);
        let (p, d) = h.expect_packet();
        assert_eq!(p.op, uapi::VSOCK_OP_RW);
        assert!(d.len() <= 8);
        got.extend(d);
        while let Some((p, d)) = h.recv() {
            if p.op == uapi::VSOCK_OP_RW {
                got.extend(d);
            }
        }
        assert!(
            got.len() as u32 - fwd_cnt <= 8,
            "sent past the guest's credit"
        );
    }
    assert_eq!(got, message);
}

#[test]
fn guest_data_is_buffered_not_dropped_when_host_is_slow() {
    let mut h = harness();
    let (client, local) = h.open_host_to_guest(1024);
    const TOTAL: usize = 2 * 1024 * 1024;
    let payload: Vec<u8> = (0..TOTAL).map(|i| (i % 251) as u8).collect();

    // A slow host reader in another thread.
    let reader = std::thread::spawn(move || {
        let mut client = client;
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = Vec::with_capacity(TOTAL);
        let mut buf = [0u8; 3000];
        while got.len() < TOTAL {
            let n = client.read(&mut buf).unwrap();
            assert!(n > 0, "stream ended early");
            got.extend_from_slice(&buf[..n]);
            if got.len() % 7 == 0 {
                std::thread::yield_now();
            }
        }
        got
    });

    // A well-behaved guest: never send past buf_alloc - (sent - fwd_cnt).
    let mut sent = 0usize;
    let mut peer_buf_alloc = CONN_TX_BUF_SIZE;
    let mut peer_fwd_cnt = 0u32;
    let deadline = Instant::now() + Duration::from_secs(20);
    while sent < TOTAL {
        assert!(Instant::now() < deadline, "guest could not send everything");
        let in_flight = (sent as u32).wrapping_sub(peer_fwd_cnt);
        let credit = peer_buf_alloc.saturating_sub(in_flight) as usize;
        let n = credit.min(MAX_PKT_BUF_SIZE as usize).min(TOTAL - sent);
        if n > 0 {
            h.send(
                &guest_hdr(uapi::VSOCK_OP_RW, 1024, local),
                &payload[sent..sent + n],
            );
            sent += n;
        } else {
            h.pump(100);
        }
        while let Some((p, _)) = h.recv() {
            assert_ne!(p.op, uapi::VSOCK_OP_RST, "connection was reset");
            peer_buf_alloc = p.buf_alloc;
            peer_fwd_cnt = p.fwd_cnt;
        }
    }
    // Let the muxer flush the rest.
    while !reader.is_finished() {
        h.pump(100);
    }
    let got = reader.join().unwrap();
    assert!(got == payload, "host received different bytes");
}

#[test]
fn guest_overrunning_credit_is_reset() {
    let mut h = harness();
    let (_client, local) = h.open_host_to_guest(1024);
    let chunk = vec![1u8; MAX_PKT_BUF_SIZE as usize];
    let mut reset = false;
    // The host never reads; the guest ignores credit.
    for _ in 0..64 {
        h.send(&guest_hdr(uapi::VSOCK_OP_RW, 1024, local), &chunk);
        if let Some((p, _)) = h.recv() {
            if p.op == uapi::VSOCK_OP_RST {
                reset = true;
                break;
            }
        }
    }
    assert!(reset, "a guest sending past its credit must be reset");
    assert_eq!(h.muxer.connection_count(), 0);
}

#[test]
fn credit_update_after_forwarding() {
    let mut h = harness();
    let (mut client, local) = h.open_host_to_guest(1024);
    let chunk = vec![9u8; MAX_PKT_BUF_SIZE as usize];
    h.send(&guest_hdr(uapi::VSOCK_OP_RW, 1024, local), &chunk);
    // The host stream took it all at once: fwd_cnt moved past the threshold.
    let (p, _) = h.expect_packet();
    assert_eq!(p.op, uapi::VSOCK_OP_CREDIT_UPDATE);
    assert_eq!(p.fwd_cnt, MAX_PKT_BUF_SIZE);
    assert_eq!(read_exact_n(&mut client, chunk.len()), chunk);
    // A CREDIT_REQUEST is always answered.
    h.send(&guest_hdr(uapi::VSOCK_OP_CREDIT_REQUEST, 1024, local), &[]);
    let (p, _) = h.expect_packet();
    assert_eq!(p.op, uapi::VSOCK_OP_CREDIT_UPDATE);
}

#[test]
fn host_half_close_then_guest_close() {
    let mut h = harness();
    let (mut client, local) = h.open_host_to_guest(1024);
    client.write_all(b"last words").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let (p, d) = h.expect_packet();
    assert_eq!(
        (p.op, d.as_slice()),
        (uapi::VSOCK_OP_RW, &b"last words"[..])
    );
    let (p, _) = h.expect_packet();
    assert_eq!(p.op, uapi::VSOCK_OP_SHUTDOWN);
    assert_eq!(p.flags, uapi::VSOCK_FLAGS_SHUTDOWN_SEND);
    // The host still reads the guest's answer.
    h.send(&guest_hdr(uapi::VSOCK_OP_RW, 1024, local), b"reply");
    assert_eq!(read_exact_n(&mut client, 5), b"reply");
    // The guest closes: the host sees EOF, the guest gets its RST.
    let mut shut = guest_hdr(uapi::VSOCK_OP_SHUTDOWN, 1024, local);
    shut.flags = uapi::VSOCK_FLAGS_SHUTDOWN_BOTH;
    h.send(&shut, &[]);
    let (p, _) = h.expect_packet();
    assert_eq!(p.op, uapi::VSOCK_OP_RST);
    assert_eof(&mut client);
    assert_eq!(h.muxer.connection_count(), 0);
}

#[test]
fn host_close_sends_shutdown_and_guest_rst_finishes() {
    let mut h = harness();
    let (client, local) = h.open_host_to_guest(1024);
    drop(client);
    let (p, _) = h.expect_packet();
    assert_eq!(p.op, uapi::VSOCK_OP_SHUTDOWN);
    assert_eq!(p.flags, uapi::VSOCK_FLAGS_SHUTDOWN_BOTH);
    h.send(&guest_hdr(uapi::VSOCK_OP_RST, 1024, local), &[]);
    assert_eq!(h.muxer.connection_count(), 0);
    h.expect_no_packet();
}

#[test]
fn host_close_without_guest_ack_resets_after_timeout() {
    let mut h = harness();
    h.muxer.set_timeouts(
        Duration::from_secs(2),
        ConnTimeouts {
            request: Duration::from_secs(2),
            shutdown: Duration::from_millis(100),
        },
    );
    let (client, _local) = h.open_host_to_guest(1024);
    drop(client);
    let (p, _) = h.expect_packet();
    assert_eq!(p.op, uapi::VSOCK_OP_SHUTDOWN);
    let (p, _) = h.expect_packet();
    assert_eq!(p.op, uapi::VSOCK_OP_RST);
    assert_eq!(h.muxer.connection_count(), 0);
}

#[test]
fn guest_half_close_shuts_host_write_side() {
    let mut h = harness();
    let (mut client, local) = h.open_host_to_guest(1024);
    h.send(&guest_hdr(uapi::VSOCK_OP_RW, 1024, local), b"bye");
    let mut shut = guest_hdr(uapi::VSOCK_OP_SHUTDOWN, 1024, local);
    shut.flags = uapi::VSOCK_FLAGS_SHUTDOWN_SEND;
    h.send(&shut, &[]);
    assert_eq!(read_exact_n(&mut client, 3), b"bye");
    assert_eof(&mut client);
    // The host can still talk to the guest.
    client.write_all(b"still here").unwrap();
    let (p, d) = h.expect_packet();
    assert_eq!(
        (p.op, d.as_slice()),
        (uapi::VSOCK_OP_RW, &b"still here"[..])
    );
    // Data after SHUTDOWN(SEND) is a protocol violation.
    h.send(&guest_hdr(uapi::VSOCK_OP_RW, 1024, local), b"oops");
    let (p, _) = h.expect_packet();
    assert_eq!(p.op, uapi::VSOCK_OP_RST);
}

#[test]
fn out_of_protocol_packets_reset() {
    let mut h = harness();
    let (mut client, local) = h.open_host_to_guest(1024);
    // A second RESPONSE on an established connection.
    h.send(&guest_hdr(uapi::VSOCK_OP_RESPONSE, 1024, local), &[]);
    let (p, _) = h.expect_packet();
    assert_eq!(p.op, uapi::VSOCK_OP_RST);
    assert_eof(&mut client);

    // Data before the handshake finished.
    let mut client = h.host_client(b"CONNECT 1024\n");
    let (req, _) = h.expect_packet();
    h.send(&guest_hdr(uapi::VSOCK_OP_RW, 1024, req.src_port), b"early");
    let (p, _) = h.expect_packet();
    assert_eq!(p.op, uapi::VSOCK_OP_RST);
    assert_eof(&mut client);

    // A REQUEST for a live flow.
    let (mut client, local) = h.open_host_to_guest(1024);
    h.send(&guest_hdr(uapi::VSOCK_OP_REQUEST, 1024, local), &[]);
    let (p, _) = h.expect_packet();
    assert_eq!(p.op, uapi::VSOCK_OP_RST);
    assert_eof(&mut client);
    assert_eq!(h.muxer.connection_count(), 0);
}

#[test]
fn client_leaving_before_response() {
    let mut h = harness();
    let client = h.host_client(b"CONNECT 1024\n");
    let (req, _) = h.expect_packet();
    drop(client);
    // The guest already saw the REQUEST: it must hear an RST.
    let (p, _) = h.expect_packet();
    assert_eq!(p.op, uapi::VSOCK_OP_RST);
    assert_eq!(p.src_port, req.src_port);
    assert_eq!(h.muxer.connection_count(), 0);
    // A late RESPONSE is answered with RST (unknown flow).
    h.send(&guest_hdr(uapi::VSOCK_OP_RESPONSE, 1024, req.src_port), &[]);
    let (p, _) = h.expect_packet();
    assert_eq!(p.op, uapi::VSOCK_OP_RST);
}

#[test]
fn idle_muxer_is_not_ready() {
    // Nothing to do must mean nothing to wake for (no busy loop in the embedding event loop).
    let mut h = harness();
    let (_client, _local) = h.open_host_to_guest(1024);
    h.pump_all();
    assert!(!h.pump(50));
    // A guest with no credit left and unread host data must not keep the fd ready either.
    let mut client = h.host_client(b"CONNECT 2048\n");
    let (req, _) = h.expect_packet();
    let mut resp = guest_hdr(uapi::VSOCK_OP_RESPONSE, 2048, req.src_port);
    resp.buf_alloc = 4;
    h.send(&resp, &[]);
    read_line(&mut client);
    client.write_all(b"0123456789").unwrap();
    let (p, _) = h.expect_packet();
    assert_eq!(p.op, uapi::VSOCK_OP_RW);
    let (p, _) = h.expect_packet();
    assert_eq!(p.op, uapi::VSOCK_OP_CREDIT_REQUEST);
    h.pump_all();
    assert!(!h.pump(50));
    assert_eq!(h.recv(), None);
}

#[test]
fn socket_file_is_removed_on_drop() {
    let h = harness();
    let path = h.uds.clone();
    assert!(path.exists());
    drop(h.muxer);
    assert!(!path.exists());
}

#[test]
fn rx_buffer_without_room_does_not_spin() {
    let mut h = harness();
    let (mut client, _local) = h.open_host_to_guest(1024);
    client.write_all(b"data").unwrap();
    h.pump_all();
    assert!(h.muxer.has_pending_rx());
    // A guest buffer with no data space cannot carry RW: nothing is produced, nothing hangs.
    assert_eq!(h.recv_into(0), None);
    let (p, d) = h.expect_packet();
    assert_eq!((p.op, d.as_slice()), (uapi::VSOCK_OP_RW, &b"data"[..]));
}
