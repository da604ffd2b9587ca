//! The few system calls the plugin makes as root: memfds for what must
//! never touch a disk, read-only bind mounts of a shared mount into pods,
//! what /proc/self/mountinfo says is mounted, and the sandbox the serving
//! side starts in (its own user, no capabilities, no /dev/fuse, / read-only).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// An anonymous memory file: gone with the last process that holds it.
pub fn memfd(name: &std::ffi::CStr) -> io::Result<OwnedFd> {
    // SAFETY: a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Replaces the memfd's contents with `bytes` (a token a daemon re-reads).
pub fn rewrite(file: &OwnedFd, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: a valid fd and buffer.
    unsafe {
        if libc::pwrite(file.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0)
            != bytes.len() as isize
            || libc::ftruncate(file.as_raw_fd(), bytes.len() as libc::off_t) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Writes `bytes` to a new file at `path` readable by root alone.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

/// 32 random bytes kept at `path` (root's alone), made on first use.
pub fn node_secret(path: &Path) -> io::Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(secret) if secret.len() == 32 => return Ok(secret),
        Ok(_) => {} // cut short when it was made: made again
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let secret: [u8; 32] = rand::random();
    let staging = path.with_extension("new");
    write_private(&staging, &secret)?;
    std::fs::rename(&staging, path)?;
    Ok(secret.to_vec())
}

/// Makes the directory `path` root's alone (mode 0700).
pub fn make_private(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(path, Some(0), Some(0))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}

/// Who is at the other end of a unix socket, as the kernel saw it connect.
pub struct PeerCredentials {
    pub pid: i32,
    pub uid: u32,
}

pub fn peer_credentials(socket: &std::os::fd::OwnedFd) -> io::Result<PeerCredentials> {
    // SAFETY: an all-zero ucred is valid; the buffer and its length match.
    let mut credentials: libc::ucred = unsafe { std::mem::zeroed() };
    let mut length = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    if unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut credentials as *mut libc::ucred).cast(),
            &mut length,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCredentials {
        pid: credentials.pid,
        uid: credentials.uid,
    })
}

