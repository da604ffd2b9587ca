//! The thin fuser adapter: every callback hands its request to the async core
//! on the tokio runtime, in a task that owns the reply, so a slow SSM call never
//! occupies a FUSE worker thread. Errors become errnos here and nowhere else.
//!
//! Kernel caching is set up for reads that never reach the daemon once warm:
//! OPEN is answered with ENOSYS, which puts the kernel in no-open mode (it stops
//! sending OPEN and RELEASE and keeps page-cache contents across opens), and
//! FUSE_AUTO_INVAL_DATA makes it drop those pages when attributes it revalidates
//! show a new size or mtime.
//!
//! Every request runs in a DEBUG span naming the operation and inode; a failed
//! one is logged at its error's level (`FsError::level`), so `SSMFS_LOG=debug`
//! traces requests while the default log shows only SSM trouble and bugs.

use std::ffi::OsStr;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};
use tokio::runtime::Handle;
use tracing::{Instrument, Level};

use crate::fs::error::FsError;
use crate::fs::{Attr, FileKind, Fs, STREAM_DIR_INO, STREAM_DIR_NAME};
use crate::store::ParameterStore;
use crate::stream_pipes::StreamPipes;

pub struct FuseAdapter<S> {
    fs: Arc<Fs<S>>,
    runtime: Handle,
    /// Opens the write ends of `@changes` streams (none: @changes answers EIO).
    streams: Option<Arc<StreamPipes>>,
    /// Asked for at INIT unless the connection was set up without them
    /// (`handoff::SERIAL_LOOKUPS_ENV`): the reply must match the kernel's.
    parallel_lookups: bool,
    /// A test hook (`SSMFS_TEST_REQUEST_DELAY_MS`): every request handed to
    /// the core waits this long first, so a test can kill a daemon while
    /// requests are in flight (the supervisor must resend them).
    test_delay: Option<Duration>,
    /// A test hook (`SSMFS_TEST_UPGRADE_MAX_WRITE`): a daemon started by an
    /// upgrade negotiates this max_write instead, as a binary with other FUSE
    /// settings would (the supervisor must refuse it).
    test_upgrade_max_write: Option<u32>,
}

