//! Where exec's variables come from (`--env`, `--env-dir`, `--airflow-dir`),
//! how their names are made, which change lines concern them, and reading
//! them whole or not at all. Errors and notes name files, never values.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{is_portable_name, Binding};
use crate::client::stream::{self, Change};
use crate::secret::SecretBytes;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::exec::parse_binding;

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
