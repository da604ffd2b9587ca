//! `--supervise`: a small process that holds the FUSE connection while the
//! serving daemon comes and goes, so a crash, a `kill -9` or an upgrade fails
//! no read.
//!
//! Model: the kernel aborts a FUSE connection only when the last holder of
//! its `/dev/fuse` file closes it. The supervisor mounts and holds that file,
//! and relays FUSE frames between it and the serving daemon (this binary with
//! `--serve-fd`) over a `SOCK_SEQPACKET` socket pair, one frame per message;
//! the daemon runs fuser unchanged on its end. The supervisor reads nothing
//! of a frame but its header: it keeps every request it forwarded until the
//! reply to it passes back, and when a daemon dies it starts the next one,
//! replays the kernel's INIT to it (the kernel negotiated once: the reply is
//! not passed on but must equal the one the kernel accepted, or the daemon
//! is not heard), and sends it every request still unanswered. An upgrade
//! (SIGUSR2) takes over only once the new daemon's reply agrees; until then,
//! and if it never does, the current daemon serves. Every
//! operation of ssmfs is read-only, so a request answered twice is harmless
//! (the kernel drops the second answer). Node ids keep their names across
//! daemons through a journal (a memfd the supervisor owns, `InodeTable::
//! with_journal`); directory handles a dead daemon gave out are listed again.
//!
//! The same holder serves the CSI driver (`crate::csi`), unprivileged: the
//! plugin mounts and hands it the connection's fd with the journal and a
//! session memfd that keeps the kernel's INIT and the accepted reply. The
//! plugin keeps copies of all three, so when a holder dies with its serving
//! side the connection lives on; the next holder reads the INIT back from
//! the session, asks the kernel to resend what the dead one had taken
//! (FUSE_NOTIFY_RESEND, Linux 6.9+), and serves on with the same inodes.
//!
//! No AWS, no cache, no parsing beyond frame headers: what is here must not
//! crash. If no daemon can be started for `--restart-deadline` (or five
//! starts in a row fail), the connection is aborted so readers get an error
//! rather than hang, and the mount is removed. Each daemon says on a pipe
//! whether it serves or why it cannot; a mount whose first daemon cannot
//! start is refused with that reason, as an unsupervised mount would be.

mod kept_streams;
mod relay;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::daemon::{self, MountSettings, Readiness};
use kept_streams::KeptStreams;
use relay::*;

use crate::handoff::{
    holder_count_envs, JOURNAL_FD, MOUNTPOINT_ENV, SERIAL_LOOKUPS_ENV, SERVE_FD, STREAMS_FD,
    STREAMS_FD_ENV, TOKEN_FD, UPGRADE_ENV, VERDICT_FD,
};

/// Why a daemon with other FUSE settings (an upgrade, or a restart after the
/// binary on disk changed) cannot take over a live connection.
const OTHER_FUSE_SETTINGS: &str = "the new binary negotiates FUSE settings other than the ones this mount was set up with, so it cannot take over the live connection; restart the service (a remount) to run it";
/// Starts that fail in a row before the supervisor gives up.
const MAX_FAILED_STARTS: u32 = 5;
/// Pause before a restart, doubled per failed start, at most 2 s: a crash is
/// answered at once, a daemon that cannot start is not restarted in a loop.
const RESTART_PAUSE: Duration = Duration::from_millis(50);
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("--supervise needs root (it mounts /dev/fuse itself)")]
    NotRoot,
    #[error("cannot mount {path}: {cause}")]
    Mount { path: String, cause: io::Error },
    #[error("cannot set up the supervisor: {0}")]
    Setup(io::Error),
    #[error("{0}")]
    GaveUp(daemon::StartFailure),
}

pub struct SupervisorSettings {
    pub mount: MountSettings,
    /// Arguments of the serving daemon (without the program name).
    pub daemon_args: Vec<OsString>,
    pub pid_file: Option<PathBuf>,
    pub restart_deadline: Duration,
    /// A connection the CSI plugin mounted, instead of mounting one.
    pub adopted: Option<Adopted>,
}

