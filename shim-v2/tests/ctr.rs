//! End to end through a real containerd 1.6: a private daemon (own root,
//! state and socket under a temporary directory) with the runtime
//! `io.containerd.husk.v2` pointing at the built shim, the offline busybox
//! image imported, and `ctr run --rm` checked for output and exit codes.
//! Skips only when containerd/ctr or QEMU are not installed.

use std::time::{Duration, Instant};

use common::{containerd_with_busybox, finish, qemu_size, qemus};
use husk_tests::containerd::{skip_reason, Containerd, Events};
use husk_tests::{cgroup_dirs, cgroups_of, processes_mentioning};

mod common;

/// Returns early (printing SKIP) without containerd, ctr or QEMU.
macro_rules! skip_unless_tools {
    ($name:expr) => {
        if let Some(why) = skip_reason(&["qemu-system-x86_64"]) {
            eprintln!("SKIP {}: {why}", $name);
            return;
        }
    };
}

/// Asserts that `want` appear in this order among `id`'s event topics.
fn assert_in_order(events: &Events, id: &str, want: &[&str]) {
    for w in want {
        events
            .wait_for(id, w, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let got = events.topics_of(id);
    let mut at = 0;
    for w in want {
        match got[at..].iter().position(|t| t == w) {
            Some(i) => at += i + 1,
            None => panic!("{id}: expected {want:?} in this order, got {got:?}"),
        }
    }
}

#[test]
fn ctr_run_rm_output_and_exit_codes() {
    skip_unless_tools!("ctr_run_rm_output_and_exit_codes");
    let cd = containerd_with_busybox();

    // stdin closed at once: the container's exit must not wait on it.
    let (code, out, err) = cd.run("c1", &["echo", "hello"], b"");
    assert_eq!(
        (code, out.as_str()),
        (0, "hello\n"),
        "stderr: {err}\ncontainerd log:\n{}",
        cd.log()
    );

    let (code, _, err) = cd.run("c2", &["sh", "-c", "exit 3"], b"\n");
    assert_eq!(code, 3, "stderr: {err}\ncontainerd log:\n{}", cd.log());

    // stdin reaches the container (closed only once echoed: ctr loses an
    // end of input it reads before the task exists).
    let (code, out, err) = cd.with_stdin_echoed(
        &cd.run_args(&["--rm"], "c3", &["cat"]),
        b"line one\nline two\n",
    );
    assert_eq!(
        (code, out.as_str()),
        (0, "line one\nline two\n"),
        "stderr: {err}\ncontainerd log:\n{}",
        cd.log()
    );

    // A detached container: exec, pause/resume, metrics, kill, delete.
    let out = cd.run_detached("d1", &["sleep", "1000"]);
    assert!(out.status.success(), "ctr run -d: {out:?}");
    // The VM's host processes are in the container's cgroup (ctr's
    // cgroupsPath: /<namespace>/<id>), in every hierarchy, as runc's are.
    let vms = qemus(&cd);
    assert_eq!(vms.len(), 1, "{vms:?}");
    let cgroups = cgroups_of(vms[0].0);
    assert!(
        !cgroups.is_empty() && cgroups.iter().all(|c| c.ends_with("/husk-test/d1")),
        "QEMU's cgroups: {cgroups:?}"
    );
    let exec = |id: &str, args: &[&str]| cd.exec("d1", id, args, b"\n");
    let (code, out, err) = exec("e1", &["echo", "hi"]);
    assert_eq!((code, out.as_str()), (0, "hi\n"), "exec: {err}");
    assert_eq!(exec("e2", &["sh", "-c", "exit 5"]).0, 5);
    // ctr deletes an exec once it ends: the agent forgets it, so the same
    // exec id works again (Kubernetes exec probes rely on ids not piling up).
    let (code, out, err) = exec("e1", &["echo", "again"]);
    assert_eq!((code, out.as_str()), (0, "again\n"), "exec e1 again: {err}");
    assert!(cd.ctr(&["task", "pause", "d1"]).status.success());
    assert_eq!(cd.task_status("d1"), "PAUSED");
    assert!(cd.ctr(&["task", "resume", "d1"]).status.success());
    assert_eq!(cd.task_status("d1"), "RUNNING");
    let m = cd.ctr(&["task", "metrics", "d1"]);
    let m = String::from_utf8_lossy(&m.stdout);
    assert!(
        m.contains("pids.current") && m.contains("memory.usage"),
        "{m}"
    );
    assert!(cd.ctr(&["task", "kill", "-s", "9", "d1"]).status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while cd.task_status("d1") != "STOPPED" {
        assert!(Instant::now() < deadline, "d1 did not stop after SIGKILL");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(cd.ctr(&["task", "rm", "d1"]).status.success());
    assert!(cd.ctr(&["containers", "rm", "d1"]).status.success());
    let left = cgroup_dirs("/husk-test/d1");
    assert!(left.is_empty(), "d1's cgroups are left: {left:?}");

    // Crash safety: SIGKILL the shim of a running container; the VM dies
    // with it (PDEATHSIG) and containerd's `delete` cleans up the rest.
    let out = cd.run_detached("k1", &["sleep", "1000"]);
    assert!(out.status.success(), "ctr run -d: {out:?}");
    let shims: Vec<_> = processes_mentioning(&cd.dir().display().to_string())
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("containerd-shim-husk-v2") && cmd.contains("-id k1 "))
        .collect();
    assert_eq!(shims.len(), 1, "{shims:?}");
    let shim = nix::unistd::Pid::from_raw(shims[0].0 as i32);
    nix::sys::signal::kill(shim, nix::sys::signal::Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while cd.task_status("k1") == "RUNNING" {
        assert!(
            Instant::now() < deadline,
            "k1 still running after its shim died"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = cd.ctr(&["task", "rm", "k1"]);
    assert!(cd.ctr(&["containers", "rm", "k1"]).status.success());
    // containerd's `delete` of the dead shim removes its socket and its
    // cgroup too. The task may read as not running (its shim does not
    // answer) before containerd has run that `delete`: wait for it.
    let sock = common::shim_socket(&cd, "k1");
    let deadline = Instant::now() + Duration::from_secs(30);
    while sock.exists() || !cgroup_dirs("/husk-test/k1").is_empty() {
        assert!(
            Instant::now() < deadline,
            "after the killed shim: socket {sock:?} exists: {}, cgroups left: {:?}\n{}",
            sock.exists(),
            cgroup_dirs("/husk-test/k1"),
            cd.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    finish(cd);
}

#[test]
fn ctr_events_show_the_task_events_and_oom() {
    skip_unless_tools!("ctr_events_show_the_task_events_and_oom");
    let cd = containerd_with_busybox();
    let events = cd.events();

    let (code, out, err) = cd.run("ev1", &["echo", "hi"], b"");
    assert_eq!((code, out.as_str()), (0, "hi\n"), "stderr: {err}");
    assert_in_order(
        &events,
        "ev1",
        &[
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete",
        ],
    );

    // A detached task: exec, pause/resume, kill.
    let out = cd.run_detached("ev2", &["sleep", "1000"]);
    assert!(out.status.success(), "ctr run -d: {out:?}");
    let (code, _, err) = cd.exec("ev2", "x1", &["sh", "-c", "exit 6"], b"");
    assert_eq!(code, 6, "exec: {err}");
    assert!(cd.ctr(&["task", "pause", "ev2"]).status.success());
    assert!(cd.ctr(&["task", "resume", "ev2"]).status.success());
    assert!(cd.ctr(&["task", "kill", "-s", "9", "ev2"]).status.success());
    cd.wait_for_task("ev2", Duration::from_secs(30), |s| s == "STOPPED")
        .unwrap_or_else(|s| panic!("ev2 is {s} after SIGKILL"));
    assert!(cd.ctr(&["task", "rm", "ev2"]).status.success());
    assert!(cd.ctr(&["containers", "rm", "ev2"]).status.success());
    assert_in_order(
        &events,
        "ev2",
        &[
            "/tasks/create",
            "/tasks/start",
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/exit",
            "/tasks/paused",
            "/tasks/resumed",
            "/tasks/exit",
            "/tasks/delete",
        ],
    );
    let exits: Vec<_> = events
        .lines()
        .into_iter()
        .filter(|e| e.container() == "ev2" && e.topic == "/tasks/exit")
        .map(|e| (e.json["id"].clone(), e.json["exit_status"].clone()))
        .collect();
    assert_eq!(
        exits,
        [
            (serde_json::json!("x1"), serde_json::json!(6)),
            (serde_json::json!("ev2"), serde_json::json!(137))
        ],
        "exec exit, then init exit"
    );

    // A container over its memory limit is OOM-killed: exit 137, and
    // TaskOOM is published for it (before its exit).
    let args = cd.run_args(
        &["--rm", "--memory-limit", "33554432"],
        "oom1",
        &["sh", "-c", "tail /dev/zero"],
    );
    let (code, _, err) = cd.with_stdin(&args, b"");
    assert_eq!(code, 137, "stderr: {err}\ncontainerd log:\n{}", cd.log());
    assert_in_order(
        &events,
        "oom1",
        &["/tasks/oom", "/tasks/exit", "/tasks/delete"],
    );
    let ooms = events
        .topics_of("oom1")
        .iter()
        .filter(|t| *t == "/tasks/oom")
        .count();
    assert_eq!(
        ooms,
        1,
        "one OOM kill, one event: {:?}",
        events.topics_of("oom1")
    );
    // A child OOM-killed while the container lives on: the event comes
    // from the agent's watcher, and the later SIGKILL exit adds none.
    let out = cd.ctr(&cd.run_args(
        &["-d", "--memory-limit", "33554432"],
        "oom2",
        &["sh", "-c", "tail /dev/zero; sleep 1000"],
    ));
    assert!(out.status.success(), "ctr run -d oom2: {out:?}");
    events
        .wait_for("oom2", "/tasks/oom", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", cd.log()));
    assert_eq!(cd.task_status("oom2"), "RUNNING");
    assert!(cd
        .ctr(&["task", "kill", "-s", "9", "oom2"])
        .status
        .success());
    cd.wait_for_task("oom2", Duration::from_secs(30), |s| s == "STOPPED")
        .unwrap_or_else(|s| panic!("oom2 is {s} after SIGKILL"));
    assert!(cd.ctr(&["task", "rm", "oom2"]).status.success());
    assert!(cd.ctr(&["containers", "rm", "oom2"]).status.success());
    assert_in_order(
        &events,
        "oom2",
        &["/tasks/oom", "/tasks/exit", "/tasks/delete"],
    );
    let ooms = events
        .topics_of("oom2")
        .iter()
        .filter(|t| *t == "/tasks/oom")
        .count();
    assert_eq!(ooms, 1, "{:?}", events.topics_of("oom2"));
    // A container that ends normally has no OOM event.
    assert!(!events.topics_of("ev1").iter().any(|t| t == "/tasks/oom"));

    drop(events);
    finish(cd);
}

#[test]
fn ctr_run_tty() {
    skip_unless_tools!("ctr_run_tty");
    let cd = containerd_with_busybox();
    let out = cd.in_pty(&cd.run_args(
        &["-t", "--rm"],
        "tty1",
        &["sh", "-c", "tty; stty size; exit 4"],
    ));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "script: {out:?}\n{}", cd.log());
    assert!(text.contains("/dev/pts/"), "tty printed: {text:?}");
    finish(cd);
}

#[test]
fn ctr_containers_of_one_sandbox_share_a_vm() {
    skip_unless_tools!("ctr_containers_of_one_sandbox_share_a_vm");
    let cd = containerd_with_busybox();
    let pod = "io.kubernetes.cri.sandbox-id=pod1";
    for id in ["pod1", "p2"] {
        let out = cd.ctr(&cd.run_args(&["-d", "--annotation", pod], id, &["sleep", "1000"]));
        assert!(out.status.success(), "ctr run -d {id}: {out:?}");
    }
    let vms = qemus(&cd);
    assert_eq!(vms.len(), 1, "one VM serves the pod: {vms:?}");
    let shims: Vec<_> = processes_mentioning(&cd.dir().display().to_string())
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("containerd-shim-husk-v2"))
        .collect();
    assert_eq!(shims.len(), 1, "one shim serves the pod: {shims:?}");
    // A container of no pod gets its own VM.
    let out = cd.run_detached("alone", &["sleep", "1000"]);
    assert!(out.status.success(), "ctr run -d alone: {out:?}");
    assert_eq!(qemus(&cd).len(), 2, "{:?}", qemus(&cd));

    // Each container works, and the pod's share one kernel (one boot id).
    // (Exec ids are not reused: the agent keeps an exec's id after it is
    // deleted.)
    let boot_id = |id: &str, exec_id: &str| {
        let (code, out, err) = cd.exec(
            id,
            exec_id,
            &["cat", "/proc/sys/kernel/random/boot_id"],
            b"",
        );
        assert_eq!(code, 0, "exec in {id}: {err}");
        assert_eq!(out.trim().len(), 36, "{id}: {out:?}");
        out
    };
    assert_eq!(boot_id("pod1", "b1"), boot_id("p2", "b1"));
    assert_ne!(boot_id("pod1", "b2"), boot_id("alone", "b1"));

    // Removing one container of the pod leaves the other running.
    for id in ["p2", "alone"] {
        assert!(cd.ctr(&["task", "kill", "-s", "9", id]).status.success());
        cd.wait_for_task(id, Duration::from_secs(30), |s| s == "STOPPED")
            .unwrap_or_else(|s| panic!("{id} is {s} after SIGKILL"));
        assert!(cd.ctr(&["task", "rm", id]).status.success());
        assert!(cd.ctr(&["containers", "rm", id]).status.success());
    }
    assert_eq!(cd.task_status("pod1"), "RUNNING");
    let (code, out, _) = cd.exec("pod1", "e", &["echo", "still"], b"");
    assert_eq!((code, out.as_str()), (0, "still\n"));
    assert_eq!(qemus(&cd).len(), 1);
    assert!(cd
        .ctr(&["task", "kill", "-s", "9", "pod1"])
        .status
        .success());
    cd.wait_for_task("pod1", Duration::from_secs(30), |s| s == "STOPPED")
        .unwrap_or_else(|s| panic!("pod1 is {s} after SIGKILL"));
    assert!(cd.ctr(&["task", "rm", "pod1"]).status.success());
    assert!(cd.ctr(&["containers", "rm", "pod1"]).status.success());
    let left = cd.wait_for_no_processes();
    assert!(left.is_empty(), "processes left behind: {left:?}");
    // No shim socket is left: the pod's shim removes its own on Shutdown
    // (not only through its first bundle's `address` file).
    for id in ["pod1", "alone"] {
        let sock = common::shim_socket(&cd, id);
        assert!(!sock.exists(), "{sock:?} left");
    }
    finish(cd);
}

#[test]
fn ctr_vmm_killed_ends_the_task_with_status_137() {
    skip_unless_tools!("ctr_vmm_killed_ends_the_task_with_status_137");
    let cd = containerd_with_busybox();
    let events = cd.events();
    let out = cd.run_detached("vm1", &["sleep", "1000"]);
    assert!(out.status.success(), "ctr run -d: {out:?}");
    let vms = qemus(&cd);
    assert_eq!(vms.len(), 1, "{vms:?}");
    let t0 = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vms[0].0 as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let exit = events
        .wait_for("vm1", "/tasks/exit", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", cd.log()));
    // The container's processes were killed with the VM: 128 + SIGKILL, as
    // runc's shim reports a SIGKILLed process.
    let status = exit.json["exit_status"].as_u64().unwrap_or(0);
    assert_eq!(status, 137, "exit status: {exit:?}");
    eprintln!(
        "VMM SIGKILL to TaskExit (status {status}): {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(cd.task_status("vm1"), "STOPPED");
    // The task's stdio and control requests fail cleanly, not hang.
    let (code, _, err) = cd.exec("vm1", "x", &["true"], b"");
    assert_ne!(code, 0, "exec in a dead VM: {err}");
    let out = cd.ctr(&["task", "rm", "vm1"]);
    assert!(out.status.success(), "task rm: {out:?}");
    assert!(cd.ctr(&["containers", "rm", "vm1"]).status.success());
    assert_in_order(&events, "vm1", &["/tasks/exit", "/tasks/delete"]);
    drop(events);
    finish(cd);
}

/// The `-smp` and `-m` of the one QEMU whose command line mentions `id`'s
/// sandbox directory.
fn vm_size(cd: &Containerd, id: &str) -> (String, String) {
    let dir = cd.dir().join("run").join(id).display().to_string();
    let vms: Vec<_> = qemus(cd)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains(&format!("{dir}/")))
        .collect();
    assert_eq!(vms.len(), 1, "one VM for {id}: {vms:?}");
    qemu_size(&vms[0].1)
}

#[test]
fn ctr_config_file_and_pod_sizing() {
    skip_unless_tools!("ctr_config_file_and_pod_sizing");
    let cd = containerd_with_busybox();
    // The config file named by the runtime options (ctr's
    // --runtime-config-path) sizes the VM.
    let file = cd.dir().join("other.toml");
    std::fs::write(&file, "default_memory_mib = 320\ndebug_console = true\n").unwrap();
    let file = file.to_str().unwrap();
    let out = cd.ctr(&cd.run_args(
        &["-d", "--runtime-config-path", file],
        "cfg1",
        &["sleep", "1000"],
    ));
    assert!(out.status.success(), "ctr run -d cfg1: {out:?}");
    assert_eq!(vm_size(&cd, "cfg1"), ("1".into(), "320M".into()));

    // Pod sizing: the memory limit is added to the default, the vCPU
    // annotation sets the count.
    let out = cd.ctr(&cd.run_args(
        &[
            "-d",
            "--memory-limit",
            "33554432",
            "--annotation",
            "io.husk.vcpus=2",
        ],
        "cfg2",
        &["sleep", "1000"],
    ));
    assert!(out.status.success(), "ctr run -d cfg2: {out:?}");
    assert_eq!(vm_size(&cd, "cfg2"), ("2".into(), "288M".into()));
    let (code, out, err) = cd.exec(
        "cfg2",
        "n",
        &["grep", "-c", "^processor", "/proc/cpuinfo"],
        b"",
    );
    assert_eq!((code, out.trim()), (0, "2"), "{err}");

    // A config path that does not exist fails the run and says which.
    let (code, _, err) = cd.with_stdin(
        &cd.run_args(
            &["--rm", "--runtime-config-path", "/nonexistent/husk.toml"],
            "cfg3",
            &["true"],
        ),
        b"",
    );
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent/husk.toml"), "stderr: {err}");
    let _ = cd.ctr(&["containers", "rm", "cfg3"]);

    for id in ["cfg1", "cfg2"] {
        assert!(cd.ctr(&["task", "kill", "-s", "9", id]).status.success());
        cd.wait_for_task(id, Duration::from_secs(30), |s| s == "STOPPED")
            .unwrap_or_else(|s| panic!("{id} is {s} after SIGKILL"));
        assert!(cd.ctr(&["task", "rm", id]).status.success());
        assert!(cd.ctr(&["containers", "rm", id]).status.success());
    }
    // debug_console: the guest console reached containerd's log.
    let log = cd.log();
    assert!(log.contains("guest console of sandbox cfg1"), "{log}");
    finish(cd);
}

#[test]
fn ctr_run_with_a_binary_log_uri() {
    skip_unless_tools!("ctr_run_with_a_binary_log_uri");
    let cd = containerd_with_busybox();
    let logs = cd.dir().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let logger = cd.dir().join("logger.sh");
    std::fs::write(
        &logger,
        "#!/bin/sh\n\
         exec 5>&-\n\
         cat <&3 >\"$2/out\" & cat <&4 >\"$2/err\" &\n\
         exec 3<&- 4<&-\n\
         wait\n\
         echo \"$CONTAINER_NAMESPACE/$CONTAINER_ID\" >\"$2/env\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&logger, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let uri = format!("binary://{}?dir={}", logger.display(), logs.display());
    let (code, out, err) = cd.with_stdin(
        &cd.run_args(
            &["--rm", "--log-uri", &uri],
            "log1",
            &["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3"],
        ),
        b"",
    );
    assert_eq!(code, 3, "stdout: {out}\nstderr: {err}\n{}", cd.log());
    let env = logs.join("env");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !env.exists() {
        assert!(
            Instant::now() < deadline,
            "the logging program did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(100));
    let read = |n: &str| std::fs::read_to_string(logs.join(n)).unwrap();
    assert_eq!(read("out"), "to-stdout\n");
    assert_eq!(read("err"), "to-stderr\n");
    assert_eq!(read("env"), "husk-test/log1\n");
    finish(cd);
}
