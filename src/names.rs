//! Mapping between paths below the mount point and SSM parameter names.
//!
//! The mount root is the SSM path PREFIX; a file at `a/b` below it is the
//! parameter `PREFIX/a/b`. SSM names use only `a-zA-Z0-9_.-` and `/`, are at most
//! 1011 characters long and at most 15 levels deep, and may not begin with the
//! reserved `aws` / `ssm` prefixes (except AWS's public `/aws/...` tree). Anything
//! outside those rules is answered here, locally, without an API call.

use std::collections::BTreeMap;

use thiserror::Error;

/// SSM's documented limit on a parameter name's length.
pub const MAX_NAME_LEN: usize = 1011;
/// SSM's documented limit on hierarchy depth.
pub const MAX_DEPTH: usize = 15;
/// A file that shows a directory's own value when a parameter is shadowed by
/// parameters below it ("directory wins"). `@` cannot occur in an SSM name, so
/// this can never collide with a real parameter.
pub const SHADOWED_VALUE_NAME: &str = "@value";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("name is longer than SSM's {MAX_NAME_LEN}-character limit")]
    TooLong,
    #[error("name is deeper than SSM's {MAX_DEPTH} levels")]
    TooDeep,
    #[error("name contains a character SSM does not allow (only a-zA-Z0-9_.- and /)")]
    BadCharacter,
    #[error("name has an empty, '.' or '..' segment")]
    BadSegment,
    #[error("name begins with a prefix SSM reserves (aws or ssm)")]
    Reserved,
    #[error("must be an absolute SSM path such as /airflow")]
    NotAbsolute,
    #[error("not a version (1, 2, ...) or a label (a-zA-Z0-9_.-, not starting with a digit, aws or ssm)")]
    BadSelector,
}

/// SSM's pass-through to Secrets Manager: GetParameter on
/// `/aws/reference/secretsmanager/<secret-id>` returns the secret.
pub const SECRETS_MANAGER_REFERENCE: &str = "/aws/reference/secretsmanager";

fn allowed_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

/// Secret ids may also hold `+ = @` (and `/`, which makes levels here).
fn allowed_secret_char(c: char) -> bool {
    allowed_char(c) || matches!(c, '+' | '=' | '@')
}

/// Whether `path` is Secrets Manager's tree as SSM passes it through.
pub fn is_secrets_manager(path: &str) -> bool {
    relative_to(SECRETS_MANAGER_REFERENCE, path).is_some() || path == SECRETS_MANAGER_REFERENCE
}

fn check_segment(segment: &str) -> Result<(), NameError> {
    check_segment_with(segment, allowed_char)
}

fn check_segment_with(segment: &str, allowed: fn(char) -> bool) -> Result<(), NameError> {
    if segment.is_empty() || segment == "." || segment == ".." {
        return Err(NameError::BadSegment);
    }
    if !segment.chars().all(allowed) {
        return Err(NameError::BadCharacter);
    }
    Ok(())
}

/// A version or a label after `NAME:` (SSM's own selector syntax).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Version(i64),
    Label(String),
}

/// A directory of fields derived from a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// `NAME@json/`: one file per top-level key of a JSON object.
    Json,
    /// `NAME@conn/`: the fields of an Airflow connection (URI or JSON).
    Conn,
}

impl View {
    pub fn suffix(self) -> &'static str {
        match self {
            View::Json => "@json",
            View::Conn => "@conn",
        }
    }
}

/// A name a user can type that is not a plain parameter: `NAME:3`,
/// `NAME:prod`, `NAME@json`, `NAME:prod@conn`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Special<'a> {
    pub base: &'a str,
    pub selector: Option<Selector>,
    pub view: Option<View>,
}

impl Special<'_> {
    /// The name GetParameter takes for the value (`/p/x`, `/p/x:3`, `/p/x:prod`).
    pub fn value_name(&self, dir: &str) -> String {
        let name = join(dir, self.base);
        match &self.selector {
            None => name,
            Some(Selector::Version(version)) => format!("{name}:{version}"),
            Some(Selector::Label(label)) => format!("{name}:{label}"),
        }
    }
}

