//! The node's shared mounts: publish and unpublish, linger, and the metrics
//! gathered from the daemons. `registry` holds the mounts under one lock;
//! `recovery` their records in the state directory; `link` is the link to
//! the serving side; `services` the thin gRPC face; `csi::policy` decides
//! what a publish may do.
//!
//! Model: a shared mount is one FUSE mount under the state directory for
//! one identity and one set of options; every pod volume with that key is a
//! read-only bind mount of it, so pods on a node share one cache. The plugin
//! (root) mounts, binds and unmounts; it keeps a copy of each connection's
//! fds (FUSE, journal, session, token) and hands them to the serving side
//! (`serve`), which holds and serves them unprivileged. A shared mount
//! whose last pod left lingers (`--linger`) so pod churn finds it warm.
//! What is mounted is recorded in the state directory (no token, no value)
//! and checked against /proc/self/mountinfo when the plugin starts.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::csi::v1::{NodePublishVolumeRequest, NodeUnpublishVolumeRequest};
use serde_json::json;

use super::control;
use super::error::CsiError;
use super::policy::{self, Policy, Room};
use super::serve::{ConnectionFds, Started};
use super::sys::{self, ServeUser};
use super::volume::{Identity, Publish};
use crate::daemon::{self, MountSettings};

mod link;
mod recovery;
mod registry;
mod services;

use link::Link;
pub use link::{link_key_path, LINK_KEY_FD_ENV};
use registry::{Attachment, Registry, SharedMount};
pub use services::Services;

/// How long a publish waits for the serving side to report the new mount
/// serves: a cold mount is one mount and one SSM call, well under this.
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct DriverSettings {
    pub driver_name: String,
    pub node_id: String,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub serve_user: ServeUser,
    /// The serving side runs elsewhere (a second container): do not start it.
    pub external_serve: bool,
    pub linger: Duration,
    /// The tenant policy: attributes, classes, identities and caps.
    pub policy: Policy,
    /// EKS Pod Identity's agent (`--pod-identity-agent-url`).
    pub pod_identity_agent_url: String,
}

/// A shared mount allowed under the caps and not yet inserted: dropped,
/// it counts nothing any more.
struct Reservation<'a> {
    driver: &'a Driver,
    /// `None` once fulfilled.
    namespace: Option<String>,
}

impl Reservation<'_> {
    /// The mount is in the registry and counts itself: released under the
    /// same lock that inserted it, so no publish sees it twice or not at all.
    fn fulfilled(mut self, registry: &mut Registry) {
        if let Some(namespace) = self.namespace.take() {
            registry.release(&namespace);
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Some(namespace) = self.namespace.take() {
            self.driver.mounts.lock().unwrap().release(&namespace);
        }
    }
}

/// The first 12 hex digits of HMAC-SHA256(salt, key): a log label.
pub fn label(salt: &[u8], key: &str) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(salt).expect("any key length");
    mac.update(key.as_bytes());
    hex::encode(mac.finalize().into_bytes())[..12].to_string()
}

pub struct Driver {
    settings: DriverSettings,
    /// What a serving side proves itself with: holders and daemons run as
    /// the same uid, but never see it (`serve::link_key`).
    link_key: std::sync::OnceLock<zeroize::Zeroizing<Vec<u8>>>,
    /// Drawn at start: log labels of mounts (`label`).
    label_salt: [u8; 16],
    /// The shared mounts by name, and those being created.
    mounts: Mutex<Registry>,
    link: Mutex<Link>,
    /// Publishes and unpublishes of one target one at a time (kubelet
    /// retries); other targets go on meanwhile.
    targets_busy: tokio::sync::Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    /// Publishes creating one shared mount one at a time (two pods of one
    /// identity arriving together share the first one's mount).
    keys_busy: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Serving sides connected now.
    links_open: Arc<std::sync::atomic::AtomicUsize>,
    /// Why the serving side (one-host layout) cannot start, while it cannot:
    /// publishes fail with it rather than wait.
    serve_failure: Mutex<Option<String>>,
}

