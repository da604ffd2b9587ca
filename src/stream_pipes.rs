//! The write ends of change streams (`@changes`, see `crate::fs` `changes`).
//!
//! Model: a stream is a named pipe the core numbers; the kernel keeps one pipe
//! per inode, whoever opens it and through whichever bind mount. Before the
//! reader's LOOKUP is answered, the daemon opens that very inode itself,
//! through its own mount (`MOUNT/@stream/NUMBER`, answered to this process
//! only), read-write so the open never waits for a reader and the reader's
//! open never waits for a writer. From then on the kernel does the rest:
//! blocking reads, `O_NONBLOCK`, poll/select/epoll, and 64 KiB of buffer per
//! reader; the daemon only writes a line per change and spends nothing while
//! nothing changes.
//!
//! A writer task per stream: it writes each covered note as one line (a
//! write of at most PIPE_BUF bytes is whole or not at all), and when the pipe
//! is full it drops notes and writes `@dropped` once the reader catches up.
//! After a short grace (the reader's open follows its lookup at once) the
//! read-write end is closed; when the last reader closes, the write end
//! reports an error (EPOLLERR, no polling) and the stream ends.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::broadcast::error::RecvError;

use crate::fs::{Fs, StreamSpec, DROPPED_LINE, STREAM_DIR_NAME};
use crate::store::ParameterStore;

/// How long the daemon's own read-write end stays open after the reader's
/// lookup: its open follows at once (it is the same system call), so this
/// only bounds what a lookup without an open (`stat @changes`) holds.
const ATTACH_GRACE: Duration = Duration::from_secs(5);

/// Set (by the CSI driver's serving side) to the plugin's stream socket: a
/// daemon that runs unprivileged may not walk into its own mount (its root
/// directory belongs to the tenant's uid and modes), so the plugin, root,
/// opens each stream's end for it and hands it over.
pub const STREAM_OPENER_ENV: &str = "SSMFS_STREAM_OPENER";

/// Who opens a stream's read-write end.
enum Opener {
    /// This daemon, through its own mount.
    Mount(PathBuf),
    /// The CSI plugin, asked over its stream socket for the end below the
    /// shared mount at `mountpoint`.
    Plugin {
        socket: PathBuf,
        mountpoint: PathBuf,
    },
}

impl Opener {
    fn open_read_write(&self, ino: u64) -> io::Result<OwnedFd> {
        match self {
            Opener::Mount(mountpoint) => {
                open_pipe(&mountpoint.join(STREAM_DIR_NAME).join(ino.to_string()))
            }
            Opener::Plugin { socket, mountpoint } => {
                let link = crate::fd_link::connect(socket)?;
                let request = serde_json::json!({
                    "op": "open-stream",
                    "mountpoint": mountpoint,
                    "ino": ino,
                });
                crate::fd_link::send(&link, &request, &[])?;
                match crate::fd_link::receive(&link)? {
                    Some((_, mut fds)) if fds.len() == 1 => Ok(fds.remove(0)),
                    Some((answer, _)) => Err(io::Error::other(
                        answer["error"]
                            .as_str()
                            .unwrap_or("the plugin sent no stream")
                            .to_string(),
                    )),
                    None => Err(io::Error::other("the plugin closed the stream socket")),
                }
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Opener::Mount(mountpoint) => format!("through the mount {}", mountpoint.display()),
            Opener::Plugin { socket, .. } => format!("from the CSI plugin at {}", socket.display()),
        }
    }
}

/// Opens and feeds the write ends of one mount's streams.
pub struct StreamPipes {
    opener: Opener,
    /// The holder's keeper of streams (`handoff::STREAMS_FD`), under
    /// `--supervise` and the CSI driver: it keeps a copy of each write end,
    /// so a reader blocked on a stream outlives this daemon, and hands the
    /// next daemon the streams to write on.
    keeper: Option<OwnedFd>,
    failure_logged: AtomicBool,
}

impl StreamPipes {
    pub fn new(mountpoint: PathBuf) -> Arc<Self> {
        let opener = match std::env::var_os(STREAM_OPENER_ENV) {
            Some(socket) => Opener::Plugin {
                socket: socket.into(),
                mountpoint,
            },
            None => Opener::Mount(mountpoint),
        };
        Arc::new(Self {
            opener,
            keeper: take_keeper(),
            failure_logged: AtomicBool::new(false),
        })
    }

    /// Writes on the streams the holder kept from the daemons before this
    /// one (each starts with `@dropped`: what changed meanwhile is unknown),
    /// for as long as the holder sends them.
    pub fn adopt_kept<S: ParameterStore>(
        self: &Arc<Self>,
        fs: Arc<Fs<S>>,
        runtime: tokio::runtime::Handle,
    ) -> io::Result<()> {
        if self.keeper.is_none() {
            return Ok(());
        }
        let pipes = self.clone();
        std::thread::Builder::new()
            .name("ssmfs-streams".into())
            .spawn(move || {
                let keeper = pipes.keeper.as_ref().expect("checked above");
                while let Ok(Some((message, mut fds))) = crate::fd_link::receive(keeper) {
                    let (Some(stream), Some(write_only)) =
                        (StreamSpec::from_json(&message), fds.pop())
                    else {
                        continue;
                    };
                    let _entered = runtime.enter();
                    fs.adopt_stream(stream.clone());
                    let notes = fs.subscribe_changes();
                    spawn_writer(fs.clone(), stream, None, write_only, notes);
                }
            })?;
        Ok(())
    }