/// What a holder of a mount somebody else made is handed (`--adopt-fds`).
pub struct Adopted {
    pub fuse: OwnedFd,
    pub journal: OwnedFd,
    /// The kernel's INIT and the reply it accepted, once a daemon answered
    /// (empty before): what a later holder replays.
    pub session: OwnedFd,
    /// The web identity token the daemons read (`TOKEN_FD`), if any.
    pub token: Option<OwnedFd>,
}

impl Adopted {
    /// Takes the fds the serving side placed at `HOLDER_*_FD`, moving them
    /// out of the numbers the daemons get theirs on.
    pub fn from_handoff_fds() -> io::Result<Self> {
        use crate::handoff::{
            HOLDER_FUSE_FD, HOLDER_JOURNAL_FD, HOLDER_SESSION_FD, HOLDER_TOKEN_FD,
        };
        let take = |fd: i32| -> io::Result<OwnedFd> {
            // SAFETY: fcntl on an fd number; the original is closed once copied.
            let moved = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
            if moved < 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "--adopt-fds: nothing on fd {fd} ({})",
                        io::Error::last_os_error()
                    ),
                ));
            }
            // SAFETY: both fds are ours: the inherited one is closed, the copy owned.
            unsafe {
                libc::close(fd);
                Ok(OwnedFd::from_raw_fd(moved))
            }
        };
        // SAFETY: F_GETFD only asks whether the fd is open.
        let has_token = unsafe { libc::fcntl(HOLDER_TOKEN_FD, libc::F_GETFD) } >= 0;
        Ok(Adopted {
            fuse: take(HOLDER_FUSE_FD)?,
            journal: take(HOLDER_JOURNAL_FD)?,
            session: take(HOLDER_SESSION_FD)?,
            token: if has_token {
                Some(take(HOLDER_TOKEN_FD)?)
            } else {
                None
            },
        })
    }
}

/// An anonymous, close-on-exec memory file for the inode journal: never on
/// disk, gone with the last process holding it.
fn journal() -> io::Result<OwnedFd> {
    // SAFETY: a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"ssmfs-inodes".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn socket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: two new fds we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The signals the supervisor acts on, blocked in every thread and taken
/// with `sigtimedwait` by the main loop.
fn blocked_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGUSR2,
            libc::SIGCHLD,
        ] {
            libc::sigaddset(&mut set, signal);
        }
        set
    }
}

struct Daemon {
    child: Child,
    generation: u64,
    /// The read end of its verdict pipe, read once it has exited.
    verdict: std::fs::File,
    socket: Arc<OwnedFd>,
    /// Where it sends the change streams it opens, and gets those kept.
    streams: Arc<OwnedFd>,
    handshake: Arc<AtomicU8>,
    started: Instant,
}

impl Daemon {
    fn handshake(&self) -> u8 {
        self.handshake.load(Ordering::Acquire)
    }

    /// Why the daemon could not serve, once it has exited: its handshake
    /// differed, or it said why (None: it served, or ended without a word,
    /// as a crash or a kill does).
    fn failure(&self) -> Option<daemon::StartFailure> {
        if self.handshake() == HANDSHAKE_DIFFERS {
            return Some(daemon::StartFailure::other(OTHER_FUSE_SETTINGS));
        }
        daemon::read_verdict(&self.verdict).err().flatten()
    }
}

struct Supervisor {
    settings: SupervisorSettings,
    shared: Arc<Shared>,
    journal: OwnedFd,
    token: Option<OwnedFd>,
    binary: PathBuf,
    generation: u64,
    restarts: u64,
    handovers: u64,
    /// Time without a daemon that answered, over the mount's life.
    downtime: Duration,
    kept_streams: Arc<KeptStreams>,
}