impl<S: ParameterStore> FuseAdapter<S> {
    pub fn new(fs: Arc<Fs<S>>, runtime: Handle, streams: Option<Arc<StreamPipes>>) -> Self {
        let parallel_lookups = !serial_lookups_required();
        if !parallel_lookups {
            tracing::warn!("this mount was made by an earlier ssmfs (lookups one at a time): @changes answers EIO until it is mounted again");
        }
        let streams = streams.filter(|_| parallel_lookups);
        let test_delay = std::env::var("SSMFS_TEST_REQUEST_DELAY_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .map(Duration::from_millis);
        let test_upgrade_max_write = std::env::var("SSMFS_TEST_UPGRADE_MAX_WRITE")
            .ok()
            .filter(|_| crate::handoff::started_by_upgrade())
            .and_then(|bytes| bytes.parse().ok());
        Self {
            fs,
            runtime,
            streams,
            parallel_lookups,
            test_delay,
            test_upgrade_max_write,
        }
    }

    /// Times one request; the latency is recorded when the timer is dropped,
    /// on the FUSE thread or at the end of the task that answers it.
    fn timer(&self, operation: &'static str) -> RequestTimer {
        RequestTimer {
            metrics: self.fs.metrics().clone(),
            operation,
            started: Instant::now(),
        }
    }

    /// Runs `work` for the request on inode `ino` on the runtime, in the
    /// request's span, and records its latency.
    fn spawn<F, Fut>(&self, operation: &'static str, ino: INodeNo, work: F)
    where
        F: FnOnce(Arc<Fs<S>>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let timer = self.timer(operation);
        let span = tracing::debug_span!("fuse", op = operation, ino = ino.0);
        let task = work(self.fs.clone());
        let delay = self.test_delay;
        self.runtime.spawn(
            async move {
                if let Some(delay) = delay {
                    tokio::time::sleep(delay).await;
                }
                task.await;
                drop(timer);
            }
            .instrument(span),
        );
    }
}

/// Whether this daemon takes over a connection that was set up without
/// parallel lookups: its holder says so (`handoff::SERIAL_LOOKUPS_ENV`), or
/// its holder is an ssmfs from before the change streams (it holds the
/// mount, as every holder does, but keeps no streams), whose connection
/// was set up by a daemon of its own version.
fn serial_lookups_required() -> bool {
    use crate::handoff::{MOUNTPOINT_ENV, SERIAL_LOOKUPS_ENV, STREAMS_FD_ENV};
    let env = |name| std::env::var_os(name).is_some();
    env(SERIAL_LOOKUPS_ENV) || (env(MOUNTPOINT_ENV) && !env(STREAMS_FD_ENV))
}

/// Whether the thread that made a request is one of this process's (FUSE
/// names the calling thread, not its process).
fn is_own_thread(tid: u32) -> bool {
    std::path::Path::new(&format!("/proc/self/task/{tid}")).exists()
}

/// The errno for a failed request, logged at the error's level.
fn fail(operation: &'static str, error: &FsError) -> Errno {
    let errno = error.errno();
    match error.level() {
        Level::ERROR => tracing::error!(op = operation, errno, %error, "request failed"),
        Level::WARN => tracing::warn!(op = operation, errno, %error, "request failed"),
        _ => tracing::debug!(op = operation, errno, %error, "request failed"),
    }
    Errno::from_i32(errno)
}

/// Operations that would change the tree (EROFS) or that a read-only tree
/// never needs (ENOSYS: the kernel then stops sending them). Each is timed
/// like any request.
macro_rules! refuse {
    ($($operation:ident($($argument:ty),*) -> $reply:ty = $errno:ident;)*) => {
        $(
            fn $operation(&self, _: &Request, $(_: $argument,)* reply: $reply) {
                let _timer = self.timer(stringify!($operation));
                reply.error(Errno::$errno);
            }
        )*
    };
}

fn reply_dir(mut reply: ReplyDirectory, items: Vec<(u64, crate::fs::DirItem)>) {
    for (next_offset, item) in items {
        if reply.add(
            INodeNo(item.ino),
            next_offset,
            file_type(item.kind),
            &item.name,
        ) {
            break;
        }
    }
    reply.ok();
}

/// The xattr protocol: size 0 asks how big, else the bytes if they fit.
fn reply_xattr(reply: ReplyXattr, value: &[u8], size: u32) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() <= size as usize {
        reply.data(value);
    } else {
        reply.error(Errno::from_i32(libc::ERANGE));
    }
}

struct RequestTimer {
    metrics: Arc<crate::metrics::Metrics>,
    operation: &'static str,
    started: Instant,
}

impl Drop for RequestTimer {
    fn drop(&mut self) {
        self.metrics
            .fuse_request(self.operation, self.started.elapsed());
    }
}

fn to_file_attr(attr: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(attr.ino),
        size: attr.size,
        blocks: attr.size.div_ceil(512),
        atime: attr.mtime,
        mtime: attr.mtime,
        ctime: attr.mtime,
        crtime: attr.mtime,
        kind: file_type(attr.kind),
        perm: attr.perm,
        nlink: attr.nlink,
        uid: attr.uid,
        gid: attr.gid,
        rdev: 0,
        blksize: attr.blksize,
        flags: 0,
    }
}

/// Entries offered per READDIR: a kernel readdir buffer (one page) holds at
/// most 128 (a 24-byte header and a name padded to 8 bytes each).
const READDIR_BATCH: usize = 256;

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Fifo => FileType::NamedPipe,
    }
}

