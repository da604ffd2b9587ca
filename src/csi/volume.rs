//! What a NodePublishVolume asks for, checked before anything is mounted:
//! the target, the access mode, the pod and its identity, and the volume
//! attributes (under the admin's rules in `policy`), turned into the serving
//! daemon's options. Two requests
//! with the same identity and the same options get the same key: they share
//! one mount, one cache and one set of SSM calls.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::error::CsiError;
use super::policy::Policy;
use crate::csi::v1::volume_capability::{access_mode::Mode, AccessType};
use crate::csi::v1::NodePublishVolumeRequest;
use zeroize::Zeroizing;

/// The audience the driver asks kubelet for (`tokenRequests`): STS's.
pub const TOKEN_AUDIENCE: &str = "sts.amazonaws.com";
/// What kubelet adds to the attributes (`podInfoOnMount`, tokens, ephemeral).
const KUBELET_PREFIX: &str = "csi.storage.k8s.io/";

/// The attributes a volume may set, with the daemon flag each becomes.
pub const ATTRIBUTES: &[(&str, &str)] = &[
    ("path", ""),
    ("airflowKwargs", "--airflow-kwargs"),
    ("region", "--region"),
    ("failoverRegion", "--failover-region"),
    ("ttl", "--ttl"),
    ("negativeTtl", "--negative-ttl"),
    ("staleTtl", "--stale-ttl"),
    ("eventsTopic", "--events-topic"),
    ("maxTps", "--max-tps"),
    ("roleArn", "--role-arn"),
    ("useNodeIdentity", ""),
    ("usePodIdentity", ""),
    ("uid", "--uid"),
    ("gid", "--gid"),
    ("fileMode", "--file-mode"),
    ("dirMode", "--dir-mode"),
    ("class", ""),
];

/// Pairs where a volume's own choice drops the other one it inherited.
pub const EITHER_OR: [(&str, &str); 4] = [
    ("path", "airflowKwargs"),
    ("roleArn", "useNodeIdentity"),
    ("roleArn", "usePodIdentity"),
    ("usePodIdentity", "useNodeIdentity"),
];

/// The audience of the token EKS Pod Identity's agent takes.
pub const POD_IDENTITY_AUDIENCE: &str = "pods.eks.amazonaws.com";

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
    /// The pod's service account through EKS Pod Identity: the node's agent
    /// exchanges its token (audience `pods.eks.amazonaws.com`) for the
    /// credentials of the role associated with that service account.
    PodIdentity {
        namespace: String,
        service_account: String,
    },
    /// The node's own credentials (instance profile), allowed by the admin.
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

