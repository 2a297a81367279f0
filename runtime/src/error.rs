//! Errors of husk-runtime. Each message says what went wrong and, where it
//! can, what to do about it.

use std::path::PathBuf;
use std::time::Duration;

/// Result alias of husk-runtime.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while running a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A boot artifact (kernel, initramfs) or helper binary is missing or unusable.
    #[error("{what} {path:?} is not usable: {reason}; {hint}")]
    Artifact {
        /// What the file is (e.g. "guest kernel").
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
        /// What to do about it.
        hint: &'static str,
    },
    /// The configuration asks for something impossible.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The requested hypervisor backend cannot run on this host.
    #[error("backend {backend} cannot run here: {reason}")]
    BackendUnavailable {
        /// Backend name.
        backend: &'static str,
        /// Why not.
        reason: String,
    },
    /// A helper process could not be started.
    #[error("starting {what} ({program:?}) failed: {source}")]
    Spawn {
        /// What the process is for.
        what: &'static str,
        /// The program run.
        program: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A host-side I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A helper process ended while the sandbox needed it.
    #[error("{what} exited unexpectedly ({status}){}", console_suffix(.console_tail))]
    ProcessExited {
        /// Which process.
        what: &'static str,
        /// Its exit status, in words.
        status: String,
        /// The last lines of the guest console, if any.
        console_tail: String,
    },
    /// The guest agent did not answer in time.
    #[error("the guest agent did not answer within {after:?}{}", console_suffix(.console_tail))]
    AgentTimeout {
        /// How long we waited.
        after: Duration,
        /// The last lines of the guest console, if any.
        console_tail: String,
    },
    /// The guest agent answered with an error or a malformed message.
    #[error("agent request {request} failed: {source}")]
    Agent {
        /// The RPC.
        request: &'static str,
        /// Underlying ttrpc error.
        source: ttrpc::Error,
    },
    /// The hybrid vsock handshake went wrong.
    #[error("hybrid vsock handshake with {path:?} failed: {reason}")]
    Handshake {
        /// The host socket of the VM's vsock device.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
}

fn console_suffix(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!("; last guest console lines:\n{tail}")
    }
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
