//! A link that carries fds between processes of ssmfs: one `SOCK_SEQPACKET`
//! unix socket, one JSON message per packet, with the fds it speaks of
//! attached (SCM_RIGHTS). Used by the CSI plugin and its serving side (the
//! plugin listens; the serving side connects, and again after the plugin
//! restarts, saying first which connections it holds, with copies of their
//! fds, so whichever side survives hands the other what it needs), and by a
//! serving daemon asking the plugin for the write end of a change stream
//! (`crate::stream_pipes`). Nothing secret travels here but the token memfd,
//! as an fd.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use serde_json::Value;

/// Fds one message may carry: a connection's four. A packet with more is
/// refused whole, and the kernel closes what it could not pass.
const MAX_FDS: usize = 8;
/// Bigger than any message (daemon arguments of one volume), and what one
/// `receive` takes whatever the peer sends: a longer packet is refused
/// (MSG_TRUNC), never read in parts. The parsed value is bounded with it,
/// and so is its depth (serde_json stops at 128 levels).
const MAX_MESSAGE: usize = 256 * 1024;

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn address(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path too long: {}", path.display()),
        ));
    }
    for (slot, byte) in addr.sun_path.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

/// Listens at `path` (replacing a stale socket file), mode 0600, owned by
/// `owner` so that only the serving side's user may connect.
pub fn listen(path: &Path, owner: Option<(u32, u32)>) -> io::Result<OwnedFd> {
    let _ = std::fs::remove_file(path);
    let fd = socket()?;
    let (addr, len) = address(path)?;
    // SAFETY: a valid socket and address.
    if unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    }
    // SAFETY: a bound socket.
    if unsafe { libc::listen(fd.as_raw_fd(), 4) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

pub fn accept(listener: &OwnedFd) -> io::Result<OwnedFd> {
    loop {
        // SAFETY: a listening socket; no peer address wanted.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: a new fd we own.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EINTR) {
            return Err(error);
        }
    }
}

pub fn connect(path: &Path) -> io::Result<OwnedFd> {
    let fd = socket()?;
    let (addr, len) = address(path)?;
    // SAFETY: a valid socket and address.
    if unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Makes a `receive` on `socket` that waits longer than `wait` fail
/// (EAGAIN), for a peer that must speak first and at once; `Duration::ZERO`
/// lets it wait again without end.
pub fn set_receive_timeout(socket: &OwnedFd, wait: std::time::Duration) -> io::Result<()> {
    let wait = libc::timeval {
        tv_sec: wait.as_secs() as libc::time_t,
        tv_usec: wait.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a valid socket and a timeval of the right size.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&wait as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends one message with `fds` attached.
pub fn send(socket: &OwnedFd, message: &Value, fds: &[RawFd]) -> io::Result<()> {
    let body = serde_json::to_vec(message).map_err(io::Error::other)?;
    send_bytes(socket, &body, fds)
}

/// One packet of any bytes with `fds` attached (what a hostile peer sends,
/// in the tests).
fn send_bytes(socket: &OwnedFd, body: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: body.as_ptr() as *mut libc::c_void,
        iov_len: body.len(),
    };
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut control = vec![0u8; space.max(1)];
    // SAFETY: an all-zero msghdr is valid; every pointer set below outlives the call.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    if !fds.is_empty() {
        header.msg_control = control.as_mut_ptr().cast();
        header.msg_controllen = space as _;
        // SAFETY: the control buffer has room for one header and `fds`.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&header);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
        }
    }
    loop {
        // SAFETY: a valid socket and message header.
        let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &header, libc::MSG_NOSIGNAL) };
        if sent >= 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EINTR) {
            return Err(error);
        }
    }
}

