//! The state directory: one record per shared mount (no token, no value),
//! named as its mount point is, written on every change; and the recovery
//! that checks them against mountinfo when the plugin starts: live mounts
//! are adopted (their fds come back from the serving side), dead ones
//! detached, targets whose pod is gone unmounted. Records of earlier
//! releases (named by key, a loopback metrics port) are read too.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::Value;

use super::super::sys;
use super::super::volume::{Identity, Pod};
use super::registry::{without_metrics_addr, Attachment, SharedMount};
use super::Driver;
use crate::daemon;

impl Driver {
    /// Writes the record of the mount named `name` (its file is named so too).
    pub(super) fn save(&self, name: &str, mount: &SharedMount) {
        let path = self.mounts_dir().join(format!("{name}.json"));
        let staging = path.with_extension("json.new");
        let written = serde_json::to_vec_pretty(&mount.record())
            .map_err(std::io::Error::other)
            .and_then(|bytes| sys::write_private(&staging, &bytes))
            .and_then(|()| std::fs::rename(&staging, &path));
        if let Err(error) = written {
            tracing::error!(path = %path.display(), %error, "could not record the mount's state");
        }
    }

    /// Detaches what an unusable record (the file `stem`.json) says is
    /// mounted, and forgets it.
    fn detach_record(&self, stem: &str, record: &Value) {
        let pods_dir = &self.settings.policy.pods_dir;
        for target in record["targets"].as_array().into_iter().flatten() {
            let Some(path) = target["target"].as_str().map(PathBuf::from) else {
                continue;
            };
            if path.starts_with(pods_dir) && daemon::is_mount_point(&path) {
                let _ = daemon::lazy_unmount(&path);
            }
        }
        let mountpoint = self.recorded_mountpoint(stem, record);
        if daemon::is_mount_point(&mountpoint) {
            let _ = daemon::lazy_unmount(&mountpoint);
        }
        self.forget(stem, &mountpoint);
    }

    /// Removes the record `name`.json and the mount point's directory.
    pub(super) fn forget(&self, name: &str, mountpoint: &Path) {
        let _ = std::fs::remove_file(self.mounts_dir().join(format!("{name}.json")));
        if mountpoint.parent() == Some(self.mounts_dir().as_path()) {
            let _ = std::fs::remove_dir(mountpoint);
        }
    }

    /// Where a record says its shared mount is: a directory right below
    /// the mounts directory; else the one named as the record's file (an
    /// earlier release named both by the key).
    fn recorded_mountpoint(&self, stem: &str, record: &Value) -> PathBuf {
        record["mountpoint"]
            .as_str()
            .map(PathBuf::from)
            .filter(|path| path.parent() == Some(self.mounts_dir().as_path()))
            .filter(|path| path.file_name().is_some_and(|n| n != ".." && n != "."))
            .unwrap_or_else(|| self.mounts_dir().join(stem))
    }

