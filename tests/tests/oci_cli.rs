//! The `husk` OCI CLI against runc's contract: the same bundle through
//! runc and husk gives state/list/ps of the same shape and the same exit
//! codes; husk's pid is a host process that relays stdio, signals and the
//! exit status; the console socket gets a pty master; bad input fails with
//! exit 1 and leaves nothing. Needs QEMU (the VM) and runc.

use std::collections::BTreeSet;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use husk_tests::{
    alive, assert_nothing_left, bin, busybox_bundle, e2e_config, mounts_under, qemu_or_skip,
};

/// One OCI runtime binary with its own state root.
struct Runtime {
    name: &'static str,
    bin: PathBuf,
    root: PathBuf,
    env: Vec<(String, PathBuf)>,
}

impl Runtime {
    fn husk(dir: &Path) -> Runtime {
        let cfg = e2e_config(&dir.join("vm"));
        std::fs::create_dir_all(dir.join("vm")).unwrap();
        Runtime {
            name: "husk",
            bin: bin("husk"),
            root: dir.join("husk-state"),
            env: vec![
                ("HUSK_KERNEL".into(), cfg.kernel),
                ("HUSK_INITRAMFS".into(), cfg.initramfs),
                ("HUSK_RUN_DIR".into(), dir.join("vm")),
            ],
        }
    }