/// Reads a segment as a selector and/or a view. `None`: a plain name (no
/// view suffix, no `:`); `Err`: special but impossible (a bad version or
/// label, a bad base name), answered ENOENT without a call.
pub fn parse_special(segment: &str) -> Option<Result<Special<'_>, NameError>> {
    let (rest, view) = [View::Json, View::Conn]
        .into_iter()
        .find_map(|view| {
            segment
                .strip_suffix(view.suffix())
                .map(|rest| (rest, Some(view)))
        })
        .unwrap_or((segment, None));
    let (base, selector) = match rest.split_once(':') {
        Some((base, selector)) => (base, Some(selector)),
        None => (rest, None),
    };
    if view.is_none() && selector.is_none() {
        return None;
    }
    Some(parse_special_parts(base, selector, view))
}

fn parse_special_parts<'a>(
    base: &'a str,
    selector: Option<&str>,
    view: Option<View>,
) -> Result<Special<'a>, NameError> {
    check_segment_with(base, allowed_secret_char)?;
    let selector = selector.map(parse_selector).transpose()?;
    Ok(Special {
        base,
        selector,
        view,
    })
}

/// Whether SSM could hold `name` as a GetParameter name: a valid name below
/// `/`, optionally with a valid `:VERSION` or `:LABEL`. What every name the
/// filesystem asks for must satisfy (checked by the property tests).
pub fn is_valid_request_name(name: &str) -> bool {
    let (base, selector) = match name.split_once(':') {
        Some((base, selector)) => (base, Some(selector)),
        None => (name, None),
    };
    let Some(relative) = relative_to("/", base) else {
        return false;
    };
    let allowed = if is_secrets_manager(base) {
        allowed_secret_char
    } else {
        allowed_char
    };
    base.len() <= MAX_NAME_LEN
        && depth(base) <= MAX_DEPTH
        && relative
            .split('/')
            .all(|segment| check_segment_with(segment, allowed).is_ok())
        && selector.is_none_or(|s| parse_selector(s).is_ok())
}

/// Whether `name` carries a selector (`/p/x:3`, `/p/x:prod`). Such names are
/// fetched one GetParameter each, never in a GetParameters batch: SSM
/// answers a batch with the base names, which would hide which selector an
/// answer belongs to.
pub fn has_selector(name: &str) -> bool {
    name.contains(':')
}

/// A version (digits, at least 1) or a label as SSM allows it: 1-100 of
/// a-zA-Z0-9_.-, not starting with a digit, `aws` or `ssm`.
fn parse_selector(text: &str) -> Result<Selector, NameError> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return match text.parse::<i64>() {
            Ok(version) if version >= 1 => Ok(Selector::Version(version)),
            _ => Err(NameError::BadSelector),
        };
    }
    let lower = text.to_ascii_lowercase();
    let valid = (1..=100).contains(&text.len())
        && text.chars().all(allowed_char)
        && !text.starts_with(|c: char| c.is_ascii_digit())
        && !lower.starts_with("aws")
        && !lower.starts_with("ssm");
    if !valid {
        return Err(NameError::BadSelector);
    }
    Ok(Selector::Label(text.to_string()))
}

/// Whether `name` pins a version (`/p/x:3`): its value never changes.
pub fn pins_version(name: &str) -> bool {
    name.rsplit_once(':').is_some_and(|(_, version)| {
        !version.is_empty() && version.bytes().all(|b| b.is_ascii_digit())
    })
}

/// Names beginning with `aws` or `ssm` are reserved by SSM; only AWS's own public
/// parameters live there, all of them under exactly `/aws/`.
fn check_reserved(first_segment: &str) -> Result<(), NameError> {
    let lower = first_segment.to_ascii_lowercase();
    if lower.starts_with("ssm") || (lower.starts_with("aws") && first_segment != "aws") {
        return Err(NameError::Reserved);
    }
    Ok(())
}