/// Whether an accepted INIT reply body (`fuse_init_out`: major, minor,
/// max_readahead, then the flags) granted parallel lookups. Connections an
/// ssmfs before the change streams set up did not.
fn has_parallel_lookups(reply: &[u8]) -> bool {
    const FUSE_PARALLEL_DIROPS: u32 = 1 << 18;
    reply
        .get(12..16)
        .map(|flags| u32::from_ne_bytes(flags.try_into().unwrap()))
        .is_some_and(|flags| flags & FUSE_PARALLEL_DIROPS != 0)
}

impl Supervisor {
    /// Starts a daemon on a new socket and replays the kernel's INIT to it
    /// (once the first daemon answered it; its answer is checked, not
    /// passed). Requests go to it only once it is adopted.
    fn spawn_daemon(&mut self, upgrade: bool) -> io::Result<Daemon> {
        let (ours, theirs) = socket_pair()?;
        let (streams_ours, streams_theirs) = socket_pair()?;
        let streams_fd = streams_theirs.as_raw_fd();
        let (verdict, verdict_writer) = verdict_pipe()?;
        let (socket_fd, journal_fd, verdict_fd) = (
            theirs.as_raw_fd(),
            self.journal.as_raw_fd(),
            verdict_writer.as_raw_fd(),
        );
        let token_fd = self.token.as_ref().map_or(-1, |token| token.as_raw_fd());
        let serial_lookups = self
            .shared
            .relay
            .lock()
            .unwrap()
            .init_reply
            .as_deref()
            .is_some_and(|reply| !has_parallel_lookups(reply));
        let mut command = crate::handoff::command_for(&self.binary);
        if serial_lookups {
            command.env(SERIAL_LOOKUPS_ENV, "1");
        }
        // A holder the CSI driver started got its options in a memfd; its
        // daemons do too (the same binary reads them), never on a command
        // line every local user may read.
        let hidden = match crate::handoff::args_were_hidden() {
            true => Some(crate::handoff::ArgsFile::new(&self.settings.daemon_args)?),
            false => None,
        };
        let hidden_fd = hidden.as_ref().map_or(-1, |file| file.raw());
        match &hidden {
            Some(file) => command.arg(file.flag()),
            None => command.args(&self.settings.daemon_args),
        };
        command
            // Readiness is the supervisor's to report, not the daemon's.
            .env_remove("NOTIFY_SOCKET")
            .env(MOUNTPOINT_ENV, &self.settings.mount.mountpoint)
            .env(UPGRADE_ENV, if upgrade { "1" } else { "0" })
            .env(STREAMS_FD_ENV, STREAMS_FD.to_string())
            .envs(holder_count_envs([
                self.restarts,
                self.handovers,
                self.shared.resent.load(Ordering::Relaxed),
                self.downtime.as_millis() as u64,
            ]));
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(move || {
                // Out of the way first (any may already sit on 3, 4 or 5), then
                // into place: dup2 to another number clears close-on-exec.
                let socket = libc::fcntl(socket_fd, libc::F_DUPFD_CLOEXEC, 10);
                let journal = libc::fcntl(journal_fd, libc::F_DUPFD_CLOEXEC, 10);
                let verdict = libc::fcntl(verdict_fd, libc::F_DUPFD_CLOEXEC, 10);
                let token = if token_fd >= 0 {
                    libc::fcntl(token_fd, libc::F_DUPFD_CLOEXEC, 10)
                } else {
                    -1
                };
                let streams = libc::fcntl(streams_fd, libc::F_DUPFD_CLOEXEC, 10);
                if token_fd >= 0 && (token < 0 || libc::dup2(token, TOKEN_FD) < 0) {
                    return Err(io::Error::last_os_error());
                }
                if streams < 0 || libc::dup2(streams, STREAMS_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                if socket < 0
                    || journal < 0
                    || verdict < 0
                    || libc::dup2(socket, SERVE_FD) < 0
                    || libc::dup2(journal, JOURNAL_FD) < 0
                    || libc::dup2(verdict, VERDICT_FD) < 0
                {
                    return Err(io::Error::last_os_error());
                }
                if hidden_fd >= 0 {
                    crate::handoff::ArgsFile::inherit(hidden_fd)?;
                }
                // The daemon goes with the supervisor; it never outlives it.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
                Ok(())
            });
        }
        let child = command.spawn()?;
        // Only the daemon holds the write end now: its exit is the pipe's end.
        drop((theirs, verdict_writer, streams_theirs, hidden));
        self.generation += 1;
        let socket = Arc::new(ours);
        let streams = Arc::new(streams_ours);
        self.kept_streams.clone().take_from(streams.clone())?;
        {
            // Not before a daemon answered it: until then the INIT is
            // outstanding and goes with the other requests at adoption.
            let relay = self.shared.relay.lock().unwrap();
            if let (Some(init), Some(_)) = (&relay.init, &relay.init_reply) {
                let _ = write_frame(&socket, init);
            }
        }
        let handshake = Arc::new(AtomicU8::new(HANDSHAKE_PENDING));
        let (shared, replies, judged) = (self.shared.clone(), socket.clone(), handshake.clone());
        std::thread::Builder::new()
            .name("ssmfs-relay-out".into())
            .spawn(move || shared.relay_replies(replies, judged))?;
        tracing::info!(
            pid = child.id(),
            generation = self.generation,
            upgrade,
            "serving daemon started"
        );
        Ok(Daemon {
            child,
            generation: self.generation,
            verdict,
            socket,
            streams,
            handshake,
            started: Instant::now(),
        })
    }

