//! A private podman for end-to-end tests of an OCI runtime given by path
//! (runc today, the `husk` CLI next).
//!
//! Everything podman keeps lives in one temporary directory: the image
//! store (`--root`, overlay driver), its run root (`--runroot`), its
//! temporary files, exit files and events (`--tmpdir`), its network
//! configuration (`--network-config-dir`) and the runtime's own state. The
//! busybox image comes from `tests/images/busybox.sh` (offline) through
//! `podman pull oci:<layout>:latest`.
//!
//! podman runs the runtime through a generated wrapper script, named like
//! the runtime (podman treats runtimes by name: `runc` gets `--log-format
//! json --log <file>`), that exports what podman does not pass on (its
//! cleanup process runs the runtime with only `PWD` and `XDG_RUNTIME_DIR`),
//! adds the runtime's state flag and logs every call.
//!
//! Host facts (podman 4.3, conmon 2.1.6, Debian 12): `podman run` needs
//! `--ulimit nofile=20000 --ulimit nproc=32768` here, or runc fails with
//! "error setting rlimit type 7: operation not permitted"; `/dev/shm/
//! libpod_lock` (locks) and `/var/lib/containers/cache` (blob info cache of
//! `pull`) are shared by every podman whatever its `--root`.

use std::cell::RefCell;
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use husk_runtime::host::which;

use crate::pty::sh_quote;
use crate::{
    alive, assert_nothing_left, bin, busybox_layout, e2e_config, mounts_under, processes_mentioning,
};

/// The busybox image, as tagged in every private store.
pub const IMAGE: &str = "localhost/busybox:latest";

/// What `podman run` needs on this host: rlimits within the host's hard
/// limits.
const ULIMITS: &[&str] = &["--ulimit", "nofile=20000", "--ulimit", "nproc=32768"];

/// No network (podman's default CNI bridge works here too, but keeps state
/// in `/var/lib/cni`; [`Podman::bridge_network`] makes a private one).
const NO_NETWORK: &[&str] = &["--network", "none"];

/// Seconds any one podman command may take (`timeout(1)`).
const PODMAN_TIMEOUT: u32 = 120;

/// An OCI runtime for podman to drive: the binary, global arguments put
/// before podman's, and environment the wrapper exports.
pub struct OciRuntime {
    /// The runtime binary.
    pub path: PathBuf,
    /// Global arguments (a private state directory).
    pub args: Vec<OsString>,
    /// Environment beyond `PATH` and `HOME`, which the wrapper always
    /// exports.
    pub env: Vec<(String, OsString)>,
}

impl OciRuntime {
    /// runc from PATH, its state in `state/runc` (podman passes no
    /// `--root`; runc would use the host-wide `/run/runc`).
    pub fn runc(state: &Path) -> OciRuntime {
        let path = which("runc").expect("runc is not in PATH (podman depends on it)");
        OciRuntime {
            path,
            args: vec!["--root".into(), state.join("runc").into()],
            env: Vec::new(),
        }
    }

    /// This build's `husk` (`husk-vsock` beside it), with the built kernel
    /// and initramfs, container state in `state/oci` and VM state in
    /// `state/vm`. `HUSK_*` variables of the test's environment are passed
    /// on.
    pub fn husk(state: &Path) -> OciRuntime {
        let cfg = e2e_config(&state.join("vm"));
        let mut env: Vec<(String, OsString)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v)))
            .filter(|(k, _)| k.starts_with("HUSK_"))
            .collect();
        env.push(("HUSK_KERNEL".into(), cfg.kernel.into()));
        env.push(("HUSK_INITRAMFS".into(), cfg.initramfs.into()));
        env.push(("HUSK_RUN_DIR".into(), cfg.run_root.into()));
        OciRuntime {
            path: bin("husk"),
            args: vec!["--root".into(), state.join("oci").into()],
            env,
        }
    }
}