/// Validates and normalises a mount prefix: absolute, valid segments, no trailing
/// slash (except `/` itself, the whole store).
pub fn parse_prefix(raw: &str) -> Result<String, NameError> {
    if !raw.starts_with('/') {
        return Err(NameError::NotAbsolute);
    }
    let trimmed = raw.trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok("/".to_string());
    }
    let segments: Vec<&str> = trimmed[1..].split('/').collect();
    for segment in &segments {
        check_segment(segment)?;
    }
    check_reserved(segments[0])?;
    if segments.len() >= MAX_DEPTH {
        return Err(NameError::TooDeep);
    }
    if trimmed.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    Ok(trimmed.to_string())
}

/// The SSM name of `segment` inside the directory whose SSM path is `parent`,
/// checked against every SSM rule.
pub fn child_name(parent: &str, segment: &str) -> Result<String, NameError> {
    if is_secrets_manager(parent) {
        check_segment_with(segment, allowed_secret_char)?;
    } else {
        check_segment(segment)?;
    }
    let name = if parent == "/" {
        check_reserved(segment)?;
        format!("/{segment}")
    } else {
        format!("{parent}/{segment}")
    };
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    if depth(&name) > MAX_DEPTH {
        return Err(NameError::TooDeep);
    }
    Ok(name)
}

/// `segment` joined below `dir`, unchecked (for names SSM itself returned).
pub fn join(dir: &str, segment: &str) -> String {
    if dir == "/" {
        format!("/{segment}")
    } else {
        format!("{dir}/{segment}")
    }
}

/// What a child of a directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChildKind {
    File,
    Dir,
}

/// The children of each directory at or below one path.
pub type Tree = BTreeMap<String, BTreeMap<Box<str>, ChildKind>>;

/// Folds parameter names found below `path` into the directories they imply:
/// `path` itself with its children, and, when `deep`, every directory below
/// it with its own. A child that is both a parameter and a prefix of others
/// is a directory ("directory wins"). Names not below `path` are ignored.
pub fn tree_below<'a>(path: &str, names: impl IntoIterator<Item = &'a str>, deep: bool) -> Tree {
    let mut tree = Tree::new();
    tree.insert(path.to_string(), BTreeMap::new());
    for name in names {
        let Some(relative) = relative_to(path, name) else {
            continue;
        };
        let mut dir = path.to_string();
        let mut segments = relative.split('/').peekable();
        while let Some(segment) = segments.next() {
            let kind = if segments.peek().is_some() {
                ChildKind::Dir
            } else {
                ChildKind::File
            };
            let slot = tree
                .entry(dir.clone())
                .or_default()
                .entry(Box::from(segment))
                .or_insert(kind);
            if kind == ChildKind::Dir {
                *slot = ChildKind::Dir;
            }
            if !deep {
                break;
            }
            dir = join(&dir, segment);
        }
    }
    tree
}

/// Number of levels in a hierarchical name: `/a` is 1, `/a/b/c` is 3.
pub fn depth(name: &str) -> usize {
    name.matches('/').count()
}

/// The path of `name` relative to `dir`, if `name` lies strictly below `dir`.
pub fn relative_to<'a>(dir: &str, name: &'a str) -> Option<&'a str> {
    let rest = if dir == "/" {
        name.strip_prefix('/')?
    } else {
        name.strip_prefix(dir)?.strip_prefix('/')?
    };
    (!rest.is_empty()).then_some(rest)
}

