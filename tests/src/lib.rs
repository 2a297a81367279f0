//! Shared helpers of husk's end-to-end tests: where the built binaries and
//! boot artifacts are, whether QEMU is there, and leak checks.
//!
//! The tests run real parts: the `husk-agent` binary, QEMU (TCG here, KVM
//! where the host has it), the guest kernel from `guest-kernel/build.sh`
//! and initramfs from `rootfs/build.sh`. `tests/run.sh` builds all of them
//! first. A missing artifact fails the test with what to run; only a host
//! without QEMU at all skips, and says so.

use std::path::{Path, PathBuf};
use std::process::Command;

use std::fs::File;

use husk_runtime::config::{BackendSetting, RuntimeConfig};
use husk_runtime::host::which;
use husk_runtime::host::HostProbe;
use husk_runtime::{Sandbox, Stdio};

pub mod containerd;
pub mod cri;
pub mod podman;
pub mod pty;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// The cargo target profile directory (`target/debug`, `target/release`)
/// the running test or benchmark was built into.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("executable has a directory");
    // Tests live in target/<profile>/deps, binaries in target/<profile>.
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().expect("deps has a parent");
    }
    dir.to_path_buf()
}

/// A workspace binary (built by `cargo build --workspace`).
pub fn bin(name: &str) -> PathBuf {
    let p = target_dir().join(name);
    assert!(
        p.exists(),
        "{p:?} is missing: run `cargo build --workspace` (tests/run.sh does) before the tests"
    );
    p
}

/// QEMU, or `None` after printing why the test is skipped.
pub fn qemu_or_skip(test: &str) -> Option<PathBuf> {
    let q = which("qemu-system-x86_64");
    if q.is_none() {
        eprintln!(
            "SKIP {test}: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
        );
    }
    q
}

/// Path from an environment variable, or the default; must exist.
fn artifact(var: &str, default: PathBuf, how: &str) -> PathBuf {
    let p = std::env::var_os(var).map(PathBuf::from).unwrap_or(default);
    assert!(
        p.is_file(),
        "{p:?} ({var}) is missing: {how} (tests/run.sh builds it and sets {var})"
    );
    p
}

/// A runtime config for end-to-end tests: the built kernel and initramfs,
/// this build's `husk-vsock`, state under `run_root`, the auto backend.
pub fn e2e_config(run_root: &Path) -> RuntimeConfig {
    let mut cfg = RuntimeConfig::from_env().expect("runtime config from env");
    cfg.kernel = artifact(
        "HUSK_KERNEL",
        husk_runtime::config::default_cache_dir().join("vmlinux"),
        "build it with guest-kernel/build.sh",
    );
    cfg.initramfs = artifact(
        "HUSK_INITRAMFS",
        workspace_root().join("target/husk/initramfs.cpio"),
        "build it with rootfs/build.sh",
    );
    cfg.vsock_backend = Some(bin("husk-vsock"));
    cfg.run_root = run_root.to_path_buf();
    cfg.backend = BackendSetting::Auto;
    cfg
}

/// Builds an initramfs whose /init is `script` (run by busybox sh), for
/// guests that misbehave on purpose.
pub fn script_initramfs(dir: &Path, name: &str, script: &str) -> PathBuf {
    let init = dir.join(format!("{name}.init"));
    std::fs::write(&init, format!("#!/bin/sh\n{script}\n")).unwrap();
    let out = dir.join(format!("{name}.cpio"));
    let st = Command::new("bash")
        .arg(workspace_root().join("rootfs/build.sh"))
        .arg(&init)
        .arg(&out)
        .arg("--debug")
        .stdout(std::process::Stdio::null())
        .status()
        .expect("running rootfs/build.sh");
    assert!(st.success(), "rootfs/build.sh failed for {name}");
    out
}

/// The cgroup paths of process `pid`, one per hierarchy (the last field of
/// each `/proc/<pid>/cgroup` line).
pub fn cgroups_of(pid: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.splitn(3, ':').nth(2).map(str::to_string))
        .collect()
}

/// The directories of cgroup `path` (cgroupfs form, e.g. `/husk-test/c1`)
/// that exist, in every mounted cgroup hierarchy.
pub fn cgroup_dirs(path: &str) -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let fstype = right.split(' ').next()?;
            let mount = left.split(' ').nth(4)?;
            matches!(fstype, "cgroup" | "cgroup2")
                .then(|| Path::new(mount).join(path.trim_start_matches('/')))
        })
        .filter(|d| d.is_dir())
        .collect()
}

/// Host processes whose command line mentions `needle` (e.g. a run root).
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmd.contains(needle) {
            found.push((pid, cmd));
        }
    }
    found
}

/// Whether a pid is still alive (zombies count as gone).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Asserts nothing of a run root is left: no directory entries, no process
/// mentioning it.
pub fn assert_nothing_left(run_root: &Path) {
    let entries: Vec<_> = std::fs::read_dir(run_root)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        entries.is_empty(),
        "left behind in {run_root:?}: {entries:?}"
    );
    let procs = processes_mentioning(&run_root.display().to_string());
    assert!(procs.is_empty(), "processes left behind: {procs:?}");
    let mounts = mounts_under(run_root);
    assert!(mounts.is_empty(), "mounts left behind: {mounts:?}");
}

/// The busybox OCI image layout (built once by tests/images/busybox.sh).
pub fn busybox_layout() -> PathBuf {
    // Tests of one binary run on threads: build the layout once.
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _once = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    let layout = workspace_root().join("target/husk/busybox-oci");
    let st = Command::new("bash")
        .arg(workspace_root().join("tests/images/busybox.sh"))
        .arg(&layout)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("running tests/images/busybox.sh");
    assert!(
        st.success(),
        "building the busybox image failed (needs umoci, busybox-static)"
    );
    layout
}

