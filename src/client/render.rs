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

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use minijinja::{Error as JinjaError, ErrorKind};
use tokio::signal::unix::{signal, SignalKind};
use zeroize::Zeroizing;

use super::stream::{self, Change, Streams};
use super::{human, Backoff, Debounce, DEBOUNCE_MAX_WAIT};
use crate::names::View;
use crate::secret::SecretBytes;
use crate::views;

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

/// `--owner UID[:GID]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: Option<u32>,
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

/// The mode of a new output when no MODE is given: owner-only, since a
/// rendered file usually holds a secret.
const DEFAULT_MODE: u32 = 0o600;

/// What one render read: for change lines, for redaction, and the read
/// that failed.
#[derive(Default)]
struct Reads {
    files: Vec<PathBuf>,
    values: Vec<SecretBytes>,
    failure: Option<String>,
}

type SharedReads = Arc<Mutex<Reads>>;

/// A rendered template, or why not (a message with no value in it).
struct Rendered {
    text: Zeroizing<String>,
}

/// Resolves a template's PATH argument and reads it, recording both.
fn read_for_template(
    reads: &SharedReads,
    base: Option<&Path>,
    path: &str,
) -> Result<SecretBytes, JinjaError> {
    let mut reads = reads.lock().unwrap_or_else(|poison| poison.into_inner());
    let requested = Path::new(path);
    let resolved = if requested.is_absolute() {
        requested.to_path_buf()
    } else {
        match base {
            Some(base) => base.join(requested),
            None => {
                let failure = format!(
                    "relative path '{path}' needs --root (no single ssmfs mount to start from)"
                );
                reads.failure = Some(failure.clone());
                return Err(JinjaError::new(ErrorKind::InvalidOperation, failure));
            }
        }
    };
    reads.files.push(stream::key(&resolved));
    match std::fs::read(&resolved) {
        Ok(bytes) => {
            let value = SecretBytes::new(bytes);
            reads.values.push(value.clone());
            Ok(value)
        }
        Err(cause) => {
            let failure = format!("cannot read {}: {cause}", resolved.display());
            reads.failure = Some(failure.clone());
            Err(JinjaError::new(ErrorKind::InvalidOperation, failure))
        }
    }
}

/// A failure of a template function that is about a file's content (the
/// file read fine): named, never quoted.
fn content_failure(reads: &SharedReads, message: String) -> JinjaError {
    let mut reads = reads.lock().unwrap_or_else(|poison| poison.into_inner());
    reads.failure = Some(message.clone());
    JinjaError::new(ErrorKind::InvalidOperation, message)
}

fn as_text(reads: &SharedReads, path: &str, value: &SecretBytes) -> Result<String, JinjaError> {
    std::str::from_utf8(value.expose())
        .map(str::to_string)
        .map_err(|_| content_failure(reads, format!("{path} is not valid UTF-8 text")))
}

/// One field of a view of a file (`json`: a top-level key; `conn`: a part
/// of an Airflow connection), as the mount's `@json/` and `@conn/` show it.
fn view_field(
    reads: &SharedReads,
    base: Option<&Path>,
    view: View,
    path: &str,
    field: &str,
) -> Result<String, JinjaError> {
    let value = read_for_template(reads, base, path)?;
    let what = match view {
        View::Json => "a JSON object",
        View::Conn => "an Airflow connection (URI or JSON)",
    };
    let Some(fields) = views::fields(view, value.expose()) else {
        return Err(content_failure(reads, format!("{path} is not {what}")));
    };
    match fields.into_iter().find(|(name, _)| name == field) {
        Some((_, bytes)) => {
            let text = as_text(reads, path, &bytes)?;
            reads
                .lock()
                .unwrap_or_else(|poison| poison.into_inner())
                .values
                .push(bytes);
            Ok(text)
        }
        // A part Airflow leaves unset (no port): empty, as Airflow's own
        // templates would print None as nothing useful either.
        None if view == View::Conn && views::CONN_FIELDS.contains(&field) => Ok(String::new()),
        None if view == View::Conn => Err(content_failure(
            reads,
            format!(
                "conn(): '{field}' is not a part of a connection (one of {})",
                views::CONN_FIELDS.join(", ")
            ),
        )),
        None => Err(content_failure(
            reads,
            format!("{path} has no key '{field}'"),
        )),
    }
}

