//! The process around the mount: the fork into the background with a pipe
//! that carries the daemon's verdict back to the waiting parent, readiness
//! reports (to that parent and to systemd), and hardening against leaks of
//! secrets through core dumps, ptrace and swap.

use std::ffi::CString;
use std::io::Write;

use super::{sd_notify, DaemonError};

/// Which side of the fork this process is.
pub enum Forked {
    /// The original process: the daemon's verdict (the mount is ready, or why
    /// not), for it to report and exit with.
    Parent(Result<(), StartFailure>),
    /// The daemon, with the channel to report its verdict through.
    Daemon(Readiness),
}

/// Background mode: forks before any thread exists. The parent waits on a pipe
/// for the child's verdict and returns it; the child returns a `Readiness`
/// to report through once mounted (or failed).
pub fn daemonize() -> Result<Forked, DaemonError> {
    let mut fds = [0; 2];
    // SAFETY: plain syscalls on a fresh fd pair; no threads exist yet.
    unsafe {
        if libc::pipe(fds.as_mut_ptr()) != 0 {
            return Err(DaemonError::Fork(std::io::Error::last_os_error()));
        }
        match libc::fork() {
            -1 => Err(DaemonError::Fork(std::io::Error::last_os_error())),
            0 => {
                libc::close(fds[0]);
                libc::setsid();
                Ok(Forked::Daemon(Readiness {
                    fd: Some(fds[1]),
                    background: true,
                }))
            }
            _ => {
                libc::close(fds[1]);
                let verdict = read_verdict(std::fs::File::from_raw_fd_checked(fds[0]));
                Ok(Forked::Parent(verdict.map_err(|failure| {
                    failure.unwrap_or_else(|| {
                        StartFailure::other(
                            "the daemon exited before the mount was ready (see its log)",
                        )
                    })
                })))
            }
        }
    }
}

/// Why a mount could not start, as a verdict pipe carries it to whoever
/// waits: the parent of a background daemon, a holder, the CSI serving side
/// (which tells the plugin, which answers kubelet with its kind).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartFailure {
    /// One line: what failed and why.
    pub why: String,
    /// AWS refused the mount's identity (`StoreError::IdentityRefused`), as
    /// opposed to anything else that kept it from starting.
    pub identity_refused: bool,
}

/// The line a refused identity's reason follows on a verdict pipe.
const IDENTITY_REFUSED_LINE: &str = "identity-refused\n";

impl StartFailure {
    pub fn other(why: impl Into<String>) -> Self {
        StartFailure {
            why: why.into(),
            identity_refused: false,
        }
    }

    fn encode(&self) -> String {
        let tag = if self.identity_refused {
            IDENTITY_REFUSED_LINE
        } else {
            ""
        };
        format!("{tag}{}", self.why)
    }

    fn decode(verdict: &str) -> Self {
        match verdict.strip_prefix(IDENTITY_REFUSED_LINE) {
            Some(why) => StartFailure {
                why: why.trim_end().to_string(),
                identity_refused: true,
            },
            None => StartFailure::other(verdict.trim_end()),
        }
    }
}

impl std::fmt::Display for StartFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

impl std::error::Error for StartFailure {}

/// What a process wrote on its verdict pipe until every write end closed:
/// `Ok` once it served, `Err(Some(failure))` if it said why it could not
/// start, `Err(None)` if it ended without a word (killed, crashed).
pub fn read_verdict(mut pipe: impl std::io::Read) -> Result<(), Option<StartFailure>> {
    let mut verdict = String::new();
    let _ = pipe.read_to_string(&mut verdict);
    match verdict.strip_prefix("ok") {
        Some(_) => Ok(()),
        None if verdict.is_empty() => Err(None),
        None => Err(Some(StartFailure::decode(&verdict))),
    }
}

trait FromRawFdChecked {
    fn from_raw_fd_checked(fd: i32) -> std::fs::File;
}

impl FromRawFdChecked for std::fs::File {
    fn from_raw_fd_checked(fd: i32) -> std::fs::File {
        use std::os::fd::FromRawFd;
        // SAFETY: `fd` is a pipe end this process owns and no one else closes.
        unsafe { std::fs::File::from_raw_fd(fd) }
    }
}

/// The channel back to a waiting parent (background mode) or nothing (foreground).
pub struct Readiness {
    fd: Option<i32>,
    background: bool,
}

impl Readiness {
    pub fn foreground() -> Self {
        Self {
            fd: None,
            background: false,
        }
    }

    /// A supervised daemon: its verdict goes to the supervisor on `fd`, if
    /// that was passed (the supervisor reports the mount's readiness itself).
    pub fn reporting_to(fd: i32) -> Self {
        // SAFETY: F_GETFD only asks whether the descriptor is open.
        let open = unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
        Self {
            fd: open.then_some(fd),
            background: false,
        }
    }

    fn send(&mut self, message: &str) {
        if let Some(fd) = self.fd.take() {
            let mut pipe = std::fs::File::from_raw_fd_checked(fd);
            let _ = pipe.write_all(message.as_bytes());
        }
    }

    pub fn ready(&mut self) {
        self.send("ok");
        sd_notify("READY=1");
    }

    /// Reports a failure to a parent still waiting for the mount; true if
    /// there was one (it prints the message, so the caller need not).
    pub fn failed(&mut self, failure: &StartFailure) -> bool {
        let parent_waits = self.fd.is_some();
        self.send(&failure.encode());
        parent_waits
    }

    /// Points stdin/stdout/stderr at /dev/null once the parent has gone.
    pub fn detach_stdio(&self) {
        if !self.background {
            return;
        }
        let dev_null = CString::new("/dev/null").unwrap();
        // SAFETY: standard daemon fd juggling on valid descriptors.
        unsafe {
            let fd = libc::open(dev_null.as_ptr(), libc::O_RDWR);
            if fd >= 0 {
                libc::dup2(fd, 0);
                libc::dup2(fd, 1);
                libc::dup2(fd, 2);
                if fd > 2 {
                    libc::close(fd);
                }
            }
        }
    }

    pub fn is_background(&self) -> bool {
        self.background
    }
}

/// Marks the process non-dumpable (no core files with secrets, no ptrace by
/// other users) and, if asked, locks its memory so secrets never reach swap.
pub fn harden_process(lock_memory: bool) -> Result<(), DaemonError> {
    // SAFETY: prctl/setrlimit/mlockall with constant, valid arguments.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &no_core);
        if lock_memory && libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) != 0 {
            return Err(DaemonError::Mlock(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}
