//! Airflow's `SystemsManagerParameterStoreBackend` kwargs, read as Airflow reads
//! them, so a worker host mounts exactly the secrets its Airflow would look up.
//!
//! `variables`, `connections` and `config` folders map onto `variables_prefix`,
//! `connections_prefix` and `config_prefix` (Airflow's defaults when absent; a
//! leading `/` added and a trailing one dropped; `null` leaves the folder out).
//! `*_lookup_pattern` is a regex matched at the start of the key,
//! case-insensitively (Python's `re.match(..., re.IGNORECASE)`): keys that do not
//! match are absent. AWS keys (`role_arn`, `region_name`, `profile_name`,
//! `endpoint_url`) configure the client; `mountpoint` and `fallback` belong to
//! ssmfs's own Airflow backend (integrations/airflow), which reads the same
//! JSON; other keys are reported, not used.

use regex::Regex;
use serde_json::{Map, Value};

use crate::names;

/// One folder of the mount and the SSM path behind it.
#[derive(Debug, Clone)]
pub struct Area {
    pub folder: String,
    pub prefix: String,
    pub pattern: Option<Regex>,
}

impl Area {
    /// Whether a key directly below the prefix may be looked up.
    pub fn admits(&self, key: &str) -> bool {
        self.pattern.as_ref().is_none_or(|p| p.is_match(key))
    }
}

#[derive(Debug, Default)]
pub struct AirflowSettings {
    pub areas: Vec<Area>,
    pub role_arn: Option<String>,
    pub region: Option<String>,
    pub profile: Option<String>,
    pub endpoint_url: Option<String>,
    /// Keys ssmfs does not use, to be named in one warning.
    pub ignored_keys: Vec<String>,
    /// What the user should know about how the kwargs map (one line each).
    pub notes: Vec<String>,
}

const FOLDERS: [(&str, &str, &str, &str); 3] = [
    (
        "variables",
        "variables_prefix",
        "variables_lookup_pattern",
        "/airflow/variables",
    ),
    (
        "connections",
        "connections_prefix",
        "connections_lookup_pattern",
        "/airflow/connections",
    ),
    (
        "config",
        "config_prefix",
        "config_lookup_pattern",
        "/airflow/config",
    ),
];

/// Why a kwargs JSON cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KwargsError {
    #[error("not valid JSON: {0}")]
    NotJson(serde_json::Error),
    #[error("must be a JSON object such as {{\"variables_prefix\": \"airflow/variables\"}}")]
    NotAnObject,
    #[error("\"{key}\" must be a string, not {found}")]
    NotAString { key: String, found: Value },
    #[error("\"{key}\" must be a string or null, not {found}")]
    NotAStringOrNull { key: String, found: Value },
    #[error("\"{key}\": {cause}")]
    BadPrefix {
        key: String,
        cause: names::NameError,
    },
    #[error("\"{key}\" is not a valid regex: {cause}")]
    BadPattern { key: String, cause: regex::Error },
    #[error("\"sep\": {0:?} is not supported; secrets are reached through SSM's paths, which need \"/\"")]
    UnsupportedSep(String),
    #[error("\"{key}\": a secret name starting with / cannot be reached through SSM's /aws/reference/secretsmanager/")]
    UnreachableSecretPrefix { key: String },
}

fn string_key(kwargs: &Map<String, Value>, key: &str) -> Result<Option<String>, KwargsError> {
    match kwargs.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(KwargsError::NotAString {
            key: key.to_string(),
            found: other.clone(),
        }),
    }
}

/// Airflow: `ensure_leading_slash(prefix.rstrip("/"))` for a non-empty prefix.
fn airflow_prefix(raw: &str) -> String {
    let trimmed = raw.trim_end_matches('/');
    if trimmed.starts_with('/') {
        trimmed.to_string()
    } else {
        format!("/{trimmed}")
    }
}

/// Which of Airflow's AWS secrets backends the kwargs are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// `SystemsManagerParameterStoreBackend`: prefixes are SSM paths.
    #[default]
    ParameterStore,
    /// `SecretsManagerBackend`: prefixes are secret name prefixes, reached
    /// through SSM's `/aws/reference/secretsmanager/` pass-through.
    SecretsManager,
}

