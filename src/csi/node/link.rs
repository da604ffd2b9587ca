//! The plugin's link to its serving side: the control socket, the link
//! key a serving side proves itself with, the one-host keeper that starts
//! csi-serve (and tells a live one from a recycled pid), and the messages
//! that hand connections over: who holds what, who is current (the
//! youngest keyed side), handovers on a surge, mounts nobody holds.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::super::control;
use super::super::error::CsiError;
use super::super::serve::{ConnectionFds, Started};
use super::super::sys;
use super::Driver;

/// Serving sides connected at once, at most: a DaemonSet surge has two;
/// a peer past this is turned away rather than given a thread.
pub(super) const MAX_LINKS: usize = 8;

/// A serving side connected to the plugin.
pub(super) struct Linked {
    pub(super) socket: Arc<std::os::fd::OwnedFd>,
    /// When that serving side started: the youngest serves everything, so
    /// a DaemonSet's surge pod takes over from the pod it replaces.
    pub(super) born: u64,
    /// It proved itself with the link key. One that did not (a serving side
    /// of an earlier release, during an upgrade) may say what it holds and
    /// hand it over, but is never handed a connection.
    pub(super) keyed: bool,
}

/// How a serving side's connection began.
pub(super) enum LinkProof {
    /// Its first message carried the link key.
    Key,
    /// Its first message (given back here) was another: an earlier release.
    EarlierRelease(Value, Vec<std::os::fd::OwnedFd>),
}

#[derive(Default)]
pub(super) struct Link {
    /// Serving sides that said hello, by connection number.
    pub(super) linked: HashMap<u64, Linked>,
    pub(super) next_id: u64,
    /// When the first serving side said hello to this plugin.
    pub(super) first_hello: Option<Instant>,
    /// Publishes waiting for their mount's first holder to serve, by its name.
    pub(super) waiting: HashMap<String, mpsc::Sender<Started>>,
}

impl Link {
    /// The serving side that should serve every mount: the youngest.
    pub(super) fn current(&self) -> Option<(u64, Arc<std::os::fd::OwnedFd>)> {
        self.linked
            .iter()
            .filter(|(_, linked)| linked.keyed)
            .max_by_key(|(id, linked)| (linked.born, **id))
            .map(|(id, linked)| (*id, linked.socket.clone()))
    }

    pub(super) fn socket(&self, id: u64) -> Option<Arc<std::os::fd::OwnedFd>> {
        self.linked.get(&id).map(|linked| linked.socket.clone())
    }

    /// Tells every serving side (a mount removed: held or kept copies go).
    pub(super) fn tell_all(&self, message: &Value) {
        for linked in self.linked.values() {
            let _ = control::send(&linked.socket, message, &[]);
        }
    }
}

/// How long a mount whose resume failed waits for the next try: its
/// readers wait meanwhile, so soon, but not in a tight loop.
pub(super) const RESUME_RETRY: Duration = Duration::from_secs(2);
/// How long after the first serving side's hello a mount nobody reported
/// holding counts as dead: every live serving side reconnects within a
/// few of its 100 ms retries.
pub(super) const HELLO_SETTLE: Duration = Duration::from_millis(1500);

/// First wait before starting a serving side again after a failed start;
/// doubled per failure up to `SERVE_RETRY_LAST` (a cause such as a
/// permission is not fixed in a second).
pub(super) const SERVE_RETRY_FIRST: Duration = Duration::from_secs(1);
pub(super) const SERVE_RETRY_LAST: Duration = Duration::from_secs(30);

/// The running binary, opened by the plugin (root) for the serving side to
/// be executed from. Refused when anyone but root may write it: the plugin
/// would start what they wrote.
pub(super) struct ServingBinary {
    pub(super) file: std::fs::File,
    pub(super) path: PathBuf,
}

impl ServingBinary {
    pub(super) fn open() -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let path = std::env::current_exe()?;
        let file = std::fs::File::open("/proc/self/exe")?;
        let meta = file.metadata()?;
        if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
            return Err(std::io::Error::other(format!(
                "the binary {} must be owned by root and writable by root alone (owner uid {}, mode {:o}): the serving side runs it",
                path.display(),
                meta.uid(),
                meta.mode() & 0o7777
            )));
        }
        Ok(Self { file, path })
    }
}

