//! Applying change events (see `crate::events`): which names to ask SSM about
//! again, and what the listings and the kernel must learn from the answers.
//!
//! An event about a name this host knows nothing of (no cached value, no
//! cached listing on its way up, no inode) costs nothing: the next read fetches
//! it anyway. Otherwise the name is fetched again, ten names to a
//! GetParameters, and the answer is recorded like any fetch: a new version
//! drops the kernel's pages and attributes (readers mid-read keep the version
//! they started with), a name that appeared joins the cached listings up to
//! the mount root, and one that vanished leaves them. Events cannot move a
//! name backwards: the answer always comes from SSM, never from the event.
//! An event whose change the cached answer already reflects (fetched after
//! it, allowing for whole-second event times and clock skew), or that was
//! already applied (same EventBridge id), costs nothing. Names whose fetch
//! fails because SSM is out stay pending and are fetched when it answers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::time::Instant;

use super::{Fs, Invalidation};
use crate::cache::ChildKind;
use crate::change::{Operation, ParameterEvent};
use crate::inode::Role;
use crate::metrics::Metrics;
use crate::names;
use crate::store::resilient::once_in_background;
use crate::store::{ParameterStore, StoreError, MAX_BATCH};

/// An event's `time` is in whole seconds, and hosts' clocks differ from
/// AWS's by a little: a cached answer fetched later than this after the
/// event's time already reflects the change.
const EVENT_TIME_SLACK: Duration = Duration::from_secs(3);
/// After a failed fetch for events, the next try is drawn from zero to this,
/// doubled per failure in a row up to `EVENT_RETRY_CAP` ("full jitter"): a
/// fleet that all got the same event and was throttled spreads its retries
/// over the quota instead of retrying in step.
const EVENT_RETRY_BASE: Duration = Duration::from_secs(2);
const EVENT_RETRY_CAP: Duration = Duration::from_secs(120);
/// A queue that answered within this long is live: one receive waits at
/// most 20 s, so a live listener answers at least three times in it.
const EVENTS_LIVE_WINDOW: Duration = Duration::from_secs(60);
/// How many recent event ids are remembered to drop redeliveries.
pub(super) const REMEMBERED_EVENT_IDS: usize = 4096;

/// Names waiting to be fetched again, each with its earliest event's time
/// (for the lag metric), and when to try again after an outage.
#[derive(Default)]
pub(super) struct PendingEvents {
    names: HashMap<Arc<str>, Option<SystemTime>>,
    retry_at: Option<Instant>,
    failures_in_a_row: u32,
}

impl PendingEvents {
    fn back_off(&mut self) {
        let ceiling = EVENT_RETRY_BASE
            .saturating_mul(1 << self.failures_in_a_row.min(16))
            .min(EVENT_RETRY_CAP);
        self.failures_in_a_row += 1;
        let wait = rand::thread_rng().gen_range(Duration::ZERO..=ceiling);
        self.retry_at = Some(Instant::now() + wait);
    }
}

impl<S: ParameterStore> Fs<S> {
    /// Notes what the events say changed and fetches what this host knows of.
    pub async fn apply_events(self: &Arc<Self>, events: Vec<ParameterEvent>) {
        for event in events {
            let names = self.names_to_fetch(&event);
            if names.is_empty() {
                Metrics::inc(&self.metrics.events_ignored);
                continue;
            }
            Metrics::inc(&self.metrics.events_applied);
            let mut pending = self.pending_events.lock().unwrap();
            for name in names {
                // The earliest known time of the changes waiting for a name.
                let time = pending.names.entry(name).or_insert(event.time);
                *time = match (*time, event.time) {
                    (Some(earlier), Some(this)) => Some(earlier.min(this)),
                    (known, other) => known.or(other),
                };
            }
        }
        self.retry_pending_events().await;
    }

    /// What `event` makes this host fetch: the name, or for a moved label
    /// the `NAME:LABEL` entries cached here (a label leaves the current value
    /// as it is); nothing for a redelivery, a name outside the mount, or a
    /// change that touches nothing cached here.
    fn names_to_fetch(&self, event: &ParameterEvent) -> Vec<Arc<str>> {
        if !self.remember_event(event) || !self.layout.covers(&event.name) {
            return Vec::new();
        }
        match event.operation {
            Operation::Label => self.cache.labelled_names(&event.name),
            _ if self.wants_change(event) => vec![Arc::from(event.name.as_str())],
            _ => Vec::new(),
        }
    }