/// Renders one template; the files it read, whether it succeeded or not.
fn render_template(spec: &TemplateSpec, base: Option<&Path>) -> (Result<Rendered, String>, Reads) {
    let reads: SharedReads = Arc::default();
    let result = render_with(spec, base, &reads);
    let reads = std::mem::take(&mut *reads.lock().unwrap_or_else(|poison| poison.into_inner()));
    let result = result.map_err(|message| redact(message, &reads.values));
    (result, reads)
}

fn render_with(
    spec: &TemplateSpec,
    base: Option<&Path>,
    reads: &SharedReads,
) -> Result<Rendered, String> {
    let name = spec.source.display().to_string();
    let source = std::fs::read_to_string(&spec.source)
        .map_err(|cause| format!("template {name}: cannot read it: {cause}"))?;
    let mut env = minijinja::Environment::new();
    // Config files, not HTML: a password with '&' must stay as it is.
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    // A misspelt name is an error, not an empty string in a config file.
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    // A config file ends with its newline, as the template wrote it.
    if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder()
        .keep_trailing_newline(true)
        .build()
    {
        env.set_syntax(syntax);
    }
    let base_path = base.map(Path::to_path_buf);
    {
        let (reads, base) = (reads.clone(), base_path.clone());
        env.add_function("file", move |path: String| {
            let value = read_for_template(&reads, base.as_deref(), &path)?;
            as_text(&reads, &path, &value)
        });
    }
    {
        let (reads, base) = (reads.clone(), base_path.clone());
        env.add_function("json", move |path: String, key: String| {
            view_field(&reads, base.as_deref(), View::Json, &path, &key)
        });
    }
    {
        let (reads, base) = (reads.clone(), base_path);
        env.add_function("conn", move |path: String, part: String| {
            view_field(&reads, base.as_deref(), View::Conn, &path, &part)
        });
    }
    let line_of = |error: &JinjaError| {
        error
            .line()
            .map(|line| format!(" line {line}"))
            .unwrap_or_default()
    };
    // A syntax error quotes the template's own source, never a value: its
    // detail says what is wrong.
    let syntax_error = |error: JinjaError| {
        let what = match error.detail() {
            Some(detail) => format!("{}: {detail}", error.kind()),
            None => error.kind().to_string(),
        };
        format!("template {name}{}: {what}", line_of(&error))
    };
    // An error while rendering may quote values ("unable to calculate
    // {lhs} * {rhs}", "tried to include non-existing template \"{value}\""):
    // only its kind, and the file that could not be read if a function
    // recorded one.
    let render_error = |error: JinjaError| {
        let failure = reads
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .failure
            .clone();
        let what = failure.unwrap_or_else(|| error.kind().to_string());
        format!("template {name}{}: {what}", line_of(&error))
    };
    let template = env
        .template_from_named_str(&name, &source)
        .map_err(syntax_error)?;
    let text = template
        .render(minijinja::context! {})
        .map_err(render_error)?;
    Ok(Rendered {
        text: Zeroizing::new(text),
    })
}

/// Values shorter than this are not searched for in messages: they would
/// match ordinary words and numbers of the message itself.
const MIN_REDACTED: usize = 4;

/// `message` with every value in `values` (whole, and each of its lines)
/// replaced: a template may have made a path or a key out of a value.
pub fn redact(mut message: String, values: &[SecretBytes]) -> String {
    for value in values {
        let Ok(text) = std::str::from_utf8(value.expose()) else {
            continue;
        };
        let mut pieces: Vec<&str> = std::iter::once(text.trim())
            .chain(text.lines().map(str::trim))
            .filter(|piece| piece.len() >= MIN_REDACTED)
            .collect();
        // Longest first, so a line of a value does not split the whole.
        pieces.sort_by_key(|piece| std::cmp::Reverse(piece.len()));
        for piece in pieces {
            if message.contains(piece) {
                message = message.replace(piece, "<redacted>");
            }
        }
    }
    message
}

