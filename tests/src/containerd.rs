//! A private containerd 1.6 for end-to-end tests: its own root, state,
//! socket and shim PATH under a temporary directory, the offline busybox
//! image imported, and `ctr` pointed at it.
//!
//! Used by `shim-v2/tests/ctr.rs` (containerd running husk's own shim,
//! `io.containerd.husk.v2`) and `tests/tests/runc_shim.rs` (containerd's
//! runc shim, `io.containerd.runc.v2`, driving an OCI runtime binary given
//! by path). Which runtime `ctr run` asks for is a list of `ctr run` flags
//! ([`Builder::runtime`]).

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use husk_runtime::host::which;

use crate::{mounts_under, processes_mentioning};

/// The reference the busybox image is imported under.
pub const IMAGE: &str = "docker.io/library/busybox:latest";
/// The containerd namespace the tests use.
pub const NS: &str = "husk-test";
/// Where Debian's containernetworking-plugins puts the CNI plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// The CRI pods' subnet, `10.88.77.0/24`, as the prefix of its addresses;
/// the host bridge is `.1`.
pub const CRI_SUBNET_PREFIX: &str = "10.88.77.";
/// The CRI pods' IPv6 subnet, `fd00:88:77::/64` (dual stack), as the
/// prefix of its addresses; the host bridge is `::1`.
pub const CRI_SUBNET6_PREFIX: &str = "fd00:88:77::";
/// The namespace of containerd's CRI plugin.
pub const CRI_NS: &str = "k8s.io";
/// The CRI sandbox ("pause") image: busybox whose command is a long sleep,
/// tagged by [`Containerd::import_busybox`] beside [`IMAGE`].
pub const PAUSE_IMAGE: &str = "docker.io/library/busybox:pause";

