//! Following the `@changes` stream of the ssmfs mounts a command reads from.
//!
//! Model: a file is matched to its mount by canonicalizing it and taking
//! the longest mount point in /proc/self/mountinfo whose type is
//! `fuse.ssmfs`; each such mount's `<mount point>/@changes` is opened once,
//! and a thread per stream turns its lines into `Change`s (an absolute
//! path, or `Dropped`) on one channel. A line names a file relative to the
//! root of the mount's filesystem, whichever directory's `@changes` was
//! opened; a bind mount of a subdirectory (mountinfo's root field, e.g.
//! `/prod`) shows only the lines below it, with that part taken off. Every
//! open, the first included, is reported as `Dropped`: what changed before
//! it (between a command's first read and the open, or while a stream was
//! reopened) is not in the stream. `--changes PATH` replaces all of this
//! with one stream, whose lines are relative to the ssmfs mount holding
//! PATH, or to PATH's directory when it is on none (how the tests drive it
//! with a FIFO). Lines carry no values, only names and versions.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::{human, Backoff};
use crate::fs::{ChangeNote, CHANGES_NAME};

/// The filesystem type ssmfs mounts show in /proc/self/mountinfo.
const SSMFS_FSTYPE: &str = "fuse.ssmfs";

/// What one line of a stream says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The file at this absolute path has a new version, was created or
    /// was deleted: whoever uses it should look again.
    Path(PathBuf),
    /// Changes were lost (the reader fell behind, the stream was reopened,
    /// or a line could not be understood): every file may have changed.
    Dropped,
}

impl Change {
    /// Whether this change may concern `used` (a path as `key` gives it).
    pub fn concerns(&self, used: &Path) -> bool {
        match self {
            Change::Path(path) => path == used,
            Change::Dropped => true,
        }
    }
}

/// Where a stream's lines land: `dir` is the directory their paths are
/// joined onto (a mount point), `root` the part of the filesystem it shows
/// (mountinfo's root field: `/` for a whole mount, `/prod` for a bind
/// mount of the subdirectory `prod`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineBase {
    pub dir: PathBuf,
    pub root: PathBuf,
}

impl LineBase {
    /// Lines relative to `dir` itself (a stream on no ssmfs mount).
    pub fn at(dir: PathBuf) -> Self {
        Self {
            dir,
            root: PathBuf::from("/"),
        }
    }

    /// The file a line's path (relative to the filesystem's root) names
    /// here; `None` when it is outside the part this mount shows.
    pub fn place(&self, line_path: &str) -> Option<PathBuf> {
        let root = self.root.strip_prefix("/").unwrap_or(&self.root);
        let below = Path::new(line_path).strip_prefix(root).ok()?;
        Some(self.dir.join(below))
    }
}

/// Reads one line of a stream whose lines land at `base`: `None` for a
/// line about a file this mount does not show. A line this version cannot
/// read (not UTF-8 either) is taken as `Dropped`: looking again is always
/// safe.
pub fn parse_line(base: &LineBase, line: &[u8]) -> Option<Change> {
    let Some(note) = std::str::from_utf8(line).ok().and_then(ChangeNote::parse) else {
        return Some(Change::Dropped);
    };
    base.place(&note.path).map(Change::Path)
}

/// The form of a path that change lines are compared in: canonical when
/// the file exists; for a missing file (one that a line may announce as
/// created), its canonical directory and its name.
pub fn key(path: &Path) -> PathBuf {
    if let Ok(canonical) = path.canonicalize() {
        return canonical;
    }
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) if !parent.as_os_str().is_empty() => key(parent).join(name),
        _ => std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
    }
}

/// The ssmfs mounts in a /proc/self/mountinfo text: each mount point and
/// the part of its filesystem it shows.
pub fn ssmfs_mounts(mountinfo: &str) -> Vec<LineBase> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER"
            let (before, after) = line.split_once(" - ")?;
            let mut fields = before.split(' ').skip(3);
            let root = fields.next()?;
            let mountpoint = fields.next()?;
            let fstype = after.split(' ').next()?;
            (fstype == SSMFS_FSTYPE).then(|| LineBase {
                dir: PathBuf::from(unescape_mountinfo(mountpoint)),
                root: PathBuf::from(unescape_mountinfo(root)),
            })
        })
        .collect()
}

/// The ssmfs mount holding `canonical` (an absolute canonical path): the
/// longest mount point that contains it, as the kernel resolves it.
pub fn mount_of<'a>(canonical: &Path, mounts: &'a [LineBase]) -> Option<&'a LineBase> {
    mounts
        .iter()
        .filter(|mount| canonical.starts_with(&mount.dir))
        .max_by_key(|mount| mount.dir.as_os_str().len())
}

/// The ssmfs mounts of this process's mount namespace (none when
/// /proc cannot be read: then no change is followed, which is logged).
pub fn current_ssmfs_mounts() -> Vec<LineBase> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|text| ssmfs_mounts(&text))
        .unwrap_or_default()
}

