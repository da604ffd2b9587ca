//! The node's shared mounts, under one lock: each mount by its name (its
//! mount point's directory, its id on the control socket and its record's
//! file name in the state directory), and the mounts being created, by
//! namespace, which the caps count from the moment they are allowed.
//!
//! A mount's key (the HMAC of its identity and options) is what a publish
//! looks for; its name is random, so mountinfo, which every local user
//! reads, never shows the key. Naming records and control ids by the name
//! is also what a release from before the random names reads: it derives a
//! mount point from the record's file name, so a rollback to it adopts the
//! mounts this release made (docs/KUBERNETES.md, "Which releases may be
//! mixed").

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

use super::super::policy;
use super::super::serve::ConnectionFds;
use super::super::volume::{Identity, Pod};
use crate::daemon;

pub(super) struct Attachment {
    pub(super) volume_id: String,
    pub(super) pod: Pod,
}

pub(super) struct SharedMount {
    /// The HMAC of its identity and options: a publish of the same shares it.
    pub(super) key: String,
    pub(super) mountpoint: PathBuf,
    /// The namespace it counts against (`--max-mounts-per-namespace`).
    pub(super) namespace: String,
    pub(super) identity: Identity,
    pub(super) options: BTreeMap<String, String>,
    /// The daemon's options, as every release reads them: its metrics
    /// socket is added when it is started (`start_args`), since a release
    /// from before the sockets takes `--metrics-addr` for an IP address.
    pub(super) args: Vec<String>,
    /// Where its daemon serves its metrics, for the plugin to gather: the
    /// run directory's `metrics/NAME.sock` (`Driver::metrics_socket`).
    pub(super) metrics_socket: PathBuf,
    /// The plugin's copies: the connection lives while either side holds them.
    pub(super) fds: Option<ConnectionFds>,
    pub(super) targets: BTreeMap<PathBuf, Attachment>,
    pub(super) idle_since: Option<Instant>,
    /// The link whose holder serves it.
    pub(super) served_by: Option<u64>,
    /// Asked to stop there so the current serving side takes it over.
    pub(super) moving: bool,
    /// Removed on purpose: the holder's end is expected.
    pub(super) removing: bool,
}

impl SharedMount {
    /// Lazily unmounts every pod's target and the shared mount itself.
    pub(super) fn detach(&self) {
        for target in self.targets.keys() {
            let _ = daemon::lazy_unmount(target);
        }
        let _ = daemon::lazy_unmount(&self.mountpoint);
    }

    /// What its serving side's holder starts the daemon with.
    pub(super) fn start_args(&self) -> Vec<String> {
        let mut args = Vec::with_capacity(self.args.len() + 1);
        args.push(format!(
            "--metrics-addr=unix:{}",
            self.metrics_socket.display()
        ));
        args.extend(self.args.iter().cloned());
        args
    }

    /// Its record in the state directory: no token, no value.
    pub(super) fn record(&self) -> Value {
        let targets: Vec<Value> = self
            .targets
            .iter()
            .map(|(target, attachment)| {
                json!({
                    "target": target,
                    "volumeId": attachment.volume_id,
                    "pod": {"namespace": attachment.pod.namespace, "name": attachment.pod.name, "uid": attachment.pod.uid, "serviceAccount": attachment.pod.service_account},
                })
            })
            .collect();
        json!({
            "key": self.key,
            "mountpoint": self.mountpoint,
            "namespace": self.namespace,
            "identity": self.identity.to_json(),
            "options": self.options,
            "args": self.args,
            "targets": targets,
        })
    }
}

/// A recorded command line without its metrics address: an earlier
/// release recorded a loopback port, which the daemons, on the serving
/// pod's own network now, no longer share with the plugin.
pub(super) fn without_metrics_addr(args: Vec<String>) -> Vec<String> {
    args.into_iter()
        .filter(|arg| !arg.starts_with("--metrics-addr="))
        .collect()
}

#[derive(Default)]
pub(super) struct Registry {
    mounts: HashMap<String, SharedMount>,
    /// Shared mounts being created, by namespace: they count against the
    /// caps from the moment they are allowed (creation takes seconds).
    pub(super) creating: HashMap<String, usize>,
}

impl std::ops::Deref for Registry {
    type Target = HashMap<String, SharedMount>;
    fn deref(&self) -> &Self::Target {
        &self.mounts
    }
}

impl std::ops::DerefMut for Registry {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.mounts
    }
}

impl Registry {
    /// The name of a mount of `key` that serves and is not being removed.
    pub(super) fn live(&self, key: &str) -> Option<String> {
        self.mounts
            .iter()
            .find(|(_, m)| m.key == key && m.fds.is_some() && !m.removing)
            .map(|(name, _)| name.clone())
    }

    /// The names of mounts of `key` that no longer serve.
    pub(super) fn dead(&self, key: &str) -> Vec<String> {
        self.mounts
            .iter()
            .filter(|(_, m)| m.key == key && m.fds.is_none())
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The name of the mount `target` is bound to.
    pub(super) fn owner_of(&self, target: &Path) -> Option<String> {
        self.mounts
            .iter()
            .find(|(_, mount)| mount.targets.contains_key(target))
            .map(|(name, _)| name.clone())
    }

    /// What the caps see: the shared mounts and those being created.
    pub(super) fn counts(&self) -> policy::Counts {
        policy::Counts {
            mounts: self
                .mounts
                .iter()
                .filter(|(_, m)| !m.removing)
                .map(|(name, m)| policy::Held {
                    name: name.clone(),
                    key: m.key.clone(),
                    namespace: m.namespace.clone(),
                    identity: m.identity.clone(),
                    options: m.options.clone(),
                    idle_since: m.idle_since.filter(|_| m.targets.is_empty()),
                    live: m.fds.is_some(),
                })
                .collect(),
            creating: self
                .creating
                .iter()
                .map(|(ns, n)| (ns.clone(), *n))
                .collect(),
        }
    }

    pub(super) fn reserve(&mut self, namespace: &str) {
        *self.creating.entry(namespace.to_string()).or_default() += 1;
    }

    pub(super) fn release(&mut self, namespace: &str) {
        if let Some(count) = self.creating.get_mut(namespace) {
            *count -= 1;
            if *count == 0 {
                self.creating.remove(namespace);
            }
        }
    }
}
