//! The one error type at the FUSE boundary, with an exhaustive errno mapping.
//!
//! Each variant says what went wrong in terms a user can act on; its Display
//! names a parameter or path when there is one, never a value. `errno` is the
//! only place a failure becomes a number, and `level` says how loudly the
//! FUSE adapter logs it (a missing name is routine; an unknown inode is a bug).

use tracing::Level;

use crate::names::NameError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    /// (In the message, so not a `source()`; see `Unreachable`.)
    #[error("invalid name: {0}")]
    BadName(NameError),
    #[error("read-only file system")]
    ReadOnly,
    #[error("not a directory")]
    NotDirectory,
    #[error("is a directory")]
    IsDirectory,
    #[error("unknown inode {0}")]
    UnknownInode(u64),
    #[error("unknown directory handle {0}")]
    BadHandle(u64),
    /// No such extended attribute (or none on directories).
    #[error("no such attribute")]
    NoAttribute,
    /// An attribute namespace this filesystem has none of (security.*, system.*).
    #[error("attributes of this kind are not supported")]
    UnsupportedAttribute,
    /// IAM or KMS denies reading this parameter.
    #[error("SSM denied access to {name} (IAM or KMS)")]
    AccessDenied { name: String },
    /// IAM denies listing below this path (ssm:GetParametersByPath).
    #[error("SSM denied listing below {path}")]
    ListingRefused { path: String },
    /// The mount-time check could not read the mounted path at all.
    /// (`cause` is in the message and deliberately not a `source()`: a
    /// chain printer such as anyhow's `{:#}` would repeat it.)
    #[error("cannot read {path} from SSM: {cause}")]
    Unreachable { path: String, cause: StoreError },
    /// A change stream's write end could not be opened (logged once by the
    /// stream writer with its cause).
    #[error("the change stream cannot be opened")]
    StreamUnavailable,
    /// `fs::MAX_OPEN_STREAMS` change streams are open on this mount.
    #[error("too many change streams are open on this mount")]
    TooManyStreams,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<NameError> for FsError {
    fn from(cause: NameError) -> Self {
        FsError::BadName(cause)
    }
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::BadName(NameError::TooLong) => libc::ENAMETOOLONG,
            FsError::BadName(
                NameError::TooDeep
                | NameError::BadCharacter
                | NameError::BadSegment
                | NameError::Reserved
                | NameError::NotAbsolute
                | NameError::BadSelector,
            ) => libc::ENOENT,
            FsError::ReadOnly => libc::EROFS,
            FsError::NotDirectory => libc::ENOTDIR,
            FsError::IsDirectory => libc::EISDIR,
            FsError::UnknownInode(_) => libc::ESTALE,
            FsError::BadHandle(_) => libc::EBADF,
            FsError::NoAttribute => libc::ENODATA,
            FsError::UnsupportedAttribute => libc::EOPNOTSUPP,
            FsError::AccessDenied { .. } | FsError::ListingRefused { .. } => libc::EACCES,
            FsError::Unreachable { cause, .. } => Self::store_errno(cause),
            FsError::StreamUnavailable => libc::EIO,
            FsError::TooManyStreams => libc::ENFILE,
            FsError::Store(error) => Self::store_errno(error),
        }
    }

    fn store_errno(error: &StoreError) -> i32 {
        match error {
            StoreError::NotFound => libc::ENOENT,
            StoreError::AccessDenied { .. }
            | StoreError::Credentials(_)
            | StoreError::IdentityRefused(_) => libc::EACCES,
            StoreError::Throttled
            | StoreError::Unavailable(_)
            | StoreError::Timeout
            | StoreError::InvalidNextToken
            | StoreError::Rejected { .. } => libc::EIO,
        }
    }

    /// How loudly a failed request is logged: routine answers at DEBUG, SSM
    /// trouble at WARN (the core already logged the first of each), and what
    /// only a bug can cause at ERROR.
    pub fn level(&self) -> Level {
        match self {
            FsError::NotFound
            | FsError::BadName(_)
            | FsError::ReadOnly
            | FsError::NotDirectory
            | FsError::IsDirectory
            | FsError::AccessDenied { .. }
            | FsError::ListingRefused { .. }
            | FsError::NoAttribute
            | FsError::UnsupportedAttribute
            | FsError::TooManyStreams
            | FsError::Store(StoreError::NotFound) => Level::DEBUG,
            FsError::Store(_) | FsError::Unreachable { .. } | FsError::StreamUnavailable => {
                Level::WARN
            }
            FsError::UnknownInode(_) | FsError::BadHandle(_) => Level::ERROR,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errnos() {
        assert_eq!(
            FsError::BadName(NameError::TooLong).errno(),
            libc::ENAMETOOLONG
        );
        assert_eq!(
            FsError::BadName(NameError::BadCharacter).errno(),
            libc::ENOENT
        );
        let denied = FsError::AccessDenied {
            name: "/p/x".into(),
        };
        assert_eq!(denied.errno(), libc::EACCES);
        assert_eq!(denied.to_string(), "SSM denied access to /p/x (IAM or KMS)");
        assert_eq!(FsError::Store(StoreError::Timeout).errno(), libc::EIO);
        assert_eq!(
            FsError::Store(StoreError::Credentials("x".into())).errno(),
            libc::EACCES
        );
        assert_eq!(FsError::ReadOnly.errno(), libc::EROFS);
        assert_eq!(FsError::UnknownInode(9).level(), Level::ERROR);
        assert_eq!(FsError::NotFound.level(), Level::DEBUG);
    }
}
