//! `ssmfs exec`: runs a command with environment variables read from files
//! of ssmfs mounts, and restarts or signals it when one of them changes.
//!
//! Model: the environment is read whole, or not at all (`read_values`): the
//! child never starts with part of its values. A line of `@changes` that
//! names a used file, or a file in a used directory, marks the values as
//! possibly changed; after a quiet period (`Debounce`) they are read again
//! and, only if some variable differs, the child is restarted (SIGTERM,
//! `--grace`, SIGKILL, start), signalled, or stopped for good. A read that
//! fails leaves the running child alone and is retried with backoff.
//! Meanwhile the process does the duties of PID 1: it forwards signals to
//! the child's process group, reaps every zombie (it is PID 1 or a child
//! subreaper), and exits with the child's exit code (128+N for signal N).
//! The child runs in a process group of its own (as tini does), holding the
//! terminal if there is one, so a restart stops the whole command (a
//! shell's children too) and Ctrl-C reaches it once.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::signal::unix::{signal, Signal, SignalKind};

use super::stream::{self, Change, Streams};
use super::{human, Backoff, Debounce, DEBOUNCE_MAX_WAIT};
use crate::secret::SecretBytes;

#[derive(Debug, Parser)]
#[command(
    name = "ssmfs exec",
    version,
    about = "Run a command with environment variables read from ssmfs files; restart or signal it when they change"
)]
pub struct ExecArgs {
    /// NAME=PATH: the variable NAME holds the bytes of the file PATH.
    #[arg(long = "env", value_name = "NAME=PATH", value_parser = parse_binding)]
    pub env: Vec<Binding>,
    /// Every regular file directly in DIR, named as chamber names them:
    /// upper case, `-` and `.` as `_` (`db-password` is DB_PASSWORD).
    #[arg(long, value_name = "DIR")]
    pub env_dir: Vec<PathBuf>,
    /// DIR is an ssmfs mount of Airflow's layout: DIR/variables/KEY is
    /// AIRFLOW_VAR_<KEY upper case> and DIR/connections/ID is
    /// AIRFLOW_CONN_<ID upper case>, the names Airflow reads.
    #[arg(long, value_name = "DIR")]
    pub airflow_dir: Vec<PathBuf>,
    /// What a changed value does: `restart` the child, send it a signal
    /// (`signal:HUP`), or stop it and `exit` 0. Restart by default: a
    /// program that read its environment at start learns a new one only by
    /// starting again.
    #[arg(long, value_name = "ACTION", default_value = "restart", value_parser = parse_on_change)]
    pub on_change: OnChange,
    /// How long a stopped child has between SIGTERM and SIGKILL; 10 s is
    /// `docker stop`'s default, which programs are written to meet.
    #[arg(long, default_value = "10s", value_parser = crate::config::parse_duration)]
    pub grace: Duration,
    /// The quiet period that gathers a burst of changes into one action (at
    /// most 5 s after the first); 500 ms holds the changes of one rotation
    /// script together and adds little to the delay of a lone one.
    #[arg(long, default_value = "500ms", value_parser = crate::config::parse_duration)]
    pub debounce: Duration,
    /// What the child's own exit does: `exit` with its code (the
    /// container's or unit's supervisor decides), or `restart` it with
    /// backoff (1 s doubling to 60 s).
    #[arg(long, value_enum, default_value = "exit")]
    pub on_exit: OnExit,
    /// Follow this stream instead of each mount's `@changes` (e.g. a
    /// subtree's DIR/@changes); paths in its lines are relative to the root
    /// of the ssmfs mount holding it (to its directory if it is on none).
    #[arg(long, value_name = "PATH")]
    pub changes: Option<PathBuf>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// `--env NAME=PATH`.
#[derive(Debug, Clone)]
pub struct Binding {
    pub name: String,
    pub path: PathBuf,
}

/// Why an `--env` cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BindingError {
    #[error("expected NAME=PATH (no '=' in it)")]
    NoEquals,
    #[error("the variable name is empty")]
    EmptyName,
    #[error("'{0}' is not a variable name (letters, digits and '_', not starting with a digit)")]
    BadName(String),
    #[error("the path is empty")]
    EmptyPath,
}

