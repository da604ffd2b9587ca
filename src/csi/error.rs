//! The one error of the CSI services, and its gRPC code: what kubelet and
//! csi-sanity expect for each kind of refusal. Messages name the problem in
//! one line and never carry a token or a value.

#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    /// The request itself is wrong: a missing field, a bad attribute.
    #[error("{0}")]
    InvalidArgument(String),
    /// The target is published already, for another volume or options.
    #[error("{0}")]
    AlreadyExists(String),
    /// AWS refused the identity (STS would not let the pod assume the role).
    #[error("{0}")]
    PermissionDenied(String),
    /// The mount could not serve (the daemon said why).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The serving side is not there (yet): kubelet retries.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A cap of the node's (mounts per namespace, per node) is reached.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A system call failed on this node.
    #[error("{what}: {cause}")]
    System {
        what: &'static str,
        cause: std::io::Error,
    },
    /// What CSI does not ask of a node-only driver without staging.
    #[error("{0}: ssmfs is a node-only driver without staging")]
    Unimplemented(&'static str),
}

impl CsiError {
    pub fn invalid(message: impl Into<String>) -> Self {
        CsiError::InvalidArgument(message.into())
    }

    pub fn system(what: &'static str, cause: impl Into<std::io::Error>) -> Self {
        CsiError::System {
            what,
            cause: cause.into(),
        }
    }
}

impl From<CsiError> for tonic::Status {
    fn from(error: CsiError) -> Self {
        use tonic::Code;
        let code = match &error {
            CsiError::InvalidArgument(_) => Code::InvalidArgument,
            CsiError::AlreadyExists(_) => Code::AlreadyExists,
            CsiError::PermissionDenied(_) => Code::PermissionDenied,
            CsiError::FailedPrecondition(_) => Code::FailedPrecondition,
            CsiError::Unavailable(_) => Code::Unavailable,
            CsiError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            CsiError::ResourceExhausted(_) => Code::ResourceExhausted,
            CsiError::System { .. } => Code::Internal,
            CsiError::Unimplemented(_) => Code::Unimplemented,
        };
        tonic::Status::new(code, error.to_string())
    }
}
