//! The filesystem core: lookup, getattr, read, opendir/readdir as async methods
//! that return plain structs. It knows nothing of fuser; tests drive it directly.
//!
//! Model: the mount root is the SSM path PREFIX. To answer for a name the core
//! uses, in order, a fresh listing of the parent directory, fresh knowledge of
//! the name itself, and otherwise one round trip to SSM that asks both "is it a
//! parameter?" (GetParameter) and "is anything below it?" (a first page of a
//! recursive GetParametersByPath) at once. Anything below a name makes it a
//! directory ("directory wins"); its own value, if any, is the file `@value`
//! inside it. Listing a directory reads every page below it once and fills the
//! cache with every value and every subdirectory listing it saw, so a following
//! `cat`, `stat`, `find` or `diff -r` costs nothing.
//!
//! Freshness: entries expire after the TTL; a hot entry is refreshed in the
//! background shortly before (readers never wait); the kernel is told to keep
//! answers exactly as long as they stay valid, and is told to drop them (through
//! the `Invalidation` channel, handled outside any FUSE callback) when a refresh
//! sees a new version or a name appear or vanish. When SSM fails with an outage,
//! a cached answer is served stale for up to `stale_ttl` (one warning per
//! entry); anything never cached answers EIO within the request deadline.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::airflow::Area;
use crate::cache::{
    Cache, Change, ChildKind, DirEntry, Known, Resume, SingleFlight, Validity, ValueEntry,
};
use crate::config::FsConfig;
use crate::error::FsError;
use crate::inode::{InodeTable, Role, ROOT_INO};
use crate::metrics::{Gauges, Metrics};
use crate::names::{self, NameError, SHADOWED_VALUE_NAME};
use crate::store::{Parameter, ParameterStore, StoreError, MAX_PAGE};

/// While SSM is failing, a stale entry is served this long before the next
/// attempt to refresh it, so readers are not each held up by a failing call.
const STALE_RECHECK: Duration = Duration::from_secs(10);
/// After this many probes of names in one partly listed directory, the rest
/// of it is listed in one go: a `stat` storm or a task reading many variables
/// then costs a page per ten names instead of two calls per name.
const PROBES_BEFORE_LISTING: u32 = 3;
/// Bound on the per-directory probe counters (they are hints, not state).
const MAX_PROBE_COUNTERS: usize = 10_000;
/// Reported as the block size: values are small, one page covers them.
const BLOCK_SIZE: u32 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FileKind {
    File,
    Dir,
}

/// Attributes of one inode, independent of fuser's types.
#[derive(Debug, Clone)]
pub struct Attr {
    pub ino: u64,
    pub kind: FileKind,
    pub size: u64,
    pub mtime: SystemTime,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub blksize: u32,
}

/// An answer the kernel may cache for `ttl`.
#[derive(Debug, Clone)]
pub struct Entry {
    pub attr: Attr,
    pub ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct DirItem {
    pub ino: u64,
    pub kind: FileKind,
    pub name: String,
}

/// The bytes a read returns: a range of one value, shared, never copied.
pub struct ReadData {
    parameter: Arc<Parameter>,
    start: usize,
    end: usize,
}

impl ReadData {
    pub fn bytes(&self) -> &[u8] {
        &self.parameter.value.expose()[self.start..self.end]
    }
}

/// What the kernel must forget, sent to whoever owns the FUSE notifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// Drop the inode's cached attributes and data.
    Inode(u64),
    /// Drop the directory entry `name` in `parent`.
    Entry { parent: u64, name: String },
}

enum Resolved {
    Dir(Validity),
    File(Arc<Parameter>, Validity),
    Missing,
    Denied,
}

/// What the cache holds about one name and its parent, for one decision.
#[derive(Default)]
struct Knowledge {
    parent_dir: Option<DirEntry>,
    own_dir: Option<DirEntry>,
    own_value: Option<ValueEntry>,
}

impl Knowledge {
    /// Decides what `base` in the parent is, or `None` if more must be fetched.
    fn decide(&self, base: &str) -> Option<Resolved> {
        if let Some(dir) = self.own_dir.as_ref().filter(|d| d.is_dir()) {
            return Some(Resolved::Dir(dir.validity));
        }
        let listed = self
            .parent_dir
            .as_ref()
            .and_then(|d| d.children.get(base).map(|k| (d, *k)));
        match listed {
            Some((parent, ChildKind::Dir)) => return Some(Resolved::Dir(parent.validity)),
            Some((_, ChildKind::File)) => return self.own_value.as_ref().map(value_resolution),
            None if self.parent_dir.as_ref().is_some_and(|d| d.complete) => {
                return Some(Resolved::Missing)
            }
            None => {}
        }
        match (&self.own_dir, &self.own_value) {
            (Some(_), Some(value)) => Some(value_resolution(value)),
            _ => None,
        }
    }

