use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use super::*;
use crate::devices::virtio::fs::test_utils::{memfd_mem, FakeFsConfig, FakeFsServer};

const VERSION_1: u64 = 1 << 32;
const INDIRECT: u64 = 1 << 28;
const EVENT_IDX: u64 = 1 << 29;

#[test]
fn guest_sees_only_features_both_sides_have() {
    let offered = FakeFsConfig::default().features;
    assert_eq!(
        guest_features(offered).unwrap(),
        VERSION_1 | INDIRECT | EVENT_IDX,
        "no PROTOCOL_FEATURES or LOG_ALL for the guest"
    );
    assert_eq!(guest_features(VERSION_1).unwrap(), VERSION_1);
    // Unknown and transport bits the backend may claim never reach the guest.
    assert_eq!(guest_features(u64::MAX).unwrap(), GUEST_FEATURES);
    let e = guest_features(INDIRECT | EVENT_IDX).unwrap_err();
    assert!(e.to_string().contains("VERSION_1"), "{e}");
}

#[test]
fn queue_count_must_cover_hiprio_and_request_queue() {
    for n in [0, 1] {
        let e = check_queue_num(n).unwrap_err();
        assert!(e.to_string().contains("needs 2"), "{e}");
    }
    check_queue_num(2).unwrap();
    check_queue_num(64).unwrap();
}

#[test]
fn ring_addresses_are_checked_before_translation() {
    let mem = memfd_mem(&[(0, 1 << 20), (0x1000_0000, 1 << 20)]);
    let a = host_address(&mem, 0x1000, 16 * 256, 16).unwrap();
    let b = host_address(&mem, 0x2000, 16, 16).unwrap();
    assert_eq!(b - a, 0x1000, "one mapping per region");
    host_address(&mem, 0x1000_0000, 1 << 20, 4).unwrap();
    let bad = [
        (0x1001, 16, 16, "aligned"),
        ((1 << 20) - 8, 16, 4, "one guest memory region"),
        (0x20_0000, 16, 4, "outside"),
        (0x1000_0000 + (1 << 20), 4, 4, "outside"),
        (0x1000, u64::MAX, 16, "one guest memory region"),
        (0x1000, 0, 16, "one guest memory region"),
        (u64::MAX - 3, 4, 4, "outside"),
    ];
    for (gpa, len, align, why) in bad {
        let e = host_address(&mem, gpa, len, align).unwrap_err();
        assert!(e.to_string().contains(why), "{gpa:#x}+{len}: {e}");
    }
}

#[test]
fn negotiation_acks_only_what_husk_uses() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fs.sock");
    let server = FakeFsServer::start(&sock, FakeFsConfig::default());
    let fe = FsFrontend::connect(&sock).unwrap();
    assert_eq!(fe.backend_features(), FakeFsConfig::default().features);
    assert_eq!(fe.guest_features(), VERSION_1 | INDIRECT | EVENT_IDX);
    assert_eq!(
        fe.protocol_features(),
        Some(
            VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::RESET_DEVICE
        ),
        "never CONFIG, BACKEND_REQ or LOG_SHMFD"
    );
    assert!(fe.started_queues().is_empty());
    assert_eq!(fe.socket(), sock.as_path());
    drop(fe);
    server.join();
}

#[test]
fn backend_without_protocol_features_is_served_too() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fs.sock");
    let config = FakeFsConfig {
        features: VERSION_1 | EVENT_IDX,
        ..FakeFsConfig::default()
    };
    let server = FakeFsServer::start(&sock, config);
    let fe = FsFrontend::connect(&sock).unwrap();
    assert_eq!(fe.protocol_features(), None);
    assert_eq!(fe.guest_features(), VERSION_1 | EVENT_IDX);
    drop(fe);
    server.join();
}

#[test]
fn unsuitable_backends_are_refused_at_connect() {
    let dir = tempfile::tempdir().unwrap();
    let one_queue = FakeFsConfig {
        queues: 1,
        ..FakeFsConfig::default()
    };
    let legacy = FakeFsConfig {
        features: INDIRECT | VHOST_USER_F_PROTOCOL_FEATURES,
        ..FakeFsConfig::default()
    };
    for (i, (config, why)) in [(one_queue, "1 queues"), (legacy, "VERSION_1")]
        .into_iter()
        .enumerate()
    {
        let sock = dir.path().join(format!("fs{i}.sock"));
        let server = FakeFsServer::start(&sock, config);
        let e = FsFrontend::connect(&sock).unwrap_err();
        assert!(e.to_string().contains(why), "{e}");
        server.join();
    }
}

#[test]
fn missing_socket_fails_at_once_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nobody.sock");
    let start = Instant::now();
    let e = FsFrontend::connect(&sock).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(1));
    assert!(e.to_string().contains("nobody.sock"), "{e}");
}

/// A "backend" that accepts one connection and then does `f` with it.
fn raw_backend(
    sock: &std::path::Path,
    f: impl FnOnce(std::os::unix::net::UnixStream) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let l = UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        if let Ok((s, _)) = l.accept() {
            f(s);
        }
    })
}

#[test]
fn hostile_or_dead_backends_give_errors_not_panics_or_hangs() {
    let dir = tempfile::tempdir().unwrap();
    // Hangs up at once.
    let s1 = dir.path().join("close.sock");
    let t1 = raw_backend(&s1, drop);
    assert!(FsFrontend::connect_with_timeout(&s1, Duration::from_secs(2)).is_err());
    t1.join().unwrap();

    // Answers GET_FEATURES with garbage.
    let s2 = dir.path().join("garbage.sock");
    let t2 = raw_backend(&s2, |mut s| {
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf);
        std::thread::sleep(Duration::from_millis(50));
        let _ = s.write_all(&[0xff; 20]);
        std::thread::sleep(Duration::from_millis(500));
    });
    let e = FsFrontend::connect_with_timeout(&s2, Duration::from_secs(2)).unwrap_err();
    assert!(e.to_string().contains("GET_FEATURES"), "{e}");
    t2.join().unwrap();

    // Never answers: the reply timeout ends the wait.
    let s3 = dir.path().join("mute.sock");
    let t3 = raw_backend(&s3, |s| {
        std::thread::sleep(Duration::from_millis(1500));
        drop(s);
    });
    let start = Instant::now();
    let e = FsFrontend::connect_with_timeout(&s3, Duration::from_millis(300)).unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert!(e.to_string().contains("GET_FEATURES"), "{e}");
    t3.join().unwrap();
}
