//! The shim's error type and its mapping onto ttrpc status codes, so that
//! containerd (and through it kubelet) sees NotFound / FailedPrecondition /
//! InvalidArgument exactly where runc's own shim would report them.

use containerd_shim::protos::ttrpc;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("container {0} not found")]
    ContainerNotFound(String),
    #[error("exec {exec_id} of container {id} not found")]
    ExecNotFound { id: String, exec_id: String },
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("process already finished")]
    ProcessFinished,
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{op} failed: {msg}")]
    Runtime { op: &'static str, msg: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Shim {
        context: String,
        #[source]
        source: containerd_shim::Error,
    },
    #[error("sidetunnel: {0}")]
    Sandbox(String),
    #[error("{0} is not supported by this shim")]
    Unimplemented(&'static str),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    pub fn shim(context: impl Into<String>) -> impl FnOnce(containerd_shim::Error) -> Error {
        let context = context.into();
        move |source| Error::Shim { context, source }
    }

    fn code(&self) -> ttrpc::Code {
        match self {
            Error::ContainerNotFound(_) | Error::ExecNotFound { .. } | Error::ProcessFinished => {
                ttrpc::Code::NOT_FOUND
            }
            Error::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
            Error::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            Error::InvalidArgument(_) => ttrpc::Code::INVALID_ARGUMENT,
            Error::Unimplemented(_) => ttrpc::Code::UNIMPLEMENTED,
            Error::Shim { source, .. } => match source {
                containerd_shim::Error::NotFoundError(_) => ttrpc::Code::NOT_FOUND,
                containerd_shim::Error::InvalidArgument(_) => ttrpc::Code::INVALID_ARGUMENT,
                containerd_shim::Error::FailedPreconditionError(_) => {
                    ttrpc::Code::FAILED_PRECONDITION
                }
                _ => ttrpc::Code::UNKNOWN,
            },
            Error::Runtime { .. } | Error::Io { .. } | Error::Sandbox(_) => ttrpc::Code::UNKNOWN,
        }
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(e: Error) -> ttrpc::Code {
        match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => s.code(),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn maps_to_containerd_codes() {
        assert_eq!(
            code_of(Error::ContainerNotFound("a".into())),
            ttrpc::Code::NOT_FOUND
        );
        assert_eq!(code_of(Error::ProcessFinished), ttrpc::Code::NOT_FOUND);
        assert_eq!(
            code_of(Error::FailedPrecondition("x".into())),
            ttrpc::Code::FAILED_PRECONDITION
        );
        assert_eq!(code_of(Error::Sandbox("x".into())), ttrpc::Code::UNKNOWN);
        assert_eq!(
            code_of(Error::Unimplemented("checkpoint")),
            ttrpc::Code::UNIMPLEMENTED
        );
    }
}
