//! The bounded cache of what SSM told us, and single-flight for what it has not.
//!
//! Three LRU maps keyed by SSM name: `values` (a parameter, the fact that it
//! does not exist, or that we may not read it), `dirs` (the children below a
//! path: complete when a whole recursive listing was read, partial when only a
//! first page was) and `notes` (short-lived facts about a path that are
//! neither: SSM refused to list it, and how many names below it were probed
//! one by one). All three are bounded, so no stream of distinct names grows
//! memory without limit. Every entry carries when it was fetched, when it expires (TTL,
//! or the shorter negative TTL), when it should be refreshed ahead of expiry
//! (jittered, so a fleet does not refresh in lockstep) and until when it may be
//! served stale while SSM is failing. Values are bounded by count and bytes,
//! listings by count; the least recently used entry goes first. The previous
//! version of a rotated value is kept beside the new one so a reader that was
//! told the old size can still be given the old bytes whole.
//!
//! This module knows nothing of inodes or of the store: it only remembers.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lru::LruCache;
use rand::Rng;
use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::config::CacheConfig;
use crate::metrics::Metrics;
use crate::store::Parameter;

/// How long a pinned version (`NAME:3`) is trusted: as long as an entry's
/// offsets can say (about 49 days); the LRU bounds still evict it.
const PINNED_TTL: Duration = Duration::from_millis(u32::MAX as u64 / 2);

/// What is known about one name as a parameter.
#[derive(Debug, Clone)]
pub enum Known {
    Present(Arc<Parameter>),
    Absent,
    /// SSM refused (IAM or KMS); remembered briefly so a retrying reader does
    /// not turn into a stream of denied calls.
    Denied,
}

pub use crate::names::ChildKind;

/// Timing shared by both kinds of entry: the fetch time and three offsets from
/// it in milliseconds (32 bytes instead of four 16-byte instants, which matters
/// at 100,000 entries; offsets saturate at 49 days, far beyond any useful TTL).
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub fetched: Instant,
    refresh_after_ms: u32,
    expires_after_ms: u32,
    stale_after_ms: u32,
    /// Set once a stale serve of this entry has been logged (it fits in the
    /// padding here; in the entry it would cost 8 bytes).
    pub stale_logged: bool,
    /// Set when a reader used the entry since it was fetched: only such
    /// entries are refreshed ahead of expiry (keys nobody reads lapse).
    pub read_since_fetch: bool,
}