    fn runc(dir: &Path) -> Runtime {
        Runtime {
            name: "runc",
            bin: "runc".into(),
            root: dir.join("runc-state"),
            env: vec![],
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--root").arg(&self.root).args(args);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c.stdin(Stdio::null());
        c
    }

    /// Runs a command that does not hand stdio to a container.
    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn state(&self, id: &str) -> serde_json::Value {
        let o = self.run(&["state", id]);
        assert!(o.status.success(), "{} state: {o:?}", self.name);
        serde_json::from_slice(&o.stdout).unwrap()
    }

    /// Creates `id` with stdio on files in `dir`; returns the pid-file pid.
    fn create(&self, dir: &Path, bundle: &Path, id: &str, extra: &[&str]) -> i32 {
        let pid_file = dir.join(format!("{}-{id}.pid", self.name));
        let out = std::fs::File::create(dir.join(format!("{}-{id}.out", self.name))).unwrap();
        let err = std::fs::File::create(dir.join(format!("{}-{id}.err", self.name))).unwrap();
        let st = self
            .cmd(&["create", "--bundle", bundle.to_str().unwrap(), "--pid-file"])
            .arg(&pid_file)
            .args(extra)
            .arg(id)
            .stdout(out)
            .stderr(err)
            .status()
            .unwrap();
        assert!(
            st.success(),
            "{} create: {st}: {}",
            self.name,
            std::fs::read_to_string(dir.join(format!("{}-{id}.err", self.name))).unwrap()
        );
        std::fs::read_to_string(pid_file).unwrap().parse().unwrap()
    }

    fn wait_stopped(&self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.state(id)["status"] != "stopped" {
            assert!(
                Instant::now() < deadline,
                "{} {id} never stopped",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn skip() -> bool {
    qemu_or_skip("oci_cli").is_none()
}

/// A temp dir and husk with its state in it; None (after a printed SKIP)
/// without QEMU. With `subreaper`, orphaned husk pids become ours to wait.
fn husk_in_tempdir(subreaper: bool) -> Option<(tempfile::TempDir, Runtime)> {
    if skip() {
        return None;
    }
    if subreaper {
        become_subreaper();
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::husk(dir.path());
    Some((dir, rt))
}

/// Orphaned monitors (their `husk create` exited) become our children, so
/// the test can wait for their exit status as conmon and containerd do.
fn become_subreaper() {
    nix::sys::prctl::set_child_subreaper(true).unwrap();
}

/// Waits for an orphan (now our child) to exit; its shell-style status.
fn wait_pid(pid: i32) -> i32 {
    use nix::sys::wait::{waitpid, WaitStatus};
    loop {
        match waitpid(nix::unistd::Pid::from_raw(pid), None).unwrap() {
            WaitStatus::Exited(_, c) => return c,
            WaitStatus::Signaled(_, s, _) => return 128 + s as i32,
            _ => continue,
        }
    }
}

fn keys(v: &serde_json::Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_clean(rt: &Runtime, dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(&rt.root)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{} state left: {left:?}", rt.name);
    assert_nothing_left(&dir.join("vm"));
    assert!(mounts_under(dir).is_empty(), "{:?}", mounts_under(dir));
}

#[test]
fn husk_matches_runc_state_list_ps_and_exit_codes() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bundle = busybox_bundle(dir.path(), "bundle", &["sleep", "1000"], false, |_| {});
    let mut seen = Vec::new();
    for rt in [Runtime::runc(dir.path()), Runtime::husk(dir.path())] {
        let id = "cmp1";
        let mut codes = Vec::new();
        let mut step = |what: &str, o: &Output, phrase: &str| {
            assert!(
                stderr_of(o).contains(phrase),
                "{} {what}: want {phrase:?} in {:?}",
                rt.name,
                stderr_of(o)
            );
            codes.push((what.to_string(), o.status.code()));
        };
        // Unknown id, before anything exists.
        for c in ["state", "start", "kill", "delete", "pause", "ps"] {
            let o = rt.run(&[c, "nope"]);
            step(c, &o, "does not exist");
        }
        let pid = rt.create(dir.path(), &bundle, id, &[]);
        assert!(
            alive(pid as u32),
            "{} pid {pid} is not a live process",
            rt.name
        );
        let created = rt.state(id);
        assert_eq!(created["status"], "created", "{}", rt.name);
        assert_eq!(created["pid"], pid, "{}", rt.name);
        let list = rt.run(&["list", "--format", "json"]);
        let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
        let table = String::from_utf8(rt.run(&["list"]).stdout).unwrap();
        step("start", &rt.run(&["start", id]), "");
        step(
            "start again",
            &rt.run(&["start", id]),
            "cannot start an already running container",
        );
        let running = rt.state(id);
        assert_eq!(running["status"], "running", "{}", rt.name);
        let ps = rt.run(&["ps", "--format", "json", id]);
        let ps: Vec<i64> = serde_json::from_slice(&ps.stdout).unwrap();
        assert!(!ps.is_empty(), "{}: ps lists no process", rt.name);
        let ps_table = String::from_utf8(rt.run(&["ps", id]).stdout).unwrap();
        assert!(
            ps_table.lines().skip(1).any(|l| l.ends_with("sleep 1000")),
            "{}: {ps_table}",
            rt.name
        );
        step("delete running", &rt.run(&["delete", id]), "not stopped");
        step("kill", &rt.run(&["kill", id, "KILL"]), "");
        rt.wait_stopped(id);
        let stopped = rt.state(id);
        assert_eq!(stopped["pid"], 0, "{}", rt.name);
        step(
            "kill stopped",
            &rt.run(&["kill", id, "TERM"]),
            "not running",
        );
        step(
            "start stopped",
            &rt.run(&["start", id]),
            "cannot start a container that has stopped",
        );
        step("delete", &rt.run(&["delete", id]), "");
        step("state deleted", &rt.run(&["state", id]), "does not exist");
        step("delete -f missing", &rt.run(&["delete", "-f", id]), "");
        seen.push((
            rt.name,
            codes,
            keys(&created),
            keys(&list[0]),
            table,
            ps_table,
        ));
        assert_clean(&rt, dir.path());
    }
    let (runc, husk) = (&seen[0], &seen[1]);
    assert_eq!(husk.1, runc.1, "exit codes per step differ (husk, runc)");
    assert_eq!(husk.2, runc.2, "state keys differ");
    assert_eq!(husk.3, runc.3, "list --format json keys differ");
    fn header(t: &str) -> Vec<&str> {
        t.lines().next().unwrap_or("").split_whitespace().collect()
    }
    assert_eq!(
        header(&husk.4),
        header(&runc.4),
        "list table header differs"
    );
    assert_eq!(husk.4.lines().count(), runc.4.lines().count());
    assert_eq!(header(&husk.5), header(&runc.5), "ps table header differs");
}

#[test]
fn husk_pid_relays_stdio_and_exit_status() {
    let Some((dir, rt)) = husk_in_tempdir(true) else {
        return;
    };
    let script = "echo out; echo err >&2; read x; echo got $x; exit 3";
    // In a systemd-style cgroup (podman's systemd cgroup manager), left when
    // the container ends.
    let unit = dir
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_start_matches('.')
        .to_string();
    let bundle = busybox_bundle(dir.path(), "b", &["sh", "-c", script], false, |c| {
        c["linux"]["cgroupsPath"] = serde_json::json!(format!("husktest.slice:husk:{unit}"));
    });
    let scope = format!("/husktest.slice/husk-{unit}.scope");
    std::fs::write(dir.path().join("in"), "line\n").unwrap();
    let pid_file = dir.path().join("pid");
    let st = rt
        .cmd(&["create", "-b", bundle.to_str().unwrap(), "--pid-file"])
        .arg(&pid_file)
        .arg("io1")
        .stdin(std::fs::File::open(dir.path().join("in")).unwrap())
        .stdout(std::fs::File::create(dir.path().join("out")).unwrap())
        .stderr(std::fs::File::create(dir.path().join("err")).unwrap())
        .status()
        .unwrap();
    assert!(
        st.success(),
        "{}",
        std::fs::read_to_string(dir.path().join("err")).unwrap()
    );
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
    assert_eq!(rt.state("io1")["pid"], pid);
    let cgroups = husk_tests::cgroups_of(pid as u32);
    assert!(
        !cgroups.is_empty() && cgroups.iter().all(|c| c.ends_with(&scope)),
        "the monitor's cgroups {cgroups:?}, not {scope}"
    );
    assert!(rt.run(&["start", "io1"]).status.success());
    assert_eq!(
        wait_pid(pid),
        3,
        "the monitor exits with the container's status"
    );
    let left = husk_tests::cgroup_dirs(&scope);
    assert!(left.is_empty(), "cgroups left: {left:?}");
    for d in husk_tests::cgroup_dirs("/husktest.slice") {
        let _ = std::fs::remove_dir(d);
    }
    let read = |n: &str| std::fs::read_to_string(dir.path().join(n)).unwrap();
    assert_eq!(read("out"), "out\ngot line\n");
    assert_eq!(read("err"), "err\n");
    assert_eq!(rt.state("io1")["status"], "stopped");
    assert!(rt.run(&["delete", "io1"]).status.success());
    assert_clean(&rt, dir.path());
}

/// Receives one fd over a unix socket (the console socket protocol).
fn receive_fd(listener: &std::os::unix::net::UnixListener) -> OwnedFd {
    use std::os::fd::AsRawFd;
    let (conn, _) = listener.accept().unwrap();
    let mut buf = [0u8; 4096];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = nix::sys::socket::recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        nix::sys::socket::MsgFlags::empty(),
    )
    .unwrap();
    for c in msg.cmsgs().unwrap() {
        if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c {
            // SAFETY: the kernel just installed this fd for us.
            return unsafe { OwnedFd::from_raw_fd(fds[0]) };
        }
    }
    panic!("no fd on the console socket");
}

#[test]
fn husk_console_socket_gets_a_pty_and_exec_relays_status() {
    let Some((dir, rt)) = husk_in_tempdir(true) else {
        return;
    };
    let args = ["sh", "-c", "tty; echo ready; sleep 1000"];
    let bundle = busybox_bundle(dir.path(), "b", &args, true, |_| {});
    let sock = dir.path().join("console.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let receiver = std::thread::spawn(move || receive_fd(&listener));
    let pid = rt.create(
        dir.path(),
        &bundle,
        "tty1",
        &["--console-socket", sock.to_str().unwrap()],
    );
    let master = std::fs::File::from(receiver.join().unwrap());
    assert!(rt.run(&["start", "tty1"]).status.success());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut m = master;
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while let Ok(n) = m.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&seen).contains("ready") {
                break;
            }
        }
        let _ = tx.send(String::from_utf8_lossy(&seen).into_owned());
    });
    let seen = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("no tty output");
    assert!(seen.contains("/dev/pts/"), "{seen:?}");
    // Exactly one line discipline acts: "\r\n", not "\r\r\n".
    assert!(
        seen.contains("\r\nready") && !seen.contains("\r\r\n"),
        "{seen:?}"
    );

    // Detached exec: its pid is a host relay that exits with the status.
    let exec_pid = dir.path().join("exec.pid");
    let o = rt
        .cmd(&[
            "exec",
            "-d",
            "--pid-file",
            exec_pid.to_str().unwrap(),
            "tty1",
        ])
        .args(["sh", "-c", "exit 7"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let epid: i32 = std::fs::read_to_string(&exec_pid).unwrap().parse().unwrap();
    assert_eq!(wait_pid(epid), 7);
    // Foreground exec relays output and status.
    let o = rt.run(&[
        "exec",
        "--env",
        "X=42",
        "tty1",
        "sh",
        "-c",
        "echo x=$X; exit 4",
    ]);
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "x=42\n");

    // Foreground exec -t on the caller's own terminal (script's pty): raw
    // on the host side, so one line discipline acts.
    let line = format!(
        "{} --root {} exec -t tty1 sh -c 'tty; echo in-tty'",
        rt.bin.display(),
        rt.root.display()
    );
    let o = husk_tests::pty::run_in_pty(&line, 120);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{o:?}");
    assert!(
        text.contains("/dev/pts/") && text.contains("\r\nin-tty"),
        "{text:?}"
    );
    assert!(!text.contains("\r\r\n"), "{text:?}");

    assert!(rt.run(&["kill", "tty1", "9"]).status.success());
    assert_eq!(wait_pid(pid), 137);
    assert!(rt.run(&["delete", "tty1"]).status.success());
    assert_clean(&rt, dir.path());
}

#[test]
fn husk_cleans_up_after_its_monitor_is_killed() {
    let Some((dir, rt)) = husk_in_tempdir(true) else {
        return;
    };
    // The bundle names a cgroup, as podman's do: the monitor (and so the VM)
    // lives there; after the crash `delete -f` removes it.
    let cgroup = format!(
        "/husk-oci-test/{}",
        dir.path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches('.')
    );
    let bundle = busybox_bundle(dir.path(), "b", &["sleep", "1000"], false, |c| {
        c["linux"]["cgroupsPath"] = serde_json::json!(cgroup);
    });
    let pid = rt.create(dir.path(), &bundle, "crash1", &[]);
    assert!(rt.run(&["start", "crash1"]).status.success());
    let cgroups = husk_tests::cgroups_of(pid as u32);
    assert!(
        !cgroups.is_empty() && cgroups.iter().all(|c| c.ends_with(&cgroup)),
        "the monitor's cgroups {cgroups:?}, not {cgroup}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert_eq!(wait_pid(pid), 137);
    assert_eq!(rt.state("crash1")["status"], "stopped");
    let o = rt.run(&["delete", "-f", "crash1"]);
    assert!(o.status.success(), "{o:?}");
    assert_clean(&rt, dir.path());
    let left = husk_tests::cgroup_dirs(&cgroup);
    assert!(left.is_empty(), "cgroups left: {left:?}");
    for d in husk_tests::cgroup_dirs("/husk-oci-test") {
        let _ = std::fs::remove_dir(d); // another test's may still be in use
    }
}

#[test]
fn husk_bad_input_fails_with_exit_1_and_leaves_nothing() {
    let Some((dir, rt)) = husk_in_tempdir(false) else {
        return;
    };
    // No config.json.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = rt.run(&["create", "-b", empty.to_str().unwrap(), "bad1"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(stderr_of(&o).contains("config.json"), "{}", stderr_of(&o));
    // Broken config.json.
    std::fs::write(empty.join("config.json"), "{not json").unwrap();
    let o = rt.run(&["create", "-b", empty.to_str().unwrap(), "bad2"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    // A bundle whose process cannot start: the VM boots, creation fails,
    // and everything is undone.
    let bundle = busybox_bundle(dir.path(), "b", &["/no/such/binary"], false, |_| {});
    let o = rt.run(&["create", "-b", bundle.to_str().unwrap(), "bad3"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    // A cgroupsPath that climbs out of the hierarchy: refused, naming it.
    let climb = busybox_bundle(dir.path(), "c", &["true"], false, |c| {
        c["linux"]["cgroupsPath"] = serde_json::json!("/husk-oci-test/../../etc");
    });
    let o = rt.run(&["create", "-b", climb.to_str().unwrap(), "bad5"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(stderr_of(&o).contains("cgroupsPath"), "{}", stderr_of(&o));
    // Bad ids, terminal without console socket, unknown flags and commands.
    let o = rt.run(&["create", "-b", bundle.to_str().unwrap(), "../x"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let tty = busybox_bundle(dir.path(), "t", &["true"], true, |_| {});
    let o = rt.run(&["create", "-b", tty.to_str().unwrap(), "bad4"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        stderr_of(&o).contains("console socket"),
        "{}",
        stderr_of(&o)
    );
    assert!(!rt.run(&["create", "--bogus", "x"]).status.success());
    assert!(!rt.run(&["frobnicate"]).status.success());
    assert!(!rt.run(&["kill", "x", "NOSIG"]).status.success());
    assert_clean(&rt, dir.path());
}

#[test]
fn husk_run_in_the_foreground_relays_and_removes_the_container() {
    let Some((dir, rt)) = husk_in_tempdir(false) else {
        return;
    };
    let bundle = busybox_bundle(
        dir.path(),
        "b",
        &["sh", "-c", "echo ran; exit 9"],
        false,
        |_| {},
    );
    let o = rt
        .cmd(&["run", "-b", bundle.to_str().unwrap(), "fg1"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(9), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "ran\n");
    assert!(rt.run(&["state", "fg1"]).status.code() == Some(1));
    // Errors also go to --log in the caller's format (containerd and conmon
    // read them there).
    let log = dir.path().join("log.json");
    let o = rt.run(&[
        "--log",
        log.to_str().unwrap(),
        "--log-format",
        "json",
        "start",
        "nope",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let line: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(line["level"], "error");
    assert_eq!(line["msg"], "container does not exist");
    assert_clean(&rt, dir.path());
}

#[test]
fn husk_pause_resume_update_events_features_and_spec() {
    let Some((dir, rt)) = husk_in_tempdir(false) else {
        return;
    };
    for args in [
        &["resume", "nope"][..],
        &["exec", "nope", "true"],
        &["update", "--memory", "1000000", "nope"],
        &["events", "--stats", "nope"],
    ] {
        let o = rt.run(args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {o:?}");
        assert!(stderr_of(&o).contains("does not exist"), "{args:?}: {o:?}");
    }
    let bundle = busybox_bundle(dir.path(), "b", &["sleep", "1000"], false, |_| {});
    let o = rt
        .cmd(&["run", "-d", "-b", bundle.to_str().unwrap(), "pr1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(o.success());
    assert!(rt.run(&["pause", "pr1"]).status.success());
    assert_eq!(rt.state("pr1")["status"], "paused");
    let o = rt.run(&["pause", "pr1"]);
    assert_eq!(o.status.code(), Some(1), "pausing twice: {o:?}");
    assert_eq!(rt.run(&["exec", "pr1", "true"]).status.code(), Some(1));
    assert!(rt.run(&["resume", "pr1"]).status.success());
    assert_eq!(rt.state("pr1")["status"], "running");
    let o = rt.run(&[
        "update",
        "--memory",
        "67108864",
        "--pids-limit",
        "50",
        "pr1",
    ]);
    assert!(o.status.success(), "{o:?}");
    let o = rt.run(&["events", "--stats", "pr1"]);
    assert!(o.status.success(), "{o:?}");
    let ev: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(ev["type"], "stats");
    assert_eq!(ev["id"], "pr1");
    assert_eq!(ev["data"]["memory"]["usage"]["limit"], 67108864);
    assert!(ev["data"]["pids"]["current"].as_u64().unwrap() >= 1, "{ev}");
    assert!(
        ev["data"]["memory"]["usage"]["usage"].as_u64().unwrap() > 0,
        "{ev}"
    );
    assert!(rt.run(&["delete", "-f", "pr1"]).status.success());
    assert_clean(&rt, dir.path());

    // features and spec have runc's shape.
    let runc = Runtime::runc(dir.path());
    let feat = |r: &Runtime| -> serde_json::Value {
        serde_json::from_slice(&r.run(&["features"]).stdout).unwrap()
    };
    let (h, r) = (feat(&rt), feat(&runc));
    for k in keys(&r) {
        assert!(h.get(&k).is_some(), "features lacks {k}: {h}");
    }
    assert!(h["linux"]["namespaces"].as_array().unwrap().len() >= 7);
    for (r, name) in [(&rt, "h"), (&runc, "r")] {
        let b = dir.path().join(format!("spec-{name}"));
        std::fs::create_dir_all(&b).unwrap();
        assert!(r
            .run(&["spec", "--bundle", b.to_str().unwrap()])
            .status
            .success());
        // A second spec into the same bundle refuses to overwrite.
        assert_eq!(
            r.run(&["spec", "--bundle", b.to_str().unwrap()])
                .status
                .code(),
            Some(1)
        );
    }
    let spec = |n: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.path().join(n).join("config.json")).unwrap())
            .unwrap()
    };
    let (hs, rs) = (spec("spec-h"), spec("spec-r"));
    for k in keys(&rs) {
        assert!(hs.get(&k).is_some(), "spec lacks {k}");
    }
    assert_eq!(hs["root"]["path"], rs["root"]["path"]);
}

#[test]
fn signals_sent_to_the_husk_pid_reach_the_container() {
    let Some((dir, rt)) = husk_in_tempdir(true) else {
        return;
    };
    let script = "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.1; done";
    let bundle = busybox_bundle(dir.path(), "b", &["sh", "-c", script], false, |_| {});
    let pid = rt.create(dir.path(), &bundle, "sig1", &[]);
    assert!(rt.run(&["start", "sig1"]).status.success());
    let out = dir.path().join("husk-sig1.out");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&out).unwrap().contains("ready") {
        assert!(Instant::now() < deadline, "the container never said ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(
        wait_pid(pid),
        7,
        "SIGTERM to the host pid ran the container's trap"
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "ready\ngot-term\n");
    assert!(rt.run(&["delete", "sig1"]).status.success());
    assert_clean(&rt, dir.path());
}

#[test]
fn delete_force_cleans_up_after_create_is_killed_midway() {
    let Some((dir, rt)) = husk_in_tempdir(true) else {
        return;
    };
    let bundle = busybox_bundle(dir.path(), "b", &["sleep", "1000"], false, |_| {});
    let mut create = rt
        .cmd(&["create", "-b", bundle.to_str().unwrap(), "half1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill `husk create` while the VM boots (its monitor has recorded
    // itself and started the VM's processes).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = rt.run(&["state", "half1"]);
        if o.status.success() {
            let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            let vm_up =
                !husk_tests::processes_mentioning(&dir.path().join("vm").display().to_string())
                    .is_empty();
            if s["pid"].as_i64().unwrap_or(0) > 0 && vm_up {
                break;
            }
        }
        assert!(Instant::now() < deadline, "no record of half1");
        std::thread::sleep(Duration::from_millis(5));
    }
    create.kill().unwrap();
    create.wait().unwrap();
    let o = rt.run(&["delete", "-f", "half1"]);
    assert!(o.status.success(), "{o:?}");
    // The monitor, now our child, is gone: reap it.
    let _ = nix::sys::wait::waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
    assert_clean(&rt, dir.path());
}