    /// Makes `daemon` the one requests go to: every unanswered request,
    /// oldest first (the INIT itself, if no daemon answered it yet), then
    /// every new one.
    fn adopt(&mut self, daemon: &Daemon) {
        let mut relay = self.shared.relay.lock().unwrap();
        let pending: Vec<&Vec<u8>> = relay.outstanding.values().collect();
        if daemon.generation > 1 && !pending.is_empty() {
            tracing::info!(
                requests = pending.len(),
                "resending the requests the previous daemon left unanswered"
            );
            self.shared
                .resent
                .fetch_add(pending.len() as u64, Ordering::Relaxed);
        }
        for frame in pending {
            let _ = write_frame(&daemon.socket, frame);
        }
        relay.daemon_socket = Some(daemon.socket.clone());
        drop(relay);
        self.kept_streams.hand_to(&daemon.streams);
        if let Some(path) = &self.settings.pid_file {
            if let Err(error) = write_pid_file(path, daemon.child.id()) {
                tracing::warn!(path = %path.display(), %error, "could not write the pid file");
            }
        }
    }

    /// A daemon after a death (or the first): started and adopted at once.
    fn start_daemon(&mut self) -> io::Result<Daemon> {
        let daemon = self.spawn_daemon(false)?;
        self.adopt(&daemon);
        Ok(daemon)
    }
}

/// A close-on-exec pipe: (read end, write end).
fn verdict_pipe() -> io::Result<(std::fs::File, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: a fresh fd pair, each owned exactly once below.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((
            std::fs::File::from_raw_fd(fds[0]),
            OwnedFd::from_raw_fd(fds[1]),
        ))
    }
}

/// Replaces the pid file by a rename, so that a reader (systemd, a script
/// about to signal the daemon) never sees it empty or half written.
fn write_pid_file(path: &Path, pid: u32) -> std::io::Result<()> {
    let mut staging = path.as_os_str().to_owned();
    staging.push(".new");
    std::fs::write(&staging, format!("{pid}\n"))?;
    std::fs::rename(&staging, path)
}

/// The FUSE connection number of the mount at `mountpoint` (its device's
/// minor number), from /proc/self/mountinfo: no call into the mount itself.
fn connection_of(mountpoint: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let wanted = mountpoint.to_string_lossy();
    info.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        (fields.get(4) == Some(&wanted.as_ref()))
            .then(|| fields.get(2)?.split(':').nth(1).map(str::to_string))
            .flatten()
    })
}