/// Whether these tests can run: podman installed, running as root; else
/// prints why the test is skipped. podman without conmon or a runtime is a
/// failure, not a skip.
pub fn podman_or_skip(test: &str) -> bool {
    if which("podman").is_none() {
        eprintln!("SKIP {test}: podman is not installed (scripts/deps.sh installs it)");
        return false;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP {test}: the podman tests need root");
        return false;
    }
    true
}

/// A podman with a private store, driving one OCI runtime; removes its
/// containers and store when dropped.
pub struct Podman {
    dir: tempfile::TempDir,
    /// The wrapper podman runs as the runtime.
    runtime: PathBuf,
    /// `--cidfile`s of the containers made (checked by `assert_clean`).
    cidfiles: RefCell<Vec<PathBuf>>,
}

impl Podman {
    /// A private podman driving `runtime` (given its state directory), the
    /// busybox image imported as [`IMAGE`]; `None` (skipped, with a reason)
    /// without podman.
    pub fn new(test: &str, runtime: fn(&Path) -> OciRuntime) -> Option<Podman> {
        if !podman_or_skip(test) {
            return None;
        }
        assert!(
            which("conmon").is_some(),
            "podman is installed but conmon is not (apt-get install conmon)"
        );
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in ["state", "bin", "cids", "net"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let rt = runtime(&d.join("state"));
        let name = rt.path.file_name().expect("runtime path names a file");
        let wrapper = d.join("bin").join(name);
        let mut script = String::from(
            "#!/bin/sh\n# Generated by husk-tests: podman's cleanup process runs the runtime\n\
             # with only PWD and XDG_RUNTIME_DIR in its environment.\n",
        );
        let path = std::env::var_os("PATH").unwrap_or_default();
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
        for (k, v) in [("PATH".to_string(), path), ("HOME".to_string(), home)]
            .into_iter()
            .chain(rt.env)
        {
            script += &format!("export {k}={}\n", sh_quote(&v));
        }
        script += &format!(
            "printf '%s\\n' \"$*\" >>{}\nexec {}",
            sh_quote(d.join("runtime-calls.log").as_os_str()),
            sh_quote(rt.path.as_os_str())
        );
        for a in &rt.args {
            script += &format!(" {}", sh_quote(a));
        }
        script += " \"$@\"\n";
        std::fs::write(&wrapper, script).unwrap();
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let pm = Podman {
            dir,
            runtime: wrapper,
            cidfiles: RefCell::new(Vec::new()),
        };
        let layout = busybox_layout();
        let image = pm.ok(&["pull", "-q", &format!("oci:{}:latest", layout.display())]);
        pm.ok(&["tag", image.trim(), IMAGE]);
        Some(pm)
    }

    /// The private directory (store, state, wrapper).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The global flags of every podman command.
    fn global_args(&self) -> Vec<OsString> {
        let d = self.dir.path();
        let mut args: Vec<OsString> = Vec::new();
        for (flag, value) in [
            ("--root", d.join("storage")),
            ("--runroot", d.join("runroot")),
            ("--tmpdir", d.join("tmp")),
            ("--network-config-dir", d.join("net")),
            ("--runtime", self.runtime.clone()),
        ] {
            args.push(flag.into());
            args.push(value.into());
        }
        for a in [
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
            "--storage-driver",
            "overlay",
        ] {
            args.push(a.into());
        }
        args
    }

    /// Makes a CNI network for this podman only (in its network config
    /// directory): the bridge plugin on a bridge named after the private
    /// directory, the host its gateway `<prefix>1`, addresses from
    /// `<prefix>0/24` kept in the private directory. Returns its name. The
    /// bridge is deleted when this `Podman` is dropped.
    pub fn bridge_network(&self, prefix: &str) -> String {
        let d = self.dir.path();
        let name = "husktest";
        std::fs::write(
            d.join("net").join(format!("{name}.conflist")),
            serde_json::json!({
                "cniVersion": "0.4.0",
                "name": name,
                "plugins": [{
                    "type": "bridge",
                    "bridge": self.bridge_name(),
                    "isGateway": true,
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": format!("{prefix}0/24")}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": d.join("ipam"),
                    },
                }],
            })
            .to_string(),
        )
        .unwrap();
        name.into()
    }