/// Where the lines of the stream file `stream` (a `key`) land: the ssmfs
/// mount holding it, whichever directory's stream it is, or its own
/// directory when it is on none (a FIFO).
pub fn line_base_of(stream: &Path, mounts: &[LineBase]) -> LineBase {
    mount_of(stream, mounts).cloned().unwrap_or_else(|| {
        LineBase::at(
            stream
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("/")),
        )
    })
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        match octal {
            Some(digits) => {
                out.push(
                    digits
                        .iter()
                        .fold(0u8, |n, d| n.wrapping_mul(8) + (d - b'0')),
                );
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The streams a command follows, one per mount, and the channel their
/// changes arrive on.
pub struct Streams {
    /// `--changes PATH`: the only stream, whatever mounts the files are on.
    fixed: bool,
    followed: HashSet<PathBuf>,
    /// Files already said to be on no ssmfs mount (said once, not per read).
    unfollowed: HashSet<PathBuf>,
    sender: UnboundedSender<Change>,
}

impl Streams {
    /// With `--changes PATH`, follows that stream at once; otherwise each
    /// mount's stream as `follow` meets a file on it.
    pub fn new(fixed: Option<&Path>) -> (Self, UnboundedReceiver<Change>) {
        let (sender, receiver) = unbounded_channel();
        let mut streams = Self {
            fixed: fixed.is_some(),
            followed: HashSet::new(),
            unfollowed: HashSet::new(),
            sender,
        };
        if let Some(stream) = fixed {
            let stream = key(stream);
            let base = line_base_of(&stream, &current_ssmfs_mounts());
            streams.start(stream, base);
        }
        (streams, receiver)
    }

    /// Makes sure the changes of the file at `used` (a `key`) are followed.
    pub fn follow(&mut self, used: &Path, mounts: &[LineBase]) {
        if self.fixed {
            return;
        }
        match mount_of(used, mounts) {
            Some(mount) => {
                if self.followed.insert(mount.dir.clone()) {
                    self.start(mount.dir.join(CHANGES_NAME), mount.clone());
                }
            }
            None => {
                if self.unfollowed.insert(used.to_path_buf()) {
                    tracing::warn!(
                        file = %used.display(),
                        "not on an ssmfs mount: changes to it are not followed (use --changes to name a stream)"
                    );
                }
            }
        }
    }

    fn start(&mut self, stream: PathBuf, base: LineBase) {
        let sender = self.sender.clone();
        let spawned = std::thread::Builder::new()
            .name("ssmfs-changes".into())
            .spawn(move || follow_stream(&stream, &base, &sender));
        if let Err(error) = spawned {
            tracing::error!(%error, "cannot start a thread to follow changes");
        }
    }
}

/// A stream that stayed open this long was healthy: its next failure
/// starts the backoff again from the first delay.
const HEALTHY_STREAM: Duration = Duration::from_secs(30);

/// Reads `stream` line by line for as long as anyone listens. A blocking
/// read in a thread of its own: a FUSE file (or a FIFO) has no readiness a
/// runtime could wait on more cheaply, and the thread costs nothing while
/// no line comes.
fn follow_stream(stream: &Path, base: &LineBase, sender: &UnboundedSender<Change>) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        let opened_at = Instant::now();
        let outcome = match std::fs::File::open(stream) {
            Ok(file) => {
                // What changed before this open is not in the stream.
                if sender.send(Change::Dropped).is_err() {
                    return;
                }
                let mut reader = BufReader::new(file);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    match reader.read_until(b'\n', &mut line) {
                        Ok(0) => break "ended".to_string(),
                        Ok(_) => {
                            let change = parse_line(base, &line);
                            if change.is_some_and(|change| sender.send(change).is_err()) {
                                return;
                            }
                        }
                        Err(error) => break format!("failed: {error}"),
                    }
                }
            }
            Err(error) => format!("cannot be opened: {error}"),
        };
        if sender.is_closed() {
            return;
        }
        if opened_at.elapsed() >= HEALTHY_STREAM {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        tracing::warn!(
            stream = %stream.display(),
            "change stream {outcome}; opening it again in {}",
            human(delay)
        );
        std::thread::sleep(delay);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_become_absolute_paths_or_dropped() {
        let base = LineBase::at("/mnt/app".into());
        let parse = |line: &str| parse_line(&base, line.as_bytes());
        assert_eq!(
            parse("variables/db_password 7\n"),
            Some(Change::Path("/mnt/app/variables/db_password".into()))
        );
        assert_eq!(
            parse("a/b.c-d@x:y deleted\n"),
            Some(Change::Path("/mnt/app/a/b.c-d@x:y".into()))
        );
        assert_eq!(parse(crate::fs::DROPPED_LINE), Some(Change::Dropped));
        // Lines this version cannot read: look at everything again.
        for odd in [
            "",
            "novers",
            "a/b seven",
            "../etc/passwd 1",
            "/abs 1",
            "a  1",
        ] {
            assert_eq!(parse(odd), Some(Change::Dropped), "{odd:?}");
        }
        assert_eq!(
            parse_line(&base, b"caf\xe9 1\n"),
            Some(Change::Dropped),
            "not UTF-8"
        );
    }

    #[test]
    fn a_bind_mount_of_a_subdirectory_takes_its_root_off_line_paths() {
        let bind = LineBase {
            dir: "/secrets".into(),
            root: "/prod".into(),
        };
        let parse = |line: &str| parse_line(&bind, line.as_bytes());
        assert_eq!(parse("prod/db 3"), Some(Change::Path("/secrets/db".into())));
        assert_eq!(
            parse("prod/a/b deleted"),
            Some(Change::Path("/secrets/a/b".into()))
        );
        // Outside the part this mount shows: nothing here changed.
        assert_eq!(parse("staging/db 3"), None);
        assert_eq!(parse("production/db 3"), None);
        assert_eq!(parse(crate::fs::DROPPED_LINE), Some(Change::Dropped));
        assert_eq!(
            LineBase::at("/mnt/app".into()).place("prod/db"),
            Some("/mnt/app/prod/db".into())
        );
    }

    #[test]
    fn every_open_the_first_too_is_reported_as_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let stream = dir.path().join(CHANGES_NAME);
        std::fs::write(&stream, b"x 3\ncaf\xe9 4\ny deleted\n").unwrap();
        let (sender, mut receiver) = unbounded_channel();
        let base = LineBase::at(dir.path().to_path_buf());
        std::thread::spawn(move || follow_stream(&stream, &base, &sender));
        let mut next = || receiver.blocking_recv().unwrap();
        assert_eq!(next(), Change::Dropped, "what changed before the open");
        assert_eq!(next(), Change::Path(dir.path().join("x")));
        assert_eq!(next(), Change::Dropped, "a line that is not UTF-8");
        assert_eq!(next(), Change::Path(dir.path().join("y")));
    }

    #[test]
    fn a_change_concerns_its_own_file_and_dropped_all() {
        let used = Path::new("/mnt/app/db");
        assert!(Change::Path("/mnt/app/db".into()).concerns(used));
        assert!(!Change::Path("/mnt/app/db2".into()).concerns(used));
        assert!(Change::Dropped.concerns(used));
    }

    #[test]
    fn the_longest_ssmfs_mount_holds_a_file() {
        let mountinfo = "\
22 1 0:21 / /mnt rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:40 / /mnt/app rw,nosuid,nodev - fuse.ssmfs ssmfs:/app rw,user_id=0
41 40 0:41 / /mnt/app/inner rw,nosuid,nodev shared:5 master:2 - fuse.ssmfs ssmfs:/other rw
42 22 0:42 / /mnt/with\\040space rw - fuse.ssmfs ssmfs:/s rw
43 22 0:43 / /mnt/app-not rw - fuse.sshfs host:/ rw
44 22 0:40 /prod /secrets rw - fuse.ssmfs ssmfs:/app rw
";
        let mounts = ssmfs_mounts(mountinfo);
        let dirs: Vec<&Path> = mounts.iter().map(|mount| mount.dir.as_path()).collect();
        assert_eq!(
            dirs,
            [
                Path::new("/mnt/app"),
                Path::new("/mnt/app/inner"),
                Path::new("/mnt/with space"),
                Path::new("/secrets"),
            ]
        );
        assert_eq!(mounts[3].root, Path::new("/prod"));
        let root = |path: &str| mount_of(Path::new(path), &mounts).map(|mount| mount.dir.clone());
        assert_eq!(root("/mnt/app/db"), Some("/mnt/app".into()));
        assert_eq!(root("/mnt/app/inner/x/y"), Some("/mnt/app/inner".into()));
        assert_eq!(root("/mnt/with space/k"), Some("/mnt/with space".into()));
        // A sibling whose name merely starts the same is not inside.
        assert_eq!(root("/mnt/app-not/db"), None);
        assert_eq!(root("/etc/passwd"), None);
        // A subtree's stream speaks for the whole mount; a FIFO for its directory.
        assert_eq!(
            line_base_of(Path::new("/mnt/app/db/@changes"), &mounts),
            LineBase::at("/mnt/app".into())
        );
        assert_eq!(
            line_base_of(Path::new("/secrets/db/@changes"), &mounts),
            mounts[3]
        );
        assert_eq!(
            line_base_of(Path::new("/tmp/t/@changes"), &mounts),
            LineBase::at("/tmp/t".into())
        );
    }

    #[test]
    fn a_missing_file_is_keyed_by_its_canonical_directory() {
        let dir = tempfile::tempdir().unwrap();
        let canonical = dir.path().canonicalize().unwrap();
        assert_eq!(key(&dir.path().join("later")), canonical.join("later"));
        std::fs::write(dir.path().join("now"), "x").unwrap();
        assert_eq!(key(&dir.path().join("now")), canonical.join("now"));
    }
}