    /// Opens the write end of `stream` and starts its writer. The stream
    /// starts here: notes from now on are its.
    pub async fn attach<S: ParameterStore>(
        self: &Arc<Self>,
        fs: &Arc<Fs<S>>,
        stream: StreamSpec,
    ) -> io::Result<()> {
        let notes = fs.subscribe_changes();
        // Both opens make FUSE requests of this very daemon (a lookup, and a
        // getattr for the permission check), whoever makes them: off the
        // runtime's workers, so they stay free to answer them. The second,
        // write-only end goes through /proc: once the read-write one is
        // closed, it alone reports that no reader is left.
        let pipes = self.clone();
        let ino = stream.ino;
        let opened = tokio::task::spawn_blocking(move || {
            let read_write = pipes.opener.open_read_write(ino)?;
            let write_only = reopen_write_only(&read_write)?;
            Ok::<_, io::Error>((read_write, write_only))
        })
        .await
        .map_err(io::Error::other)
        .and_then(|result| result);
        let (read_write, write_only) = match opened {
            Ok(ends) => ends,
            Err(error) => {
                fs.close_stream(stream.ino);
                if !self.failure_logged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%error, "cannot open a change stream's write end {}; @changes answers EIO", self.opener.describe());
                }
                return Err(error);
            }
        };
        if let Some(keeper) = &self.keeper {
            let kept = crate::fd_link::send(keeper, &stream.to_json(), &[write_only.as_raw_fd()]);
            if let Err(error) = kept {
                tracing::debug!(%error, "the holder did not take a stream; it ends with this daemon");
            }
        }
        spawn_writer(fs.clone(), stream, Some(read_write), write_only, notes);
        Ok(())
    }
}

/// The holder's end of the streams socket, if it handed one down.
fn take_keeper() -> Option<OwnedFd> {
    std::env::var_os(crate::handoff::STREAMS_FD_ENV)?;
    let fd = crate::handoff::STREAMS_FD;
    // SAFETY: F_GETFD only asks whether the fd is open; F_SETFD marks it
    // close-on-exec (no child of the daemon needs it).
    unsafe {
        if libc::fcntl(fd, libc::F_GETFD) < 0 {
            return None;
        }
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        // SAFETY: the holder handed this fd to this process alone.
        Some(OwnedFd::from_raw_fd(fd))
    }
}

/// Feeds `stream` until its last reader is gone. A stream a reader just
/// opened comes with the daemon's read-write end (`read_write`); one kept
/// from an earlier daemon does not, and starts with `@dropped`.
fn spawn_writer<S: ParameterStore>(
    fs: Arc<Fs<S>>,
    stream: StreamSpec,
    read_write: Option<OwnedFd>,
    write_only: OwnedFd,
    notes: tokio::sync::broadcast::Receiver<crate::fs::ChangeNote>,
) {
    tokio::spawn(async move {
        let ino = stream.ino;
        let dropped = read_write.is_none();
        let fed = feed(stream, read_write, write_only, notes, ATTACH_GRACE, dropped).await;
        if let Err(error) = fed {
            tracing::debug!(ino, %error, "change stream ended");
        }
        fs.close_stream(ino);
    });
}

fn open_pipe(path: &std::path::Path) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    open_fd(&c_path, libc::O_RDWR)
}

fn reopen_write_only(fd: &OwnedFd) -> io::Result<OwnedFd> {
    let path = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
    open_fd(&path, libc::O_WRONLY)
}