impl Publish {
    /// Checks the request under `policy`'s attribute rules (not its caps).
    pub fn parse(request: &NodePublishVolumeRequest, policy: &Policy) -> Result<Self, CsiError> {
        if request.volume_id.is_empty() {
            return Err(invalid("volume_id is missing"));
        }
        let target = super::policy::check_target(&request.target_path, &policy.pods_dir)?;
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
            // kubelet asks for an inline volume as SINGLE_NODE_WRITER whatever
            // the pod says, and passes the pod's readOnly as `readonly`: that
            // is the promise (the mount is read-only either way).
            _ if request.readonly => {}
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
        super::policy::check_pod_of_target(&target, &policy.pods_dir, &pod)?;
        policy.check_tenant_choices(&own, &pod)?;
        let options = policy.apply(own)?;
        if options.contains_key("path") == options.contains_key("airflowKwargs") {
            return Err(invalid(
                "set exactly one of the volume attributes path (an SSM path such as /airflow) and airflowKwargs (the JSON of AIRFLOW__SECRETS__BACKEND_KWARGS)",
            ));
        }
        let node_identity = flag(&options, "useNodeIdentity")?;
        let pod_identity = flag(&options, "usePodIdentity")?;
        let chosen = [options.contains_key("roleArn"), node_identity, pod_identity];
        if chosen.iter().filter(|c| **c).count() > 1 {
            return Err(invalid(
                "volume attributes roleArn, usePodIdentity and useNodeIdentity exclude each other: a volume uses one identity",
            ));
        }
        let needs_pod = || {
            if pod.service_account.is_empty() || pod.namespace.is_empty() {
                return Err(invalid(
                    "the pod's identity needs its namespace and service account: the CSIDriver object must set podInfoOnMount: true",
                ));
            }
            Ok(())
        };
        let (identity, token) = match (options.get("roleArn"), pod_identity, node_identity) {
            (Some(role_arn), _, _) => {
                needs_pod()?;
                let token = service_account_token(context, TOKEN_AUDIENCE, &pod)?;
                (
                    Identity::Pod {
                        namespace: pod.namespace.clone(),
                        service_account: pod.service_account.clone(),
                        role_arn: role_arn.clone(),
                    },
                    Some(token),
                )
            }
            (None, true, _) => {
                needs_pod()?;
                let token = service_account_token(context, POD_IDENTITY_AUDIENCE, &pod)?;
                (
                    Identity::PodIdentity {
                        namespace: pod.namespace.clone(),
                        service_account: pod.service_account.clone(),
                    },
                    Some(token),
                )
            }
            (None, false, true) => (Identity::Node, None),
            (None, false, false) => {
                return Err(invalid(
                    "the volume names no identity: set roleArn (the pod's IAM role, assumed with its service-account token) or usePodIdentity: \"true\" (EKS Pod Identity)",
                ))
            }
        };
        check_values(&options)?;
        let key = shared_key(&policy.key_salt, &identity, &options);
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
    let token_file = format!("/proc/self/fd/{}", crate::handoff::TOKEN_FD);
    match identity {
        Identity::Pod {
            namespace,
            service_account,
            ..
        } => {
            args.push(format!("--web-identity-token-file={token_file}"));
            args.push(format!(
                "--role-session-name={}",
                session_name(namespace, service_account)
            ));
        }
        Identity::PodIdentity { .. } => {
            args.push(format!("--pod-identity-token-file={token_file}"));
        }
        Identity::Node => {}
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

/// A `"true"`/`"false"` attribute (absent: false).
fn flag(options: &BTreeMap<String, String>, name: &str) -> Result<bool, CsiError> {
    match options.get(name).map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(invalid(format!(
            "volume attribute {name}: {other:?} is neither \"true\" nor \"false\""
        ))),
    }
}

/// The token kubelet issued for `audience`, whose subject must be the
/// pod's own service account.
fn service_account_token(
    context: &HashMap<String, String>,
    audience: &str,
    pod: &Pod,
) -> Result<Zeroizing<String>, CsiError> {
    let missing = || {
        invalid(format!(
            "no service-account token for audience {audience}: the CSIDriver object must list it in tokenRequests"
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
    let token = tokens[audience]["token"]
        .as_str()
        .filter(|token| !token.is_empty())
        .ok_or_else(missing)?;
    let expected = format!(
        "system:serviceaccount:{}:{}",
        pod.namespace, pod.service_account
    );
    match token_subject(token) {
        Some(subject) if subject == expected => Ok(Zeroizing::new(token.to_string())),
        _ => Err(CsiError::PermissionDenied(format!(
            "the service-account token for audience {audience} is not the pod's own: its subject is not {expected}"
        ))),
    }
}

/// The `sub` claim of a JWT, read without checking its signature (STS and
/// the Pod Identity agent check that): it only has to match the pod info.
fn token_subject(token: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims["sub"].as_str().map(str::to_string)
}

/// An AWS region's name: `eu-west-1`, `us-gov-east-1`, `cn-north-1`.
fn is_region(name: &str) -> bool {
    static REGION: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r"^[a-z]{2}(-[a-z]+)+-[0-9]{1,2}$").expect("a valid pattern")
    });
    REGION.is_match(name)
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
            "airflowKwargs" => match serde_json::from_str::<serde_json::Value>(value) {
                Ok(kwargs) if kwargs.is_object() => kwargs["region_name"]
                    .as_str()
                    .filter(|region| !is_region(region))
                    .map(|_| "region_name is not an AWS region name (such as eu-west-1)".into()),
                _ => Some("not a JSON object (the kwargs of Airflow's backend)".into()),
            },
            "region" | "failoverRegion" if !is_region(value) => Some(format!(
                "{value:?} is not an AWS region name (such as eu-west-1)"
            )),
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
fn shared_key(salt: &[u8], identity: &Identity, options: &BTreeMap<String, String>) -> String {
    // JSON: no two identities or option sets spell the same text.
    let text = serde_json::json!({"identity": identity.to_json(), "options": options}).to_string();
    // The whole HMAC under the node's secret: neither searchable for a
    // collision with another tenant's mount (which is also compared before
    // a bind) nor computable from what a tenant knows.
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(salt).expect("any key length");
    mac.update(text.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

impl Identity {
    pub fn describe(&self) -> String {
        match self {
            Identity::Pod {
                namespace,
                service_account,
                role_arn,
            } => format!("{namespace}/{service_account} as {role_arn}"),
            Identity::PodIdentity {
                namespace,
                service_account,
            } => format!("{namespace}/{service_account} through EKS Pod Identity"),
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
            Identity::PodIdentity {
                namespace,
                service_account,
            } => {
                serde_json::json!({"namespace": namespace, "serviceAccount": service_account, "podIdentity": true})
            }
            Identity::Node => serde_json::json!("node"),
        }
    }

    pub fn from_json(value: &serde_json::Value) -> Option<Self> {
        if value == "node" {
            return Some(Identity::Node);
        }
        if value["podIdentity"] == true {
            return Some(Identity::PodIdentity {
                namespace: value["namespace"].as_str()?.to_string(),
                service_account: value["serviceAccount"].as_str()?.to_string(),
            });
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
    fn a_failover_region_becomes_the_daemons_flag_and_is_checked() {
        let options = map(&[("path", "/a"), ("failoverRegion", "us-west-2")]);
        check_values(&options).unwrap();
        let args = daemon_args(&Identity::Node, &options, Path::new("/mnt"));
        assert!(args.contains(&"--failover-region=us-west-2".to_string()));
        let typo = map(&[("path", "/a"), ("failoverRegion", "us-west")]);
        let error = check_values(&typo).unwrap_err().to_string();
        assert!(error.contains("failoverRegion"), "{error}");
        let itself = map(&[
            ("path", "/a"),
            ("region", "us-west-2"),
            ("failoverRegion", "us-west-2"),
        ]);
        let error = check_values(&itself).unwrap_err().to_string();
        assert!(error.contains("is the primary region"), "{error}");
    }
}
