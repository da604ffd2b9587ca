//! Applying change events inside the core (one of three "events" things:
//! `crate::change` is the model of a change, `crate::events` the SQS/SNS
//! transport that delivers them, and this module what the core does with
//! them): which names to ask SSM about
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
//!
//! Pacing: every host holding a rotated key gets the same event within a
//! second, so each host waits a random time, uniform over a spread window,
//! before it refetches: the fleet's refetches then arrive at an even rate of
//! `hosts / spread`. The window is sized so that rate is half the account's
//! quota (`EVENTS_QUOTA_SHARE`): hosts / (quota / 2), from the fleet's size
//! (`--events-hosts`, or the topic's subscription count in topic mode) and
//! the quota (`--ssm-quota-tps`). What a host cannot know (other clients of
//! the quota, a fleet size nobody gave it) it learns from throttling: a
//! throttled refetch doubles its window and re-draws its wait within it; each
//! refetch answered narrows it again by a step (additive increase of the rate,
//! multiplicative decrease, as TCP does). Readers keep the version they have
//! until the refetch, never an older one; the window never exceeds a quarter
//! of the TTL, which still bounds staleness.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::time::Instant;

use super::cache::ChildKind;
use super::filesystem::Fs;
use super::inode::Role;
use crate::change::{Operation, ParameterEvent};
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
const REMEMBERED_EVENT_IDS: usize = 4096;

/// A herd of refetches SSM absorbs without spreading: its token bucket holds
/// a second's worth of calls.
const ABSORBED_HERD: Duration = Duration::from_secs(1);
/// The spread window never exceeds this share of the TTL, which still bounds
/// how stale a value may be.
const MAX_SPREAD_OF_TTL: f64 = 0.25;
/// How many times throttling may double the window: 64 x the fleet's own
/// share is room for an account whose other clients take nearly all of it.
const MAX_WIDENING: f64 = 64.0;
/// How much each unthrottled refetch narrows the widening back: slowly, so a
/// fleet that was throttled does not return to the rate that throttled it at
/// the next change.
const NARROWING_STEP: f64 = 0.25;

/// When a refetch drawn now over `spread` comes due.
fn draw_due(now: Instant, spread: Duration) -> Instant {
    now + spread.mul_f64(rand::thread_rng().gen::<f64>())
}

/// What the core keeps about change events: the names waiting to be fetched
/// again, the ids applied lately (so a redelivered one costs nothing), and
/// since when, and when last, the event queue answered.
pub(super) struct EventState {
    pending: Mutex<PendingEvents>,
    seen_ids: Mutex<lru::LruCache<String, ()>>,
    live: Mutex<Option<(Instant, Instant)>>,
}

impl EventState {
    pub(super) fn new(hosts: u32) -> Self {
        Self {
            pending: Mutex::new(PendingEvents::new(hosts)),
            seen_ids: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(REMEMBERED_EVENT_IDS).unwrap(),
            )),
            live: Mutex::new(None),
        }
    }
}

/// Names waiting to be fetched again, each with its earliest event's time
/// (for the lag metric) and when its paced refetch is due, and when to try
/// again after an outage.
struct PendingEvents {
    names: HashMap<Arc<str>, (Option<SystemTime>, Instant)>,
    retry_at: Option<Instant>,
    failures_in_a_row: u32,
    /// How many hosts receive each event, as last learned.
    hosts: u32,
    /// How much throttling has widened the spread window (1: not at all).
    widening: f64,
}

impl PendingEvents {
    fn new(hosts: u32) -> Self {
        Self {
            names: HashMap::new(),
            retry_at: None,
            failures_in_a_row: 0,
            hosts: hosts.max(1),
            widening: 1.0,
        }
    }

