//! What a holder of a FUSE connection hands the daemon that serves it: the
//! fd numbers the daemon finds its frames, the inode journal and its verdict
//! pipe on, and the environment that says how it was started. `--supervise`
//! is one such holder; a serving daemon reads the same few facts whoever
//! started it, so it depends on this module and on no holder.

use std::os::fd::RawFd;

/// The socket a serving daemon reads FUSE frames from (`--serve-fd`).
pub const SERVE_FD: RawFd = 3;
/// The inode journal shared by every daemon of one mount.
pub const JOURNAL_FD: RawFd = 4;
/// The pipe a serving daemon writes its verdict on: "ok" once it serves, or
/// why it cannot start (the same words an unsupervised mount would print).
pub const VERDICT_FD: RawFd = 5;
/// The web identity token a daemon of a CSI volume assumes its role with
/// (a memfd the plugin rewrites at each republish; `/proc/self/fd/6`).
pub const TOKEN_FD: RawFd = 6;

/// The holder's keeper of change streams (`crate::stream_pipes`): a socket
/// the daemon sends each stream's write end on, and receives the streams of
/// the daemon before it on, so a blocked reader outlives a restart.
pub const STREAMS_FD: RawFd = 7;
/// Set (to `STREAMS_FD`) where the holder keeps streams.
pub const STREAMS_FD_ENV: &str = "SSMFS_STREAMS_FD";

/// Set to "1" for a daemon that takes over a connection an earlier ssmfs
/// set up without parallel lookups (FUSE_PARALLEL_DIROPS): its INIT reply
/// must match the one the kernel accepted, so it asks for none either, and
/// it answers `@changes` with EIO (its own lookup would wait behind the
/// reader's) until the mount is made again. A holder from before the change
/// streams sets neither this nor `STREAMS_FD_ENV`: the daemon infers it.
pub const SERIAL_LOOKUPS_ENV: &str = "SSMFS_SERIAL_LOOKUPS";

/// What a holder of a mount the CSI plugin made finds at start
/// (`--supervise --adopt-fds`): the FUSE connection, the inode journal, the
/// session (INIT and reply), its own verdict pipe, and the token (optional).
pub const HOLDER_FUSE_FD: RawFd = 3;
pub const HOLDER_JOURNAL_FD: RawFd = 4;
pub const HOLDER_SESSION_FD: RawFd = 5;
pub const HOLDER_VERDICT_FD: RawFd = 6;
pub const HOLDER_TOKEN_FD: RawFd = 7;

/// The running ssmfs binary, open read-only, which the CSI plugin hands its
/// serving side (and that side its holders) to execute as
/// `/proc/self/fd/9`: the binary's path is never resolved as the serving
/// user (it may lie in a directory only root may enter), and what runs is
/// the file the plugin opened, whatever is renamed onto that path since.
pub const EXECUTABLE_FD: RawFd = 9;
/// Set (to `EXECUTABLE_FD`) where that fd was handed down.
pub const EXECUTABLE_FD_ENV: &str = "SSMFS_EXECUTABLE_FD";

/// What to execute to run this binary again: the fd handed down, if any,
/// else the binary's own path.
pub fn executable() -> std::io::Result<std::path::PathBuf> {
    let handed_down = std::env::var(EXECUTABLE_FD_ENV).ok() == Some(EXECUTABLE_FD.to_string())
        // SAFETY: F_GETFD only reads the fd's flags.
        && unsafe { libc::fcntl(EXECUTABLE_FD, libc::F_GETFD) } >= 0;
    match handed_down {
        true => Ok(format!("/proc/self/fd/{EXECUTABLE_FD}").into()),
        false => std::env::current_exe(),
    }
}

/// A command that runs this binary again (`executable`), under the name
/// this process was started as (so `ps` shows a path, not an fd).
pub fn command_for(executable: &std::path::Path) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    let mut command = std::process::Command::new(executable);
    if let Some(name) = std::env::args_os().next() {
        command.arg0(name);
    }
    command
}

/// The mount point as the holder resolved it (absolute, no symlinks), for a
/// daemon that must not look at the mount point itself: its name for the
/// mount (the events queue's) is then the same as an unsupervised one's.
pub const MOUNTPOINT_ENV: &str = "SSMFS_SUPERVISED_MOUNTPOINT";
/// Set to "1" for a daemon an upgrade starts (while the current one serves),
/// "0" for one started after a death or at mount.
pub const UPGRADE_ENV: &str = "SSMFS_SUPERVISOR_UPGRADE";
/// The holder's counts a daemon reports as its own metrics, in the order of
/// `Metrics::supervisor`: restarts, handovers, resent requests, downtime (ms).
pub const COUNT_ENVS: [&str; 4] = [
    "SSMFS_SUPERVISOR_RESTARTS",
    "SSMFS_SUPERVISOR_HANDOVERS",
    "SSMFS_SUPERVISOR_RESENT",
    "SSMFS_SUPERVISOR_DOWNTIME_MS",
];

