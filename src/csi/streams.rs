//! The plugin's stream socket: the write end of a change stream (`@changes`,
//! see `crate::stream_pipes`) for a serving daemon that may not open it.
//!
//! Model: a daemon of the serving side runs as the serving user, and its
//! mount's root directory belongs to the tenant's uid and modes, so it cannot
//! walk into its own mount to open `@stream/NUMBER`. It asks here instead:
//! the plugin, root, checks that the peer is the serving user and that the
//! path is one of its own shared mounts, opens the end (the daemon answers
//! that lookup, as it answers only its own threads and root), and sends the
//! fd back. The numbers are random, so one daemon cannot name another
//! tenant's stream; and an end open for writing reads nothing.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use serde_json::json;

use super::control;
use super::node::Driver;
use super::sys;
use crate::fs::{STREAM_DIR_INO, STREAM_DIR_NAME};

/// Requests served at once: each waits for a daemon's answer to a lookup,
/// and a stuck daemon must not take every thread the plugin can start.
const MAX_IN_FLIGHT: usize = 32;
/// How long a connected peer has to send its request.
const REQUEST_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The socket's path in the plugin's run directory.
pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join("streams.sock")
}

/// Listens on the stream socket (owned by the serving user, as the control
/// socket is) and serves each request on a thread of its own.
pub fn listen(driver: Arc<Driver>, run_dir: &Path, owner: (u32, u32)) -> std::io::Result<()> {
    let listener = control::listen(&socket_path(run_dir), Some(owner))?;
    let slots = Arc::new(Slots::default());
    std::thread::Builder::new()
        .name("ssmfs-csi-streams".into())
        .spawn(move || loop {
            let link = match control::accept(&listener) {
                Ok(link) => link,
                Err(error) => {
                    tracing::error!(%error, "the stream socket failed");
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    continue;
                }
            };
            // Past the limit, the next request waits its turn (in the
            // socket's backlog): slower under a flood, never refused.
            slots.take();
            let (driver, worker_slots) = (driver.clone(), slots.clone());
            let spawned = std::thread::Builder::new()
                .name("ssmfs-csi-stream".into())
                .spawn(move || {
                    answer(&link, open_for(&driver, &link));
                    worker_slots.give_back();
                });
            if let Err(error) = spawned {
                slots.give_back();
                tracing::error!(%error, "cannot serve a stream request");
            }
        })?;
    Ok(())
}

/// Requests in flight, at most `MAX_IN_FLIGHT`.
#[derive(Default)]
struct Slots {
    taken: Mutex<usize>,
    freed: Condvar,
}

impl Slots {
    fn take(&self) {
        let mut taken = self.taken.lock().unwrap();
        while *taken >= MAX_IN_FLIGHT {
            taken = self.freed.wait(taken).unwrap();
        }
        *taken += 1;
    }

    fn give_back(&self) {
        *self.taken.lock().unwrap() -= 1;
        self.freed.notify_one();
    }
}

fn answer(link: &OwnedFd, outcome: Result<OwnedFd, String>) {
    let sent = match outcome {
        Ok(end) => control::send(link, &json!({"ok": true}), &[end.as_raw_fd()]),
        Err(why) => {
            tracing::debug!(why, "refused a stream request");
            control::send(link, &json!({"error": why}), &[])
        }
    };
    if let Err(error) = sent {
        tracing::debug!(%error, "a daemon left before its stream was sent");
    }
}

/// The read-write end a daemon asked for, or why not.
fn open_for(driver: &Driver, link: &OwnedFd) -> Result<OwnedFd, String> {
    let peer = sys::peer_credentials(link).map_err(|e| format!("unknown peer: {e}"))?;
    let serving = driver.serving_uid();
    if peer.uid != serving && peer.uid != 0 {
        return Err(format!("only the serving user (uid {serving}) may ask"));
    }
    // A daemon sends its request as soon as it connects: a peer that stays
    // silent would hold one of the MAX_IN_FLIGHT slots for good, and 32 of
    // them every stream of the node.
    control::set_receive_timeout(link, REQUEST_WAIT).map_err(|e| e.to_string())?;
    let (request, _) = control::receive(link)
        .map_err(|e| e.to_string())?
        .ok_or("no request")?;
    let request = parse_request(&request)?;
    if !driver.is_shared_mountpoint(&request.mountpoint) {
        return Err("not a shared mount of this plugin".into());
    }
    open_stream_end(&request.mountpoint, request.ino)
        .map_err(|e| format!("cannot open the stream: {e}"))
}
#[derive(Debug, PartialEq, Eq)]
struct StreamRequest {
    mountpoint: PathBuf,
    ino: u64,
}