/// Makes every waiting and future request fail at once (ENOTCONN).
fn abort_connection(mountpoint: &Path) {
    match connection_of(mountpoint) {
        Some(id) => {
            let path = format!("/sys/fs/fuse/connections/{id}/abort");
            if let Err(error) = std::fs::write(&path, "1") {
                tracing::error!(path, %error, "could not abort the FUSE connection");
            }
        }
        None => tracing::error!(mountpoint = %mountpoint.display(), "mount not found to abort"),
    }
}

pub fn run(
    mut settings: SupervisorSettings,
    readiness: &mut Readiness,
) -> Result<(), SupervisorError> {
    let adopted = settings.adopted.take();
    // SAFETY: geteuid cannot fail.
    if adopted.is_none() && unsafe { libc::geteuid() } != 0 {
        return Err(SupervisorError::NotRoot);
    }
    // Block the signals before any thread exists, so every thread inherits it.
    let signals = blocked_signals();
    // SAFETY: a valid set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut()) };
    let mountpoint = settings.mount.mountpoint.clone();
    let (fuse, journal, session, token) = match adopted {
        Some(Adopted {
            fuse,
            journal,
            session,
            token,
        }) => (fuse, journal, Some(session), token),
        None => (
            daemon::mount_device(&settings.mount).map_err(|cause| SupervisorError::Mount {
                path: mountpoint.display().to_string(),
                cause,
            })?,
            self::journal().map_err(SupervisorError::Setup)?,
            None,
            None,
        ),
    };
    let resumed = match &session {
        Some(session) => load_session(session).map_err(SupervisorError::Setup)?,
        None => None,
    };
    let holds_own_mount = session.is_none();
    let resuming = resumed.is_some();
    let shared = Arc::new(Shared {
        fuse,
        relay: Mutex::new(Relay {
            outstanding: BTreeMap::new(),
            init: resumed.as_ref().map(|(init, _)| init.clone()),
            init_reply: resumed.map(|(_, reply)| reply),
            daemon_socket: None,
        }),
        initialized: AtomicBool::new(resuming),
        answers: AtomicU64::new(0),
        resent: AtomicU64::new(0),
        unmounted: AtomicBool::new(false),
        session,
    });
    if resuming {
        // The holder before this one may have taken requests it never
        // passed on: the kernel queues them again, for this one.
        match request_resend(&shared.fuse) {
            Ok(()) => tracing::info!("resumed a live FUSE connection; asked the kernel to resend what the last holder had taken"),
            Err(error) => tracing::warn!(%error, "resumed a live FUSE connection, but the kernel refused FUSE_NOTIFY_RESEND (before Linux 6.9): requests the last holder had taken stay unanswered"),
        }
    }
    let mut supervisor = Supervisor {
        binary: crate::handoff::executable().map_err(SupervisorError::Setup)?,
        journal,
        token,
        settings,
        shared: shared.clone(),
        generation: 0,
        restarts: 0,
        handovers: 0,
        downtime: Duration::ZERO,
        kept_streams: Arc::default(),
    };
    let reader = shared.clone();
    std::thread::Builder::new()
        .name("ssmfs-relay-in".into())
        .spawn(move || reader.relay_requests())
        .map_err(SupervisorError::Setup)?;
    let outcome = supervise(&mut supervisor, &signals, readiness);
    daemon::sd_notify("STOPPING=1");
    // An adopted mount is the plugin's to remove (and it holds the
    // connection still): this holder only stops serving it.
    if holds_own_mount && daemon::is_mount_point(&mountpoint) {
        let _ = daemon::lazy_unmount(&mountpoint);
    }
    if let Some(mut daemon) = outcome.1 {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(daemon.child.id() as i32, libc::SIGTERM) };
        let _ = daemon.child.wait();
    }
    outcome.0
}

