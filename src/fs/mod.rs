//! The filesystem core: lookup, getattr, read, opendir/readdir as async methods
//! that return plain structs. It knows nothing of fuser; tests drive it directly.
//!
//! Model: the mount root is the SSM path PREFIX (or, in the Airflow layout, a
//! virtual folder of areas: `layout`). What a name is comes from the lookup
//! policy (`lookup`): the cache when it knows, else one round trip that asks
//! SSM both "is it a parameter?" and "is anything below it?". Anything below a
//! name makes it a directory ("directory wins"); its own value, if any, is the
//! file `@value` inside it. Listing a directory reads every page below it once
//! and fills the cache with every value and listing it saw (`listing`).
//!
//! Freshness: entries expire after the TTL; a hot entry is refreshed in the
//! background shortly before (readers never wait); the kernel is told to keep
//! answers exactly as long as they stay valid (`attr`), and is told to drop
//! them (through the `Invalidation` channel, handled outside any FUSE
//! callback) when a refresh sees a new version or a name appear or vanish.
//! When SSM fails with an outage, a cached answer is served stale for up to
//! `stale_ttl` (one warning per entry); anything never cached answers EIO
//! within the request deadline.
//!
//! Map: `filesystem` (`Fs`, the request handlers) decides what to ask the
//! store; `superblock` owns what the core knows (the passive containers
//! `cache` and `inode`) and records every answer; the handlers' other files
//! are `lookup`, `listing`, `refresh`, `special` (with `views`),
//! `apply_events` and `change_streams`; `attr` and `layout` shape answers;
//! `error` is the one error at the FUSE boundary. This module defines nothing
//! itself, so no submodule imports from its parent.

pub mod cache;
pub mod error;
pub mod inode;
pub mod views;

mod apply_events;
mod attr;
mod change_streams;
mod filesystem;
mod layout;
mod listing;
mod lookup;
mod refresh;
mod special;
mod superblock;

pub use attr::{Attr, Entry, FileKind};
pub use change_streams::{
    is_stream_ino, ChangeKind, ChangeNote, StreamSpec, CHANGES_NAME, DROPPED_LINE,
    MAX_OPEN_STREAMS, STREAM_DIR_INO, STREAM_DIR_NAME,
};
pub use error::FsError;
pub use filesystem::{DirItem, Fs, ReadData};
pub use inode::ROOT_INO;
pub use special::XATTR_NAMES;
pub use superblock::Invalidation;