/// Unpacks the busybox image into `dir/name` (an OCI bundle) and sets the
/// process args and terminal flag; `edit` may change the spec further.
pub fn busybox_bundle(
    dir: &Path,
    name: &str,
    args: &[&str],
    terminal: bool,
    edit: impl FnOnce(&mut serde_json::Value),
) -> PathBuf {
    let layout = busybox_layout();
    let bundle = dir.join(name);
    let st = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:latest", layout.display()))
        .arg(&bundle)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("running umoci");
    assert!(st.success(), "umoci unpack failed");
    let cfg_path = bundle.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["process"]["args"] = serde_json::json!(args);
    cfg["process"]["terminal"] = serde_json::json!(terminal);
    edit(&mut cfg);
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    bundle
}

/// Mount points at or under `path` in this mount namespace.
pub fn mounts_under(path: &Path) -> Vec<String> {
    husk_runtime::shared_fs::mounts_under(path)
}

/// A sandbox for container tests, with a run root and a work directory.
pub struct Pod {
    /// The sandbox (taken by `stop`).
    pub sb: Option<Sandbox>,
    /// Its run root.
    pub run: tempfile::TempDir,
    /// Bundles, outputs, volumes.
    pub work: tempfile::TempDir,
}

impl Pod {
    /// Starts a sandbox, or `None` (skipped, with a reason) without QEMU.
    pub fn new(test: &str) -> Option<Pod> {
        qemu_or_skip(test)?;
        let run = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        let cfg = e2e_config(run.path());
        let sb = Sandbox::start(&cfg, &HostProbe::detect(), "pod").unwrap();
        Some(Pod {
            sb: Some(sb),
            run,
            work,
        })
    }

    /// The sandbox.
    pub fn sb(&self) -> &Sandbox {
        self.sb.as_ref().unwrap()
    }

    /// A busybox bundle in the work directory.
    pub fn bundle(
        &self,
        name: &str,
        args: &[&str],
        edit: impl FnOnce(&mut serde_json::Value),
    ) -> PathBuf {
        busybox_bundle(self.work.path(), name, args, false, edit)
    }

    /// Asserts the sandbox holds no container: none known to the runtime,
    /// nothing in the share, no mount under it but the share itself.
    pub fn assert_no_containers_left(&self) {
        let sb = self.sb();
        assert!(sb.container_ids().is_empty());
        let share = sb.shared_dir().unwrap().to_path_buf();
        assert_eq!(
            std::fs::read_dir(&share).unwrap().count(),
            0,
            "share not clean"
        );
        assert_eq!(mounts_under(&share), vec![share.display().to_string()]);
    }

    /// A new output file in the work directory.
    pub fn out(&self, name: &str) -> (PathBuf, File) {
        let p = self.work.path().join(name);
        let f = File::create(&p).unwrap();
        (p, f)
    }

    /// Runs a container to completion; returns (status, stdout, stderr).
    pub fn run(&self, id: &str, bundle: &Path, stdin: Option<&[u8]>) -> (i32, String, String) {
        let (op, of) = self.out(&format!("{id}.out"));
        let (ep, ef) = self.out(&format!("{id}.err"));
        let stdin = stdin.map(|data| {
            let p = self.work.path().join(format!("{id}.in"));
            std::fs::write(&p, data).unwrap();
            File::open(p).unwrap()
        });
        let stdio = Stdio {
            stdin,
            stdout: Some(of),
            stderr: Some(ef),
            terminal: false,
        };
        if let Err(e) = self.sb().create_container(id, bundle, stdio) {
            let console =
                std::fs::read_to_string(self.sb().dir().join("console.log")).unwrap_or_default();
            let err = std::fs::read_to_string(&ep).unwrap_or_default();
            panic!("creating {id}: {e}\nguest console:\n{console}\nstderr:\n{err}");
        }
        self.sb().start_container(id).unwrap();
        let status = self.sb().wait(id, "").unwrap_or_else(|e| {
            // Say why the agent went away: the vsock backend's and the
            // guest's last words.
            let log =
                |n: &str| std::fs::read_to_string(self.sb().dir().join(n)).unwrap_or_default();
            panic!(
                "waiting for {id}: {e}\nvsock.log:\n{}\nqemu.log:\n{}\nguest console:\n{}",
                log("vsock.log"),
                log("qemu.log"),
                husk_runtime::sandbox::console_excerpt(&self.sb().dir().join("console.log"))
            )
        });
        self.sb().delete_container(id).unwrap();
        (
            status,
            std::fs::read_to_string(op).unwrap(),
            std::fs::read_to_string(ep).unwrap(),
        )
    }

    /// Stops the sandbox, checks nothing is left, and hands back the work
    /// directory (volumes) for checks after the stop.
    pub fn stop(mut self) -> tempfile::TempDir {
        self.sb.take().unwrap().stop().unwrap();
        assert_nothing_left(self.run.path());
        self.work
    }
}

/// GET `path` from `ip:port` (HTTP/1.0; `ip` IPv4 or IPv6), retrying until a server answers;
/// the whole answer.
pub fn http_get(ip: &str, port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::new(ip.parse().expect("an IP address"), port),
            Duration::from_secs(2),
        )
        .and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
            let mut a = String::new();
            s.read_to_string(&mut a)?;
            Ok(a)
        });
        match answer {
            Ok(a) if !a.is_empty() => return a,
            other => assert!(
                Instant::now() < deadline,
                "no HTTP answer from {ip}:{port}: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