/// A request as a daemon sends it: `{"op": "open-stream", "mountpoint":
/// PATH, "ino": NUMBER}`, the number in the streams' range.
fn parse_request(message: &serde_json::Value) -> Result<StreamRequest, String> {
    if message["op"] != "open-stream" {
        return Err("not a stream request".into());
    }
    let mountpoint = message["mountpoint"]
        .as_str()
        .filter(|path| Path::new(path).is_absolute())
        .ok_or("no absolute mountpoint")?;
    let ino = message["ino"]
        .as_u64()
        .filter(|ino| *ino > STREAM_DIR_INO)
        .ok_or("no stream number")?;
    Ok(StreamRequest {
        mountpoint: PathBuf::from(mountpoint),
        ino,
    })
}

/// Opens `@stream/INO` below the mount at `mountpoint` read-write, as root.
/// The daemon answers the lookups on the way, so nothing it says is trusted:
/// the walk stays below the mount, on it, and follows no link (openat2), and
/// what it opens must be a named pipe; anything else is refused, so a daemon
/// cannot lead root to open some other file for it.
fn open_stream_end(mountpoint: &Path, ino: u64) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let root = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(mountpoint)?;
    let relative = PathBuf::from(format!("{STREAM_DIR_NAME}/{ino}"));
    let end = super::sys::open_beneath_with(
        &OwnedFd::from(root),
        &relative,
        libc::O_RDWR | libc::O_NONBLOCK | libc::O_NOCTTY,
        libc::RESOLVE_NO_XDEV,
    )?;
    let file = std::fs::File::from(end);
    if !file.metadata()?.file_type().is_fifo() {
        return Err(std::io::Error::other("not a change stream (no named pipe)"));
    }
    Ok(file.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_stream_number_below_an_absolute_path_is_asked_for() {
        let good = json!({"op": "open-stream", "mountpoint": "/var/lib/x/mounts/k", "ino": STREAM_DIR_INO + 5});
        assert_eq!(
            parse_request(&good),
            Ok(StreamRequest {
                mountpoint: "/var/lib/x/mounts/k".into(),
                ino: STREAM_DIR_INO + 5
            })
        );
        for bad in [
            json!({"op": "start", "mountpoint": "/m", "ino": STREAM_DIR_INO + 5}),
            json!({"op": "open-stream", "mountpoint": "relative", "ino": STREAM_DIR_INO + 5}),
            json!({"op": "open-stream", "mountpoint": "/m", "ino": 7}),
            json!({"op": "open-stream", "mountpoint": "/m", "ino": STREAM_DIR_INO}),
            json!({"op": "open-stream", "mountpoint": "/m", "ino": "1"}),
            json!({"op": "open-stream", "ino": STREAM_DIR_INO + 5}),
        ] {
            assert!(parse_request(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn root_opens_only_a_named_pipe_below_the_mount_and_follows_no_link() {
        let mount = tempfile::tempdir().unwrap();
        let streams = mount.path().join(STREAM_DIR_NAME);
        std::fs::create_dir(&streams).unwrap();
        let number = |n: u64| (STREAM_DIR_INO + n).to_string();
        let fifo = std::ffi::CString::new(streams.join(number(1)).to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        std::fs::write(streams.join(number(2)), "a secret file").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", streams.join(number(3))).unwrap();
        std::os::unix::fs::symlink(streams.join(number(1)), streams.join(number(4))).unwrap();
        assert!(open_stream_end(mount.path(), STREAM_DIR_INO + 1).is_ok());
        for refused in 2..=5 {
            assert!(
                open_stream_end(mount.path(), STREAM_DIR_INO + refused).is_err(),
                "{refused}"
            );
        }
        // A link in place of the directory is not followed either.
        let other = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(&streams, other.path().join(STREAM_DIR_NAME)).unwrap();
        assert!(open_stream_end(other.path(), STREAM_DIR_INO + 1).is_err());
    }
}