    /// Whether a probe must ask if anything lies below the name.
    fn needs_dir_probe(&self, base: &str) -> bool {
        let parent_says_file = self
            .parent_dir
            .as_ref()
            .is_some_and(|d| d.children.get(base) == Some(&ChildKind::File));
        self.own_dir.is_none() && !parent_says_file
    }
}

fn value_resolution(entry: &ValueEntry) -> Resolved {
    match &entry.known {
        Known::Present(p) => Resolved::File(p.clone(), entry.validity),
        Known::Absent => Resolved::Missing,
        Known::Denied => Resolved::Denied,
    }
}

pub struct Fs<S> {
    store: S,
    cache: Cache,
    inodes: InodeTable,
    config: FsConfig,
    metrics: Arc<Metrics>,
    value_flights: SingleFlight<String, Result<ValueEntry, StoreError>>,
    dir_flights: SingleFlight<(String, bool), Result<DirEntry, StoreError>>,
    dir_handles: Mutex<HashMap<u64, Arc<Vec<DirItem>>>>,
    next_handle: AtomicU64,
    invalidations: mpsc::UnboundedSender<Invalidation>,
    denied_logged: Mutex<HashSet<String>>,
    /// Paths whose listing SSM refused (a role with GetParameter alone), and
    /// until when not to ask again: each refusal is a wasted call and an
    /// AccessDenied event in CloudTrail.
    listings_denied: Mutex<HashMap<String, Instant>>,
    probes_by_dir: Mutex<HashMap<String, u32>>,
    /// Airflow layout: the pinned folder inodes and the area each one shows.
    areas: Vec<(u64, Area)>,
    mounted_at: SystemTime,
}

