//! The relay's frames and state: FUSE frames read and written one per
//! message, the requests forwarded and not answered yet (`Relay`), what
//! the holder's threads share (`Shared`), and the session memfd that keeps
//! the kernel's INIT and the accepted reply for the next holder.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

/// Big enough for any frame the kernel sends (1 MiB writes are not
/// negotiated: ssmfs is read-only) and for every reply.
pub(super) const FRAME_BUFFER: usize = 1 << 20 | 4096;

pub(super) const FUSE_FORGET: u32 = 2;
pub(super) const FUSE_INIT: u32 = 26;
pub(super) const FUSE_INTERRUPT: u32 = 36;
pub(super) const FUSE_BATCH_FORGET: u32 = 42;
/// The notification that moves every request a reader took and did not
/// answer back to the kernel's queue (protocol 7.40, Linux 6.9).
pub(super) const FUSE_NOTIFY_RESEND: i32 = 7;

/// Requests forwarded and not answered yet, by `unique`, and what to send
/// them to.
pub(super) struct Relay {
    pub(super) outstanding: BTreeMap<u64, Vec<u8>>,
    pub(super) init: Option<Vec<u8>>,
    /// The body of the INIT reply the kernel accepted: what every later
    /// daemon's reply to the replayed INIT must be, byte for byte.
    pub(super) init_reply: Option<Vec<u8>>,
    pub(super) daemon_socket: Option<Arc<OwnedFd>>,
}

/// A daemon's FUSE handshake as the supervisor judged it.
pub(super) const HANDSHAKE_PENDING: u8 = 0;
pub(super) const HANDSHAKE_AGREED: u8 = 1;
/// It negotiated other settings than the kernel holds (a binary with other
/// FUSE capabilities): it must not serve this connection.
pub(super) const HANDSHAKE_DIFFERS: u8 = 2;

pub(super) struct Shared {
    pub(super) fuse: OwnedFd,
    pub(super) relay: Mutex<Relay>,
    /// Set when the kernel answered the first INIT reply: the mount serves.
    pub(super) initialized: AtomicBool,
    /// The last time any daemon answered a request.
    pub(super) answers: AtomicU64,
    pub(super) resent: AtomicU64,
    /// Set when the kernel ended the connection (unmounted).
    pub(super) unmounted: AtomicBool,
    /// Where the INIT and its reply are kept for the next holder (adopted).
    pub(super) session: Option<OwnedFd>,
}

pub(super) fn header(frame: &[u8]) -> Option<(u32, u64)> {
    let opcode = u32::from_ne_bytes(frame.get(4..8)?.try_into().ok()?);
    let unique = u64::from_ne_bytes(frame.get(8..16)?.try_into().ok()?);
    Some((opcode, unique))
}

/// A reply's header has its error where a request's has the opcode; the
/// request id is in the same place.
pub(super) fn reply_unique(frame: &[u8]) -> Option<u64> {
    header(frame).map(|(_, unique)| unique)
}

