//! The tenant policy of the CSI plugin, as pure functions: whether a
//! publish may go on, and with what.
//!
//! Model: on a shared cluster every volume attribute and every field of a
//! NodePublishVolume is a tenant's input. [`admit`] takes the request, the
//! cluster admin's [`Policy`] (built complete in one place, `csi::run_plugin`)
//! and a snapshot of what the node holds ([`Counts`]), and answers either a
//! [`Decision`] (the checked request, and whether a mount is shared, free to
//! create, or needs idle mounts evicted first) or a refusal naming the rule.
//! Nothing here touches the system, so every rule is tested without root.
//!
//! The rules, in the order they are checked:
//! - the target lies below kubelet's pods directory, with no trailing `/`,
//!   and in the directory of the pod the request names (`pod.uid`);
//! - a class that grants the node's credentials fixes every attribute but
//!   the ones it lists in `openAttributes` (deny by default); other classes
//!   fix what they set; the node's credentials go only to such classes or to
//!   namespaces the admin lists;
//! - the caps: mounts per namespace, tuning variants of one source per
//!   namespace, and mounts per node with a fair share (see [`room`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::time::Instant;

use super::error::CsiError;
use super::volume::{Identity, Pod, Publish, ATTRIBUTES, EITHER_OR};
use crate::csi::v1::NodePublishVolumeRequest;

/// The class key that lists what its volumes may set themselves.
pub const OPEN_ATTRIBUTES: &str = "openAttributes";

/// Attributes that only tune a mount (how fresh, how fast, whose files):
/// mounts differing only in these read the same parameters with the same
/// identity, so they count as variants of one source (`Caps::variants`).
pub const TUNING: [&str; 8] = [
    "ttl",
    "negativeTtl",
    "staleTtl",
    "maxTps",
    "uid",
    "gid",
    "fileMode",
    "dirMode",
];

/// What a class that grants the node's credentials may never open: the
/// identity and what it reads are the whole of what the admin granted.
const NEVER_OPEN: [&str; 5] = [
    "path",
    "airflowKwargs",
    "roleArn",
    "useNodeIdentity",
    "usePodIdentity",
];

/// Keys of Airflow's backend kwargs that decide whose credentials the
/// daemon's calls carry or where they go: a tenant's volume may not set
/// them (they would send the node's signed calls anywhere, or pick a
/// profile of the node's); only the cluster admin's classes and defaults may.
const ADMIN_ONLY_KWARGS: [&str; 3] = ["role_arn", "profile_name", "endpoint_url"];

/// A named set of attributes the admin offers (`classes.json`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Class {
    pub attributes: BTreeMap<String, String>,
    /// What a volume of the class may set itself; `None`: whatever the
    /// class does not set (allowed only where the class grants nothing a
    /// tenant could not have on its own).
    pub open: Option<BTreeSet<String>>,
}

impl Class {
    /// Whether the class hands out the node's credentials.
    pub fn grants_node_identity(&self) -> bool {
        self.attributes.get("useNodeIdentity").map(String::as_str) == Some("true")
    }

    /// The attributes a volume of this class may set itself, if listed.
    fn open_attributes(&self) -> Option<BTreeSet<String>> {
        match &self.open {
            Some(open) => Some(open.clone()),
            // Deny by default: an attribute added later stays closed.
            None if self.grants_node_identity() => Some(BTreeSet::new()),
            None => None,
        }
    }
}

/// The node's caps on shared mounts (each one a serving daemon).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// `--max-mounts-per-namespace`.
    pub per_namespace: usize,
    /// `--max-mounts`: the node's total, shared fairly when it is reached.
    pub node: usize,
    /// `--max-variants-per-source`: mounts of one namespace that differ only
    /// in tuning attributes (`TUNING`).
    pub variants: usize,
}

impl Default for Caps {
    fn default() -> Self {
        Caps {
            per_namespace: 8,
            node: 64,
            variants: 2,
        }
    }
}

/// The cluster admin's whole policy for volumes.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Target paths must lie below this directory (kubelet's pods).
    pub pods_dir: PathBuf,
    /// `defaults.json`: what any volume leaves out.
    pub defaults: BTreeMap<String, String>,
    /// `classes.json`: named sets a volume picks with `class`.
    pub classes: BTreeMap<String, Class>,
    /// `--node-identity-namespaces`: who may ask for the node's credentials.
    pub node_identity_namespaces: BTreeSet<String>,
    /// The node's secret for shared-mount keys (`--state-dir`'s `key.salt`):
    /// a key computed without it cannot be searched for offline.
    pub key_salt: Vec<u8>,
    pub caps: Caps,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            pods_dir: PathBuf::from("/var/lib/kubelet/pods"),
            defaults: BTreeMap::new(),
            classes: BTreeMap::new(),
            node_identity_namespaces: BTreeSet::new(),
            key_salt: Vec::new(),
            caps: Caps::default(),
        }
    }
}

