//! `ssmfs csi-serve`: the unprivileged serving side of the CSI driver. It
//! connects to the plugin's control socket and, for every shared mount the
//! plugin hands it (the FUSE fd, the journal, the session, the token), runs
//! a holder: this binary with `--supervise --adopt-fds`, which relays the
//! connection to serving daemons (`crate::supervisor`). Holders die with
//! this process; the plugin keeps copies of every fd, so the connections
//! live on, and the next serving side resumes them. When the plugin goes,
//! this side keeps serving and reconnects, saying first what it holds.
//!
//! Two serving sides may be connected at once (a DaemonSet surge update
//! starts the new pod before it deletes the old one): the plugin serves
//! every mount from the youngest. It asks the older one to stop each holder
//! ("handover"), which keeps its copies of the fds until it exits, so some
//! process holds every connection whichever pod goes first. The plugin
//! says "ready" once this side serves everything; `--ready-file` records
//! it for the pod's readiness probe (`--check-ready`).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use super::control;
use crate::daemon::StartFailure;
use crate::handoff::{
    HOLDER_FUSE_FD, HOLDER_JOURNAL_FD, HOLDER_SESSION_FD, HOLDER_TOKEN_FD, HOLDER_VERDICT_FD,
};

/// How often a serving side without a plugin tries its socket again: a
/// restarted plugin hears from it at once.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);
/// How often holders are checked for an exit.
const REAP_PAUSE: Duration = Duration::from_millis(100);

/// A connection's fds, in the order they travel.
pub struct ConnectionFds {
    pub fuse: OwnedFd,
    pub journal: OwnedFd,
    pub session: OwnedFd,
    pub token: Option<OwnedFd>,
}

impl ConnectionFds {
    pub fn from_received(mut fds: Vec<OwnedFd>) -> io::Result<Self> {
        if fds.len() < 3 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a connection needs at least three fds",
            ));
        }
        let token = (fds.len() > 3).then(|| fds.remove(3));
        let session = fds.remove(2);
        let journal = fds.remove(1);
        let fuse = fds.remove(0);
        Ok(ConnectionFds {
            fuse,
            journal,
            session,
            token,
        })
    }

    pub fn raw(&self) -> Vec<i32> {
        let mut fds = vec![
            self.fuse.as_raw_fd(),
            self.journal.as_raw_fd(),
            self.session.as_raw_fd(),
        ];
        fds.extend(self.token.as_ref().map(AsRawFd::as_raw_fd));
        fds
    }
}

struct Held {
    fds: ConnectionFds,
    args: Vec<String>,
    holder: Child,
}

#[derive(Default)]
struct State {
    held: HashMap<String, Held>,
    /// Handed over to a younger serving side: copies kept until exit.
    released: HashMap<String, (ConnectionFds, Vec<String>)>,
    link: Option<Arc<OwnedFd>>,
    ready_file: Option<PathBuf>,
}

impl State {
    fn set_ready(&self, ready: bool) {
        let Some(path) = &self.ready_file else {
            return;
        };
        let outcome = if ready {
            std::fs::write(path, format!("{}\n", std::process::id()))
        } else {
            match std::fs::remove_file(path) {
                Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
                other => other,
            }
        };
        if let Err(error) = outcome {
            tracing::warn!(path = %path.display(), %error, "could not update the ready file");
        }
    }
}

/// `--check-ready`: whether the serving side that writes `path` serves
/// every mount (the readiness probe's command: the image has no shell).
pub fn check_ready(path: &std::path::Path) -> anyhow::Result<()> {
    match std::fs::metadata(path) {
        Ok(_) => Ok(()),
        Err(error) => Err(anyhow::anyhow!(
            "not ready: {} ({error}); this serving side does not serve every mount yet",
            path.display()
        )),
    }
}

/// A mount's name in this side's log: never its key, and another one at
/// each start (`node::label` under a secret drawn now).
fn log_label(key: &str) -> String {
    static SALT: std::sync::LazyLock<[u8; 16]> = std::sync::LazyLock::new(rand::random);
    super::node::label(&*SALT, key)
}

fn tell(state: &Mutex<State>, message: Value, fds: &[i32]) {
    let link = state.lock().unwrap().link.clone();
    if let Some(link) = link {
        if let Err(error) = control::send(&link, &message, fds) {
            tracing::debug!(%error, "the plugin did not hear us; it hears again at reconnect");
        }
    }
}

