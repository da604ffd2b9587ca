//! `ssmfs render`: Jinja templates rendered into files from ssmfs values,
//! rendered again when a value they read changes, then a command.
//!
//! Model: each `--template SRC:DEST[:MODE]` is rendered on its own with
//! minijinja (Airflow's users already write Jinja). Its functions `file`,
//! `json` and `conn` read through the filesystem and record each path they
//! read, so a change line that names one of them (or `@dropped`) renders
//! that template again, after the same quiet period as `exec`. An output is
//! replaced only when its bytes differ, and always atomically: a temporary
//! file in DEST's directory, fsync, mode and owner, rename. So an inotify
//! watcher sees IN_MOVED_TO and no reader ever sees a partial file. A
//! template that fails (syntax, a missing file) keeps its old output, logs
//! one line naming the template, its line and the file, and is retried with
//! backoff. `--command` runs after a render changed some output, and only
//! while no template is failing, so a program never reloads a half-updated
//! set (a new certificate with an old key). Values are never logged: error
//! messages are built from names, and every value a render read is
//! redacted from them anyway, in case a template computed a path from one.
//!
//! `template` renders one template; `crate::client::atomic` writes it.

mod template;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

use super::atomic::{dir_of, remove_leftover_temps, write_atomically, Owner};
use super::stream::{self, Change, Streams};
use super::{human, Backoff, Debounce, DEBOUNCE_MAX_WAIT};
use template::render_template;

#[derive(Debug, Parser)]
#[command(
    name = "ssmfs render",
    version,
    about = "Render Jinja templates into files from ssmfs values, again when they change, and run a command"
)]
pub struct RenderArgs {
    /// Render SRC (a Jinja template) into DEST, with the octal MODE if
    /// given (else DEST's present mode, or 0600 for a new file: a rendered
    /// file usually holds a secret).
    #[arg(long = "template", value_name = "SRC:DEST[:MODE]", required = true, value_parser = parse_template)]
    pub templates: Vec<TemplateSpec>,
    /// Owner of every output, numeric (needs the right to chown).
    #[arg(long, value_name = "UID[:GID]", value_parser = parse_owner)]
    pub owner: Option<Owner>,
    /// Run this with `sh -c` after a render changed at least one output
    /// (e.g. `nginx -s reload`).
    #[arg(long, value_name = "CMD")]
    pub command: Option<String>,
    /// A command still running after this is killed (its process group);
    /// 30 s is ample for a reload and short enough that the next rotation
    /// is not held up long.
    #[arg(long, default_value = "30s", value_parser = crate::config::parse_duration)]
    pub command_timeout: Duration,
    /// The quiet period that gathers a burst of changes into one render (at
    /// most 5 s after the first); 500 ms holds the changes of one rotation
    /// script together, so the command runs once.
    #[arg(long, default_value = "500ms", value_parser = crate::config::parse_duration)]
    pub debounce: Duration,
    /// Render once and exit: 0 when every template rendered (and the
    /// command, if it ran, succeeded), 1 otherwise.
    #[arg(long)]
    pub once: bool,
    /// Follow this stream instead of each mount's `@changes` (e.g. a
    /// subtree's DIR/@changes); paths in its lines are relative to the root
    /// of the ssmfs mount holding it (to its directory if it is on none).
    #[arg(long, value_name = "PATH")]
    pub changes: Option<PathBuf>,
    /// Where a relative path in `file()` starts. Without it: where the
    /// lines of --changes are relative to, else the one ssmfs mount of this
    /// host (an error when there are several).
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
}

/// `--template SRC:DEST[:MODE]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateSpec {
    pub source: PathBuf,
    pub dest: PathBuf,
    pub mode: Option<u32>,
}

fn parse_template(raw: &str) -> Result<TemplateSpec, String> {
    let mut parts = raw.splitn(3, ':');
    let source = parts.next().unwrap_or_default();
    let dest = parts.next().unwrap_or_default();
    if source.is_empty() || dest.is_empty() {
        return Err(
            "expected SRC:DEST or SRC:DEST:MODE (e.g. app.conf.j2:/etc/app/app.conf:0640)".into(),
        );
    }
    let mode = parts
        .next()
        .map(|mode| crate::config::parse_mode(mode).map(u32::from))
        .transpose()
        .map_err(|error| error.to_string())?;
    Ok(TemplateSpec {
        source: source.into(),
        dest: dest.into(),
        mode,
    })
}

