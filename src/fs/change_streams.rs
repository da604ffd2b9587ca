//! The change streams (`@changes`): what the core publishes when it learns
//! that a file changed, and the streams readers have open. Not to be confused
//! with change events (`crate::change`, `crate::events`, `fs::apply_events`):
//! those are what SSM tells the core; streams are what the core tells readers.
//!
//! Model: every change the core records (a new version seen by a refresh, an
//! event or a read; a name that appeared; a name that vanished) becomes one
//! `ChangeNote` on a broadcast channel, named by its path relative to the
//! mount root. A lookup of `@changes` in any directory opens a stream: a
//! named pipe of its own (a fresh inode per lookup, so each open starts at
//! "now" and every reader sees every change) that covers that directory's
//! subtree. The core only numbers streams and says what they cover; the
//! pipe's write end is opened for the daemon (`crate::stream_pipes`), so
//! the kernel's pipe does the blocking, `poll` and `O_NONBLOCK`, and a warm
//! read of an ordinary file still never reaches the daemon (no-open mode).
//!
//! While a stream is open, the values it covers are kept fresh as if they
//! were read (`keep_fresh`): marked read, so the ordinary batched refresh
//! takes them along before they expire.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::Instant;

use super::filesystem::Fs;
use super::inode::Role;
use crate::store::{ParameterStore, MAX_BATCH};

/// The name of the stream file in every directory (`@` is never in an SSM name).
pub const CHANGES_NAME: &str = "@changes";
/// The hidden directory through which a stream's write end is opened by
/// number: answered to the daemon's own threads, and to root (the CSI
/// plugin opens it for an unprivileged daemon); nobody else.
pub const STREAM_DIR_NAME: &str = "@stream";
/// Stream inodes live above every inode number the table hands out (those are
/// kept below 2^63), so they never collide and are never journaled.
pub const STREAM_DIR_INO: u64 = 1 << 63;
/// The line a reader gets when changes were lost before it read them.
pub const DROPPED_LINE: &str = "@dropped\n";
/// Streams one mount may have open at once: far more than its readers
/// need, few enough that a reader that opens them without end cannot run
/// the daemon out of fds.
pub const MAX_OPEN_STREAMS: usize = 1024;
/// Notes queued for streams that are slow to take them; a stream that falls
/// further behind gets `@dropped` (memory stays bounded whatever readers do).
const CHANGE_BACKLOG: usize = 1024;
/// While a stream is open, covered values are looked at again at least this
/// often, and at least four times per TTL (and at their next refresh point,
/// if sooner): a value that joined the cache meanwhile is taken along well
/// before it expires.
const KEEP_FRESH_MAX_SLEEP: Duration = Duration::from_secs(30);
/// A value whose refresh failed stays due: looked at no more than once a
/// second, so a failing refresh is not retried in a loop.
const KEEP_FRESH_MIN_SLEEP: Duration = Duration::from_secs(1);

/// What happened to one file, as a stream line says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeKind {
    /// A new version (or a name that appeared, with its version).
    Version(i64),
    Deleted,
}

/// One change, named by its path relative to the mount root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeNote {
    pub path: Arc<str>,
    pub kind: ChangeKind,
}

impl ChangeNote {
    /// The stream line: `PATH VERSION` or `PATH deleted`.
    pub fn line(&self) -> String {
        match self.kind {
            ChangeKind::Version(version) => format!("{} {version}\n", self.path),
            ChangeKind::Deleted => format!("{} deleted\n", self.path),
        }
    }

