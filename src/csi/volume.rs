//! What a NodePublishVolume asks for, checked before anything is mounted:
//! the target, the access mode, the pod and its identity, and the volume
//! attributes, turned into the serving daemon's command line. Two requests
//! with the same identity and the same options get the same key: they share
//! one mount, one cache and one set of SSM calls.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

use super::error::CsiError;
use bpfman_csi::v1::volume_capability::{access_mode::Mode, AccessType};
use bpfman_csi::v1::NodePublishVolumeRequest;
use sha2::Digest;
use zeroize::Zeroizing;

/// The audience the driver asks kubelet for (`tokenRequests`): STS's.
pub const TOKEN_AUDIENCE: &str = "sts.amazonaws.com";
/// What kubelet adds to the attributes (`podInfoOnMount`, tokens, ephemeral).
const KUBELET_PREFIX: &str = "csi.storage.k8s.io/";

/// The attributes a volume may set, with the daemon flag each becomes.
const ATTRIBUTES: &[(&str, &str)] = &[
    ("path", ""),
    ("airflowKwargs", "--airflow-kwargs"),
    ("region", "--region"),
    ("ttl", "--ttl"),
    ("negativeTtl", "--negative-ttl"),
    ("staleTtl", "--stale-ttl"),
    ("eventsTopic", "--events-topic"),
    ("maxTps", "--max-tps"),
    ("roleArn", "--role-arn"),
    ("useNodeIdentity", ""),
    ("uid", "--uid"),
    ("gid", "--gid"),
    ("fileMode", "--file-mode"),
    ("dirMode", "--dir-mode"),
    ("class", ""),
];

/// Pairs where a volume's own choice drops the other one it inherited.
const EITHER_OR: [(&str, &str); 2] = [("path", "airflowKwargs"), ("roleArn", "useNodeIdentity")];

/// Attributes the node gives volumes that do not set them
/// (`--attributes-dir`): `defaults.json` for all, `classes.json` for those
/// naming a `class`. The volume's own win over its class, the class over
/// the defaults.
#[derive(Debug, Default, Clone)]
pub struct AttributeDefaults {
    pub base: BTreeMap<String, String>,
    pub classes: BTreeMap<String, BTreeMap<String, String>>,
}

impl AttributeDefaults {
    /// Reads `dir/defaults.json` and `dir/classes.json` (either may be
    /// missing), refusing unknown attribute names.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let read = |name: &str| -> Result<Option<serde_json::Value>, String> {
            let path = dir.join(name);
            match std::fs::read(&path) {
                Ok(bytes) => serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| format!("{}: {e}", path.display())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(format!("{}: {e}", path.display())),
            }
        };
        let strings =
            |what: &str, value: serde_json::Value| -> Result<BTreeMap<String, String>, String> {
                let map: BTreeMap<String, String> = serde_json::from_value(value)
                    .map_err(|_| format!("{what}: expected an object of strings"))?;
                if let Some(bad) = map
                    .keys()
                    .find(|k| *k == "class" || !ATTRIBUTES.iter().any(|(n, _)| n == k))
                {
                    return Err(format!(
                        "{what}: {bad:?} is not a volume attribute a default may set"
                    ));
                }
                Ok(map)
            };
        let base = match read("defaults.json")? {
            Some(value) => strings("defaults.json", value)?,
            None => BTreeMap::new(),
        };
        let mut classes = BTreeMap::new();
        if let Some(value) = read("classes.json")? {
            let all: BTreeMap<String, serde_json::Value> = serde_json::from_value(value)
                .map_err(|_| "classes.json: expected an object of classes".to_string())?;
            for (name, class) in all {
                classes.insert(
                    name.clone(),
                    strings(&format!("classes.json, class {name}"), class)?,
                );
            }
        }
        Ok(AttributeDefaults { base, classes })
    }

    /// The volume's attributes over its class's over the defaults.
    fn apply(&self, own: BTreeMap<String, String>) -> Result<BTreeMap<String, String>, CsiError> {
        let class = match own.get("class") {
            Some(name) => Some(self.classes.get(name).ok_or_else(|| {
                let known: Vec<&str> = self.classes.keys().map(String::as_str).collect();
                invalid(format!(
                    "volume attribute class: no class {name:?} on this node (known: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ))
            })?),
            None => None,
        };
        // Each layer's choice of one of a pair drops the other from below.
        let overlay = |merged: &mut BTreeMap<String, String>, layer: &BTreeMap<String, String>| {
            for (one, other) in EITHER_OR {
                if layer.contains_key(one) {
                    merged.remove(other);
                }
                if layer.contains_key(other) {
                    merged.remove(one);
                }
            }
            merged.extend(layer.iter().map(|(k, v)| (k.clone(), v.clone())));
        };
        let mut merged = self.base.clone();
        if let Some(class) = class {
            overlay(&mut merged, class);
        }
        overlay(&mut merged, &own);
        merged.remove("class");
        Ok(merged)
    }
}

/// Files and directories belong to root's group with group read: the
/// official Airflow image runs as uid 50000 in group 0.
const DEFAULT_UID: &str = "0";
const DEFAULT_GID: &str = "0";
const DEFAULT_FILE_MODE: &str = "0440";
const DEFAULT_DIR_MODE: &str = "0550";

/// The pod a volume is published for (from `podInfoOnMount`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
}