/// The last segment of a name (`/a/b` -> `b`).
pub fn base_name(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

/// The SSM path of the directory holding `name` (`/a/b` -> `/a`, `/a` -> `/`).
pub fn parent_name(name: &str) -> &str {
    match name.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &name[..i],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prefixes_are_normalised_or_refused() {
        assert_eq!(parse_prefix("/airflow/").unwrap(), "/airflow");
        assert_eq!(parse_prefix("/").unwrap(), "/");
        assert_eq!(parse_prefix("///").unwrap(), "/");
        assert_eq!(parse_prefix("airflow"), Err(NameError::NotAbsolute));
        assert_eq!(parse_prefix(""), Err(NameError::NotAbsolute));
        assert_eq!(parse_prefix("/a//b"), Err(NameError::BadSegment));
        assert_eq!(parse_prefix("/a/../b"), Err(NameError::BadSegment));
        assert_eq!(parse_prefix("/a b"), Err(NameError::BadCharacter));
        assert_eq!(parse_prefix("/ssm-things"), Err(NameError::Reserved));
        assert_eq!(parse_prefix("/aws/service").unwrap(), "/aws/service");
    }

    #[test]
    fn child_names_follow_ssm_rules() {
        assert_eq!(child_name("/", "airflow").unwrap(), "/airflow");
        assert_eq!(
            child_name("/airflow", "x.y-z_1").unwrap(),
            "/airflow/x.y-z_1"
        );
        assert_eq!(child_name("/a", "b c"), Err(NameError::BadCharacter));
        assert_eq!(child_name("/a", "caf\u{e9}"), Err(NameError::BadCharacter));
        assert_eq!(child_name("/a", ".."), Err(NameError::BadSegment));
        assert_eq!(child_name("/a", "@value"), Err(NameError::BadCharacter));
        assert_eq!(child_name("/", "AWSfoo"), Err(NameError::Reserved));
        assert_eq!(child_name("/", "SSM"), Err(NameError::Reserved));
        assert_eq!(child_name("/x", "ssm").unwrap(), "/x/ssm");
        let long = "a".repeat(1010);
        assert_eq!(child_name("/", &long).unwrap().len(), 1011);
        assert_eq!(
            child_name("/", &format!("{long}a")),
            Err(NameError::TooLong)
        );
        let deep = "/a".repeat(15);
        assert_eq!(child_name(&deep, "b"), Err(NameError::TooDeep));
        assert!(child_name(&"/a".repeat(14), "b").is_ok());
    }

    #[test]
    fn relative_paths_and_parents() {
        assert_eq!(relative_to("/a", "/a/b/c"), Some("b/c"));
        assert_eq!(relative_to("/a", "/ab/c"), None);
        assert_eq!(relative_to("/a", "/a"), None);
        assert_eq!(relative_to("/", "/a/b"), Some("a/b"));
        assert_eq!(parent_name("/a/b"), "/a");
        assert_eq!(parent_name("/a"), "/");
        assert_eq!(base_name("/a/b"), "b");
    }

    #[test]
    fn names_fold_into_directories_and_directories_win() {
        let names = ["/p/a", "/p/a/b", "/p/c/d/e", "/q/x"];
        let deep = tree_below("/p", names, true);
        let kinds = |dir: &str| -> Vec<(String, ChildKind)> {
            deep[dir].iter().map(|(n, k)| (n.to_string(), *k)).collect()
        };
        assert_eq!(
            kinds("/p"),
            [("a".into(), ChildKind::Dir), ("c".into(), ChildKind::Dir)]
        );
        assert_eq!(kinds("/p/a"), [("b".into(), ChildKind::File)]);
        assert_eq!(kinds("/p/c/d"), [("e".into(), ChildKind::File)]);
        assert!(!deep.contains_key("/q"));
        let shallow = tree_below("/p", names, false);
        assert_eq!(shallow.len(), 1, "only the path itself");
        assert_eq!(tree_below("/", ["/a/b"], true)["/a"].len(), 1);
    }

    proptest! {
        /// Every valid name splits into segments that map back to the same name.
        #[test]
        fn valid_names_round_trip(segments in prop::collection::vec("[a-zA-Z0-9_.-]{1,20}", 1..15)) {
            prop_assume!(segments.iter().all(|s| s != "." && s != ".."));
            prop_assume!(check_reserved(&segments[0]).is_ok());
            let mut name = "/".to_string();
            for segment in &segments {
                name = child_name(&name, segment).unwrap();
            }
            prop_assert_eq!(&name, &format!("/{}", segments.join("/")));
            prop_assert_eq!(relative_to("/", &name).unwrap(), segments.join("/"));
            prop_assert_eq!(base_name(&name), segments.last().unwrap().as_str());
        }

        /// Any segment with a character outside SSM's set is refused.
        #[test]
        fn invalid_characters_are_refused(prefix in "[a-z]{0,5}", bad in "[^a-zA-Z0-9_./-]", suffix in "[a-z]{0,5}") {
            let segment = format!("{prefix}{bad}{suffix}");
            prop_assert_eq!(child_name("/x", &segment), Err(NameError::BadCharacter));
        }
    }
}
