//! The runc-compatible OCI runtime commands. Each container gets its own
//! VM, owned by a host "monitor" process whose pid callers are given (see
//! DESIGN.md, "The OCI CLI").

pub mod exec;
pub mod info;
pub mod lifecycle;
pub mod monitor;
pub mod relay;
pub mod state;

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};

use anyhow::Context;

/// runc's global flags that matter to husk.
#[derive(Debug, Clone)]
pub struct Global {
    /// State root (`--root`).
    pub root: PathBuf,
    /// Log file (`--log`), else stderr.
    pub log: Option<PathBuf>,
    /// `--log-format json`.
    pub log_json: bool,
    /// `--debug`.
    pub debug: bool,
}

/// A husk child re-executed for an internal role (`__monitor`, `__exec`)
/// that reports `ok` or its error on a sync pipe once set up.
#[derive(Debug)]
pub struct Reporting {
    /// The child process.
    pub child: Child,
    report: std::fs::File,
}

impl Reporting {
    /// Waits for the child's report: `Ok` on "ok", else its error (or
    /// that it died without one).
    pub fn outcome(&mut self, what: &str) -> anyhow::Result<()> {
        let mut reply = String::new();
        let _ = self.report.read_to_string(&mut reply);
        match reply.trim() {
            "ok" => Ok(()),
            "" => {
                let status = self.child.try_wait().ok().flatten();
                anyhow::bail!("the husk {what} died before reporting ({status:?})")
            }
            e => anyhow::bail!("{e}"),
        }
    }
}

impl Global {
    /// Spawns this husk binary with the same global flags and `args`,
    /// passing it the write end of a sync pipe as `--sync-fd N`.
    pub fn spawn_reporting(&self, args: Vec<OsString>) -> anyhow::Result<Reporting> {
        let (rd, wr) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating a sync pipe")?;
        let mut cmd = Command::new(std::env::current_exe().context("finding the husk binary")?);
        cmd.arg("--root").arg(&self.root);
        if let Some(l) = &self.log {
            cmd.arg("--log").arg(l);
        }
        cmd.args(["--log-format", if self.log_json { "json" } else { "text" }]);
        if self.debug {
            cmd.arg("--debug");
        }
        cmd.args(args)
            .arg("--sync-fd")
            .arg(wr.as_raw_fd().to_string());
        let wfd = wr.as_raw_fd();
        // SAFETY: runs in the child between fork and exec; fcntl(2) is
        // async-signal-safe and only clears FD_CLOEXEC on the sync pipe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(wfd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("starting a husk child process")?;
        drop(wr);
        Ok(Reporting {
            child,
            report: std::fs::File::from(rd),
        })
    }
}

/// Reports an error as runc does: on stderr, and in the log file (in its
/// format) where callers such as containerd and conmon look for it.
pub fn log_error(g: &Global, msg: &str) {
    let time = &state::now_rfc3339()[..19];
    eprintln!("time=\"{time}Z\" level=error msg={msg:?}");
    log_error_to_file(g, msg);
}

/// Writes an error to the log file only (for the monitor and relays,
/// whose stderr is the container's).
pub fn log_error_to_file(g: &Global, msg: &str) {
    let Some(path) = &g.log else { return };
    let time = state::now_rfc3339();
    let line = if g.log_json {
        serde_json::json!({"level": "error", "msg": msg, "time": time}).to_string()
    } else {
        format!("time={time:?} level=error msg={msg:?}")
    };
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}
