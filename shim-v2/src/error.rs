//! Errors of the shim, and how they reach containerd (ttrpc status codes
//! that containerd maps to its errdefs: not found, invalid argument, ...).

use containerd_shim::protos::ttrpc;

/// Result alias of the shim library.
pub type Result<T, E = ShimError> = std::result::Result<T, E>;

/// Everything a Task request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// husk-runtime failed (sandbox, agent, container).
    #[error(transparent)]
    Runtime(#[from] husk_runtime::Error),
    /// No such container or process.
    #[error("{0}: not found")]
    NotFound(String),
    /// The container or process already exists.
    #[error("{0}: already exists")]
    AlreadyExists(String),
    /// The request is malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The request does not fit the process's state.
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// husk does not do this.
    #[error("{0} is not supported by husk")]
    Unsupported(&'static str),
    /// A host-side I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Underlying error.
        source: std::io::Error,
    },
}

impl ShimError {
    /// An I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> ShimError {
        ShimError::Io {
            context: context.into(),
            source,
        }
    }

    /// The ttrpc status code containerd understands for this error.
    pub fn code(&self) -> ttrpc::Code {
        match self {
            ShimError::NotFound(_) => ttrpc::Code::NOT_FOUND,
            ShimError::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
            ShimError::InvalidArgument(_) => ttrpc::Code::INVALID_ARGUMENT,
            ShimError::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            ShimError::Unsupported(_) => ttrpc::Code::UNIMPLEMENTED,
            ShimError::Runtime(_) | ShimError::Io { .. } => ttrpc::Code::UNKNOWN,
        }
    }
}

impl From<ShimError> for ttrpc::Error {
    fn from(e: ShimError) -> ttrpc::Error {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_reach_containerd() {
        let e: ttrpc::Error = ShimError::NotFound("container \"x\"".into()).into();
        match e {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), ttrpc::Code::NOT_FOUND);
                assert!(s.message().contains("not found"), "{}", s.message());
            }
            other => panic!("{other:?}"),
        }
        let e = ShimError::Unsupported("checkpoint");
        assert_eq!(e.code(), ttrpc::Code::UNIMPLEMENTED);
        assert_eq!(e.to_string(), "checkpoint is not supported by husk");
    }
}