impl std::fmt::Display for Pod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.name.is_empty() {
            return f.write_str("(pod not named: podInfoOnMount is off)");
        }
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Whose AWS credentials a shared mount uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// The pod's service account, through its role (IRSA).
    Pod {
        namespace: String,
        service_account: String,
        role_arn: String,
    },
    /// The node's own credentials (instance profile), asked for explicitly.
    Node,
}

/// A publish request, checked.
pub struct Publish {
    pub volume_id: String,
    pub target: PathBuf,
    pub pod: Pod,
    pub identity: Identity,
    /// The shared mount's name: the same identity and options, the same key.
    pub key: String,
    /// The volume attributes that shape the mount (kubelet's removed).
    pub options: BTreeMap<String, String>,
    /// The service-account token for STS; never logged, never on disk.
    pub token: Option<Zeroizing<String>>,
}

fn invalid(message: impl Into<String>) -> CsiError {
    CsiError::invalid(message)
}

/// Whether `target` lies inside `pods_dir` (lexically: no `..`, absolute).
fn inside(target: &Path, pods_dir: &Path) -> bool {
    target.is_absolute()
        && !target
            .components()
            .any(|part| matches!(part, Component::ParentDir | Component::CurDir))
        && target.starts_with(pods_dir)
        && target != pods_dir
}