    /// The note a stream line says (the inverse of `line`; the newline is
    /// optional); `None` for `@dropped` and for any line this version
    /// cannot read. SSM names hold no space: the first one ends the path.
    /// Only plain names below the root: a `..` or an absolute path would
    /// point outside the mount the stream speaks for.
    pub fn parse(line: &str) -> Option<ChangeNote> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        let (path, what) = line.split_once(' ')?;
        let kind = match what {
            "deleted" => ChangeKind::Deleted,
            digits if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
                ChangeKind::Version(digits.parse().ok()?)
            }
            _ => return None,
        };
        let plain = !path.is_empty()
            && std::path::Path::new(path)
                .components()
                .all(|component| matches!(component, std::path::Component::Normal(_)))
            && !path.split('/').any(str::is_empty);
        plain.then(|| ChangeNote {
            path: path.into(),
            kind,
        })
    }
}

/// One open stream: which subtree it covers.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    pub ino: u64,
    /// The directory it was opened in, relative to the mount root ("" for
    /// the root): notes below it are the stream's.
    pub dir: Arc<str>,
    /// The SSM names whose values it keeps fresh (the directory's, or every
    /// area's for the Airflow layout's root).
    ssm_prefixes: Vec<String>,
}

impl StreamSpec {
    /// A stream covering the directory `dir` (relative to the mount root),
    /// keeping nothing fresh: for tests of a stream's writer.
    #[cfg(test)]
    pub(crate) fn for_dir(ino: u64, dir: &str) -> Self {
        Self {
            ino,
            dir: dir.into(),
            ssm_prefixes: Vec::new(),
        }
    }

    /// What a holder keeps of the stream, to hand it to the next daemon.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"ino": self.ino, "dir": &*self.dir, "prefixes": self.ssm_prefixes})
    }

    /// A stream a holder kept, as `to_json` wrote it.
    pub fn from_json(value: &serde_json::Value) -> Option<Self> {
        let ino = value["ino"].as_u64().filter(|ino| *ino > STREAM_DIR_INO)?;
        let dir = value["dir"].as_str()?;
        let prefixes = value["prefixes"]
            .as_array()?
            .iter()
            .map(|p| p.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            ino,
            dir: dir.into(),
            ssm_prefixes: prefixes,
        })
    }

    pub fn covers(&self, note: &ChangeNote) -> bool {
        self.dir.is_empty()
            || note
                .path
                .strip_prefix(&*self.dir)
                .is_some_and(|rest| rest.starts_with('/'))
    }
}

/// The streams of one mount and the channel their notes travel on.
pub(super) struct Streams {
    notes: broadcast::Sender<ChangeNote>,
    open: Mutex<HashMap<u64, StreamSpec>>,
    /// Wakes the keep-fresh task when the first stream opens.
    opened: tokio::sync::Notify,
}

impl Streams {
    pub(super) fn new() -> Self {
        Self {
            notes: broadcast::channel(CHANGE_BACKLOG).0,
            open: Mutex::new(HashMap::new()),
            opened: tokio::sync::Notify::new(),
        }
    }

    pub(super) fn publish(&self, note: ChangeNote) {
        // No receiver means no stream is open: nobody to tell.
        let _ = self.notes.send(note);
    }

    fn prefixes(&self) -> Vec<String> {
        let open = self.open.lock().unwrap();
        let mut prefixes: Vec<String> = open
            .values()
            .flat_map(|s| s.ssm_prefixes.iter().cloned())
            .collect();
        prefixes.sort();
        prefixes.dedup();
        prefixes
    }
}

pub fn is_stream_ino(ino: u64) -> bool {
    ino >= STREAM_DIR_INO
}

