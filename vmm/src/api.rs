//! The control socket: a Unix stream socket speaking one request per line, one JSON answer per
//! line.
//!
//! | request | answer |
//! |---|---|
//! | `state` | `{"ok":true,"state":"created"\|"running"}` |
//! | `start` | starts the vCPUs of a VM built with `wait_for_start`; `{"ok":true,"state":"running"}` |
//! | `shutdown` | `{"ok":true,"state":"stopping"}`, then the VM is torn down and husk-vmm exits 0 |
//! | `stats` | the state plus `"virtio"`: per virtio-mmio device `base`, `device_id`, `queues`, `ioeventfd_queues` (queues whose notifications KVM signals on an ioeventfd), `notify_ioeventfd` and `notify_exit` (notifications that arrived each way), `status` (the device status register the driver wrote) and `activated` (the driver set DRIVER_OK and the device runs) |
//!
//! A request may also be a JSON object `{"action":"state"}`. Anything else gets
//! `{"ok":false,"error":"..."}`. Lines longer than [`MAX_LINE`] end the connection.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::devices::virtio::vsock::unix::prepare_socket_path;

/// Longest request line.
pub const MAX_LINE: usize = 256;

/// A request on the control socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiRequest {
    /// Start the vCPUs.
    Start,
    /// Report the state.
    State,
    /// Stop the VM and exit.
    Shutdown,
    /// Report the state and device counters.
    Stats,
}

/// Parse one request line.
pub fn parse_request(line: &str) -> Result<ApiRequest, String> {
    let line = line.trim();
    let word = if line.starts_with('{') {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("bad JSON request: {e}"))?;
        v.get("action")
            .and_then(|a| a.as_str())
            .ok_or("a JSON request needs a string \"action\"")?
            .to_string()
    } else {
        line.to_string()
    };
    match word.as_str() {
        "start" => Ok(ApiRequest::Start),
        "state" => Ok(ApiRequest::State),
        "shutdown" => Ok(ApiRequest::Shutdown),
        "stats" => Ok(ApiRequest::Stats),
        other => Err(format!(
            "unknown request {:?}; use start, state, stats or shutdown",
            other.chars().take(32).collect::<String>()
        )),
    }
}

/// An answer: `Ok(state)` or `Err(message)`.
pub fn render_response(r: &Result<&str, String>) -> String {
    render_json(
        &r.as_ref()
            .map(|state| serde_json::json!({ "state": state }))
            .map_err(Clone::clone),
    )
}

/// An answer: `Ok(fields)` (a JSON object, shown after `"ok":true`) or `Err(message)`.
pub fn render_json(r: &Result<serde_json::Value, String>) -> String {
    let v = match r {
        Ok(serde_json::Value::Object(fields)) => {
            let mut m = serde_json::Map::new();
            m.insert("ok".into(), true.into());
            m.extend(fields.clone());
            serde_json::Value::Object(m)
        }
        Ok(other) => serde_json::json!({"ok": true, "value": other}),
        Err(e) => serde_json::json!({"ok": false, "error": e}),
    };
    format!("{v}\n")
}

struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// The listening control socket and its connections.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    id: Option<(u64, u64)>,
    conns: HashMap<RawFd, Conn>,
}

impl ApiServer {
    /// Bind `path` (a stale socket file there is replaced).
    pub fn bind(path: &Path) -> std::io::Result<ApiServer> {
        prepare_socket_path(path).map_err(|e| std::io::Error::other(e.to_string()))?;
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        let id = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
        Ok(ApiServer {
            listener,
            path: path.to_owned(),
            id,
            conns: HashMap::new(),
        })
    }

    /// The listener's fd, to poll.
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Accept pending clients; returns their fds, to poll.
    pub fn accept(&mut self) -> Vec<RawFd> {
        let mut fds = Vec::new();
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    self.conns.insert(
                        fd,
                        Conn {
                            stream,
                            buf: Vec::new(),
                        },
                    );
                    fds.push(fd);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        fds
    }