    /// Records `event`'s id; false when it was applied already (a redelivery).
    fn remember_event(&self, event: &ParameterEvent) -> bool {
        let Some(id) = &event.id else {
            return true;
        };
        self.seen_event_ids
            .lock()
            .unwrap()
            .put(id.clone(), ())
            .is_none()
    }

    /// Whether a change of a name below the mount calls for a fetch here.
    fn wants_change(&self, event: &ParameterEvent) -> bool {
        let name = event.name.as_str();
        if !self.knows(name) {
            if event.operation == Operation::Create {
                // The kernel may remember that the name did not exist.
                self.drop_kernel_entry(name);
            }
            return false;
        }
        let already_current = self.cache.value(name).is_some_and(|entry| {
            event
                .time
                .is_some_and(|time| entry.validity.fetched_at() > time + EVENT_TIME_SLACK)
        });
        !already_current
    }

    /// Whether anything about `name` is cached here or held by the kernel.
    fn knows(&self, name: &str) -> bool {
        if self.cache.value(name).is_some()
            || [Role::File, Role::ShadowedValue, Role::Dir]
                .iter()
                .any(|role| self.inodes.find(name, *role).is_some())
        {
            return true;
        }
        let mut path = name;
        while self.layout.covers(path) {
            path = names::parent_name(path);
            if self.cache.dir(path).is_some() {
                return true;
            }
        }
        false
    }

    /// Fetches the names events asked for, ten to a call; while SSM is out,
    /// keeps them for later (after the outage backoff).
    pub async fn retry_pending_events(self: &Arc<Self>) {
        let batch: Vec<(Arc<str>, Option<SystemTime>)> = {
            let mut pending = self.pending_events.lock().unwrap();
            if pending.retry_at.is_some_and(|at| Instant::now() < at) {
                return;
            }
            pending.names.drain().collect()
        };
        let mut chunks = batch.chunks(MAX_BATCH);
        while let Some(chunk) = chunks.next() {
            let names: Vec<Arc<str>> = chunk.iter().map(|(name, _)| name.clone()).collect();
            match once_in_background(self.fetch_again(&names)).await {
                Ok(()) => {
                    for (name, time) in chunk {
                        if !names::has_selector(name) {
                            self.update_listings(name);
                        }
                        if let Some(time) = time {
                            let lag = SystemTime::now().duration_since(*time).unwrap_or_default();
                            self.metrics.event_lag(lag);
                        }
                    }
                }
                Err(error) => {
                    tracing::debug!(%error, "SSM is not answering; change events wait");
                    let mut pending = self.pending_events.lock().unwrap();
                    pending.back_off();
                    for (name, time) in chunk.iter().chain(chunks.flatten()) {
                        pending.names.entry(name.clone()).or_insert(*time);
                    }
                    return;
                }
            }
        }
        let mut pending = self.pending_events.lock().unwrap();
        pending.retry_at = None;
        pending.failures_in_a_row = 0;
    }

    /// The event queue answered a receive (`true`) or failed one. While it
    /// answers, a name a listing lacks is trusted absent for the listing's
    /// TTL, not the negative TTL: its creation would arrive as an event.
    pub fn note_queue_answered(&self, answered: bool) {
        let now = Instant::now();
        let mut live = self.events_live.lock().unwrap();
        *live = match *live {
            _ if !answered => None,
            Some((since, last)) if now < last + EVENTS_LIVE_WINDOW => Some((since, now)),
            _ => Some((now, now)),
        };
    }

    /// How long an answer fetched at `fetched` may say that a name does not
    /// exist: the negative TTL, or the TTL when change events have been live
    /// since before the fetch (a create after it arrives as an event; a
    /// queue that stops answering brings the negative TTL back at once).
    pub(super) fn absence_window(&self, fetched: Instant) -> Duration {
        let now = Instant::now();
        let cache = &self.config.cache;
        match *self.events_live.lock().unwrap() {
            Some((since, last)) if since <= fetched && now < last + EVENTS_LIVE_WINDOW => {
                cache.ttl.max(cache.negative_ttl)
            }
            _ => cache.negative_ttl,
        }
    }

