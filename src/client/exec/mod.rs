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
//!
//! `sources` reads the values, `supervisor` runs the child.

mod sources;
mod supervisor;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use supervisor::Supervisor;

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

#[cfg(test)]
mod tests {
    use std::path::Path;

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
}
