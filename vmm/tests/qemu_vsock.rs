//! `husk-vsock` under a real QEMU (TCG) and a real Linux guest. It needs `qemu-system-x86_64`,
//! `gcc` (static glibc), `cpio`, a static `busybox` (all installed by `scripts/deps.sh`) and a
//! guest kernel with virtio-mmio + virtio-vsock built in (`guest-kernel/build.sh`; found at
//! `$HUSK_KERNEL` or `${HUSK_CACHE_DIR:-/var/cache/husk}/vmlinux`). Without QEMU it skips and says
//! so; with QEMU, anything else missing is a failure. Run it alone with
//!
//! ```text
//! cargo test -p husk-vmm --test qemu_vsock -- --nocapture
//! ```
//!
//! The guest runs `tests/qemu/vs.c`: an echo server on vsock port 1024 and two clients to the
//! host (port 5000 answered by a host listener on `<uds>_5000`, port 5001 unanswered).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_husk-vsock");

struct Killer(Child);

impl Drop for Killer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kernel() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HUSK_KERNEL") {
        return Some(PathBuf::from(p));
    }
    let cache = std::env::var_os("HUSK_CACHE_DIR").unwrap_or_else(|| "/var/cache/husk".into());
    let p = Path::new(&cache).join("vmlinux");
    p.exists().then_some(p)
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn tsc_khz() -> u64 {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(2_000_000, |mhz| (mhz * 1000.0) as u64)
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
/bin/vs server 1024 &
/bin/vs client 5000 hello-from-guest
/bin/vs client 5001 nobody-listens
echo GUEST-READY
sleep 600
"#;

fn build_initramfs(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    for d in ["bin", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/qemu/vs.c");
    let st = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(root.join("bin/vs"))
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success(), "gcc -static failed");
    let busybox = ["/usr/bin/busybox", "/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox");
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    std::fs::write(root.join("init"), INIT).unwrap();
    let st = Command::new("chmod")
        .arg("+x")
        .arg(root.join("init"))
        .status()
        .unwrap();
    assert!(st.success());
    let out = dir.join("initrd.cpio");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . | cpio -o -H newc --quiet > '{}'",
            root.display(),
            out.display()
        ))
        .status()
        .unwrap();
    assert!(st.success(), "cpio failed");
    out
}