    /// Names whose events wait for SSM.
    pub fn pending_event_names(&self) -> usize {
        self.pending_events.lock().unwrap().names.len()
    }

    /// One GetParameters for `names` (one GetParameter each where batches are
    /// refused). Only an outage is an error: the names wait for the next try.
    async fn fetch_again(&self, names: &[Arc<str>]) -> Result<(), StoreError> {
        // Selectors are never batched (see `names::has_selector`).
        let (mut one_by_one, plain): (Vec<Arc<str>>, Vec<Arc<str>>) = names
            .iter()
            .cloned()
            .partition(|name| names::has_selector(name));
        if !plain.is_empty() {
            match self.get_batch(&plain).await {
                Ok(()) => {}
                Err(error) if error.is_outage() => return Err(error),
                Err(_) => one_by_one.extend(plain), // refused or rejected
            }
        }
        for name in &one_by_one {
            let known = match self.get_known(name).await {
                Ok(known) => known,
                Err(error) if error.is_outage() => return Err(error),
                Err(error) => {
                    tracing::warn!(parameter = &**name, %error, "SSM rejected a fetch for a change event");
                    continue;
                }
            };
            self.record_value(name, known);
        }
        Ok(())
    }

    /// After a fetch for an event: the cached listings on the way up to the
    /// mount root gain or lose the name, and the kernel forgets what changed.
    fn update_listings(&self, name: &str) {
        let present = self
            .cache
            .value(name)
            .is_some_and(|entry| entry.parameter().is_some());
        self.drop_kernel_entry(name);
        if present {
            self.add_to_listings(name);
        } else {
            self.remove_from_listings(name);
        }
    }

    pub(super) fn add_to_listings(&self, name: &str) {
        let mut child = name;
        let mut kind = ChildKind::File;
        // Directories on the way up with no cached listing, each with the
        // name one level down.
        let mut unlisted: Vec<(&str, &str, ChildKind)> = Vec::new();
        while self.layout.covers(child) {
            let dir = names::parent_name(child);
            let base = names::base_name(child);
            let mut was_absent = false;
            let changed = self
                .cache
                .edit_listing(dir, |children| match children.get(base) {
                    Some(ChildKind::Dir) => false,
                    Some(ChildKind::File) if kind == ChildKind::File => false,
                    known => {
                        was_absent = known.is_none();
                        children.insert(Box::from(base), kind);
                        true
                    }
                });
            match changed {
                Some(false) => return, // the rest of the way up already knows
                Some(true) => {
                    self.drop_kernel_entry(child);
                    if was_absent {
                        // The directories below are new: each holds just the
                        // next one down, cached so a delete can empty them.
                        for (path, below, below_kind) in unlisted.drain(..) {
                            let children = [(Box::from(below), below_kind)].into_iter().collect();
                            self.cache.put_dir(path, true, children, None, Some(false));
                        }
                    }
                    unlisted.clear();
                }
                None => unlisted.push((dir, base, kind)),
            }
            child = dir;
            kind = ChildKind::Dir;
        }
    }

    fn remove_from_listings(&self, name: &str) {
        let mut child = name;
        let mut kind = ChildKind::File;
        while self.layout.covers(child) {
            let dir = names::parent_name(child);
            let base = names::base_name(child);
            let changed = self.cache.edit_listing(dir, |children| {
                if children.get(base) == Some(&kind) {
                    children.remove(base);
                    true
                } else {
                    false
                }
            });
            if changed != Some(true) {
                return;
            }
            self.drop_kernel_entry(child);
            // A directory whose last name went is gone too.
            let emptied = self
                .cache
                .dir(dir)
                .is_some_and(|listing| listing.complete && listing.children.is_empty());
            if !emptied {
                return;
            }
            child = dir;
            kind = ChildKind::Dir;
        }
    }

    /// Makes the kernel look `name` up again at its next use.
    fn drop_kernel_entry(&self, name: &str) {
        for parent in self.dir_inodes(names::parent_name(name)) {
            self.send(Invalidation::Entry {
                parent,
                name: names::base_name(name).to_string(),
            });
        }
    }

    /// Event ids remembered (bounded by `REMEMBERED_EVENT_IDS`).
    pub fn remembered_event_ids(&self) -> usize {
        self.seen_event_ids.lock().unwrap().len()
    }
}
