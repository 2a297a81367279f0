//! OCI containers inside a sandbox VM, end to end on the QEMU backend:
//! busybox bundles built offline (umoci + busybox-static), rootfs and
//! volumes over virtio-fs, stdio over vsock, youki's libcontainer in the
//! guest.

use std::io::Write;
use std::path::{Path, PathBuf};

use husk_runtime::Stdio;
use husk_tests::{assert_nothing_left, Pod};
use serde_json::json;

#[test]
fn run_exit_codes_signals_exec_and_namespaces() {
    let Some(pod) = Pod::new("run_exit_codes_signals_exec_and_namespaces") else {
        return;
    };
    let sb = pod.sb();

    // Exact output, exit 0.
    let b = pod.bundle("echo", &["echo", "hello"], |_| {});
    assert_eq!(
        pod.run("echo", &b, None),
        (0, "hello\n".into(), String::new())
    );

    // Exit codes propagate.
    let b = pod.bundle("exit7", &["sh", "-c", "echo to-stderr >&2; exit 7"], |_| {});
    assert_eq!(
        pod.run("exit7", &b, None),
        (7, String::new(), "to-stderr\n".into())
    );

    // stdin reaches the container, and so does its EOF (cat exits).
    let b = pod.bundle("cat", &["cat"], |_| {});
    let (st, out, _) = pod.run("cat", &b, Some(b"line one\nline two\n"));
    assert_eq!((st, out.as_str()), (0, "line one\nline two\n"));

    // A long-running container: exec into it, signals.
    let b = pod.bundle("long", &["sleep", "1000"], |_| {});
    let (_, of) = pod.out("long.out");
    sb.create_container(
        "long",
        &b,
        Stdio {
            stdout: Some(of),
            ..Default::default()
        },
    )
    .unwrap();
    sb.start_container("long").unwrap();
    let exec = |id: &str, args: &[&str]| -> (i32, String) {
        let (p, f) = pod.out(&format!("{id}.exec"));
        let process: oci_spec::runtime::Process = serde_json::from_value(json!({
            "args": args, "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}
        }))
        .unwrap();
        sb.exec(
            "long",
            id,
            &process,
            Stdio {
                stdout: Some(f),
                ..Default::default()
            },
        )
        .unwrap();
        let st = sb.wait("long", id).unwrap();
        (st, std::fs::read_to_string(p).unwrap())
    };
    assert_eq!(
        exec("e1", &["echo", "from-exec"]),
        (0, "from-exec\n".into())
    );
    // A finished exec can be forgotten; its id is then free again. A
    // running one cannot be.
    assert!(sb
        .exec(
            "long",
            "e1",
            &oci_spec::runtime::Process::default(),
            Stdio::default()
        )
        .is_err());
    sb.remove_exec("long", "e1").unwrap();
    assert_eq!(exec("e1", &["echo", "again"]), (0, "again\n".into()));
    sb.remove_exec("long", "e1").unwrap();
    assert!(sb.remove_exec("long", "e1").is_err(), "forgotten twice");
    let (_, long_pidns) = exec("e2", &["readlink", "/proc/self/ns/pid"]);
    let (_, long_netns) = exec("e3", &["readlink", "/proc/self/ns/net"]);
    assert!(!sb.container_pids("long").unwrap().is_empty());

    // SIGTERM kills an exec'd process: 143. (The container's init, as PID 1
    // of its namespace, ignores signals it has no handler for, as with runc.)
    let (_, f) = pod.out("term.exec");
    let sleeper: oci_spec::runtime::Process =
        serde_json::from_value(json!({"args": ["sleep", "1000"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}})).unwrap();
    sb.exec(
        "long",
        "term",
        &sleeper,
        Stdio {
            stdout: Some(f),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        sb.remove_exec("long", "term").is_err(),
        "a running exec cannot be forgotten"
    );
    sb.kill("long", "term", 15, false).unwrap();
    assert_eq!(sb.wait("long", "term").unwrap(), 143);

    // A second container shares the pod's network namespace, not its pids.
    let b = pod.bundle(
        "peer",
        &[
            "sh",
            "-c",
            "readlink /proc/self/ns/net; readlink /proc/self/ns/pid",
        ],
        |_| {},
    );
    let (st, out, _) = pod.run("peer", &b, None);
    assert_eq!(st, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], long_netns.trim(), "network namespace is shared");
    assert_ne!(lines[1], long_pidns.trim(), "pid namespaces differ");

    // SIGKILL on the init: 137.
    sb.kill("long", "", 9, false).unwrap();
    assert_eq!(sb.wait("long", "").unwrap(), 137);
    sb.delete_container("long").unwrap();
    pod.stop();
}