fn invalid(message: impl Into<String>) -> CsiError {
    CsiError::invalid(message)
}

/// Reads `dir/defaults.json` and `dir/classes.json` (either may be missing),
/// refusing unknown attribute names: `(defaults, classes)`.
#[allow(clippy::type_complexity)]
pub fn load_attributes(
    dir: &Path,
) -> Result<(BTreeMap<String, String>, BTreeMap<String, Class>), String> {
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
            check_names(what, map.keys().filter(|k| *k != OPEN_ATTRIBUTES))?;
            Ok(map)
        };
    let defaults = match read("defaults.json")? {
        Some(value) => strings("defaults.json", value)?,
        None => BTreeMap::new(),
    };
    if defaults.contains_key(OPEN_ATTRIBUTES) {
        return Err(format!(
            "defaults.json: {OPEN_ATTRIBUTES} belongs in a class (it lists what that class's volumes may set)"
        ));
    }
    if defaults.contains_key("useNodeIdentity") {
        return Err("defaults.json: useNodeIdentity would give every volume the node's credentials and let it pick what to read with them; set it in a class (whose attributes volumes cannot change)".into());
    }
    let mut classes = BTreeMap::new();
    if let Some(value) = read("classes.json")? {
        let all: BTreeMap<String, serde_json::Value> = serde_json::from_value(value)
            .map_err(|_| "classes.json: expected an object of classes".to_string())?;
        for (name, raw) in all {
            let what = format!("classes.json, class {name}");
            let mut attributes = strings(&what, raw)?;
            let open = match attributes.remove(OPEN_ATTRIBUTES) {
                Some(list) => {
                    let open: BTreeSet<String> = list
                        .split(',')
                        .map(str::trim)
                        .filter(|n| !n.is_empty())
                        .map(str::to_string)
                        .collect();
                    check_names(&format!("{what}, {OPEN_ATTRIBUTES}"), open.iter())?;
                    Some(open)
                }
                None => None,
            };
            let class = Class { attributes, open };
            if class.grants_node_identity() {
                // The node's credentials read what the admin chose, never
                // what a volume of the class would pick.
                if !class.attributes.contains_key("path")
                    && !class.attributes.contains_key("airflowKwargs")
                {
                    return Err(format!(
                        "{what}: useNodeIdentity needs path or airflowKwargs in the same class, so that its volumes read what the class says"
                    ));
                }
                if let Some(bad) = class
                    .open
                    .iter()
                    .flatten()
                    .find(|n| NEVER_OPEN.contains(&n.as_str()))
                {
                    return Err(format!(
                        "{what}: {OPEN_ATTRIBUTES} may not open {bad} in a class that grants the node's credentials (they would read what the volume picks)"
                    ));
                }
            }
            classes.insert(name, class);
        }
    }
    Ok((defaults, classes))
}

fn check_names<'a>(what: &str, mut names: impl Iterator<Item = &'a String>) -> Result<(), String> {
    match names.find(|k| *k == "class" || !ATTRIBUTES.iter().any(|(n, _)| n == k)) {
        Some(bad) => Err(format!(
            "{what}: {bad:?} is not a volume attribute a default may set"
        )),
        None => Ok(()),
    }
}