    /// Read from client `fd`; for each complete line, `answer` decides the response (the JSON
    /// fields after `"ok":true`, or an error message). Returns
    /// the requests seen and whether the connection is finished (then it is already closed
    /// and must be removed from the poll set by the caller before the fd is reused: it is
    /// removed from epoll automatically when closed).
    pub fn handle(
        &mut self,
        fd: RawFd,
        mut answer: impl FnMut(ApiRequest) -> Result<serde_json::Value, String>,
    ) -> (Vec<ApiRequest>, bool) {
        let Some(conn) = self.conns.get_mut(&fd) else {
            return (Vec::new(), true);
        };
        let mut seen = Vec::new();
        let mut closed = false;
        let mut chunk = [0u8; 256];
        loop {
            match conn.stream.read(&mut chunk) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
            if conn.buf.len() > MAX_LINE && !conn.buf.contains(&b'\n') {
                closed = true;
                break;
            }
        }
        while let Some(pos) = conn.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = conn.buf.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line);
            if text.trim().is_empty() {
                continue;
            }
            let resp = match parse_request(&text) {
                Ok(req) => {
                    seen.push(req);
                    answer(req)
                }
                Err(e) => Err(e),
            };
            // Answers are small; a client that does not read gets a short wait, then is dropped.
            let _ = conn.stream.set_nonblocking(false);
            let _ = conn
                .stream
                .set_write_timeout(Some(Duration::from_millis(200)));
            let ok = conn.stream.write_all(render_json(&resp).as_bytes()).is_ok();
            let _ = conn.stream.set_nonblocking(true);
            if !ok {
                closed = true;
                break;
            }
        }
        if closed {
            self.conns.remove(&fd);
        }
        (seen, closed)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let (Some((dev, ino)), Ok(m)) = (self.id, std::fs::metadata(&self.path)) {
            if m.dev() == dev && m.ino() == ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    #[test]
    fn requests_parse() {
        assert_eq!(parse_request("state\n"), Ok(ApiRequest::State));
        assert_eq!(parse_request(" start "), Ok(ApiRequest::Start));
        assert_eq!(
            parse_request(r#"{"action":"shutdown"}"#),
            Ok(ApiRequest::Shutdown)
        );
        assert!(parse_request("reboot").is_err());
        assert!(parse_request(r#"{"action":1}"#).is_err());
        assert!(parse_request("{").is_err());
        assert_eq!(
            render_response(&Ok("running")),
            "{\"ok\":true,\"state\":\"running\"}\n"
        );
        assert!(render_response(&Err("x".into())).contains("\"ok\":false"));
        assert_eq!(parse_request("stats"), Ok(ApiRequest::Stats));
        assert_eq!(
            render_json(&Ok(serde_json::json!({"state": "running", "virtio": []}))),
            "{\"ok\":true,\"state\":\"running\",\"virtio\":[]}\n"
        );
    }

    #[test]
    fn server_answers_lines_and_removes_its_socket() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("api.sock");
        let mut srv = ApiServer::bind(&p).unwrap();
        let mut c = UnixStream::connect(&p).unwrap();
        let fds = srv.accept();
        assert_eq!(fds.len(), 1);
        c.write_all(b"state\nbogus\n{\"action\":\"start\"}\n")
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let (seen, closed) = srv.handle(fds[0], |r| match r {
            ApiRequest::State => Ok(serde_json::json!({"state": "created"})),
            _ => Ok(serde_json::json!({"state": "running"})),
        });
        assert_eq!(seen, vec![ApiRequest::State, ApiRequest::Start]);
        assert!(!closed);
        let mut r = BufReader::new(c.try_clone().unwrap());
        let mut lines = Vec::new();
        for _ in 0..3 {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            lines.push(l);
        }
        assert!(lines[0].contains("created"));
        assert!(lines[1].contains("unknown request"));
        assert!(lines[2].contains("running"));
        // An endless line ends the connection.
        c.write_all(&[b'x'; MAX_LINE + 10]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let (_, closed) = srv.handle(fds[0], |_| Ok(serde_json::json!({})));
        assert!(closed);
        drop(srv);
        assert!(!p.exists());
    }
}
