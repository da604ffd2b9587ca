//! The client side of a rotation: `ssmfs exec` and `ssmfs render`.
//!
//! Model: both read values through an ssmfs mount (plain file reads, never
//! AWS) and learn that a value may have changed from the mount's `@changes`
//! stream (`stream`). A change line only says "look again": each command
//! re-reads what it uses and acts only when the bytes differ. A burst of
//! lines is gathered by a `Debounce` so ten rotations make one action, and
//! every retry waits on a `Backoff` so a failure is one log line per step.
//! `exec` runs a child with values as environment variables and restarts or
//! signals it; `render` writes Jinja templates into files atomically and
//! runs a command after them. No value ever reaches a log line.

mod atomic;
mod exec;
mod render;
mod stream;

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

/// Exit status for a command line that cannot be used (as clap and mount(8) use).
const EXIT_USAGE: u8 = 2;

/// `ssmfs exec ...` and `ssmfs render ...`; `None` for any other command line.
pub fn run_subcommand(args: &[OsString]) -> Option<ExitCode> {
    let subcommand = args.get(1).and_then(|arg| arg.to_str())?;
    // "ssmfs exec" as the program's name, so usage lines read as typed.
    let rest = || {
        let name = format!("ssmfs {subcommand}");
        std::iter::once(OsString::from(name)).chain(args.iter().skip(2).cloned())
    };
    let parsed = match subcommand {
        "exec" => exec::ExecArgs::try_parse_from(rest()).map(Command::Exec),
        "render" => render::RenderArgs::try_parse_from(rest()).map(Command::Render),
        _ => return None,
    };
    Some(match parsed {
        Ok(Command::Exec(args)) => {
            init_logging();
            exec::run(args)
        }
        Ok(Command::Render(args)) => {
            init_logging();
            render::run(args)
        }
        Err(error) if !error.use_stderr() => {
            // --help, --version.
            print!("{error}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("ssmfs {subcommand}: {}", usage_line(&error));
            ExitCode::from(EXIT_USAGE)
        }
    })
}

enum Command {
    Exec(exec::ExecArgs),
    Render(render::RenderArgs),
}

/// The one line of a clap error that names the problem ("invalid value
/// 'X' for '--env <NAME=PATH>': ..."), without clap's usage and help lines:
/// a script's log gets one line per mistake.
fn usage_line(error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    // The first paragraph: one line, or a heading and the names it lists
    // ("the following required arguments were not provided: --template").
    let paragraph: Vec<&str> = rendered
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .map(str::trim)
        .collect();
    let line = paragraph.join(" ");
    line.strip_prefix("error: ").unwrap_or(&line).to_string()
}

/// Logs to stderr (a container's log, or the terminal), filtered by
/// SSMFS_LOG (default `info`). Lines name files and variables, never values.
fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("SSMFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_filter(filter),
        )
        .try_init();
}

/// Marks this process non-dumpable: it holds values, so no core file and
/// no ptrace or /proc/PID/mem by other processes of the same user. Not
/// `daemon::harden_process`: its RLIMIT_CORE of 0 would be inherited by
/// exec's child, which is not ours to limit (the flag itself is reset by
/// the child's execve).
fn not_dumpable() {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        tracing::warn!(
            "cannot mark the process non-dumpable: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Runs `future` on a runtime of one thread (exec and render wait on
/// signals, a child and a stream channel: nothing to spread over cores);
/// `None`, said on stderr, when no runtime can be built.
fn block_on<F: std::future::Future>(command: &str, future: F) -> Option<F::Output> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => Some(runtime.block_on(future)),
        Err(error) => {
            eprintln!("ssmfs {command}: cannot start: {error}");
            None
        }
    }
}

/// Sends `signal` to the process group `pgid`; whether it was delivered
/// (false when no process is left in it).
fn kill_group(pgid: i32, signal: i32) -> bool {
    // SAFETY: kill with integer arguments only; a pgid of 0 or less would
    // mean another group than asked.
    pgid > 0 && unsafe { libc::kill(-pgid, signal) } == 0
}