/// Why a containerd test cannot run here (and is skipped), or `None`:
/// `containerd`, `ctr` or one of `tools` is not installed, or this is not
/// root. A containerd that is there but broken is no reason: starting it
/// fails the test.
pub fn skip_reason(tools: &[&str]) -> Option<String> {
    for tool in ["containerd", "ctr"].iter().chain(tools) {
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

/// Sets up a private containerd before it starts.
pub struct Builder {
    dir: tempfile::TempDir,
    shims: Vec<PathBuf>,
    env: Vec<(OsString, OsString)>,
    runtime: Vec<String>,
    private_fifos: bool,
    cri: bool,
    env_removed: Vec<OsString>,
    husk_stanza: Option<String>,
}

/// containerd's runtime table for husk unless [`Builder::husk_stanza`] gives another.
const HUSK_STANZA: &str = r#"[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk]
  runtime_type = "io.containerd.husk.v2"
"#;

impl Builder {
    /// The temporary directory that will hold everything of this
    /// containerd (root, state, socket, log); removed when the
    /// [`Containerd`] is dropped.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Puts a shim binary (`containerd-shim-NAME-v2`) into a directory
    /// first in containerd's PATH, by a link of the same name.
    pub fn shim(mut self, path: impl Into<PathBuf>) -> Builder {
        self.shims.push(path.into());
        self
    }

    /// Adds a variable to containerd's environment (its shims inherit it).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Builder {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Removes a variable from the environment containerd (and so its shims)
    /// would inherit from the test.
    pub fn env_remove(mut self, key: impl Into<OsString>) -> Builder {
        self.env_removed.push(key.into());
        self
    }

    /// containerd's config tables for the husk runtime handler, in place of
    /// the plain `runtimes.husk` with `runtime_type` alone: e.g. the stanza
    /// `make install` prints, with its `options.ConfigPath`.
    pub fn husk_stanza(mut self, toml: impl Into<String>) -> Builder {
        self.husk_stanza = Some(toml.into());
        self
    }

    /// The `ctr run` flags that choose the runtime, e.g. `--runtime
    /// io.containerd.husk.v2` (used by [`Containerd::run`] and
    /// [`Containerd::run_detached`]).
    pub fn runtime(mut self, flags: &[&str]) -> Builder {
        self.runtime = flags.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Has `ctr run` and `ctr task exec` keep their IO FIFOs in this
    /// containerd's directory instead of the shared `/run/containerd/fifo`.
    pub fn private_fifos(mut self) -> Builder {
        self.private_fifos = true;
        self
    }

    /// Turns on containerd's CRI plugin (the kubelet's API, served on the
    /// same socket) with `husk` and `runc` as runtime handlers,
    /// [`PAUSE_IMAGE`] as the sandbox image and one CNI network: the
    /// bridge plugin on a bridge named after the temporary directory (the
    /// host is its gateway) with addresses from `CRI_SUBNET_PREFIX.0/24`
    /// and `CRI_SUBNET6_PREFIX/64`
    /// (plugins from [`CNI_BIN_DIR`]; one such network at a time, the
    /// subnet is fixed). The bridge is deleted when containerd stops. `ctr`
    /// then works in the CRI's namespace, `k8s.io`.
    pub fn cri(mut self) -> Builder {
        self.cri = true;
        self
    }

    /// Starts containerd and waits until `ctr version` answers; panics
    /// (with containerd's log) if it does not within 30 s.
    pub fn start(self) -> Containerd {
        let d = self.dir.path();
        let bin = d.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        for shim in &self.shims {
            assert!(
                shim.exists(),
                "{shim:?} is missing: run `cargo build --workspace --bins` (tests/run.sh does)"
            );
            std::os::unix::fs::symlink(shim, bin.join(shim.file_name().unwrap())).unwrap();
        }
        let sock = d.join("containerd.sock");
        let bridge = self.cri.then(|| {
            let name = d.file_name().unwrap().to_string_lossy();
            let tail: String = name.chars().filter(char::is_ascii_alphanumeric).collect();
            format!("hk{}", &tail[tail.len().saturating_sub(10)..])
        });
        let cri = if let Some(bridge) = &bridge {
            std::fs::create_dir_all(d.join("cni/net.d")).unwrap();
            std::fs::write(
                d.join("cni/net.d/10-husk-test.conflist"),
                serde_json::json!({
                    "cniVersion": "0.4.0",
                    "name": "husk-test",
                    "plugins": [{
                        "type": "bridge",
                        "bridge": bridge,
                        "isGateway": true,
                        "ipMasq": false,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [
                                [{"subnet": format!("{CRI_SUBNET_PREFIX}0/24")}],
                                [{"subnet": format!("{CRI_SUBNET6_PREFIX}/64")}],
                            ],
                            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
                            "dataDir": d.join("cni/ipam"),
                        },
                    }],
                })
                .to_string(),
            )
            .unwrap();
            format!(
                r#"disabled_plugins = []
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # This host refuses negative oom_score_adj (the pause container's -998),
  # which runc then fails on; husk applies it inside the VM.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni}/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
"#,
                cni = d.join("cni").display()
            )
        } else {
            "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n".to_string()
        };
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
{cri}[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  level = "debug"
{husk}"#,
            husk = self.husk_stanza.as_deref().unwrap_or(HUSK_STANZA),
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = sock.display(),
        );
        std::fs::write(d.join("config.toml"), config).unwrap();
        // The shims inherit containerd's environment: the extra variables
        // and the linked shims first in PATH.
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        let mut containerd = Command::new("containerd");
        for key in &self.env_removed {
            containerd.env_remove(key);
        }
        let child = containerd
            .arg("--config")
            .arg(d.join("config.toml"))
            .env("PATH", path)
            .envs(self.env)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting containerd");
        let fifo_dir = self.private_fifos.then(|| d.join("fifo"));
        let c = Containerd {
            child,
            dir: self.dir,
            sock,
            runtime: self.runtime,
            fifo_dir,
            ns: if self.cri { CRI_NS } else { NS },
            bridge,
        };
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
}

/// A running private containerd; stopped (SIGTERM, then SIGKILL) when
/// dropped. Dropped during a panic, it first kills and removes whatever
/// tasks and containers are left, so a failed test leaves no containers
/// or mounts behind.
pub struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
    sock: PathBuf,
    runtime: Vec<String>,
    fifo_dir: Option<PathBuf>,
    ns: &'static str,
    /// The CRI network's host bridge, deleted at the end.
    bridge: Option<String>,
}

impl Containerd {
    /// A containerd set up by the returned builder, in a new temporary
    /// directory.
    pub fn builder() -> Builder {
        Builder {
            dir: tempfile::tempdir().unwrap(),
            shims: Vec::new(),
            env: Vec::new(),
            runtime: Vec::new(),
            private_fifos: false,
            cri: false,
            env_removed: Vec::new(),
            husk_stanza: None,
        }
    }

    /// The temporary directory holding everything of this containerd.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// containerd's gRPC socket (the `-address` its shims get).
    pub fn address(&self) -> &Path {
        &self.sock
    }

    /// containerd's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// containerd's open file descriptors.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// containerd's state directory (task bundles, with their rootfs
    /// mounts, live under it).
    pub fn state_dir(&self) -> PathBuf {
        self.dir().join("state")
    }

    /// containerd's log so far (debug level).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir().join("containerd.log")).unwrap_or_default()
    }

    /// `ctr` against this containerd and namespace (under `timeout
    /// --foreground 120`: a plain `timeout` moves ctr into a process group
    /// of its own, and on a terminal ctr's tcsetattr then stops it with
    /// SIGTTOU).
    pub fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("timeout");
        c.args(["--foreground", "120"])
            .arg("ctr")
            .arg("-a")
            .arg(&self.sock)
            .arg("-n")
            .arg(self.ns)
            .args(args);
        c
    }

    /// Runs `ctr` with stdin closed.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("running ctr")
    }

    /// Imports the OCI image layout `layout` as [`IMAGE`], and as
    /// [`PAUSE_IMAGE`] with the command `sleep 1000000000` (a copy of the
    /// layout gets that tag; `layout` is left as it is).
    pub fn import_busybox(&self, layout: &Path) {
        let copy = self.dir().join("busybox-oci");
        let st = Command::new("cp")
            .arg("-a")
            .arg(layout)
            .arg(&copy)
            .status()
            .unwrap();
        assert!(st.success(), "copying {layout:?}");
        let st = Command::new("umoci")
            .args(["config", "--image"])
            .arg(format!("{}:latest", copy.display()))
            .args([
                "--tag",
                "pause",
                "--config.cmd",
                "sleep",
                "--config.cmd",
                "1000000000",
            ])
            .stderr(Stdio::null())
            .status()
            .expect("running umoci");
        assert!(st.success(), "tagging the pause image");
        let tar = self.dir().join("busybox.tar");
        let st = Command::new("tar")
            .arg("-C")
            .arg(&copy)
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

    /// `--fifo-dir DIR` when FIFOs are private, else nothing.
    fn fifo_flags(&self) -> Vec<&str> {
        match &self.fifo_dir {
            Some(d) => vec!["--fifo-dir", d.to_str().unwrap()],
            None => Vec::new(),
        }
    }

    /// The arguments of `ctr` for `run [-d|--rm|...] <runtime> IMAGE id
    /// args`; `mode` are the flags after `run`.
    pub fn run_args<'a>(&'a self, mode: &[&'a str], id: &'a str, args: &[&'a str]) -> Vec<&'a str> {
        let mut full = vec!["run"];
        full.extend(self.fifo_flags());
        full.extend(self.runtime.iter().map(String::as_str));
        full.extend_from_slice(mode);
        full.extend_from_slice(&[IMAGE, id]);
        full.extend_from_slice(args);
        full
    }

    /// `ctr run --rm` with `stdin` fed through a pipe; returns (exit code,
    /// stdout, stderr).
    pub fn run(&self, id: &str, args: &[&str], stdin: &[u8]) -> (i32, String, String) {
        self.with_stdin(&self.run_args(&["--rm"], id, args), stdin)
    }

    /// `ctr run -d`: the task is left running.
    pub fn run_detached(&self, id: &str, args: &[&str]) -> Output {
        self.ctr(&self.run_args(&["-d"], id, args))
    }

    /// The arguments of `ctr` for `task exec --exec-id exec_id container
    /// args`.
    pub fn exec_args<'a>(
        &'a self,
        container: &'a str,
        exec_id: &'a str,
        args: &[&'a str],
    ) -> Vec<&'a str> {
        let mut full = vec!["task", "exec"];
        full.extend(self.fifo_flags());
        full.extend_from_slice(&["--exec-id", exec_id, container]);
        full.extend_from_slice(args);
        full
    }

    /// `ctr task exec --exec-id exec_id container args` with `stdin` fed
    /// through a pipe; returns (exit code, stdout, stderr).
    pub fn exec(
        &self,
        container: &str,
        exec_id: &str,
        args: &[&str],
        stdin: &[u8],
    ) -> (i32, String, String) {
        self.with_stdin(&self.exec_args(container, exec_id, args), stdin)
    }

    /// Runs ctr with `stdin` fed through a pipe; returns (exit code,
    /// stdout, stderr).
    pub fn with_stdin(&self, args: &[&str], stdin: &[u8]) -> (i32, String, String) {
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

    /// Runs `ctr args` in a pseudo-terminal (`script` from util-linux
    /// gives it one, as ctr's `-t` needs), under `timeout 150`. Its
    /// output is the terminal's.
    pub fn in_pty(&self, args: &[&str]) -> Output {
        crate::pty::run_in_pty(&crate::pty::command_line(&self.ctr_cmd(args)), 150)
    }

    /// Runs ctr for a process that echoes its stdin (`cat`): writes
    /// `stdin` at once but closes it only once all of it came back on
    /// stdout. ctr forwards the end of its stdin (CloseIO) only once the
    /// task exists: an end read before that is lost, and a shim that keeps
    /// the stdin FIFO open (runc's does) never closes the process's stdin.
    /// Returns (exit code, stdout, stderr).
    pub fn with_stdin_echoed(&self, args: &[&str], stdin: &[u8]) -> (i32, String, String) {
        let mut child = self
            .ctr_cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let err = std::thread::spawn(move || {
            let mut e = Vec::new();
            let _ = stderr.read_to_end(&mut e);
            e
        });
        input.write_all(stdin).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while !out.windows(stdin.len().max(1)).any(|w| w == stdin) {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
        drop(input);
        let _ = stdout.read_to_end(&mut out);
        let err = err.join().unwrap();
        let status = child.wait().unwrap();
        (
            status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out).into_owned(),
            String::from_utf8_lossy(&err).into_owned(),
        )
    }

    /// The STATUS column of `ctr task ls` for `id` (empty when there is no
    /// such task).
    pub fn task_status(&self, id: &str) -> String {
        let out = self.ctr(&["task", "ls"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
            .unwrap_or_default()
    }

    /// Waits up to `timeout` for `done(status of id)`; returns the last
    /// status seen on timeout.
    pub fn wait_for_task(
        &self,
        id: &str,
        timeout: Duration,
        done: impl Fn(&str) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.task_status(id);
            if done(&status) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(status);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits up to 20 s until no process but containerd itself mentions
    /// this containerd's directory (shims exit after their tasks are
    /// deleted); returns those still there.
    pub fn wait_for_no_processes(&self) -> Vec<(u32, String)> {
        let needle = self.dir().display().to_string();
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

    /// Stops containerd and asserts nothing of it is left: no process
    /// mentioning its directory, no mount under it.
    pub fn stop_and_check(mut self) {
        self.stop();
        let dir = self.dir().display().to_string();
        let left = processes_mentioning(&dir);
        assert!(left.is_empty(), "processes left after containerd: {left:?}");
        let mounts = mounts_under(self.dir());
        assert!(mounts.is_empty(), "mounts left: {mounts:?}");
    }

    /// Best effort after a failure: SIGKILL every task's processes, then
    /// delete the tasks and containers (which unmounts their rootfs).
    fn remove_everything(&self) {
        let ids = |what: &str| -> Vec<String> {
            let out = self.ctr(&[what, "ls", "-q"]);
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(str::to_string)
                .collect()
        };
        for id in ids("tasks") {
            let _ = self.ctr(&["task", "kill", "-a", "-s", "SIGKILL", &id]);
            let _ = self.wait_for_task(&id, Duration::from_secs(10), |s| s != "RUNNING");
            let _ = self.ctr(&["task", "delete", "--force", &id]);
        }
        for id in ids("containers") {
            let _ = self.ctr(&["containers", "delete", &id]);
        }
    }

    /// Starts `ctr events` in the background and returns once it is
    /// subscribed (it has seen a namespace event this call caused).
    pub fn events(&self) -> Events {
        let path = self.dir().join(format!("events-{}.txt", self.child.id()));
        let out = std::fs::File::create(&path).unwrap();
        let child = Command::new("ctr")
            .arg("-a")
            .arg(&self.sock)
            .arg("-n")
            .arg(self.ns)
            .arg("events")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .expect("starting ctr events");
        let events = Events { child, path };
        let deadline = Instant::now() + Duration::from_secs(30);
        for i in 0.. {
            let label = format!("husk.events={i}");
            if !self
                .ctr(&["namespaces", "label", self.ns, &label])
                .status
                .success()
            {
                let _ = self.ctr(&["namespaces", "create", self.ns]);
            }
            std::thread::sleep(Duration::from_millis(100));
            if events
                .lines()
                .iter()
                .any(|e| e.topic.starts_with("/namespaces/"))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "`ctr events` saw no namespace event in 30 s\n{}",
                self.log()
            );
        }
        events
    }

    /// SIGTERM to containerd, SIGKILL after 10 s.
    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
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

    /// Deletes the CRI network's host bridge, if the bridge plugin made it.
    fn delete_bridge(&self) {
        if let Some(b) = &self.bridge {
            if Path::new("/sys/class/net").join(b).exists() {
                let st = Command::new("ip").args(["link", "del", b]).status();
                assert!(
                    st.is_ok_and(|s| s.success()) || std::thread::panicking(),
                    "deleting the CRI bridge {b}"
                );
            }
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() && matches!(self.child.try_wait(), Ok(None)) {
            self.remove_everything();
        }
        self.stop();
        self.delete_bridge();
    }
}

/// One line of `ctr events`: `TIMESTAMP NAMESPACE TOPIC JSON`.
#[derive(Debug, Clone)]
pub struct Event {
    /// The topic, e.g. `/tasks/exit`.
    pub topic: String,
    /// The event as JSON.
    pub json: serde_json::Value,
}

impl Event {
    /// The event's `container_id` (empty if it has none).
    pub fn container(&self) -> &str {
        self.json["container_id"].as_str().unwrap_or_default()
    }
}

/// `ctr events` running in the background (killed when dropped).
pub struct Events {
    child: Child,
    path: PathBuf,
}

impl Events {
    /// Every event printed so far.
    pub fn lines(&self) -> Vec<Event> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                // The timestamp has spaces; the topic is the first word
                // that starts with '/', the JSON is what follows it.
                let at = l.find(" /")? + 1;
                let (topic, json) = l[at..].split_once(' ').unwrap_or((&l[at..], "{}"));
                Some(Event {
                    topic: topic.to_string(),
                    json: serde_json::from_str(json).unwrap_or(serde_json::Value::Null),
                })
            })
            .collect()
    }

    /// The topics of container `id`'s events so far, in order.
    pub fn topics_of(&self, id: &str) -> Vec<String> {
        self.lines()
            .into_iter()
            .filter(|e| e.container() == id)
            .map(|e| e.topic)
            .collect()
    }

    /// Waits up to `timeout` for an event `topic` of container `id`;
    /// returns it, or on timeout the topics of `id` seen.
    pub fn wait_for(&self, id: &str, topic: &str, timeout: Duration) -> Result<Event, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let all = self.lines();
            if let Some(e) = all.iter().find(|e| e.container() == id && e.topic == topic) {
                return Ok(e.clone());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no {topic} for {id} in {timeout:?}; its events: {:?}",
                    self.topics_of(id)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
