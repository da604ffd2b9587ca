//! Following the `@changes` stream of the ssmfs mounts a command reads from.
//!
//! Model: a file is matched to its mount by canonicalizing it and taking
//! the longest mount point in /proc/self/mountinfo whose type is
//! `fuse.ssmfs`; each such mount's `<root>/@changes` is opened once, and a
//! thread per stream turns its lines into `Change`s (a path made absolute
//! against the stream's directory, or `Dropped`) on one channel. A stream
//! that ends or fails is reopened with backoff, and the reopen is reported
//! as `Dropped`, since lines were missed meanwhile. `--changes PATH` replaces
//! all of this with one stream whose lines are relative to PATH's directory
//! (how the tests drive it with a FIFO, and a way to follow a subtree's
//! `DIR/@changes`). Lines carry no values, only names and versions.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::{human, Backoff};

/// The file at the root of every ssmfs mount that streams its changes.
pub const STREAM_NAME: &str = "@changes";

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

/// Reads one line of the stream of the mount at `root`. A line this
/// version cannot read is taken as `Dropped`: looking again is always safe.
pub fn parse_line(root: &Path, line: &str) -> Change {
    let line = line.trim_end_matches(['\n', '\r']);
    if line == "@dropped" {
        return Change::Dropped;
    }
    let Some((path, what)) = line.split_once(' ') else {
        return Change::Dropped;
    };
    let known = what == "deleted" || (!what.is_empty() && what.bytes().all(|b| b.is_ascii_digit()));
    let relative = Path::new(path);
    // Only plain names below the root: a `..` or an absolute path would
    // point outside the mount the stream speaks for.
    let plain = !path.is_empty()
        && relative
            .components()
            .all(|component| matches!(component, Component::Normal(_)));
    if !known || !plain {
        return Change::Dropped;
    }
    Change::Path(root.join(relative))
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

/// The mount points of ssmfs mounts in a /proc/self/mountinfo text.
pub fn ssmfs_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER"
            let (before, after) = line.split_once(" - ")?;
            let mountpoint = before.split(' ').nth(4)?;
            let fstype = after.split(' ').next()?;
            (fstype == SSMFS_FSTYPE).then(|| PathBuf::from(unescape_mountinfo(mountpoint)))
        })
        .collect()
}

/// The ssmfs mount holding `canonical` (an absolute canonical path): the
/// longest mount point that contains it, as the kernel resolves it.
pub fn mount_root_of(canonical: &Path, mounts: &[PathBuf]) -> Option<PathBuf> {
    mounts
        .iter()
        .filter(|mount| canonical.starts_with(mount))
        .max_by_key(|mount| mount.as_os_str().len())
        .cloned()
}

/// The ssmfs mount points of this process's mount namespace (none when
/// /proc cannot be read: then no change is followed, which is logged).
pub fn current_ssmfs_mounts() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|text| ssmfs_mounts(&text))
        .unwrap_or_default()
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
            let root = stream
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("/"));
            streams.start(stream, root);
        }
        (streams, receiver)
    }

    /// Makes sure the changes of the file at `used` (a `key`) are followed.
    pub fn follow(&mut self, used: &Path, mounts: &[PathBuf]) {
        if self.fixed {
            return;
        }
        match mount_root_of(used, mounts) {
            Some(root) => {
                if self.followed.insert(root.clone()) {
                    self.start(root.join(STREAM_NAME), root);
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

    fn start(&mut self, stream: PathBuf, root: PathBuf) {
        let sender = self.sender.clone();
        let spawned = std::thread::Builder::new()
            .name("ssmfs-changes".into())
            .spawn(move || follow_stream(&stream, &root, &sender));
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
fn follow_stream(stream: &Path, root: &Path, sender: &UnboundedSender<Change>) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut reopened = false;
    loop {
        let opened_at = Instant::now();
        let outcome = match std::fs::File::open(stream) {
            Ok(file) => {
                if reopened && sender.send(Change::Dropped).is_err() {
                    return;
                }
                let mut reader = BufReader::new(file);
                let mut line = String::new();
                loop {
                    line.clear();
                    match reader.read_line(&mut line) {
                        Ok(0) => break "ended".to_string(),
                        Ok(_) => {
                            if sender.send(parse_line(root, &line)).is_err() {
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
        reopened = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_become_absolute_paths_or_dropped() {
        let root = Path::new("/mnt/app");
        assert_eq!(
            parse_line(root, "variables/db_password 7\n"),
            Change::Path("/mnt/app/variables/db_password".into())
        );
        assert_eq!(
            parse_line(root, "a/b.c-d@x:y deleted\n"),
            Change::Path("/mnt/app/a/b.c-d@x:y".into())
        );
        assert_eq!(parse_line(root, "@dropped\n"), Change::Dropped);
        // Lines this version cannot read: look at everything again.
        for odd in [
            "",
            "novers",
            "a/b seven",
            "../etc/passwd 1",
            "/abs 1",
            "a  1",
        ] {
            assert_eq!(parse_line(root, odd), Change::Dropped, "{odd:?}");
        }
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
";
        let mounts = ssmfs_mounts(mountinfo);
        assert_eq!(
            mounts,
            [
                PathBuf::from("/mnt/app"),
                "/mnt/app/inner".into(),
                "/mnt/with space".into()
            ]
        );
        let root = |path: &str| mount_root_of(Path::new(path), &mounts);
        assert_eq!(root("/mnt/app/db"), Some("/mnt/app".into()));
        assert_eq!(root("/mnt/app/inner/x/y"), Some("/mnt/app/inner".into()));
        assert_eq!(root("/mnt/with space/k"), Some("/mnt/with space".into()));
        // A sibling whose name merely starts the same is not inside.
        assert_eq!(root("/mnt/app-not/db"), None);
        assert_eq!(root("/etc/passwd"), None);
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
