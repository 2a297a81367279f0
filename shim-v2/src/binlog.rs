//! containerd's `binary://` log URIs: the process's stdout and stderr go
//! to a logging program, as with containerd's own shims. The program is
//! the URI's path, its arguments the query's keys and values in order
//! (`binary:///usr/bin/logger?tag=x` runs `/usr/bin/logger tag x`), its
//! environment has `CONTAINER_ID` and `CONTAINER_NAMESPACE`; it reads
//! stdout on fd 3 and stderr on fd 4 and closes fd 5 when it is ready.
//! It sees EOF when the process's output ends, and is reaped by a thread
//! of its own (the shim runs no reaper).

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::error::{Result, ShimError};

/// How long the logging program has to close its fd 5.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A `binary://` URI taken apart: program and arguments.
#[derive(Debug, PartialEq, Eq)]
pub struct BinaryUri {
    /// The program (absolute path).
    pub program: String,
    /// Its arguments: each query key, then its value when it has one.
    pub args: Vec<String>,
}

/// Decodes `%XX` escapes and `+` (a space in a query).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl BinaryUri {
    /// Parses `binary:///path?k=v&k2=v2`.
    pub fn parse(uri: &str) -> Result<BinaryUri> {
        let rest = uri
            .strip_prefix("binary://")
            .ok_or_else(|| ShimError::InvalidArgument(format!("{uri:?} is not a binary:// URI")))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let program = unescape(path);
        if !program.starts_with('/') {
            return Err(ShimError::InvalidArgument(format!(
                "log URI {uri:?}: the logging program must be an absolute path \
                 (binary:///usr/local/bin/logger)"
            )));
        }
        let mut args = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            args.push(unescape(k));
            if !v.is_empty() {
                args.push(unescape(v));
            }
        }
        Ok(BinaryUri { program, args })
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| ShimError::io("creating a pipe for the logging program", e.into()))
}

/// Starts the logging program of `uri` for container `id` in containerd
/// namespace `namespace`, waits until it is ready, and returns the write
/// ends of the process's stdout and stderr.
pub fn start(uri: &str, id: &str, namespace: &str) -> Result<(File, File)> {
    let bin = BinaryUri::parse(uri)?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (ready_r, ready_w) = pipe()?;
    let fds = [out_r.as_raw_fd(), err_r.as_raw_fd(), ready_w.as_raw_fd()];
    let mut cmd = Command::new(&bin.program);
    cmd.args(&bin.args)
        .env("CONTAINER_ID", id)
        .env("CONTAINER_NAMESPACE", namespace)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: the closure runs in the forked child before exec and only
    // calls fcntl(2) and dup2(2), which are async-signal-safe; it reads
    // only `fds`, a copy of plain integers.
    unsafe {
        cmd.pre_exec(move || {
            // First out of the way of 3..=5 (close-on-exec copies), then
            // onto 3, 4, 5 (dup2 clears close-on-exec).
            let mut high = [0; 3];
            for (h, fd) in high.iter_mut().zip(fds) {
                *h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
                if *h < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (target, h) in (3..).zip(high) {
                if libc::dup2(h, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        ShimError::io(
            format!("starting the logging program {:?} of {uri:?}", bin.program),
            e,
        )
    })?;
    drop((out_r, err_r, ready_w));
    let ready = wait_closed(&ready_r, READY_TIMEOUT);
    let pid = child.id();
    std::thread::Builder::new()
        .name("binary-logger".into())
        .spawn(move || {
            if let Ok(s) = child.wait() {
                log::debug!("logging program {pid} ended: {s}");
            }
        })
        .map_err(|e| ShimError::io("starting the logger reaper thread", e))?;
    if !ready {
        // Its pipes close with this error; it sees EOF and may exit.
        return Err(ShimError::FailedPrecondition(format!(
            "the logging program {:?} did not close fd 5 (ready) within {READY_TIMEOUT:?}",
            bin.program
        )));
    }
    Ok((File::from(out_w), File::from(err_w)))
}

/// Waits until the other end of pipe `r` is closed (or written to).
fn wait_closed(r: &OwnedFd, timeout: Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ms =
            PollTimeout::try_from(left.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::ZERO);
        let mut fds = [PollFd::new(r.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(0) => return false,
            Ok(_) => return true,
            Err(nix::errno::Errno::EINTR) if !left.is_zero() => continue,
            Err(_) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn uris_give_program_and_arguments() {
        assert_eq!(
            BinaryUri::parse("binary:///usr/bin/logger?tag=web&-s&x=a%20b+c").unwrap(),
            BinaryUri {
                program: "/usr/bin/logger".into(),
                args: vec![
                    "tag".into(),
                    "web".into(),
                    "-s".into(),
                    "x".into(),
                    "a b c".into()
                ]
            }
        );
        assert_eq!(
            BinaryUri::parse("binary:///l").unwrap().args,
            Vec::<String>::new()
        );
        let e = BinaryUri::parse("binary://logger").unwrap_err();
        assert!(e.to_string().contains("absolute path"), "{e}");
        assert_eq!(unescape("100%"), "100%");
        assert_eq!(unescape("%4"), "%4");
    }

    #[test]
    fn the_logging_program_gets_both_streams_and_the_container() {
        let d = tempfile::tempdir().unwrap();
        let script = d.path().join("logger");
        std::fs::write(
            &script,
            "#!/bin/sh\n\
             exec 5>&-\n\
             cat <&3 >\"$2/out\" & cat <&4 >\"$2/err\" &\n\
             exec 3<&- 4<&-\n\
             wait\n\
             echo \"$CONTAINER_NAMESPACE/$CONTAINER_ID $1\" >\"$2/env\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let uri = format!("binary://{}?dir={}", script.display(), d.path().display());
        let (mut out, mut err) = start(&uri, "c1", "ns1").unwrap();
        out.write_all(b"to stdout\n").unwrap();
        err.write_all(b"to stderr\n").unwrap();
        drop((out, err));
        let env = d.path().join("env");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !env.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "the logger never finished"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(50));
        let read = |n: &str| std::fs::read_to_string(d.path().join(n)).unwrap();
        assert_eq!(read("out"), "to stdout\n");
        assert_eq!(read("err"), "to stderr\n");
        assert_eq!(read("env"), "ns1/c1 dir\n");
    }

    #[test]
    fn a_missing_logging_program_is_an_error() {
        let e = start("binary:///nonexistent/logger", "c", "n").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/logger"), "{e}");
    }
}