/// The restart loop. Returns how it ended and the daemon still running.
fn supervise(
    supervisor: &mut Supervisor,
    signals: &libc::sigset_t,
    readiness: &mut Readiness,
) -> (Result<(), SupervisorError>, Option<Daemon>) {
    let mountpoint = supervisor.settings.mount.mountpoint.clone();
    let deadline = supervisor.settings.restart_deadline;
    let mut current: Option<Daemon> = None;
    let mut failed_starts = 0u32;
    // Why the last daemon that could not start said so, for the final word.
    let mut last_failure: Option<daemon::StartFailure> = None;
    let mut without_daemon_since: Option<Instant> = Some(Instant::now());
    let mut ready_said = false;
    // Daemons replaced by an upgrade, reaped once they exit.
    let mut retiring: Vec<Daemon> = Vec::new();
    // The daemon an upgrade started, until its handshake is judged.
    let mut upgrading: Option<Daemon> = None;
    loop {
        retiring.retain_mut(|old| !matches!(old.child.try_wait(), Ok(Some(_))));
        // No daemon has answered since this long (one may be starting, or
        // hanging at its start): past the deadline, readers get an error.
        let down_for = without_daemon_since.map_or(Duration::ZERO, |t| t.elapsed());
        if failed_starts >= MAX_FAILED_STARTS || down_for > deadline {
            if let Some(mut daemon) = current.take() {
                let _ = daemon.child.kill();
                let _ = daemon.child.wait();
            }
            if supervisor.shared.session.is_none() {
                abort_connection(&mountpoint);
            }
            let last = last_failure.as_ref().map_or(String::new(), |failure| {
                format!("; the last said: {failure}")
            });
            let why = format!(
                    "no serving daemon for {:.1} s ({failed_starts} failed starts in a row{last}); aborted the FUSE connection so readers get an error instead of waiting",
                    down_for.as_secs_f64()
                );
            let identity_refused = last_failure.is_some_and(|failure| failure.identity_refused);
            return (
                Err(SupervisorError::GaveUp(daemon::StartFailure {
                    why,
                    identity_refused,
                })),
                None,
            );
        }
        if current.is_none() {
            if failed_starts > 0 {
                std::thread::sleep(
                    (RESTART_PAUSE * 2u32.pow(failed_starts.min(6))).min(Duration::from_secs(2)),
                );
            }
            match supervisor.start_daemon() {
                Ok(daemon) => current = Some(daemon),
                Err(error) => {
                    tracing::error!(%error, binary = %supervisor.binary.display(), "cannot start the serving daemon");
                    failed_starts += 1;
                    continue;
                }
            }
        }
        if !ready_said && supervisor.shared.initialized.load(Ordering::Acquire) {
            ready_said = true;
            readiness.ready();
            readiness.detach_stdio();
            tracing::info!(mountpoint = %mountpoint.display(), "mounted (supervised)");
        }
        if current.is_some() && supervisor.shared.answers.load(Ordering::Relaxed) > 0 {
            if let Some(since) = without_daemon_since.take() {
                let gap = since.elapsed();
                supervisor.downtime += gap;
                if supervisor.generation > 1 {
                    tracing::info!(
                        without_daemon_ms = gap.as_millis() as u64,
                        "the new daemon answers"
                    );
                }
            }
        }
        // Signals, then what the relay threads saw.
        let timeout = libc::timespec {
            tv_sec: 0,
            tv_nsec: 50_000_000,
        };
        // SAFETY: valid set and timeout; no siginfo wanted.
        let signal = unsafe { libc::sigtimedwait(signals, std::ptr::null_mut(), &timeout) };
        match signal {
            libc::SIGTERM | libc::SIGINT => {
                tracing::info!("stopping: unmounting and ending the serving daemon");
                return (Ok(()), current);
            }
            libc::SIGHUP => {
                if let Some(daemon) = &current {
                    // SAFETY: signalling our own child.
                    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGHUP) };
                }
            }
            libc::SIGUSR2 if upgrading.is_some() => {
                tracing::warn!("upgrade already under way; SIGUSR2 ignored");
            }
            libc::SIGUSR2 if !ready_said => {
                tracing::warn!("the mount is not serving yet; SIGUSR2 ignored");
            }
            // The new daemon serves only once its handshake agrees with
            // the kernel's; until then the current one does.
            libc::SIGUSR2 => match supervisor.spawn_daemon(true) {
                Ok(next) => upgrading = Some(next),
                Err(error) => {
                    tracing::error!(%error, "upgrade failed: cannot start the new daemon; the current one keeps serving")
                }
            },
            _ => {}
        }
        if let Some(mut next) = upgrading.take() {
            match (next.handshake(), next.child.try_wait()) {
                (HANDSHAKE_AGREED, _) => {
                    supervisor.adopt(&next);
                    supervisor.handovers += 1;
                    if let Some(old) = current.replace(next) {
                        // Its unanswered requests went to the new daemon too;
                        // whichever answers first is heard.
                        // SAFETY: signalling our own child.
                        unsafe { libc::kill(old.child.id() as i32, libc::SIGTERM) };
                        retiring.push(old);
                    }
                    tracing::info!(
                        "upgrade: the serving daemon was replaced by the binary on disk"
                    );
                }
                (HANDSHAKE_DIFFERS, _) => {
                    let _ = next.child.kill();
                    retiring.push(next);
                    tracing::error!("{OTHER_FUSE_SETTINGS}; the current daemon keeps serving");
                }
                (_, Ok(Some(status))) => {
                    let reason = next
                        .failure()
                        .map_or_else(|| "no reason given".into(), |failure| failure.why);
                    tracing::error!(%status, reason, "upgrade failed: the new daemon exited before it could serve; the current one keeps serving");
                }
                _ if next.started.elapsed() > deadline => {
                    let _ = next.child.kill();
                    retiring.push(next);
                    tracing::error!("upgrade abandoned: the new daemon did not answer within --restart-deadline; the current one keeps serving");
                }
                _ => upgrading = Some(next),
            }
        }
        // Reap whatever exited (SIGCHLD was blocked, so children are zombies),
        // after ending a daemon whose handshake the kernel's settings refuse.
        if let Some(daemon) = current.as_mut() {
            if daemon.handshake() == HANDSHAKE_DIFFERS {
                let _ = daemon.child.kill();
                let _ = daemon.child.wait();
            }
            if let Ok(Some(status)) = daemon.child.try_wait() {
                let served = supervisor.shared.answers.load(Ordering::Relaxed) > 0;
                let failure = daemon.failure();
                if let (false, Some(why)) = (ready_said, &failure) {
                    // The first daemon could not start (no access, a queue
                    // that does not exist): a mount that never served is
                    // refused with its reason, as an unsupervised one is
                    // (the unmount and the supervisor's exit end the connection).
                    return (Err(SupervisorError::GaveUp(why.clone())), None);
                }
                let reason = failure
                    .as_ref()
                    .map_or("no reason given (killed or crashed)", |failure| {
                        failure.why.as_str()
                    });
                tracing::warn!(%status, generation = daemon.generation, reason, "the serving daemon exited; starting another");
                last_failure = if served {
                    None
                } else {
                    failure.or(last_failure)
                };
                // A daemon that never answered did not start; one that did
                // crashed later, and its successor starts with a clean slate.
                failed_starts = if served { 0 } else { failed_starts + 1 };
                supervisor.restarts += 1;
                supervisor.shared.answers.store(0, Ordering::Relaxed);
                without_daemon_since.get_or_insert_with(Instant::now);
                supervisor.shared.relay.lock().unwrap().daemon_socket = None;
                current = None;
            }
        }
        if supervisor.shared.unmounted.load(Ordering::Acquire) {
            tracing::info!("unmounted; stopping");
            return (Ok(()), current);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_without_parallel_lookups_is_taken_over_without_them() {
        let reply = |flags: u32| {
            let mut body = vec![0u8; 64];
            body[12..16].copy_from_slice(&flags.to_ne_bytes());
            body
        };
        assert!(has_parallel_lookups(&reply(1 << 18 | 1)));
        assert!(!has_parallel_lookups(&reply(1)));
        assert!(!has_parallel_lookups(&[0u8; 8]));
    }
}