impl Publish {
    pub fn parse(
        request: &NodePublishVolumeRequest,
        pods_dir: &Path,
        defaults: &AttributeDefaults,
    ) -> Result<Self, CsiError> {
        if request.volume_id.is_empty() {
            return Err(invalid("volume_id is missing"));
        }
        if request.target_path.is_empty() {
            return Err(invalid("target_path is missing"));
        }
        let target = PathBuf::from(&request.target_path);
        if !inside(&target, pods_dir) {
            return Err(invalid(format!(
                "target_path {} is outside the kubelet's pods directory {} (--pods-dir)",
                target.display(),
                pods_dir.display()
            )));
        }
        let capability = request
            .volume_capability
            .as_ref()
            .ok_or_else(|| invalid("volume_capability is missing"))?;
        match &capability.access_type {
            Some(AccessType::Mount(_)) => {}
            Some(AccessType::Block(_)) => return Err(invalid(
                "block access is not supported: ssmfs volumes are filesystems (access type mount)",
            )),
            None => return Err(invalid("volume_capability has no access type (mount)")),
        }
        let mode = capability
            .access_mode
            .as_ref()
            .map(|mode| mode.mode)
            .and_then(|mode| Mode::try_from(mode).ok())
            .unwrap_or(Mode::Unknown);
        match mode {
            Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly => {}
            Mode::Unknown => return Err(invalid("volume_capability has no access mode")),
            writable => {
                return Err(invalid(format!(
                    "access mode {} would let pods write; ssmfs volumes are read-only: set readOnly: true on the volume",
                    writable.as_str_name()
                )))
            }
        }
        let context = &request.volume_context;
        let unknown: Vec<&str> = context
            .keys()
            .map(String::as_str)
            .filter(|key| {
                !key.starts_with(KUBELET_PREFIX) && !ATTRIBUTES.iter().any(|(name, _)| name == key)
            })
            .collect();
        if !unknown.is_empty() {
            let mut unknown = unknown;
            unknown.sort_unstable();
            let known: Vec<&str> = ATTRIBUTES.iter().map(|(name, _)| *name).collect();
            return Err(invalid(format!(
                "unknown volume attributes: {} (known: {})",
                unknown.join(", "),
                known.join(", ")
            )));
        }
        let get = |key: &str| context.get(&format!("{KUBELET_PREFIX}{key}")).cloned();
        let pod = Pod {
            namespace: get("pod.namespace").unwrap_or_default(),
            name: get("pod.name").unwrap_or_default(),
            uid: get("pod.uid").unwrap_or_default(),
            service_account: get("serviceAccount.name").unwrap_or_default(),
        };
        let own: BTreeMap<String, String> = context
            .iter()
            .filter(|(key, _)| !key.starts_with(KUBELET_PREFIX))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        let options = defaults.apply(own)?;
        if options.contains_key("path") == options.contains_key("airflowKwargs") {
            return Err(invalid(
                "set exactly one of the volume attributes path (an SSM path such as /airflow) and airflowKwargs (the JSON of AIRFLOW__SECRETS__BACKEND_KWARGS)",
            ));
        }
        let node_identity = match options.get("useNodeIdentity").map(String::as_str) {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                return Err(invalid(format!(
                    "volume attribute useNodeIdentity: {other:?} is neither \"true\" nor \"false\""
                )))
            }
        };
        let (identity, token) = match (options.get("roleArn"), node_identity) {
            (Some(_), true) => {
                return Err(invalid(
                    "volume attributes roleArn and useNodeIdentity exclude each other: a volume uses its pod's role or the node's credentials",
                ))
            }
            (None, false) => {
                return Err(invalid(
                    "the volume names no identity: set roleArn (the pod's IAM role, assumed with its service-account token) or useNodeIdentity: \"true\" (the node's credentials)",
                ))
            }
            (None, true) => (Identity::Node, None),
            (Some(role_arn), false) => {
                if pod.service_account.is_empty() || pod.namespace.is_empty() {
                    return Err(invalid(
                        "roleArn needs the pod's namespace and service account: the CSIDriver object must set podInfoOnMount: true",
                    ));
                }
                let token = service_account_token(context)?;
                (
                    Identity::Pod {
                        namespace: pod.namespace.clone(),
                        service_account: pod.service_account.clone(),
                        role_arn: role_arn.clone(),
                    },
                    Some(token),
                )
            }
        };
        check_values(&options)?;
        let key = shared_key(&identity, &options);
        Ok(Publish {
            volume_id: request.volume_id.clone(),
            target,
            pod,
            identity,
            key,
            options,
            token,
        })
    }

    /// The serving daemon's options and positional arguments (the mount
    /// point last), as `ssmfs` itself would be called.
    pub fn daemon_args(&self, mountpoint: &Path) -> Vec<String> {
        daemon_args(&self.identity, &self.options, mountpoint)
    }
}