impl Policy {
    /// The volume's own attributes over its class's over the defaults.
    pub fn apply(
        &self,
        own: BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, CsiError> {
        let class = match own.get("class") {
            Some(name) => Some((
                name,
                self.classes.get(name).ok_or_else(|| {
                    let known: Vec<&str> = self.classes.keys().map(String::as_str).collect();
                    invalid(format!(
                        "volume attribute class: no class {name:?} on this node (known: {})",
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ))
                })?,
            )),
            None => None,
        };
        if let Some((name, class)) = class {
            let own_keys = || own.keys().filter(|key| *key != "class");
            match class.open_attributes() {
                Some(open) => {
                    if let Some(closed) = own_keys().find(|key| !open.contains(*key)) {
                        let listed: Vec<&str> = open.iter().map(String::as_str).collect();
                        return Err(CsiError::PermissionDenied(format!(
                            "volume attribute {closed}: fixed by class {name:?}, which lets its volumes set only what its {OPEN_ATTRIBUTES} lists ({})",
                            if listed.is_empty() { "nothing".to_string() } else { listed.join(", ") }
                        )));
                    }
                }
                None => {
                    // Fixed: the volume may set neither what the class sets
                    // nor the other half of a pair it sets (which would drop
                    // the class's).
                    let sets = |key: &str| class.attributes.contains_key(key);
                    let fixed = own_keys().find(|key| {
                        sets(key)
                            || EITHER_OR.iter().any(|(one, other)| {
                                (key.as_str() == *one && sets(other))
                                    || (key.as_str() == *other && sets(one))
                            })
                    });
                    if let Some(fixed) = fixed {
                        return Err(invalid(format!(
                            "volume attribute {fixed}: class {name:?} sets it (or what it would replace), and a class's attributes are fixed by the cluster admin"
                        )));
                    }
                }
            }
        }
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
        let mut merged = self.defaults.clone();
        if let Some((_, class)) = class {
            overlay(&mut merged, &class.attributes);
        }
        overlay(&mut merged, &own);
        merged.remove("class");
        Ok(merged)
    }

    /// What a tenant's own attributes may not choose: the node's credentials
    /// (unless the admin allows its namespace), or, inside airflowKwargs,
    /// whose credentials the calls carry and where they go.
    pub fn check_tenant_choices(
        &self,
        own: &BTreeMap<String, String>,
        pod: &Pod,
    ) -> Result<(), CsiError> {
        if own.get("useNodeIdentity").map(String::as_str) == Some("true")
            && (pod.namespace.is_empty() || !self.node_identity_namespaces.contains(&pod.namespace))
        {
            return Err(CsiError::PermissionDenied(format!(
                "volume attribute useNodeIdentity: the node's credentials are not allowed for namespace {:?} (the cluster admin allows them per namespace with --node-identity-namespaces, or in a volume class)",
                pod.namespace
            )));
        }
        if let Some(kwargs) = own.get("airflowKwargs") {
            let parsed: serde_json::Value = serde_json::from_str(kwargs).unwrap_or_default();
            if let Some(key) = ADMIN_ONLY_KWARGS
                .iter()
                .find(|key| parsed.get(**key).is_some_and(|v| !v.is_null()))
            {
                return Err(CsiError::PermissionDenied(format!(
                    "volume attribute airflowKwargs: {key} decides whose credentials or which endpoint the daemon uses; only the cluster admin sets it (in a volume class)"
                )));
            }
        }
        Ok(())
    }
}

/// Checks a target path as text: absolute, below `pods_dir`, no `.` or `..`
/// and no trailing `/` (which would make the last component's symlink be
/// followed). Used by unpublish as by publish.
pub fn check_target(target: &str, pods_dir: &Path) -> Result<PathBuf, CsiError> {
    if target.is_empty() {
        return Err(invalid("target_path is missing"));
    }
    if target.len() > 1 && target.ends_with('/') {
        return Err(invalid(format!(
            "target_path {target} ends with /: kubelet never sends one, and it would follow a symlink in its last component"
        )));
    }
    let path = PathBuf::from(target);
    let inside = path.is_absolute()
        && !path
            .components()
            .any(|part| matches!(part, Component::ParentDir | Component::CurDir))
        && path.starts_with(pods_dir)
        && path != pods_dir;
    if !inside {
        return Err(invalid(format!(
            "target_path {target} is outside the kubelet's pods directory {} (--pods-dir)",
            pods_dir.display()
        )));
    }
    Ok(path)
}

/// The pod directory a target lies in: kubelet's `PODS/<pod UID>/volumes/...`.
pub fn target_pod_uid<'a>(target: &'a Path, pods_dir: &Path) -> Option<&'a str> {
    target
        .strip_prefix(pods_dir)
        .ok()?
        .components()
        .next()
        .and_then(|part| part.as_os_str().to_str())
}