    /// Rebuilds the shared mounts from the state directory and mountinfo:
    /// live ones are adopted (their fds come back from the serving side),
    /// dead ones detached, targets whose pod is gone unmounted.
    pub fn recover(&self) -> std::io::Result<()> {
        // Root's alone: the mounts below serve any uid (allow_other), so the
        // way to them must be closed to the host's users.
        for dir in [&self.settings.state_dir, &self.mounts_dir()] {
            std::fs::create_dir_all(dir)?;
            sys::make_private(dir)?;
        }
        let mounted = sys::mounts()?;
        let is_mounted = |path: &Path| {
            mounted
                .iter()
                .any(|entry| entry.mount_point == path && entry.fstype == "fuse.ssmfs")
        };
        let mut mounts = self.mounts.lock().unwrap();
        for entry in std::fs::read_dir(self.mounts_dir())? {
            let path = entry?.path();
            if path.extension().is_none_or(|ext| ext != "json") {
                continue;
            }
            let Some(stem) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .map(str::to_string)
            else {
                continue;
            };
            let Some(record) = std::fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
            else {
                tracing::warn!(path = %path.display(), "unreadable mount record; removed");
                let _ = std::fs::remove_file(&path);
                continue;
            };
            let mountpoint = self.recorded_mountpoint(&stem, &record);
            let Some(name) = mountpoint
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_string)
            else {
                continue;
            };
            // An earlier record names no key: its file was named by it.
            let key = record["key"].as_str().unwrap_or(&stem).to_string();
            let Some(identity) = Identity::from_json(&record["identity"]) else {
                // Never guessed: recovering it as the node's identity would
                // hand the node's credentials to whoever wrote the record.
                tracing::error!(mount = %self.label(&name), "the mount record's identity does not parse; not recovering it (its mount and targets are detached)");
                self.detach_record(&stem, &record);
                continue;
            };
            let namespace = record["namespace"].as_str().unwrap_or_default().to_string();
            let options: BTreeMap<String, String> =
                serde_json::from_value(record["options"].clone()).unwrap_or_default();
            let mut targets = BTreeMap::new();
            for target in record["targets"].as_array().into_iter().flatten() {
                let Some(path) = target["target"].as_str().map(PathBuf::from) else {
                    continue;
                };
                let pod = Pod {
                    namespace: target["pod"]["namespace"]
                        .as_str()
                        .unwrap_or_default()
                        .into(),
                    name: target["pod"]["name"].as_str().unwrap_or_default().into(),
                    uid: target["pod"]["uid"].as_str().unwrap_or_default().into(),
                    service_account: target["pod"]["serviceAccount"]
                        .as_str()
                        .unwrap_or_default()
                        .into(),
                };
                let pod_gone =
                    !pod.uid.is_empty() && !self.settings.policy.pods_dir.join(&pod.uid).exists();
                if !is_mounted(&path) {
                    continue;
                }
                if pod_gone || sys::is_dead_mount(&path) {
                    tracing::info!(target = %path.display(), pod = %pod, "cleaning a target whose pod is gone or whose mount died");
                    let _ = daemon::lazy_unmount(&path);
                    let _ = std::fs::remove_dir(&path);
                    continue;
                }
                let volume_id = target["volumeId"].as_str().unwrap_or_default().to_string();
                targets.insert(path, Attachment { volume_id, pod });
            }
            let alive = is_mounted(&mountpoint) && !sys::is_dead_mount(&mountpoint);
            if !alive {
                tracing::info!(mount = %self.label(&name), "the shared mount is gone or dead; detaching it and its targets");
                for target in targets.keys() {
                    let _ = daemon::lazy_unmount(target);
                }
                if is_mounted(&mountpoint) {
                    let _ = daemon::lazy_unmount(&mountpoint);
                }
                self.forget(&stem, &mountpoint);
                continue;
            }
            // The recorded command line, or one rebuilt from the attributes.
            let args: Vec<String> =
                serde_json::from_value(record["args"].clone()).unwrap_or_else(|_| {
                    super::super::volume::daemon_args(&identity, &options, &mountpoint)
                });
            let idle_since = targets.is_empty().then(Instant::now);
            tracing::info!(mount = %self.label(&name), pods = targets.len(), "adopting a live shared mount");
            let mount = SharedMount {
                key,
                mountpoint,
                namespace,
                identity,
                options,
                args: without_metrics_addr(args),
                metrics_socket: self.metrics_socket(&name),
                fds: None,
                targets,
                idle_since,
                served_by: None,
                moving: false,
                removing: false,
            };
            if stem != name {
                // Recorded by key, mounted at a random name: named by the
                // name from now on, as every record is.
                self.save(&name, &mount);
                let _ = std::fs::remove_file(&path);
            }
            mounts.insert(name, mount);
        }
        // Dead ssmfs mounts in pods' directories nobody records any more.
        for entry in &mounted {
            if entry.fstype == "fuse.ssmfs"
                && entry
                    .mount_point
                    .starts_with(&self.settings.policy.pods_dir)
                && sys::is_dead_mount(&entry.mount_point)
            {
                tracing::info!(target = %entry.mount_point.display(), "detaching a dead target");
                let _ = daemon::lazy_unmount(&entry.mount_point);
            }
        }
        Ok(())
    }
}