fn read_line(s: &mut UnixStream) -> Option<String> {
    let mut out = vec![];
    let mut b = [0u8; 1];
    while out.last() != Some(&b'\n') {
        match s.read(&mut b) {
            Ok(1) => out.push(b[0]),
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// `CONNECT port` until the guest accepts, like husk-runtime does.
fn connect(uds: &Path, port: u32, within: Duration) -> (UnixStream, String) {
    let deadline = Instant::now() + within;
    loop {
        let mut s = UnixStream::connect(uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        if let Some(line) = read_line(&mut s) {
            if line.starts_with("OK ") {
                return (s, line);
            }
        }
        assert!(
            Instant::now() < deadline,
            "guest never accepted port {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn qemu_tcg_guest_round_trip() {
    if !have("qemu-system-x86_64") {
        eprintln!("SKIP qemu_tcg_guest_round_trip: qemu-system-x86_64 is not installed");
        return;
    }
    let vmlinux = kernel().expect("no guest kernel: run guest-kernel/build.sh or set HUSK_KERNEL");
    for tool in ["gcc", "cpio"] {
        assert!(have(tool), "{tool} not found: run scripts/deps.sh");
    }
    let dir = tempfile::tempdir().unwrap();
    let initrd = build_initramfs(dir.path());
    let vhost = dir.path().join("vhost-vsock.sock");
    let uds = dir.path().join("vsock.sock");
    let console = dir.path().join("console.log");

    let vsock = Killer(
        Command::new(BIN)
            .arg("--socket")
            .arg(&vhost)
            .arg("--uds")
            .arg(&uds)
            .args(["--guest-cid", "3"])
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    while !(vhost.exists() && uds.exists()) {
        assert!(t0.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(10));
    }

    // Guest -> host: answer "hello-from-host(<what the guest sent>)".
    let host_listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    std::thread::spawn(move || {
        let (mut c, _) = host_listener.accept().unwrap();
        let mut got = vec![];
        c.read_to_end(&mut got).unwrap();
        let mut reply = b"hello-from-host(".to_vec();
        reply.extend_from_slice(&got);
        reply.push(b')');
        c.write_all(&reply).unwrap();
    });

    // A host client that connects before the guest exists: it must get an answer (OK, or EOF
    // to retry) once the guest is up or the request times out, never hang.
    let early_uds = uds.clone();
    let early = std::thread::spawn(move || {
        let mut s = UnixStream::connect(&early_uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(b"CONNECT 1024\n").unwrap();
        read_line(&mut s)
    });

    let mut qemu = Killer(
        Command::new("qemu-system-x86_64")
            .args(["-M", "microvm,acpi=off", "-accel", "tcg", "-nodefaults"])
            .args([
                "-no-user-config",
                "-display",
                "none",
                "-m",
                "256",
                "-no-reboot",
            ])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(&vmlinux)
            .arg("-initrd")
            .arg(&initrd)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 quiet reboot=t panic=-1 tsc_early_khz={}",
                tsc_khz()
            ))
            .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
            .args(["-numa", "node,memdev=mem"])
            .arg("-chardev")
            .arg(format!("socket,id=vs,path={}", vhost.display()))
            .args(["-device", "vhost-user-vsock-device,chardev=vs"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let read_console = || std::fs::read_to_string(&console).unwrap_or_default();
    let t0 = Instant::now();
    while !read_console().contains("GUEST-READY") {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "guest did not come up; console:\n{}",
            read_console()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let c = read_console();
    eprintln!("guest up in {:?}\n{c}", t0.elapsed());
    assert!(c.contains("VS-CLIENT got: hello-from-host(hello-from-guest)"));
    assert!(c.contains("VS-CLIENT connect: Connection reset by peer"));

    let early = early.join().unwrap();
    eprintln!("early CONNECT answered with {early:?}");
    assert!(early.is_none() || early.as_deref().is_some_and(|l| l.starts_with("OK ")));

    // No listener on that guest port: closed at once.
    let mut s = UnixStream::connect(&uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"CONNECT 9999\n").unwrap();
    assert_eq!(read_line(&mut s), None);

    // Echo: small round trips, then 4 MiB both ways at once.
    let (mut s, ok) = connect(&uds, 1024, Duration::from_secs(10));
    eprintln!("handshake: {ok:?}");
    let mut rtts = vec![];
    for _ in 0..200 {
        let t = Instant::now();
        s.write_all(&[b'x'; 32]).unwrap();
        let mut b = [0u8; 32];
        s.read_exact(&mut b).unwrap();
        rtts.push(t.elapsed());
    }
    rtts.sort();
    eprintln!(
        "32 B round trip: median {:?}, p99 {:?}",
        rtts[100], rtts[197]
    );
    let payload: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let mut rd = s.try_clone().unwrap();
    let n = payload.len();
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; n];
        rd.read_exact(&mut got).unwrap();
        got
    });
    let t = Instant::now();
    s.write_all(&payload).unwrap();
    let got = reader.join().unwrap();
    let dt = t.elapsed();
    assert!(got == payload, "echoed bytes differ");
    eprintln!(
        "4 MiB echo in {dt:?} ({:.1} MB/s each way)",
        payload.len() as f64 / dt.as_secs_f64() / 1e6
    );
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = vec![];
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());

    // Many connections at once.
    let mut conns: Vec<UnixStream> = (0..20)
        .map(|_| connect(&uds, 1024, Duration::from_secs(10)).0)
        .collect();
    for (i, c) in conns.iter_mut().enumerate() {
        c.write_all(format!("conn{i:02}").as_bytes()).unwrap();
    }
    for (i, c) in conns.iter_mut().enumerate() {
        let mut b = [0u8; 6];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, format!("conn{i:02}").as_bytes());
    }
    drop(conns);

    // QEMU goes away: husk-vsock exits 0 and cleans up.
    let _ = qemu.0.kill();
    let _ = qemu.0.wait();
    let mut vsock = vsock;
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = vsock.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "husk-vsock did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "husk-vsock: {status}");
    assert!(!vhost.exists() && !uds.exists());
}