pub(super) fn write_frame(fd: &OwnedFd, frame: &[u8]) -> io::Result<()> {
    // SAFETY: a valid fd and buffer.
    let written = unsafe { libc::write(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
    if written < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub(super) fn read_frame(fd: &OwnedFd, buffer: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: a valid fd and buffer.
        let n = unsafe { libc::read(fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let error = io::Error::last_os_error();
        match error.raw_os_error() {
            // ENOENT: the request was interrupted before we read it.
            Some(libc::EINTR | libc::EAGAIN | libc::ENOENT) => continue,
            _ => return Err(error),
        }
    }
}

impl Shared {
    /// Kernel -> daemon: every request is kept until answered.
    pub(super) fn relay_requests(self: Arc<Self>) {
        let mut buffer = vec![0u8; FRAME_BUFFER];
        loop {
            let n = match read_frame(&self.fuse, &mut buffer) {
                Ok(n) => n,
                Err(error) => {
                    if error.raw_os_error() != Some(libc::ENODEV) {
                        tracing::error!(%error, "reading /dev/fuse failed");
                    }
                    self.unmounted.store(true, Ordering::Release);
                    return;
                }
            };
            let frame = buffer[..n].to_vec();
            let Some((opcode, unique)) = header(&frame) else {
                continue;
            };
            let socket = {
                let mut relay = self.relay.lock().unwrap();
                if opcode == FUSE_INIT && relay.init.is_none() {
                    relay.init = Some(frame.clone());
                }
                if !matches!(opcode, FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT) {
                    relay.outstanding.insert(unique, frame.clone());
                }
                relay.daemon_socket.clone()
            };
            // A send to a daemon that just died is lost; the request stays
            // outstanding and goes to its successor.
            if let Some(socket) = socket {
                let _ = write_frame(&socket, &frame);
            }
        }
    }

    /// Daemon -> kernel: the first answer to a request passes; notifications
    /// (unique 0) pass; answers to requests already answered are dropped. A
    /// daemon's answer to the replayed INIT is checked against the one the
    /// kernel accepted; a daemon that disagrees is not heard any further.
    pub(super) fn relay_replies(self: Arc<Self>, socket: Arc<OwnedFd>, handshake: Arc<AtomicU8>) {
        let mut buffer = vec![0u8; FRAME_BUFFER];
        loop {
            let n = match read_frame(&socket, &mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let frame = &buffer[..n];
            let Some(unique) = reply_unique(frame) else {
                continue;
            };
            if unique != 0 {
                let mut relay = self.relay.lock().unwrap();
                let Some(request) = relay.outstanding.remove(&unique) else {
                    let init_unique = relay.init.as_deref().and_then(header).map(|(_, u)| u);
                    if init_unique == Some(unique)
                        && handshake.load(Ordering::Acquire) == HANDSHAKE_PENDING
                    {
                        let agreed = relay.init_reply.as_deref() == frame.get(16..);
                        let verdict = if agreed {
                            HANDSHAKE_AGREED
                        } else {
                            HANDSHAKE_DIFFERS
                        };
                        handshake.store(verdict, Ordering::Release);
                        if !agreed {
                            return;
                        }
                        // A daemon that agreed is serving, requests or not.
                        self.answers.store(now_millis(), Ordering::Relaxed);
                    }
                    continue; // answered already, or the replayed INIT
                };
                if header(&request).is_some_and(|(opcode, _)| opcode == FUSE_INIT) {
                    relay.init_reply = frame.get(16..).map(<[u8]>::to_vec);
                    handshake.store(HANDSHAKE_AGREED, Ordering::Release);
                    self.initialized.store(true, Ordering::Release);
                    if let Some(session) = &self.session {
                        if let Err(error) = save_session(session, &request, frame) {
                            tracing::error!(%error, "could not keep the FUSE session for the next holder");
                        }
                    }
                }
            }
            self.answers.store(now_millis(), Ordering::Relaxed);
            // ENOENT: the kernel gave up on the request (interrupted).
            let _ = write_frame(&self.fuse, frame);
        }
    }
}

/// Writes `[len][INIT][len][reply body]` into the session memfd.
pub(super) fn save_session(session: &OwnedFd, init: &[u8], reply: &[u8]) -> io::Result<()> {
    let body = reply.get(16..).unwrap_or_default();
    let mut bytes = Vec::with_capacity(8 + init.len() + body.len());
    for part in [init, body] {
        bytes.extend_from_slice(&(part.len() as u32).to_ne_bytes());
        bytes.extend_from_slice(part);
    }
    // SAFETY: a valid fd and buffer.
    let written =
        unsafe { libc::pwrite(session.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
    if written != bytes.len() as isize {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The INIT and the accepted reply body a previous holder kept, if any.
pub(super) fn load_session(session: &OwnedFd) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let mut bytes = vec![0u8; 64 * 1024];
    // SAFETY: a valid fd and buffer.
    let n = unsafe {
        libc::pread(
            session.as_raw_fd(),
            bytes.as_mut_ptr().cast(),
            bytes.len(),
            0,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    bytes.truncate(n as usize);
    let mut parts = Vec::new();
    let mut rest = &bytes[..];
    while parts.len() < 2 {
        let Some(len) = rest
            .get(..4)
            .map(|b| u32::from_ne_bytes(b.try_into().unwrap()) as usize)
        else {
            return Ok(None);
        };
        let Some(part) = rest.get(4..4 + len) else {
            return Ok(None);
        };
        parts.push(part.to_vec());
        rest = &rest[4 + len..];
    }
    let reply = parts.pop().unwrap_or_default();
    Ok(parts.pop().map(|init| (init, reply)))
}

/// Asks the kernel to queue again every request a reader of this connection
/// took and did not answer: a dead holder's, here.
pub(super) fn request_resend(fuse: &OwnedFd) -> io::Result<()> {
    let mut frame = [0u8; 16];
    frame[..4].copy_from_slice(&16u32.to_ne_bytes());
    frame[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    write_frame(fuse, &frame)
}

pub(super) fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
