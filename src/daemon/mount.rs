//! The mount itself: checking and recovering the mount point, mounting (as
//! root directly, so the type reads `fuse.ssmfs`; otherwise through fuser and
//! fusermount3), and the lazy unmount that open files cannot block.

use std::ffi::CString;
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, Session, SessionACL};

use super::DaemonError;
use crate::fs::Fs;
use crate::fuse::{run_invalidations, FuseAdapter};
use crate::store::ParameterStore;

/// How the mount is set up, apart from the filesystem itself.
#[derive(Debug, Clone)]
pub struct MountSettings {
    pub mountpoint: PathBuf,
    pub fsname: String,
    pub allow_other: bool,
    pub allow_root: bool,
    pub threads: usize,
    /// Serve FUSE frames on this fd (a supervisor's socket, `--serve-fd`)
    /// instead of mounting: the supervisor owns the mount.
    pub serve_fd: Option<std::os::fd::RawFd>,
}

/// Checks the mount point and detaches a stale FUSE mount left on it.
/// Returns its absolute path.
pub fn prepare_mountpoint(path: &Path) -> Result<PathBuf, DaemonError> {
    let shown = path.display().to_string();
    match std::fs::metadata(path) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            tracing::warn!(mountpoint = %shown, "mount point is a stale FUSE mount (daemon died); detaching it");
            lazy_unmount(path).map_err(|cause| DaemonError::StaleMount {
                path: shown.clone(),
                cause,
            })?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(DaemonError::MountpointMissing(shown));
        }
        Err(cause) => return Err(DaemonError::MountpointUnusable { path: shown, cause }),
        Ok(meta) if !meta.is_dir() => return Err(DaemonError::MountpointNotADirectory(shown)),
        Ok(_) => {}
    }
    let unusable = |cause| DaemonError::MountpointUnusable {
        path: shown.clone(),
        cause,
    };
    let absolute = std::fs::canonicalize(path).map_err(unusable)?;
    if is_mount_point(&absolute) {
        return Err(DaemonError::AlreadyMounted(shown));
    }
    let mut entries = std::fs::read_dir(&absolute).map_err(unusable)?;
    if entries.next().is_some() {
        return Err(DaemonError::MountpointNotEmpty(shown));
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
) -> Result<Mounted, DaemonError> {
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
    let streams = crate::stream_pipes::StreamPipes::new(settings.mountpoint.clone());
    if let Err(error) = streams.adopt_kept(fs.clone(), runtime.clone()) {
        tracing::warn!(%error, "cannot take the change streams an earlier daemon left");
    }
    let announcer = fs.change_announcer();
    runtime.spawn(fs.clone().keep_fresh());
    let adapter = FuseAdapter::new(fs, runtime, Some(streams));
    let cannot = |cause| DaemonError::Mount {
        path: settings.mountpoint.display().to_string(),
        cause,
    };
    // As root we mount ourselves so the type reads `fuse.ssmfs` (for mount(8),
    // findmnt and fstab); other users go through fuser and fusermount3.
    // SAFETY: geteuid cannot fail.
    let session = if let Some(fd) = settings.serve_fd {
        // SAFETY: the supervisor passed us this fd to own.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // One socket, read by every worker thread: no clone (an ioctl of /dev/fuse).
        config.clone_fd = false;
        Session::from_fd(adapter, fd, config.acl, config.clone()).map_err(cannot)?
    } else if unsafe { libc::geteuid() } == 0 {
        let fd = mount_device(settings).map_err(cannot)?;
        Session::from_fd(adapter, fd, config.acl, config.clone()).map_err(cannot)?
    } else {
        // fuser gives up (rather than trying fusermount3) when it cannot open
        // the device, so say what is wrong instead of a bare EACCES.
        if let Err(cause) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
        {
            return Err(DaemonError::DeviceDenied(cause));
        }
        Session::new(adapter, &settings.mountpoint, &config).map_err(cannot)?
    };
    run_invalidations(session.notifier(), invalidations, announcer);
    let session = session.spawn().map_err(DaemonError::Session)?;
    Ok(Mounted {
        session,
        mountpoint: settings.mountpoint.clone(),
    })
}

/// Opens /dev/fuse and mounts it read-only with type `fuse.ssmfs` (as root).
pub fn mount_device(settings: &MountSettings) -> std::io::Result<std::os::fd::OwnedFd> {
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
    /// (A supervised daemon never calls this: the mount is its supervisor's.)
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
