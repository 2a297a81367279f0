//! Host side of a process's stdio: one hybrid-vsock connection per stream
//! to the agent's stdio port, copied to and from the caller's files (FIFOs,
//! log files, a pty), with no loss: the agent only reads the process's
//! pipes as fast as we take the bytes.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use husk_protocols::agent::StdioSpec;

use crate::agent_client::hybrid_connect;
use crate::error::{Error, Result};

/// What the caller connects to a process's stdio.
#[derive(Debug, Default)]
pub struct Stdio {
    /// Bytes for the process's stdin (EOF when this ends).
    pub stdin: Option<File>,
    /// Where stdout goes (dropped if `None`).
    pub stdout: Option<File>,
    /// Where stderr goes (dropped if `None`; unused with a terminal).
    pub stderr: Option<File>,
    /// One pseudo-terminal for all three.
    pub terminal: bool,
}

impl Stdio {
    /// What the agent must prepare for this.
    pub fn spec(&self) -> StdioSpec {
        let mut s = StdioSpec::new();
        s.stdin = self.stdin.is_some();
        s.terminal = self.terminal;
        s
    }
}

/// Running copies of one process's stdio.
#[derive(Debug)]
pub struct StdioCopies {
    outputs: Vec<mpsc::Receiver<()>>,
    stdin: Option<UnixStream>,
}

/// Opens a stdio connection to `stream` of a process.
pub fn attach(uds: &Path, container: &str, exec: &str, stream: &str) -> Result<UnixStream> {
    let port = husk_protocols::IO_VSOCK_PORT;
    let mut s =
        hybrid_connect(uds, port, Duration::from_secs(10))?.ok_or_else(|| Error::Handshake {
            path: uds.to_path_buf(),
            reason: format!("the agent's stdio port {port} refused the connection"),
        })?;
    let io = |e| Error::io(format!("attaching {stream} of {container}/{exec}"), e);
    s.write_all(husk_protocols::stdio_header(container, exec, stream).as_bytes())
        .map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < husk_protocols::MAX_STDIO_HEADER {
        match s.read(&mut b).map_err(io)? {
            0 => break,
            _ if b[0] == b'\n' => break,
            _ => line.push(b[0]),
        }
    }
    s.set_read_timeout(None).map_err(io)?;
    let line = String::from_utf8_lossy(&line);
    if line == "OK" {
        Ok(s)
    } else {
        Err(Error::Handshake {
            path: uds.to_path_buf(),
            reason: format!("agent refused {stream} of {container}/{exec}: {line}"),
        })
    }
}

fn copy_thread(
    mut from: impl Read + Send + 'static,
    mut to: impl Write + Send + 'static,
    done: Option<mpsc::Sender<()>>,
    after: impl FnOnce() + Send + 'static,
) -> Result<()> {
    std::thread::Builder::new()
        .name("husk-stdio".into())
        .spawn(move || {
            if let Err(e) = std::io::copy(&mut from, &mut to) {
                tracing::debug!("stdio copy ended: {e}");
            }
            let _ = to.flush();
            after();
            drop(to);
            if let Some(d) = done {
                let _ = d.send(());
            }
        })
        .map(drop)
        .map_err(|e| Error::io("starting a stdio thread", e))
}

impl StdioCopies {
    /// Attaches every stream `stdio` asks for and starts copying.
    pub fn start(uds: &Path, container: &str, exec: &str, stdio: Stdio) -> Result<StdioCopies> {
        let mut outputs = Vec::new();
        let mut stdin_stream = None;
        let out_pairs: Vec<(&str, Option<File>)> = if stdio.terminal {
            vec![("tty", stdio.stdout)]
        } else {
            vec![("stdout", stdio.stdout), ("stderr", stdio.stderr)]
        };
        let mut tty_stream = None;
        for (name, file) in out_pairs {
            let s = attach(uds, container, exec, name)?;
            let (tx, rx) = mpsc::channel();
            let sink: Box<dyn Write + Send> = match file {
                Some(f) => Box::new(f),
                None => Box::new(std::io::sink()),
            };
            if name == "tty" {
                tty_stream = Some(
                    s.try_clone()
                        .map_err(|e| Error::io("cloning the tty stream", e))?,
                );
            }
            copy_thread(s, sink, Some(tx), || ())?;
            outputs.push(rx);
        }
        if let Some(input) = stdio.stdin {
            let s = match tty_stream {
                Some(t) => t,
                None => attach(uds, container, exec, "stdin")?,
            };
            let keep = s
                .try_clone()
                .map_err(|e| Error::io("cloning the stdin stream", e))?;
            let shut = s
                .try_clone()
                .map_err(|e| Error::io("cloning the stdin stream", e))?;
            let terminal = stdio.terminal;
            copy_thread(input, s, None, move || {
                if !terminal {
                    // EOF on our input is EOF on the process's stdin.
                    let _ = shut.shutdown(std::net::Shutdown::Write);
                }
            })?;
            stdin_stream = Some(keep);
        }
        Ok(StdioCopies {
            outputs,
            stdin: stdin_stream,
        })
    }

    /// Closes the process's stdin from the host side.
    pub fn close_stdin(&mut self) {
        if let Some(s) = self.stdin.take() {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
    }

    /// Waits up to `timeout` for all output to have been copied (EOF on
    /// every output stream). Returns whether it all arrived.
    pub fn wait_outputs(&mut self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        self.outputs.retain(|rx| {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            matches!(rx.recv_timeout(left), Err(mpsc::RecvTimeoutError::Timeout))
        });
        self.outputs.is_empty()
    }
}