fn spawn_holder(fds: &ConnectionFds, args: &[String]) -> io::Result<(Child, std::fs::File)> {
    let (verdict, verdict_writer) = {
        let mut pipe = [0; 2];
        // SAFETY: a fresh pipe, each end owned once below.
        unsafe {
            if libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
                return Err(io::Error::last_os_error());
            }
            use std::os::fd::FromRawFd;
            (
                std::fs::File::from_raw_fd(pipe[0]),
                OwnedFd::from_raw_fd(pipe[1]),
            )
        }
    };
    let mut placed = vec![
        (fds.fuse.as_raw_fd(), HOLDER_FUSE_FD),
        (fds.journal.as_raw_fd(), HOLDER_JOURNAL_FD),
        (fds.session.as_raw_fd(), HOLDER_SESSION_FD),
        (verdict_writer.as_raw_fd(), HOLDER_VERDICT_FD),
    ];
    if let Some(token) = &fds.token {
        placed.push((token.as_raw_fd(), HOLDER_TOKEN_FD));
    }
    let mut command = crate::handoff::command_for(&crate::handoff::executable()?);
    // Its options (role, session name, paths) in a memfd, not in its
    // /proc/PID/cmdline, which every local user reads.
    let hidden = crate::handoff::ArgsFile::new(args)?;
    let hidden_fd = hidden.raw();
    command
        .args(["--supervise", "--adopt-fds", "--foreground"])
        .arg(hidden.flag());
    // Its daemons ask the plugin for their streams' ends (they may not walk
    // into their own mounts).
    if let Some(socket) = STREAM_SOCKET.get() {
        command.env(crate::stream_pipes::STREAM_OPENER_ENV, socket);
    }
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            // Out of the way first, then into place (dup2 clears close-on-exec).
            let mut moved = [(0, 0); 5];
            for (slot, (fd, target)) in moved.iter_mut().zip(&placed) {
                let copy = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 20);
                if copy < 0 {
                    return Err(io::Error::last_os_error());
                }
                *slot = (copy, *target);
            }
            for (copy, target) in &moved[..placed.len()] {
                if libc::dup2(*copy, *target) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            crate::handoff::ArgsFile::inherit(hidden_fd)?;
            // A holder goes with its serving side: the plugin's copies keep
            // the connection, and the next serving side resumes it.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = command.spawn()?;
    drop((verdict_writer, hidden));
    Ok((child, verdict))
}

/// A serving side's answer to a start, the control socket's one verdict:
/// its holder serves, or why it cannot, typed (a refused identity becomes
/// PERMISSION_DENIED for kubelet; no text is searched for a word).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Started {
    Serving,
    Failed(StartFailure),
}

impl Started {
    pub fn message(&self, id: &str) -> Value {
        match self {
            Started::Serving => json!({"op": "started", "id": id}),
            Started::Failed(failure) => json!({
                "op": "started",
                "id": id,
                "error": failure.why,
                "identityRefused": failure.identity_refused,
            }),
        }
    }

    /// Read back; an earlier release's failure carries no kind.
    pub fn from_message(message: &Value) -> Self {
        match message["error"].as_str() {
            None => Started::Serving,
            Some(why) => Started::Failed(StartFailure {
                why: why.to_string(),
                identity_refused: message["identityRefused"].as_bool() == Some(true),
            }),
        }
    }
}

fn start(state: &Arc<Mutex<State>>, id: String, args: Vec<String>, fds: ConnectionFds) {
    let mut guard = state.lock().unwrap();
    if let Some(held) = guard.held.get_mut(&id) {
        if matches!(held.holder.try_wait(), Ok(None)) {
            drop(guard);
            tell(state, Started::Serving.message(&id), &[]);
            return;
        }
    }
    guard.released.remove(&id);
    match spawn_holder(&fds, &args) {
        Ok((holder, verdict)) => {
            tracing::info!(volume = %log_label(&id), pid = holder.id(), "holder started");
            guard.held.insert(id.clone(), Held { fds, args, holder });
            drop(guard);
            let state = state.clone();
            std::thread::spawn(move || {
                let started =
                    match crate::daemon::read_verdict(verdict) {
                        Ok(()) => Started::Serving,
                        Err(failure) => Started::Failed(failure.unwrap_or_else(|| {
                            StartFailure::other("the holder ended without a word")
                        })),
                    };
                tell(&state, started.message(&id), &[]);
            });
        }
        Err(error) => {
            drop(guard);
            let failure = StartFailure::other(format!("cannot start the holder: {error}"));
            tell(state, Started::Failed(failure).message(&id), &[]);
        }
    }
}