/// The daemon's command line for a shared mount: what a restarted plugin
/// rebuilds from the state directory, without the pod's token.
pub fn daemon_args(
    identity: &Identity,
    options: &BTreeMap<String, String>,
    mountpoint: &Path,
) -> Vec<String> {
    let mut args = vec!["--allow-other".to_string()];
    let defaults = [
        ("uid", DEFAULT_UID),
        ("gid", DEFAULT_GID),
        ("fileMode", DEFAULT_FILE_MODE),
        ("dirMode", DEFAULT_DIR_MODE),
    ];
    for (name, flag) in ATTRIBUTES {
        let value = options
            .get(*name)
            .map(String::as_str)
            .or_else(|| defaults.iter().find(|(d, _)| d == name).map(|(_, v)| *v));
        if let (Some(value), false) = (value, flag.is_empty()) {
            args.push(format!("{flag}={value}"));
        }
    }
    if let Identity::Pod {
        namespace,
        service_account,
        ..
    } = identity
    {
        args.push(format!(
            "--web-identity-token-file=/proc/self/fd/{}",
            crate::handoff::TOKEN_FD
        ));
        args.push(format!(
            "--role-session-name={}",
            session_name(namespace, service_account)
        ));
    }
    if let Some(path) = options.get("path") {
        args.push(path.clone());
    }
    args.push(mountpoint.display().to_string());
    args
}

/// STS allows `[\w+=,.@-]{2,64}`: CloudTrail then names the pod's account.
fn session_name(namespace: &str, service_account: &str) -> String {
    let raw = format!("ssmfs-{namespace}-{service_account}");
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "+=,.@-_".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect()
}

fn service_account_token(context: &HashMap<String, String>) -> Result<Zeroizing<String>, CsiError> {
    let missing = || {
        invalid(format!(
            "no service-account token for audience {TOKEN_AUDIENCE}: the CSIDriver object must list it in tokenRequests (roleArn assumes the role with it)"
        ))
    };
    let raw = context
        .get(&format!("{KUBELET_PREFIX}serviceAccount.tokens"))
        .ok_or_else(missing)?;
    // The parse error would quote the text: the tokens are not repeated.
    let tokens: serde_json::Value = serde_json::from_str(raw).map_err(|_| {
        invalid(format!(
            "{KUBELET_PREFIX}serviceAccount.tokens is not the JSON object kubelet sends"
        ))
    })?;
    let token = tokens[TOKEN_AUDIENCE]["token"]
        .as_str()
        .filter(|token| !token.is_empty())
        .ok_or_else(missing)?;
    Ok(Zeroizing::new(token.to_string()))
}

/// Each attribute's value, checked as the daemon's own flag would be, so a
/// bad one is refused before anything is mounted, naming the attribute.
fn check_values(options: &BTreeMap<String, String>) -> Result<(), CsiError> {
    use crate::config::{parse_duration, parse_mode};
    for (name, value) in options {
        let problem = match name.as_str() {
            "path" if !value.starts_with('/') => {
                Some("an SSM path starts with / (such as /airflow)".to_string())
            }
            "ttl" | "negativeTtl" | "staleTtl" => {
                parse_duration(value).err().map(|e| e.to_string())
            }
            "fileMode" | "dirMode" => parse_mode(value).err().map(|e| e.to_string()),
            "uid" | "gid" => value
                .parse::<u32>()
                .err()
                .map(|_| "not a number".to_string()),
            "maxTps" => value
                .parse::<f64>()
                .ok()
                .filter(|tps| *tps > 0.0)
                .is_none()
                .then(|| "not a positive number".to_string()),
            "airflowKwargs" => serde_json::from_str::<serde_json::Value>(value)
                .ok()
                .filter(serde_json::Value::is_object)
                .is_none()
                .then(|| "not a JSON object (the kwargs of Airflow's backend)".to_string()),
            "roleArn" if !value.starts_with("arn:") => {
                Some("an IAM role ARN starts with arn: (arn:aws:iam::ACCOUNT:role/NAME)".into())
            }
            "eventsTopic" if !value.starts_with("arn:") => {
                Some("an SNS topic ARN starts with arn:".into())
            }
            _ => None,
        };
        if let Some(problem) = problem {
            return Err(invalid(format!("volume attribute {name}: {problem}")));
        }
    }
    // The whole command line, as the daemon will parse it.
    let mut args = vec!["ssmfs".to_string()];
    args.extend(daemon_args(&Identity::Node, options, Path::new("/mnt")));
    crate::cli::CliArgs::parse_with_mount_options(args.into_iter().map(Into::into).collect())
        .and_then(crate::cli::CliArgs::into_settings)
        .map_err(|error| invalid(format!("volume attributes: {error}")))?;
    Ok(())
}