    /// The host bridge [`Podman::bridge_network`] uses.
    fn bridge_name(&self) -> String {
        let n = self.dir.path().file_name().unwrap().to_string_lossy();
        let tail: String = n.chars().filter(char::is_ascii_alphanumeric).collect();
        format!("hp{}", &tail[tail.len().saturating_sub(10)..])
    }

    /// `podman run -d --network <network>` of busybox with `args`; returns
    /// the container id.
    pub fn run_detached_on(&self, network: &str, args: &[&str]) -> String {
        let cid = self.cidfile();
        let mut full = vec!["run", "-d", "--cidfile", &cid, "--network", network];
        full.extend_from_slice(ULIMITS);
        full.push(IMAGE);
        full.extend_from_slice(args);
        self.ok(&full).trim().to_string()
    }

    /// `timeout --foreground 120 podman <global flags>`, arguments to add
    /// (`--foreground` keeps podman in the caller's process group, see
    /// [`crate::containerd::Containerd::ctr_cmd`]).
    pub fn cmd(&self) -> Command {
        let mut c = Command::new("timeout");
        c.arg("--foreground")
            .arg(PODMAN_TIMEOUT.to_string())
            .arg("podman")
            .args(self.global_args());
        c
    }

    /// Runs podman with `stdin` fed through a pipe; returns (exit code,
    /// stdout, stderr).
    pub fn output(&self, args: &[&str], stdin: &[u8]) -> (i32, String, String) {
        let mut child = self
            .cmd()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running podman");
        let mut input = child.stdin.take().unwrap();
        // A container that does not read its stdin closes the pipe.
        let _ = input.write_all(stdin);
        drop(input);
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs podman, which must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.output(args, b"");
        assert_eq!(
            code,
            0,
            "podman {args:?} failed\nstderr: {err}\n{}",
            self.context()
        );
        out
    }

    /// What helps explain a failure: the runtime calls podman made.
    pub fn context(&self) -> String {
        let calls =
            std::fs::read_to_string(self.dir.path().join("runtime-calls.log")).unwrap_or_default();
        format!("runtime calls:\n{calls}")
    }

    /// A new `--cidfile` path; the id in it is checked by `assert_clean`.
    fn cidfile(&self) -> String {
        let n = self.cidfiles.borrow().len();
        let p = self.dir.path().join("cids").join(format!("{n}.cid"));
        self.cidfiles.borrow_mut().push(p.clone());
        p.display().to_string()
    }

    /// `podman run --rm <opts>` of busybox running `cmd`, stdin fed
    /// through a pipe (the container sees it with `-i` in `opts`); returns
    /// (exit code, stdout, stderr).
    pub fn run_rm(&self, opts: &[&str], cmd: &[&str], stdin: &[u8]) -> (i32, String, String) {
        let cid = self.cidfile();
        let mut full = vec!["run", "--rm", "--cidfile", &cid];
        full.extend_from_slice(NO_NETWORK);
        full.extend_from_slice(ULIMITS);
        full.extend_from_slice(opts);
        full.push(IMAGE);
        full.extend_from_slice(cmd);
        self.output(&full, stdin)
    }

    /// `podman run -d` of busybox with `args`; returns the container id.
    pub fn run_detached(&self, args: &[&str]) -> String {
        let cid = self.cidfile();
        let mut full = vec!["run", "-d", "--cidfile", &cid];
        full.extend_from_slice(NO_NETWORK);
        full.extend_from_slice(ULIMITS);
        full.push(IMAGE);
        full.extend_from_slice(args);
        self.ok(&full).trim().to_string()
    }