/// What /proc says of a process, to tell a serving side from a recycled pid.
pub(super) struct ServingRecord {
    pub(super) uid: u32,
    /// Clock ticks after boot (`/proc/PID/stat`'s 22nd field): no two
    /// processes with one pid share it.
    pub(super) started: u64,
    pub(super) zombie: bool,
}

impl ServingRecord {
    pub(super) fn of(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may hold spaces and parentheses: fields count
        // from the last ')'.
        let after_name = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let state = *fields.first()?;
        let started = fields.get(19)?.parse().ok()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let uid = status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(ServingRecord {
            uid,
            started,
            zombie: state == "Z",
        })
    }

    /// `PID STARTED` as the plugin writes it; an older plugin's bare pid
    /// cannot be told from a recycled one, so it is not trusted.
    pub(super) fn parse(record: &str) -> Option<(u32, u64)> {
        let mut fields = record.split_whitespace();
        let pid = fields.next()?.parse().ok()?;
        let started = fields.next()?.parse().ok()?;
        Some((pid, started))
    }
}

/// How long a connecting serving side has to prove itself (its first
/// message, the link key): a silent peer holds a place no longer.
pub(super) const LINK_PROOF_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the plugin keeps the link key: root's (0600) in the run
/// directory, which the serving container also mounts; csi-serve reads it
/// as root before it drops to the serving user, or gets it on an fd.
pub fn link_key_path(run_dir: &Path) -> PathBuf {
    run_dir.join("link.key")
}

/// The environment variable naming the fd a csi-serve the plugin started
/// reads the link key from.
pub const LINK_KEY_FD_ENV: &str = "SSMFS_LINK_KEY_FD";