/// The same identity and options, the same key (a hash: the state
/// directory names mounts by it, and it must not spell out role names).
fn shared_key(identity: &Identity, options: &BTreeMap<String, String>) -> String {
    let mut text = match identity {
        Identity::Pod {
            namespace,
            service_account,
            role_arn,
        } => format!("pod\n{namespace}\n{service_account}\n{role_arn}\n"),
        Identity::Node => "node\n".to_string(),
    };
    for (name, value) in options {
        text.push_str(&format!("{name}={value}\n"));
    }
    let digest = sha2::Sha256::digest(text.as_bytes());
    hex::encode(&digest[..8])
}

impl Identity {
    pub fn describe(&self) -> String {
        match self {
            Identity::Pod {
                namespace,
                service_account,
                role_arn,
            } => format!("{namespace}/{service_account} as {role_arn}"),
            Identity::Node => "the node's credentials".into(),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Identity::Pod {
                namespace,
                service_account,
                role_arn,
            } => {
                serde_json::json!({"namespace": namespace, "serviceAccount": service_account, "roleArn": role_arn})
            }
            Identity::Node => serde_json::json!("node"),
        }
    }

    pub fn from_json(value: &serde_json::Value) -> Option<Self> {
        if value == "node" {
            return Some(Identity::Node);
        }
        Some(Identity::Pod {
            namespace: value["namespace"].as_str()?.to_string(),
            service_account: value["serviceAccount"].as_str()?.to_string(),
            role_arn: value["roleArn"].as_str()?.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_volume_wins_over_its_class_and_the_class_over_the_defaults() {
        let defaults = AttributeDefaults {
            base: map(&[("region", "eu-west-1"), ("ttl", "5m"), ("path", "/shared")]),
            classes: [(
                "airflow".to_string(),
                map(&[("airflowKwargs", "{}"), ("ttl", "1m"), ("uid", "50000")]),
            )]
            .into_iter()
            .collect(),
        };
        let merged = defaults
            .apply(map(&[("class", "airflow"), ("uid", "1000")]))
            .unwrap();
        assert_eq!(
            merged,
            map(&[
                ("region", "eu-west-1"),
                ("ttl", "1m"),
                ("airflowKwargs", "{}"),
                ("uid", "1000")
            ]),
            "the class's airflowKwargs drops the defaults' path only when the volume chose neither"
        );
        let own_path = defaults
            .apply(map(&[("class", "airflow"), ("path", "/mine")]))
            .unwrap();
        assert_eq!(own_path.get("path").map(String::as_str), Some("/mine"));
        assert!(
            !own_path.contains_key("airflowKwargs"),
            "the volume's own path drops the inherited kwargs"
        );
        let unknown = defaults.apply(map(&[("class", "nope")])).unwrap_err();
        assert!(unknown.to_string().contains("airflow"), "{unknown}");
    }

    #[test]
    fn defaults_files_name_only_volume_attributes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("defaults.json"),
            r#"{"region": "us-east-1"}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("classes.json"), r#"{"a": {"ttl": "1m"}}"#).unwrap();
        let loaded = AttributeDefaults::load(dir.path()).unwrap();
        assert_eq!(loaded.classes["a"]["ttl"], "1m");
        std::fs::write(
            dir.path().join("classes.json"),
            r#"{"a": {"colour": "blue"}}"#,
        )
        .unwrap();
        let error = AttributeDefaults::load(dir.path()).unwrap_err();
        assert!(error.contains("colour"), "{error}");
        assert!(AttributeDefaults::load(Path::new("/nonexistent"))
            .unwrap()
            .base
            .is_empty());
    }
}
