//! Attributes and entries as the core reports them, independent of fuser.
//!
//! A file's size is its value's exact length and its mtime the parameter's
//! LastModifiedDate; a directory's mtime is the mount time (SSM keeps none for
//! a path). Every answer carries how long the kernel may keep it: the time
//! left until the entry behind it is due for refresh.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::config::FsConfig;
use crate::fs::cache::Validity;
use crate::store::Parameter;

/// Reported as the block size: values are small, one page covers them.
const BLOCK_SIZE: u32 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FileKind {
    File,
    Dir,
    /// A change stream (`@changes`): a named pipe the daemon writes.
    Fifo,
}

/// Attributes of one inode.
#[derive(Debug, Clone)]
pub struct Attr {
    pub ino: u64,
    pub kind: FileKind,
    pub size: u64,
    pub mtime: SystemTime,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub blksize: u32,
}

/// An answer the kernel may cache for `ttl`.
#[derive(Debug, Clone)]
pub struct Entry {
    pub attr: Attr,
    pub ttl: Duration,
}

/// Builds attributes from the mount's ownership and modes.
pub(super) struct Attrs {
    uid: u32,
    gid: u32,
    file_mode: u16,
    dir_mode: u16,
    mounted_at: SystemTime,
}

impl Attrs {
    pub(super) fn new(config: &FsConfig) -> Self {
        Self {
            uid: config.uid,
            gid: config.gid,
            file_mode: config.file_mode,
            dir_mode: config.dir_mode,
            mounted_at: SystemTime::now(),
        }
    }

    pub(super) fn dir(&self, ino: u64, ttl: Duration) -> Entry {
        Entry {
            attr: Attr {
                ino,
                kind: FileKind::Dir,
                size: 0,
                mtime: self.mounted_at,
                perm: self.dir_mode,
                uid: self.uid,
                gid: self.gid,
                nlink: 2,
                blksize: BLOCK_SIZE,
            },
            ttl,
        }
    }

    /// A change stream: a named pipe, never cached by the kernel (each lookup
    /// is a stream of its own). Readable by whoever may read the mount's
    /// files; writable by its owner, the daemon (which may not be the files'
    /// owner, as for the CSI driver's serving side).
    pub(super) fn stream(&self, ino: u64) -> Entry {
        // SAFETY: geteuid cannot fail.
        let daemon = unsafe { libc::geteuid() };
        let uid = if daemon == 0 { self.uid } else { daemon };
        Entry {
            attr: Attr {
                ino,
                kind: FileKind::Fifo,
                size: 0,
                mtime: self.mounted_at,
                perm: (self.file_mode & 0o444) | 0o200,
                uid,
                gid: self.gid,
                nlink: 1,
                blksize: BLOCK_SIZE,
            },
            ttl: Duration::ZERO,
        }
    }

    /// A parameter a listing names but SSM will not give this caller (a KMS
    /// key it may not use): it is there, with no read bits, so `ls -l`,
    /// `find` and `du` see it and only reading it answers EACCES. One byte
    /// long: the kernel reads a zero-size file as empty without asking (OPEN
    /// is not sent at all), and the read must reach the daemon to fail.
    pub(super) fn unreadable_file(&self, ino: u64, ttl: Duration) -> Entry {
        Entry {
            attr: Attr {
                ino,
                kind: FileKind::File,
                size: 1,
                mtime: self.mounted_at,
                perm: 0,
                uid: self.uid,
                gid: self.gid,
                nlink: 1,
                blksize: BLOCK_SIZE,
            },
            ttl,
        }
    }

    pub(super) fn file(&self, ino: u64, parameter: &Parameter, validity: &Validity) -> Entry {
        self.sized_file(ino, parameter.value.len(), parameter, validity)
    }

    /// A file of `size` bytes derived from `parameter` (a field of a view).
    pub(super) fn sized_file(
        &self,
        ino: u64,
        size: usize,
        parameter: &Parameter,
        validity: &Validity,
    ) -> Entry {
        Entry {
            attr: Attr {
                ino,
                kind: FileKind::File,
                size: size as u64,
                mtime: parameter.last_modified.into(),
                perm: self.file_mode,
                uid: self.uid,
                gid: self.gid,
                nlink: 1,
                blksize: BLOCK_SIZE,
            },
            ttl: validity.kernel_ttl(Instant::now()),
        }
    }
}