impl<S: ParameterStore> Filesystem for FuseAdapter<S> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Older kernels lack the flag; caching then relies on TTLs and notifications.
        let _ = config.add_capabilities(InitFlags::FUSE_AUTO_INVAL_DATA);
        // Lookups in one directory run at once (the core is safe for it), and
        // must: a stream's write end is opened by a lookup of this daemon's
        // own while the reader's lookup, in the same directory, waits for it.
        if self.parallel_lookups {
            let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        }
        // Nothing is ever written: the smallest write size keeps the buffer a
        // reader of /dev/fuse needs small (the supervisor's: --supervise).
        let _ = config.set_max_write(self.test_upgrade_max_write.unwrap_or(4096));
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let own_stream_end = ((parent.0 == crate::fs::inode::ROOT_INO && name == STREAM_DIR_NAME)
            || parent.0 == STREAM_DIR_INO)
            // Root too: the CSI plugin opens the end for an unprivileged daemon.
            && (is_own_thread(req.pid()) || req.uid() == 0);
        if own_stream_end {
            let _timer = self.timer("lookup");
            match self.fs.lookup_stream_end(parent.0, name) {
                Ok(entry) => reply.entry(&entry.ttl, &to_file_attr(&entry.attr), Generation(0)),
                Err(error) => reply.error(fail("lookup", &error)),
            }
            return;
        }
        let name = name.to_os_string();
        let streams = self.streams.clone();
        self.spawn("lookup", parent, |fs| async move {
            let looked_up = match fs.lookup(parent.0, &name).await {
                // A new stream: its write end is open before the reader's is.
                Ok(entry) if entry.attr.kind == FileKind::Fifo => {
                    let attached = match (streams, fs.stream(entry.attr.ino)) {
                        (Some(streams), Some(stream)) => streams.attach(&fs, stream).await,
                        _ => Err(std::io::Error::other("no stream writer")),
                    };
                    attached.map(|()| entry).map_err(|_| FsError::StreamUnavailable)
                }
                other => other,
            };
            match looked_up {
                Ok(entry) => {
                    tracing::trace!(name = %name.to_string_lossy(), ttl_ms = entry.ttl.as_millis() as u64, "entry");
                    reply.entry(&entry.ttl, &to_file_attr(&entry.attr), Generation(0))
                }
                Err(error) => reply.error(fail("lookup", &error)),
            }
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let _timer = self.timer("forget");
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.spawn("getattr", ino, |fs| async move {
            match fs.getattr(ino.0).await {
                Ok(entry) => reply.attr(&entry.ttl, &to_file_attr(&entry.attr)),
                Err(error) => reply.error(fail("getattr", &error)),
            }
        });
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _timer = self.timer("open");
        // No-open mode: the kernel stops sending OPEN/RELEASE and keeps its page
        // cache across opens; a warm open+read+close then never reaches us.
        reply.error(Errno::ENOSYS);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.spawn("read", ino, |fs| async move {
            match fs.read(ino.0, offset, size).await {
                Ok(data) => reply.data(data.bytes()),
                Err(error) => reply.error(fail("read", &error)),
            }
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.spawn("opendir", ino, |fs| async move {
            match fs.opendir(ino.0).await {
                Ok(handle) => reply.opened(FileHandle(handle), FopenFlags::empty()),
                Err(error) => reply.error(fail("opendir", &error)),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        let _timer = self.timer("readdir");
        match self.fs.readdir(fh.0, offset, READDIR_BATCH) {
            Ok(items) => reply_dir(reply, items),
            // A handle an earlier daemon of this mount opened (--supervise):
            // list the directory again under the same handle.
            Err(FsError::BadHandle(_)) => self.spawn("readdir", ino, move |fs| async move {
                let listed = match fs.reopen_dir(ino.0, fh.0).await {
                    Ok(()) => fs.readdir(fh.0, offset, READDIR_BATCH),
                    Err(error) => Err(error),
                };
                match listed {
                    Ok(items) => reply_dir(reply, items),
                    Err(error) => reply.error(fail("readdir", &error)),
                }
            }),
            Err(error) => reply.error(fail("readdir", &error)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _timer = self.timer("releasedir");
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    // Every other default of fuser's `Filesystem` logs a WARN line per call
    // (with the request's dump) before it answers ENOSYS: each is answered
    // here, at once and silently, as a read-only file system of regular files
    // answers it (docs/SEMANTICS.md, "Operations"). ENOSYS where the kernel
    // then stops asking, or handles the call itself (it remembers ENOSYS for
    // flush, fsync, poll, lseek, bmap and locks); a definite errno elsewhere.
    refuse! {
        // Nothing is ever dirty.
        flush(INodeNo, FileHandle, LockOwner) -> ReplyEmpty = ENOSYS;
        fsync(INodeNo, FileHandle, bool) -> ReplyEmpty = ENOSYS;
        fsyncdir(INodeNo, FileHandle, bool) -> ReplyEmpty = ENOSYS;
        // isatty() from every buffered Python open() (TCGETS), and any other
        // ioctl: what a regular file on ext4 answers. The kernel does not
        // remember it, so each open still costs one round trip here.
        ioctl(INodeNo, FileHandle, fuser::IoctlFlags, u32, &[u8], u32) -> fuser::ReplyIoctl = ENOTTY;
        // No symlinks are ever served: what readlink(2) of anything else gives.
        readlink(INodeNo) -> ReplyData = EINVAL;
        // The kernel falls back to its own poll mask, seek, and local locks.
        poll(INodeNo, FileHandle, fuser::PollNotifier, fuser::PollEvents, fuser::PollFlags) -> fuser::ReplyPoll = ENOSYS;
        lseek(INodeNo, FileHandle, i64, i32) -> fuser::ReplyLseek = ENOSYS;
        getlk(INodeNo, FileHandle, LockOwner, u64, u64, i32, u32) -> fuser::ReplyLock = ENOSYS;
        setlk(INodeNo, FileHandle, LockOwner, u64, u64, i32, u32, bool) -> ReplyEmpty = ENOSYS;
        bmap(INodeNo, u32, u64) -> fuser::ReplyBmap = ENOSYS;
        // Never negotiated (no FUSE_DO_READDIRPLUS): READDIR serves listings.
        readdirplus(INodeNo, FileHandle, u64) -> fuser::ReplyDirectoryPlus = ENOSYS;
    }

    /// `user.ssm.*` and `user.ssmfs.*` (docs/SEMANTICS.md), from the cache.
    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = name.to_owned();
        self.spawn("getxattr", ino, move |fs| async move {
            match fs.xattr(ino.0, &name).await {
                Ok(value) => reply_xattr(reply, &value, size),
                Err(error) => reply.error(fail("getxattr", &error)),
            }
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _timer = self.timer("listxattr");
        match self.fs.xattr_names(ino.0) {
            Ok(names) => {
                let list: Vec<u8> = names
                    .iter()
                    .flat_map(|n| n.bytes().chain(std::iter::once(0)))
                    .collect();
                reply_xattr(reply, &list, size);
            }
            Err(error) => reply.error(fail("listxattr", &error)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _timer = self.timer("statfs");
        let files = self.fs.gauges().inodes as u64;
        // f_namemax is SSM's limit on a name, which also marks a live ssmfs
        // mount for readers that must tell it from an empty directory.
        reply.statfs(
            0,
            0,
            0,
            files,
            0,
            4096,
            crate::names::MAX_NAME_LEN as u32,
            4096,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        let _timer = self.timer("access");
        // default_permissions: the kernel checks modes itself.
        reply.ok();
    }

    // Everything that would change the tree.
    refuse! {
        setattr(
            INodeNo, Option<u32>, Option<u32>, Option<u32>, Option<u64>, Option<TimeOrNow>,
            Option<TimeOrNow>, Option<SystemTime>, Option<FileHandle>, Option<SystemTime>,
            Option<SystemTime>, Option<SystemTime>, Option<fuser::BsdFileFlags>
        ) -> ReplyAttr = EROFS;
        mknod(INodeNo, &OsStr, u32, u32, u32) -> ReplyEntry = EROFS;
        mkdir(INodeNo, &OsStr, u32, u32) -> ReplyEntry = EROFS;
        unlink(INodeNo, &OsStr) -> ReplyEmpty = EROFS;
        rmdir(INodeNo, &OsStr) -> ReplyEmpty = EROFS;
        symlink(INodeNo, &OsStr, &std::path::Path) -> ReplyEntry = EROFS;
        rename(INodeNo, &OsStr, INodeNo, &OsStr, fuser::RenameFlags) -> ReplyEmpty = EROFS;
        link(INodeNo, INodeNo, &OsStr) -> ReplyEntry = EROFS;
        write(
            INodeNo, FileHandle, u64, &[u8], WriteFlags, OpenFlags, Option<LockOwner>
        ) -> ReplyWrite = EROFS;
        create(INodeNo, &OsStr, u32, u32, i32) -> ReplyCreate = EROFS;
        setxattr(INodeNo, &OsStr, &[u8], i32, u32) -> ReplyEmpty = EROFS;
        removexattr(INodeNo, &OsStr) -> ReplyEmpty = EROFS;
        fallocate(INodeNo, FileHandle, u64, u64, i32) -> ReplyEmpty = EROFS;
        copy_file_range(
            INodeNo, FileHandle, u64, INodeNo, FileHandle, u64, u64, fuser::CopyFileRangeFlags
        ) -> ReplyWrite = EROFS;
    }
}

/// Drains the core's invalidations into the kernel from a thread of its own:
/// writing a notification from inside a FUSE callback can deadlock.
pub fn run_invalidations(
    notifier: fuser::Notifier,
    mut invalidations: tokio::sync::mpsc::UnboundedReceiver<crate::fs::Invalidation>,
    announcer: tokio::sync::broadcast::Sender<crate::fs::ChangeNote>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("ssmfs-invalidate".into())
        .spawn(move || {
            while let Some(invalidation) = invalidations.blocking_recv() {
                // ENOENT just means the kernel no longer caches it: nothing to drop.
                let _ = match &invalidation {
                    crate::fs::Invalidation::Inode(ino) => {
                        notifier.inval_inode(INodeNo(*ino), 0, 0)
                    }
                    crate::fs::Invalidation::Entry { parent, name } => {
                        notifier.inval_entry(INodeNo(*parent), OsStr::new(name))
                    }
                    // No stream open: nobody to tell.
                    crate::fs::Invalidation::Announce(note) => {
                        let _ = announcer.send(note.clone());
                        Ok(())
                    }
                };
            }
        })
        .expect("spawning the invalidation thread")
}

/// How long the kernel may wait for the daemon before a request is abandoned
/// by the reader is the kernel's business; this is only the unmount grace.
pub const UNMOUNT_GRACE: Duration = Duration::from_secs(2);