fn internal(what: &'static str, error: std::io::Error) -> CsiError {
    CsiError::system(what, error)
}

impl Driver {
    pub fn new(settings: DriverSettings) -> Arc<Self> {
        Arc::new(Driver {
            settings,
            link_key: std::sync::OnceLock::new(),
            label_salt: rand::random(),
            mounts: Mutex::new(Registry::default()),
            link: Mutex::new(Link::default()),
            targets_busy: tokio::sync::Mutex::new(HashMap::new()),
            keys_busy: Mutex::new(HashMap::new()),
            links_open: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            serve_failure: Mutex::new(None),
        })
    }

    fn mounts_dir(&self) -> PathBuf {
        self.settings.state_dir.join("mounts")
    }

    /// How logs and metrics name a shared mount: a digest of its key under
    /// a secret drawn at this plugin's start, so a label tells nothing
    /// about the key and changes at each start.
    fn label(&self, key: &str) -> String {
        label(&self.label_salt, key)
    }

    /// Where the daemons' metrics sockets are: the serving user's (0700),
    /// in root's run directory.
    fn metrics_dir(&self) -> PathBuf {
        self.settings.run_dir.join("metrics")
    }

    /// Where the daemon of the mount `name` serves its metrics: a unix
    /// socket in the run directory, so no port to race for and no network
    /// the serving side must share with the plugin; named as the mount is.
    fn metrics_socket(&self, name: &str) -> PathBuf {
        self.metrics_dir().join(format!("{name}.sock"))
    }

    pub fn control_socket(run_dir: &Path) -> PathBuf {
        run_dir.join("control.sock")
    }

    /// Whether `path` is one of this plugin's shared mounts, in service.
    pub fn is_shared_mountpoint(&self, path: &Path) -> bool {
        self.mounts
            .lock()
            .unwrap()
            .values()
            .any(|mount| mount.mountpoint == path && !mount.removing)
    }

