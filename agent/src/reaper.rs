//! Reaping and exit statuses. As PID 1 the agent is the parent of every
//! container init (libcontainer clones it with CLONE_PARENT) and of every
//! orphan; one thread reaps them all on SIGCHLD and files each exit so that
//! `WaitProcess` can find it.
//!
//! SIGCHLD is caught with a handler that writes to a pipe, not blocked: a
//! blocked mask would be inherited by every container process. Container
//! processes themselves send no SIGCHLD: libcontainer clones them with
//! CLONE_PARENT and no exit signal, which also makes them "clone children"
//! that only `waitpid(__WALL)` collects. [`watch`] therefore follows each
//! one with a pidfd and wakes the reaper when it exits.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// How long an exit nobody has asked about yet is kept (a process can exit
/// before its creator has recorded its pid).
const UNCLAIMED_TTL: Duration = Duration::from_secs(120);

/// Write end of the SIGCHLD pipe, for the signal handler.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_sigchld(_: libc::c_int) {
    let fd = WAKE_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = 1u8;
        // SAFETY: write(2) is async-signal-safe; `b` outlives the call and
        // the pipe is non-blocking, so a full pipe just drops the wake-up
        // (one pending byte is enough to make the reaper look).
        unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
    }
}

/// Exit statuses of reaped processes.
#[derive(Debug, Default)]
pub struct Exits {
    /// pid -> (status, when reaped).
    statuses: Mutex<HashMap<i32, (i32, Instant)>>,
    changed: Condvar,
}

/// The process-wide exit registry.
pub fn exits() -> &'static Exits {
    static EXITS: OnceLock<Exits> = OnceLock::new();
    EXITS.get_or_init(Exits::default)
}

/// Shell-style status: the exit code, or 128 + the signal number.
pub fn shell_status(ws: WaitStatus) -> Option<(i32, i32)> {
    match ws {
        WaitStatus::Exited(pid, code) => Some((pid.as_raw(), code)),
        WaitStatus::Signaled(pid, sig, _) => Some((pid.as_raw(), 128 + sig as i32)),
        _ => None,
    }
}

impl Exits {
    /// Records that `pid` exited with `status`.
    pub fn record(&self, pid: i32, status: i32) {
        let mut m = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        m.retain(|_, (_, t)| now.duration_since(*t) < UNCLAIMED_TTL);
        m.insert(pid, (status, now));
        self.changed.notify_all();
    }

    /// The status of `pid` if it has exited.
    pub fn get(&self, pid: i32) -> Option<i32> {
        let m = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&pid).map(|(s, _)| *s)
    }

    /// Blocks until `pid` has exited and returns its status. The entry is
    /// kept (several callers may wait for one process) and refreshed so it
    /// outlives the TTL while someone cares.
    pub fn wait(&self, pid: i32) -> i32 {
        let mut m = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some((s, t)) = m.get_mut(&pid) {
                *t = Instant::now();
                return *s;
            }
            m = self.changed.wait(m).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Forgets `pid` (its container was removed).
    pub fn forget(&self, pid: i32) {
        self.statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&pid);
    }
}

/// Wakes the reaper thread.
fn wake_reaper() {
    on_sigchld(0);
}

/// Follows `pid` (a child of the agent that may exit without SIGCHLD) and
/// wakes the reaper when it exits.
pub fn watch(pid: i32) {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1;
    // no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        // Already gone (or no pidfd support): look now.
        wake_reaper();
        return;
    }
    // SAFETY: the kernel just returned this fd and nothing else owns it.
    let pidfd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    let spawned = std::thread::Builder::new()
        .name("pid-watch".into())
        .spawn(move || {
            let mut fds = [nix::poll::PollFd::new(
                std::os::fd::AsFd::as_fd(&pidfd),
                nix::poll::PollFlags::POLLIN,
            )];
            while let Err(nix::Error::EINTR) =
                nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE)
            {}
            wake_reaper();
        });
    if spawned.is_err() {
        wake_reaper();
    }
}

/// Installs the SIGCHLD handler and returns the pipe end the reaper reads.
pub fn install() -> nix::Result<File> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
    WAKE_FD.store(w.as_raw_fd(), Ordering::Relaxed);
    // The write end lives for the whole process.
    std::mem::forget(w);
    // Make the read end blocking again for the reaper.
    nix::fcntl::fcntl(
        r.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    )?;
    let act = SigAction::new(
        SigHandler::Handler(on_sigchld),
        SaFlags::SA_RESTART | SaFlags::SA_NOCLDSTOP,
        SigSet::empty(),
    );
    // SAFETY: the handler only loads an atomic and calls write(2), both
    // async-signal-safe.
    unsafe { sigaction(Signal::SIGCHLD, &act) }?;
    Ok(File::from(r))
}

/// Reaps children forever, filing their statuses. Runs on its own thread.
pub fn reap_forever(mut wake: File) {
    let mut buf = [0u8; 64];
    loop {
        reap_all();
        match wake.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::error!("reaper wake-up pipe failed, zombies will pile up: {e}");
                return;
            }
        }
    }
}

/// Collects every child that has exited so far.
pub fn reap_all() {
    loop {
        match waitpid(
            Pid::from_raw(-1),
            Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL),
        ) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(ws) => {
                if let Some((pid, status)) = shell_status(ws) {
                    tracing::debug!(pid, status, "reaped");
                    exits().record(pid, status);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_filed_and_waited_for() {
        let e = Exits::default();
        assert_eq!(e.get(42), None);
        std::thread::scope(|s| {
            let h = s.spawn(|| e.wait(42));
            std::thread::sleep(Duration::from_millis(20));
            e.record(42, 137);
            assert_eq!(h.join().unwrap(), 137);
        });
        assert_eq!(e.get(42), Some(137));
        e.forget(42);
        assert_eq!(e.get(42), None);
    }

    #[test]
    fn shell_statuses() {
        let p = Pid::from_raw(7);
        assert_eq!(shell_status(WaitStatus::Exited(p, 3)), Some((7, 3)));
        assert_eq!(
            shell_status(WaitStatus::Signaled(p, Signal::SIGKILL, false)),
            Some((7, 137))
        );
        assert_eq!(
            shell_status(WaitStatus::Signaled(p, Signal::SIGTERM, false)),
            Some((7, 143))
        );
        assert_eq!(shell_status(WaitStatus::StillAlive), None);
    }
}