/// Replaces `file`'s bytes with `bytes` unless they are what it holds: a
/// republish brings the same token most times (kubelet renews it at 80% of
/// its life), and each rewrite is a moment a reader could see half of it.
pub fn refresh(file: &OwnedFd, bytes: &[u8]) -> io::Result<()> {
    let mut held = zeroize::Zeroizing::new(vec![0u8; bytes.len() + 1]);
    // SAFETY: a valid fd and buffer of that length.
    let read = unsafe { libc::pread(file.as_raw_fd(), held.as_mut_ptr().cast(), held.len(), 0) };
    if read == bytes.len() as isize && held[..bytes.len()] == *bytes {
        return Ok(());
    }
    rewrite(file, bytes)
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

/// `openat2` below `dir`, following no symlink on the way: the walk cannot
/// leave `dir` nor be led elsewhere by a link a pod placed.
pub fn open_beneath(dir: &OwnedFd, relative: &Path, flags: i32) -> io::Result<OwnedFd> {
    open_beneath_with(dir, relative, flags, 0)
}

/// `open_beneath`, with more `RESOLVE_*` flags (`RESOLVE_NO_XDEV`: not
/// into another mount either).
pub fn open_beneath_with(
    dir: &OwnedFd,
    relative: &Path,
    flags: i32,
    resolve: u64,
) -> io::Result<OwnedFd> {
    let relative = c_path(relative)?;
    // SAFETY: an all-zero open_how is valid; the fields are set below.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64;
    how.resolve =
        libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS | resolve;
    // SAFETY: a valid dirfd, a NUL-terminated path and an open_how of the size given.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            relative.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just opened, owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A pod's target, resolved once below kubelet's pods directory without
/// following any symlink, and then mounted, unmounted and removed through
/// its parent's fd: a pod that swaps a component for a link meanwhile
/// changes nothing (the checks of the path and the mount are one).
pub struct Target {
    parent: OwnedFd,
    name: CString,
}

impl Target {
    /// Opens the target's parent; `target` lies below `pods_dir` (checked).
    pub fn resolve(pods_dir: &Path, target: &Path) -> io::Result<Self> {
        let below = target
            .strip_prefix(pods_dir)
            .map_err(|_| io::Error::other("not below the pods directory"))?;
        let name = below
            .file_name()
            .ok_or_else(|| io::Error::other("no last component"))?;
        let parent_below = below.parent().filter(|p| !p.as_os_str().is_empty());
        // The pods directory itself is the admin's (it may be a link, as
        // /var/lib/kubelet often is); everything below it is a pod's.
        let pods = std::fs::File::open(pods_dir)?;
        let pods = OwnedFd::from(pods);
        let parent = match parent_below {
            Some(parent) => open_beneath(&pods, parent, libc::O_PATH | libc::O_DIRECTORY)?,
            None => pods,
        };
        Ok(Target {
            parent,
            name: CString::new(name.as_bytes()).map_err(io::Error::other)?,
        })
    }

    /// The target through the parent's fd, for calls that take a path
    /// (only the last component is then looked up by name).
    pub fn path(&self) -> PathBuf {
        let mut path = format!("/proc/self/fd/{}/", self.parent.as_raw_fd()).into_bytes();
        path.extend_from_slice(self.name.as_bytes());
        PathBuf::from(std::ffi::OsString::from_vec(path))
    }

    /// Creates the target directory; `Ok(false)` if it was there.
    pub fn create_dir(&self) -> io::Result<bool> {
        // SAFETY: a valid dirfd and NUL-terminated name.
        if unsafe { libc::mkdirat(self.parent.as_raw_fd(), self.name.as_ptr(), 0o750) } == 0 {
            return Ok(true);
        }
        match io::Error::last_os_error() {
            error if error.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            error => Err(error),
        }
    }

    /// Removes the (empty) target directory.
    pub fn remove_dir(&self) -> io::Result<()> {
        // SAFETY: a valid dirfd and NUL-terminated name.
        if unsafe {
            libc::unlinkat(
                self.parent.as_raw_fd(),
                self.name.as_ptr(),
                libc::AT_REMOVEDIR,
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Detaches whatever is mounted on the target, never through a link.
    pub fn unmount(&self) -> io::Result<()> {
        let path = c_path(&self.path())?;
        // SAFETY: a NUL-terminated path.
        if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Mounts a read-only, nosuid, nodev copy of `source` (a shared mount)
    /// on the target directory, which must be a directory and no link. The
    /// copy is made read-only before it is attached: no moment is writable.
    pub fn bind_read_only(&self, source: &Path) -> io::Result<()> {
        let directory = {
            let name = Path::new(std::ffi::OsStr::from_bytes(self.name.as_bytes()));
            open_beneath(&self.parent, name, libc::O_PATH | libc::O_DIRECTORY)?
        };
        let source = c_path(source)?;
        // SAFETY: a NUL-terminated path; the fd returned is owned below.
        let tree = unsafe {
            libc::syscall(
                libc::SYS_open_tree,
                libc::AT_FDCWD,
                source.as_ptr(),
                libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC,
            )
        };
        if tree < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: just opened, owned here.
        let tree = unsafe { OwnedFd::from_raw_fd(tree as i32) };
        // SAFETY: an all-zero mount_attr is valid; the fields are set below.
        let mut attr: libc::mount_attr = unsafe { std::mem::zeroed() };
        attr.attr_set = libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
        let empty = c"";
        // SAFETY: valid fds, an empty NUL-terminated path and a mount_attr
        // of the size given.
        unsafe {
            if libc::syscall(
                libc::SYS_mount_setattr,
                tree.as_raw_fd(),
                empty.as_ptr(),
                libc::AT_EMPTY_PATH,
                &attr as *const libc::mount_attr,
                std::mem::size_of::<libc::mount_attr>(),
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            if libc::syscall(
                libc::SYS_move_mount,
                tree.as_raw_fd(),
                empty.as_ptr(),
                directory.as_raw_fd(),
                empty.as_ptr(),
                libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fstype: String,
    /// The FUSE connection number (the device's minor).
    pub minor: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'\\' && index + 3 < bytes.len() {
            if let Ok(value) = u8::from_str_radix(&field[index + 1..index + 4], 8) {
                out.push(value);
                index += 4;
                continue;
            }
        }
        out.push(bytes[index]);
        index += 1;
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

pub fn mounts() -> io::Result<Vec<MountEntry>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let separator = fields.iter().position(|field| *field == "-")?;
            Some(MountEntry {
                mount_point: unescape(fields.get(4)?),
                fstype: fields.get(separator + 1)?.to_string(),
                minor: fields.get(2)?.split(':').nth(1)?.to_string(),
            })
        })
        .collect())
}

/// Whether `path` is a FUSE mount whose connection is gone (ENOTCONN).
pub fn is_dead_mount(path: &Path) -> bool {
    std::fs::symlink_metadata(path)
        .err()
        .is_some_and(|error| error.raw_os_error() == Some(libc::ENOTCONN))
}

/// Makes every waiting and future request of FUSE connection `minor` fail
/// at once (ENOTCONN): readers get an error instead of a wait.
pub fn abort_connection(minor: &str) {
    let path = format!("/sys/fs/fuse/connections/{minor}/abort");
    if let Err(error) = std::fs::write(&path, "1") {
        tracing::warn!(path, %error, "could not abort the FUSE connection");
    }
}

/// Who the serving side runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeUser {
    pub uid: u32,
    pub gid: u32,
}

impl std::str::FromStr for ServeUser {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        let (uid, gid) = raw.split_once(':').unwrap_or((raw, raw));
        let number = |text: &str| {
            text.parse::<u32>()
                .map_err(|_| format!("{raw:?}: expected UID:GID, numbers"))
        };
        let user = ServeUser {
            uid: number(uid)?,
            gid: number(gid)?,
        };
        if user.uid == 0 {
            return Err("the serving side must not run as root (uid 0)".into());
        }
        Ok(user)
    }
}

/// The serving side's default user: one of its own, not `nobody` (65534),
/// which node daemons such as node-exporter share. The Helm chart and the
/// Debian package use the same number.
pub const DEFAULT_SERVE_USER: &str = "64721:64721";

/// For a csi-serve started as root (its own container): becomes `user`
/// for good, with no supplementary groups, no capabilities and
/// `NO_NEW_PRIVS`, once it has read what only root may read.
pub fn become_serving_user(user: ServeUser) -> io::Result<()> {
    // SAFETY: plain system calls on this process.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setgid(user.gid) != 0
            || libc::setuid(user.uid) != 0
            || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    // setuid from root to another uid clears every capability; check it.
    if unsafe { libc::geteuid() } == 0 || unsafe { libc::setuid(0) } == 0 {
        return Err(io::Error::other("still root after dropping privileges"));
    }
    Ok(())
}

/// Bind-mounts `source` on `target`; async-signal-safe.
unsafe fn bind(source: &CString, target: &CString) -> bool {
    libc::mount(
        source.as_ptr(),
        target.as_ptr(),
        std::ptr::null(),
        libc::MS_BIND,
        std::ptr::null(),
    ) == 0
}

/// Runs between fork and exec of the serving side (root until its end):
/// a mount namespace of its own where /dev/fuse is /dev/null and / is
/// read-only (`writable` stays writable: the control socket's directory),
/// then `user`, no supplementary groups, no capabilities, no new privileges.
///
/// # Safety
/// Only async-signal-safe calls: it must run in a `pre_exec` hook, with
/// every CString made before the fork.
pub unsafe fn enter_serving_sandbox(
    user: ServeUser,
    writable: &CString,
    dev_null: &CString,
    dev_fuse: &CString,
) -> io::Result<()> {
    let fail = || Err(io::Error::last_os_error());
    if libc::unshare(libc::CLONE_NEWNS) != 0 {
        return fail();
    }
    let root = c"/";
    if libc::mount(
        std::ptr::null(),
        root.as_ptr(),
        std::ptr::null(),
        libc::MS_REC | libc::MS_PRIVATE,
        std::ptr::null(),
    ) != 0
    {
        return fail();
    }
    // Open /dev/fuse and get /dev/null: the serving side never mounts.
    if libc::access(dev_fuse.as_ptr(), libc::F_OK) == 0 && !bind(dev_null, dev_fuse) {
        return fail();
    }
    // Its own mount, so that the read-only remount of / spares it.
    if !bind(writable, writable) {
        return fail();
    }
    if libc::mount(
        std::ptr::null(),
        root.as_ptr(),
        std::ptr::null(),
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
        std::ptr::null(),
    ) != 0
    {
        return fail();
    }
    if libc::setgroups(0, std::ptr::null()) != 0
        || libc::setgid(user.gid) != 0
        || libc::setuid(user.uid) != 0
    {
        return fail();
    }
    // A uid change from root clears the capability sets; this keeps an
    // exec from gaining any back (setuid binaries, file capabilities).
    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
        return fail();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_rewritten_only_when_it_changed() {
        let file = memfd(c"test-token").unwrap();
        let stamp = |file: &OwnedFd| {
            let mut stat: libc::stat = unsafe { std::mem::zeroed() };
            assert_eq!(unsafe { libc::fstat(file.as_raw_fd(), &mut stat) }, 0);
            (stat.st_mtime, stat.st_mtime_nsec)
        };
        rewrite(&file, b"token-one").unwrap();
        let written = stamp(&file);
        std::thread::sleep(std::time::Duration::from_millis(20));
        refresh(&file, b"token-one").unwrap();
        assert_eq!(stamp(&file), written, "the same token was written again");
        refresh(&file, b"token-2").unwrap();
        let mut back = vec![0u8; 16];
        let n = unsafe { libc::pread(file.as_raw_fd(), back.as_mut_ptr().cast(), 16, 0) };
        assert_eq!(&back[..n as usize], b"token-2");
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape("/a\\040b"), PathBuf::from("/a b"));
        assert_eq!(unescape("/plain"), PathBuf::from("/plain"));
    }

    #[test]
    fn the_serving_user_is_never_root() {
        assert!("0:0".parse::<ServeUser>().is_err());
        assert!("x".parse::<ServeUser>().is_err());
        assert_eq!(
            "65534".parse::<ServeUser>(),
            Ok(ServeUser {
                uid: 65534,
                gid: 65534
            })
        );
    }
}
