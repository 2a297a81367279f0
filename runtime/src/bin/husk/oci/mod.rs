//! The runc-compatible OCI runtime commands. Each container gets its own
//! VM, owned by a host "monitor" process whose pid callers are given (see
//! DESIGN.md, "The OCI CLI").

pub mod exec;
pub mod info;
pub mod lifecycle;
pub mod monitor;
pub mod relay;
pub mod state;

use std::io::Write;
use std::path::PathBuf;

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