fn parse_binding(raw: &str) -> Result<Binding, BindingError> {
    let (name, path) = raw.split_once('=').ok_or(BindingError::NoEquals)?;
    if name.is_empty() {
        return Err(BindingError::EmptyName);
    }
    if !is_portable_name(name) {
        return Err(BindingError::BadName(name.to_string()));
    }
    if path.is_empty() {
        return Err(BindingError::EmptyPath);
    }
    Ok(Binding {
        name: name.to_string(),
        path: PathBuf::from(path),
    })
}

/// A name every shell and program can read: POSIX's portable form.
fn is_portable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The variable chamber gives a file of an `--env-dir`; `None` when the
/// result is not a portable name (e.g. it starts with a digit).
pub fn chamber_name(file_name: &str) -> Option<String> {
    let name: String = file_name
        .chars()
        .map(|c| match c {
            '-' | '.' => '_',
            c => c.to_ascii_uppercase(),
        })
        .collect();
    is_portable_name(&name).then_some(name)
}

/// The two folders of Airflow's layout and the prefix Airflow looks up.
const AIRFLOW_FOLDERS: [(&str, &str); 2] = [
    ("variables", "AIRFLOW_VAR_"),
    ("connections", "AIRFLOW_CONN_"),
];

/// The variable Airflow reads for a key: `AIRFLOW_VAR_` + `key.upper()`.
/// Kept as Airflow spells it (a `-` stays a `-`): Airflow looks the name up
/// in `os.environ`, which holds any name without `=`.
pub fn airflow_name(prefix: &str, key: &str) -> String {
    format!("{prefix}{}", key.to_uppercase())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnChange {
    Restart,
    Signal(i32),
    Exit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnExit {
    Exit,
    Restart,
}

fn parse_on_change(raw: &str) -> Result<OnChange, String> {
    match raw {
        "restart" => Ok(OnChange::Restart),
        "exit" => Ok(OnChange::Exit),
        _ => match raw.strip_prefix("signal:") {
            Some(name) => signal_number(name)
                .map(OnChange::Signal)
                .ok_or_else(|| format!("'{name}' is not a signal name such as HUP or USR1")),
            None => Err("expected restart, signal:NAME (e.g. signal:HUP) or exit".into()),
        },
    }
}

/// The signals a program may be asked to reload on, by name (`HUP`,
/// `SIGHUP`, `hup`).
fn signal_number(name: &str) -> Option<i32> {
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    let number = match bare {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "ALRM" => libc::SIGALRM,
        "WINCH" => libc::SIGWINCH,
        "CONT" => libc::SIGCONT,
        "KILL" => libc::SIGKILL,
        _ => return None,
    };
    Some(number)
}

/// Why the values cannot be read. Names the file, never a value.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read {}: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot list {}: {cause}", path.display())]
    List {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{} is not valid UTF-8, which an environment variable must be", path.display())]
    NotUtf8 { path: PathBuf },
    #[error("{} holds a NUL byte, which an environment variable cannot carry", path.display())]
    HasNul { path: PathBuf },
    #[error("{} has neither variables/ nor connections/ (is it a mount of Airflow's layout?)", path.display())]
    NotAirflow { path: PathBuf },
}

/// Where the variables come from, and which changes concern them.
#[derive(Debug, Clone)]
pub struct Sources {
    bindings: Vec<Binding>,
    env_dirs: Vec<PathBuf>,
    airflow_dirs: Vec<PathBuf>,
    /// The used files and directories as change lines name them.
    watched_files: Vec<PathBuf>,
    watched_dirs: Vec<PathBuf>,
}

/// The environment a child gets from the files: name to value.
pub type Values = BTreeMap<String, SecretBytes>;

impl Sources {
    pub fn new(bindings: Vec<Binding>, env_dirs: Vec<PathBuf>, airflow_dirs: Vec<PathBuf>) -> Self {
        let watched_files = bindings.iter().map(|b| stream::key(&b.path)).collect();
        let watched_dirs = env_dirs
            .iter()
            .map(|dir| stream::key(dir))
            .chain(airflow_dirs.iter().flat_map(|dir| {
                AIRFLOW_FOLDERS
                    .iter()
                    .map(move |(folder, _)| stream::key(&dir.join(folder)))
            }))
            .collect();
        Self {
            bindings,
            env_dirs,
            airflow_dirs,
            watched_files,
            watched_dirs,
        }
    }

    /// Whether a change may alter the values: it names a used file, or a
    /// name directly in a used directory (a file there created or deleted).
    pub fn concerned_by(&self, change: &Change) -> bool {
        match change {
            Change::Dropped => true,
            Change::Path(path) => {
                self.watched_files.iter().any(|file| file == path)
                    || path
                        .parent()
                        .is_some_and(|parent| self.watched_dirs.iter().any(|dir| dir == parent))
            }
        }
    }

    /// The paths whose mounts' streams must be followed.
    pub fn watched(&self) -> impl Iterator<Item = &PathBuf> {
        self.watched_files.iter().chain(&self.watched_dirs)
    }

    /// Every variable, read whole or not at all. `notes` gathers what the
    /// user should know (a skipped file, two files for one name), without
    /// values.
    pub fn read_values(&self, notes: &mut Vec<String>) -> Result<Values, ReadError> {
        let mut values = Values::new();
        // Directories first, then --env: a variable named explicitly wins.
        let mut origin: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut put =
            |values: &mut Values, name: String, path: PathBuf, notes: &mut Vec<String>| {
                let value = read_value(&path)?;
                if let Some(previous) = origin.insert(name.clone(), path.clone()) {
                    notes.push(format!(
                        "{name} is given by both {} and {}; the latter is used",
                        previous.display(),
                        path.display()
                    ));
                }
                values.insert(name, value);
                Ok(())
            };
        for dir in &self.env_dirs {
            for (file_name, path) in list_files(dir)? {
                match chamber_name(&file_name) {
                    Some(name) => put(&mut values, name, path, notes)?,
                    None => notes.push(format!(
                        "{} is skipped: '{file_name}' does not make a variable name",
                        path.display()
                    )),
                }
            }
        }
        for dir in &self.airflow_dirs {
            let mut found = false;
            for (folder, prefix) in AIRFLOW_FOLDERS {
                let folder_path = dir.join(folder);
                match list_files(&folder_path) {
                    Ok(files) => {
                        found = true;
                        for (key, path) in files {
                            put(&mut values, airflow_name(prefix, &key), path, notes)?;
                        }
                    }
                    // A mount without connections (its kwargs left them out).
                    Err(ReadError::List { cause, .. })
                        if cause.kind() == std::io::ErrorKind::NotFound => {}
                    Err(error) => return Err(error),
                }
            }
            if !found {
                return Err(ReadError::NotAirflow { path: dir.clone() });
            }
        }
        for binding in &self.bindings {
            put(
                &mut values,
                binding.name.clone(),
                binding.path.clone(),
                notes,
            )?;
        }
        Ok(values)
    }
}

/// The regular files directly in `dir`, by name, sorted (so which of two
/// files for one name wins does not depend on the listing's order). Names
/// starting with `@` (the mount's `@changes`) are not values.
fn list_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, ReadError> {
    let list_error = |cause| ReadError::List {
        path: dir.to_path_buf(),
        cause,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(list_error)? {
        let entry = entry.map_err(list_error)?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if name.starts_with('@') {
            continue;
        }
        let path = entry.path();
        // Followed through symlinks: a kubelet-style directory links its files.
        if std::fs::metadata(&path).is_ok_and(|meta| meta.is_file()) {
            files.push((name, path));
        }
    }
    files.sort();
    Ok(files)
}

/// One file's bytes as a variable's value: UTF-8 without NUL.
fn read_value(path: &Path) -> Result<SecretBytes, ReadError> {
    let bytes = SecretBytes::new(std::fs::read(path).map_err(|cause| ReadError::Io {
        path: path.to_path_buf(),
        cause,
    })?);
    if bytes.expose().contains(&0) {
        return Err(ReadError::HasNul {
            path: path.to_path_buf(),
        });
    }
    if std::str::from_utf8(bytes.expose()).is_err() {
        return Err(ReadError::NotUtf8 {
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

/// The names whose values differ between two environments (names only:
/// they are what a log line may say).
pub fn changed_names(old: &Values, new: &Values) -> Vec<String> {
    let mut names: Vec<String> = old
        .iter()
        .filter(|(name, value)| new.get(*name) != Some(value))
        .map(|(name, _)| name.clone())
        .collect();
    names.extend(new.keys().filter(|name| !old.contains_key(*name)).cloned());
    names.sort();
    names
}

/// The exit status of a process as a shell reports it: its code, or 128+N
/// when signal N ended it.
pub fn exit_code_of(wait_status: i32) -> u8 {
    if libc::WIFEXITED(wait_status) {
        libc::WEXITSTATUS(wait_status) as u8
    } else if libc::WIFSIGNALED(wait_status) {
        (128 + libc::WTERMSIG(wait_status)) as u8
    } else {
        1
    }
}

/// The signals passed on to the child. SIGTERM, SIGINT and SIGQUIT also
/// mean "stop": once the child exits, so does exec, with its code.
const FORWARDED: [i32; 7] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGHUP,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
];

/// A child that ran this long was healthy: its next crash restarts it after
/// the first delay again.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

pub fn run(args: ExecArgs) -> ExitCode {
    super::not_dumpable();
    let code = super::block_on("exec", async {
        match Supervisor::new(args) {
            Ok(supervisor) => supervisor.run().await,
            Err(error) => {
                tracing::error!("cannot start: {error}");
                1
            }
        }
    });
    let Some(code) = code else {
        return ExitCode::FAILURE;
    };
    ExitCode::from(code)
}

struct Running {
    pid: i32,
    started: Instant,
    stopping: Option<Stopping>,
}

struct Stopping {
    /// When SIGKILL follows SIGTERM; `None` once it was sent.
    kill_at: Option<Instant>,
    /// The values to start again with, or `None` to exit once it is gone.
    restart_with: Option<Values>,
}

struct Supervisor {
    args: ExecArgs,
    sources: Sources,
    streams: Streams,
    changes: tokio::sync::mpsc::UnboundedReceiver<Change>,
    signals: Vec<(i32, Signal)>,
    child_exited: Signal,
    child: Option<Running>,
    /// What the running child was given (or, after a signal, what it was
    /// told to read again); compared with each new read.
    current: Option<Values>,
    /// When to start a child, while none runs.
    start_at: Option<Instant>,
    /// Reading the values at start: 1 s doubling to 30 s.
    start_backoff: Backoff,
    /// A child that exits on its own under `--on-exit restart`.
    crash_backoff: Backoff,
    debounce: Debounce,
    /// A failed re-read after a change: when to read again.
    reread_at: Option<Instant>,
    reread_backoff: Backoff,
    /// A stop signal came: exit with the child's code once it is gone.
    exit_with_child: bool,
    /// The notes last logged, so each is said once, not at every read.
    said_notes: Vec<String>,
}

impl Supervisor {
    fn new(args: ExecArgs) -> std::io::Result<Self> {
        // Orphans of the child (a shell's background jobs) become ours to
        // reap, as they would be PID 1's.
        if std::process::id() != 1 {
            // SAFETY: prctl with integer arguments only.
            unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        }
        let signals = FORWARDED
            .iter()
            .map(|&number| Ok((number, signal(SignalKind::from_raw(number))?)))
            .collect::<std::io::Result<_>>()?;
        let child_exited = signal(SignalKind::child())?;
        let sources = Sources::new(
            args.env.clone(),
            args.env_dir.clone(),
            args.airflow_dir.clone(),
        );
        let (streams, changes) = Streams::new(args.changes.as_deref());
        let debounce = Debounce::new(args.debounce, DEBOUNCE_MAX_WAIT);
        Ok(Self {
            args,
            sources,
            streams,
            changes,
            signals,
            child_exited,
            child: None,
            current: None,
            start_at: Some(Instant::now()),
            start_backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(30)),
            crash_backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
            debounce,
            reread_at: None,
            reread_backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(30)),
            exit_with_child: false,
            said_notes: Vec::new(),
        })
    }

    /// Runs until exec exits; returns its exit code.
    async fn run(mut self) -> u8 {
        loop {
            let wake = self.next_wake();
            let outcome = tokio::select! {
                number = next_signal(&mut self.signals) => self.on_signal(number),
                _ = self.child_exited.recv() => self.reap(),
                Some(change) = self.changes.recv() => {
                    self.on_change(&change);
                    None
                }
                _ = super::sleep_until(wake) => self.on_timer(),
            };
            if let Some(code) = outcome {
                return code;
            }
        }
    }

    fn follow_streams(&mut self) {
        let mounts = stream::current_ssmfs_mounts();
        for path in self.sources.watched() {
            self.streams.follow(path, &mounts);
        }
    }

    /// The earliest of the timers that apply now.
    fn next_wake(&self) -> Option<Instant> {
        let running = self.child.as_ref();
        let settled = running.is_some_and(|child| child.stopping.is_none());
        let kill_at = running
            .and_then(|child| child.stopping.as_ref())
            .and_then(|stopping| stopping.kill_at);
        [
            self.start_at.filter(|_| running.is_none()),
            kill_at,
            self.debounce.due_at().filter(|_| settled),
            self.reread_at.filter(|_| settled),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn on_timer(&mut self) -> Option<u8> {
        let now = Instant::now();
        if let Some(child) = &mut self.child {
            if let Some(stopping) = &mut child.stopping {
                if stopping.kill_at.is_some_and(|at| at <= now) {
                    stopping.kill_at = None;
                    tracing::warn!(
                        pid = child.pid,
                        "the child is still running {} after SIGTERM: sending SIGKILL",
                        human(self.args.grace)
                    );
                    signal_group(child.pid, libc::SIGKILL);
                }
                return None;
            }
            let reread_due = self.reread_at.is_some_and(|at| at <= now);
            if self.debounce.take_due(now) || reread_due {
                self.reread_at = None;
                return self.reread();
            }
            return None;
        }
        if self.start_at.is_some_and(|at| at <= now) {
            self.start_at = None;
            return self.start();
        }
        None
    }

    /// Reads the values and starts the child with them, or retries later.
    fn start(&mut self) -> Option<u8> {
        match self.read_values() {
            Ok(values) => {
                self.start_backoff.reset();
                self.spawn(values)
            }
            Err(error) => {
                let delay = self.start_backoff.next_delay();
                tracing::error!(
                    "not starting the command: {error}; trying again in {}",
                    human(delay)
                );
                self.start_at = Some(Instant::now() + delay);
                None
            }
        }
    }

    /// Reads the values; after a read that worked, follows the streams of
    /// the mounts they are on (a mount may have come up since the last).
    fn read_values(&mut self) -> Result<Values, ReadError> {
        let mut notes = Vec::new();
        let values = self.sources.read_values(&mut notes)?;
        self.follow_streams();
        for note in notes.iter().filter(|note| !self.said_notes.contains(note)) {
            tracing::warn!("{note}");
        }
        self.said_notes = notes;
        Ok(values)
    }

    fn spawn(&mut self, values: Values) -> Option<u8> {
        let mut command = std::process::Command::new(&self.args.command[0]);
        command.args(&self.args.command[1..]);
        for (name, value) in &values {
            command.env(name, OsStr::from_bytes(value.expose()));
        }
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(|| {
                // A group of its own, so a restart stops all of it...
                libc::setpgid(0, 0);
                // ...and, on a terminal, the foreground group, so the
                // terminal's signals and input reach it directly.
                if libc::isatty(0) == 1 {
                    libc::signal(libc::SIGTTOU, libc::SIG_IGN);
                    libc::tcsetpgrp(0, libc::getpid());
                    libc::signal(libc::SIGTTOU, libc::SIG_DFL);
                }
                Ok(())
            });
        }
        let program = self.args.command[0].to_string_lossy().into_owned();
        match command.spawn() {
            Ok(child) => {
                let pid = child.id() as i32;
                // Reaped by `reap` (waitpid(-1)), not through `child`.
                drop(child);
                tracing::info!(pid, "started {program} with {} variables", values.len());
                self.child = Some(Running {
                    pid,
                    started: Instant::now(),
                    stopping: None,
                });
                self.current = Some(values);
                None
            }
            Err(error) => {
                tracing::error!("cannot run {program}: {error}");
                // What a shell answers for a missing or unrunnable command.
                Some(if error.kind() == std::io::ErrorKind::NotFound {
                    127
                } else {
                    126
                })
            }
        }
    }

    fn on_signal(&mut self, number: i32) -> Option<u8> {
        let stops = [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT].contains(&number);
        match &self.child {
            Some(child) => {
                signal_group(child.pid, number);
                if stops {
                    self.exit_with_child = true;
                }
                None
            }
            // No child to wait for: exit as the signal would have ended us.
            None if stops => Some(128 + number as u8),
            None => None,
        }
    }

    fn on_change(&mut self, change: &Change) {
        if self.sources.concerned_by(change) {
            self.debounce.note(Instant::now());
        }
    }

    /// A change came: reads again, and acts if some variable differs.
    fn reread(&mut self) -> Option<u8> {
        let values = match self.read_values() {
            Ok(values) => values,
            Err(error) => {
                let delay = self.reread_backoff.next_delay();
                tracing::error!(
                    "values changed but {error}; the child keeps running with its values; trying again in {}",
                    human(delay)
                );
                self.reread_at = Some(Instant::now() + delay);
                return None;
            }
        };
        self.reread_backoff.reset();
        let changed = changed_names(self.current.as_ref()?, &values);
        if changed.is_empty() {
            tracing::debug!("a change was announced but no variable differs");
            return None;
        }
        let child = self.child.as_mut()?;
        let changed = changed.join(", ");
        match self.args.on_change {
            OnChange::Restart => {
                tracing::info!(pid = child.pid, "{changed} changed: restarting the child");
                stop(child, self.args.grace, Some(values));
            }
            OnChange::Exit => {
                tracing::info!(
                    pid = child.pid,
                    "{changed} changed: stopping the child and exiting"
                );
                stop(child, self.args.grace, None);
            }
            OnChange::Signal(number) => {
                tracing::info!(
                    pid = child.pid,
                    "{changed} changed: sending signal {number} to the child"
                );
                signal_group(child.pid, number);
                // The child reloads what it reads from files; a later
                // restart gets the new environment.
                self.current = Some(values);
            }
        }
        None
    }

    /// Reaps every exited process; acts when it was the child.
    fn reap(&mut self) -> Option<u8> {
        loop {
            let mut status = 0;
            // SAFETY: waitpid with a valid out-pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return None;
            }
            let Some(child) = self.child.as_ref().filter(|child| child.pid == pid) else {
                // An orphan that was reparented to us: reaped, nothing else.
                continue;
            };
            let code = exit_code_of(status);
            let ran = child.started.elapsed();
            let stopping = self.child.take().and_then(|child| child.stopping);
            if self.exit_with_child {
                tracing::info!("the child exited with {code}; exiting with it");
                return Some(code);
            }
            if let Some(stopping) = stopping {
                match stopping.restart_with {
                    Some(values) => {
                        kill_leftovers(pid);
                        if let Some(code) = self.spawn(values) {
                            return Some(code);
                        }
                    }
                    None => return Some(0),
                }
                continue;
            }
            match self.args.on_exit {
                OnExit::Exit => {
                    tracing::info!("the child exited with {code}");
                    return Some(code);
                }
                OnExit::Restart => {
                    kill_leftovers(pid);
                    if ran >= HEALTHY_RUN {
                        self.crash_backoff.reset();
                    }
                    let delay = self.crash_backoff.next_delay();
                    tracing::warn!(
                        "the child exited with {code} after {}; starting it again in {}",
                        human(Duration::from_secs(ran.as_secs())),
                        human(delay)
                    );
                    self.start_at = Some(Instant::now() + delay);
                }
            }
        }
    }
}

/// Starts stopping the child: SIGTERM now, SIGKILL after `grace`.
fn stop(child: &mut Running, grace: Duration, restart_with: Option<Values>) {
    signal_group(child.pid, libc::SIGTERM);
    child.stopping = Some(Stopping {
        kill_at: Some(Instant::now() + grace),
        restart_with,
    });
}

/// Signals the child's process group, or the child alone if it left the
/// group it was started in.
fn signal_group(pid: i32, number: i32) {
    if !super::kill_group(pid, number) {
        // SAFETY: kill with integer arguments only.
        unsafe { libc::kill(pid, number) };
    }
}

/// Before a new child: what is left of the old one's process group
/// (members that ignored SIGTERM) must not run beside it.
fn kill_leftovers(old_pgid: i32) {
    if super::kill_group(old_pgid, libc::SIGKILL) {
        tracing::warn!(
            pgid = old_pgid,
            "processes of the old child's group were still running: killed"
        );
    }
}

/// The next forwarded signal, whichever it is.
async fn next_signal(signals: &mut [(i32, Signal)]) -> i32 {
    std::future::poll_fn(|context| {
        for (number, stream) in signals.iter_mut() {
            if stream.poll_recv(context).is_ready() {
                return std::task::Poll::Ready(*number);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_bindings_are_checked() {
        let binding = parse_binding("DB_PASSWORD=/mnt/app/db/password").unwrap();
        assert_eq!(binding.name, "DB_PASSWORD");
        assert_eq!(binding.path, Path::new("/mnt/app/db/password"));
        // A path may hold '=': only the first one splits.
        assert_eq!(parse_binding("A=/x=y").unwrap().path, Path::new("/x=y"));
        assert_eq!(parse_binding("DB").unwrap_err(), BindingError::NoEquals);
        assert_eq!(parse_binding("=/x").unwrap_err(), BindingError::EmptyName);
        assert_eq!(parse_binding("A=").unwrap_err(), BindingError::EmptyPath);
        for bad in ["1A", "A-B", "A B", "É"] {
            assert_eq!(
                parse_binding(&format!("{bad}=/x")).unwrap_err(),
                BindingError::BadName(bad.into())
            );
        }
    }

    #[test]
    fn chamber_names() {
        assert_eq!(chamber_name("db-password").as_deref(), Some("DB_PASSWORD"));
        assert_eq!(chamber_name("api.key").as_deref(), Some("API_KEY"));
        assert_eq!(
            chamber_name("Already_Upper").as_deref(),
            Some("ALREADY_UPPER")
        );
        assert_eq!(chamber_name("9lives"), None);
        assert_eq!(chamber_name("a:b"), None);
    }

    #[test]
    fn airflow_names_are_what_airflow_looks_up() {
        assert_eq!(airflow_name("AIRFLOW_VAR_", "my_key"), "AIRFLOW_VAR_MY_KEY");
        assert_eq!(
            airflow_name("AIRFLOW_CONN_", "my-postgres"),
            "AIRFLOW_CONN_MY-POSTGRES"
        );
    }

    #[test]
    fn on_change_actions() {
        assert_eq!(parse_on_change("restart"), Ok(OnChange::Restart));
        assert_eq!(parse_on_change("exit"), Ok(OnChange::Exit));
        assert_eq!(
            parse_on_change("signal:HUP"),
            Ok(OnChange::Signal(libc::SIGHUP))
        );
        assert_eq!(
            parse_on_change("signal:sigusr1"),
            Ok(OnChange::Signal(libc::SIGUSR1))
        );
        assert!(parse_on_change("signal:NOPE").unwrap_err().contains("NOPE"));
        assert!(parse_on_change("reload").is_err());
    }

    #[test]
    fn exit_codes_as_a_shell_reports_them() {
        // Encoded as waitpid gives them: code << 8, or the signal number.
        assert_eq!(exit_code_of(7 << 8), 7);
        assert_eq!(exit_code_of(0), 0);
        assert_eq!(exit_code_of(libc::SIGKILL), 137);
        assert_eq!(exit_code_of(libc::SIGTERM), 143);
    }

    fn sources_in(dir: &Path) -> Sources {
        Sources::new(
            vec![parse_binding(&format!("DB={}", dir.join("db").display())).unwrap()],
            vec![dir.join("env")],
            vec![dir.join("airflow")],
        )
    }

    #[test]
    fn values_come_from_every_source_and_dirs_skip_at_names() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("db"), "pw1").unwrap();
        std::fs::create_dir_all(root.join("env/sub")).unwrap();
        std::fs::write(root.join("env/api-key"), "k").unwrap();
        std::fs::write(root.join("env/@changes"), "").unwrap();
        std::fs::write(root.join("env/9x"), "value-of-9x").unwrap();
        std::fs::create_dir_all(root.join("airflow/variables")).unwrap();
        std::fs::write(root.join("airflow/variables/my_var"), "v").unwrap();
        let mut notes = Vec::new();
        let values = sources_in(root).read_values(&mut notes).unwrap();
        let names: Vec<&str> = values.keys().map(String::as_str).collect();
        assert_eq!(names, ["AIRFLOW_VAR_MY_VAR", "API_KEY", "DB"]);
        assert_eq!(values["DB"].expose(), b"pw1");
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].contains("9x") && !notes[0].contains("value-of"),
            "{notes:?}"
        );
    }

    #[test]
    fn a_bad_value_is_an_error_naming_the_file_not_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("env")).unwrap();
        std::fs::create_dir_all(root.join("airflow/connections")).unwrap();
        let sources = sources_in(root);
        let mut notes = Vec::new();
        let missing = sources.read_values(&mut notes).unwrap_err().to_string();
        assert!(
            missing.contains(&root.join("db").display().to_string()),
            "{missing}"
        );
        std::fs::write(root.join("db"), b"secret\0value").unwrap();
        let nul = sources.read_values(&mut notes).unwrap_err().to_string();
        assert!(nul.contains("NUL") && !nul.contains("secret"), "{nul}");
        std::fs::write(root.join("db"), b"secret\xff").unwrap();
        let utf8 = sources.read_values(&mut notes).unwrap_err().to_string();
        assert!(utf8.contains("UTF-8") && !utf8.contains("secret"), "{utf8}");
    }

    #[test]
    fn changes_concern_used_files_and_names_in_used_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let sources = sources_in(&root);
        let concerned = |path: PathBuf| sources.concerned_by(&Change::Path(path));
        assert!(concerned(root.join("db")));
        assert!(concerned(root.join("env/new-one")));
        assert!(concerned(root.join("airflow/connections/pg")));
        assert!(!concerned(root.join("other")));
        assert!(!concerned(root.join("env/sub/deeper")));
        assert!(sources.concerned_by(&Change::Dropped));
    }

    #[test]
    fn changed_names_say_which_not_what() {
        let values = |pairs: &[(&str, &str)]| -> Values {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), SecretBytes::new(v.as_bytes().to_vec())))
                .collect()
        };
        let old = values(&[("A", "1"), ("B", "2"), ("C", "3")]);
        let new = values(&[("A", "1"), ("B", "20"), ("D", "4")]);
        assert_eq!(changed_names(&old, &new), ["B", "C", "D"]);
        assert!(changed_names(&old, &old).is_empty());
    }
}
