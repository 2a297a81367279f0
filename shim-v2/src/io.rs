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
/// FIFO paths, `file://` URIs (outputs only) or empty.
pub fn open_stdio(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> Result<Stdio> {
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
        return Err(ShimError::Unsupported("binary:// log URIs"));
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

/// Opens an input. A FIFO is opened (blocking until containerd's writer
/// arrives) on a thread that copies it into a pipe, so a writer that shows
/// up late still gets through and its close is the process's EOF.
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
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| ShimError::io("creating a stdin pipe", e.into()))?;
    let path = uri.to_string();
    let mut w = File::from(w);
    std::thread::Builder::new()
        .name("stdin-fifo".into())
        .spawn(move || match File::open(&path) {
            Ok(mut f) => {
                let _ = std::io::copy(&mut f, &mut w);
                let _ = w.flush();
            }
            Err(e) => log::warn!("opening stdin FIFO {path:?}: {e}"),
        })
        .map_err(|e| ShimError::io("starting the stdin thread", e))?;
    Ok(Some(File::from(r)))
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
    fn file_uris_append_and_binary_uris_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        std::fs::write(&p, "a").unwrap();
        let mut f = open_output(&format!("file://{}", p.display()))
            .unwrap()
            .unwrap();
        f.write_all(b"b").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "ab");
        let e = open_output("binary:///usr/bin/logger").unwrap_err();
        assert!(e.to_string().contains("not supported"), "{e}");
        let s = open_stdio("", "", "", false).unwrap();
        assert!(s.stdin.is_none() && s.stdout.is_none() && s.stderr.is_none());
    }
}
