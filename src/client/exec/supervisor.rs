//! The child and the duties of PID 1: starting it with the values, acting
//! on a change (restart, signal, exit) after the debounce, forwarding
//! signals to its process group, reaping every zombie, and exiting with
//! the child's code.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, Signal, SignalKind};

use super::sources::{changed_names, ReadError, Sources, Values};
use super::{ExecArgs, OnChange, OnExit};
use crate::client::stream::{self, Change, Streams};
use crate::client::{human, kill_group, Backoff, Debounce, DEBOUNCE_MAX_WAIT};

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

pub(super) struct Supervisor {
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
    pub(super) fn new(args: ExecArgs) -> std::io::Result<Self> {
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
    pub(super) async fn run(mut self) -> u8 {
        loop {
            let wake = self.next_wake();
            let outcome = tokio::select! {
                number = next_signal(&mut self.signals) => self.on_signal(number),
                _ = self.child_exited.recv() => self.reap(),
                Some(change) = self.changes.recv() => {
                    self.on_change(&change);
                    None
                }
                _ = crate::client::sleep_until(wake) => self.on_timer(),
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
    if !kill_group(pid, number) {
        // SAFETY: kill with integer arguments only.
        unsafe { libc::kill(pid, number) };
    }
}

/// Before a new child: what is left of the old one's process group
/// (members that ignored SIGTERM) must not run beside it.
fn kill_leftovers(old_pgid: i32) {
    if kill_group(old_pgid, libc::SIGKILL) {
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
    fn exit_codes_as_a_shell_reports_them() {
        // Encoded as waitpid gives them: code << 8, or the signal number.
        assert_eq!(exit_code_of(7 << 8), 7);
        assert_eq!(exit_code_of(0), 0);
        assert_eq!(exit_code_of(libc::SIGKILL), 137);
        assert_eq!(exit_code_of(libc::SIGTERM), 143);
    }
}
