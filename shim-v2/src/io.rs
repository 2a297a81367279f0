//! containerd's stdio for a process: FIFO paths (what `ctr` and the CRI
//! plugin create), `file://` log URIs, or nothing; opened as Files for
//! husk-runtime's [`Stdio`].

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use husk_runtime::Stdio;

use crate::error::{Result, ShimError};

/// Opens the stdio containerd asks for. `stdin`, `stdout`, `stderr` are
/// FIFO paths, `file://` or `binary://` URIs (outputs only) or empty.
/// A `binary://` logging program is told the process's container `id`
/// and containerd `namespace`.
pub fn open_stdio(
    stdin: &str,
    stdout: &str,
    stderr: &str,
    terminal: bool,
    (id, namespace): (&str, &str),
) -> Result<Stdio> {
    if stdout.starts_with("binary://") {
        let (out, err) = crate::binlog::start(stdout, id, namespace)?;
        let stderr = if terminal {
            None
        } else if stderr == stdout {
            Some(err)
        } else {
            open_output(stderr)?
        };
        return Ok(Stdio {
            stdin: open_input(stdin)?,
            stdout: Some(out),
            stderr,
            terminal,
        });
    }
    Ok(Stdio {
        stdin: open_input(stdin)?,
        stdout: open_output(stdout)?,
        stderr: if terminal { None } else { open_output(stderr)? },
        terminal,
    })
}

/// Opens an output: a FIFO for writing without waiting for a reader, or a
/// `file://` log file for appending.
pub fn open_output(uri: &str) -> Result<Option<File>> {
    if uri.is_empty() {
        return Ok(None);
    }
    if let Some(path) = uri.strip_prefix("file://") {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| ShimError::io(format!("opening log file {path:?}"), e))?;
        return Ok(Some(f));
    }
    if uri.starts_with("binary://") {
        return Err(ShimError::InvalidArgument(format!(
            "{uri:?}: a binary:// logging program takes both stdout and stderr; \
             give it as the stdout URI"
        )));
    }
    let path = Path::new(uri);
    let is_fifo = std::fs::metadata(path)
        .map(|m| m.file_type().is_fifo())
        .unwrap_or(false);
    if !is_fifo {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| ShimError::io(format!("opening {path:?}"), e))?;
        return Ok(Some(f));
    }
    // Opening a FIFO write-only blocks until there is a reader. Hold it
    // read-write for a moment (that never blocks, and makes us a reader),
    // open the write-only end we keep, and drop the read-write one, so the
    // reader sees EOF when we close.
    let rw = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| ShimError::io(format!("opening FIFO {path:?}"), e))?;
    let w = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| ShimError::io(format!("opening FIFO {path:?} for writing"), e))?;
    drop(rw);
    Ok(Some(w))
}

/// Opens an input. A FIFO is opened for reading at once, without waiting
/// for a writer (so containerd's writer can open it), and copied into a
/// pipe on a thread: EOF comes when a writer has come and gone, however
/// early or late it came.
pub fn open_input(uri: &str) -> Result<Option<File>> {
    if uri.is_empty() {
        return Ok(None);
    }
    if !std::fs::metadata(uri)
        .map(|m| m.file_type().is_fifo())
        .unwrap_or(false)
    {
        let f = File::open(uri).map_err(|e| ShimError::io(format!("opening {uri:?}"), e))?;
        return Ok(Some(f));
    }
    let fifo = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(uri)
        .map_err(|e| ShimError::io(format!("opening stdin FIFO {uri:?}"), e))?;
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| ShimError::io("creating a stdin pipe", e.into()))?;
    let mut w = File::from(w);
    std::thread::Builder::new()
        .name("stdin-fifo".into())
        .spawn(move || {
            if let Err(e) = copy_fifo(&fifo, &mut w) {
                log::debug!("stdin copy ended: {e}");
            }
        })
        .map_err(|e| ShimError::io("starting the stdin thread", e))?;
    Ok(Some(File::from(r)))
}

/// Copies a non-blocking FIFO read end to `to` until a writer has closed
/// it. A FIFO that never had a writer polls as not ready (no POLLHUP), so
/// this waits for the first writer rather than seeing EOF early.
fn copy_fifo(fifo: &File, to: &mut File) -> std::io::Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::io::Read;
    use std::os::fd::AsFd;
    let mut buf = vec![0u8; 32 * 1024];
    let mut reader = fifo;
    loop {
        let mut fds = [PollFd::new(fifo.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        match reader.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => to.write_all(&buf[..n])?,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn mkfifo(p: &Path) {
        nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    }

    #[test]
    fn fifo_output_does_not_wait_for_a_reader_and_ends_with_eof() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("out");
        mkfifo(&p);
        let mut w = open_output(p.to_str().unwrap()).unwrap().unwrap();
        let mut r = File::open(&p).unwrap();
        w.write_all(b"hi\n").unwrap();
        drop(w);
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hi\n");
    }

    #[test]
    fn fifo_input_sees_eof_of_an_early_writer() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("in");
        mkfifo(&p);
        let p2 = p.clone();
        // The writer blocks in open until our reader exists, writes, and
        // is gone before the copy thread gets to read.
        let w = std::thread::spawn(move || {
            let mut w = OpenOptions::new().write(true).open(&p2).unwrap();
            w.write_all(b"early").unwrap();
        });
        let mut r = open_input(p.to_str().unwrap()).unwrap().unwrap();
        w.join().unwrap();
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        assert_eq!(s, "early");
    }

    #[test]
    fn fifo_input_waits_for_a_late_writer() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("in");
        mkfifo(&p);
        let mut r = open_input(p.to_str().unwrap()).unwrap().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut w = OpenOptions::new().write(true).open(&p).unwrap();
        w.write_all(b"data").unwrap();
        drop(w);
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        assert_eq!(s, "data");
    }

    #[test]
    fn file_uris_append_and_a_lone_binary_stderr_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        std::fs::write(&p, "a").unwrap();
        let mut f = open_output(&format!("file://{}", p.display()))
            .unwrap()
            .unwrap();
        f.write_all(b"b").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "ab");
        let e = open_output("binary:///usr/bin/logger").unwrap_err();
        assert!(e.to_string().contains("stdout URI"), "{e}");
        let s = open_stdio("", "", "", false, ("c", "n")).unwrap();
        assert!(s.stdin.is_none() && s.stdout.is_none() && s.stderr.is_none());
    }
}