/// The environment that hands `counts` (in `COUNT_ENVS`' order) to a daemon.
pub fn holder_count_envs(counts: [u64; 4]) -> impl Iterator<Item = (&'static str, String)> {
    COUNT_ENVS
        .into_iter()
        .zip(counts.map(|count| count.to_string()))
}

/// Whether this serving daemon was started by an upgrade: the daemon it
/// replaces still serves (and records inodes) until the handover.
pub fn started_by_upgrade() -> bool {
    std::env::var(UPGRADE_ENV).is_ok_and(|v| v == "1")
}

/// The holder's counts handed to this daemon, if it was started by one.
pub fn holder_counts() -> Option<[u64; 4]> {
    let count = |name: &str| std::env::var(name).ok()?.parse::<u64>().ok();
    let [a, b, c, d] = COUNT_ENVS.map(count);
    Some([a?, b?, c?, d?])
}

/// Names the fd that holds the rest of a command line (`--args-fd=N`,
/// NUL-separated). The CSI driver starts its holders and daemons this way:
/// their role, session name, namespace and paths would be in
/// `/proc/PID/cmdline`, which every local user can read.
pub const ARGS_FD_FLAG: &str = "--args-fd=";

/// Where an args file is placed: far above the numbers the fd contracts
/// here use, so the moves between fork and exec never land on it.
const ARGS_FD_FLOOR: RawFd = 64;

/// A command line in a memfd, for a child that gets `ArgsFile::flag()`.
pub struct ArgsFile(std::os::fd::OwnedFd);

impl ArgsFile {
    pub fn new<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::io::Result<Self> {
        use std::io::Write;
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: a NUL-terminated name; the fd returned is owned below.
        let fd = unsafe { libc::memfd_create(c"ssmfs-args".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: just created, owned here.
        let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut file = std::fs::File::from(memfd);
        for arg in args {
            file.write_all(arg.as_ref().as_bytes())?;
            file.write_all(b"\0")?;
        }
        // SAFETY: a valid fd; the copy returned is owned below.
        let high = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD_CLOEXEC, ARGS_FD_FLOOR) };
        if high < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: just duplicated, owned here.
        Ok(ArgsFile(unsafe { OwnedFd::from_raw_fd(high) }))
    }

    pub fn raw(&self) -> RawFd {
        use std::os::fd::AsRawFd;
        self.0.as_raw_fd()
    }

    /// The argument that tells the child where its command line is.
    pub fn flag(&self) -> String {
        format!("{ARGS_FD_FLAG}{}", self.raw())
    }

    /// The strings an `ArgsFile` handed down as fd `fd` holds, read whole;
    /// the fd is closed after. Zeroed when dropped: it may hold a key.
    pub fn read(fd: RawFd) -> std::io::Result<Vec<zeroize::Zeroizing<Vec<u8>>>> {
        use std::io::{Read, Seek};
        use std::os::fd::FromRawFd;
        // SAFETY: F_GETFD only reads the fd's flags.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(std::io::Error::other(format!("fd {fd}: no such fd")));
        }
        // SAFETY: the fd was handed to this process for this, checked
        // above; it is owned (and closed) here.
        let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.seek(std::io::SeekFrom::Start(0))?;
        let mut bytes = zeroize::Zeroizing::new(Vec::new());
        file.read_to_end(&mut bytes)?;
        // The last NUL ends the last string: no empty one after it.
        let text = bytes.strip_suffix(&[0]).unwrap_or(&bytes);
        if text.is_empty() {
            return Ok(Vec::new());
        }
        Ok(text
            .split(|b| *b == 0)
            .map(|part| zeroize::Zeroizing::new(part.to_vec()))
            .collect())
    }

    /// Between fork and exec (async-signal-safe): lets `raw` through exec.
    pub fn inherit(raw: RawFd) -> std::io::Result<()> {
        // SAFETY: fcntl on an fd number is async-signal-safe.
        if unsafe { libc::fcntl(raw, libc::F_SETFD, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

static ARGS_WERE_HIDDEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The command line with `--args-fd=N` replaced by what fd N holds (which
/// is then closed).
pub fn expand_args(args: Vec<std::ffi::OsString>) -> std::io::Result<Vec<std::ffi::OsString>> {
    use std::os::unix::ffi::OsStringExt;
    let mut out = Vec::with_capacity(args.len());
    for arg in args {
        let Some(number) = arg.to_str().and_then(|a| a.strip_prefix(ARGS_FD_FLAG)) else {
            out.push(arg);
            continue;
        };
        let fd: RawFd = number
            .parse()
            .ok()
            .filter(|fd| *fd >= ARGS_FD_FLOOR)
            .ok_or_else(|| {
                std::io::Error::other(format!("{ARGS_FD_FLAG}{number}: not an args fd"))
            })?;
        out.extend(
            ArgsFile::read(fd)?
                .iter()
                .map(|arg| std::ffi::OsString::from_vec(arg.to_vec())),
        );
        ARGS_WERE_HIDDEN.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(out)
}

/// Whether this process's own arguments came through `--args-fd`: its
/// children then get theirs the same way.
pub fn args_were_hidden() -> bool {
    ARGS_WERE_HIDDEN.load(std::sync::atomic::Ordering::Relaxed)
}