impl<S: ParameterStore> Fs<S> {
    /// Opens a stream covering the directory `dir_ino` (a lookup of `@changes`).
    pub(super) fn open_stream(
        self: &Arc<Self>,
        dir: &super::inode::Node,
    ) -> Result<StreamSpec, super::error::FsError> {
        // Each stream holds an fd and a writer task here (and one request to
        // the CSI plugin, shared by every mount of the node, at its open): a
        // reader opening stream after stream is stopped at this many.
        if self.open_streams() >= MAX_OPEN_STREAMS {
            return Err(super::error::FsError::TooManyStreams);
        }
        let spec = StreamSpec {
            ino: 0,
            dir: self.superblock.layout().mount_path_of_dir(dir).into(),
            ssm_prefixes: self.superblock.layout().ssm_prefixes_of_dir(dir),
        };
        Ok(self.register_stream(|open| {
            // Random, so that only the stream's own daemon (and root) can
            // name its write end: no other tenant's process can guess it.
            let ino = loop {
                let ino = STREAM_DIR_INO + 1 + (rand::random::<u64>() >> 2);
                if !open.contains_key(&ino) {
                    break ino;
                }
            };
            StreamSpec { ino, ..spec }
        }))
    }

    /// Adds the stream `make` builds (seeing the streams open), and wakes
    /// `keep_fresh` if it is the only one.
    fn register_stream(
        &self,
        make: impl FnOnce(&HashMap<u64, StreamSpec>) -> StreamSpec,
    ) -> StreamSpec {
        let (stream, first) = {
            let mut open = self.superblock.streams().open.lock().unwrap();
            let stream = make(&open);
            open.insert(stream.ino, stream.clone());
            (stream, open.len() == 1)
        };
        if first {
            self.superblock.streams().opened.notify_one();
        }
        stream
    }

    /// A lookup by the daemon itself (its write end of a stream): `@stream`
    /// in the root, then the stream's number in it. Nobody else is answered.
    pub fn lookup_stream_end(
        &self,
        parent: u64,
        segment: &std::ffi::OsStr,
    ) -> Result<super::attr::Entry, super::error::FsError> {
        use super::error::FsError;
        if parent == super::inode::ROOT_INO && segment == STREAM_DIR_NAME {
            return Ok(self.attrs.dir(STREAM_DIR_INO, Duration::ZERO));
        }
        let ino = segment.to_str().and_then(|s| s.parse::<u64>().ok());
        match ino {
            Some(ino) if parent == STREAM_DIR_INO && self.stream(ino).is_some() => {
                Ok(self.attrs.stream(ino))
            }
            _ => Err(FsError::NotFound),
        }
    }

    /// A stream an earlier daemon of this mount opened, handed over by the
    /// holder: open again, kept fresh again. This daemon starts with an
    /// empty cache while the kernel still holds the files its readers read
    /// (and answers their rereads itself), so the values of those files the
    /// stream covers are fetched now, ten to a call: without them, nothing
    /// would be kept fresh, and a rotation would never show on the stream.
    pub fn adopt_stream(self: &Arc<Self>, stream: StreamSpec) {
        let held: Vec<Arc<str>> = self
            .superblock
            .inodes()
            .all()
            .into_iter()
            .filter(|node| matches!(node.role, Role::File | Role::ShadowedValue))
            .filter(|node| {
                stream.ssm_prefixes.iter().any(|prefix| {
                    *node.name == **prefix
                        || crate::names::relative_to(prefix, &node.name).is_some()
                })
            })
            .filter(|node| self.superblock.cache().value(&node.name).is_none())
            .map(|node| node.name)
            .collect();
        self.register_stream(|_| stream);
        let fs = self.clone();
        tokio::spawn(async move {
            for batch in held.chunks(MAX_BATCH) {
                let _ = crate::store::resilient::in_background(fs.get_batch(batch)).await;
            }
        });
    }

    /// The stream numbered `ino`, while it is open.
    pub fn stream(&self, ino: u64) -> Option<StreamSpec> {
        self.superblock
            .streams()
            .open
            .lock()
            .unwrap()
            .get(&ino)
            .cloned()
    }

    /// Where the FUSE side announces notes once the kernel forgot what they
    /// replace (`Invalidation::Announce`).
    pub fn change_announcer(&self) -> broadcast::Sender<ChangeNote> {
        self.superblock.streams().notes.clone()
    }