/// Replaces DEST with `bytes` unless it holds them already; `Ok(true)`
/// when it was replaced. Atomic: readers see the old file or the new one.
pub fn write_atomically(
    dest: &Path,
    bytes: &[u8],
    mode: Option<u32>,
    owner: Option<Owner>,
) -> std::io::Result<bool> {
    let existing = match std::fs::read(dest) {
        Ok(bytes) => Some(Zeroizing::new(bytes)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => return Err(error),
    };
    let metadata = existing.as_ref().and_then(|_| std::fs::metadata(dest).ok());
    let mode = mode
        .or(metadata.as_ref().map(|meta| meta.mode() & 0o7777))
        .unwrap_or(DEFAULT_MODE);
    if let (Some(existing), Some(meta)) = (&existing, &metadata) {
        if existing.as_slice() == bytes {
            // Same bytes: a different mode or owner is set in place; no
            // rename, so watchers are not told of a change there is not.
            if let Some(owner) = owner {
                if meta.uid() != owner.uid || owner.gid.is_some_and(|gid| gid != meta.gid()) {
                    std::os::unix::fs::chown(dest, Some(owner.uid), owner.gid)?;
                }
            }
            if meta.mode() & 0o7777 != mode {
                std::fs::set_permissions(dest, std::fs::Permissions::from_mode(mode))?;
            }
            return Ok(false);
        }
    }
    let dir = dir_of(dest);
    let name = dest
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "names no file"))?;
    // Hidden, so a watcher of `*.conf` does not pick up the half-written
    // one; a random suffix and O_EXCL, so no other file is ever written
    // through (a leftover, or a link planted in a shared directory).
    let temp = dir.join(format!(
        "{}{:016x}",
        temp_prefix(name),
        rand::random::<u64>()
    ));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(bytes)?;
        if let Some(owner) = owner {
            std::os::unix::fs::fchown(&file, Some(owner.uid), owner.gid)?;
        }
        // After chown, which clears set-id bits.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        std::fs::rename(&temp, dest)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written?;
    // So the rename itself survives a crash. DEST is written either way:
    // readers see the new file, and the command must run for it.
    if let Err(error) = std::fs::File::open(dir).and_then(|dir| dir.sync_all()) {
        tracing::warn!(
            "{} is written, but syncing its directory failed: {error}",
            dest.display()
        );
    }
    Ok(true)
}

/// The start of the name of DEST's temporary files: `.{DEST name}.ssmfs-render-`.
fn temp_prefix(dest_name: &std::ffi::OsStr) -> String {
    format!(".{}.ssmfs-render-", dest_name.to_string_lossy())
}

/// Removes the temporary files an earlier render of `dest` left in its
/// directory (killed between create and rename): each holds an old
/// rendering, secrets and all.
pub fn remove_leftover_temps(dest: &Path) {
    let (dir, Some(name)) = (dir_of(dest), dest.file_name()) else {
        return;
    };
    let prefix = temp_prefix(name);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => tracing::info!(
                    "removed {}, left over by an earlier render",
                    entry.path().display()
                ),
                Err(error) => tracing::warn!(
                    "cannot remove {}, left over by an earlier render: {error}",
                    entry.path().display()
                ),
            }
        }
    }
}

