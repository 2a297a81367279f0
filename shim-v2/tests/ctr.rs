//! End to end through a real containerd 1.6: a private daemon (own root,
//! state and socket under a temporary directory) with the runtime
//! `io.containerd.husk.v2` pointing at the built shim, the offline busybox
//! image imported, and `ctr run --rm` checked for output and exit codes.
//! Skips only when containerd/ctr or QEMU are not installed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_runtime::host::which;
use husk_tests::{busybox_layout, e2e_config, mounts_under, processes_mentioning, target_dir};

const IMAGE: &str = "docker.io/library/busybox:latest";
const NS: &str = "husk-test";
const RUNTIME: &str = "io.containerd.husk.v2";

struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
    sock: PathBuf,
}

impl Containerd {
    fn start() -> Containerd {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let bin = d.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let shim = target_dir().join("containerd-shim-husk-v2");
        assert!(
            shim.exists(),
            "{shim:?} is missing: run `cargo build --workspace --bins` (tests/run.sh does)"
        );
        std::os::unix::fs::symlink(&shim, bin.join("containerd-shim-husk-v2")).unwrap();
        let sock = d.join("containerd.sock");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  level = "debug"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk]
  runtime_type = "io.containerd.husk.v2"
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = sock.display(),
        );
        std::fs::write(d.join("config.toml"), config).unwrap();
        // The shim inherits containerd's environment: the guest artifacts,
        // a private run root, and this build's shim first in PATH.
        let cfg = e2e_config(&d.join("run"));
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .env("PATH", path)
            .env("HUSK_RUN_DIR", d.join("run"))
            .env("HUSK_KERNEL", &cfg.kernel)
            .env("HUSK_INITRAMFS", &cfg.initramfs)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting containerd");
        let c = Containerd { child, dir, sock };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c.ctr(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "containerd did not come up\n{}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        c
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("timeout");
        c.arg("120")
            .arg("ctr")
            .arg("-a")
            .arg(&self.sock)
            .arg("-n")
            .arg(NS)
            .args(args);
        c
    }

    fn ctr(&self, args: &[&str]) -> std::process::Output {
        self.ctr_cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("running ctr")
    }

    fn import_busybox(&self, layout: &Path) {
        let tar = self.dir.path().join("busybox.tar");
        let st = Command::new("tar")
            .arg("-C")
            .arg(layout)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .unwrap();
        assert!(st.success());
        let out = self.ctr(&[
            "images",
            "import",
            "--base-name",
            "docker.io/library/busybox",
            tar.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "import: {out:?}");
    }

    /// `ctr run --rm` with `stdin` fed through a pipe; returns (exit code,
    /// stdout, stderr).
    fn run(&self, id: &str, args: &[&str], stdin: &[u8]) -> (i32, String, String) {
        let mut full = vec!["run", "--runtime", RUNTIME, "--rm", IMAGE, id];
        full.extend_from_slice(args);
        self.with_stdin(&full, stdin)
    }

    /// Runs ctr with `stdin` fed through a pipe; returns (exit code,
    /// stdout, stderr).
    fn with_stdin(&self, args: &[&str], stdin: &[u8]) -> (i32, String, String) {
        let mut child = self
            .ctr_cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin).unwrap();
        drop(input);
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The STATUS column of `ctr task ls` for `id`.
    fn task_status(&self, id: &str) -> String {
        let out = self.ctr(&["task", "ls"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
            .unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn skip_reason() -> Option<String> {
    for tool in ["containerd", "ctr", "qemu-system-x86_64"] {
        if which(tool).is_none() {
            return Some(format!(
                "{tool} is not installed (scripts/deps.sh installs it)"
            ));
        }
    }
    if !nix::unistd::geteuid().is_root() {
        return Some("containerd needs root".into());
    }
    None
}

/// Waits until no process mentions `dir` (shims exit after `--rm`).
fn wait_for_no_processes(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.display().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left: Vec<_> = processes_mentioning(&needle)
            .into_iter()
            .filter(|(_, cmd)| !cmd.starts_with("containerd --config"))
            .collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn ctr_run_rm_output_and_exit_codes() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP ctr_run_rm_output_and_exit_codes: {why}");
        return;
    }
    let layout = busybox_layout();
    let cd = Containerd::start();
    cd.import_busybox(&layout);

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

    // stdin reaches the container.
    let (code, out, _) = cd.run("c3", &["cat"], b"line one\nline two\n");
    assert_eq!((code, out.as_str()), (0, "line one\nline two\n"));

    // A detached container: exec, pause/resume, metrics, kill, delete.
    let out = cd.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        "d1",
        "sleep",
        "1000",
    ]);
    assert!(out.status.success(), "ctr run -d: {out:?}");
    let exec = |id: &str, args: &[&str]| {
        let mut full = vec!["task", "exec", "--exec-id", id, "d1"];
        full.extend_from_slice(args);
        cd.with_stdin(&full, b"\n")
    };
    let (code, out, err) = exec("e1", &["echo", "hi"]);
    assert_eq!((code, out.as_str()), (0, "hi\n"), "exec: {err}");
    assert_eq!(exec("e2", &["sh", "-c", "exit 5"]).0, 5);
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

    // Crash safety: SIGKILL the shim of a running container; the VM dies
    // with it (PDEATHSIG) and containerd's `delete` cleans up the rest.
    let out = cd.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        "k1",
        "sleep",
        "1000",
    ]);
    assert!(out.status.success(), "ctr run -d: {out:?}");
    let shims: Vec<_> = processes_mentioning(&cd.dir.path().display().to_string())
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

    let left = wait_for_no_processes(cd.dir.path());
    assert!(left.is_empty(), "processes left behind: {left:?}");
    let dir = cd.dir.path().to_path_buf();
    let run = dir.join("run");
    let entries: Vec<_> = std::fs::read_dir(&run)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(entries.is_empty(), "left in {run:?}: {entries:?}");
    drop(cd);
    let left = processes_mentioning(&dir.display().to_string());
    assert!(left.is_empty(), "processes left after containerd: {left:?}");
    let mounts = mounts_under(&dir);
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
}