    /// The notes a stream's writer reads (every note; `StreamSpec::covers`
    /// picks its own).
    pub fn subscribe_changes(&self) -> broadcast::Receiver<ChangeNote> {
        self.superblock.streams().notes.subscribe()
    }

    /// The stream's last reader is gone (or it was never opened).
    pub fn close_stream(&self, ino: u64) {
        self.superblock.streams().open.lock().unwrap().remove(&ino);
    }

    /// Streams open now.
    pub fn open_streams(&self) -> usize {
        self.superblock.streams().open.lock().unwrap().len()
    }

    /// Runs for the mount's life: while any stream is open, the cached values
    /// it covers are marked read, and those due are refreshed like any read
    /// value (batched, paced). Sleeps until the next refresh point, and not at
    /// all while no stream is open: it costs nothing while nothing changes.
    pub async fn keep_fresh(self: Arc<Self>) {
        loop {
            let prefixes = self.superblock.streams().prefixes();
            if prefixes.is_empty() {
                self.superblock.streams().opened.notified().await;
                continue;
            }
            let now = Instant::now();
            let (due, next) = self.superblock.cache().keep_read_below(&prefixes, now);
            // Refreshed values get their next refresh point when the answer
            // comes: look again soon to learn it.
            let next = if due.is_empty() { next } else { Some(now) };
            for name in due {
                self.refresh_soon(&name);
            }
            let sleep = next
                .map(|at| at.saturating_duration_since(now))
                .unwrap_or(KEEP_FRESH_MAX_SLEEP)
                .min(self.config.cache.ttl / 4)
                .clamp(KEEP_FRESH_MIN_SLEEP, KEEP_FRESH_MAX_SLEEP);
            tokio::select! {
                () = tokio::time::sleep(sleep) => {}
                () = self.superblock.streams().opened.notified() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &str) -> StreamSpec {
        StreamSpec {
            ino: STREAM_DIR_INO + 1,
            dir: dir.into(),
            ssm_prefixes: Vec::new(),
        }
    }

    fn note(path: &str) -> ChangeNote {
        ChangeNote {
            path: path.into(),
            kind: ChangeKind::Version(2),
        }
    }

    #[test]
    fn a_stream_covers_its_subtree_only() {
        assert!(spec("").covers(&note("a/b")));
        assert!(spec("a").covers(&note("a/b")));
        assert!(spec("a").covers(&note("a/b/c")));
        assert!(!spec("a").covers(&note("ab/c")));
        assert!(!spec("a").covers(&note("a")));
        assert!(!spec("a/b").covers(&note("a/c")));
    }

    #[test]
    fn lines_say_path_and_version_or_deleted() {
        assert_eq!(note("db/password").line(), "db/password 2\n");
        let deleted = ChangeNote {
            path: "x".into(),
            kind: ChangeKind::Deleted,
        };
        assert_eq!(deleted.line(), "x deleted\n");
    }

    #[test]
    fn parse_reads_what_line_writes_and_nothing_else() {
        for written in [
            note("db/password"),
            ChangeNote {
                path: "a/b.c-d@x:y".into(),
                kind: ChangeKind::Deleted,
            },
            ChangeNote {
                path: "k".into(),
                kind: ChangeKind::Version(i64::MAX),
            },
        ] {
            assert_eq!(ChangeNote::parse(&written.line()), Some(written.clone()));
        }
        assert_eq!(
            ChangeNote::parse("x 3"),
            Some(ChangeNote {
                path: "x".into(),
                kind: ChangeKind::Version(3)
            })
        );
        for odd in [
            DROPPED_LINE,
            "",
            "novers",
            "a/b seven",
            "../etc/passwd 1",
            "/abs 1",
            "a//b 1",
            "a/ 1",
            "./a 1",
            " 1",
            "a 99999999999999999999",
            "a  1",
        ] {
            assert_eq!(ChangeNote::parse(odd), None, "{odd:?}");
        }
    }
}
