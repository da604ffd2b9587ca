//! The daemon's life: check and recover the mount point, mount, announce
//! readiness (to a waiting parent in background mode and to systemd), serve
//! metrics, and on SIGTERM/SIGINT unmount lazily (open files do not block it)
//! and exit 0. SIGHUP drops every cached answer. A mount point left behind by a
//! killed daemon ("Transport endpoint is not connected") is detached at start.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, Session, SessionACL};
use tokio::signal::unix::{signal, SignalKind};

use crate::fs::Fs;
use crate::fuse::{run_invalidations, FuseAdapter};
use crate::metrics::Metrics;
use crate::store::ParameterStore;

/// How the mount is set up, apart from the filesystem itself.
#[derive(Debug, Clone)]
pub struct MountSettings {
    pub mountpoint: PathBuf,
    pub fsname: String,
    pub allow_other: bool,
    pub allow_root: bool,
    pub threads: usize,
}

/// Checks the mount point and detaches a stale FUSE mount left on it.
/// Returns its absolute path.
pub fn prepare_mountpoint(path: &Path) -> Result<PathBuf, String> {
    let shown = path.display();
    match std::fs::metadata(path) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            tracing::warn!(mountpoint = %shown, "mount point is a stale FUSE mount (daemon died); detaching it");
            lazy_unmount(path).map_err(|e| {
                format!("mount point {shown} is a stale mount and could not be detached: {e}")
            })?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!("mount point {shown} does not exist"));
        }
        Err(e) => return Err(format!("mount point {shown} cannot be used: {e}")),
        Ok(meta) if !meta.is_dir() => {
            return Err(format!("mount point {shown} is not a directory"))
        }
        Ok(_) => {}
    }
    let absolute = std::fs::canonicalize(path)
        .map_err(|e| format!("mount point {shown} cannot be used: {e}"))?;
    if is_mount_point(&absolute) {
        return Err(format!(
            "mount point {shown} is already a mount; unmount it first (umount {shown})"
        ));
    }
    let mut entries = std::fs::read_dir(&absolute)
        .map_err(|e| format!("mount point {shown} cannot be read: {e}"))?;
    if entries.next().is_some() {
        return Err(format!(
            "mount point {shown} is not empty; mounting would hide its files"
        ));
    }
    Ok(absolute)
}

/// Whether `path` is listed as a mount point in /proc/self/mountinfo.
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.to_string_lossy();
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mp| unescape_mountinfo(mp) == wanted)
}

fn unescape_mountinfo(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Detaches the mount now; the kernel finishes it once the last open file closes.
pub fn lazy_unmount(path: &Path) -> std::io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() != Some(libc::EPERM) {
        return Err(error);
    }
    // Not root: the setuid helper that mounted it may unmount it for us.
    for helper in ["fusermount3", "fusermount"] {
        match std::process::Command::new(helper)
            .args(["-u", "-z", "--"])
            .arg(path)
            .stderr(std::process::Stdio::null())
            .status()
        {
            Ok(status) if status.success() => return Ok(()),
            Ok(_) => return Err(error),
            Err(_) => continue,
        }
    }
    Err(error)
}

/// A live mount: the session thread and what is needed to end it.
pub struct Mounted {
    session: fuser::BackgroundSession,
    mountpoint: PathBuf,
}

/// Mounts `fs`. When this returns the kernel has completed the FUSE handshake,
/// so the mount serves requests.
pub fn mount<S: ParameterStore>(
    fs: Arc<Fs<S>>,
    invalidations: tokio::sync::mpsc::UnboundedReceiver<crate::fs::Invalidation>,
    runtime: tokio::runtime::Handle,
    settings: &MountSettings,
) -> Result<Mounted, String> {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::FSName(settings.fsname.clone()),
        MountOption::Subtype("ssmfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoAtime,
    ];
    config.acl = if settings.allow_other {
        SessionACL::All
    } else if settings.allow_root {
        SessionACL::RootAndOwner
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(settings.threads);
    config.clone_fd = true;
    let adapter = FuseAdapter::new(fs, runtime);
    let cannot =
        |e: std::io::Error| format!("cannot mount on {}: {e}", settings.mountpoint.display());
    // As root we mount ourselves so the type reads `fuse.ssmfs` (for mount(8),
    // findmnt and fstab); other users go through fuser and fusermount3.
    // SAFETY: geteuid cannot fail.
    let session = if unsafe { libc::geteuid() } == 0 {
        let fd = mount_fuse_as_root(settings).map_err(cannot)?;
        Session::from_fd(adapter, fd, config.acl, config.clone()).map_err(cannot)?
    } else {
        // fuser gives up (rather than trying fusermount3) when it cannot open
        // the device, so say what is wrong instead of a bare EACCES.
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
        {
            return Err(format!(
                "cannot open /dev/fuse as a non-root user: {e} (distributions make it mode 0666; \
                 check `ls -l /dev/fuse`, or run as root)"
            ));
        }
        Session::new(adapter, &settings.mountpoint, &config).map_err(cannot)?
    };
    run_invalidations(session.notifier(), invalidations);
    let session = session
        .spawn()
        .map_err(|e| format!("cannot start the FUSE session: {e}"))?;
    Ok(Mounted {
        session,
        mountpoint: settings.mountpoint.clone(),
    })
}

/// Opens /dev/fuse and mounts it read-only with type `fuse.ssmfs`.
fn mount_fuse_as_root(settings: &MountSettings) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, OwnedFd};
    let device = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?;
    let fd: OwnedFd = device.into();
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut options = format!(
        "fd={},rootmode=40000,user_id={uid},group_id={gid},default_permissions",
        fd.as_raw_fd()
    );
    if settings.allow_other || settings.allow_root {
        options.push_str(",allow_other");
    }
    let c = |text: &str| CString::new(text).map_err(std::io::Error::other);
    let (source, target, fstype, data) = (
        c(&settings.fsname)?,
        CString::new(settings.mountpoint.as_os_str().as_bytes()).map_err(std::io::Error::other)?,
        c("fuse.ssmfs")?,
        c(&options)?,
    );
    let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOATIME;
    // SAFETY: valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