fn parse_owner(raw: &str) -> Result<Owner, String> {
    let number = |text: &str| {
        text.parse::<u32>()
            .map_err(|_| format!("'{text}' is not a numeric id (UID or UID:GID, e.g. 101:101)"))
    };
    Ok(match raw.split_once(':') {
        Some((uid, gid)) => Owner {
            uid: number(uid)?,
            gid: Some(number(gid)?),
        },
        None => Owner {
            uid: number(raw)?,
            gid: None,
        },
    })
}

/// One `--template` and what its last render read.
struct Output {
    spec: TemplateSpec,
    reads: Vec<PathBuf>,
    dirty: bool,
    /// Failing: when to render it again.
    retry_at: Option<Instant>,
    backoff: Backoff,
}

struct Renderer {
    args: RenderArgs,
    base: Option<PathBuf>,
    outputs: Vec<Output>,
    /// An output changed and the command has not run since.
    command_owed: bool,
}

impl Renderer {
    fn new(args: RenderArgs) -> Self {
        for spec in &args.templates {
            remove_leftover_temps(&spec.dest);
        }
        let outputs = args
            .templates
            .iter()
            .map(|spec| Output {
                spec: spec.clone(),
                reads: Vec::new(),
                dirty: true,
                retry_at: None,
                // A failing template: 1 s doubling to 30 s, one line each.
                backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(30)),
            })
            .collect();
        Self {
            args,
            base: None,
            outputs,
            command_owed: false,
        }
    }

    /// Where a relative path in `file()` starts: --root; else where the
    /// lines of --changes land (the ssmfs mount holding it, or its
    /// directory); else the one ssmfs mount of this host. Looked for again
    /// until found: a mount may come up after render starts.
    fn base(&mut self) -> Option<PathBuf> {
        if self.base.is_none() {
            let mounts = stream::current_ssmfs_mounts();
            self.base = self
                .args
                .root
                .clone()
                .or_else(|| {
                    let changes = stream::key(self.args.changes.as_ref()?);
                    Some(stream::line_base_of(&changes, &mounts).dir)
                })
                .or_else(|| match mounts.as_slice() {
                    [only] => Some(only.dir.clone()),
                    _ => None,
                });
        }
        self.base.clone()
    }

    /// Renders every dirty template; returns how many failed.
    fn render_dirty(&mut self, retrying: bool) -> usize {
        let base = self.base();
        let mut failed = 0;
        for output in self.outputs.iter_mut().filter(|output| output.dirty) {
            output.dirty = false;
            let (rendered, reads) = render_template(&output.spec, base.as_deref());
            output.reads = reads.files;
            let dest = output.spec.dest.display();
            let written = rendered.and_then(|rendered| {
                write_atomically(
                    &output.spec.dest,
                    rendered.text.as_bytes(),
                    output.spec.mode,
                    self.args.owner,
                )
                .map_err(|cause| {
                    let dir = dir_of(&output.spec.dest);
                    if cause.kind() == std::io::ErrorKind::NotFound && !dir.is_dir() {
                        format!(
                            "cannot write {dest}: its directory {} does not exist",
                            dir.display()
                        )
                    } else {
                        format!("cannot write {dest}: {cause}")
                    }
                })
            });
            match written {
                Ok(changed) => {
                    output.retry_at = None;
                    output.backoff.reset();
                    if changed {
                        tracing::info!("rendered {dest} from {}", output.spec.source.display());
                        self.command_owed = true;
                    }
                }
                Err(message) => {
                    failed += 1;
                    if retrying {
                        let delay = output.backoff.next_delay();
                        tracing::error!(
                            "{message}; {dest} keeps its old content; trying again in {}",
                            human(delay)
                        );
                        output.retry_at = Some(Instant::now() + delay);
                    } else {
                        tracing::error!("{message}; {dest} keeps its old content");
                    }
                }
            }
        }
        failed
    }

    fn failing(&self) -> bool {
        self.outputs.iter().any(|output| output.retry_at.is_some())
    }

    /// Runs the command if an output changed and no template is failing;
    /// whether it succeeded (true when it did not have to run).
    async fn run_command_if_owed(&mut self) -> bool {
        if !self.command_owed || self.failing() {
            return true;
        }
        self.command_owed = false;
        match &self.args.command {
            Some(command) => run_command(command, self.args.command_timeout).await,
            None => true,
        }
    }

    fn follow(&self, streams: &mut Streams) {
        let mounts = stream::current_ssmfs_mounts();
        for output in &self.outputs {
            for read in &output.reads {
                streams.follow(read, &mounts);
            }
        }
    }
}

