//! The request handlers: `Fs`, what each FUSE operation asks of the core
//! (lookup, getattr, read, opendir/readdir, forget), as async methods that
//! return plain structs. A handler decides what to ask the store and when; what
//! the store answers is recorded by the superblock (`superblock`), which owns
//! the cache and the inodes. The other handlers' files add to `Fs`: names that
//! are not parameters (`special`), listings (`listing`), the lookup policy
//! (`lookup`), refreshes (`refresh`), change events (`apply_events`) and
//! change streams (`change_streams`).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::apply_events::EventState;
use super::attr::{Attrs, Entry, FileKind};
use super::change_streams::{is_stream_ino, CHANGES_NAME, STREAM_DIR_INO};
use super::error::FsError;
use super::layout::{Child, Layout};
use super::lookup::Resolved;
use super::superblock::{Invalidation, Superblock};

use super::cache::{ChildKind, DirEntry, Known, ValueEntry};
use super::inode::{InodeTable, Node, Role, ROOT_INO};
use crate::config::FsConfig;
use crate::metrics::{Gauges, Metrics};
use crate::names::{self, NameError, SHADOWED_VALUE_NAME};
use crate::store::{Parameter, ParameterStore, StoreError};

#[derive(Debug, Clone)]
pub struct DirItem {
    pub ino: u64,
    pub kind: FileKind,
    pub name: String,
}

/// The bytes a read returns: a range of one value, shared, never copied (or
/// of a field derived from one).
pub struct ReadData {
    source: ReadSource,
    start: usize,
    end: usize,
}

enum ReadSource {
    Value(Arc<Parameter>),
    Field(crate::secret::SecretBytes),
}

impl ReadData {
    pub fn bytes(&self) -> &[u8] {
        let all = match &self.source {
            ReadSource::Value(parameter) => parameter.value.expose(),
            ReadSource::Field(bytes) => bytes.expose(),
        };
        &all[self.start..self.end]
    }

    fn new(source: ReadSource, len: usize, offset: u64, size: u32) -> Self {
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(len);
        let end = start.saturating_add(size as usize).min(len);
        Self { source, start, end }
    }

    pub(super) fn derived(bytes: crate::secret::SecretBytes, offset: u64, size: u32) -> Self {
        let len = bytes.len();
        Self::new(ReadSource::Field(bytes), len, offset, size)
    }
}

pub struct Fs<S> {
    pub(super) store: S,
    /// The cache, the inodes, the calls under way and the kernel's channel.
    pub(super) superblock: Superblock,
    pub(super) attrs: Attrs,
    pub(super) config: FsConfig,
    pub(super) metrics: Arc<Metrics>,
    dir_handles: DirHandles,
    /// Change events waiting to be applied (see `apply_events`).
    pub(super) events: EventState,
}

/// The listings opendir took, by handle, kept for the handle's life.
struct DirHandles {
    open: Mutex<HashMap<u64, Arc<Vec<DirItem>>>>,
    next: AtomicU64,
}

impl<S: ParameterStore> Fs<S> {
    pub fn new(
        store: S,
        config: FsConfig,
        metrics: Arc<Metrics>,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Invalidation>) {
        let inodes = Self::inode_table(&config);
        Self::with_inodes(store, config, metrics, inodes)
    }

    /// An empty inode table for a mount of `config`.
    pub fn inode_table(config: &FsConfig) -> InodeTable {
        InodeTable::new(Layout::new(config).root_name())
    }

