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