/// Waits that double after each failure up to a cap, so a failure that
/// lasts is one log line per step rather than a flood.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Self {
        Self {
            first,
            cap,
            next: first,
        }
    }

    /// The wait before the next attempt; the one after it doubles.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (delay * 2).min(self.cap);
        delay
    }

    /// After a success: the next failure waits the first delay again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// Gathers a burst of change notices into one action: due once no notice
/// came for `quiet`, or `max_wait` after the first one, so a steady trickle
/// of rotations cannot postpone the action forever.
#[derive(Debug, Clone)]
pub struct Debounce {
    quiet: Duration,
    max_wait: Duration,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Debounce {
    pub fn new(quiet: Duration, max_wait: Duration) -> Self {
        Self {
            quiet,
            max_wait,
            first: None,
            last: None,
        }
    }

    /// A change notice arrived at `now`.
    pub fn note(&mut self, now: Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    /// When the gathered notices are due; `None` when there are none.
    pub fn due_at(&self) -> Option<Instant> {
        let (first, last) = (self.first?, self.last?);
        Some((last + self.quiet).min(first + self.max_wait))
    }

    /// Whether the notices are due at `now`; if so they are taken (the
    /// caller acts once for all of them).
    pub fn take_due(&mut self, now: Instant) -> bool {
        match self.due_at() {
            Some(due) if due <= now => {
                self.first = None;
                self.last = None;
                true
            }
            _ => false,
        }
    }
}

/// The longest a burst can postpone an action: with rotations every few
/// hundred milliseconds, the program still sees them every 5 s.
pub const DEBOUNCE_MAX_WAIT: Duration = Duration::from_secs(5);

/// A duration as users write it (`1s`, `500ms`, `2m`), for log lines.
fn human(duration: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(duration)
}

/// Sleeps until `at`, or forever when there is nothing to wait for (a
/// branch of a select loop whose timer is off).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let delays: Vec<u64> = (0..7).map(|_| backoff.next_delay().as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_secs(1));
    }

    #[test]
    fn a_burst_is_one_action_after_the_quiet_period() {
        let ms = Duration::from_millis;
        let start = Instant::now();
        let mut debounce = Debounce::new(ms(500), ms(5000));
        assert_eq!(debounce.due_at(), None);
        // Ten notices within 200 ms.
        for i in 0..10 {
            debounce.note(start + ms(20 * i));
            assert!(!debounce.take_due(start + ms(20 * i)));
        }
        assert_eq!(debounce.due_at(), Some(start + ms(180 + 500)));
        assert!(!debounce.take_due(start + ms(679)));
        assert!(debounce.take_due(start + ms(680)));
        // Taken: nothing is due until the next notice.
        assert_eq!(debounce.due_at(), None);
        assert!(!debounce.take_due(start + ms(10_000)));
    }

    #[test]
    fn a_steady_trickle_is_acted_on_at_the_max_wait() {
        let ms = Duration::from_millis;
        let start = Instant::now();
        let mut debounce = Debounce::new(ms(500), ms(5000));
        let mut actions = 0;
        // A notice every 300 ms for 12 s: never quiet for 500 ms.
        for step in 0..40 {
            let now = start + ms(300 * step);
            if debounce.take_due(now) {
                actions += 1;
            }
            debounce.note(now);
        }
        assert_eq!(actions, 2, "one action per 5 s of trickle");
    }

    #[test]
    fn usage_errors_are_one_line() {
        let error =
            exec::ExecArgs::try_parse_from(["ssmfs exec", "--env", "NOEQUALS", "--", "true"])
                .unwrap_err();
        let line = usage_line(&error);
        assert!(!line.contains('\n'), "{line}");
        assert!(line.contains("NOEQUALS"), "{line}");
        assert!(line.contains("NAME=PATH"), "{line}");
        let error = render::RenderArgs::try_parse_from(["ssmfs render"]).unwrap_err();
        let line = usage_line(&error);
        assert!(line.contains("not provided: --template"), "{line}");
        assert!(!line.contains('\n') && !line.contains("Usage"), "{line}");
    }
}