/// Holders that exited: the plugin hears of each (and removes the mount
/// when it did not ask for the end).
fn reap(state: Arc<Mutex<State>>) {
    loop {
        std::thread::sleep(REAP_PAUSE);
        let ended: Vec<(String, String)> = {
            let mut guard = state.lock().unwrap();
            let mut ended = Vec::new();
            guard.held.retain(|id, held| match held.holder.try_wait() {
                Ok(Some(status)) => {
                    ended.push((id.clone(), status.to_string()));
                    false
                }
                _ => true,
            });
            ended
        };
        for (id, status) in ended {
            tracing::info!(volume = %log_label(&id), %status, "holder ended");
            tell(
                &state,
                json!({"op": "ended", "id": id, "status": status}),
                &[],
            );
        }
    }
}

/// SIGTERM (a pod deleted, a container stopped) ends this process at once:
/// as a container's first process it would otherwise ignore the signal and
/// wait for the SIGKILL. Holders end with it; the plugin's copies and any
/// younger serving side keep every connection.
fn exit_on_terminate() -> io::Result<()> {
    // SAFETY: a local signal set, blocked in this thread before any other
    // thread exists, so every thread inherits the mask and only the waiter
    // takes the signal (children get a fresh mask from Command).
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::Builder::new()
        .name("ssmfs-signals".into())
        .spawn(move || {
            let mut signal = 0;
            // SAFETY: a valid set and out pointer.
            unsafe { libc::sigwait(&set, &mut signal) };
            tracing::info!(signal, "stopping; the plugin keeps every connection");
            std::process::exit(0);
        })?;
    Ok(())
}

/// Serves the plugin at `socket` until killed.
/// The plugin's stream socket, beside its control socket.
static STREAM_SOCKET: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// The link key this serving side proves itself with: from the fd the
/// plugin that started it names (`LINK_KEY_FD_ENV`), or, started as root
/// in a container of its own, from the root-only file in the run directory,
/// after which it becomes `user` for good. Its holders and daemons, of the
/// same uid, never get it: it is read before any of them exists and kept
/// in this non-dumpable process alone.
pub fn link_key(
    run_dir: &std::path::Path,
    user: super::sys::ServeUser,
) -> anyhow::Result<zeroize::Zeroizing<Vec<u8>>> {
    use anyhow::Context;
    if let Ok(number) = std::env::var(super::node::LINK_KEY_FD_ENV) {
        std::env::remove_var(super::node::LINK_KEY_FD_ENV);
        let fd: i32 = number.parse().context("the link key's fd")?;
        let strings = crate::handoff::ArgsFile::read(fd).context("the link key's fd")?;
        let [hex_key] = strings.as_slice() else {
            anyhow::bail!("the link key's fd holds no single key");
        };
        let key = hex::decode(hex_key.as_slice()).context("the link key")?;
        return Ok(zeroize::Zeroizing::new(key));
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!(
            "csi-serve has no link key: start it as root (it reads {} and becomes --serve-user at once) or from the plugin",
            super::node::link_key_path(run_dir).display()
        );
    }
    let path = super::node::link_key_path(run_dir);
    let mut said = false;
    let key = loop {
        match std::fs::read(&path) {
            Ok(key) if key.len() == 32 => break zeroize::Zeroizing::new(key),
            _ if !said => {
                tracing::info!(path = %path.display(), "waiting for the plugin's link key");
                said = true;
            }
            _ => {}
        }
        std::thread::sleep(RECONNECT_PAUSE);
    };
    // Its holders run this binary through an fd opened as root, as the
    // plugin's serving side does: the path may be one the serving user
    // cannot resolve.
    use crate::handoff::{EXECUTABLE_FD, EXECUTABLE_FD_ENV};
    if std::env::var_os(EXECUTABLE_FD_ENV).is_none() {
        let binary = std::fs::File::open("/proc/self/exe").context("opening its own binary")?;
        // SAFETY: dup2 onto a fixed number; the copy is not close-on-exec.
        if unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&binary), EXECUTABLE_FD) } < 0 {
            return Err(std::io::Error::last_os_error()).context("placing its own binary");
        }
        std::env::set_var(EXECUTABLE_FD_ENV, EXECUTABLE_FD.to_string());
    }
    super::sys::become_serving_user(user).context("becoming the serving user")?;
    tracing::info!(
        uid = user.uid,
        "read the link key; serving as the serving user"
    );
    Ok(key)
}

