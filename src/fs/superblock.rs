//! The superblock: the one owner of what the core knows about names. It holds
//! the cache (values and listings), the inode table (the names the kernel
//! holds), the single-flight maps (the calls under way), the refreshes under
//! way, the outage backoff and the invalidation channel to the kernel, so
//! recording an answer is one call: `record_value` caches a value, tells the
//! kernel what it must forget (the file, its views, or the entry in its
//! parent) and announces the change to the streams, in that order;
//! `record_listing` does the same for a page of names; `note_stale` extends
//! what may be served through an outage; `version_for_read` picks the version
//! a read serves.
//!
//! Model (after mountpoint-s3's superblock): the request handlers (`Fs`) decide
//! what to ask the store and when; the superblock only records what the store
//! answered and keeps the cache, the inodes and the kernel consistent with it.
//! It never calls the store, so every path that learns something (a reader's
//! fetch, a listing, a background refresh, a change event) records it the same
//! way.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::cache::{Cache, Change, ChildKind, DirEntry, Known, Resume, SingleFlight, ValueEntry};
use super::change_streams::{ChangeKind, ChangeNote, Streams};
use super::inode::{InodeTable, Node, Role, ROOT_INO};
use super::layout::Layout;
use super::views;
use crate::config::FsConfig;
use crate::metrics::Metrics;
use crate::names::{self, View};
use crate::store::{Parameter, StoreError, MAX_BATCH};

/// While SSM is failing, a stale entry is served this long before the next
/// attempt to refresh it, so readers are not each held up by a failing call;
/// doubled for each further failure in a row (see `outage_recheck`).
pub(super) const STALE_RECHECK: Duration = Duration::from_secs(10);

/// The kinds of listing call that run once for all concurrent askers of a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum ListingFlight {
    Probe,
    Whole,
    Extend,
}

/// What the kernel must forget, sent to whoever owns the FUSE notifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// Drop the inode's cached attributes and data.
    Inode(u64),
    /// Drop the directory entry `name` in `parent`.
    Entry { parent: u64, name: String },
    /// Tell the change streams, once the invalidations sent before it are
    /// done: a reader acting on the line then reads the new value.
    Announce(ChangeNote),
}

/// Paths remembered as logged for a refused decryption: a handful in
/// practice; past this many the oldest may be logged again.
const UNDECRYPTABLE_PATHS_LOGGED: usize = 1024;

pub(super) struct Superblock {
    cache: Cache,
    inodes: InodeTable,
    layout: Layout,
    metrics: Arc<Metrics>,
    value_flights: SingleFlight<String, Result<ValueEntry, StoreError>>,
    dir_flights: SingleFlight<(String, ListingFlight), Result<DirEntry, StoreError>>,
    /// Names a refresh is under way for (at most a few batches' worth).
    refreshing: Mutex<HashSet<Arc<str>>>,
    invalidations: mpsc::UnboundedSender<Invalidation>,
    /// The change streams readers have open (`@changes`).
    streams: Streams,
    /// SSM failures (outages, throttling) in a row, for backing off.
    failures_in_a_row: AtomicU32,
    batches_refusal_logged: AtomicBool,
    /// Paths whose listing SSM would not decrypt, logged once each.
    undecryptable_logged: Mutex<lru::LruCache<String, ()>>,
}