impl Mounted {
    pub fn is_finished(&self) -> bool {
        self.session.guard.is_finished()
    }

    /// Lazily unmounts and gives the session a moment to wind down; files still
    /// open lose the connection when the process exits.
    pub fn unmount(self) {
        if is_mount_point(&self.mountpoint) {
            if let Err(e) = lazy_unmount(&self.mountpoint) {
                tracing::error!(mountpoint = %self.mountpoint.display(), error = %e, "unmount failed");
            }
        }
        let deadline = Instant::now() + crate::fuse::UNMOUNT_GRACE;
        while !self.session.guard.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.session.guard.is_finished() {
            let _ = self.session.join();
        } else {
            // Files are still open on the detached mount; leaving lets the
            // kernel abort the connection when our /dev/fuse handle closes.
            std::mem::forget(self.session);
        }
    }
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
    pub fn install() -> Result<Self, String> {
        let install =
            |kind| signal(kind).map_err(|e| format!("cannot install signal handlers: {e}"));
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

/// Serves Prometheus text on `addr` until the process ends.
pub async fn serve_metrics<S: ParameterStore>(
    fs: Arc<Fs<S>>,
    addr: std::net::SocketAddr,
) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("--metrics-addr {addr}: {e}"))?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let fs = fs.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                let body = fs.metrics().render(&fs.gauges());
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body.as_bytes()).await;
            });
        }
    });
    Ok(())
}

/// Background mode: forks before any thread exists. The parent waits on a pipe
/// for the child's verdict and exits with it; the child returns a `Readiness`
/// to report through once mounted (or failed).
pub fn daemonize() -> Result<Readiness, String> {
    let mut fds = [0; 2];
    // SAFETY: plain syscalls on a fresh fd pair; no threads exist yet.
    unsafe {
        if libc::pipe(fds.as_mut_ptr()) != 0 {
            return Err(format!("pipe: {}", std::io::Error::last_os_error()));
        }
        match libc::fork() {
            -1 => Err(format!("fork: {}", std::io::Error::last_os_error())),
            0 => {
                libc::close(fds[0]);
                libc::setsid();
                Ok(Readiness {
                    fd: Some(fds[1]),
                    background: true,
                })
            }
            _ => {
                libc::close(fds[1]);
                let mut reader = std::fs::File::from_raw_fd_checked(fds[0]);
                let mut verdict = String::new();
                use std::io::Read;
                let _ = reader.read_to_string(&mut verdict);
                match verdict.strip_prefix("ok") {
                    Some(_) => std::process::exit(0),
                    None if verdict.is_empty() => {
                        eprintln!(
                            "ssmfs: the daemon exited before the mount was ready (see its log)"
                        );
                        std::process::exit(1)
                    }
                    None => {
                        eprintln!("ssmfs: {}", verdict.trim_end());
                        std::process::exit(1)
                    }
                }
            }
        }
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

    pub fn failed(&mut self, message: &str) {
        self.send(message);
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
pub fn harden_process(lock_memory: bool) -> Result<(), String> {
    // SAFETY: prctl/setrlimit/mlockall with constant, valid arguments.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &no_core);
        if lock_memory && libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) != 0 {
            return Err(format!(
                "--mlock: cannot lock memory ({}); run as root, grant CAP_IPC_LOCK, or raise RLIMIT_MEMLOCK (LimitMEMLOCK=infinity in systemd)",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// Metrics handle shared by the store wrapper and the core.
pub fn new_metrics() -> Arc<Metrics> {
    Arc::new(Metrics::default())
}