/// Runs `sh -c COMMAND` in a process group of its own, killed whole if it
/// outlives `timeout`. One log line when it fails; render goes on anyway.
async fn run_command(command: &str, timeout: Duration) -> bool {
    let mut child = match tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => child,
        Err(error) => {
            tracing::warn!("--command could not start: {error}");
            return false;
        }
    };
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => true,
        Ok(Ok(status)) => {
            tracing::warn!("--command failed: {status}");
            false
        }
        Ok(Err(error)) => {
            tracing::warn!("--command could not be waited for: {error}");
            false
        }
        Err(_) => {
            if let Some(pid) = child.id() {
                super::kill_group(pid as i32, libc::SIGKILL);
            }
            let _ = child.wait().await;
            tracing::warn!(
                "--command timed out after {}; it was killed",
                human(timeout)
            );
            false
        }
    }
}

pub fn run(args: RenderArgs) -> ExitCode {
    super::not_dumpable();
    super::block_on("render", async {
        if args.once {
            let mut renderer = Renderer::new(args);
            let failed = renderer.render_dirty(false);
            if failed > 0 {
                return ExitCode::FAILURE;
            }
            return if renderer.run_command_if_owed().await {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        match serve(Renderer::new(args)).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!("cannot start: {error}");
                ExitCode::FAILURE
            }
        }
    })
    .unwrap_or(ExitCode::FAILURE)
}

/// Renders, then renders again as changes come, until SIGTERM or SIGINT.
async fn serve(mut renderer: Renderer) -> std::io::Result<()> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let (mut streams, mut changes) = Streams::new(renderer.args.changes.as_deref());
    let mut debounce = Debounce::new(renderer.args.debounce, DEBOUNCE_MAX_WAIT);
    renderer.render_dirty(true);
    renderer.follow(&mut streams);
    renderer.run_command_if_owed().await;
    loop {
        let retry_at = renderer
            .outputs
            .iter()
            .filter_map(|output| output.retry_at)
            .min();
        let wake = [debounce.due_at(), retry_at].into_iter().flatten().min();
        tokio::select! {
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
            Some(change) = changes.recv() => {
                let mut concerned = false;
                for output in &mut renderer.outputs {
                    if matches!(change, Change::Dropped)
                        || output.reads.iter().any(|read| change.concerns(read))
                    {
                        output.dirty = true;
                        concerned = true;
                    }
                }
                if concerned {
                    debounce.note(Instant::now());
                }
            }
            _ = super::sleep_until(wake) => {
                let now = Instant::now();
                let due = debounce.take_due(now);
                for output in &mut renderer.outputs {
                    if output.retry_at.is_some_and(|at| at <= now) {
                        output.dirty = true;
                    }
                }
                // A change not yet quiet waits for its debounce, unless a
                // retry renders now anyway.
                if due || renderer.outputs.iter().any(|o| o.retry_at.is_some_and(|at| at <= now)) {
                    renderer.render_dirty(true);
                    renderer.follow(&mut streams);
                    renderer.run_command_if_owed().await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_specs_and_modes() {
        assert_eq!(
            parse_template("a.j2:/etc/a.conf:0640"),
            Ok(TemplateSpec {
                source: "a.j2".into(),
                dest: "/etc/a.conf".into(),
                mode: Some(0o640)
            })
        );
        assert_eq!(parse_template("a.j2:b").unwrap().mode, None);
        let not_octal = parse_template("a.j2:b:999").unwrap_err();
        assert!(
            not_octal.contains("'999'") && not_octal.contains("octal"),
            "{not_octal}"
        );
        assert!(parse_template("a.j2:b:rw").unwrap_err().contains("octal"));
        assert!(parse_template("a.j2").unwrap_err().contains("SRC:DEST"));
        assert!(parse_template(":b").is_err());
    }

    #[test]
    fn owners() {
        assert_eq!(
            parse_owner("101"),
            Ok(Owner {
                uid: 101,
                gid: None
            })
        );
        assert_eq!(
            parse_owner("101:102"),
            Ok(Owner {
                uid: 101,
                gid: Some(102)
            })
        );
        assert!(parse_owner("nginx").unwrap_err().contains("numeric"));
        assert!(parse_owner("1:x").is_err());
    }
}