/// A target must be in the directory of the pod the request names: kubelet
/// makes `PODS/<pod.uid>/volumes/...`. Without pod information (csi-sanity,
/// `podInfoOnMount` off) no pod is named, and no pod's identity is granted.
pub fn check_pod_of_target(target: &Path, pods_dir: &Path, pod: &Pod) -> Result<(), CsiError> {
    let named = !pod.uid.is_empty()
        || !pod.namespace.is_empty()
        || !pod.name.is_empty()
        || !pod.service_account.is_empty();
    if !named {
        return Ok(());
    }
    if pod.uid.is_empty() {
        return Err(invalid(
            "csi.storage.k8s.io/pod.uid is missing while other pod information is given: kubelet sends all of it (podInfoOnMount), never a part",
        ));
    }
    match target_pod_uid(target, pods_dir) {
        Some(uid) if uid == pod.uid => Ok(()),
        _ => Err(CsiError::PermissionDenied(format!(
            "target_path {} is not in the directory of pod {} (uid {}): kubelet publishes a pod's volume in its own directory",
            target.display(),
            pod,
            pod.uid
        ))),
    }
}

/// The same identity and what it reads, without the tuning: mounts of one
/// source differ only in how fresh, how fast and whose files.
pub fn source_of(identity: &Identity, options: &BTreeMap<String, String>) -> String {
    let reading: BTreeMap<&String, &String> = options
        .iter()
        .filter(|(name, _)| !TUNING.contains(&name.as_str()))
        .collect();
    serde_json::json!({"identity": identity.to_json(), "options": reading}).to_string()
}

/// The key is a digest: what it stands for is compared before another pod
/// is bound to a mount of that key.
pub fn check_same_mount(
    identity: &Identity,
    options: &BTreeMap<String, String>,
    publish: &Publish,
) -> Result<(), CsiError> {
    if *identity != publish.identity || *options != publish.options {
        return Err(CsiError::system(
            "comparing the shared mount's identity",
            std::io::Error::other("a mount of another identity or other attributes has this key"),
        ));
    }
    Ok(())
}

/// One shared mount the node holds, as the caps see it.
#[derive(Debug, Clone)]
pub struct Held {
    /// Its name on the node (its mount point's directory).
    pub name: String,
    /// The HMAC of its identity and options: a publish of the same shares it.
    pub key: String,
    pub namespace: String,
    pub identity: Identity,
    pub options: BTreeMap<String, String>,
    /// `Some` while no pod uses it (it lingers, and may be evicted).
    pub idle_since: Option<Instant>,
    /// It serves: a publish of its key shares it.
    pub live: bool,
}

impl Held {
    fn source(&self) -> String {
        source_of(&self.identity, &self.options)
    }
}

/// What the node holds when a publish asks: its shared mounts and, by
/// namespace, the mounts being created (they count from being allowed).
#[derive(Debug, Clone, Default)]
pub struct Counts {
    pub mounts: Vec<Held>,
    pub creating: BTreeMap<String, usize>,
}

/// Where a new publish's mount comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Room {
    /// A live mount of the same key: bind it.
    Shared,
    /// Within the caps: create it.
    Free,
    /// Within the caps once these idle mounts (by name) are removed (then
    /// ask again).
    Evict(Vec<String>),
}

/// A publish the policy lets go on.
pub struct Decision {
    pub publish: Publish,
    pub room: Room,
}

/// The whole tenant policy: the request checked and turned into a mount's
/// identity and options, and where its mount comes from under the caps.
pub fn admit(
    request: &NodePublishVolumeRequest,
    policy: &Policy,
    counts: &Counts,
) -> Result<Decision, CsiError> {
    let publish = Publish::parse(request, policy)?;
    let room = room_for(&publish, policy, counts)?;
    Ok(Decision { publish, room })
}

/// The caps' answer for a checked publish, after the identity comparison
/// with a live mount of the same key.
pub fn room_for(publish: &Publish, policy: &Policy, counts: &Counts) -> Result<Room, CsiError> {
    if let Some(held) = counts
        .mounts
        .iter()
        .find(|m| m.key == publish.key && m.live)
    {
        check_same_mount(&held.identity, &held.options, publish)?;
        return Ok(Room::Shared);
    }
    let others = Counts {
        mounts: counts
            .mounts
            .iter()
            .filter(|m| m.key != publish.key)
            .cloned()
            .collect(),
        creating: counts.creating.clone(),
    };
    room(
        &publish.pod.namespace,
        &source_of(&publish.identity, &publish.options),
        &others,
        &policy.caps,
    )
}