/// The directory a DEST is in (`.` for a bare name).
fn dir_of(dest: &Path) -> &Path {
    match dest.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
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

    #[test]
    fn redaction_removes_values_and_their_lines() {
        let values = [
            SecretBytes::new(b"hunter22\n".to_vec()),
            SecretBytes::new(b"-----BEGIN KEY-----\nMIIBOGkey\n-----END KEY-----\n".to_vec()),
            SecretBytes::new(b"ab".to_vec()),
        ];
        let message = "cannot read /mnt/hunter22: no; MIIBOGkey here; ab stays".to_string();
        assert_eq!(
            redact(message, &values),
            "cannot read /mnt/<redacted>: no; <redacted> here; ab stays"
        );
    }

    fn spec(dir: &Path, template: &str) -> TemplateSpec {
        let source = dir.join("t.j2");
        std::fs::write(&source, template).unwrap();
        TemplateSpec {
            source,
            dest: dir.join("out"),
            mode: None,
        }
    }

    #[test]
    fn functions_read_files_json_fields_and_connection_parts() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("pw"), "s3cret").unwrap();
        std::fs::write(root.join("cfg"), r#"{"user": "app", "port": 5432}"#).unwrap();
        std::fs::write(root.join("pg"), "postgres://u:p%40ss@db.example:5433/main").unwrap();
        let template = "{{ file('pw') }} {{ json('cfg', 'user') }}:{{ json('cfg', 'port') }} \
                        {{ conn('pg', 'password') }}@{{ conn('pg', 'host') }}:{{ conn('pg', 'port') }}\n";
        let (rendered, reads) = render_template(&spec(root, template), Some(root));
        assert_eq!(
            rendered.ok().unwrap().text.as_str(),
            "s3cret app:5432 p@ss@db.example:5433\n"
        );
        let canonical = root.canonicalize().unwrap();
        assert!(reads.files.contains(&canonical.join("pw")));
        assert!(reads.files.contains(&canonical.join("pg")));
    }

    #[test]
    fn errors_name_template_line_and_file_never_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("pw"), "hunter22").unwrap();
        let missing = spec(root, "a\n{{ file('pw') }}\n{{ file('missing') }}\n");
        let (rendered, reads) = render_template(&missing, Some(root));
        let message = rendered.err().unwrap();
        assert!(message.contains("t.j2 line 3"), "{message}");
        assert!(
            message.contains(&root.join("missing").display().to_string()),
            "{message}"
        );
        assert!(!message.contains("hunter22"), "{message}");
        // The missing file is followed too: its creation renders again.
        assert!(reads.files.iter().any(|file| file.ends_with("missing")));

        let from_value = spec(root, "{{ file(file('pw')) }}");
        let message = render_template(&from_value, Some(root)).0.err().unwrap();
        assert!(!message.contains("hunter22"), "{message}");

        let syntax = spec(root, "ok\n{% if %}\n");
        let message = render_template(&syntax, Some(root)).0.err().unwrap();
        assert!(
            message.contains("line 2") && message.contains("syntax"),
            "{message}"
        );

        let relative = spec(root, "{{ file('pw') }}");
        let message = render_template(&relative, None).0.err().unwrap();
        assert!(message.contains("--root"), "{message}");
    }

    #[test]
    fn render_errors_never_quote_a_value_even_a_short_one() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // Shorter than redaction looks for: only the message's form keeps it out.
        std::fs::write(root.join("pw"), "917").unwrap();
        for template in [
            "{% include file('pw') %}",
            // minijinja's detail: "unable to calculate 917 * 1000...".
            "{{ (file('pw') | int) * 10 ** 37 }}",
            "{{ -(file('pw') | int) - 170141183460469231731687303715884105727 }}",
        ] {
            let (rendered, _) = render_template(&spec(root, template), Some(root));
            let message = rendered.err().expect(template);
            assert!(!message.contains("917"), "{template}: {message}");
            assert!(message.contains("t.j2 line 1"), "{template}: {message}");
        }
    }

    #[test]
    fn leftover_temporary_files_of_a_dest_are_removed_and_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.conf");
        let leftover = dir.path().join(".out.conf.ssmfs-render-1234");
        std::fs::write(&leftover, "old secret").unwrap();
        let other = dir.path().join(".other.conf.ssmfs-render-1234");
        std::fs::write(&other, "x").unwrap();
        remove_leftover_temps(&dest);
        assert!(!leftover.exists());
        assert!(other.exists(), "another DEST's file is not ours");
    }

    #[test]
    fn writes_replace_only_changed_bytes_with_the_mode_asked() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.conf");
        assert!(write_atomically(&dest, b"one", None, None).unwrap());
        let mode = |path: &Path| std::fs::metadata(path).unwrap().mode() & 0o7777;
        assert_eq!(mode(&dest), DEFAULT_MODE);
        let inode = std::fs::metadata(&dest).unwrap().ino();
        assert!(!write_atomically(&dest, b"one", None, None).unwrap());
        assert_eq!(
            std::fs::metadata(&dest).unwrap().ino(),
            inode,
            "not replaced"
        );
        // Same bytes, another mode: set in place.
        assert!(!write_atomically(&dest, b"one", Some(0o640), None).unwrap());
        assert_eq!(mode(&dest), 0o640);
        assert!(write_atomically(&dest, b"two", None, None).unwrap());
        assert_eq!(std::fs::read(&dest).unwrap(), b"two");
        assert_eq!(mode(&dest), 0o640, "the present mode is kept");
        assert_ne!(
            std::fs::metadata(&dest).unwrap().ino(),
            inode,
            "renamed over"
        );
        // As root (CI), the owner is set too; elsewhere chown is not ours.
        if unsafe { libc::geteuid() } == 0 {
            let owner = Some(Owner {
                uid: 4321,
                gid: Some(4322),
            });
            assert!(write_atomically(&dest, b"three", None, owner).unwrap());
            let meta = std::fs::metadata(&dest).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (4321, 4322));
            assert_eq!(mode(&dest), 0o640, "chown keeps the mode asked");
        }
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }
}