/// The next message and the fds that came with it; `None` once the peer
/// closed its end (or sent an empty packet without fds, which reads the
/// same). A packet is whole or absent (SOCK_SEQPACKET): a message cut
/// short cannot arrive, and garbage, a packet past `MAX_MESSAGE` or one with
/// more than `MAX_FDS` fds is an error, its fds closed. Blocks only while
/// the peer, connected, sends nothing.
pub fn receive(socket: &OwnedFd) -> io::Result<Option<(Value, Vec<OwnedFd>)>> {
    let mut body = vec![0u8; MAX_MESSAGE];
    let mut iov = libc::iovec {
        iov_base: body.as_mut_ptr().cast(),
        iov_len: body.len(),
    };
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) };
    let mut control = vec![0u8; space as usize];
    // SAFETY: an all-zero msghdr is valid; every pointer set below outlives the call.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.as_mut_ptr().cast();
    header.msg_controllen = space as _;
    let received = loop {
        // SAFETY: a valid socket and message header.
        let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut header, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EINTR) {
            return Err(error);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote into `control`.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&header);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for index in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(
                        data.add(index),
                    )));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&header, cmsg);
        }
    }
    // Cut short: fds the kernel could not pass are closed, or the message
    // is partial. Neither is acted on (the fds received so far close here).
    if header.msg_flags & (libc::MSG_CTRUNC | libc::MSG_TRUNC) != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a control message was truncated (too many fds or bytes)",
        ));
    }
    if received == 0 && fds.is_empty() {
        return Ok(None);
    }
    let message = serde_json::from_slice(&body[..received]).map_err(io::Error::other)?;
    Ok(Some((message, fds)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: a valid array for two fds.
        let made = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(made, 0, "{}", io::Error::last_os_error());
        // SAFETY: new fds we own.
        let (ours, theirs) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A receive that would block fails instead (EAGAIN) after a while:
        // a test can see a stall rather than hang.
        set_receive_timeout(&theirs, std::time::Duration::from_secs(5)).unwrap();
        // Room for packets past the limit, so the kernel does not refuse
        // them first.
        let room: libc::c_int = 4 * MAX_MESSAGE as libc::c_int;
        // SAFETY: a valid socket and an int option.
        unsafe {
            libc::setsockopt(
                ours.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&room as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            );
        }
        (ours, theirs)
    }

    /// A pipe's read end and `n` copies of its write end: once every copy
    /// is closed, wherever it went, the read end sees the end of file.
    fn witnessed_fds(n: usize) -> (std::fs::File, Vec<OwnedFd>) {
        let mut ends = [0; 2];
        // SAFETY: a valid array for two fds.
        assert_eq!(
            unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) },
            0
        );
        // SAFETY: new fds we own.
        let (read, write) =
            unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
        let copies = (0..n).map(|_| write.try_clone().unwrap()).collect();
        (std::fs::File::from(read), copies)
    }

    /// Whether every write end of `read`'s pipe is closed (not blocking: a
    /// leaked copy would keep the pipe open).
    fn all_closed(read: &std::fs::File) -> bool {
        let mut poll = libc::pollfd {
            fd: read.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut poll, 1, 0) };
        poll.revents & libc::POLLHUP != 0
    }

    fn hostile_body() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..2048),
            // Near JSON: a message as the plugin gets them, cut or bent.
            (
                r#"\{"op": ?"(have|hello|started|open-stream)", ?"id": ?"[a-z0-9]{0,8}"(, ?"ino": ?-?[0-9]{1,25})?\}"#,
                any::<prop::sample::Index>(),
                0usize..3,
            )
                .prop_map(|(text, cut, how)| {
                    let bytes = text.into_bytes();
                    match how {
                        0 => bytes,
                        1 => bytes[..cut.index(bytes.len() + 1)].to_vec(),
                        _ => [bytes.as_slice(), b"\xff\x00"].concat(),
                    }
                }),
            // Deep nesting, past serde_json's limit.
            (1usize..20_000).prop_map(|depth| "[".repeat(depth).into_bytes()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any packet, with any number of fds: a message and exactly its
        /// fds only when the bytes are JSON and the fds within the limit;
        /// otherwise an error, at once, and every fd that came is closed.
        #[test]
        fn any_packet_is_a_message_or_an_error_and_never_leaks_an_fd(
            body in hostile_body(),
            fd_count in prop_oneof![Just(0usize), 1usize..=MAX_FDS, MAX_FDS + 1..MAX_FDS + 8],
        ) {
            let (ours, theirs) = pair();
            let (witness, copies) = witnessed_fds(fd_count);
            let raw: Vec<RawFd> = copies.iter().map(|fd| fd.as_raw_fd()).collect();
            send_bytes(&ours, &body, &raw).unwrap();
            drop(copies);
            let started = std::time::Instant::now();
            let received = receive(&theirs);
            prop_assert!(started.elapsed() < std::time::Duration::from_secs(2));
            let json = serde_json::from_slice::<Value>(&body).is_ok();
            match received {
                Ok(Some((message, fds))) => {
                    prop_assert!(json && fd_count <= MAX_FDS);
                    prop_assert_eq!(message, serde_json::from_slice::<Value>(&body).unwrap());
                    prop_assert_eq!(fds.len(), fd_count);
                }
                Ok(None) => prop_assert!(body.is_empty() && fd_count == 0),
                Err(error) => {
                    prop_assert!(!json || fd_count > MAX_FDS, "{}", error);
                    prop_assert!(error.raw_os_error().is_none(), "not the socket's: {}", error);
                }
            }
            prop_assert!(all_closed(&witness), "an fd that came was kept");
        }
    }

    #[test]
    fn a_packet_past_the_limit_is_refused_whole_and_the_next_is_read() {
        let (ours, theirs) = pair();
        let exact = format!("\"{}\"", "a".repeat(MAX_MESSAGE - 2));
        send_bytes(&ours, exact.as_bytes(), &[]).unwrap();
        let (message, _) = receive(&theirs).unwrap().unwrap();
        assert_eq!(message.as_str().unwrap().len(), MAX_MESSAGE - 2);
        let (witness, copies) = witnessed_fds(2);
        let raw: Vec<RawFd> = copies.iter().map(|fd| fd.as_raw_fd()).collect();
        // Its first MAX_MESSAGE bytes alone would be a valid message.
        let long = format!("{{\"op\": \"stop\"}}{}", " ".repeat(MAX_MESSAGE));
        send_bytes(&ours, long.as_bytes(), &raw).unwrap();
        drop(copies);
        let error = receive(&theirs).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
        assert!(all_closed(&witness), "the refused packet's fds were kept");
        // The rest of the long packet is not read as a message of its own.
        send(&ours, &serde_json::json!({"op": "hello"}), &[]).unwrap();
        let (message, _) = receive(&theirs).unwrap().unwrap();
        assert_eq!(message["op"], "hello");
    }

    #[test]
    fn a_peer_that_goes_is_the_end_not_a_wait() {
        let (ours, theirs) = pair();
        send(&ours, &serde_json::json!({"op": "hello"}), &[]).unwrap();
        drop(ours);
        assert!(receive(&theirs).unwrap().is_some(), "what came before");
        let started = std::time::Instant::now();
        assert!(receive(&theirs).unwrap().is_none());
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }
}
