//! The first line a host client sends on the hybrid vsock socket: `CONNECT <port>\n`.
//!
//! Bytes arrive in whatever pieces the client wrote them; [`ConnectLineParser`] takes them one at
//! a time so that it never consumes anything past the newline (bytes after it are stream data for
//! the guest and stay in the socket). It rejects early: as soon as a byte cannot start a valid
//! line, or the line grows past [`CONNECT_LINE_MAX`].

use super::super::defs::CONNECT_LINE_MAX;

const PREFIX: &[u8] = b"CONNECT ";

/// Why a CONNECT line was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnectLineError {
    /// The line does not start with `CONNECT `.
    #[error("expected `CONNECT <port>\\n`, got other bytes")]
    Garbage,
    /// No newline within the allowed length.
    #[error("CONNECT line longer than {CONNECT_LINE_MAX} bytes")]
    TooLong,
    /// The port is missing, not decimal, or does not fit in 32 bits.
    #[error("CONNECT line has no valid decimal port (0 to 4294967295)")]
    BadPort,
}

/// What the parser needs or found after a byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseStep {
    /// The line is not complete yet.
    NeedMore,
    /// A complete, valid line naming this guest port.
    Done(u32),
    /// The line is invalid; close the client.
    Invalid(ConnectLineError),
}

/// Incremental parser for one `CONNECT <port>\n` line.
#[derive(Debug, Default)]
pub struct ConnectLineParser {
    line: Vec<u8>,
    finished: bool,
}

impl ConnectLineParser {
    /// A parser that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Take one byte. After `Done` or `Invalid` further bytes return `Invalid(Garbage)`.
    pub fn push(&mut self, byte: u8) -> ParseStep {
        if self.finished {
            return ParseStep::Invalid(ConnectLineError::Garbage);
        }
        let step = self.step(byte);
        if step != ParseStep::NeedMore {
            self.finished = true;
        }
        step
    }

    fn step(&mut self, byte: u8) -> ParseStep {
        if byte == b'\n' {
            return match parse_connect_line(&self.line) {
                Ok(port) => ParseStep::Done(port),
                Err(e) => ParseStep::Invalid(e),
            };
        }
        // +1 for the newline still to come.
        if self.line.len() + 2 > CONNECT_LINE_MAX {
            return ParseStep::Invalid(ConnectLineError::TooLong);
        }
        let pos = self.line.len();
        if pos < PREFIX.len() {
            if byte != PREFIX[pos] {
                return ParseStep::Invalid(ConnectLineError::Garbage);
            }
        } else if !(byte.is_ascii_digit() || byte == b'\r') {
            return ParseStep::Invalid(ConnectLineError::BadPort);
        }
        self.line.push(byte);
        ParseStep::NeedMore
    }

    /// Take bytes until the line completes or fails. Returns the step and how many bytes were
    /// consumed (bytes after the newline are left alone).
    pub fn feed(&mut self, bytes: &[u8]) -> (ParseStep, usize) {
        for (i, &b) in bytes.iter().enumerate() {
            let step = self.push(b);
            if step != ParseStep::NeedMore {
                return (step, i + 1);
            }
        }
        (ParseStep::NeedMore, bytes.len())
    }
}

/// Parse a whole line without its trailing `\n` (a trailing `\r` is allowed).
pub fn parse_connect_line(line: &[u8]) -> Result<u32, ConnectLineError> {
    let rest = line.strip_prefix(PREFIX).ok_or(ConnectLineError::Garbage)?;
    let digits = rest.strip_suffix(b"\r").unwrap_or(rest);
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(ConnectLineError::BadPort);
    }
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .ok_or(ConnectLineError::BadPort)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_lines() {
        let mut p = ConnectLineParser::new();
        assert_eq!(p.feed(b"CONNECT 1024\n"), (ParseStep::Done(1024), 13));
        let mut p = ConnectLineParser::new();
        assert_eq!(p.feed(b"CONNECT 0\r\n"), (ParseStep::Done(0), 11));
        let mut p = ConnectLineParser::new();
        assert_eq!(
            p.feed(b"CONNECT 4294967295\n"),
            (ParseStep::Done(u32::MAX), 19)
        );
    }

    #[test]
    fn leaves_bytes_after_newline() {
        let mut p = ConnectLineParser::new();
        assert_eq!(p.feed(b"CONNECT 52\nhello"), (ParseStep::Done(52), 11));
        assert_eq!(p.push(b'x'), ParseStep::Invalid(ConnectLineError::Garbage));
    }

    #[test]
    fn partial_line_in_pieces() {
        let mut p = ConnectLineParser::new();
        for piece in [&b"CO"[..], b"NNE", b"CT", b" ", b"10", b"2"] {
            assert_eq!(p.feed(piece), (ParseStep::NeedMore, piece.len()));
        }
        assert_eq!(p.feed(b"4\n"), (ParseStep::Done(1024), 2));
    }

    #[test]
    fn garbage_is_rejected_early() {
        let mut p = ConnectLineParser::new();
        assert_eq!(
            p.feed(b"GET / HTTP/1.1\r\n"),
            (ParseStep::Invalid(ConnectLineError::Garbage), 1)
        );
        let mut p = ConnectLineParser::new();
        assert_eq!(
            p.feed(b"connect 1\n"),
            (ParseStep::Invalid(ConnectLineError::Garbage), 1)
        );
        let mut p = ConnectLineParser::new();
        assert_eq!(
            p.feed(b"CONNECT  1\n"),
            (ParseStep::Invalid(ConnectLineError::BadPort), 9)
        );
        let mut p = ConnectLineParser::new();
        assert_eq!(
            p.feed(b"CONNECT -1\n"),
            (ParseStep::Invalid(ConnectLineError::BadPort), 9)
        );
    }

    #[test]
    fn bad_ports() {
        for line in [
            &b"CONNECT \n"[..],
            b"CONNECT 4294967296\n",
            b"CONNECT 99999999999\n",
            b"CONNECT 1\r\r\n",
            b"CONNECT 1\r2\n",
        ] {
            let mut p = ConnectLineParser::new();
            let (step, _) = p.feed(line);
            assert!(
                matches!(step, ParseStep::Invalid(_)),
                "{:?} gave {step:?}",
                String::from_utf8_lossy(line)
            );
        }
        assert_eq!(parse_connect_line(b"CONNECT 12"), Ok(12));
        assert_eq!(
            parse_connect_line(b"CONNECT"),
            Err(ConnectLineError::Garbage)
        );
    }

    #[test]
    fn too_long_without_newline() {
        let mut p = ConnectLineParser::new();
        let mut line = b"CONNECT ".to_vec();
        line.extend_from_slice(&[b'0'; 40]);
        let (step, used) = p.feed(&line);
        assert_eq!(step, ParseStep::Invalid(ConnectLineError::TooLong));
        assert_eq!(used, CONNECT_LINE_MAX);
        // Leading zeros within the limit are still one valid port.
        let mut p = ConnectLineParser::new();
        assert_eq!(p.feed(b"CONNECT 0000000007\n").0, ParseStep::Done(7));
    }
}