    /// The window this host spreads a refetch over: the fleet's refetches
    /// at half the quota, widened by throttling, at most a quarter TTL. A
    /// window under a second is not spread until throttling widens it: SSM's
    /// bucket holds a second's calls, so a herd that fits half of it is
    /// absorbed, and the refetch is made at once (a single host, or a fleet
    /// with higher throughput, sees a rotation as fast as without pacing).
    fn spread(&self, quota_tps: u32, ttl: Duration) -> Duration {
        let fleet_tps = f64::from(quota_tps.max(1)) * crate::config::EVENTS_QUOTA_SHARE;
        let unwidened = f64::from(self.hosts) / fleet_tps;
        if unwidened < ABSORBED_HERD.as_secs_f64() && self.widening <= 1.0 {
            return Duration::ZERO;
        }
        let seconds = unwidened * self.widening;
        Duration::from_secs_f64(seconds.min(ttl.as_secs_f64() * MAX_SPREAD_OF_TTL))
    }

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
            let now = Instant::now();
            let mut pending = self.events.pending.lock().unwrap();
            let spread = self.event_spread(&pending);
            for name in names {
                let due = draw_due(now, spread);
                let (time, earliest_due) = pending.names.entry(name).or_insert((event.time, due));
                // The earliest known time of the changes waiting for a name.
                *time = match (*time, event.time) {
                    (Some(earlier), Some(this)) => Some(earlier.min(this)),
                    (known, other) => known.or(other),
                };
                *earliest_due = (*earliest_due).min(due);
            }
        }
        self.retry_pending_events().await;
    }

    /// What `event` makes this host fetch: the name, or for a moved label
    /// the `NAME:LABEL` entries cached here (a label leaves the current value
    /// as it is); nothing for a redelivery, a name outside the mount, or a
    /// change that touches nothing cached here.
    fn names_to_fetch(&self, event: &ParameterEvent) -> Vec<Arc<str>> {
        if !self.remember_event(event) || !self.superblock.layout().covers(&event.name) {
            return Vec::new();
        }
        match event.operation {
            Operation::Label => self.superblock.cache().labelled_names(&event.name),
            _ if self.wants_change(event) => vec![Arc::from(event.name.as_str())],
            _ => Vec::new(),
        }
    }

    /// Records `event`'s id; false when it was applied already (a redelivery).
    fn remember_event(&self, event: &ParameterEvent) -> bool {
        let Some(id) = &event.id else {
            return true;
        };
        self.events
            .seen_ids
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
                self.superblock.drop_kernel_entry(name);
            }
            return false;
        }
        let already_current = self.superblock.cache().value(name).is_some_and(|entry| {
            event
                .time
                .is_some_and(|time| entry.validity.fetched_at() > time + EVENT_TIME_SLACK)
        });
        !already_current
    }

    /// Whether anything about `name` is cached here or held by the kernel.
    fn knows(&self, name: &str) -> bool {
        if self.superblock.cache().value(name).is_some()
            || [Role::File, Role::ShadowedValue, Role::Dir]
                .iter()
                .any(|role| self.superblock.inodes().find(name, *role).is_some())
        {
            return true;
        }
        let mut path = name;
        while self.superblock.layout().covers(path) {
            path = names::parent_name(path);
            if self.superblock.cache().dir(path).is_some() {
                return true;
            }
        }
        false
    }

    /// The spread window for refetches now (see the module's pacing).
    fn event_spread(&self, pending: &PendingEvents) -> Duration {
        pending.spread(self.config.events.quota_tps, self.config.cache.ttl)
    }

    /// How many hosts receive each event, as counted (the topic's
    /// subscriptions): the spread window grows with the fleet. Never below
    /// `--events-hosts`, so an operator's figure holds while a fleet is still
    /// subscribing (a count is taken at start and hourly).
    /// Returns the figure the spread now uses.
    pub fn set_event_hosts(&self, counted: u32) -> u32 {
        let hosts = counted.max(self.config.events.hosts).max(1);
        self.events.pending.lock().unwrap().hosts = hosts;
        hosts
    }

    /// When the next paced refetch comes due, if any is waiting.
    pub fn next_event_due(&self) -> Option<Instant> {
        let pending = self.events.pending.lock().unwrap();
        let earliest = pending.names.values().map(|(_, due)| *due).min()?;
        Some(pending.retry_at.map_or(earliest, |at| earliest.max(at)))
    }

    /// The spread window a refetch for an event would be drawn in now.
    pub fn event_spread_now(&self) -> Duration {
        self.event_spread(&self.events.pending.lock().unwrap())
    }

    /// Fetches the names whose paced refetch is due, ten to a call; while SSM
    /// is out, keeps them for later (after the outage backoff); a throttled
    /// refetch widens the window and draws its names' waits again in it.
    pub async fn retry_pending_events(self: &Arc<Self>) {
        let batch: Vec<(Arc<str>, Option<SystemTime>)> = {
            let mut pending = self.events.pending.lock().unwrap();
            let now = Instant::now();
            if pending.retry_at.is_some_and(|at| now < at) {
                return;
            }
            pending
                .names
                .extract_if(|_, (_, due)| *due <= now)
                .map(|(name, (time, _))| (name, time))
                .collect()
        };
        if batch.is_empty() {
            return;
        }
        let mut chunks = batch.chunks(MAX_BATCH);
        while let Some(chunk) = chunks.next() {
            let names: Vec<Arc<str>> = chunk.iter().map(|(name, _)| name.clone()).collect();
            match once_in_background(self.fetch_again(&names)).await {
                Ok(()) => {
                    {
                        let mut pending = self.events.pending.lock().unwrap();
                        pending.widening = (pending.widening - NARROWING_STEP).max(1.0);
                    }
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
                    let mut pending = self.events.pending.lock().unwrap();
                    let now = Instant::now();
                    if matches!(error, StoreError::Throttled) {
                        // Answering, only not at this rate: spread wider.
                        pending.widening = (pending.widening * 2.0).min(MAX_WIDENING);
                    } else {
                        pending.back_off();
                    }
                    let spread = self.event_spread(&pending);
                    for (name, time) in chunk.iter().chain(chunks.flatten()) {
                        let due = draw_due(now, spread);
                        pending.names.entry(name.clone()).or_insert((*time, due));
                    }
                    return;
                }
            }
        }
        let mut pending = self.events.pending.lock().unwrap();
        pending.retry_at = None;
        pending.failures_in_a_row = 0;
    }

    /// The event queue answered a receive (`true`) or failed one. While it
    /// answers, a name a listing lacks is trusted absent for the listing's
    /// TTL, not the negative TTL: its creation would arrive as an event.
    pub fn note_queue_answered(&self, answered: bool) {
        let now = Instant::now();
        let mut live = self.events.live.lock().unwrap();
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
        match *self.events.live.lock().unwrap() {
            Some((since, last)) if since <= fetched && now < last + EVENTS_LIVE_WINDOW => {
                cache.ttl.max(cache.negative_ttl)
            }
            _ => cache.negative_ttl,
        }
    }

    /// Names whose events wait for SSM.
    pub fn pending_event_names(&self) -> usize {
        self.events.pending.lock().unwrap().names.len()
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
            // Values due for refresh soon ride along: the call a refresh
            // would make minutes later is not made.
            let companions = self.superblock.take_companions(&plain);
            let batch: Vec<Arc<str>> = plain.iter().chain(&companions).cloned().collect();
            let fetched = self.get_batch(&batch).await;
            self.superblock.release(&companions);
            match fetched {
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
            self.superblock.record_value(name, known);
        }
        Ok(())
    }

    /// After a fetch for an event: the cached listings on the way up to the
    /// mount root gain or lose the name, and the kernel forgets what changed.
    fn update_listings(&self, name: &str) {
        let present = self
            .superblock
            .cache()
            .value(name)
            .is_some_and(|entry| entry.parameter().is_some());
        self.superblock.drop_kernel_entry(name);
        if present {
            self.add_to_listings(name, ChildKind::File);
        } else {
            self.remove_from_listings(name);
        }
    }

    /// Adds `name` (a `kind`) to the cached listings above it.
    pub(super) fn add_to_listings(&self, name: &str, kind: ChildKind) {
        let mut child = name;
        let mut kind = kind;
        // Directories on the way up with no cached listing, each with the
        // name one level down.
        let mut unlisted: Vec<(&str, &str, ChildKind)> = Vec::new();
        while self.superblock.layout().covers(child) {
            let dir = names::parent_name(child);
            let base = names::base_name(child);
            let mut was_absent = false;
            let changed =
                self.superblock
                    .cache()
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
                    self.superblock.drop_kernel_entry(child);
                    // Absent from a fresh listing, the directories below are
                    // new: each holds just the next one down, cached so a
                    // delete can empty them. A stale listing's absence says
                    // nothing: they may hold names gained since.
                    let listing_fresh = self
                        .superblock
                        .cache()
                        .dir(dir)
                        .is_some_and(|d| d.validity.is_fresh(Instant::now()));
                    if was_absent && listing_fresh {
                        for (path, below, below_kind) in unlisted.drain(..) {
                            let children = [(Box::from(below), below_kind)].into_iter().collect();
                            self.superblock.cache().put_dir(
                                path,
                                true,
                                children,
                                None,
                                Some(false),
                            );
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
        while self.superblock.layout().covers(child) {
            let dir = names::parent_name(child);
            let base = names::base_name(child);
            let changed = self.superblock.cache().edit_listing(dir, |children| {
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
            self.superblock.drop_kernel_entry(child);
            // A directory whose last name went is gone too.
            let emptied = self
                .superblock
                .cache()
                .dir(dir)
                .is_some_and(|listing| listing.complete && listing.children.is_empty());
            if !emptied {
                return;
            }
            child = dir;
            kind = ChildKind::Dir;
        }
    }

    /// Event ids remembered (bounded by `REMEMBERED_EVENT_IDS`).
    pub fn remembered_event_ids(&self) -> usize {
        self.events.seen_ids.lock().unwrap().len()
    }
}
