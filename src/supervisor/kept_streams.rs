//! The change streams a holder keeps (see `crate::stream_pipes`): a copy of
//! the write end of every `@changes` pipe its daemons opened, with what each
//! covers. While a copy is here, a reader blocked on the stream sees no end
//! of file when its daemon dies; the next daemon gets every stream that still
//! has a reader and writes on it.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

/// The write ends of the change streams daemons opened (`stream_pipes`),
/// with what each covers: while a copy is here, a reader blocked on it sees
/// no end of file when its daemon dies, and the next daemon writes on it.
/// A stream whose last reader left is dropped when the next one comes in
/// or at a handover (its end then reports an error).
#[derive(Default)]
pub(super) struct KeptStreams {
    streams: Mutex<Vec<(serde_json::Value, OwnedFd)>>,
}

impl KeptStreams {
    fn keep(&self, stream: serde_json::Value, end: OwnedFd) {
        let mut streams = self.streams.lock().unwrap();
        streams.retain(|(_, end)| has_reader(end));
        streams.push((stream, end));
    }

    /// Hands `daemon` every stream that still has a reader.
    pub(super) fn hand_to(&self, daemon: &OwnedFd) {
        let mut streams = self.streams.lock().unwrap();
        streams.retain(|(_, end)| has_reader(end));
        for (stream, end) in streams.iter() {
            if let Err(error) = crate::fd_link::send(daemon, stream, &[end.as_raw_fd()]) {
                tracing::warn!(%error, "could not hand a change stream to the serving daemon");
                return;
            }
        }
    }

    /// Takes the streams `daemon` opens, until it exits.
    pub(super) fn take_from(self: Arc<Self>, daemon: Arc<OwnedFd>) -> io::Result<()> {
        std::thread::Builder::new()
            .name("ssmfs-streams-in".into())
            .spawn(move || {
                while let Ok(Some((stream, mut ends))) = crate::fd_link::receive(&daemon) {
                    if let (Some(end), true) = (ends.pop(), ends.is_empty()) {
                        self.keep(stream, end);
                    }
                }
            })?;
        Ok(())
    }
}

/// Whether a pipe's write end still has a reader (no EPOLLERR).
fn has_reader(end: &OwnedFd) -> bool {
    let mut poll = libc::pollfd {
        fd: end.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready < 0 || poll.revents & libc::POLLERR == 0
}
