//! The husk agent API, generated from `proto/*.proto` with ttrpc-codegen.
//!
//! Both ends use it: `husk-agent` serves [`agent_ttrpc::Agent`] and
//! [`health_ttrpc::Health`] on guest vsock port [`AGENT_VSOCK_PORT`];
//! `husk-runtime` calls them through the generated clients.

/// Declares one generated module; the generators' own inner lint
/// attributes are stripped by build.rs, so they are restated here.
macro_rules! generated {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {$(
        $(#[$doc])*
        #[allow(
            missing_docs, unused, dead_code, non_camel_case_types, non_snake_case,
            non_upper_case_globals, unreachable_pub, clippy::all, clippy::pedantic,
            clippy::undocumented_unsafe_blocks
        )]
        pub mod $name {
            include!(concat!(env!("OUT_DIR"), "/", stringify!($name), ".rs"));
        }
    )*};
}

generated! {
    /// Messages of `proto/health.proto`.
    health,
    /// ttrpc client and server of the `Health` service.
    health_ttrpc,
    /// Messages of `proto/agent.proto`.
    agent,
    /// ttrpc client and server of the `Agent` service.
    agent_ttrpc,
}

/// Guest vsock port on which husk-agent serves the API.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Guest vsock port on which husk-agent accepts stdio streams. A stream
/// starts with one header line, see [`stdio_header`].
pub const IO_VSOCK_PORT: u32 = 1025;

/// Longest stdio header line accepted, newline included.
pub const MAX_STDIO_HEADER: usize = 512;

/// The stdio stream kinds a host can attach.
pub const STDIO_STREAMS: [&str; 4] = ["stdin", "stdout", "stderr", "tty"];

/// The header a host writes first on a stdio connection:
/// `<container_id> <exec_id or -> <stream>\n`.
pub fn stdio_header(container_id: &str, exec_id: &str, stream: &str) -> String {
    let exec = if exec_id.is_empty() { "-" } else { exec_id };
    format!("{container_id} {exec} {stream}\n")
}

/// Parses a stdio header line (without its newline) into
/// (container id, exec id or "", stream). `None` for anything malformed.
pub fn parse_stdio_header(line: &str) -> Option<(&str, &str, &str)> {
    let mut it = line.split(' ');
    let (c, e, s) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() || c.is_empty() || e.is_empty() || !STDIO_STREAMS.contains(&s) {
        return None;
    }
    Some((c, if e == "-" { "" } else { e }, s))
}

/// Copies with read(2)/write(2) through a 64 KiB buffer until EOF: what
/// feeds a process's stdin pipe. Not `std::io::copy`: on Linux it splices,
/// and splice(2) between a socket and a pipe holds the pipe's lock while it
/// waits on the socket, so a container process closing its stdin at exit
/// hangs in `pipe_release` (state D) until the host sends something.
pub fn copy_plain(
    from: &mut impl std::io::Read,
    to: &mut impl std::io::Write,
) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// Version of the agent API described by these protos; bumped when an RPC
/// changes meaning.
pub const API_VERSION: u32 = 4;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdio_header_round_trip() {
        let h = stdio_header("c1", "", "stdout");
        assert_eq!(h, "c1 - stdout\n");
        assert_eq!(parse_stdio_header(h.trim_end()), Some(("c1", "", "stdout")));
        assert_eq!(parse_stdio_header("c1 e2 tty"), Some(("c1", "e2", "tty")));
        for bad in [
            "",
            "c1",
            "c1 e2",
            "c1 e2 stdweird",
            "c1 e2 stdin x",
            " e2 stdin",
            "c1  stdin",
        ] {
            assert_eq!(parse_stdio_header(bad), None, "{bad:?}");
        }
    }
}