pub fn run(
    socket: PathBuf,
    ready_file: Option<PathBuf>,
    key: zeroize::Zeroizing<Vec<u8>>,
) -> anyhow::Result<()> {
    if let Some(run_dir) = socket.parent() {
        let _ = STREAM_SOCKET.set(super::streams::socket_path(run_dir));
    }
    // It holds every tenant's FUSE connections and tokens: no process of
    // its uid may read its fds through /proc, nor attach to it.
    // SAFETY: prctl on this process only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        anyhow::bail!(
            "cannot make csi-serve non-dumpable: {}",
            std::io::Error::last_os_error()
        );
    }
    exit_on_terminate()?;
    let born = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|since| since.as_millis() as u64)
        .unwrap_or(0);
    let state = Arc::new(Mutex::new(State {
        ready_file,
        ..State::default()
    }));
    state.lock().unwrap().set_ready(false);
    {
        let state = state.clone();
        std::thread::Builder::new()
            .name("ssmfs-reaper".into())
            .spawn(move || reap(state))?;
    }
    let mut waiting_said = false;
    loop {
        let link = match control::connect(&socket) {
            Ok(link) => Arc::new(link),
            Err(error) => {
                if !waiting_said {
                    tracing::info!(socket = %socket.display(), %error, "waiting for the plugin");
                    waiting_said = true;
                }
                std::thread::sleep(RECONNECT_PAUSE);
                continue;
            }
        };
        waiting_said = false;
        // First, the proof that this is csi-serve and not one of its holders.
        let proof = json!({"op": "auth", "key": hex::encode(&*key)});
        if control::send(&link, &proof, &[]).is_err() {
            std::thread::sleep(RECONNECT_PAUSE);
            continue;
        }
        {
            // What we hold, with copies of its fds: a restarted plugin
            // needs them to keep each connection across our own restart.
            let mut guard = state.lock().unwrap();
            for (id, held) in &guard.held {
                let message = json!({"op": "have", "id": id, "args": held.args});
                let _ = control::send(&link, &message, &held.fds.raw());
            }
            for (id, (fds, args)) in &guard.released {
                let message = json!({"op": "have", "id": id, "args": args, "serving": false});
                let _ = control::send(&link, &message, &fds.raw());
            }
            let _ = control::send(&link, &json!({"op": "hello", "born": born}), &[]);
            guard.link = Some(link.clone());
        }
        tracing::info!(socket = %socket.display(), "connected to the plugin");
        loop {
            match control::receive(&link) {
                Ok(Some((message, fds))) => handle(&state, message, fds),
                Ok(None) => break,
                Err(error) => {
                    tracing::warn!(%error, "reading the plugin's socket failed");
                    break;
                }
            }
        }
        state.lock().unwrap().link = None;
        tracing::info!("the plugin went away; serving on, and waiting for it");
    }
}

fn handle(state: &Arc<Mutex<State>>, message: Value, fds: Vec<OwnedFd>) {
    let id = message["id"].as_str().unwrap_or_default().to_string();
    match message["op"].as_str() {
        Some("start") => {
            let args = message["args"]
                .as_array()
                .map(|args| {
                    args.iter()
                        .filter_map(|arg| arg.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            match ConnectionFds::from_received(fds) {
                Ok(fds) => start(state, id, args, fds),
                Err(error) => {
                    let failure = StartFailure::other(error.to_string());
                    tell(state, Started::Failed(failure).message(&id), &[]);
                }
            }
        }
        Some("stop") => {
            // A handover: a younger serving side takes the mount, and this
            // one keeps the fds until it exits. Otherwise the mount goes.
            let handover = message["handover"].as_bool().unwrap_or(false);
            let mut guard = state.lock().unwrap();
            if let Some(mut held) = guard.held.remove(&id) {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(held.holder.id() as i32, libc::SIGTERM) };
                let _ = held.holder.wait();
                if handover {
                    tracing::info!(volume = %log_label(&id), "holder stopped; a younger serving side takes the mount over");
                    guard.released.insert(id.clone(), (held.fds, held.args));
                }
            }
            if handover {
                // Another side serves it now (a removal leaves readiness be).
                guard.set_ready(false);
            } else {
                guard.released.remove(&id);
            }
            drop(guard);
            tell(state, json!({"op": "stopped", "id": id}), &[]);
        }
        Some("ready") => state.lock().unwrap().set_ready(true),
        other => tracing::warn!(op = ?other, "unknown message from the plugin"),
    }
}
