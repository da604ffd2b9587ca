//! The daemon's life: check and recover the mount point, mount, announce
//! readiness (to a waiting parent in background mode and to systemd), serve
//! metrics, and on SIGTERM/SIGINT unmount lazily (open files do not block it)
//! and exit 0. SIGHUP drops every cached answer. A mount point left behind by a
//! killed daemon ("Transport endpoint is not connected") is detached at start.
//!
//! `mount` holds the mount syscalls, `process` the fork and hardening,
//! `metrics_http` the metrics endpoint; this module the signals and the loop.

pub mod metrics_http;
mod mount;
mod process;

use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};

pub use metrics_http::serve_metrics;
pub use mount::{
    is_mount_point, lazy_unmount, mount, mount_device, prepare_mountpoint, MountSettings, Mounted,
};
pub use process::{daemonize, harden_process, read_verdict, Forked, Readiness, StartFailure};

use crate::fs::Fs;
use crate::metrics::Metrics;
use crate::store::ParameterStore;

/// Why the daemon cannot start or mount. Each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("mount point {0} does not exist")]
    MountpointMissing(String),
    #[error("mount point {0} is not a directory")]
    MountpointNotADirectory(String),
    #[error("mount point {path} cannot be used: {cause}")]
    MountpointUnusable { path: String, cause: std::io::Error },
    #[error("mount point {path} is a stale mount and could not be detached: {cause}")]
    StaleMount { path: String, cause: std::io::Error },
    #[error("mount point {0} is already a mount; unmount it first (umount {0})")]
    AlreadyMounted(String),
    #[error("mount point {0} is not empty; mounting would hide its files")]
    MountpointNotEmpty(String),
    #[error("cannot mount on {path}: {cause}")]
    Mount { path: String, cause: std::io::Error },
    #[error("cannot open /dev/fuse as a non-root user: {0} (distributions make it mode 0666; check `ls -l /dev/fuse`, or run as root)")]
    DeviceDenied(std::io::Error),
    #[error("cannot start the FUSE session: {0}")]
    Session(std::io::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("--metrics-addr {addr}: {cause}")]
    MetricsAddr {
        addr: metrics_http::MetricsAddr,
        cause: std::io::Error,
    },
    #[error("cannot fork into the background: {0}")]
    Fork(std::io::Error),
    #[error("--mlock: cannot lock memory ({0}); run as root, grant CAP_IPC_LOCK, or raise RLIMIT_MEMLOCK (LimitMEMLOCK=infinity in systemd)")]
    Mlock(std::io::Error),
}

/// The signals that stop or refresh the daemon. Installed before the mount
/// exists, so a SIGTERM sent the moment a supervisor sees the mount (or READY=1)
/// is handled as a clean stop rather than killing the process mid-setup.
pub struct StopSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Must run inside the tokio runtime.
    pub fn install() -> Result<Self, DaemonError> {
        let install = |kind| signal(kind).map_err(DaemonError::Signals);
        Ok(Self {
            terminate: install(SignalKind::terminate())?,
            interrupt: install(SignalKind::interrupt())?,
            hangup: install(SignalKind::hangup())?,
        })
    }
}

/// Serves until the mount ends or a signal asks us to stop. SIGHUP drops caches.
pub async fn serve_until_stopped<S: ParameterStore>(
    fs: Arc<Fs<S>>,
    mounted: &Mounted,
    mut signals: StopSignals,
) -> &'static str {
    let mut poll = tokio::time::interval(Duration::from_millis(200));
    let mut trim = tokio::time::interval(crate::heap::TRIM_EVERY);
    loop {
        tokio::select! {
            _ = trim.tick() => crate::heap::release_freed(),
            _ = signals.terminate.recv() => return "SIGTERM",
            _ = signals.interrupt.recv() => return "SIGINT",
            _ = signals.hangup.recv() => {
                tracing::info!("SIGHUP: dropping every cached value and listing");
                fs.drop_caches();
            }
            _ = poll.tick() => if mounted.is_finished() { return "unmounted" },
        }
    }
}

/// Tells systemd (Type=notify) about our state, if it is listening.
pub fn sd_notify(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sender) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = socket.as_bytes();
    let result = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|addr| sender.send_to_addr(state.as_bytes(), &addr))
    } else {
        sender.send_to(state.as_bytes(), Path::new(&socket))
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}

/// Metrics handle shared by the store wrapper and the core.
pub fn new_metrics() -> Arc<Metrics> {
    let metrics = Metrics::default();
    // A supervised daemon learns the supervisor's counts at its start.
    if let Some(counts) = crate::handoff::holder_counts() {
        let _ = metrics.supervisor.set(counts);
    }
    Arc::new(metrics)
}
