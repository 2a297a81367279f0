//! containerd 1.6's own runc shim (`io.containerd.runc.v2`) driving an OCI
//! runtime binary given by path (`ctr run --runc-binary PATH`, the runc
//! options' `BinaryName`): the way husk's runc-compatible CLI is used from
//! containerd without husk's shim. Each scenario takes the runtime binary;
//! `runc_shim_with_runc_*` run them against runc from PATH (the reference),
//! `runc_shim_with_husk_*` against `husk`, through a wrapper script that
//! exports the guest artifacts (the runtime gets only the environment
//! containerd was started with).
//!
//! What the runc shim asks of the runtime binary in these scenarios,
//! recorded from runc (`runc_shim_with_runc_records_runtime_calls` checks
//! it; `$B` is the bundle, which is also the cwd of every call, `$ROOT` is
//! `<--runc-root>/<namespace>`):
//!
//! ```text
//! --root $ROOT --log $B/log.json --log-format json create --bundle $B --pid-file $B/init.pid [--console-socket SOCK] ID
//! --root $ROOT --log $B/log.json --log-format json start ID
//! --root $ROOT --log $B/log.json --log-format json exec --process /tmp/runc-processN [--console-socket SOCK] --detach --pid-file $B/EXECID.pid ID
//! --root $ROOT --log $B/log.json --log-format json ps --format json ID
//! --root $ROOT --log $B/log.json --log-format json kill ID 15
//! --root $ROOT --log $B/log.json --log-format json delete ID
//! --root $ROOT --log $B/log.json --log-format json delete --force ID
//! ```
//!
//! The runtime's `create`/`exec` get the container's stdio as their own
//! fds 0-2 (pipes) unless there is a terminal; then fd 0 is /dev/null and
//! the runtime must send the pty master over `--console-socket`. The pid
//! written to `--pid-file` must be a process the shim (a subreaper) can
//! reap: its exit status is the container's or exec's exit status, and
//! signals to an exec go straight to that pid. A failed call's error is
//! the `msg` of the last `"level":"error"` JSON line the runtime wrote to
//! `--log`.
//!
//! Skips only when containerd/ctr (or, for husk, QEMU) are not installed,
//! or without root; a containerd that is there but broken fails.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use husk_runtime::host::which;
use husk_tests::containerd::{skip_reason, Containerd, NS};
use husk_tests::pty::{command_line, run_in_pty, sh_quote};
use husk_tests::{assert_nothing_left, bin, busybox_layout, e2e_config, processes_mentioning};

const RUNC_SHIM: &str = "io.containerd.runc.v2";

/// A private containerd whose `ctr run` uses the runc shim with `runtime`
/// as its runc binary and a runc root in its directory, and a prefix that
/// makes this scenario's container ids unique on the host.
struct Rig {
    cd: Containerd,
    tag: String,
}

