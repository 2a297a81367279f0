//! Running libcontainer's create and exec in a forked, single-threaded child.
//!
//! libcontainer clones the container's processes with the raw `clone3` system call, so none of
//! glibc's fork handlers run. Inside the agent, which has many threads, another thread may hold
//! a lock at that instant (a malloc arena shared by threads, a logger's mutex); the cloned
//! process inherits it held and waits forever on its first allocation. CI saw one such hang:
//! a CreateContainer that never answered in 100 create/kill cycles. glibc's own `fork()`
//! prepares malloc for the child, and the child has one thread, so libcontainer runs there; the
//! child reports the pid and exits, and the container's processes, re-parented to the agent
//! (PID 1), are reaped as before.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::unistd::ForkResult;

/// How long the child may take to report (libcontainer's create waits for the container's
/// init to be ready).
const REPORT_TIMEOUT: Duration = Duration::from_secs(55);

/// Runs `build` in a child made by glibc's `fork()`; returns its result (a pid, or an error
/// message). The child reports one line on a pipe and exits at once.
pub fn run_in_forked_child(
    build: impl FnOnce() -> std::result::Result<i32, String>,
) -> std::result::Result<i32, String> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: the child runs only `build` (libcontainer, which expects a fresh process) and
    // writes one line, then `_exit`s without unwinding into the parent's state. glibc's fork
    // leaves malloc usable in the child; the child has no other threads.
    match unsafe { nix::unistd::fork() } {
        Ok(ForkResult::Child) => {
            drop(r);
            let line = match build() {
                Ok(pid) => format!("ok {pid}\n"),
                Err(e) => format!("err {}\n", e.replace('\n', " ")),
            };
            let mut f = std::fs::File::from(w);
            let _ = f.write_all(line.as_bytes());
            // SAFETY: ends the child at once: no destructors or atexit handlers of the
            // agent's state run twice.
            unsafe { libc::_exit(0) }
        }
        Ok(ForkResult::Parent { child }) => {
            drop(w);
            // The child is reaped by the agent's reaper like any child; a pidfd says whether it
            // is gone without waiting for it (the container's processes keep copies of the
            // pipe's write end until they exec, so end of file never comes).
            // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.as_raw(), 0) };
            // SAFETY: a new fd nobody else owns, when the call succeeded.
            let pidfd = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) });
            read_report(r, pidfd)
        }
        Err(e) => Err(format!("fork: {e}")),
    }
}

/// Reads the child's one-line report; fails if the child ends without one or the time runs out.
fn read_report(r: OwnedFd, pidfd: Option<OwnedFd>) -> std::result::Result<i32, String> {
    let deadline = std::time::Instant::now() + REPORT_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(format!(
                "the process creating the container did not report in {REPORT_TIMEOUT:?}"
            ));
        }
        let mut fds = vec![PollFd::new(r.as_fd(), PollFlags::POLLIN)];
        if let Some(p) = &pidfd {
            fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
        }
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        match nix::poll::poll(&mut fds, PollTimeout::from(ms)) {
            Err(nix::Error::EINTR) | Ok(0) => continue,
            Err(e) => return Err(format!("waiting for the creating process: {e}")),
            Ok(_) => {}
        }
        let readable = fds[0]
            .revents()
            .is_some_and(|e| e.intersects(PollFlags::POLLIN | PollFlags::POLLHUP));
        if readable {
            let mut line = String::new();
            BufReader::new(std::fs::File::from(r))
                .read_line(&mut line)
                .map_err(|e| format!("reading the creating process's report: {e}"))?;
            return parse_report(&line);
        }
        // The child is gone; a report it wrote just before would still be in the pipe (and
        // is read on the next round).
        let mut fds = [PollFd::new(r.as_fd(), PollFlags::POLLIN)];
        if !matches!(nix::poll::poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0) {
            return Err("the process creating the container died without a report".into());
        }
    }
}

/// `ok <pid>` or `err <message>`.
fn parse_report(line: &str) -> std::result::Result<i32, String> {
    let line = line.trim_end();
    if let Some(pid) = line.strip_prefix("ok ") {
        return pid
            .parse()
            .map_err(|_| format!("bad report from the creating process: {line:?}"));
    }
    match line.strip_prefix("err ") {
        Some(e) => Err(e.to_string()),
        None => Err(format!(
            "the process creating the container died without a report ({line:?})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_from_the_child() {
        assert_eq!(run_in_forked_child(|| Ok(4242)), Ok(4242));
        assert_eq!(
            run_in_forked_child(|| Err("no\nway".into())),
            Err("no way".to_string())
        );
    }

    #[test]
    fn a_child_that_dies_is_an_error_not_a_hang() {
        let e = run_in_forked_child(|| {
            // SAFETY: ends the forked test child at once, as a crash would.
            unsafe { libc::_exit(3) }
        })
        .unwrap_err();
        assert!(e.contains("died"), "{e}");
    }

    #[test]
    fn reports_parse_strictly() {
        assert_eq!(parse_report("ok 17\n"), Ok(17));
        assert!(parse_report("ok x\n").is_err());
        assert!(parse_report("").is_err());
        assert_eq!(parse_report("err bad spec\n"), Err("bad spec".into()));
    }
}