impl Superblock {
    /// A superblock over `inodes` (empty, or restored from an earlier daemon
    /// of the mount), and the receiving end of its invalidations.
    pub(super) fn new(
        config: &FsConfig,
        metrics: Arc<Metrics>,
        inodes: InodeTable,
    ) -> (Self, mpsc::UnboundedReceiver<Invalidation>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let superblock = Superblock {
            cache: Cache::new(config.cache.clone(), metrics.clone()),
            inodes,
            layout: Layout::new(config),
            metrics,
            value_flights: SingleFlight::default(),
            dir_flights: SingleFlight::default(),
            refreshing: Mutex::new(HashSet::new()),
            invalidations: sender,
            streams: Streams::new(),
            failures_in_a_row: AtomicU32::new(0),
            batches_refusal_logged: AtomicBool::new(false),
            undecryptable_logged: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(UNDECRYPTABLE_PATHS_LOGGED).unwrap(),
            )),
        };
        (superblock, receiver)
    }

    pub(super) fn cache(&self) -> &Cache {
        &self.cache
    }

    pub(super) fn inodes(&self) -> &InodeTable {
        &self.inodes
    }

    pub(super) fn layout(&self) -> &Layout {
        &self.layout
    }

    pub(super) fn streams(&self) -> &Streams {
        &self.streams
    }

    /// GetParameter calls under way, one per name.
    pub(super) fn value_flights(&self) -> &SingleFlight<String, Result<ValueEntry, StoreError>> {
        &self.value_flights
    }

    /// Listing calls under way, one per path and kind.
    pub(super) fn dir_flights(
        &self,
    ) -> &SingleFlight<(String, ListingFlight), Result<DirEntry, StoreError>> {
        &self.dir_flights
    }

    /// Marks `name` as being refreshed; false if it already is.
    pub(super) fn start_refresh(&self, name: &Arc<str>) -> bool {
        self.refreshing.lock().unwrap().insert(name.clone())
    }

    /// SSM refused GetParameters: remembered (refreshes go name by name for
    /// a while) and logged once.
    pub(super) fn refuse_batches(&self) {
        self.cache.refuse_batches();
        if !self.batches_refusal_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "SSM denied GetParameters (ssm:GetParameters not granted, or one of the names is denied); refreshing values one GetParameter each"
            );
        }
    }

    /// Drops every cached answer, here and in the kernel (SIGHUP).
    pub(super) fn drop_caches(&self) {
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

    /// Serve the version whose size the kernel holds, so a read never mixes or
    /// truncates two versions; if that one is gone, serve the new one whole and
    /// make the kernel fetch its size again.
    pub(super) fn version_for_read(
        &self,
        node: &Node,
        entry: &ValueEntry,
        current: Arc<Parameter>,
    ) -> Arc<Parameter> {
        match node.reported_version {
            Some(version) if version != current.version => {
                match entry.previous.clone().filter(|p| p.version == version) {
                    Some(previous) => previous,
                    None => {
                        self.send(Invalidation::Inode(node.ino));
                        self.inodes
                            .set_reported_version(node.ino, Some(current.version));
                        current
                    }
                }
            }
            _ => current,
        }
    }

    pub(super) fn note_stale(&self, name: &str, error: &StoreError) {
        self.note_stale_for(name, error, self.outage_recheck());
    }

    /// Serves `name`'s cached answers until `recheck` from now.
    pub(super) fn note_stale_for(&self, name: &str, error: &StoreError, recheck: Duration) {
        Metrics::inc(&self.metrics.stale_serves);
        self.cache
            .extend_stale_dir(names::parent_name(name), recheck);
        self.cache.extend_stale_dir(name, recheck);
        if self.cache.extend_stale_value(name, recheck) {
            tracing::warn!(parameter = name, %error, "SSM is not answering; serving the cached answer past its TTL");
        }
    }

    pub(super) fn record_value(&self, name: &str, known: Known) -> ValueEntry {
        if matches!(known, Known::Denied) {
            let already = self
                .cache
                .value(name)
                .is_some_and(|e| matches!(e.known, Known::Denied));
            if !already {
                tracing::warn!(
                    parameter = name,
                    "SSM denied access to this parameter (IAM or KMS); answering EACCES"
                );
            }
        }
        let (change, entry) = self.cache.put_value(name, known);
        match change {
            Change::None => {}
            Change::NewVersion => {
                for role in [Role::File, Role::ShadowedValue] {
                    if let Some(ino) = self.inodes.find(name, role) {
                        self.send(Invalidation::Inode(ino));
                    }
                }
                if let Some(old) = &entry.previous {
                    self.invalidate_views(name, old);
                }
            }
            Change::Appeared | Change::Disappeared => {
                for parent in self.dir_inodes(names::parent_name(name)) {
                    self.send(Invalidation::Entry {
                        parent,
                        name: names::base_name(name).to_string(),
                    });
                }
            }
        }
        // After the invalidations: a stream reader who reacts to the line at
        // once must find the kernel's old copy gone (see `Invalidation::Announce`).
        match (&change, &entry.known) {
            (Change::NewVersion | Change::Appeared, Known::Present(parameter)) => {
                self.publish_change(name, ChangeKind::Version(parameter.version));
            }
            (Change::Disappeared, Known::Absent) => self.publish_change(name, ChangeKind::Deleted),
            _ => {}
        }
        entry
    }

    /// Tells the change streams about `note` once the kernel has dropped
    /// what it replaces: behind the invalidations already sent.
    pub(super) fn announce(&self, note: ChangeNote) {
        if let Err(mpsc::error::SendError(Invalidation::Announce(note))) =
            self.invalidations.send(Invalidation::Announce(note))
        {
            // No kernel to tell (the core without a mount): announce now.
            self.streams.publish(note);
        }
    }

    pub(super) fn send(&self, invalidation: Invalidation) {
        Metrics::inc(&self.metrics.invalidations);
        // The receiver is gone only during shutdown, when nothing needs telling.
        let _ = self.invalidations.send(invalidation);
    }

    /// How far ahead of their own refresh point values join a batch.
    fn refresh_horizon(&self) -> Duration {
        self.cache.config().ttl / 4
    }

    /// Read values due within the refresh horizon to fill a GetParameters
    /// of `names` up to ten, none of them already being refreshed; marked as
    /// being refreshed (`release` them after the call). None while SSM
    /// refuses GetParameters.
    pub(super) fn take_companions(&self, names: &[Arc<str>]) -> Vec<Arc<str>> {
        let room = MAX_BATCH.saturating_sub(names.len());
        if room == 0 || self.cache.batches_refused(Instant::now()) {
            return Vec::new();
        }
        let mut refreshing = self.refreshing.lock().unwrap();
        let companions =
            self.cache
                .due_for_refresh(Instant::now(), self.refresh_horizon(), room, |other| {
                    names.iter().any(|n| &**n == other) || refreshing.contains(other)
                });
        refreshing.extend(companions.iter().cloned());
        companions
    }

    /// Names whose refresh is over.
    pub(super) fn release(&self, names: &[Arc<str>]) {
        let mut refreshing = self.refreshing.lock().unwrap();
        for name in names {
            refreshing.remove(name);
        }
    }

    /// Whether SSM's last answer was a failure (throttling or an outage).
    pub(super) fn in_outage(&self) -> bool {
        self.failures_in_a_row.load(Ordering::Relaxed) > 0
    }

    /// SSM answered: the next failure starts the backoff afresh.
    pub(super) fn note_answer(&self) {
        self.failures_in_a_row.store(0, Ordering::Relaxed);
    }

    /// How long to serve stale answers before asking SSM again, after one more
    /// failure: 10 s, doubled per failure in a row, at most the TTL, +-25%.
    pub(super) fn outage_recheck(&self) -> Duration {
        let failures = self
            .failures_in_a_row
            .fetch_add(1, Ordering::Relaxed)
            .min(16);
        let backoff = STALE_RECHECK
            .saturating_mul(1 << failures)
            .min(self.cache.config().ttl.max(STALE_RECHECK));
        backoff.mul_f64(rand::thread_rng().gen_range(0.75..1.25))
    }

    /// Caches the values just fetched, the listing of `path` (every name seen
    /// below it; complete unless SSM gave a next token) and, when complete, the
    /// listing of every directory below it.
    pub(super) fn record_listing(
        &self,
        path: &str,
        names: Vec<Arc<str>>,
        fetched: Vec<Parameter>,
        next_token: Option<String>,
    ) -> DirEntry {
        let complete = next_token.is_none();
        // A partial listing says nothing complete about subdirectories.
        let mut tree = names::tree_below(path, names.iter().map(|n| &**n), complete);
        for parameter in fetched {
            let name = parameter.name.clone();
            self.record_value(&name, Known::Present(Arc::new(parameter)));
        }
        let own = tree.remove(path).unwrap_or_default();
        if complete {
            let parameters: HashSet<&str> = names.iter().map(|n| &**n).collect();
            for (dir, children) in tree {
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

    pub(super) fn record_dir(
        &self,
        path: &str,
        children: BTreeMap<Box<str>, ChildKind>,
        resume: Option<Resume>,
        own_parameter: Option<bool>,
    ) -> DirEntry {
        let complete = resume.is_none();
        // What an earlier listing knew of the path's own value holds only
        // while that listing is fresh: past its TTL the path may have gained
        // (or lost) a value, and `@value` must not stay hidden (or shown).
        let now = Instant::now();
        let own_parameter = own_parameter.or_else(|| {
            self.cache
                .dir(path)
                .filter(|d| d.validity.is_fresh(now))
                .and_then(|d| d.own_parameter)
        });
        if complete {
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
                for parent in self.dir_inodes(path) {
                    for name in changed.clone() {
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

    /// The inodes the kernel holds for the directory `path` (a plain
    /// directory, an area folder, or both).
    pub(super) fn dir_inodes(&self, path: &str) -> impl Iterator<Item = u64> + Clone {
        [Role::Dir, Role::Area]
            .into_iter()
            .filter_map(|role| self.inodes.find(path, role))
            .collect::<Vec<_>>()
            .into_iter()
    }

    /// Logs once (while remembered) that a page below `path` could not be
    /// decrypted: its names are listed, and its values read one by one (the
    /// refused one then answers EACCES, and is logged by name). Listings are
    /// recursive, so a directory above or below a path already logged is the
    /// same refusal seen again: not logged.
    pub(super) fn note_undecryptable_page(&self, path: &str) {
        let related = |logged: &str| {
            names::relative_to(logged, path).is_some()
                || names::relative_to(path, logged).is_some()
                || logged == path
        };
        let first = {
            let mut logged = self.undecryptable_logged.lock().unwrap();
            let seen = logged.iter().any(|(other, _)| related(other));
            logged.put(path.to_string(), ());
            !seen
        };
        if first {
            tracing::warn!(
                path,
                "SSM refused to decrypt a listing page below this path (a parameter under a KMS key this role may not use): listing its names without values; that parameter answers EACCES"
            );
        }
    }

    /// Makes the kernel look `name` up again at its next use.
    pub(super) fn drop_kernel_entry(&self, name: &str) {
        for parent in self.dir_inodes(names::parent_name(name)) {
            self.send(Invalidation::Entry {
                parent,
                name: names::base_name(name).to_string(),
            });
        }
    }

    /// Tells the kernel to drop the views of `name` (its value changed):
    /// each view's fields of the version it showed.
    pub(super) fn invalidate_views(&self, name: &str, old: &Parameter) {
        for view in [View::Json, View::Conn] {
            let view_name = format!("{name}{}", view.suffix());
            let Some(view_ino) = self.inodes.find(&view_name, Role::View) else {
                continue;
            };
            self.send(Invalidation::Inode(view_ino));
            for (key, _) in views::fields(view, old.value.expose()).unwrap_or_default() {
                if let Some(ino) = self.inodes.find(&format!("{view_name}/{key}"), Role::Field) {
                    self.send(Invalidation::Inode(ino));
                }
                self.send(Invalidation::Entry {
                    parent: view_ino,
                    name: key,
                });
            }
        }
    }

    /// Records what changed about `name` for the streams.
    pub(super) fn publish_change(&self, name: &str, kind: ChangeKind) {
        if crate::names::has_selector(name) {
            return;
        }
        for path in self.layout.mount_paths(name) {
            self.announce(ChangeNote {
                path: path.into(),
                kind: kind.clone(),
            });
        }
    }
}