impl Rig {
    fn start(runtime: &Path) -> Rig {
        static N: AtomicUsize = AtomicUsize::new(0);
        let tag = format!(
            "rshim{}n{}-",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let layout = busybox_layout();
        let b = Containerd::builder().private_fifos();
        let root = b.dir().join("runc");
        let cd = b
            .runtime(&[
                "--runtime",
                RUNC_SHIM,
                "--runc-binary",
                runtime.to_str().unwrap(),
                "--runc-root",
                root.to_str().unwrap(),
            ])
            .start();
        cd.import_busybox(&layout);
        Rig { cd, tag }
    }

    /// A container id of this scenario.
    fn id(&self, name: &str) -> String {
        format!("{}{name}", self.tag)
    }

    /// Nothing of the scenario is left: no task or container in
    /// containerd, no runtime state, no process mentioning containerd's
    /// directory (shims, runtime calls: each carries `--root` under it) or
    /// a container id, no mount under containerd's root or state; then
    /// containerd stops and leaves nothing either.
    fn finish(self) {
        let cd = &self.cd;
        for what in ["tasks", "containers"] {
            let out = cd.ctr(&[what, "ls", "-q"]);
            assert!(out.status.success(), "ctr {what} ls: {out:?}");
            let left = String::from_utf8_lossy(&out.stdout).trim().to_string();
            assert!(left.is_empty(), "{what} left: {left}");
        }
        let needles = [cd.dir().display().to_string(), self.tag.clone()];
        let deadline = Instant::now() + Duration::from_secs(20);
        let left = loop {
            let left: Vec<_> = needles
                .iter()
                .flat_map(|n| processes_mentioning(n))
                .filter(|(_, cmd)| !cmd.starts_with("containerd --config"))
                .collect();
            if left.is_empty() || Instant::now() > deadline {
                break left;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(left.is_empty(), "processes left behind: {left:?}");
        let mounts = husk_tests::mounts_under(cd.dir());
        assert!(mounts.is_empty(), "mounts left: {mounts:?}");
        let state = cd.dir().join("runc").join(NS);
        let entries: Vec<_> = std::fs::read_dir(&state)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(entries.is_empty(), "runtime state left: {entries:?}");
        self.cd.stop_and_check();
    }
}

/// `ctr run --rm`: output, exit codes, stdin through a pipe.
fn run_rm(runtime: &Path) {
    let rig = Rig::start(runtime);
    let cd = &rig.cd;

    // stdin closed at once: the container's exit must not wait on it.
    let (code, out, err) = cd.run(&rig.id("echo"), &["echo", "hello"], b"");
    assert_eq!(
        (code, out.as_str()),
        (0, "hello\n"),
        "stderr: {err}\ncontainerd log:\n{}",
        cd.log()
    );

    let (code, _, err) = cd.run(&rig.id("exit3"), &["sh", "-c", "exit 3"], b"\n");
    assert_eq!(code, 3, "stderr: {err}");

    let id = rig.id("cat");
    let input = b"line one\nline two\n";
    let (code, out, err) = cd.with_stdin_echoed(&cd.run_args(&["--rm"], &id, &["cat"]), input);
    assert_eq!(
        (code, out.as_str()),
        (0, "line one\nline two\n"),
        "stderr: {err}"
    );

    rig.finish();
}

/// `ctr run -d`, exec (output, exit code, stdin), ps, SIGTERM, delete.
fn exec_and_kill(runtime: &Path) {
    let rig = Rig::start(runtime);
    let cd = &rig.cd;
    let id = rig.id("d");
    // PID 1 of a container gets no default action for SIGTERM (a bare
    // `sleep 1000` ignores it): trap it. The id as $0 marks the process.
    let script = "trap 'exit 7' TERM; while :; do sleep 1; done";
    let out = cd.run_detached(&id, &["sh", "-c", script, &id]);
    assert!(out.status.success(), "ctr run -d: {out:?}");
    assert_eq!(cd.task_status(&id), "RUNNING");

    let (code, out, err) = cd.exec(&id, "e1", &["echo", "hi-exec"], b"");
    assert_eq!((code, out.as_str()), (0, "hi-exec\n"), "exec: {err}");
    let (code, _, err) = cd.exec(&id, "e2", &["sh", "-c", "exit 5"], b"\n");
    assert_eq!(code, 5, "exec: {err}");
    let exec = cd.exec_args(&id, "e3", &["cat"]);
    let (code, out, err) = cd.with_stdin_echoed(&exec, b"to exec\n");
    assert_eq!((code, out.as_str()), (0, "to exec\n"), "exec: {err}");

    let ps = cd.ctr(&["task", "ps", &id]);
    let text = String::from_utf8_lossy(&ps.stdout);
    assert!(ps.status.success(), "ctr task ps: {ps:?}");
    assert!(
        text.lines().skip(1).any(|l| l
            .split_whitespace()
            .next()
            .is_some_and(|p| p.parse::<u32>().is_ok())),
        "no pid in ctr task ps: {text}"
    );

    let out = cd.ctr(&["task", "kill", &id]);
    assert!(out.status.success(), "ctr task kill: {out:?}");
    if let Err(last) = cd.wait_for_task(&id, Duration::from_secs(30), |s| s == "STOPPED") {
        panic!("{id} is {last:?}, not STOPPED, 30 s after SIGTERM");
    }
    let out = cd.ctr(&["task", "delete", &id]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ctr task delete: {out:?}");
    // ctr reports a non-zero exit status of the deleted task.
    assert!(err.contains("exit code 7"), "exit status not 7: {err}");
    let out = cd.ctr(&["containers", "rm", &id]);
    assert!(out.status.success(), "ctr containers rm: {out:?}");

    rig.finish();
}

/// `ctr run -t --rm` (ctr needs a terminal: `script` gives it one): the
/// container's stdio is a pty, its exit code comes back.
fn tty(runtime: &Path) {
    let rig = Rig::start(runtime);
    let cd = &rig.cd;
    let ctr = cd.ctr_cmd(&cd.run_args(
        &["-t", "--rm"],
        &rig.id("tty"),
        &["sh", "-c", "tty; exit 4"],
    ));
    let out = run_in_pty(&command_line(&ctr), 150);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "script: {out:?}");
    assert!(text.contains("/dev/pts/"), "tty printed: {text:?}");

    rig.finish();
}

fn runc() -> PathBuf {
    which("runc").expect("runc is not in PATH; containerd's runc shim needs it")
}

/// Runs `scenario` against husk through a wrapper script that gives it the
/// guest artifacts and a run root in a temporary directory; checks that
/// nothing of husk is left there. The wrapper logs each call, shown when
/// the scenario fails.
fn with_husk(scenario: fn(&Path)) {
    struct ShowCalls(PathBuf);
    impl Drop for ShowCalls {
        fn drop(&mut self) {
            if std::thread::panicking() {
                let calls = std::fs::read_to_string(&self.0).unwrap_or_default();
                eprintln!("runtime calls ({:?}):\n{calls}", self.0);
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let cfg = e2e_config(&run);
    let calls = dir.path().join("calls.log");
    let wrapper = dir.path().join("husk-runtime");
    let q = |p: &Path| sh_quote(p.to_str().unwrap());
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n\
             export HUSK_KERNEL={}\n\
             export HUSK_INITRAMFS={}\n\
             export HUSK_RUN_DIR={}\n\
             printf '%s\\n' \"$PWD: $*\" >> {}\n\
             exec {} \"$@\"\n",
            q(&cfg.kernel),
            q(&cfg.initramfs),
            q(&run),
            q(&calls),
            q(&bin("husk")),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _show = ShowCalls(calls);
    scenario(&wrapper);
    assert_nothing_left(&run);
    let left = processes_mentioning(&dir.path().display().to_string());
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

macro_rules! skip_unless {
    ($test:literal, $tools:expr) => {
        if let Some(why) = skip_reason($tools) {
            eprintln!("SKIP {}: {why}", $test);
            return;
        }
    };
}

#[test]
fn runc_shim_with_runc_run_rm() {
    skip_unless!("runc_shim_with_runc_run_rm", &[]);
    run_rm(&runc());
}

#[test]
fn runc_shim_with_runc_exec_and_kill() {
    skip_unless!("runc_shim_with_runc_exec_and_kill", &[]);
    exec_and_kill(&runc());
}

#[test]
fn runc_shim_with_runc_tty() {
    skip_unless!("runc_shim_with_runc_tty", &[]);
    tty(&runc());
}

/// Every scenario against runc behind a wrapper that logs each call: the
/// runc shim's calls (normalized) are exactly those in this file's header,
/// the contract husk's CLI meets.
#[test]
fn runc_shim_with_runc_records_runtime_calls() {
    skip_unless!("runc_shim_with_runc_records_runtime_calls", &[]);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls.log");
    let wrapper = dir.path().join("runc-logged");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nprintf '%s\\t' \"$PWD\" \"$@\" >> {log}\necho >> {log}\nexec {runc} \"$@\"\n",
            log = sh_quote(log.to_str().unwrap()),
            runc = sh_quote(runc().to_str().unwrap()),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    run_rm(&wrapper);
    exec_and_kill(&wrapper);
    tty(&wrapper);

    let text = std::fs::read_to_string(&log).unwrap();
    let calls: BTreeSet<String> = text.lines().map(normalize).collect();
    let common = "--root $ROOT --log $B/log.json --log-format json";
    let expected: BTreeSet<String> = [
        "create --bundle $B --pid-file $B/init.pid ID",
        "create --bundle $B --pid-file $B/init.pid --console-socket SOCK ID",
        "start ID",
        "exec --process PROCESS_JSON --detach --pid-file $B/e1.pid ID",
        "exec --process PROCESS_JSON --detach --pid-file $B/e2.pid ID",
        "exec --process PROCESS_JSON --detach --pid-file $B/e3.pid ID",
        "ps --format json ID",
        "kill ID 15",
        "delete ID",
        "delete --force ID",
    ]
    .iter()
    .map(|c| format!("{common} {c}"))
    .collect();
    assert_eq!(
        calls,
        expected,
        "runtime calls changed; recorded:\n{text}\nnormalized:\n{}",
        calls.iter().cloned().collect::<Vec<_>>().join("\n")
    );
}

/// One logged call (`cwd\targ\targ...\t`) with its paths and ids replaced
/// by placeholders: `$B` (the bundle, also the cwd), `$ROOT` (the runtime
/// root, `<dir>/runc/<namespace>`), `PROCESS_JSON`, `SOCK`, `ID`.
fn normalize(line: &str) -> String {
    let mut parts = line.split('\t').filter(|s| !s.is_empty());
    let cwd = parts.next().unwrap_or_default();
    let args: Vec<&str> = parts.collect();
    let mut out = Vec::new();
    for (i, a) in args.iter().enumerate() {
        let prev = if i > 0 { args[i - 1] } else { "" };
        let a = match prev {
            "--root" if a.ends_with(&format!("/runc/{NS}")) => "$ROOT".to_string(),
            "--process" if a.starts_with("/tmp/runc-process") => "PROCESS_JSON".into(),
            "--console-socket" if a.ends_with("/pty.sock") => "SOCK".into(),
            _ if *a == cwd => "$B".into(),
            _ if a.starts_with(&format!("{cwd}/")) => format!("$B{}", &a[cwd.len()..]),
            _ if a.starts_with("rshim") => "ID".into(),
            _ => a.to_string(),
        };
        out.push(a);
    }
    out.join(" ")
}

#[test]
fn runc_shim_with_husk_run_rm() {
    skip_unless!("runc_shim_with_husk_run_rm", &["qemu-system-x86_64"]);
    with_husk(run_rm);
}

#[test]
fn runc_shim_with_husk_exec_and_kill() {
    skip_unless!("runc_shim_with_husk_exec_and_kill", &["qemu-system-x86_64"]);
    with_husk(exec_and_kill);
}

#[test]
fn runc_shim_with_husk_tty() {
    skip_unless!("runc_shim_with_husk_tty", &["qemu-system-x86_64"]);
    with_husk(tty);
}
