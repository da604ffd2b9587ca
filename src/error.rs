//! The one error type at the FUSE boundary, with an exhaustive errno mapping.

use crate::names::NameError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("invalid name: {0}")]
    BadName(#[from] NameError),
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
    #[error(transparent)]
    Store(#[from] StoreError),
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
                | NameError::NotAbsolute,
            ) => libc::ENOENT,
            FsError::ReadOnly => libc::EROFS,
            FsError::NotDirectory => libc::ENOTDIR,
            FsError::IsDirectory => libc::EISDIR,
            FsError::UnknownInode(_) => libc::ESTALE,
            FsError::BadHandle(_) => libc::EBADF,
            FsError::Store(StoreError::NotFound) => libc::ENOENT,
            FsError::Store(StoreError::AccessDenied(_) | StoreError::Credentials(_)) => {
                libc::EACCES
            }
            FsError::Store(
                StoreError::Throttled
                | StoreError::Unavailable(_)
                | StoreError::Timeout
                | StoreError::Invalid(_),
            ) => libc::EIO,
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
        assert_eq!(
            FsError::Store(StoreError::AccessDenied("x".into())).errno(),
            libc::EACCES
        );
        assert_eq!(FsError::Store(StoreError::Timeout).errno(), libc::EIO);
        assert_eq!(
            FsError::Store(StoreError::Credentials("x".into())).errno(),
            libc::EACCES
        );
        assert_eq!(FsError::ReadOnly.errno(), libc::EROFS);
    }
}