    /// Mounts a new shared mount and waits until its first daemon serves.
    fn create_shared(&self, publish: &Publish) -> Result<(String, SharedMount), CsiError> {
        // A random name: mountinfo, which every local user reads, shows the
        // mount point; it must not show the key. The record links the two.
        let name = hex::encode(rand::random::<[u8; 12]>());
        let mountpoint = self.mounts_dir().join(&name);
        std::fs::create_dir_all(&mountpoint)
            .map_err(|e| internal("creating the shared mount point", e))?;
        // Nothing of the path or identity: mountinfo is world-readable.
        let fsname = "ssmfs".to_string();
        let settings = MountSettings {
            mountpoint: mountpoint.clone(),
            fsname,
            allow_other: true,
            allow_root: false,
            threads: 0,
            serve_fd: None,
        };
        let cleanup = |mounted: bool| {
            if mounted {
                let _ = daemon::lazy_unmount(&mountpoint);
            }
            self.forget(&name, &mountpoint);
        };
        let fuse = daemon::mount_device(&settings).map_err(|e| {
            cleanup(false);
            internal("mounting FUSE", e)
        })?;
        let memfds = (|| {
            let journal = sys::memfd(c"ssmfs-inodes")?;
            let session = sys::memfd(c"ssmfs-session")?;
            let token = match &publish.token {
                Some(token) => {
                    let file = sys::memfd(c"ssmfs-token")?;
                    sys::rewrite(&file, token.as_bytes())?;
                    Some(file)
                }
                None => None,
            };
            Ok::<_, std::io::Error>((journal, session, token))
        })();
        let (journal, session, token) = memfds.map_err(|e| {
            cleanup(true);
            internal("creating the mount's memory files", e)
        })?;
        let fds = ConnectionFds {
            fuse,
            journal,
            session,
            token,
        };
        let mut args = publish.daemon_args(&mountpoint);
        if matches!(publish.identity, Identity::PodIdentity { .. }) {
            args.insert(
                0,
                format!(
                    "--pod-identity-agent-url={}",
                    self.settings.pod_identity_agent_url
                ),
            );
        }
        let mut mount = SharedMount {
            key: publish.key.clone(),
            mountpoint: mountpoint.clone(),
            namespace: publish.pod.namespace.clone(),
            identity: publish.identity.clone(),
            options: publish.options.clone(),
            args,
            metrics_socket: self.metrics_socket(&name),
            fds: None,
            targets: BTreeMap::new(),
            idle_since: None,
            served_by: None,
            moving: false,
            removing: false,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        let started = (|| {
            let (link_id, socket) = self.link_socket(deadline)?;
            let (sender, receiver) = mpsc::channel();
            self.link
                .lock()
                .unwrap()
                .waiting
                .insert(name.clone(), sender);
            let message = json!({"op": "start", "id": name, "args": mount.start_args()});
            control::send(&socket, &message, &fds.raw())
                .map_err(|e| internal("handing the mount to the serving side", e))?;
            match receiver.recv_timeout(START_TIMEOUT) {
                Ok(Started::Serving) => Ok(link_id),
                Ok(Started::Failed(failure)) if failure.identity_refused => {
                    Err(CsiError::PermissionDenied(failure.why))
                }
                Ok(Started::Failed(failure)) => Err(CsiError::FailedPrecondition(failure.why)),
                Err(_) => Err(CsiError::DeadlineExceeded(
                    "the serving side did not report the mount serving in 30 s".into(),
                )),
            }
        })();
        let link_id = match started {
            Ok(link_id) => link_id,
            Err(status) => {
                let mut link = self.link.lock().unwrap();
                link.waiting.remove(&name);
                link.tell_all(&json!({"op": "stop", "id": name}));
                drop(link);
                cleanup(true);
                remove_metrics_socket(&mount.metrics_socket);
                return Err(status);
            }
        };
        mount.fds = Some(fds);
        mount.served_by = Some(link_id);
        Ok((name, mount))
    }

    fn publish(&self, request: NodePublishVolumeRequest) -> Result<(), CsiError> {
        let publish = Publish::parse(&request, &self.settings.policy)?;
        let key_busy = self
            .keys_busy
            .lock()
            .unwrap()
            .entry(publish.key.clone())
            .or_default()
            .clone();
        let published = {
            let _one_creation_per_key = key_busy.lock().unwrap();
            self.publish_parsed(&publish)
        };
        let mut busy = self.keys_busy.lock().unwrap();
        if Arc::strong_count(&key_busy) == 2 {
            busy.remove(&publish.key);
        }
        published
    }

    /// Reserves room for `publish`'s new shared mount under the caps
    /// (`policy::room`), removing the idle mounts the policy names first.
    fn make_room(&self, publish: &Publish) -> Result<Reservation<'_>, CsiError> {
        loop {
            let evict = {
                // Checked and reserved under the locks, so that two
                // publishes cannot both take the last place.
                let mut mounts = self.mounts.lock().unwrap();
                match policy::room_for(publish, &self.settings.policy, &mounts.counts())? {
                    Room::Free | Room::Shared => {
                        let namespace = publish.pod.namespace.clone();
                        mounts.reserve(&namespace);
                        return Ok(Reservation {
                            driver: self,
                            namespace: Some(namespace),
                        });
                    }
                    Room::Evict(keys) => keys,
                }
            };
            for name in evict {
                self.remove_shared(&name, "to make room under the caps");
            }
        }
    }