impl Driver {
    /// Listens for the serving side; in the one-host layout starts it too.
    pub fn start_serving_link(self: &Arc<Self>) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.settings.run_dir)?;
        let user = self.settings.serve_user;
        // Root's: the serving user owns the socket alone, so it cannot
        // replace it or lead root's chmod and chown elsewhere.
        std::os::unix::fs::chown(&self.settings.run_dir, Some(0), Some(0))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            &self.settings.run_dir,
            std::fs::Permissions::from_mode(0o755),
        )?;
        let metrics = self.metrics_dir();
        std::fs::create_dir_all(&metrics)?;
        std::os::unix::fs::chown(&metrics, Some(user.uid), Some(user.gid))?;
        std::fs::set_permissions(&metrics, std::fs::Permissions::from_mode(0o700))?;
        let key = sys::node_secret(&link_key_path(&self.settings.run_dir))?;
        let _ = self.link_key.set(zeroize::Zeroizing::new(key));
        let socket = Self::control_socket(&self.settings.run_dir);
        let listener = control::listen(&socket, Some((user.uid, user.gid)))?;
        super::super::streams::listen(self.clone(), &self.settings.run_dir, (user.uid, user.gid))?;
        let driver = self.clone();
        std::thread::Builder::new()
            .name("ssmfs-csi-link".into())
            .spawn(move || loop {
                match control::accept(&listener) {
                    Ok(link) => {
                        if let Err(refusal) = driver.admit_link(&link) {
                            tracing::warn!("{refusal}");
                            continue;
                        }
                        // Two serving sides at once during a surge update.
                        let driver = driver.clone();
                        let open = driver.links_open.clone();
                        open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let spawned = std::thread::Builder::new()
                            .name("ssmfs-csi-linked".into())
                            .spawn(move || {
                                match driver.check_link_key(&link) {
                                    Ok(proof) => driver.serve_link(Arc::new(link), proof),
                                    Err(refusal) => tracing::warn!("{refusal}"),
                                }
                                open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                            });
                        if let Err(error) = spawned {
                            tracing::error!(%error, "cannot serve a serving side's link");
                        }
                    }
                    Err(error) => {
                        tracing::error!(%error, "the control socket failed");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            })?;
        if !self.settings.external_serve {
            let binary = ServingBinary::open()?;
            let driver = self.clone();
            std::thread::Builder::new()
                .name("ssmfs-csi-keeper".into())
                .spawn(move || driver.keep_serving_side(binary))?;
        }
        Ok(())
    }

    /// The uid the serving side and its daemons run as.
    pub fn serving_uid(&self) -> u32 {
        self.settings.serve_user.uid
    }

    /// Whether a connection to the control socket may speak for a serving
    /// side: its peer must run as the serving user (or root), whatever it
    /// says; and no more than `MAX_LINKS` at once.
    pub(super) fn admit_link(&self, link: &std::os::fd::OwnedFd) -> Result<(), String> {
        let peer = sys::peer_credentials(link).map_err(|error| {
            format!("refused a control connection: its peer is unknown ({error})")
        })?;
        let serving = self.settings.serve_user.uid;
        if peer.uid != serving && peer.uid != 0 {
            return Err(format!(
                "refused a control connection from pid {} uid {}: only the serving side's user (uid {serving}) may connect",
                peer.pid, peer.uid
            ));
        }
        if self.links_open.load(std::sync::atomic::Ordering::SeqCst) >= MAX_LINKS {
            return Err(format!(
                "refused a control connection from pid {}: {MAX_LINKS} serving sides are connected already",
                peer.pid
            ));
        }
        Ok(())
    }

    /// A serving side's first message proves it holds the link key: the
    /// serving uid alone does not tell csi-serve from its holders and
    /// daemons, which run as that uid too but never get the key.
    pub(super) fn check_link_key(&self, link: &std::os::fd::OwnedFd) -> Result<LinkProof, String> {
        let peer = sys::peer_credentials(link)
            .map(|p| format!("pid {} uid {}", p.pid, p.uid))
            .unwrap_or_else(|_| "an unknown peer".into());
        let refused = |why: &str| {
            format!("refused a control connection from {peer}: {why}; only csi-serve holds the link key")
        };
        control::set_receive_timeout(link, LINK_PROOF_TIMEOUT)
            .map_err(|e| refused(&e.to_string()))?;
        let first = control::receive(link);
        control::set_receive_timeout(link, Duration::ZERO).map_err(|e| refused(&e.to_string()))?;
        let (message, fds) = match first {
            Ok(Some(received)) => received,
            Ok(None) => return Err(refused("it closed before proving itself")),
            Err(error) => return Err(refused(&format!("no proof ({error})"))),
        };
        let expected = self
            .link_key
            .get()
            .ok_or_else(|| refused("no link key yet"))?;
        if message["op"] != "auth" {
            // A serving side of an earlier release speaks first of what it
            // holds: it may go on, but is never handed a connection.
            return Ok(LinkProof::EarlierRelease(message, fds));
        }
        let given = message["key"]
            .as_str()
            .and_then(|key| hex::decode(key).ok())
            .map(zeroize::Zeroizing::new);
        let matches = given.is_some_and(|given| {
            use subtle::ConstantTimeEq;
            given.len() == expected.len() && bool::from(given.ct_eq(expected))
        });
        if !matches || !fds.is_empty() {
            return Err(refused("its first message is not the link key"));
        }
        Ok(LinkProof::Key)
    }

    pub(super) fn serve_pid_file(&self) -> PathBuf {
        self.settings.state_dir.join("serve.pid")
    }

    /// A serving side an earlier plugin started, still alive: the recorded
    /// pid, run by the serving uid, started when recorded, from an ssmfs
    /// binary. A local user's process that catches a recycled pid (with
    /// "csi-serve" in its arguments, say) matches none of these, so the
    /// plugin does not wait on it.
    pub(super) fn surviving_serving_side(&self) -> Option<u32> {
        let record = std::fs::read_to_string(self.serve_pid_file()).ok()?;
        let (pid, started) = ServingRecord::parse(&record)?;
        let process = ServingRecord::of(pid)?;
        let binary_name = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
        let from_ssmfs = binary_name
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("ssmfs"));
        (process.uid == self.settings.serve_user.uid
            && process.started == started
            && !process.zombie
            && from_ssmfs)
            .then_some(pid)
    }

    /// One-host layout: starts the serving side, and again whenever it ends.
    /// A start that fails is logged once per cause and tried again less and
    /// less often; publishes meanwhile fail with that cause.
    pub(super) fn keep_serving_side(self: Arc<Self>, binary: ServingBinary) {
        let mut backoff = SERVE_RETRY_FIRST;
        loop {
            if let Some(pid) = self.surviving_serving_side() {
                // An earlier plugin's: it reconnects by itself. Wait for its end.
                while std::path::Path::new(&format!("/proc/{pid}")).exists()
                    && self.surviving_serving_side() == Some(pid)
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            let started = Instant::now();
            let failure = match self.spawn_serving_side(&binary) {
                Ok(mut child) => {
                    let pid = child.id();
                    if let Some(process) = ServingRecord::of(pid) {
                        let _ = std::fs::write(
                            self.serve_pid_file(),
                            format!("{pid} {}\n", process.started),
                        );
                    }
                    *self.serve_failure.lock().unwrap() = None;
                    let status = child.wait().ok();
                    tracing::warn!(pid, ?status, "the serving side ended; starting another");
                    let lived = started.elapsed();
                    match lived < SERVE_RETRY_FIRST {
                        true => status.map(|status| {
                            format!(
                                "the serving side ({}) exited at once ({status})",
                                binary.path.display()
                            )
                        }),
                        false => None,
                    }
                }
                Err(error) => Some(format!(
                    "cannot start the serving side from {}: {error}",
                    binary.path.display()
                )),
            };
            match failure {
                Some(reason) => {
                    let mut recorded = self.serve_failure.lock().unwrap();
                    if recorded.as_deref() != Some(reason.as_str()) {
                        tracing::error!(
                            "{reason}; trying again every {}s at most",
                            SERVE_RETRY_LAST.as_secs()
                        );
                        *recorded = Some(reason);
                    }
                    drop(recorded);
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(SERVE_RETRY_LAST);
                }
                None => {
                    backoff = SERVE_RETRY_FIRST;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    pub(super) fn spawn_serving_side(
        &self,
        binary: &ServingBinary,
    ) -> std::io::Result<std::process::Child> {
        use crate::handoff::{EXECUTABLE_FD, EXECUTABLE_FD_ENV};
        use std::os::unix::process::CommandExt;
        let user = self.settings.serve_user;
        let c = |path: &Path| {
            std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
                .map_err(std::io::Error::other)
        };
        let writable = c(&self.settings.run_dir)?;
        let (dev_null, dev_fuse) = (c(Path::new("/dev/null"))?, c(Path::new("/dev/fuse"))?);
        let binary_fd = binary.file.as_raw_fd();
        // The link key on an fd of its own: never in its environment or on
        // its command line, and gone (closed) once it has read it.
        let key = self
            .link_key
            .get()
            .ok_or_else(|| std::io::Error::other("no link key yet"))?;
        let key_file = crate::handoff::ArgsFile::new(&[hex::encode(&**key)])?;
        let key_fd = key_file.raw();
        // The binary the plugin opened, through its fd: never its path, which
        // the serving user may not be allowed to resolve.
        let mut command = std::process::Command::new(format!("/proc/self/fd/{EXECUTABLE_FD}"));
        command
            .arg0(&binary.path)
            .arg("csi-serve")
            .arg("--run-dir")
            .arg(&self.settings.run_dir)
            .env(EXECUTABLE_FD_ENV, EXECUTABLE_FD.to_string())
            .env(LINK_KEY_FD_ENV, key_fd.to_string())
            .current_dir("/");
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(move || {
                // dup2 clears close-on-exec: the serving side keeps it for its
                // holders (if it already is fd 9, dup2 does nothing: clear it).
                let placed = if binary_fd == EXECUTABLE_FD {
                    libc::fcntl(EXECUTABLE_FD, libc::F_SETFD, 0)
                } else {
                    libc::dup2(binary_fd, EXECUTABLE_FD)
                };
                if placed < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                crate::handoff::ArgsFile::inherit(key_fd)?;
                // Its own session: a kill of the plugin leaves it serving.
                libc::setsid();
                sys::enter_serving_sandbox(user, &writable, &dev_null, &dev_fuse)
            });
        }
        let child = command.spawn()?;
        drop(key_file);
        tracing::info!(pid = child.id(), uid = user.uid, "serving side started");
        Ok(child)
    }

    /// One connection from a serving side, until it closes.
    pub(super) fn serve_link(
        self: &Arc<Self>,
        socket: Arc<std::os::fd::OwnedFd>,
        proof: LinkProof,
    ) {
        let id = {
            let mut link = self.link.lock().unwrap();
            link.next_id += 1;
            link.next_id
        };
        let keyed = matches!(proof, LinkProof::Key);
        let mut first = match proof {
            LinkProof::Key => None,
            LinkProof::EarlierRelease(message, fds) => {
                tracing::warn!(link = id, "a serving side without the link key (an earlier release) is connected: it may hold and hand over mounts, never be handed one");
                Some((message, fds))
            }
        };
        let mut had = 0;
        loop {
            let received = match first.take() {
                Some(first) => Some(first),
                None => control::receive(&socket).ok().flatten(),
            };
            let Some((message, fds)) = received else {
                break;
            };
            let name = message["id"].as_str().unwrap_or_default().to_string();
            match message["op"].as_str() {
                Some("have") => {
                    let serving = message["serving"].as_bool().unwrap_or(true);
                    let mut mounts = self.mounts.lock().unwrap();
                    match mounts.get_mut(&name) {
                        Some(mount) => {
                            if mount.fds.is_none() {
                                mount.fds = ConnectionFds::from_received(fds).ok();
                            }
                            let elsewhere = mount.served_by.is_some_and(|other| {
                                other != id && self.link.lock().unwrap().linked.contains_key(&other)
                            });
                            if serving && elsewhere {
                                // Never two holders on one connection.
                                let stop = json!({"op": "stop", "id": name, "handover": true});
                                let _ = control::send(&socket, &stop, &[]);
                            } else if serving {
                                mount.served_by = Some(id);
                                had += 1;
                            }
                        }
                        None => {
                            tracing::warn!(mount = %self.label(&name), "the serving side holds a mount this plugin has no record of; it is stopped");
                            let _ = control::send(&socket, &json!({"op": "stop", "id": name}), &[]);
                        }
                    }
                }
                Some("hello") => {
                    let born = message["born"].as_u64().unwrap_or(0);
                    let first_hello = {
                        let mut link = self.link.lock().unwrap();
                        link.linked.insert(
                            id,
                            Linked {
                                socket: socket.clone(),
                                born,
                                keyed,
                            },
                        );
                        *link.first_hello.get_or_insert_with(Instant::now)
                    };
                    tracing::info!(link = id, held = had, "a serving side is connected");
                    // Mounts nobody holds are dead, once every serving side
                    // that lives has had the time to say what it holds.
                    let settle = HELLO_SETTLE.saturating_sub(first_hello.elapsed());
                    if settle.is_zero() {
                        self.detach_unheld();
                    } else {
                        let driver = self.clone();
                        std::thread::spawn(move || {
                            std::thread::sleep(settle);
                            driver.detach_unheld();
                            driver.rebalance();
                        });
                    }
                    self.rebalance();
                }
                Some("started") => {
                    let started = Started::from_message(&message);
                    let failed = matches!(started, Started::Failed(_));
                    if let Some(mount) = self.mounts.lock().unwrap().get_mut(&name) {
                        if failed && mount.served_by == Some(id) {
                            mount.served_by = None;
                        }
                    }
                    let waiter = self.link.lock().unwrap().waiting.remove(&name);
                    match (waiter, started) {
                        (Some(waiter), started) => {
                            let _ = waiter.send(started);
                        }
                        (None, Started::Failed(failure)) => {
                            // Its readers wait meanwhile: try again shortly.
                            tracing::error!(mount = %self.label(&name), reason = %failure, "the serving side could not resume a mount; trying again in 2 s");
                            let driver = self.clone();
                            std::thread::spawn(move || {
                                std::thread::sleep(RESUME_RETRY);
                                driver.rebalance();
                            });
                        }
                        (None, Started::Serving) => self.tell_ready_when_all_served(),
                    }
                }
                Some("stopped") => {
                    let handed = match self.mounts.lock().unwrap().get_mut(&name) {
                        Some(mount) if mount.moving && mount.served_by == Some(id) => {
                            mount.moving = false;
                            mount.served_by = None;
                            true
                        }
                        _ => false,
                    };
                    if handed {
                        self.rebalance();
                    }
                }
                Some("ended") => self.holder_ended(&name),
                other => tracing::warn!(op = ?other, "unknown message from the serving side"),
            }
        }
        self.link.lock().unwrap().linked.remove(&id);
        let orphaned = {
            let mut mounts = self.mounts.lock().unwrap();
            let mut orphaned = 0;
            for mount in mounts.values_mut() {
                if mount.served_by == Some(id) {
                    mount.served_by = None;
                    mount.moving = false;
                    orphaned += 1;
                }
            }
            orphaned
        };
        tracing::info!(
            link = id,
            orphaned,
            "a serving side disconnected; the plugin holds every connection meanwhile"
        );
        self.rebalance();
    }

    /// Recorded, mounted, and held by nobody: every serving side died with
    /// this plugin's predecessor, and the kernel ended the connection (its
    /// root's cached attributes may still answer a stat: only the fds tell).
    pub(super) fn detach_unheld(&self) {
        let mut mounts = self.mounts.lock().unwrap();
        let dead: Vec<String> = mounts
            .iter()
            .filter(|(_, mount)| mount.fds.is_none())
            .map(|(name, _)| name.clone())
            .collect();
        for name in &dead {
            let mount = mounts.remove(name).expect("listed above");
            tracing::warn!(mount = %self.label(name), pods = mount.targets.len(), "no process held the shared mount any more; detaching it and its targets (their next publish mounts anew)");
            mount.detach();
            self.forget(name, &mount.mountpoint);
        }
    }

    /// Moves every mount to the current (youngest) serving side: a mount
    /// nobody serves is started there; one an older side serves is first
    /// stopped there ("handover"), and started when that side says it
    /// stopped, so no two holders ever read one connection.
    pub(super) fn rebalance(&self) {
        let mut mounts = self.mounts.lock().unwrap();
        let link = self.link.lock().unwrap();
        let Some((current, socket)) = link.current() else {
            return;
        };
        let (mut resumed, mut moving) = (0, 0);
        for (name, mount) in mounts.iter_mut() {
            if mount.removing || mount.moving || mount.served_by == Some(current) {
                continue;
            }
            let Some(fds) = &mount.fds else { continue };
            match mount.served_by.and_then(|other| link.socket(other)) {
                Some(older) => {
                    let stop = json!({"op": "stop", "id": name, "handover": true});
                    if control::send(&older, &stop, &[]).is_ok() {
                        mount.moving = true;
                        moving += 1;
                    }
                }
                None => {
                    let message = json!({"op": "start", "id": name, "args": mount.start_args()});
                    match control::send(&socket, &message, &fds.raw()) {
                        Ok(()) => {
                            mount.served_by = Some(current);
                            resumed += 1;
                        }
                        Err(error) => {
                            tracing::error!(mount = %self.label(name), %error, "could not hand the mount to the serving side")
                        }
                    }
                }
            }
        }
        if resumed + moving > 0 {
            tracing::info!(
                link = current,
                resumed,
                moving,
                "mounts handed to the current serving side"
            );
        }
        drop(link);
        drop(mounts);
        self.tell_ready_when_all_served();
    }

    /// The current serving side hears it serves every mount: its readiness
    /// (a DaemonSet surge replaces the older side's pod only then).
    pub(super) fn tell_ready_when_all_served(&self) {
        let mounts = self.mounts.lock().unwrap();
        let link = self.link.lock().unwrap();
        let Some((current, socket)) = link.current() else {
            return;
        };
        let all = mounts
            .values()
            .filter(|mount| !mount.removing && mount.fds.is_some())
            .all(|mount| mount.served_by == Some(current) && !mount.moving);
        if all && link.waiting.is_empty() {
            let _ = control::send(&socket, &json!({"op": "ready"}), &[]);
        }
    }

    /// A holder ended without being asked: it gave up (no daemon could
    /// serve for --restart-deadline). Readers get an error, not a wait.
    pub(super) fn holder_ended(&self, name: &str) {
        let mut mounts = self.mounts.lock().unwrap();
        let Some(mount) = mounts.get(name) else {
            return;
        };
        if mount.removing {
            return;
        }
        tracing::error!(mount = %self.label(name), "the shared mount's holder gave up; aborting it so readers get an error (the next publish mounts it anew)");
        if let Some(entry) = sys::mounts()
            .ok()
            .and_then(|all| all.into_iter().find(|e| e.mount_point == mount.mountpoint))
        {
            sys::abort_connection(&entry.minor);
        }
        if let Some(mount) = mounts.remove(name) {
            mount.detach();
            self.forget(name, &mount.mountpoint);
        }
    }

    /// Waits for the current serving side's link (it may be starting).
    pub(super) fn link_socket(
        &self,
        deadline: Instant,
    ) -> Result<(u64, Arc<std::os::fd::OwnedFd>), CsiError> {
        loop {
            if let Some(current) = self.link.lock().unwrap().current() {
                return Ok(current);
            }
            if let Some(reason) = self.serve_failure.lock().unwrap().clone() {
                return Err(CsiError::Unavailable(reason));
            }
            if Instant::now() > deadline {
                return Err(CsiError::Unavailable(
                    "the serving side (ssmfs csi-serve) is not connected to the plugin".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
