//! Helper processes (VMM, vsock backend) owned by a sandbox: spawned so they
//! die with their owner, waited with deadlines, always reaped.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::error::{Error, Result};

/// How often a deadline wait looks at the child again.
const POLL: Duration = Duration::from_millis(5);

/// Copies of `fds` without the close-on-exec flag, for a child to inherit at the same
/// numbers: spawn it, then drop the copies. Any process spawned from this one meanwhile
/// inherits them too, so spawn the child right away.
pub fn inheritable_copies(fds: &[RawFd]) -> std::io::Result<Vec<OwnedFd>> {
    fds.iter()
        .map(|fd| {
            // SAFETY: F_DUPFD duplicates an fd the caller holds open; the result is checked.
            let copy = unsafe { libc::fcntl(*fd, libc::F_DUPFD, 3) };
            if copy < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: `copy` is a new descriptor nobody else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(copy) })
        })
        .collect()
}

/// A child process that is killed and reaped when dropped.
#[derive(Debug)]
pub struct OwnedChild {
    what: &'static str,
    program: PathBuf,
    child: Child,
    status: Option<ExitStatus>,
    /// The child leads its own process group, killed as a whole.
    group: bool,
}

impl OwnedChild {
    /// Spawns `cmd`. The child gets SIGKILL if the spawning thread dies
    /// (PR_SET_PDEATHSIG), so a crashed owner leaves no VM behind: spawn
    /// from a thread that lives as long as the sandbox.
    pub fn spawn(what: &'static str, cmd: Command) -> Result<OwnedChild> {
        Self::spawn_inner(what, cmd, false)
    }

    /// Like [`OwnedChild::spawn`], but the child leads a new process group
    /// and [`OwnedChild::kill`] kills the whole group: for programs that
    /// fork helpers of their own (virtiofsd's sandbox child).
    pub fn spawn_group(what: &'static str, mut cmd: Command) -> Result<OwnedChild> {
        cmd.process_group(0);
        Self::spawn_inner(what, cmd, true)
    }

    fn spawn_inner(what: &'static str, mut cmd: Command, group: bool) -> Result<OwnedChild> {
        let program = PathBuf::from(cmd.get_program());
        // SAFETY: the closure runs in the forked child before exec and only
        // calls prctl(2) and getppid(2), both async-signal-safe; it touches no
        // memory shared with the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl.
                if libc::getppid() == 1 {
                    return Err(std::io::Error::other("parent exited during spawn"));
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            what,
            program: program.clone(),
            source,
        })?;
        Ok(OwnedChild {
            what,
            program,
            child,
            status: None,
            group,
        })
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the child is for.
    pub fn what(&self) -> &'static str {
        self.what
    }

    /// Its exit status if it has exited (reaping it), else `None`.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait().map_err(|e| {
                Error::io(format!("waiting for {} ({:?})", self.what, self.program), e)
            })?;
        }
        Ok(self.status)
    }

    /// Waits until the child exits or `timeout` passes.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(POLL);
        }
    }

    /// Sends `sig` unless the child has already been reaped.
    pub fn signal(&mut self, sig: Signal) -> Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        match kill(Pid::from_raw(self.child.id() as i32), sig) {
            Ok(()) | Err(nix::Error::ESRCH) => Ok(()),
            Err(e) => Err(Error::io(
                format!("signalling {} ({})", self.what, self.child.id()),
                e.into(),
            )),
        }
    }

    /// Asks the child to stop with SIGTERM, then SIGKILLs it after `grace`,
    /// and reaps it. Returns its exit status.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        self.signal(Signal::SIGTERM)?;
        if let Some(s) = self.wait_timeout(grace)? {
            return Ok(s);
        }
        self.kill()
    }

    /// SIGKILLs and reaps the child (and, for a group leader, its group).
    pub fn kill(&mut self) -> Result<ExitStatus> {
        let mut forks = Vec::new();
        if self.group {
            // Whatever the child forked goes too: its process group, and
            // its descendants by /proc (a fork may have left the group,
            // e.g. virtiofsd's sandboxed child).
            forks = descendants(self.child.id());
            let _ =
                nix::sys::signal::killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
            for p in &forks {
                let _ = kill(Pid::from_raw(*p as i32), Signal::SIGKILL);
            }
        }
        let res = self.kill_leader();
        // They are not ours to reap; wait (briefly) until they are dead.
        let deadline = Instant::now() + Duration::from_secs(2);
        while forks.iter().any(|p| running(*p)) && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        res
    }

    fn kill_leader(&mut self) -> Result<ExitStatus> {
        if let Some(s) = self.try_wait()? {
            return Ok(s);
        }
        let _ = self.child.kill();
        let s = self
            .child
            .wait()
            .map_err(|e| Error::io(format!("reaping {}", self.what), e))?;
        self.status = Some(s);
        Ok(s)
    }
}

impl Drop for OwnedChild {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// All descendants of `pid`, from /proc's children lists.
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let text = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for c in text
                .split_ascii_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
            {
                out.push(c);
                todo.push(c);
            }
        }
    }
    out
}

/// Whether `pid` exists and is not a zombie.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Describes an exit status in words ("exit code 1", "killed by SIGKILL").
pub fn describe_status(s: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = s.code() {
        format!("exit code {code}")
    } else if let Some(sig) = s.signal() {
        match Signal::try_from(sig) {
            Ok(sig) => format!("killed by {sig}"),
            Err(_) => format!("killed by signal {sig}"),
        }
    } else {
        format!("{s}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminate_reaps_and_reports() {
        let mut c = OwnedChild::spawn("sleeper", {
            let mut c = Command::new("sleep");
            c.arg("30");
            c
        })
        .unwrap();
        assert!(c.try_wait().unwrap().is_none());
        let s = c.terminate(Duration::from_secs(5)).unwrap();
        assert_eq!(describe_status(s), "killed by SIGTERM");
        // A second stop is a no-op on the reaped child.
        assert_eq!(describe_status(c.kill().unwrap()), "killed by SIGTERM");
    }

    #[test]
    fn exit_code_and_timeouts() {
        let mut c = OwnedChild::spawn("false", Command::new("false")).unwrap();
        let s = c.wait_timeout(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(describe_status(s), "exit code 1");
        let mut c = OwnedChild::spawn("sleeper", {
            let mut c = Command::new("sleep");
            c.arg("30");
            c
        })
        .unwrap();
        assert!(c.wait_timeout(Duration::from_millis(20)).unwrap().is_none());
        let pid = c.pid();
        drop(c);
        // Dropped means killed and reaped: the pid is gone.
        assert!(kill(Pid::from_raw(pid as i32), None).is_err());
    }

    #[test]
    fn a_group_leader_takes_its_forks_along() {
        let mut c = OwnedChild::spawn_group("forker", {
            let mut c = Command::new("sh");
            c.args(["-c", "sleep 30 & echo $!; wait"]);
            c.stdout(std::process::Stdio::piped());
            c
        })
        .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(c.child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let grandchild: i32 = line.trim().parse().unwrap();
        c.kill().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        // The grandchild is reparented and reaped by init; wait until gone.
        while std::fs::read_to_string(format!("/proc/{grandchild}/stat"))
            .is_ok_and(|s| !s.contains(") Z"))
        {
            assert!(std::time::Instant::now() < deadline, "grandchild survived");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let e = OwnedChild::spawn("nothing", Command::new("/nonexistent/husk-x")).unwrap_err();
        assert!(matches!(e, Error::Spawn { .. }), "{e}");
    }
}