/// Whether `namespace` may create one more mount of `source`.
///
/// The rule, and why: each namespace may hold `caps.per_namespace` mounts,
/// and at most `caps.variants` of them may differ only in tuning, so TTL
/// variants cannot multiply a tenant's share. When the node holds
/// `caps.node`, its fair share is `caps.node / namespaces` (those holding
/// mounts, and the one asking): a namespace under its share may have the
/// idle mounts of namespaces over theirs evicted (the largest holder's
/// first, its longest idle first); a namespace at or over its share may
/// only evict its own. And while any namespace is over its share, a
/// namespace's first mount is never refused, even if nothing idle can go:
/// the node then holds more than `caps.node`, by at most one mount per
/// namespace, rather than lock a team out for another's variants.
pub fn room(namespace: &str, source: &str, counts: &Counts, caps: &Caps) -> Result<Room, CsiError> {
    let mut held: BTreeMap<&str, usize> = BTreeMap::new();
    for mount in &counts.mounts {
        *held.entry(mount.namespace.as_str()).or_default() += 1;
    }
    for (ns, creating) in &counts.creating {
        *held.entry(ns.as_str()).or_default() += creating;
    }
    let total: usize = held.values().sum();
    let mut evict: Vec<&Held> = Vec::new();
    // The idle mounts `pick` may choose, longest idle first.
    let idle = |accept: &dyn Fn(&Held) -> bool, evict: &[&Held]| -> Option<&Held> {
        counts
            .mounts
            .iter()
            .filter(|m| m.idle_since.is_some() && accept(m))
            .filter(|m| !evict.iter().any(|e| e.name == m.name))
            .min_by_key(|m| (m.idle_since, m.name.clone()))
    };
    let is_source = |m: &Held| m.namespace == namespace && m.source() == source;
    // Over a cap (it may have been lowered since), as many idle mounts go
    // as it takes, or none and the publish is refused.
    loop {
        let variants = counts
            .mounts
            .iter()
            .filter(|m| is_source(m) && !evict.iter().any(|e| e.name == m.name))
            .count();
        if variants < caps.variants {
            break;
        }
        match idle(&is_source, &evict) {
            Some(mount) => evict.push(mount),
            None => {
                return Err(CsiError::ResourceExhausted(format!(
                    "namespace {namespace:?} holds {variants} shared mounts that differ only in tuning attributes ({}), the most --max-variants-per-source allows ({}): use one of their settings",
                    TUNING.join(", "),
                    caps.variants
                )))
            }
        }
    }
    let own = held.get(namespace).copied().unwrap_or(0);
    loop {
        let own_after = own - evict.len();
        if own_after < caps.per_namespace {
            break;
        }
        match idle(&|m| m.namespace == namespace, &evict) {
            Some(mount) => evict.push(mount),
            None => {
                return Err(CsiError::ResourceExhausted(format!(
                    "namespace {namespace:?} holds {own_after} shared mounts on this node, the most --max-mounts-per-namespace allows ({}): volumes with the same identity and attributes share one",
                    caps.per_namespace
                )))
            }
        }
    }
    let mut total_after = total - evict.len();
    if total_after >= caps.node {
        let namespaces = held.len() + usize::from(!held.contains_key(namespace));
        let fair = (caps.node / namespaces).max(1);
        let mut held_after = held.clone();
        for mount in &evict {
            *held_after
                .get_mut(mount.namespace.as_str())
                .expect("counted") -= 1;
        }
        let own_after = held_after.get(namespace).copied().unwrap_or(0);
        let anyone_over = held_after.values().any(|count| *count > fair);
        while total_after >= caps.node {
            let next = if own_after < fair {
                // The largest holder over its share gives first.
                let largest = held_after
                    .iter()
                    .filter(|(ns, count)| **ns != namespace && **count > fair)
                    .filter(|(ns, _)| idle(&|m| m.namespace == **ns, &evict).is_some())
                    .max_by_key(|(ns, count)| (**count, std::cmp::Reverse(**ns)))
                    .map(|(ns, _)| ns.to_string());
                largest.and_then(|ns| idle(&|m| m.namespace == ns, &evict))
            } else {
                idle(&|m| m.namespace == namespace, &evict)
            };
            match next {
                Some(mount) => {
                    *held_after.get_mut(mount.namespace.as_str()).expect("counted") -= 1;
                    evict.push(mount);
                    total_after -= 1;
                }
                None if own_after == 0 && anyone_over => break,
                None => {
                    return Err(CsiError::ResourceExhausted(format!(
                        "this node holds {total_after} shared mounts, the most --max-mounts allows ({}), and namespace {namespace:?} holds {own_after}, its fair share ({fair}) or more, with none idle to give",
                        caps.node
                    )))
                }
            }
        }
    }
    Ok(if evict.is_empty() {
        Room::Free
    } else {
        Room::Evict(evict.into_iter().map(|m| m.name.clone()).collect())
    })
}

#[cfg(test)]
mod tests;
