//! Rendering one template with minijinja: the functions `file`, `json`
//! and `conn`, which record every file they read (for change lines) and
//! every value (for redaction), and error messages that name the template,
//! its line and the file, never a value.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use minijinja::{Error as JinjaError, ErrorKind};
use zeroize::Zeroizing;

use super::TemplateSpec;
use crate::client::stream;
use crate::fs::views;
use crate::names::View;
use crate::secret::SecretBytes;

/// What one render read: for change lines, for redaction, and the read
/// that failed.
#[derive(Default)]
pub(super) struct Reads {
    pub(super) files: Vec<PathBuf>,
    values: Vec<SecretBytes>,
    failure: Option<String>,
}

type SharedReads = Arc<Mutex<Reads>>;

/// A rendered template, or why not (a message with no value in it).
pub(super) struct Rendered {
    pub(super) text: Zeroizing<String>,
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
pub(super) fn render_template(
    spec: &TemplateSpec,
    base: Option<&Path>,
) -> (Result<Rendered, String>, Reads) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