    /// Opens a target's parent below the pods directory, following no
    /// link; `None` if the parent does not exist.
    fn resolve_target(&self, target: &Path) -> Result<Option<sys::Target>, CsiError> {
        match sys::Target::resolve(&self.settings.policy.pods_dir, target) {
            Ok(resolved) => Ok(Some(resolved)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(match error.raw_os_error() {
                Some(libc::ELOOP) | Some(libc::EXDEV) | Some(libc::ENOTDIR) => {
                    CsiError::invalid(format!(
                        "target_path {} passes through a symlink or leaves the pods directory; refusing to mount through it",
                        target.display()
                    ))
                }
                _ => internal("opening target_path's directory", error),
            }),
        }
    }

    fn publish_parsed(&self, publish: &Publish) -> Result<(), CsiError> {
        let target = &publish.target;
        let started = Instant::now();
        let resolved = self.resolve_target(target)?.ok_or_else(|| {
            CsiError::invalid(format!(
                "cannot create target_path {}: its parent directory does not exist",
                target.display()
            ))
        })?;
        // The last component, looked up in the parent opened above.
        let by_fd = resolved.path();
        match std::fs::symlink_metadata(&by_fd) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(CsiError::invalid(format!(
                    "target_path {} is a symlink; refusing to mount through it",
                    target.display()
                )))
            }
            Ok(_) if sys::is_dead_mount(&by_fd) => {}
            Ok(meta) if !meta.is_dir() => {
                return Err(CsiError::invalid(format!(
                    "target_path {} exists and is not a directory",
                    target.display()
                )))
            }
            Ok(_) => {}
            Err(error) if error.raw_os_error() == Some(libc::ENOTCONN) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(internal("target_path", error)),
        }
        let mut mounts = self.mounts.lock().unwrap();
        // Already published here: a republish (fresh token) or a retry.
        let existing = mounts.owner_of(target).map(|name| {
            let mount = &mounts[&name];
            let same = mount.key == publish.key;
            (name, same, mount.targets[target].volume_id.clone())
        });
        if let Some((name, same_key, volume_id)) = existing {
            let alive = daemon::is_mount_point(target)
                && mounts.get(&name).is_some_and(|mount| mount.fds.is_some());
            if alive {
                if !same_key || volume_id != publish.volume_id {
                    return Err(CsiError::AlreadyExists(format!(
                        "target_path {} is published already, for volume {volume_id} with other attributes",
                        target.display()
                    )));
                }
                let mount = mounts.get_mut(&name).expect("found above");
                if let (Some(token), Some(fds)) = (&publish.token, &mount.fds) {
                    if let Some(file) = &fds.token {
                        sys::refresh(file, token.as_bytes())
                            .map_err(|e| internal("refreshing the token", e))?;
                    }
                }
                tracing::debug!(pod = %publish.pod, volume = %publish.volume_id, "republished (token refreshed)");
                return Ok(());
            }
            if let Some(mount) = mounts.get_mut(&name) {
                mount.targets.remove(target);
            }
        }
        // A dead or stale mount left there (not a mount point: EINVAL).
        let _ = resolved.unmount();
        let live = mounts.live(&publish.key);
        let warm = live.is_some();
        if let Some(mount) = live.as_ref().map(|name| &mounts[name]) {
            policy::check_same_mount(&mount.identity, &mount.options, publish)?;
        }
        let name = match live {
            Some(name) => name,
            None => {
                for dead_name in mounts.dead(&publish.key) {
                    if let Some(dead) = mounts.remove(&dead_name) {
                        dead.detach();
                        self.forget(&dead_name, &dead.mountpoint);
                    }
                }
                // Mounting waits on the serving side, which reports through
                // the link thread: the registry is not held meanwhile.
                drop(mounts);
                let reserved = self.make_room(publish)?;
                let (name, created) = self.create_shared(publish)?;
                mounts = self.mounts.lock().unwrap();
                mounts.insert(name.clone(), created);
                // On a failure above, the dropped reservation counts nothing.
                reserved.fulfilled(&mut mounts);
                name
            }
        };
        let mount = mounts.get_mut(&name).expect("found or inserted above");
        if let (Some(token), Some(fds), true) = (&publish.token, &mount.fds, warm) {
            if let Some(file) = &fds.token {
                let _ = sys::refresh(file, token.as_bytes());
            }
        }
        let created_target = match resolved.create_dir() {
            Ok(created) => created,
            Err(error) => {
                let status = CsiError::invalid(format!(
                    "cannot create target_path {}: {error} (its parent must exist)",
                    target.display()
                ));
                self.settle_idle(&name, mount);
                return Err(status);
            }
        };
        if let Err(error) = resolved.bind_read_only(&mount.mountpoint) {
            if created_target {
                let _ = resolved.remove_dir();
            }
            self.settle_idle(&name, mount);
            return Err(internal("bind-mounting the volume", error));
        }
        mount.targets.insert(
            target.clone(),
            Attachment {
                volume_id: publish.volume_id.clone(),
                pod: publish.pod.clone(),
            },
        );
        mount.idle_since = None;
        self.save(&name, mount);
        tracing::info!(
            pod = %publish.pod,
            volume = %publish.volume_id,
            mount = %self.label(&name),
            identity = %publish.identity.describe(),
            warm,
            pods = mount.targets.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "published"
        );
        Ok(())
    }

    /// A shared mount left without pods starts its linger.
    fn settle_idle(&self, name: &str, mount: &mut SharedMount) {
        if mount.targets.is_empty() && mount.idle_since.is_none() {
            mount.idle_since = Some(Instant::now());
        }
        self.save(name, mount);
    }

    fn unpublish(&self, request: NodeUnpublishVolumeRequest) -> Result<(), CsiError> {
        if request.volume_id.is_empty() {
            return Err(CsiError::invalid("volume_id is missing"));
        }
        if request.target_path.is_empty() {
            return Err(CsiError::invalid("target_path is missing"));
        }
        let target = policy::check_target(&request.target_path, &self.settings.policy.pods_dir)?;
        // None: gone with its pod directory, so nothing is mounted there.
        let resolved = self.resolve_target(&target)?;
        if let Some(resolved) = &resolved {
            let by_fd = resolved.path();
            if std::fs::symlink_metadata(&by_fd).is_ok_and(|meta| meta.file_type().is_symlink()) {
                return Err(CsiError::invalid(format!(
                    "target_path {} is a symlink; refusing to unmount through it",
                    target.display()
                )));
            }
            match resolved.unmount() {
                // EINVAL: nothing is mounted there; ENOENT: nor is it there.
                Err(error)
                    if !matches!(error.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) =>
                {
                    return Err(internal("unmounting the target", error))
                }
                _ => {}
            }
            match resolved.remove_dir() {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(internal("removing target_path", error)),
            }
        }
        let mut mounts = self.mounts.lock().unwrap();
        if let Some(name) = mounts.owner_of(&target) {
            let mount = mounts.get_mut(&name).expect("found above");
            if let Some(attachment) = mount.targets.remove(&target) {
                tracing::info!(pod = %attachment.pod, volume = %attachment.volume_id, mount = %self.label(&name), pods = mount.targets.len(), "unpublished");
            }
            self.settle_idle(&name, mount);
        }
        Ok(())
    }

    /// Removes shared mounts idle for longer than the linger.
    pub fn remove_lingering(&self) {
        let linger = self.settings.linger;
        let expired: Vec<String> = {
            let mounts = self.mounts.lock().unwrap();
            mounts
                .iter()
                .filter(|(_, m)| {
                    m.targets.is_empty() && m.idle_since.is_some_and(|t| t.elapsed() >= linger)
                })
                .map(|(name, _)| name.clone())
                .collect()
        };
        for name in expired {
            self.remove_shared(&name, "no pod used it for the linger");
        }
    }

    /// Unmounts an idle shared mount and stops its holder.
    fn remove_shared(&self, name: &str, why: &str) {
        let mut mounts = self.mounts.lock().unwrap();
        // Still idle: a publish may have bound a pod since it was picked.
        if !mounts
            .get(name)
            .is_some_and(|m| m.targets.is_empty() && !m.removing)
        {
            return;
        }
        let Some(mut mount) = mounts.remove(name) else {
            return;
        };
        drop(mounts);
        mount.removing = true;
        // The last mount of the connection: its end ends the holder.
        if let Err(error) = daemon::lazy_unmount(&mount.mountpoint) {
            tracing::warn!(mount = %self.label(name), %error, "could not unmount the idle shared mount");
        }
        self.link
            .lock()
            .unwrap()
            .tell_all(&json!({"op": "stop", "id": name}));
        self.forget(name, &mount.mountpoint);
        remove_metrics_socket(&mount.metrics_socket);
        tracing::info!(mount = %self.label(name), reason = why, "removed an idle shared mount");
    }

    /// Prometheus text: the shared mounts, the pods on each, and each
    /// mount's daemon's own metrics (calls, hits...) labelled with its key.
    pub fn metrics(&self) -> String {
        let daemons: Vec<(String, String)> = {
            let mounts = self.mounts.lock().unwrap();
            mounts
                .iter()
                .map(|(name, mount)| {
                    let addr = format!("unix:{}", mount.metrics_socket.display());
                    (self.label(name), addr)
                })
                .collect()
        };
        let mut gathered = String::new();
        let mut described = std::collections::HashSet::new();
        for (key, addr) in daemons {
            let Some(text) = fetch_metrics(&addr) else {
                continue;
            };
            for line in text.lines() {
                if line.starts_with('#') {
                    if described.insert(line.to_string()) {
                        gathered.push_str(line);
                        gathered.push('\n');
                    }
                    continue;
                }
                let labelled = match line.split_once('{') {
                    Some((name, rest)) => format!("{name}{{mount=\"{key}\",{rest}"),
                    None => match line.split_once(' ') {
                        Some((name, value)) => format!("{name}{{mount=\"{key}\"}} {value}"),
                        None => continue,
                    },
                };
                gathered.push_str(&labelled.replace(",}", "}"));
                gathered.push('\n');
            }
        }
        let mounts = self.mounts.lock().unwrap();
        let mut out = String::from(
            "# HELP ssmfs_csi_shared_mounts Shared mounts on this node.\n# TYPE ssmfs_csi_shared_mounts gauge\n",
        );
        out.push_str(&format!("ssmfs_csi_shared_mounts {}\n", mounts.len()));
        out.push_str("# HELP ssmfs_csi_pods_attached Pod volumes bound to each shared mount.\n# TYPE ssmfs_csi_pods_attached gauge\n");
        for (name, mount) in mounts.iter() {
            out.push_str(&format!(
                "ssmfs_csi_pods_attached{{mount=\"{}\"}} {}\n",
                self.label(name),
                mount.targets.len()
            ));
        }
        out.push_str(&gathered);
        out
    }

    /// The turn of one target's publishes and unpublishes.
    async fn target_busy(&self, target: &str) -> TargetTurn {
        let lock = {
            let mut busy = self.targets_busy.lock().await;
            // Forget the targets nobody waits on (kubelet's paths come and go).
            busy.retain(|_, lock| Arc::strong_count(lock) > 1);
            busy.entry(PathBuf::from(target)).or_default().clone()
        };
        lock.lock_owned().await
    }

    pub fn held_fds(&self) -> usize {
        let mounts = self.mounts.lock().unwrap();
        mounts
            .values()
            .filter(|m| m.fds.as_ref().is_some_and(|f| f.fuse.as_raw_fd() > 0))
            .count()
    }
}

type TargetTurn = tokio::sync::OwnedMutexGuard<()>;

/// A daemon's metrics page, over loopback (one second at most).
/// Removes a gone daemon's metrics socket (a unix socket in the run
/// directory; never any other file).
fn remove_metrics_socket(socket: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(socket).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(socket);
    }
}

fn fetch_metrics(addr: &str) -> Option<String> {
    let addr = addr.parse().ok()?;
    crate::daemon::metrics_http::fetch(&addr, MAX_DAEMON_METRICS)
}

/// A daemon's metrics page is a few KiB; past this it is not one.
const MAX_DAEMON_METRICS: usize = 1 << 20;