impl<S: ParameterStore> Fs<S> {
    pub fn new(
        store: S,
        config: FsConfig,
        metrics: Arc<Metrics>,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Invalidation>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let root_name = if config.areas.is_empty() {
            config.prefix.as_str()
        } else {
            ""
        };
        let inodes = InodeTable::new(root_name);
        let areas = config
            .areas
            .iter()
            .map(|area| (inodes.pin(ROOT_INO, &area.prefix, Role::Dir), area.clone()))
            .collect();
        let fs = Fs {
            store,
            cache: Cache::new(config.cache.clone(), metrics.clone()),
            inodes,
            areas,
            metrics,
            value_flights: SingleFlight::default(),
            dir_flights: SingleFlight::default(),
            dir_handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            invalidations: sender,
            denied_logged: Mutex::new(HashSet::new()),
            listings_denied: Mutex::new(HashMap::new()),
            probes_by_dir: Mutex::new(HashMap::new()),
            mounted_at: SystemTime::now(),
            config,
        };
        (Arc::new(fs), receiver)
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// The one API call of a mount: the first page below the mounted path (the
    /// first folder's, in the Airflow layout). It proves credentials, region
    /// and endpoint before the mount appears, and is kept as that listing's
    /// first page. Returns a warning to log when SSM only throttled it.
    pub async fn check_access(self: &Arc<Self>) -> Result<Option<String>, String> {
        let path = match self.areas.first() {
            Some((_, area)) => area.prefix.clone(),
            None => self.config.prefix.clone(),
        };
        match self.probe_dir(&path).await {
            Ok(_) => Ok(None),
            // A role that may read parameters but not list them: mount, and
            // resolve names one by one (probe_dir remembered and logged it).
            Err(StoreError::AccessDenied(_)) => Ok(None),
            Err(StoreError::Throttled) => Ok(Some(format!(
                "SSM throttled the first listing of {path}; continuing"
            ))),
            Err(error @ StoreError::Credentials(_)) => Err(error.to_string()),
            Err(error) => Err(format!("cannot read {path} from SSM: {error}")),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn gauges(&self) -> Gauges {
        let (values, dirs, bytes) = self.cache.usage();
        Gauges {
            cache_entries: values + dirs,
            cache_bytes: bytes,
            inodes: self.inodes.len(),
        }
    }

    /// Values currently held in the cache.
    pub fn cached_values(&self) -> usize {
        self.cache.usage().0
    }

    // ----- FUSE operations -----

    pub async fn lookup(
        self: &Arc<Self>,
        parent_ino: u64,
        segment: &OsStr,
    ) -> Result<Entry, FsError> {
        let parent = self.dir_node(parent_ino)?;
        let segment = segment.to_str().ok_or(NameError::BadCharacter)?;
        if self.is_area_root_dir(parent_ino) {
            let (_, area) = self
                .areas
                .iter()
                .find(|(_, a)| a.folder == segment)
                .ok_or(FsError::NotFound)?;
            let ino = self.inodes.remember(ROOT_INO, &area.prefix, Role::Dir);
            return Ok(Entry {
                attr: self.dir_attr(ino),
                ttl: self.config.cache.ttl,
            });
        }
        if self
            .area_of(parent_ino)
            .is_some_and(|area| !area.admits(segment))
        {
            return Err(FsError::NotFound);
        }
        // The root's own value is the parent directory's business: mount one level up.
        if segment == SHADOWED_VALUE_NAME
            && parent_ino != ROOT_INO
            && self.area_of(parent_ino).is_none()
        {
            let entry = self.value(&parent.name).await?;
            let parameter = present(&entry)?;
            let ino = self
                .inodes
                .remember(parent_ino, &parent.name, Role::ShadowedValue);
            return Ok(self.file_entry(ino, &parameter, &entry.validity));
        }
        let name = names::child_name(&parent.name, segment)?;
        match self.resolve(&parent.name, &name).await? {
            Resolved::Dir(validity) => {
                let ino = self.inodes.remember(parent_ino, &name, Role::Dir);
                Ok(Entry {
                    attr: self.dir_attr(ino),
                    ttl: validity.kernel_ttl(Instant::now()),
                })
            }
            Resolved::File(parameter, validity) => {
                let ino = if *parameter.name == *name {
                    self.inodes
                        .remember_shared(parent_ino, &parameter.name, Role::File)
                } else {
                    self.inodes.remember(parent_ino, &name, Role::File)
                };
                Ok(self.file_entry(ino, &parameter, &validity))
            }
            Resolved::Missing => Err(FsError::NotFound),
            Resolved::Denied => Err(self.denied(&name)),
        }
    }

    pub async fn getattr(self: &Arc<Self>, ino: u64) -> Result<Entry, FsError> {
        let node = self.inodes.get(ino).ok_or(FsError::UnknownInode(ino))?;
        if node.role == Role::Dir {
            // A directory's existence is revalidated by lookup; its attributes never change.
            return Ok(Entry {
                attr: self.dir_attr(ino),
                ttl: self.config.cache.ttl,
            });
        }
        let entry = self.value(&node.name).await?;
        let parameter = present(&entry).map_err(|e| self.deny_or(e, &node.name))?;
        Ok(self.file_entry(ino, &parameter, &entry.validity))
    }

    pub async fn read(
        self: &Arc<Self>,
        ino: u64,
        offset: u64,
        size: u32,
    ) -> Result<ReadData, FsError> {
        let node = self.inodes.get(ino).ok_or(FsError::UnknownInode(ino))?;
        if node.role == Role::Dir {
            return Err(FsError::IsDirectory);
        }
        let entry = self.value(&node.name).await?;
        let current = present(&entry).map_err(|e| self.deny_or(e, &node.name))?;
        // Serve the version whose size the kernel holds, so a read never mixes or
        // truncates two versions; if that one is gone, serve the new one whole and
        // make the kernel fetch its size again.
        let parameter = match node.reported_version {
            Some(version) if version != current.version => {
                match entry.previous.filter(|p| p.version == version) {
                    Some(previous) => previous,
                    None => {
                        self.send(Invalidation::Inode(ino));
                        self.inodes.set_reported_version(ino, Some(current.version));
                        current
                    }
                }
            }
            _ => current,
        };
        let len = parameter.value.len();
        let start = (offset as usize).min(len);
        let end = start.saturating_add(size as usize).min(len);
        Ok(ReadData {
            parameter,
            start,
            end,
        })
    }

    /// Lists the directory once and keeps that listing for the handle's life,
    /// so offsets stay stable while the directory is read.
    pub async fn opendir(self: &Arc<Self>, ino: u64) -> Result<u64, FsError> {
        let node = self.dir_node(ino)?;
        let mut items = vec![
            DirItem {
                ino,
                kind: FileKind::Dir,
                name: ".".into(),
            },
            DirItem {
                ino: node.parent,
                kind: FileKind::Dir,
                name: "..".into(),
            },
        ];
        if self.is_area_root_dir(ino) {
            for (area_ino, area) in &self.areas {
                items.push(DirItem {
                    ino: *area_ino,
                    kind: FileKind::Dir,
                    name: area.folder.clone(),
                });
            }
            return Ok(self.new_dir_handle(items));
        }
        let listing = self.listing(&node.name).await?;
        let area = self.area_of(ino);
        let shows_own_value = ino != ROOT_INO && area.is_none();
        let shadowed = shows_own_value
            && match self.cache.value(&node.name) {
                Some(entry) => entry.parameter().is_some(),
                None => match listing.own_parameter {
                    Some(known) => known,
                    // Unknown: one GetParameter, the "+1" of a listing's cost.
                    None => self
                        .value(&node.name)
                        .await
                        .is_ok_and(|e| e.parameter().is_some()),
                },
            };
        if shadowed {
            items.push(DirItem {
                ino: self.item_ino(&node.name, Role::ShadowedValue),
                kind: FileKind::File,
                name: SHADOWED_VALUE_NAME.into(),
            });
        }
        for (child, kind) in listing
            .children
            .iter()
            .filter(|(c, _)| area.is_none_or(|a| a.admits(c)))
        {
            let name = names::child_name(&node.name, child).unwrap_or_default();
            let (role, kind) = match kind {
                ChildKind::Dir => (Role::Dir, FileKind::Dir),
                ChildKind::File => (Role::File, FileKind::File),
            };
            items.push(DirItem {
                ino: self.item_ino(&name, role),
                kind,
                name: child.to_string(),
            });
        }
        Ok(self.new_dir_handle(items))
    }

    fn new_dir_handle(&self, items: Vec<DirItem>) -> u64 {
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.dir_handles
            .lock()
            .unwrap()
            .insert(handle, Arc::new(items));
        handle
    }

    /// The virtual root of the Airflow layout (it has no SSM path of its own).
    fn is_area_root_dir(&self, ino: u64) -> bool {
        ino == ROOT_INO && !self.areas.is_empty()
    }

    /// The area whose folder `ino` is, if any: its keys are filtered by its pattern.
    fn area_of(&self, ino: u64) -> Option<&Area> {
        self.areas.iter().find(|(i, _)| *i == ino).map(|(_, a)| a)
    }

    /// At most `limit` entries from `offset` on; each item's offset for the
    /// kernel is its index + 1. The limit keeps a listing of N entries, read a
    /// buffer at a time, from copying O(N) entries per call.
    pub fn readdir(
        &self,
        handle: u64,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<(u64, DirItem)>, FsError> {
        let items = self
            .dir_handles
            .lock()
            .unwrap()
            .get(&handle)
            .cloned()
            .ok_or(FsError::BadHandle(handle))?;
        Ok(items
            .iter()
            .enumerate()
            .skip(offset as usize)
            .take(limit)
            .map(|(i, item)| (i as u64 + 1, item.clone()))
            .collect())
    }

    pub fn releasedir(&self, handle: u64) {
        self.dir_handles.lock().unwrap().remove(&handle);
    }

    pub fn forget(&self, ino: u64, count: u64) {
        self.inodes.forget(ino, count);
    }

    /// Drops every cached answer, here and in the kernel (SIGHUP).
    pub fn drop_caches(&self) {
        self.cache.clear();
        crate::heap::release_freed();
        for node in self.inodes.all() {
            if node.ino != ROOT_INO {
                self.send(Invalidation::Entry {
                    parent: node.parent,
                    name: names::base_name(&node.name).to_string(),
                });
            }
            self.send(Invalidation::Inode(node.ino));
        }
    }

    // ----- resolution -----

    fn dir_node(&self, ino: u64) -> Result<crate::inode::Node, FsError> {
        let node = self.inodes.get(ino).ok_or(FsError::UnknownInode(ino))?;
        if node.role != Role::Dir {
            return Err(FsError::NotDirectory);
        }
        Ok(node)
    }

    fn knowledge(&self, parent: &str, name: &str, usable: impl Fn(&Validity) -> bool) -> Knowledge {
        Knowledge {
            parent_dir: self.cache.dir(parent).filter(|d| usable(&d.validity)),
            own_dir: self.cache.dir(name).filter(|d| usable(&d.validity)),
            own_value: self.cache.value(name).filter(|v| usable(&v.validity)),
        }
    }

    async fn resolve(self: &Arc<Self>, parent: &str, name: &str) -> Result<Resolved, FsError> {
        let base = names::base_name(name);
        let now = Instant::now();
        let mut known = self.knowledge(parent, name, |v| v.is_fresh(now));
        if let Some(resolved) = known.decide(base) {
            Metrics::inc(&self.metrics.cache_hits);
            self.refresh_if_due(&known.own_value, name);
            return Ok(resolved);
        }
        Metrics::inc(&self.metrics.cache_misses);
        let parent_partial = known.parent_dir.as_ref().is_some_and(|d| !d.complete);
        if parent_partial && self.many_probes_in(parent) {
            if let Ok(listing) = self.list_dir(parent).await {
                known.parent_dir = Some(listing);
                if let Some(resolved) = known.decide(base) {
                    return Ok(resolved);
                }
            }
        }
        let mut probe_dir = known.needs_dir_probe(base);
        let fetch_value = known.own_value.is_none();
        // A listing SSM refused within the TTL is not asked for again. Below a
        // path it will not list, the value is asked for alone first: a found
        // parameter is a file (the usual case, one call); only a miss takes a
        // second round trip to ask whether the name is a directory.
        let refused_here = probe_dir && self.listing_denied(name, now);
        let value_first = probe_dir && !refused_here && self.listing_denied(parent, now);
        if refused_here || value_first {
            probe_dir = false;
        }
        let (mut dir, value) = tokio::join!(
            async {
                if probe_dir {
                    Some(self.probe_dir(name).await)
                } else {
                    None
                }
            },
            async {
                if fetch_value {
                    Some(self.fetch_value(name).await)
                } else {
                    None
                }
            },
        );
        let found = matches!(&value, Some(Ok(entry)) if entry.parameter().is_some())
            || known
                .own_value
                .as_ref()
                .is_some_and(|e| e.parameter().is_some());
        if value_first && !found && !matches!(&value, Some(Err(_))) {
            dir = Some(self.probe_dir(name).await);
        }
        let mut outage = None;
        let mut listing_denied = false;
        match dir {
            Some(Ok(dir)) => known.own_dir = Some(dir),
            // SSM refuses a listing when IAM or KMS denies something below the
            // name: so something is there. Unless the name is itself a readable
            // parameter, it is a directory whose names resolve one by one.
            Some(Err(StoreError::AccessDenied(_))) => listing_denied = true,
            Some(Err(e)) if e.is_outage() => outage = Some(e),
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
        match value {
            Some(Ok(value)) => known.own_value = Some(value),
            Some(Err(e)) if e.is_outage() => outage = Some(e),
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
        if let Some(error) = outage {
            let stale = self.knowledge(parent, name, |v| v.may_serve_stale(now));
            return match stale.decide(base) {
                Some(resolved) => {
                    self.note_stale(name, &error);
                    Ok(resolved)
                }
                None => Err(error.into()),
            };
        }
        // Where SSM will not list, a name that holds no value of its own may
        // still have parameters below it (a refusal can come from one
        // parameter inside): it is served as a directory whose names resolve
        // one by one.
        if listing_denied || refused_here || (value_first && found) {
            return Ok(match known.own_value.as_ref().map(value_resolution) {
                Some(Resolved::Missing) | None => {
                    Resolved::Dir(self.cache.validity(self.config.cache.negative_ttl))
                }
                Some(resolved) => resolved,
            });
        }
        known.decide(base).ok_or(FsError::NotFound)
    }

    /// Whether SSM refused to list `path` within the last TTL.
    fn listing_denied(&self, path: &str, now: Instant) -> bool {
        self.listings_denied
            .lock()
            .unwrap()
            .get(path)
            .is_some_and(|until| now < *until)
    }

    /// Remembers a refused listing of `path` for a TTL, wherever a listing is
    /// asked for; the first refusal of a path is logged, later ones are not.
    fn remember_refusal(&self, path: &str, error: &StoreError) {
        if !matches!(error, StoreError::AccessDenied(_)) {
            return;
        }
        let now = Instant::now();
        let mut denied = self.listings_denied.lock().unwrap();
        if denied.len() >= MAX_PROBE_COUNTERS {
            denied.clear();
        }
        let first = denied
            .insert(path.to_string(), now + self.config.cache.ttl)
            .is_none();
        if first {
            tracing::warn!(
                path,
                "SSM denied listing below this path: serving it as a directory of names resolved one by one (listing it answers EACCES)"
            );
        }
    }

    /// Counts a probe below `dir`; true once enough siblings were probed that
    /// listing the directory is cheaper.
    fn many_probes_in(&self, dir: &str) -> bool {
        let mut counters = self.probes_by_dir.lock().unwrap();
        if counters.len() >= MAX_PROBE_COUNTERS {
            counters.clear();
        }
        let count = counters.entry(dir.to_string()).or_default();
        *count += 1;
        *count > PROBES_BEFORE_LISTING
    }

    /// The cached value of `name`, fetched if missing or expired, served stale
    /// through an outage.
    async fn value(self: &Arc<Self>, name: &str) -> Result<ValueEntry, FsError> {
        let now = Instant::now();
        let cached = self.cache.value(name);
        if let Some(entry) = cached.as_ref().filter(|e| e.validity.is_fresh(now)) {
            Metrics::inc(&self.metrics.cache_hits);
            self.refresh_if_due(&cached, name);
            return Ok(entry.clone());
        }
        Metrics::inc(&self.metrics.cache_misses);
        match self.fetch_value(name).await {
            Ok(entry) => Ok(entry),
            Err(error) if error.is_outage() => {
                match cached.filter(|e| e.validity.may_serve_stale(now)) {
                    Some(entry) => {
                        self.note_stale(name, &error);
                        Ok(entry)
                    }
                    None => Err(error.into()),
                }
            }
            Err(error) => Err(error.into()),
        }
    }

    fn refresh_if_due(self: &Arc<Self>, entry: &Option<ValueEntry>, name: &str) {
        let due = entry
            .as_ref()
            .is_some_and(|e| e.parameter().is_some() && e.validity.wants_refresh(Instant::now()));
        if due {
            let fs = self.clone();
            let name = name.to_string();
            tokio::spawn(async move {
                if let Err(error) = fs.fetch_value(&name).await {
                    if error.is_outage() {
                        fs.note_stale(&name, &error);
                    }
                }
            });
        }
    }

    fn note_stale(&self, name: &str, error: &StoreError) {
        Metrics::inc(&self.metrics.stale_serves);
        self.cache
            .extend_stale_dir(names::parent_name(name), STALE_RECHECK);
        self.cache.extend_stale_dir(name, STALE_RECHECK);
        if self.cache.extend_stale_value(name, STALE_RECHECK) {
            tracing::warn!(parameter = name, %error, "SSM is not answering; serving the cached answer past its TTL");
        }
    }

    fn denied(&self, name: &str) -> FsError {
        if self.denied_logged.lock().unwrap().insert(name.to_string()) {
            tracing::warn!(
                parameter = name,
                "SSM denied access to this parameter (IAM or KMS); answering EACCES"
            );
        }
        FsError::Store(StoreError::AccessDenied(name.to_string()))
    }

    fn deny_or(&self, error: FsError, name: &str) -> FsError {
        match error {
            FsError::Store(StoreError::AccessDenied(_)) => self.denied(name),
            other => other,
        }
    }

    /// One GetParameter, shared by every concurrent caller for the name.
    async fn fetch_value(self: &Arc<Self>, name: &str) -> Result<ValueEntry, StoreError> {
        self.value_flights
            .run(name.to_string(), || async {
                let known = match self.store.get(name).await {
                    Ok(parameter) => Known::Present(Arc::new(parameter)),
                    Err(StoreError::NotFound) => Known::Absent,
                    Err(StoreError::AccessDenied(_)) => Known::Denied,
                    Err(error) => return Err(error),
                };
                Ok(self.record_value(name, known))
            })
            .await
    }

    fn record_value(&self, name: &str, known: Known) -> ValueEntry {
        let (change, entry) = self.cache.put_value(name, known);
        match change {
            Change::None => {}
            Change::NewVersion => {
                for role in [Role::File, Role::ShadowedValue] {
                    if let Some(ino) = self.inodes.find(name, role) {
                        self.send(Invalidation::Inode(ino));
                    }
                }
            }
            Change::Appeared | Change::Disappeared => self.invalidate_entry(name),
        }
        entry
    }

    fn invalidate_entry(&self, name: &str) {
        if let Some(parent) = self.inodes.find(names::parent_name(name), Role::Dir) {
            self.send(Invalidation::Entry {
                parent,
                name: names::base_name(name).to_string(),
            });
        }
    }

    fn send(&self, invalidation: Invalidation) {
        Metrics::inc(&self.metrics.invalidations);
        // The receiver is gone only during shutdown, when nothing needs telling.
        let _ = self.invalidations.send(invalidation);
    }

    /// The first page below `path`: enough to tell whether it is a directory.
    async fn probe_dir(self: &Arc<Self>, path: &str) -> Result<DirEntry, StoreError> {
        self.dir_flights
            .run((path.to_string(), false), || async {
                let mut token = None;
                loop {
                    let page = self.store.list_page(path, MAX_PAGE, token).await?;
                    // SSM may return an empty page that still has a next token.
                    if !page.parameters.is_empty() || page.next_token.is_none() {
                        let names = page.parameters.iter().map(|p| p.name.clone()).collect();
                        return Ok(self.record_listing(
                            path,
                            names,
                            page.parameters,
                            page.next_token,
                        ));
                    }
                    token = page.next_token;
                }
            })
            .await
            .inspect_err(|error| self.remember_refusal(path, error))
    }

    /// Every page below `path`, continuing a fresh partial listing if there is one.
    async fn list_dir(self: &Arc<Self>, path: &str) -> Result<DirEntry, StoreError> {
        self.dir_flights
            .run((path.to_string(), true), || async {
                let now = Instant::now();
                let resume = self
                    .cache
                    .dir(path)
                    .filter(|d| d.validity.is_fresh(now))
                    .and_then(|d| d.resume);
                if let Some(resume) = resume {
                    let names = resume.names.as_ref().clone();
                    match self.read_pages(path, names, Some(resume.next_token)).await {
                        // A next token SSM no longer accepts: start over.
                        Err(StoreError::Invalid(_)) => {}
                        other => return other,
                    }
                }
                self.read_pages(path, Vec::new(), None).await
            })
            .await
            .inspect_err(|error| self.remember_refusal(path, error))
    }

    async fn read_pages(
        &self,
        path: &str,
        mut names: Vec<Arc<str>>,
        mut token: Option<String>,
    ) -> Result<DirEntry, StoreError> {
        let mut parameters = Vec::new();
        loop {
            let page = self.store.list_page(path, MAX_PAGE, token).await?;
            names.extend(page.parameters.iter().map(|p| p.name.clone()));
            parameters.extend(page.parameters);
            token = page.next_token;
            if token.is_none() {
                let many = names.len() >= crate::heap::TRIM_AFTER_LISTING_OF;
                let listed = self.record_listing(path, names, parameters, None);
                if many {
                    crate::heap::release_freed();
                }
                return Ok(listed);
            }
        }
    }

    async fn listing(self: &Arc<Self>, path: &str) -> Result<DirEntry, FsError> {
        let now = Instant::now();
        let cached = self.cache.dir(path).filter(|d| d.complete);
        if let Some(dir) = cached.as_ref().filter(|d| d.validity.is_fresh(now)) {
            Metrics::inc(&self.metrics.cache_hits);
            return Ok(dir.clone());
        }
        if self.listing_denied(path, now) {
            return Err(FsError::Store(StoreError::AccessDenied(path.to_string())));
        }
        Metrics::inc(&self.metrics.cache_misses);
        match self.list_dir(path).await {
            Ok(dir) => Ok(dir),
            Err(error) if error.is_outage() => {
                match cached.filter(|d| d.validity.may_serve_stale(now)) {
                    Some(dir) => {
                        Metrics::inc(&self.metrics.stale_serves);
                        self.cache.extend_stale_dir(path, STALE_RECHECK);
                        tracing::warn!(path, %error, "SSM is not answering; serving the cached listing past its TTL");
                        Ok(dir)
                    }
                    None => Err(error.into()),
                }
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Caches the values just fetched, the listing of `path` (every name seen
    /// below it; complete unless SSM gave a next token) and, when complete, the
    /// listing of every directory below it.
    fn record_listing(
        &self,
        path: &str,
        names: Vec<Arc<str>>,
        fetched: Vec<Parameter>,
        next_token: Option<String>,
    ) -> DirEntry {
        let complete = next_token.is_none();
        let mut dirs: BTreeMap<String, BTreeMap<Box<str>, ChildKind>> = BTreeMap::new();
        dirs.insert(path.to_string(), BTreeMap::new());
        for name in &names {
            let Some(relative) = names::relative_to(path, name) else {
                continue;
            };
            let mut dir = path.to_string();
            let segments: Vec<&str> = relative.split('/').collect();
            for (i, segment) in segments.iter().enumerate() {
                let kind = if i + 1 == segments.len() {
                    ChildKind::File
                } else {
                    ChildKind::Dir
                };
                let slot = dirs
                    .entry(dir.clone())
                    .or_default()
                    .entry(Box::from(*segment))
                    .or_insert(kind);
                if kind == ChildKind::Dir {
                    *slot = ChildKind::Dir; // directory wins
                }
                if !complete {
                    break; // a partial listing says nothing complete about subdirectories
                }
                dir = if dir == "/" {
                    format!("/{segment}")
                } else {
                    format!("{dir}/{segment}")
                };
            }
        }
        for parameter in fetched {
            let name = parameter.name.clone();
            self.record_value(&name, Known::Present(Arc::new(parameter)));
        }
        let own = dirs.remove(path).unwrap_or_default();
        if complete {
            let parameters: HashSet<&str> = names.iter().map(|n| &**n).collect();
            for (dir, children) in dirs {
                let own_parameter = Some(parameters.contains(dir.as_str()));
                self.record_dir(&dir, children, None, own_parameter);
            }
        }
        let resume = next_token.map(|next_token| Resume {
            next_token,
            names: Arc::new(names),
        });
        self.record_dir(path, own, resume, None)
    }

    fn record_dir(
        &self,
        path: &str,
        children: BTreeMap<Box<str>, ChildKind>,
        resume: Option<Resume>,
        own_parameter: Option<bool>,
    ) -> DirEntry {
        let complete = resume.is_none();
        let own_parameter =
            own_parameter.or_else(|| self.cache.dir(path).and_then(|d| d.own_parameter));
        if complete {
            self.probes_by_dir.lock().unwrap().remove(path);
            if let Some(old) = self.cache.dir(path).filter(|d| d.complete) {
                let changed = old
                    .children
                    .iter()
                    .filter(|(n, k)| children.get(*n) != Some(k))
                    .map(|(n, _)| n)
                    .chain(
                        children
                            .iter()
                            .filter(|(n, k)| old.children.get(*n) != Some(k))
                            .map(|(n, _)| n),
                    );
                if let Some(parent) = self.inodes.find(path, Role::Dir) {
                    for name in changed {
                        self.send(Invalidation::Entry {
                            parent,
                            name: name.to_string(),
                        });
                    }
                }
            }
        }
        self.cache
            .put_dir(path, complete, children, resume, own_parameter)
    }

    // ----- attributes -----

    fn item_ino(&self, name: &str, role: Role) -> u64 {
        // Names the kernel has not looked up get a stable, hashed number with the
        // top bit set, so they cannot collide with the table's counter.
        self.inodes.find(name, role).unwrap_or_else(|| {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            (name, role).hash(&mut hasher);
            hasher.finish() | (1 << 63)
        })
    }

    fn dir_attr(&self, ino: u64) -> Attr {
        Attr {
            ino,
            kind: FileKind::Dir,
            size: 0,
            mtime: self.mounted_at,
            perm: self.config.dir_mode,
            uid: self.config.uid,
            gid: self.config.gid,
            nlink: 2,
            blksize: BLOCK_SIZE,
        }
    }

    fn file_entry(&self, ino: u64, parameter: &Parameter, validity: &Validity) -> Entry {
        self.inodes
            .set_reported_version(ino, Some(parameter.version));
        Entry {
            attr: Attr {
                ino,
                kind: FileKind::File,
                size: parameter.value.len() as u64,
                mtime: parameter.last_modified.into(),
                perm: self.config.file_mode,
                uid: self.config.uid,
                gid: self.config.gid,
                nlink: 1,
                blksize: BLOCK_SIZE,
            },
            ttl: validity.kernel_ttl(Instant::now()),
        }
    }
}

fn present(entry: &ValueEntry) -> Result<Arc<Parameter>, FsError> {
    match &entry.known {
        Known::Present(parameter) => Ok(parameter.clone()),
        Known::Absent => Err(FsError::NotFound),
        Known::Denied => Err(FsError::Store(StoreError::AccessDenied(String::new()))),
    }
}