    /// Runs podman in a pseudo-terminal (util-linux `script`), no input;
    /// returns (exit code, output with `\r` dropped).
    pub fn in_tty(&self, args: &[&str]) -> (i32, String) {
        let mut words: Vec<OsString> = vec!["podman".into()];
        words.extend(self.global_args());
        words.extend(args.iter().map(OsString::from));
        let line: Vec<String> = words.iter().map(sh_quote).collect();
        let out = crate::pty::run_in_pty(&line.join(" "), PODMAN_TIMEOUT);
        let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
        (out.status.code().unwrap_or(-1), text)
    }

    /// `podman run -it --rm` of busybox with `args`, in a pseudo-terminal.
    pub fn run_tty(&self, args: &[&str]) -> (i32, String) {
        let cid = self.cidfile();
        let mut full = vec!["run", "-it", "--rm", "--cidfile", &cid];
        full.extend_from_slice(NO_NETWORK);
        full.extend_from_slice(ULIMITS);
        full.push(IMAGE);
        full.extend_from_slice(args);
        self.in_tty(&full)
    }

    /// `podman inspect --format <format> <id>`, trimmed.
    pub fn inspect(&self, id: &str, format: &str) -> String {
        self.ok(&["inspect", "--format", format, id])
            .trim()
            .to_string()
    }

    /// Ids of the containers made so far (those whose cidfile was written).
    pub fn ids(&self) -> Vec<String> {
        self.cidfiles
            .borrow()
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .map(|s| s.trim().to_string())
            .collect()
    }

    /// Asserts nothing of the containers is left once all are removed: no
    /// container known to podman, no process mentioning the private
    /// directory (conmon, the runtime, VMs) or a container id, no mount
    /// but the image store's own, no runtime state, no cgroup of a
    /// container. Waits a while for podman's cleanup processes.
    pub fn assert_clean(&self) {
        assert_eq!(self.ok(&["ps", "-aq"]).trim(), "", "containers left");
        let ids = self.ids();
        let mut needles = vec![self.dir.path().display().to_string()];
        needles.extend(ids.iter().cloned());
        let deadline = Instant::now() + Duration::from_secs(20);
        let left = loop {
            let left: Vec<_> = needles
                .iter()
                .flat_map(|n| processes_mentioning(n))
                .collect();
            if left.is_empty() || Instant::now() > deadline {
                break left;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(
            left.is_empty(),
            "processes left behind: {left:?}\n{}",
            self.context()
        );
        let mounts = mounts_under(self.dir.path());
        assert!(mounts.is_empty(), "mounts left behind: {mounts:?}");
        for e in std::fs::read_dir(self.dir.path().join("state")).unwrap() {
            assert_nothing_left(&e.unwrap().path());
        }
        let cgroups: Vec<_> = ids.iter().flat_map(|id| container_cgroups(id)).collect();
        assert!(cgroups.is_empty(), "cgroups left behind: {cgroups:?}");
    }
}

/// Waits until `pid` is gone (or 20 s have passed); whether it is gone.
pub fn wait_gone(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

/// cgroups podman's cgroupfs manager made for container `id`
/// (`libpod_parent/libpod-<id>` in any hierarchy).
fn container_cgroups(id: &str) -> Vec<PathBuf> {
    let name = format!("libpod_parent/libpod-{id}");
    let mut found = Vec::new();
    let root = Path::new("/sys/fs/cgroup");
    let hierarchies = std::fs::read_dir(root)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_else(|_| Vec::new());
    for h in std::iter::once(root.to_path_buf()).chain(hierarchies) {
        let p = h.join(&name);
        if p.exists() {
            found.push(p);
        }
    }
    found
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Removes whatever a failed test left running.
        let _ = self
            .cmd()
            .args(["rm", "--all", "--force", "--time", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // The overlay store mounts layers and /dev/shm of containers;
        // a failed test may leave them.
        let mut mounts = mounts_under(self.dir.path());
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        let bridge = self.bridge_name();
        if Path::new("/sys/class/net").join(&bridge).exists() {
            let _ = Command::new("ip").args(["link", "del", &bridge]).status();
        }
    }
}
