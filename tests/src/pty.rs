//! Running a command line in a pseudo-terminal (util-linux `script`), the
//! way a user at a terminal runs `ctr run -t` or `podman run -it`.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Output, Stdio};

/// `s` quoted for sh.
pub fn sh_quote(s: impl AsRef<OsStr>) -> String {
    let s = String::from_utf8_lossy(s.as_ref().as_bytes());
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `cmd`'s program and arguments as one sh command line.
pub fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(sh_quote)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs the sh command `line` in a fresh pseudo-terminal with no input,
/// killed after `timeout_secs`; returns script's status (the command's)
/// and what the terminal printed.
///
/// script's stdin is a pipe held open until the command ends. At end of
/// input script types EOF into the terminal, and util-linux 2.38's script
/// can then hang once the command has put the terminal in raw mode (seen
/// in CI with stdin on /dev/null: no output, killed by the timeout).
pub fn run_in_pty(line: &str, timeout_secs: u32) -> Output {
    let mut child = Command::new("timeout")
        .arg(timeout_secs.to_string())
        .args(["script", "-qec", line, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running script (util-linux)");
    let input = child.stdin.take();
    let out = child.wait_with_output().expect("waiting for script");
    drop(input);
    out
}
