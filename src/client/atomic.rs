//! Replacing a file atomically (`write_atomically`): a hidden temporary
//! file in its directory, fsync, mode and owner, rename; and removing the
//! temporary files a killed process left behind. Used by `render`.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use zeroize::Zeroizing;

/// The mode of a new output when no MODE is given: owner-only, since a
/// rendered file usually holds a secret.
const DEFAULT_MODE: u32 = 0o600;

/// `--owner UID[:GID]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: Option<u32>,
}

/// Replaces DEST with `bytes` unless it holds them already; `Ok(true)`
/// when it was replaced. Atomic: readers see the old file or the new one.
pub fn write_atomically(
    dest: &Path,
    bytes: &[u8],
    mode: Option<u32>,
    owner: Option<Owner>,
) -> std::io::Result<bool> {
    let existing = match std::fs::read(dest) {
        Ok(bytes) => Some(Zeroizing::new(bytes)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => return Err(error),
    };
    let metadata = existing.as_ref().and_then(|_| std::fs::metadata(dest).ok());
    let mode = mode
        .or(metadata.as_ref().map(|meta| meta.mode() & 0o7777))
        .unwrap_or(DEFAULT_MODE);
    if let (Some(existing), Some(meta)) = (&existing, &metadata) {
        if existing.as_slice() == bytes {
            // Same bytes: a different mode or owner is set in place; no
            // rename, so watchers are not told of a change there is not.
            if let Some(owner) = owner {
                if meta.uid() != owner.uid || owner.gid.is_some_and(|gid| gid != meta.gid()) {
                    std::os::unix::fs::chown(dest, Some(owner.uid), owner.gid)?;
                }
            }
            if meta.mode() & 0o7777 != mode {
                std::fs::set_permissions(dest, std::fs::Permissions::from_mode(mode))?;
            }
            return Ok(false);
        }
    }
    let dir = dir_of(dest);
    let name = dest
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "names no file"))?;
    // Hidden, so a watcher of `*.conf` does not pick up the half-written
    // one; a random suffix and O_EXCL, so no other file is ever written
    // through (a leftover, or a link planted in a shared directory).
    let temp = dir.join(format!(
        "{}{:016x}",
        temp_prefix(name),
        rand::random::<u64>()
    ));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(bytes)?;
        if let Some(owner) = owner {
            std::os::unix::fs::fchown(&file, Some(owner.uid), owner.gid)?;
        }
        // After chown, which clears set-id bits.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        std::fs::rename(&temp, dest)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written?;
    // So the rename itself survives a crash. DEST is written either way:
    // readers see the new file, and the command must run for it.
    if let Err(error) = std::fs::File::open(dir).and_then(|dir| dir.sync_all()) {
        tracing::warn!(
            "{} is written, but syncing its directory failed: {error}",
            dest.display()
        );
    }
    Ok(true)
}

/// The start of the name of DEST's temporary files: `.{DEST name}.ssmfs-render-`.
fn temp_prefix(dest_name: &std::ffi::OsStr) -> String {
    format!(".{}.ssmfs-render-", dest_name.to_string_lossy())
}

/// Removes the temporary files an earlier render of `dest` left in its
/// directory (killed between create and rename): each holds an old
/// rendering, secrets and all.
pub fn remove_leftover_temps(dest: &Path) {
    let (dir, Some(name)) = (dir_of(dest), dest.file_name()) else {
        return;
    };
    let prefix = temp_prefix(name);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => tracing::info!(
                    "removed {}, left over by an earlier render",
                    entry.path().display()
                ),
                Err(error) => tracing::warn!(
                    "cannot remove {}, left over by an earlier render: {error}",
                    entry.path().display()
                ),
            }
        }
    }
}

/// The directory a DEST is in (`.` for a bare name).
pub(super) fn dir_of(dest: &Path) -> &Path {
    match dest.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftover_temporary_files_of_a_dest_are_removed_and_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.conf");
        let leftover = dir.path().join(".out.conf.ssmfs-render-1234");
        std::fs::write(&leftover, "old secret").unwrap();
        let other = dir.path().join(".other.conf.ssmfs-render-1234");
        std::fs::write(&other, "x").unwrap();
        remove_leftover_temps(&dest);
        assert!(!leftover.exists());
        assert!(other.exists(), "another DEST's file is not ours");
    }

    #[test]
    fn writes_replace_only_changed_bytes_with_the_mode_asked() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.conf");
        assert!(write_atomically(&dest, b"one", None, None).unwrap());
        let mode = |path: &Path| std::fs::metadata(path).unwrap().mode() & 0o7777;
        assert_eq!(mode(&dest), DEFAULT_MODE);
        let inode = std::fs::metadata(&dest).unwrap().ino();
        assert!(!write_atomically(&dest, b"one", None, None).unwrap());
        assert_eq!(
            std::fs::metadata(&dest).unwrap().ino(),
            inode,
            "not replaced"
        );
        // Same bytes, another mode: set in place.
        assert!(!write_atomically(&dest, b"one", Some(0o640), None).unwrap());
        assert_eq!(mode(&dest), 0o640);
        assert!(write_atomically(&dest, b"two", None, None).unwrap());
        assert_eq!(std::fs::read(&dest).unwrap(), b"two");
        assert_eq!(mode(&dest), 0o640, "the present mode is kept");
        assert_ne!(
            std::fs::metadata(&dest).unwrap().ino(),
            inode,
            "renamed over"
        );
        // As root (CI), the owner is set too; elsewhere chown is not ours.
        if unsafe { libc::geteuid() } == 0 {
            let owner = Some(Owner {
                uid: 4321,
                gid: Some(4322),
            });
            assert!(write_atomically(&dest, b"three", None, owner).unwrap());
            let meta = std::fs::metadata(&dest).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (4321, 4322));
            assert_eq!(mode(&dest), 0o640, "chown keeps the mode asked");
        }
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }
}