fn millis(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

impl Validity {
    pub fn new(
        fetched: Instant,
        refresh_in: Duration,
        expires_in: Duration,
        stale_in: Duration,
    ) -> Self {
        Self {
            fetched,
            refresh_after_ms: millis(refresh_in),
            expires_after_ms: millis(expires_in),
            stale_after_ms: millis(stale_in),
            stale_logged: false,
            read_since_fetch: false,
        }
    }

    fn at(&self, offset_ms: u32) -> Instant {
        self.fetched + Duration::from_millis(offset_ms.into())
    }

    pub fn refresh_at(&self) -> Instant {
        self.at(self.refresh_after_ms)
    }

    pub fn expires(&self) -> Instant {
        self.at(self.expires_after_ms)
    }

    pub fn stale_until(&self) -> Instant {
        self.at(self.stale_after_ms)
    }

    /// The wall-clock time of the fetch (to compare with events' times).
    pub fn fetched_at(&self) -> std::time::SystemTime {
        std::time::SystemTime::now() - self.fetched.elapsed()
    }

    pub fn is_fresh(&self, now: Instant) -> bool {
        now < self.expires()
    }

    pub fn may_serve_stale(&self, now: Instant) -> bool {
        now < self.stale_until()
    }

    pub fn wants_refresh(&self, now: Instant) -> bool {
        now >= self.refresh_at()
    }

    /// While SSM is out: trust the entry again until `recheck_at` (never past
    /// its stale limit), then ask once more.
    fn recheck_at(&mut self, recheck_at: Instant) {
        let until =
            millis(recheck_at.saturating_duration_since(self.fetched)).min(self.stale_after_ms);
        self.expires_after_ms = until;
        self.refresh_after_ms = until;
    }

    /// How long the kernel may keep this answer: up to the refresh point, so
    /// the next question after it reaches us while the entry is still valid.
    pub fn kernel_ttl(&self, now: Instant) -> Duration {
        let until = if now < self.refresh_at() {
            self.refresh_at()
        } else {
            self.expires()
        };
        until.saturating_duration_since(now)
    }
}

#[derive(Debug, Clone)]
pub struct ValueEntry {
    pub known: Known,
    /// The version this entry replaced, kept for readers mid-rotation.
    pub previous: Option<Arc<Parameter>>,
    pub validity: Validity,
}

impl ValueEntry {
    fn bytes(&self, name: &str) -> usize {
        let value_len = |p: &Arc<Parameter>| p.value.len() + p.name.len();
        name.len()
            + self.previous.as_ref().map_or(0, value_len)
            + match &self.known {
                Known::Present(p) => value_len(p),
                _ => 0,
            }
    }

    pub fn parameter(&self) -> Option<&Arc<Parameter>> {
        match &self.known {
            Known::Present(p) => Some(p),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct DirEntry {
    /// True when every parameter below the path was listed.
    pub complete: bool,
    pub children: Arc<BTreeMap<Box<str>, ChildKind>>,
    pub validity: Validity,
    /// For a partial listing: where the next page starts and the names seen so
    /// far, so a full listing continues instead of reading page one again.
    pub resume: Option<Resume>,
    /// Whether the path is itself a parameter (shadowed: shown as `@value`),
    /// when a listing of its parent said so.
    pub own_parameter: Option<bool>,
}

#[derive(Debug, Clone)]
pub struct Resume {
    pub next_token: String,
    pub names: Arc<Vec<Arc<str>>>,
}

impl DirEntry {
    pub fn is_dir(&self) -> bool {
        !self.children.is_empty()
    }
}

/// What replacing a value changed, so the caller can tell the kernel.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    None,
    NewVersion,
    Appeared,
    Disappeared,
}

/// What is known about a path besides its value and listing.
#[derive(Debug, Clone, Copy, Default)]
struct Note {
    /// SSM refused to list below the path (a role with GetParameter alone);
    /// not asked again before this instant: each refusal is a wasted call and
    /// an AccessDenied event in CloudTrail.
    refused_until: Option<Instant>,
    /// Names below the path resolved one by one since it was last listed.
    probes: u32,
    /// A lookup read the path's listing on without completing it (a large
    /// directory): until then, lookups there probe their own names instead
    /// of waiting for more pages.
    extended_until: Option<Instant>,
}

struct Inner {
    /// SSM refused GetParameters: refresh name by name until then.
    batches_refused_until: Option<Instant>,
    /// Keyed by the parameter's own name when present (one shared copy).
    values: LruCache<Arc<str>, ValueEntry>,
    value_bytes: usize,
    dirs: LruCache<String, DirEntry>,
    notes: LruCache<String, Note>,
}

pub struct Cache {
    inner: Mutex<Inner>,
    config: CacheConfig,
    metrics: Arc<Metrics>,
}

impl Cache {
    pub fn new(config: CacheConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Mutex::new(Inner {
                batches_refused_until: None,
                values: LruCache::unbounded(),
                value_bytes: 0,
                dirs: LruCache::unbounded(),
                notes: LruCache::unbounded(),
            }),
            config,
            metrics,
        }
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// Validity for an entry fetched now. Refresh is due after 80-90% of the
    /// TTL, drawn per entry, so refreshes spread out across entries and hosts.
    pub fn validity(&self, ttl: Duration) -> Validity {
        let fetched = Instant::now();
        let refresh_fraction = rand::thread_rng().gen_range(0.90..0.97);
        Validity::new(
            fetched,
            ttl.mul_f64(refresh_fraction),
            ttl,
            ttl + self.config.stale_ttl,
        )
    }

    fn ttl_for(&self, known: &Known) -> Duration {
        match known {
            Known::Present(_) => self.config.ttl,
            Known::Absent | Known::Denied => self.config.negative_ttl,
        }
    }

    pub fn value(&self, name: &str) -> Option<ValueEntry> {
        self.inner.lock().unwrap().values.get(name).cloned()
    }

    pub fn dir(&self, path: &str) -> Option<DirEntry> {
        self.inner.lock().unwrap().dirs.get(path).cloned()
    }

    /// Stores what SSM just said about `name`; returns what changed and the entry.
    pub fn put_value(&self, name: &str, known: Known) -> (Change, ValueEntry) {
        let ttl = match &known {
            // A version's value never changes: kept while memory allows.
            Known::Present(_) if crate::names::pins_version(name) => PINNED_TTL,
            _ => self.ttl_for(&known),
        };
        let validity = self.validity(ttl);
        let mut inner = self.inner.lock().unwrap();
        let old = inner.values.pop(name);
        let old_parameter = old.as_ref().and_then(|e| e.parameter().cloned());
        if let Some(old) = &old {
            inner.value_bytes -= old.bytes(name);
        }
        let (change, previous) = match (&old_parameter, &known) {
            (Some(old), Known::Present(new)) if old.version != new.version => {
                (Change::NewVersion, Some(old.clone()))
            }
            (Some(_), Known::Present(_)) => (Change::None, old.and_then(|e| e.previous)),
            (Some(_), _) => (Change::Disappeared, None),
            (None, Known::Present(_)) if old.is_some() => (Change::Appeared, None),
            _ => (Change::None, None),
        };
        let entry = ValueEntry {
            known,
            previous,
            validity,
        };
        inner.value_bytes += entry.bytes(name);
        let key = match entry.parameter() {
            Some(parameter) if &*parameter.name == name => parameter.name.clone(),
            _ => Arc::from(name),
        };
        inner.values.put(key, entry.clone());
        self.enforce_bounds(&mut inner);
        (change, entry)
    }

    /// The cached `NAME:LABEL` entries of `base` (a label moved): a scan, as
    /// label moves are rare.
    pub fn labelled_names(&self, base: &str) -> Vec<Arc<str>> {
        let inner = self.inner.lock().unwrap();
        inner
            .values
            .iter()
            .map(|(name, _)| name)
            .filter(|name| {
                name.strip_prefix(base)
                    .and_then(|rest| rest.strip_prefix(':'))
                    .is_some_and(|_| !crate::names::pins_version(name))
            })
            .cloned()
            .collect()
    }

    /// Notes that a reader used the value of `name` (see `due_for_refresh`).
    pub fn mark_read(&self, name: &str) {
        if let Some(entry) = self.inner.lock().unwrap().values.peek_mut(name) {
            entry.validity.read_since_fetch = true;
        }
    }

    /// Marks every present value at or below one of `prefixes` as read (an
    /// open change stream covers them), and returns the names whose refresh
    /// is due now, with the soonest refresh point of the others.
    pub fn keep_read_below(
        &self,
        prefixes: &[String],
        now: Instant,
    ) -> (Vec<Arc<str>>, Option<Instant>) {
        let below = |name: &str| {
            prefixes
                .iter()
                .any(|p| name == p || crate::names::relative_to(p, name).is_some())
        };
        let mut inner = self.inner.lock().unwrap();
        let mut due = Vec::new();
        let mut next: Option<Instant> = None;
        for (name, entry) in inner.values.iter_mut() {
            if entry.parameter().is_none() || crate::names::has_selector(name) || !below(name) {
                continue;
            }
            entry.validity.read_since_fetch = true;
            let at = entry.validity.refresh_at();
            if at <= now {
                due.push(name.clone());
            } else {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        (due, next)
    }

    /// Up to `limit` names of present values, read since they were fetched,
    /// whose refresh is due before `now + horizon`, soonest first, skipping
    /// `busy` ones: the names a refresh batch takes along.
    pub fn due_for_refresh(
        &self,
        now: Instant,
        horizon: Duration,
        limit: usize,
        busy: impl Fn(&str) -> bool,
    ) -> Vec<Arc<str>> {
        let inner = self.inner.lock().unwrap();
        let mut due: Vec<(Instant, &Arc<str>)> = inner
            .values
            .iter()
            .filter(|(_, e)| {
                e.parameter().is_some()
                    && e.validity.read_since_fetch
                    && e.validity.refresh_at() <= now + horizon
                    && e.validity.may_serve_stale(now)
            })
            .filter(|(name, _)| !busy(name) && !crate::names::has_selector(name))
            .map(|(name, e)| (e.validity.refresh_at(), name))
            .collect();
        due.sort_unstable_by_key(|(at, _)| *at);
        due.into_iter()
            .take(limit)
            .map(|(_, name)| name.clone())
            .collect()
    }

    /// Records that a refresh failed while SSM is out: keep serving the entry
    /// until `recheck_at` without asking again. Returns true the first time, so
    /// the caller logs one warning per entry, not one per read.
    pub fn extend_stale_value(&self, name: &str, recheck_in: Duration) -> bool {
        let mut inner = self.inner.lock().unwrap();
        let Some(entry) = inner.values.get_mut(name) else {
            return false;
        };
        entry.validity.recheck_at(Instant::now() + recheck_in);
        let first = !entry.validity.stale_logged;
        entry.validity.stale_logged = true;
        first
    }

    pub fn extend_stale_dir(&self, path: &str, recheck_in: Duration) {
        let mut inner = self.inner.lock().unwrap();
        if let Some(entry) = inner.dirs.get_mut(path) {
            entry.validity.recheck_at(Instant::now() + recheck_in);
        }
    }

    pub fn put_dir(
        &self,
        path: &str,
        complete: bool,
        children: BTreeMap<Box<str>, ChildKind>,
        resume: Option<Resume>,
        own_parameter: Option<bool>,
    ) -> DirEntry {
        let entry = DirEntry {
            complete,
            children: Arc::new(children),
            validity: self.validity(self.config.ttl),
            resume,
            own_parameter,
        };
        let mut inner = self.inner.lock().unwrap();
        if complete {
            if let Some(note) = inner.notes.peek_mut(path) {
                note.probes = 0;
            }
        }
        inner.dirs.put(path.to_string(), entry.clone());
        self.enforce_bounds(&mut inner);
        entry
    }

    /// Edits the children of `path`'s cached listing in place (a change event
    /// adds or removes one name). `None` when no listing of `path` is cached,
    /// else whether `edit` changed it.
    pub fn edit_listing(
        &self,
        path: &str,
        edit: impl FnOnce(&mut BTreeMap<Box<str>, ChildKind>) -> bool,
    ) -> Option<bool> {
        let mut inner = self.inner.lock().unwrap();
        let listing = inner.dirs.peek_mut(path)?;
        let mut children = listing.children.as_ref().clone();
        let changed = edit(&mut children);
        if changed {
            listing.children = Arc::new(children);
        }
        Some(changed)
    }

    /// Records that SSM refused to list `path`, for one TTL. Returns true when
    /// this is news (no refusal was on record), so the caller logs it once.
    pub fn refuse_listing(&self, path: &str) -> bool {
        let now = Instant::now();
        let until = now + self.config.ttl;
        self.update_note(path, |note| {
            let news = note.refused_until.is_none_or(|t| t <= now);
            note.refused_until = Some(until);
            news
        })
    }

    /// Records that SSM refused GetParameters, for the longer of the TTL and
    /// the stale TTL (an hour by default): IAM changes are rare, and asking
    /// again sooner would put an AccessDenied event in CloudTrail each time.
    pub fn refuse_batches(&self) {
        let until = Instant::now() + self.config.ttl.max(self.config.stale_ttl);
        self.inner.lock().unwrap().batches_refused_until = Some(until);
    }

    pub fn batches_refused(&self, now: Instant) -> bool {
        let inner = self.inner.lock().unwrap();
        inner.batches_refused_until.is_some_and(|until| now < until)
    }

    /// Whether SSM refused to list `path` within the last TTL.
    pub fn listing_refused(&self, path: &str, now: Instant) -> bool {
        self.note_holds(path, now, |note| note.refused_until)
    }

    /// Whether the deadline `until` reads from `path`'s note is still ahead.
    fn note_holds(
        &self,
        path: &str,
        now: Instant,
        until: impl Fn(&Note) -> Option<Instant>,
    ) -> bool {
        let mut inner = self.inner.lock().unwrap();
        inner
            .notes
            .get(path)
            .and_then(until)
            .is_some_and(|until| now < until)
    }

    /// How many names below `dir` were probed one by one since its last listing.
    pub fn probes_below(&self, dir: &str) -> u32 {
        let mut inner = self.inner.lock().unwrap();
        inner.notes.get(dir).map_or(0, |n| n.probes)
    }

    /// Records that a lookup read `dir`'s listing on and it is still not
    /// complete: for one TTL, lookups there do not wait for more pages.
    pub fn note_extended(&self, dir: &str) {
        let until = Instant::now() + self.config.ttl;
        self.update_note(dir, |note| note.extended_until = Some(until));
    }

    /// Whether a lookup read `dir`'s listing on within the last TTL.
    pub fn extended_lately(&self, dir: &str, now: Instant) -> bool {
        self.note_holds(dir, now, |note| note.extended_until)
    }

    /// Counts one more probe of a name below `dir`.
    pub fn count_probe(&self, dir: &str) {
        self.update_note(dir, |note| note.probes = note.probes.saturating_add(1));
    }

    fn update_note<T>(&self, path: &str, update: impl FnOnce(&mut Note) -> T) -> T {
        let mut inner = self.inner.lock().unwrap();
        let result = match inner.notes.get_mut(path) {
            Some(note) => update(note),
            None => {
                let mut note = Note::default();
                let result = update(&mut note);
                inner.notes.put(path.to_string(), note);
                result
            }
        };
        self.enforce_bounds(&mut inner);
        result
    }

    fn enforce_bounds(&self, inner: &mut Inner) {
        while inner.values.len() > self.config.max_entries
            || (inner.value_bytes > self.config.max_bytes && inner.values.len() > 1)
        {
            let Some((name, entry)) = inner.values.pop_lru() else {
                break;
            };
            inner.value_bytes -= entry.bytes(&name);
            Metrics::inc(&self.metrics.cache_evictions);
        }
        while inner.dirs.len() > self.config.max_entries {
            inner.dirs.pop_lru();
            Metrics::inc(&self.metrics.cache_evictions);
        }
        // Notes are hints: losing one costs at most a repeated call.
        while inner.notes.len() > self.config.max_entries {
            inner.notes.pop_lru();
        }
    }

    /// Forgets everything (SIGHUP): the next reads fetch fresh answers.
    pub fn clear(&self) {
        let mut inner = self.inner.lock().unwrap();
        inner.values.clear();
        inner.dirs.clear();
        inner.notes.clear();
        inner.batches_refused_until = None;
        inner.value_bytes = 0;
    }

    pub fn usage(&self) -> Usage {
        let inner = self.inner.lock().unwrap();
        Usage {
            values: inner.values.len(),
            dirs: inner.dirs.len(),
            notes: inner.notes.len(),
            value_bytes: inner.value_bytes,
        }
    }
}

/// How much the cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub values: usize,
    pub dirs: usize,
    pub notes: usize,
    pub value_bytes: usize,
}

/// Coalesces concurrent calls for one key: the first caller runs the call,
/// everyone who arrives while it runs waits for and shares its result.
pub struct SingleFlight<K, V> {
    calls: Mutex<HashMap<K, Arc<OnceCell<V>>>>,
}

impl<K: Hash + Eq + Clone, V: Clone> Default for SingleFlight<K, V> {
    fn default() -> Self {
        Self {
            calls: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> SingleFlight<K, V> {
    pub async fn run<F, Fut>(&self, key: K, call: F) -> V
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let cell = self
            .calls
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default()
            .clone();
        let result = cell.get_or_init(call).await.clone();
        let mut calls = self.calls.lock().unwrap();
        if calls
            .get(&key)
            .is_some_and(|current| Arc::ptr_eq(current, &cell))
        {
            calls.remove(&key);
        }
        result
    }
}

#[cfg(test)]
mod tests;
