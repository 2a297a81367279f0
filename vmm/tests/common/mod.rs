//! Helpers for the KVM tests: host probing, assembling tiny guests, running husk-vmm.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// What /dev/kvm is on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmHost {
    /// No usable /dev/kvm: KVM tests skip.
    Absent,
    /// PVM (paravirtual nested KVM, `/sys/module/kvm_pvm`): guest ring 0 is emulated.
    Pvm,
    /// vmx/svm hardware virtualization.
    Hardware,
    /// /dev/kvm exists but neither of the above was recognized.
    Other,
}

/// Probe the host.
pub fn kvm_host() -> KvmHost {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return KvmHost::Absent;
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return KvmHost::Pvm;
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if hw {
        KvmHost::Hardware
    } else {
        KvmHost::Other
    }
}

/// `true` if the test may run; prints why it skips otherwise. Only a missing /dev/kvm skips.
pub fn require_kvm(test: &str) -> bool {
    if kvm_host() == KvmHost::Absent {
        eprintln!("SKIP {test}: /dev/kvm is absent or not accessible");
        return false;
    }
    true
}

/// Assemble x86 GNU `as` source into a flat binary in `dir`. The tiny guests are written in
/// assembly so they stay readable; binutils is on every host that can link Rust.
pub fn assemble(dir: &Path, name: &str, source: &str) -> PathBuf {
    let s = dir.join(format!("{name}.s"));
    let o = dir.join(format!("{name}.o"));
    let bin = dir.join(format!("{name}.bin"));
    std::fs::write(&s, source).unwrap();
    let st = Command::new("as")
        .arg("--64")
        .arg("-o")
        .arg(&o)
        .arg(&s)
        .status()
        .expect("GNU as (binutils) is needed to assemble the test guests");
    assert!(st.success(), "assembling {name} failed");
    let st = Command::new("objcopy")
        .args(["-O", "binary", "-j", ".text"])
        .arg(&o)
        .arg(&bin)
        .status()
        .expect("objcopy (binutils) is needed");
    assert!(st.success(), "objcopy of {name} failed");
    bin
}

/// The outcome of one husk-vmm run.
#[derive(Debug)]
pub struct Run {
    /// Exit status.
    pub status: ExitStatus,
    /// stderr.
    pub stderr: String,
    /// Wall time from spawn to exit.
    pub elapsed: Duration,
}

impl Run {
    /// The exit code (panics on a signal death).
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("husk-vmm died by a signal: {self:?}"))
    }
}

/// A spawned husk-vmm that is killed and reaped if the test panics.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The husk-vmm binary.
/// `HUSK_VMM` overrides the binary (for test binaries copied to another machine).
pub fn husk_vmm() -> Command {
    match std::env::var_os("HUSK_VMM") {
        Some(p) => Command::new(p),
        None => Command::new(env!("CARGO_BIN_EXE_husk-vmm")),
    }
}

/// Run husk-vmm with `args` until it exits; fails the test after `timeout`.
pub fn run_vmm(args: &[&str], timeout: Duration) -> Run {
    let start = Instant::now();
    let mut child = husk_vmm()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn husk-vmm");
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            return Run {
                status,
                stderr,
                elapsed: start.elapsed(),
            };
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("husk-vmm did not exit within {timeout:?} (args {args:?})");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Run a raw long-mode guest (loaded at 0x10000) with 16 MiB and extra `args`.
pub fn run_guest(dir: &Path, bin: &Path, extra: &[&str]) -> (Run, Vec<u8>) {
    let log = dir.join("console.log");
    let mut args = vec![
        "--raw-image",
        bin.to_str().unwrap(),
        "--memory-mib",
        "16",
        "--console-log",
        log.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let run = run_vmm(&args, Duration::from_secs(20));
    let console = std::fs::read(&log).unwrap_or_default();
    (run, console)
}