#[test]
fn readonly_rootfs_seccomp_and_bad_exec() {
    let Some(pod) = Pod::new("readonly_rootfs_seccomp_and_bad_exec") else {
        return;
    };
    let b = pod.bundle("ro", &["sh", "-c", "touch /newfile"], |c| {
        c["root"]["readonly"] = json!(true);
    });
    let (st, _, err) = pod.run("ro", &b, None);
    assert_ne!(st, 0);
    assert!(err.contains("Read-only file system"), "{err}");

    let b = pod.bundle("sec", &["mkdir", "/tmp/x"], |c| {
        c["linux"]["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
        });
    });
    let (st, _, err) = pod.run("sec", &b, None);
    assert_eq!(st, 1);
    assert!(err.contains("Operation not permitted"), "{err}");

    // Exec of a binary that does not exist: a clear error naming it.
    let b = pod.bundle("host", &["sleep", "1000"], |_| {});
    pod.sb()
        .create_container("host", &b, Stdio::default())
        .unwrap();
    pod.sb().start_container("host").unwrap();
    let process: oci_spec::runtime::Process =
        serde_json::from_value(json!({"args": ["/bin/no-such-binary"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}})).unwrap();
    let e = pod
        .sb()
        .exec("host", "bad", &process, Stdio::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no-such-binary"), "{e}");
    pod.sb().kill("host", "", 9, false).unwrap();
    assert_eq!(pod.sb().wait("host", "").unwrap(), 137);
    pod.sb().delete_container("host").unwrap();
    pod.stop();
}

