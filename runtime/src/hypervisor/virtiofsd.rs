//! virtiofsd, the vhost-user-fs backend that exports a sandbox's shared
//! directory, and the socket waits every backend's helpers need. Both VMM
//! backends start virtiofsd the same way: QEMU as `vhost-user-fs-device`,
//! husk-vmm with `--fs-socket`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::process::{describe_status, OwnedChild};

/// How long a vhost-user backend (virtiofsd, husk-vsock) may take to
/// listen on its socket.
pub const BACKEND_READY_TIMEOUT: Duration = Duration::from_secs(5);

/// The file name of virtiofsd's socket in the sandbox's state directory.
pub const SOCKET_NAME: &str = "virtiofs.sock";

/// The file name of virtiofsd's log in the sandbox's state directory.
pub const LOG_NAME: &str = "virtiofsd.log";

/// Creates (truncates) a helper's log file.
pub fn log_file(path: &Path) -> Result<std::fs::File> {
    std::fs::File::create(path).map_err(|e| Error::io(format!("creating {path:?}"), e))
}

/// The virtiofsd command line sharing `dir` on `sock`.
pub fn virtiofsd_args(dir: &Path, sock: &Path) -> Vec<String> {
    let p = |x: &Path| x.display().to_string();
    [
        "--socket-path",
        &p(sock),
        "--shared-dir",
        &p(dir),
        "--sandbox",
        "namespace",
        "--cache",
        "auto",
        "--announce-submounts",
        "--log-level",
        "warn",
    ]
    .map(String::from)
    .to_vec()
}

/// Starts virtiofsd (`bin`; `None` when none was found) sharing `dir` on
/// `sock`, logging to `run_dir`/[`LOG_NAME`], and waits until the socket
/// listens. It runs in its own mount namespace (`--sandbox namespace`);
/// mounts added under `dir` later reach it because `dir` is a shared mount
/// (see `shared_fs`). It leads its own process group (its sandbox forks), and
/// exits by itself when its one frontend (the VMM) hangs up.
pub fn spawn_virtiofsd(
    bin: Option<&Path>,
    dir: &Path,
    sock: &Path,
    run_dir: &Path,
) -> Result<OwnedChild> {
    let bin: PathBuf = bin.map(Path::to_path_buf).ok_or_else(|| Error::Artifact {
        what: "virtiofsd",
        path: "virtiofsd".into(),
        reason: "not found".into(),
        hint: "install it: cargo install virtiofsd (needs libcap-ng-dev libseccomp-dev)",
    })?;
    let mut cmd = Command::new(bin);
    cmd.args(virtiofsd_args(dir, sock))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file(&run_dir.join(LOG_NAME))?);
    let mut child = OwnedChild::spawn_group("virtiofsd", cmd)?;
    wait_for_socket(&mut child, sock, BACKEND_READY_TIMEOUT)?;
    Ok(child)
}

/// Whether the Unix socket bound at `sock` listens, by `/proc/net/unix`
/// (its path exists from bind(2), but connects are refused until
/// listen(2)). Connecting to find out would take the backend's one
/// frontend connection. True when the table cannot be read.
fn listening(sock: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return true;
    };
    let path = sock.to_string_lossy();
    // Num RefCount Protocol Flags Type St Inode Path; Flags has
    // __SO_ACCEPTCON (0x10000) once listen(2) was called.
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8
            && f[7] == path
            && u32::from_str_radix(f[3], 16).is_ok_and(|flags| flags & 0x10000 != 0)
    })
}

/// Waits until `sock` exists and listens while `owner` lives.
pub fn wait_for_socket(owner: &mut OwnedChild, sock: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !(sock.exists() && listening(sock)) {
        if let Some(s) = owner.try_wait()? {
            return Err(Error::ProcessExited {
                what: owner.what(),
                status: describe_status(s),
                console_tail: String::new(),
            });
        }
        if Instant::now() >= deadline {
            return Err(Error::Io {
                context: format!(
                    "{} did not create {sock:?} within {timeout:?}",
                    owner.what()
                ),
                source: std::io::ErrorKind::TimedOut.into(),
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_socket_listens_only_after_listen() {
        use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag};
        use nix::sys::socket::{SockType, UnixAddr};
        use std::os::fd::AsRawFd;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.sock");
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .unwrap();
        bind(fd.as_raw_fd(), &UnixAddr::new(&p).unwrap()).unwrap();
        assert!(p.exists() && !listening(&p));
        listen(&fd, Backlog::new(1).unwrap()).unwrap();
        assert!(listening(&p));
    }

    #[test]
    fn virtiofsd_runs_sandboxed_on_the_shared_dir() {
        let a = virtiofsd_args(
            Path::new("/run/x/shared"),
            Path::new("/run/x/virtiofs.sock"),
        );
        let v = |flag: &str| {
            let i = a.iter().position(|x| x == flag).unwrap();
            a[i + 1].clone()
        };
        assert_eq!(v("--socket-path"), "/run/x/virtiofs.sock");
        assert_eq!(v("--shared-dir"), "/run/x/shared");
        assert_eq!(v("--sandbox"), "namespace");
        assert_eq!(v("--cache"), "auto");
        assert!(a.iter().any(|x| x == "--announce-submounts"));
    }

    #[test]
    fn missing_virtiofsd_names_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let e =
            spawn_virtiofsd(None, dir.path(), &dir.path().join("s.sock"), dir.path()).unwrap_err();
        assert!(e.to_string().contains("cargo install virtiofsd"), "{e}");
    }

    #[test]
    fn a_helper_that_dies_before_listening_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "exit 7"]);
        let mut child = OwnedChild::spawn("helper", cmd).unwrap();
        let e = wait_for_socket(
            &mut child,
            &dir.path().join("never.sock"),
            BACKEND_READY_TIMEOUT,
        )
        .unwrap_err();
        assert!(e.to_string().contains("helper"), "{e}");
    }
}