    /// Like `new`, with an inode table restored from an earlier daemon of the
    /// same mount (`InodeTable::with_journal`).
    pub fn with_inodes(
        store: S,
        config: FsConfig,
        metrics: Arc<Metrics>,
        inodes: InodeTable,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Invalidation>) {
        let (superblock, invalidations) = Superblock::new(&config, metrics.clone(), inodes);
        let fs = Fs {
            store,
            superblock,
            attrs: Attrs::new(&config),
            metrics,
            dir_handles: DirHandles {
                open: Mutex::new(HashMap::new()),
                // Random: a restarted daemon (--supervise) must not hand out a
                // handle the kernel still holds from its predecessor.
                next: AtomicU64::new(u64::from(rand::random::<u32>()) << 24 | 1),
            },
            events: EventState::new(config.events.hosts),
            config,
        };
        (Arc::new(fs), invalidations)
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// The one API call of a mount: the first page below the mounted path (the
    /// first folder's, in the Airflow layout). It proves credentials, region
    /// and endpoint before the mount appears, and is kept as that listing's
    /// first page. A refused listing (a role with GetParameter alone) or
    /// throttling still mounts; anything that would break every read does not.
    pub async fn check_access(self: &Arc<Self>) -> Result<(), FsError> {
        let path = self.superblock.layout().first_path().to_string();
        // Not patient with throttling: a throttled fleet mounts at once and
        // its readers wait instead (the mount must not wait minutes).
        match crate::store::resilient::in_background(self.probe_dir(&path)).await {
            // A refusal was remembered and logged by probe_dir.
            Ok(_) | Err(StoreError::AccessDenied { .. }) => Ok(()),
            Err(StoreError::Throttled) => {
                tracing::warn!(path, "SSM throttled the first listing; continuing");
                Ok(())
            }
            Err(error @ (StoreError::Credentials(_) | StoreError::IdentityRefused(_))) => {
                Err(error.into())
            }
            Err(cause) => Err(FsError::Unreachable { path, cause }),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn gauges(&self) -> Gauges {
        let usage = self.superblock.cache().usage();
        Gauges {
            cache_entries: usage.values + usage.dirs,
            cache_notes: usage.notes,
            cache_bytes: usage.value_bytes,
            inodes: self.superblock.inodes().len(),
        }
    }

    /// Values currently held in the cache.
    pub fn cached_values(&self) -> usize {
        self.superblock.cache().usage().values
    }

    // ----- FUSE operations -----

    pub async fn lookup(
        self: &Arc<Self>,
        parent_ino: u64,
        segment: &OsStr,
    ) -> Result<Entry, FsError> {
        if is_stream_ino(parent_ino) {
            return Err(FsError::NotFound);
        }
        let parent = self.dir_node(parent_ino)?;
        if parent.role == Role::View {
            return self.lookup_field(&parent, segment).await;
        }
        if segment == CHANGES_NAME {
            let stream = self.open_stream(&parent)?;
            return Ok(self.attrs.stream(stream.ino));
        }
        let segment = segment.to_str().ok_or(NameError::BadCharacter)?;
        match self.superblock.layout().classify(&parent, segment) {
            Child::Excluded => Err(FsError::NotFound),
            Child::Area(area) => {
                let ino = self
                    .superblock
                    .inodes()
                    .remember(ROOT_INO, &area.prefix, Role::Area);
                Ok(self.attrs.dir(ino, self.config.cache.ttl))
            }
            Child::OwnValue => {
                let entry = self.value(&parent.name).await?;
                let parameter = self.present(&entry, &parent.name)?;
                let ino = self.superblock.inodes().remember(
                    parent_ino,
                    &parent.name,
                    Role::ShadowedValue,
                );
                Ok(self.file_entry(ino, &parameter, &entry))
            }
            Child::Name => {
                let Some(special) = names::parse_special(segment) else {
                    let name = names::child_name(&parent.name, segment)?;
                    return self.lookup_name(parent_ino, &parent.name, &name).await;
                };
                // A real parameter wins over a view (Secrets Manager's names
                // may hold `@`); SSM's names cannot, so no call is made for them.
                if let Ok(name) = names::child_name(&parent.name, segment) {
                    let entry = self.value(&name).await?;
                    if let Some(parameter) = entry.parameter().cloned() {
                        let ino = self
                            .superblock
                            .inodes()
                            .remember(parent_ino, &name, Role::File);
                        return Ok(self.file_entry(ino, &parameter, &entry));
                    }
                }
                self.lookup_special(parent_ino, &parent.name, special?)
                    .await
            }
        }
    }

    async fn lookup_name(
        self: &Arc<Self>,
        parent_ino: u64,
        parent: &str,
        name: &str,
    ) -> Result<Entry, FsError> {
        match self.resolve(parent, name).await? {
            Resolved::Dir(validity) => {
                let ino = self
                    .superblock
                    .inodes()
                    .remember(parent_ino, name, Role::Dir);
                Ok(self.attrs.dir(ino, validity.kernel_ttl(Instant::now())))
            }
            Resolved::UnlistedDir => {
                let ino = self
                    .superblock
                    .inodes()
                    .remember(parent_ino, name, Role::Dir);
                Ok(self.attrs.dir(ino, self.config.cache.negative_ttl))
            }
            Resolved::File(parameter, validity) => {
                let ino = if *parameter.name == *name {
                    self.superblock.inodes().remember_shared(
                        parent_ino,
                        &parameter.name,
                        Role::File,
                    )
                } else {
                    self.superblock
                        .inodes()
                        .remember(parent_ino, name, Role::File)
                };
                self.superblock
                    .inodes()
                    .set_reported_version(ino, Some(parameter.version));
                Ok(self.attrs.file(ino, &parameter, &validity))
            }
            Resolved::Missing => Err(FsError::NotFound),
            Resolved::Denied if self.listed_as_file(parent, name) => {
                let ino = self
                    .superblock
                    .inodes()
                    .remember(parent_ino, name, Role::File);
                Ok(self
                    .attrs
                    .unreadable_file(ino, self.config.cache.negative_ttl))
            }
            Resolved::Denied => Err(FsError::AccessDenied {
                name: name.to_string(),
            }),
        }
    }

    /// Whether the cached listing of `parent` names `name` as a parameter.
    fn listed_as_file(&self, parent: &str, name: &str) -> bool {
        self.superblock
            .cache()
            .dir(parent)
            .is_some_and(|d| d.children.get(names::base_name(name)) == Some(&ChildKind::File))
    }

    pub async fn getattr(self: &Arc<Self>, ino: u64) -> Result<Entry, FsError> {
        if ino == STREAM_DIR_INO {
            return Ok(self.attrs.dir(ino, Duration::ZERO));
        }
        if is_stream_ino(ino) {
            return Ok(self.attrs.stream(ino));
        }
        let node = self.node(ino)?;
        if node.role.is_dir() {
            // A directory's existence is revalidated by lookup; its attributes never change.
            return Ok(self.attrs.dir(ino, self.config.cache.ttl));
        }
        if node.role == Role::Field {
            return self.getattr_field(&node).await;
        }
        let entry = self.value(&node.name).await?;
        if matches!(entry.known, Known::Denied) {
            // Found by a lookup, so a listing names it (see `lookup_name`).
            return Ok(self
                .attrs
                .unreadable_file(ino, self.config.cache.negative_ttl));
        }
        let parameter = self.present(&entry, &node.name)?;
        Ok(self.file_entry(ino, &parameter, &entry))
    }

    pub async fn read(
        self: &Arc<Self>,
        ino: u64,
        offset: u64,
        size: u32,
    ) -> Result<ReadData, FsError> {
        let node = self.node(ino)?;
        if node.role.is_dir() {
            return Err(FsError::IsDirectory);
        }
        if node.role == Role::Field {
            return self.read_field(&node, offset, size).await;
        }
        let entry = self.value(&node.name).await?;
        let current = self.present(&entry, &node.name)?;
        let parameter = self.superblock.version_for_read(&node, &entry, current);
        let len = parameter.value.len();
        Ok(ReadData::new(
            ReadSource::Value(parameter),
            len,
            offset,
            size,
        ))
    }

    /// Lists the directory once and keeps that listing for the handle's life,
    /// so offsets stay stable while the directory is read. Every entry carries
    /// the inode number a lookup of it gives.
    pub async fn opendir(self: &Arc<Self>, ino: u64) -> Result<u64, FsError> {
        let items = self.dir_items(ino).await?;
        Ok(self.new_dir_handle(items))
    }

    /// Lists `ino` again under `handle`, a handle an earlier daemon of this
    /// mount gave the kernel: its offsets stay valid, as listings are sorted.
    pub async fn reopen_dir(self: &Arc<Self>, ino: u64, handle: u64) -> Result<(), FsError> {
        let items = self.dir_items(ino).await?;
        self.dir_handles
            .open
            .lock()
            .unwrap()
            .insert(handle, Arc::new(items));
        Ok(())
    }

    async fn dir_items(self: &Arc<Self>, ino: u64) -> Result<Vec<DirItem>, FsError> {
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
        if node.role == Role::View {
            items.extend(
                self.view_items(&node)
                    .await?
                    .into_iter()
                    .map(|(name, ino)| DirItem {
                        ino,
                        kind: FileKind::File,
                        name,
                    }),
            );
            return Ok(items);
        }
        if let Some(areas) = self.superblock.layout().root_items(&node) {
            items.extend(areas.iter().map(|area| DirItem {
                ino: self.superblock.inodes().number(&area.prefix, Role::Area),
                kind: FileKind::Dir,
                name: area.folder.clone(),
            }));
            return Ok(items);
        }
        let listing = self.listing(&node.name).await?;
        if self.superblock.layout().shows_own_value(&node)
            && self.has_own_value(&node.name, &listing).await
        {
            items.push(DirItem {
                ino: self
                    .superblock
                    .inodes()
                    .number(&node.name, Role::ShadowedValue),
                kind: FileKind::File,
                name: SHADOWED_VALUE_NAME.into(),
            });
        }
        for (child, kind) in listing
            .children
            .iter()
            .filter(|(child, _)| self.superblock.layout().admits(&node, child))
        {
            let (role, kind) = match kind {
                ChildKind::Dir => (Role::Dir, FileKind::Dir),
                ChildKind::File => (Role::File, FileKind::File),
            };
            items.push(DirItem {
                ino: self
                    .superblock
                    .inodes()
                    .number(&names::join(&node.name, child), role),
                kind,
                name: child.to_string(),
            });
        }
        Ok(items)
    }

    /// Whether the directory `path` is itself a parameter (shown as `@value`).
    async fn has_own_value(self: &Arc<Self>, path: &str, listing: &DirEntry) -> bool {
        // An expired entry older than the listing says nothing: the
        // directory may have gained (or lost) its value since.
        let now = Instant::now();
        let cached =
            self.superblock.cache().value(path).filter(|e| {
                e.validity.is_fresh(now) || e.validity.fetched >= listing.validity.fetched
            });
        match cached {
            Some(entry) => entry.parameter().is_some(),
            None => match listing.own_parameter {
                Some(known) => known,
                // Unknown: one GetParameter, the "+1" of a listing's cost.
                None => self
                    .value(path)
                    .await
                    .is_ok_and(|e| e.parameter().is_some()),
            },
        }
    }

    fn new_dir_handle(&self, items: Vec<DirItem>) -> u64 {
        let handle = self.dir_handles.next.fetch_add(1, Ordering::Relaxed);
        self.dir_handles
            .open
            .lock()
            .unwrap()
            .insert(handle, Arc::new(items));
        handle
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
            .open
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
        self.dir_handles.open.lock().unwrap().remove(&handle);
    }

    pub fn forget(&self, ino: u64, count: u64) {
        // A stream ends when its last reader closes it (its writer sees that).
        if is_stream_ino(ino) {
            return;
        }
        self.superblock.inodes().forget(ino, count);
    }

    /// Drops every cached answer, here and in the kernel (SIGHUP).
    pub fn drop_caches(&self) {
        self.superblock.drop_caches();
    }

    // ----- nodes and values -----

    pub(super) fn node(&self, ino: u64) -> Result<Node, FsError> {
        self.superblock
            .inodes()
            .get(ino)
            .ok_or(FsError::UnknownInode(ino))
    }

    fn dir_node(&self, ino: u64) -> Result<Node, FsError> {
        let node = self.node(ino)?;
        if !node.role.is_dir() {
            return Err(FsError::NotDirectory);
        }
        Ok(node)
    }

    /// The parameter of a value entry, or why there is none.
    pub(super) fn present(
        &self,
        entry: &ValueEntry,
        name: &str,
    ) -> Result<Arc<Parameter>, FsError> {
        match &entry.known {
            Known::Present(parameter) => Ok(parameter.clone()),
            Known::Absent => Err(FsError::NotFound),
            Known::Denied => Err(FsError::AccessDenied {
                name: name.to_string(),
            }),
        }
    }

    pub(super) fn file_entry(&self, ino: u64, parameter: &Parameter, entry: &ValueEntry) -> Entry {
        self.superblock
            .inodes()
            .set_reported_version(ino, Some(parameter.version));
        self.attrs.file(ino, parameter, &entry.validity)
    }

    /// The cached value of `name`, fetched if missing or expired, served stale
    /// through an outage.
    pub(super) async fn value(self: &Arc<Self>, name: &str) -> Result<ValueEntry, FsError> {
        let now = Instant::now();
        let cached = self.superblock.cache().value(name);
        if let Some(entry) = cached.as_ref().filter(|e| e.validity.is_fresh(now)) {
            Metrics::inc(&self.metrics.cache_hits);
            self.refresh_if_due(&cached, name);
            return Ok(entry.clone());
        }
        // While SSM keeps failing, an expired value is served as it is and
        // retried with the next refresh batch, not by a call of its own.
        if let Some(entry) = cached.as_ref().filter(|e| {
            self.superblock.in_outage()
                && e.parameter().is_some()
                && e.validity.may_serve_stale(now)
        }) {
            self.retry_later(name);
            return Ok(entry.clone());
        }
        Metrics::inc(&self.metrics.cache_misses);
        match self.fetch_value(name).await {
            Ok(entry) => Ok(entry),
            Err(error) if error.is_outage() => {
                match cached.filter(|e| e.validity.may_serve_stale(now)) {
                    Some(entry) => {
                        self.superblock.note_stale(name, &error);
                        Ok(entry)
                    }
                    None => Err(error.into()),
                }
            }
            Err(error) => Err(error.into()),
        }
    }

    /// One GetParameter (or a GetParameters that also refreshes values due
    /// soon), shared by every concurrent caller for the name.
    pub(super) async fn fetch_value(
        self: &Arc<Self>,
        name: &str,
    ) -> Result<ValueEntry, StoreError> {
        self.superblock
            .value_flights()
            .run(name.to_string(), || async {
                if let Some(fetched) = self.fetch_with_companions(name).await {
                    return fetched;
                }
                let entry = self
                    .superblock
                    .record_value(name, self.get_known(name).await?);
                if !crate::store::resilient::is_background() {
                    // Fetched for a reader: worth one refresh, even if the next
                    // reads are answered by the kernel and never seen here.
                    self.superblock.cache().mark_read(name);
                }
                Ok(entry)
            })
            .await
    }

    /// One GetParameter, as what it says about the name; errors are the
    /// ones that say nothing about it (an outage, a rejected request).
    pub(super) async fn get_known(&self, name: &str) -> Result<Known, StoreError> {
        match self.store.get(name).await {
            Ok(parameter) => {
                self.superblock.note_answer();
                Ok(Known::Present(Arc::new(parameter)))
            }
            Err(StoreError::NotFound) => Ok(Known::Absent),
            Err(StoreError::AccessDenied { .. }) => Ok(Known::Denied),
            Err(error) => Err(error),
        }
    }
}