#[test]
fn broken_bundles_are_refused_and_leave_nothing() {
    let Some(pod) = Pod::new("broken_bundles_are_refused_and_leave_nothing") else {
        return;
    };
    let sb = pod.sb();
    let empty = pod.work.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = sb
        .create_container("c1", &empty, Stdio::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no config.json"), "{e}");

    let bad = pod.work.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(bad.join("config.json"), "{\"ociVersion\": 5").unwrap();
    let e = sb
        .create_container("c1", &bad, Stdio::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("invalid"), "{e}");

    let b = pod.bundle("norootfs", &["true"], |_| {});
    std::fs::remove_dir_all(b.join("rootfs")).unwrap();
    let e = sb
        .create_container("c1", &b, Stdio::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("rootfs"), "{e}");

    pod.assert_no_containers_left();
    // The sandbox still works.
    let b = pod.bundle("ok", &["true"], |_| {});
    assert_eq!(pod.run("ok", &b, None).0, 0);
    pod.stop();
}

#[test]
fn volumes_carry_data_both_ways() {
    let Some(pod) = Pod::new("volumes_carry_data_both_ways") else {
        return;
    };
    let vol = pod.work.path().join("vol");
    std::fs::create_dir(&vol).unwrap();
    std::fs::write(vol.join("from-host"), "written by the host\n").unwrap();
    let ro = pod.work.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let script = "cat /data/from-host && \
        dd if=/dev/urandom of=/data/big bs=1M count=100 2>/dev/null && sync && \
        sha256sum /data/big && \
        (touch /ro/x 2>/dev/null && echo ro-writable || echo ro-refused)";
    let b = pod.bundle("vol", &["sh", "-c", script], |c| {
        let mounts = c["mounts"].as_array_mut().unwrap();
        mounts.push(json!({"destination": "/data", "type": "bind", "source": vol, "options": ["rbind", "rw"]}));
        mounts.push(json!({"destination": "/ro", "type": "bind", "source": ro, "options": ["rbind", "ro"]}));
    });
    let (st, out, err) = pod.run("vol", &b, None);
    assert_eq!(st, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "stdout: {out}\nstderr: {err}");
    assert_eq!(lines[0], "written by the host");
    let guest_sum = lines[1].split_whitespace().next().unwrap().to_string();
    assert_eq!(lines[2], "ro-refused");
    let _work = pod.stop();
    // After the sandbox is gone, the host has the same bytes.
    let host = std::process::Command::new("sha256sum")
        .arg(vol.join("big"))
        .output()
        .unwrap();
    let host_sum = String::from_utf8_lossy(&host.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert_eq!(host_sum, guest_sum);
    assert_eq!(std::fs::metadata(vol.join("big")).unwrap().len(), 100 << 20);
}

#[test]
fn memory_limit_ooms_with_an_event_and_137() {
    let Some(pod) = Pod::new("memory_limit_ooms_with_an_event_and_137") else {
        return;
    };
    let b = pod.bundle("oom", &["sh", "-c", "tail /dev/zero"], |c| {
        c["linux"]["resources"] = json!({"memory": {"limit": 33554432, "swap": 33554432}});
    });
    let sb = pod.sb();
    sb.create_container("oom", &b, Stdio::default()).unwrap();
    let events = sb.dial_agent().unwrap();
    sb.start_container("oom").unwrap();
    let st = sb.wait("oom", "").unwrap();
    assert_eq!(st, 137);
    let id = events
        .next_oom_event(std::time::Duration::from_secs(10))
        .unwrap();
    assert_eq!(id, "oom");
    assert!(sb.container_stats("oom").unwrap().oom_kills >= 1);
    sb.delete_container("oom").unwrap();
    pod.stop();
}

fn sha256_of(data: impl std::io::Read) -> String {
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut data = data;
    std::io::copy(&mut data, &mut stdin).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// MiB per stream of the stdio integrity test (`HUSK_STDIO_MIB`, default 256).
fn stdio_mib() -> u64 {
    std::env::var("HUSK_STDIO_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256)
}

/// `bytes` of numbered lines (`<prefix><n>\n`), cut at exactly `bytes`.
fn numbered(prefix: &str, bytes: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(bytes as usize + 32);
    let mut n = 1u64;
    while (v.len() as u64) < bytes {
        writeln!(v, "{prefix}{n}").unwrap();
        n += 1;
    }
    v.truncate(bytes as usize);
    v
}

/// A volume holding two numbered-line files the container copies out: the
/// guest only moves bytes (generating them under TCG would dominate).
fn pattern_volume(dir: &Path, bytes: u64) -> (PathBuf, Vec<u8>, Vec<u8>) {
    let vol = dir.join("patterns");
    std::fs::create_dir_all(&vol).unwrap();
    let (a, b) = (numbered("", bytes), numbered("e", bytes));
    std::fs::write(vol.join("out"), &a).unwrap();
    std::fs::write(vol.join("err"), &b).unwrap();
    (vol, a, b)
}

fn with_volume(c: &mut serde_json::Value, vol: &Path) {
    c["mounts"].as_array_mut().unwrap().push(
        json!({"destination": "/p", "type": "bind", "source": vol, "options": ["rbind", "ro"]}),
    );
}

#[test]
fn stdio_integrity_under_load() {
    let Some(pod) = Pod::new("stdio_integrity_under_load") else {
        return;
    };
    let bytes = stdio_mib() << 20;
    let (vol, want_out, want_err) = pattern_volume(pod.work.path(), bytes);
    // Both streams at once, as fast as the container can write them.
    let b = pod.bundle(
        "flood",
        &["sh", "-c", "cat /p/out & cat /p/err >&2; wait"],
        |c| with_volume(c, &vol),
    );
    let t0 = std::time::Instant::now();
    let (st, out, err) = pod.run("flood", &b, None);
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "stdio: {} MiB on stdout and stderr each in {secs:.1} s ({:.1} MB/s total)",
        bytes >> 20,
        2.0 * bytes as f64 / secs / 1e6
    );
    assert_eq!(st, 0);
    assert_eq!(out.len() as u64, bytes, "stdout length");
    assert_eq!(err.len() as u64, bytes, "stderr length");
    assert_eq!(
        sha256_of(out.as_bytes()),
        sha256_of(&want_out[..]),
        "stdout bytes or order"
    );
    assert_eq!(
        sha256_of(err.as_bytes()),
        sha256_of(&want_err[..]),
        "stderr bytes or order"
    );

    // The same through a terminal (raw mode, so the tty adds no \r).
    let tty_bytes = (bytes / 8).max(1 << 20);
    let b = pod.bundle(
        "ttyflood",
        &[
            "sh",
            "-c",
            &format!("stty raw -echo; head -c {tty_bytes} /p/out"),
        ],
        |c| {
            with_volume(c, &vol);
            c["process"]["terminal"] = json!(true);
        },
    );
    let (p, f) = pod.out("tty.out");
    let stdio = Stdio {
        stdout: Some(f),
        terminal: true,
        ..Default::default()
    };
    pod.sb().create_container("ttyflood", &b, stdio).unwrap();
    pod.sb().start_container("ttyflood").unwrap();
    assert_eq!(pod.sb().wait("ttyflood", "").unwrap(), 0);
    pod.sb().delete_container("ttyflood").unwrap();
    let got = std::fs::read(p).unwrap();
    assert_eq!(got.len() as u64, tty_bytes, "tty length");
    assert_eq!(
        sha256_of(&got[..]),
        sha256_of(&want_out[..tty_bytes as usize]),
        "tty bytes"
    );
    pod.stop();
}

#[test]
fn pause_resume_update_and_a_vm_that_dies_mid_exec() {
    let Some(pod) = Pod::new("pause_resume_update_and_a_vm_that_dies_mid_exec") else {
        return;
    };
    let sb = pod.sb();
    let b = pod.bundle("p", &["sleep", "1000"], |_| {});
    sb.create_container("p", &b, Stdio::default()).unwrap();
    sb.start_container("p").unwrap();
    sb.set_paused("p", true).unwrap();
    sb.set_paused("p", false).unwrap();
    let res: oci_spec::runtime::LinuxResources =
        serde_json::from_value(json!({"memory": {"limit": 67108864}, "pids": {"limit": 32}}))
            .unwrap();
    sb.update_container("p", &res).unwrap();
    let stats = sb.container_stats("p").unwrap();
    assert_eq!(stats.memory_limit_bytes, 67108864);
    assert!(stats.pids_current >= 1);

    // The VM dies while an exec is running: the caller gets an error, not a
    // hang, and the sandbox still cleans up.
    let sleeper: oci_spec::runtime::Process = serde_json::from_value(
        json!({"args": ["sleep", "1000"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}}),
    )
    .unwrap();
    sb.exec("p", "e", &sleeper, Stdio::default()).unwrap();
    let qemu = sb.pids()[0];
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(qemu as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    });
    let t0 = std::time::Instant::now();
    let e = sb.wait("p", "e").unwrap_err();
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(15),
        "{:?}",
        t0.elapsed()
    );
    eprintln!("wait after VM death: {e}");
    let mut pod = pod;
    let sb = pod.sb.take().unwrap();
    drop(sb);
    assert_nothing_left(pod.run.path());
}

#[test]
fn a_process_exits_while_its_stdin_is_still_open() {
    let Some(pod) = Pod::new("a_process_exits_while_its_stdin_is_still_open") else {
        return;
    };
    let b = pod.bundle("e", &["echo", "hi"], |_| {});
    // The host keeps the writer open: the process must still be reaped.
    let (r, w) = nix::unistd::pipe().unwrap();
    let (p, f) = pod.out("e.out");
    let stdio = Stdio {
        stdin: Some(std::fs::File::from(r)),
        stdout: Some(f),
        ..Default::default()
    };
    pod.sb().create_container("e", &b, stdio).unwrap();
    pod.sb().start_container("e").unwrap();
    let t0 = std::time::Instant::now();
    assert_eq!(pod.sb().wait("e", "").unwrap(), 0);
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(std::fs::read_to_string(p).unwrap(), "hi\n");
    pod.sb().delete_container("e").unwrap();
    drop(w);
    pod.stop();
}