pub fn parse(json: &str) -> Result<AirflowSettings, KwargsError> {
    parse_for(json, Backend::ParameterStore)
}

/// The SSM path of a SecretsManagerBackend prefix (`airflow/connections`).
fn secrets_manager_prefix(raw: &str, key: &str) -> Result<String, KwargsError> {
    let trimmed = raw.trim_end_matches('/');
    if trimmed.starts_with('/') {
        return Err(KwargsError::UnreachableSecretPrefix {
            key: key.to_string(),
        });
    }
    Ok(if trimmed.is_empty() {
        names::SECRETS_MANAGER_REFERENCE.to_string()
    } else {
        format!("{}/{trimmed}", names::SECRETS_MANAGER_REFERENCE)
    })
}

pub fn parse_for(json: &str, backend: Backend) -> Result<AirflowSettings, KwargsError> {
    let value: Value = serde_json::from_str(json).map_err(KwargsError::NotJson)?;
    let Value::Object(kwargs) = value else {
        return Err(KwargsError::NotAnObject);
    };
    let mut settings = AirflowSettings::default();
    if backend == Backend::SecretsManager {
        match string_key(&kwargs, "sep")?.as_deref() {
            None | Some("/") => {}
            Some(other) => return Err(KwargsError::UnsupportedSep(other.to_string())),
        }
        if kwargs.get("full_url_mode") == Some(&Value::Bool(false)) {
            settings.notes.push(
                "full_url_mode is false: connection secrets hold SecretsManagerBackend's own field names (user, pass, ...); their files show them as stored, and NAME@conn/ knows only Airflow's names".to_string(),
            );
        }
    }
    for (folder, prefix_key, pattern_key, default) in FOLDERS {
        let prefix = match kwargs.get(prefix_key) {
            None if backend == Backend::SecretsManager => {
                secrets_manager_prefix(default.trim_start_matches('/'), prefix_key)?
            }
            None => default.to_string(),
            Some(Value::Null) => continue, // Airflow: lookups of this kind are disabled
            Some(Value::String(raw)) if backend == Backend::SecretsManager => {
                secrets_manager_prefix(raw, prefix_key)?
            }
            Some(Value::String(raw)) => airflow_prefix(raw),
            Some(other) => {
                return Err(KwargsError::NotAStringOrNull {
                    key: prefix_key.to_string(),
                    found: other.clone(),
                })
            }
        };
        let prefix = names::parse_prefix(&prefix).map_err(|cause| KwargsError::BadPrefix {
            key: prefix_key.to_string(),
            cause,
        })?;
        let pattern = string_key(&kwargs, pattern_key)?
            .map(|p| {
                Regex::new(&format!("(?i)^(?:{p})")).map_err(|cause| KwargsError::BadPattern {
                    key: pattern_key.to_string(),
                    cause,
                })
            })
            .transpose()?;
        settings.areas.push(Area {
            folder: folder.to_string(),
            prefix,
            pattern,
        });
    }
    settings.role_arn = string_key(&kwargs, "role_arn")?;
    settings.region = string_key(&kwargs, "region_name")?;
    settings.profile = string_key(&kwargs, "profile_name")?;
    settings.endpoint_url = string_key(&kwargs, "endpoint_url")?;
    let used: Vec<&str> = FOLDERS
        .iter()
        .flat_map(|(_, p, l, _)| [*p, *l])
        .chain(["role_arn", "region_name", "profile_name", "endpoint_url"])
        // The kwargs of ssmfs's own Airflow backend, which shares this JSON.
        .chain(["mountpoint", "fallback"])
        .chain(
            match backend {
                // Understood, and of no consequence for the files.
                Backend::SecretsManager => &[
                    "sep",
                    "full_url_mode",
                    "extra_conn_words",
                    "are_secret_values_urlencoded",
                ][..],
                Backend::ParameterStore => &[][..],
            }
            .iter()
            .copied(),
        )
        .collect();
    settings.ignored_keys = kwargs
        .keys()
        .filter(|k| !used.contains(&k.as_str()))
        .cloned()
        .collect();
    settings.ignored_keys.sort();
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_kwargs_as_is() {
        let s = parse(r#"{"connections_prefix": "airflow/connections", "variables_prefix": "airflow/variables", "role_arn": "arn:aws:iam::123456789012:role/airflow", "region_name": "eu-west-1"}"#).unwrap();
        let folders: Vec<(&str, &str)> = s
            .areas
            .iter()
            .map(|a| (a.folder.as_str(), a.prefix.as_str()))
            .collect();
        assert_eq!(
            folders,
            vec![
                ("variables", "/airflow/variables"),
                ("connections", "/airflow/connections"),
                ("config", "/airflow/config")
            ]
        );
        assert_eq!(
            s.role_arn.as_deref(),
            Some("arn:aws:iam::123456789012:role/airflow")
        );
        assert_eq!(s.region.as_deref(), Some("eu-west-1"));
        assert!(s.ignored_keys.is_empty());
    }

    #[test]
    fn nulls_slashes_patterns_and_unknown_keys() {
        let s = parse(r#"{"variables_prefix": "/team/vars/", "connections_prefix": null, "config_prefix": null,
                          "variables_lookup_pattern": "^(prod|shared)_", "use_ssl": true, "config_kwargs": {}, "mountpoint": "/mnt/airflow", "fallback": true}"#).unwrap();
        assert_eq!(s.areas.len(), 1);
        assert_eq!(s.areas[0].prefix, "/team/vars");
        assert!(s.areas[0].admits("PROD_db") && s.areas[0].admits("shared_x"));
        assert!(!s.areas[0].admits("dev_db") && !s.areas[0].admits("x_prod_db"));
        assert_eq!(
            s.ignored_keys,
            vec!["config_kwargs".to_string(), "use_ssl".to_string()]
        );
    }

    #[test]
    fn secrets_manager_kwargs_map_onto_ssms_reference_paths() {
        let s = parse_for(
            r#"{"connections_prefix": "airflow/connections/", "variables_prefix": "team/vars", "config_prefix": null, "sep": "/", "full_url_mode": false}"#,
            Backend::SecretsManager,
        )
        .unwrap();
        let prefixes: Vec<&str> = s.areas.iter().map(|a| a.prefix.as_str()).collect();
        assert_eq!(
            prefixes,
            [
                "/aws/reference/secretsmanager/team/vars",
                "/aws/reference/secretsmanager/airflow/connections"
            ]
        );
        assert!(s.ignored_keys.is_empty(), "{:?}", s.ignored_keys);
        assert_eq!(s.notes.len(), 1);
        let defaults = parse_for("{}", Backend::SecretsManager).unwrap();
        assert_eq!(
            defaults.areas[0].prefix,
            "/aws/reference/secretsmanager/airflow/variables"
        );
        let sep = parse_for(r#"{"sep": "_"}"#, Backend::SecretsManager).unwrap_err();
        assert!(sep.to_string().contains("sep"));
        let slash =
            parse_for(r#"{"variables_prefix": "/v"}"#, Backend::SecretsManager).unwrap_err();
        assert!(slash.to_string().contains("variables_prefix"));
    }

    #[test]
    fn defaults_when_empty() {
        let s = parse("{}").unwrap();
        assert_eq!(s.areas.len(), 3);
        assert!(s.areas.iter().all(|a| a.pattern.is_none()));
    }

    #[test]
    fn bad_input_is_explained() {
        assert!(parse("{not json").unwrap_err().to_string().contains("JSON"));
        assert!(parse("[]").unwrap_err().to_string().contains("object"));
        assert!(parse(r#"{"variables_lookup_pattern": "("}"#)
            .unwrap_err()
            .to_string()
            .contains("variables_lookup_pattern"));
        assert!(parse(r#"{"variables_prefix": 5}"#)
            .unwrap_err()
            .to_string()
            .contains("variables_prefix"));
        assert!(parse(r#"{"variables_prefix": "bad name!"}"#)
            .unwrap_err()
            .to_string()
            .contains("variables_prefix"));
    }
}
