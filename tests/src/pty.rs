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
/// script runs `line` with `$SHELL -c`; SHELL is pinned to /bin/sh (dash)
/// because CI's environment has no SHELL and script then falls back to it.
/// Unlike bash, dash forks for a lone command, so a command that moves
/// itself to another process group (plain `timeout` does) is in the
/// background of the terminal, and its first tcsetattr stops it with
/// SIGTTOU: no output, killed by the timeout. Use `timeout --foreground`
/// in `line`.
///
/// script's stdin is a pipe held open until the command ends, so script
/// never types an end of input into the terminal.
pub fn run_in_pty(line: &str, timeout_secs: u32) -> Output {
    let mut child = Command::new("timeout")
        .arg(timeout_secs.to_string())
        .args(["script", "-qec", line, "/dev/null"])
        .env("SHELL", "/bin/sh")
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