/// Opens `path` non-blocking and close-on-exec, with `access`.
fn open_fd(path: &std::ffi::CStr, access: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: a valid NUL-terminated path; the fd is owned below.
    let fd = unsafe { libc::open(path.as_ptr(), access | libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just opened, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether `line` went into the pipe whole (false: the pipe is full).
fn write_line(fd: &AsyncFd<OwnedFd>, line: &[u8]) -> io::Result<bool> {
    // SAFETY: a valid buffer and an fd we own.
    let written = unsafe { libc::write(fd.as_raw_fd(), line.as_ptr().cast(), line.len()) };
    if written < 0 {
        let error = io::Error::last_os_error();
        return match error.kind() {
            io::ErrorKind::WouldBlock => Ok(false),
            _ => Err(error), // EPIPE: the last reader is gone
        };
    }
    Ok(true)
}

async fn feed(
    stream: StreamSpec,
    mut read_write: Option<OwnedFd>,
    write_only: OwnedFd,
    mut notes: tokio::sync::broadcast::Receiver<crate::fs::ChangeNote>,
    grace: Duration,
    mut dropped: bool,
) -> io::Result<()> {
    // SAFETY: an OwnedFd keeps the same open fd for the AsyncFd's life.
    let pipe = unsafe {
        AsyncFd::register_with_interest(write_only, Interest::WRITABLE | Interest::ERROR)
    }
    .map_err(|error| error.into_parts().1)?;
    let grace = tokio::time::sleep(grace);
    tokio::pin!(grace);
    loop {
        tokio::select! {
            () = &mut grace, if read_write.is_some() => read_write = None,
            // EPOLLERR on a pipe's write end: no reader is left.
            ready = pipe.ready(Interest::ERROR), if read_write.is_none() => {
                drop(ready?);
                return Ok(());
            }
            note = notes.recv() => match note {
                Ok(note) if stream.covers(&note) => {
                    // One write: `@dropped` goes in only with the note after
                    // it, so a reader never gets two with nothing between.
                    let line = note.line();
                    let line = if dropped { format!("{DROPPED_LINE}{line}") } else { line };
                    dropped = !write_line(&pipe, line.as_bytes())?;
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => dropped = true,
                Err(RecvError::Closed) => return Ok(()),
            },
            guard = pipe.writable(), if dropped => {
                let mut guard = guard?;
                // Only once the reader made room for a whole line after it.
                if room(&pipe) >= libc::PIPE_BUF && write_line(&pipe, DROPPED_LINE.as_bytes())? {
                    dropped = false;
                } else {
                    guard.clear_ready();
                }
            }
        }
    }
}

/// Free bytes in the pipe behind `fd`.
fn room(fd: &AsyncFd<OwnedFd>) -> usize {
    let raw = fd.as_raw_fd();
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int; F_GETPIPE_SZ takes no argument.
    let (size, queued) = unsafe {
        let size = libc::fcntl(raw, libc::F_GETPIPE_SZ);
        libc::ioctl(raw, libc::FIONREAD, &mut queued);
        (size, queued)
    };
    usize::try_from(size - queued).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::{ChangeKind, ChangeNote};
    use std::io::Read;

    fn pipe() -> (std::fs::File, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: a valid array of two fds.
        assert_eq!(
            unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) },
            0
        );
        // SAFETY: just created, owned here.
        unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                OwnedFd::from_raw_fd(fds[1]),
            )
        }
    }

    fn note(path: &str, version: i64) -> ChangeNote {
        ChangeNote {
            path: path.into(),
            kind: ChangeKind::Version(version),
        }
    }

    fn drain(reader: &mut std::fs::File) -> String {
        let mut text = Vec::new();
        let mut buffer = [0u8; 65536];
        loop {
            match reader.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => text.extend_from_slice(&buffer[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        String::from_utf8(text).unwrap()
    }

    type Feeding = tokio::task::JoinHandle<io::Result<()>>;

    /// A writer feeding a stream of `dir` into a fresh pipe, as just opened
    /// (with its read-write end, no grace): the read end, where notes go in,
    /// and the task.
    fn start_feed(
        dir: &str,
    ) -> (
        std::fs::File,
        tokio::sync::broadcast::Sender<ChangeNote>,
        Feeding,
    ) {
        let (reader, writer) = pipe();
        let read_write = writer.try_clone().unwrap();
        let (sender, notes) = tokio::sync::broadcast::channel(4096);
        let stream = StreamSpec::for_dir(crate::fs::STREAM_DIR_INO + 1, dir);
        let task = tokio::spawn(feed(
            stream,
            Some(read_write),
            writer,
            notes,
            Duration::ZERO,
            false,
        ));
        (reader, sender, task)
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_that_falls_behind_gets_one_dropped_line_then_goes_on() {
        let (mut reader, sender, task) = start_feed("");
        // 1,000-byte lines: the 64 KiB pipe holds about 65 of them.
        let long = "p".repeat(1000);
        for version in 1..=200 {
            sender.send(note(&long, version)).unwrap();
        }
        settle().await;
        let mut text = drain(&mut reader);
        // Room again: the reader is told that it missed some, once.
        settle().await;
        sender.send(note("after", 7)).unwrap();
        settle().await;
        text.push_str(&drain(&mut reader));
        let lines: Vec<&str> = text.lines().collect();
        let kept = lines.len() - 2;
        assert!((60..200).contains(&kept), "{kept} lines kept");
        let odd: Vec<&str> = lines[..kept]
            .iter()
            .filter(|l| !(l.starts_with(&long) && l.len() < 1010))
            .map(|l| &l[l.len().saturating_sub(20)..])
            .collect();
        assert!(odd.is_empty(), "{odd:?}");
        assert_eq!(lines[kept..], ["@dropped", "after 7"]);
        // The last reader closes: the writer ends without being told.
        drop(reader);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the stream ends when its reader is gone")
            .unwrap()
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_writes_only_what_it_covers() {
        let (mut reader, sender, _task) = start_feed("db");
        sender.send(note("db/password", 3)).unwrap();
        sender.send(note("other", 4)).unwrap();
        sender
            .send(ChangeNote {
                path: "db/old".into(),
                kind: ChangeKind::Deleted,
            })
            .unwrap();
        settle().await;
        assert_eq!(drain(&mut reader), "db/password 3\ndb/old deleted\n");
    }
}
