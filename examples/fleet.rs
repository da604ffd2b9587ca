//! Fleet simulation: the real filesystem core (`Fs` over `Resilient`, as the
//! daemon builds it) of N simulated hosts in one process, against one shared
//! in-memory store behind an account-wide rate limiter with SSM's quotas, on
//! tokio's paused clock, so 1,000 hosts x an hour run in seconds.
//!
//! Each host reads a workload of 50 keys in 5 directories, Zipf-distributed,
//! about one read a second, through a model of the kernel's caches: a name the
//! core answered is not asked again until the entry's TTL has passed (no-open
//! mode, entry and attribute TTLs), exactly what reaches the daemon on a real
//! host. Every API call costs a simulated round trip.
//!
//!     cargo run --release --example fleet [-- --smoke] [--out FILE] [--only NAME]
//!     cargo run --release --example fleet -- --check HOSTS TTL_S SECONDS
//!
//! Prints a table and writes one JSON object per scenario. `--check` runs one
//! small scenario shaped like `scripts/fleet.sh --check`'s real daemons
//! (hosts up within 10 s, measured from the second TTL on) to compare with.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ssmfs::config::{CacheConfig, EventsPacing, FsConfig, RequestConfig};
use ssmfs::events::{Operation, ParameterEvent};
use ssmfs::fs::ROOT_INO;
use ssmfs::fs::{Fs, Invalidation};
use ssmfs::metrics::Metrics;
use ssmfs::store::memory::MemoryStore;
use ssmfs::store::resilient::Resilient;
use ssmfs::store::{Batch, Page, PageContent, Parameter, ParameterStore, StoreError};
use tokio::time::Instant;

/// One SSM round trip, as seen from an EC2 host in the same region.
const ROUND_TRIP: Duration = Duration::from_millis(20);
const KEYS: usize = 50;
const DIRS: usize = 5;

#[derive(Clone, Copy, PartialEq)]
enum Api {
    Get,
    GetMany,
    ByPath,
}

/// A token bucket refilled at `rate` per second, holding at most one second's.
struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: f64) -> Self {
        Self {
            rate,
            tokens: rate,
            last: Instant::now(),
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// SSM's throughput quotas for one account and region.
#[derive(Clone, Copy)]
enum Quota {
    /// 40 TPS shared by GetParameter, GetParameters and GetParametersByPath.
    Default,
    /// Higher throughput: 10,000 TPS for GetParameter/GetParameters, and
    /// GetParametersByPath still 100.
    Higher,
}

impl Quota {
    /// The GetParameters calls a second the account allows.
    fn tps(self) -> f64 {
        match self {
            Quota::Default => 40.0,
            Quota::Higher => 10_000.0,
        }
    }
}

/// The account: the parameters, the quota, and what every host called.
struct Account {
    store: MemoryStore,
    quota: Quota,
    rotations: tokio::sync::broadcast::Sender<Rotation>,
    buckets: Mutex<(Bucket, Bucket)>,
    down: AtomicBool,
    started: Instant,
    calls_per_second: Mutex<Vec<u64>>,
    throttled_per_second: Mutex<Vec<u64>>,
    /// GetParameter, GetParameters, GetParametersByPath: all calls, whole run.
    calls_by_api: [AtomicU64; 3],
    throttled: AtomicU64,
}

impl Account {
    fn new(quota: Quota, seconds: usize) -> Self {
        let store = MemoryStore::new();
        for d in 0..DIRS {
            for k in 0..KEYS / DIRS {
                store.put_string(&format!("/fleet/d{d}/k{k}"), &format!("value-{d}-{k}"));
            }
        }
        let (reads, listings) = match quota {
            Quota::Default => (quota.tps(), 0.0),
            Quota::Higher => (quota.tps(), 100.0),
        };
        Self {
            store,
            quota,
            rotations: tokio::sync::broadcast::channel(1024).0,
            buckets: Mutex::new((Bucket::new(reads), Bucket::new(listings))),
            down: AtomicBool::new(false),
            started: Instant::now(),
            calls_per_second: Mutex::new(vec![0; seconds + 1]),
            throttled_per_second: Mutex::new(vec![0; seconds + 1]),
            calls_by_api: Default::default(),
            throttled: AtomicU64::new(0),
        }
    }

    async fn admit(&self, api: Api) -> Result<(), StoreError> {
        tokio::time::sleep(ROUND_TRIP).await;
        let now = Instant::now();
        let second = now.duration_since(self.started).as_secs() as usize;
        if let Some(slot) = self.calls_per_second.lock().unwrap().get_mut(second) {
            *slot += 1;
        }
        self.calls_by_api[api as usize].fetch_add(1, Ordering::Relaxed);
        if self.down.load(Ordering::Relaxed) {
            return Err(StoreError::Unavailable("simulated outage".into()));
        }
        let admitted = {
            let mut buckets = self.buckets.lock().unwrap();
            match (self.quota, api) {
                (Quota::Default, _) | (Quota::Higher, Api::Get | Api::GetMany) => {
                    buckets.0.take(now)
                }
                (Quota::Higher, Api::ByPath) => buckets.1.take(now),
            }
        };
        if admitted {
            Ok(())
        } else {
            self.throttled.fetch_add(1, Ordering::Relaxed);
            if let Some(slot) = self.throttled_per_second.lock().unwrap().get_mut(second) {
                *slot += 1;
            }
            Err(StoreError::Throttled)
        }
    }

    /// (calls, the highest rate over any 10 s, throttled calls) between two
    /// offsets. The peak is a 10-second average: single seconds fluctuate
    /// like any Poisson arrivals (SSM's bucket also allows a second's burst).
    fn calls_between(&self, from: u64, to: u64) -> (u64, f64, u64) {
        let calls = self.calls_per_second.lock().unwrap();
        let throttled = self.throttled_per_second.lock().unwrap();
        let range = from as usize..(to as usize).min(calls.len());
        let window = &calls[range.clone()];
        let peak = window
            .windows(10)
            .map(|w| w.iter().sum::<u64>() as f64 / 10.0)
            .fold(0.0, f64::max);
        (window.iter().sum(), peak, throttled[range].iter().sum())
    }
}

/// One host's connection to the account.
#[derive(Clone)]
struct Link(Arc<Account>);

impl ParameterStore for Link {
    async fn get(&self, name: &str) -> Result<Parameter, StoreError> {
        self.0.admit(Api::Get).await?;
        self.0.store.get(name).await
    }

    async fn get_many(&self, names: &[&str]) -> Result<Batch, StoreError> {
        self.0.admit(Api::GetMany).await?;
        self.0.store.get_many(names).await
    }

    async fn list_page(
        &self,
        path: &str,
        max_results: usize,
        next_token: Option<String>,
        content: PageContent,
    ) -> Result<Page, StoreError> {
        self.0.admit(Api::ByPath).await?;
        self.0
            .store
            .list_page(path, max_results, next_token, content)
            .await
    }
}

struct Scenario {
    name: &'static str,
    hosts: usize,
    quota: Quota,
    ttl: Duration,
    /// Hosts start spread over this long.
    start_within: Duration,
    measure_from: Duration,
    end: Duration,
    /// SSM answers nothing between these offsets.
    outage: Option<(Duration, Duration)>,
    reads_per_second: f64,
    /// Change events: a key is rotated this often (from `measure_from` on)
    /// and every host gets the event after EventBridge-to-SQS delivery.
    rotate_every: Option<Duration>,
    /// The last rotation leaves this long before the end to converge.
    converge: Duration,
}

/// One rotation, as its event reaches the hosts.
#[derive(Clone)]
struct Rotation {
    key: usize,
    generation: u64,
    at: Instant,
    /// EventBridge dropped this host's copy of the event.
    lost: bool,
}

/// The rotation generation a served value carries (`...-vN`; 0: never rotated).
fn generation_of(value: &str) -> u64 {
    value
        .rsplit_once("-v")
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(0)
}

#[derive(Default)]
struct Tally {
    reads: AtomicU64,
    /// Core lookups answered from the cache, and those that needed SSM.
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    failed_reads: AtomicU64,
    stale_reads: AtomicU64,
    /// Seconds from a rotation until a host that held the key serves the new
    /// value (never: counted in `rotations_unseen`). Rotations whose event
    /// EventBridge dropped for the host are counted in `rotations_lost`,
    /// seen later or not: the TTL (an hour here) or a later event shows them.
    rotation_lags: Mutex<Vec<f64>>,
    rotations_unseen: AtomicU64,
    rotations_lost: AtomicU64,
}

/// Zipf(1) over the keys: key i is read in proportion to 1/(i+1).
fn zipf_cdf() -> Vec<f64> {
    let weights: Vec<f64> = (0..KEYS).map(|i| 1.0 / (i + 1) as f64).collect();
    let total: f64 = weights.iter().sum();
    weights
        .iter()
        .scan(0.0, |acc, w| {
            *acc += w / total;
            Some(*acc)
        })
        .collect()
}

async fn host(
    id: usize,
    account: Arc<Account>,
    scenario: Arc<Scenario>,
    tally: Arc<Tally>,
    origin: Instant,
) {
    let mut rng = StdRng::seed_from_u64(id as u64);
    let start_in = scenario.start_within.mul_f64(rng.gen::<f64>());
    let mut rotations = account.rotations.subscribe();
    tokio::time::sleep(start_in).await;
    let mut config = FsConfig::new("/fleet");
    config.cache = CacheConfig {
        ttl: scenario.ttl,
        ..Default::default()
    };
    config.request = RequestConfig::default();
    // Each host knows the fleet's size as topic mode counts it (the topic's
    // subscriptions) and the account's quota (--ssm-quota-tps).
    config.events = EventsPacing {
        hosts: scenario.hosts as u32,
        quota_tps: scenario.quota.tps() as u32,
    };
    let metrics = Arc::new(Metrics::default());
    let store = Resilient::new(Link(account), config.request.clone(), metrics.clone());
    let (fs, mut invalidations) = Fs::new(store, config, metrics.clone());
    let _ = fs.check_access().await;
    let cdf = zipf_cdf();
    let mut kernel = Kernel::default();
    let measure_from = origin + scenario.measure_from;
    let end = origin + scenario.end;
    let mut stale_baseline = None;
    // Events on their way to this host, and rotations it has not seen yet.
    let mut deliveries: Vec<(Instant, Rotation)> = Vec::new();
    let mut awaiting: Vec<Rotation> = Vec::new();
    let mut next_read = Instant::now();
    loop {
        let next_delivery = deliveries.iter().map(|(at, _)| *at).min();
        let mut wake = next_delivery.map_or(next_read, |d| d.min(next_read));
        // Paced refetches are made when due, as the daemon's listener does.
        if let Some(due) = fs.next_event_due() {
            wake = wake.min(due.max(Instant::now()));
        }
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            rotation = rotations.recv(), if scenario.rotate_every.is_some() => {
                if let Ok(rotation) = rotation {
                    // EventBridge -> SQS (-> SNS) delivery, then a long poll that
                    // returns at once: 0.3 s plus an exponential 0.5 s mean.
                    let delay = 0.3 - 0.5 * rng.gen::<f64>().max(1e-12).ln();
                    let at = Instant::now() + Duration::from_secs_f64(delay);
                    // EventBridge drops an event now and then: the TTL covers it.
                    let lost = rng.gen::<f64>() < 0.001;
                    if kernel.keys.contains_key(&rotation.key) {
                        awaiting.push(Rotation { lost, ..rotation.clone() });
                    }
                    if !lost {
                        deliveries.push((at, rotation));
                    }
                }
                continue;
            }
        }
        let now = Instant::now();
        if now >= end {
            break;
        }
        let due: Vec<Rotation> = {
            let (due, later) = deliveries.drain(..).partition(|(at, _)| *at <= now);
            deliveries = later;
            due.into_iter().map(|(_, rotation)| rotation).collect()
        };
        if !due.is_empty() {
            let events = due
                .iter()
                .map(|r| ParameterEvent {
                    id: None,
                    name: key_name(r.key),
                    operation: Operation::Update,
                    time: None,
                })
                .collect();
            fs.apply_events(events).await;
        } else {
            fs.retry_pending_events().await;
        }
        while let Ok(invalidation) = invalidations.try_recv() {
            kernel.forget(&invalidation);
        }
        let mut still = Vec::new();
        for rotation in awaiting.drain(..) {
            // Seen once the host serves this rotation's value or a later one.
            // A lost event's rotation is the TTL's (or a later event's) to
            // show: counted apart, not in the events' lags.
            match read(&fs, &mut kernel, rotation.key).await {
                Some(value) if generation_of(&value) >= rotation.generation => {
                    if rotation.lost {
                        tally.rotations_lost.fetch_add(1, Ordering::Relaxed);
                    } else {
                        let lag = (Instant::now() - rotation.at).as_secs_f64();
                        tally.rotation_lags.lock().unwrap().push(lag);
                    }
                }
                _ => still.push(rotation),
            }
        }
        awaiting = still;
        if now < next_read {
            continue;
        }
        let gap = -rng.gen::<f64>().max(1e-12).ln() / scenario.reads_per_second;
        next_read = now + Duration::from_secs_f64(gap);
        let measuring = now >= measure_from;
        if measuring && stale_baseline.is_none() {
            stale_baseline = Some((
                metrics.stale_serves.load(Ordering::Relaxed),
                metrics.cache_hits.load(Ordering::Relaxed),
                metrics.cache_misses.load(Ordering::Relaxed),
            ));
        }
        let draw: f64 = rng.gen();
        let key = cdf.partition_point(|p| *p < draw).min(KEYS - 1);
        if measuring {
            tally.reads.fetch_add(1, Ordering::Relaxed);
        }
        let answered = read(&fs, &mut kernel, key).await.is_some_and(|value| {
            let base = format!("value-{}-{}", key / (KEYS / DIRS), key % (KEYS / DIRS));
            value == base || value.starts_with(&format!("{base}-v"))
        });
        if !answered && measuring {
            tally.failed_reads.fetch_add(1, Ordering::Relaxed);
        }
    }
    tally.rotations_unseen.fetch_add(
        awaiting.iter().filter(|r| !r.lost).count() as u64,
        Ordering::Relaxed,
    );
    tally.rotations_lost.fetch_add(
        awaiting.iter().filter(|r| r.lost).count() as u64,
        Ordering::Relaxed,
    );
    if let Some((stale, hits, misses)) = stale_baseline {
        let since = |counter: &AtomicU64, baseline: u64| counter.load(Ordering::Relaxed) - baseline;
        tally
            .stale_reads
            .fetch_add(since(&metrics.stale_serves, stale), Ordering::Relaxed);
        tally
            .cache_hits
            .fetch_add(since(&metrics.cache_hits, hits), Ordering::Relaxed);
        tally
            .cache_misses
            .fetch_add(since(&metrics.cache_misses, misses), Ordering::Relaxed);
    }
}

fn key_name(key: usize) -> String {
    format!("/fleet/d{}/k{}", key / (KEYS / DIRS), key % (KEYS / DIRS))
}

/// The kernel's caches on one host: inode and expiry of each directory and
/// key it holds, and the key's cached pages, dropped when the core says so.
#[derive(Default)]
struct Kernel {
    dirs: HashMap<usize, (u64, Instant)>,
    keys: HashMap<usize, (u64, Instant)>,
    pages: HashMap<usize, String>,
}

impl Kernel {
    fn forget(&mut self, invalidation: &Invalidation) {
        if let Invalidation::Inode(ino) = invalidation {
            self.keys.retain(|_, (held, _)| held != ino);
        }
    }
}

/// A read of `key` as a process on the host makes it: answered by the
/// kernel while it holds the key, else by the core. `None`: it failed.
async fn read<S: ParameterStore>(
    fs: &Arc<Fs<S>>,
    kernel: &mut Kernel,
    key: usize,
) -> Option<String> {
    let now = Instant::now();
    let (dir, leaf) = (key / (KEYS / DIRS), key % (KEYS / DIRS));
    if kernel.keys.get(&key).is_some_and(|(_, until)| *until > now) {
        return kernel.pages.get(&key).cloned();
    }
    let dir_ino = match kernel.dirs.get(&dir).filter(|(_, until)| *until > now) {
        Some((ino, _)) => *ino,
        None => {
            let entry = fs
                .lookup(ROOT_INO, OsStr::new(&format!("d{dir}")))
                .await
                .ok()?;
            kernel
                .dirs
                .insert(dir, (entry.attr.ino, Instant::now() + entry.ttl));
            entry.attr.ino
        }
    };
    let entry = fs
        .lookup(dir_ino, OsStr::new(&format!("k{leaf}")))
        .await
        .ok()?;
    let data = fs.read(entry.attr.ino, 0, 4096).await.ok()?;
    kernel
        .keys
        .insert(key, (entry.attr.ino, Instant::now() + entry.ttl));
    let value = String::from_utf8_lossy(data.bytes()).into_owned();
    kernel.pages.insert(key, value.clone());
    Some(value)
}

struct Outcome {
    json: String,
    /// The table's row up to its last column, the verdict (decided by the caller).
    row: String,
    rotation_row: Option<String>,
    met: bool,
}

fn simulate(scenario: Scenario) -> Outcome {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    let scenario = Arc::new(scenario);
    let wall = std::time::Instant::now();
    let (account, tally) = runtime.block_on(async {
        let account = Arc::new(Account::new(
            scenario.quota,
            scenario.end.as_secs() as usize,
        ));
        let tally = Arc::new(Tally::default());
        let origin = Instant::now();
        let hosts: Vec<_> = (0..scenario.hosts)
            .map(|id| {
                tokio::spawn(host(
                    id,
                    account.clone(),
                    scenario.clone(),
                    tally.clone(),
                    origin,
                ))
            })
            .collect();
        if let Some(every) = scenario.rotate_every {
            let (account, scenario) = (account.clone(), scenario.clone());
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(7);
                let cdf = zipf_cdf();
                tokio::time::sleep(scenario.measure_from).await;
                let mut generation = 0;
                while Instant::now() + every + scenario.converge < origin + scenario.end {
                    tokio::time::sleep(every).await;
                    generation += 1;
                    let draw: f64 = rng.gen();
                    let key = cdf.partition_point(|p| *p < draw).min(KEYS - 1);
                    let value = format!(
                        "value-{}-{}-v{generation}",
                        key / (KEYS / DIRS),
                        key % (KEYS / DIRS)
                    );
                    account.store.put_string(&key_name(key), &value);
                    let _ = account.rotations.send(Rotation {
                        key,
                        generation,
                        at: Instant::now(),
                        lost: false,
                    });
                }
            });
        }
        if let Some((down_at, up_at)) = scenario.outage {
            tokio::time::sleep(down_at).await;
            account.down.store(true, Ordering::Relaxed);
            tokio::time::sleep(up_at - down_at).await;
            account.down.store(false, Ordering::Relaxed);
        }
        for host in hosts {
            host.await.expect("a host task");
        }
        (account, tally)
    });
    let (from, to) = (scenario.measure_from.as_secs(), scenario.end.as_secs());
    let (calls, peak, throttled) = account.calls_between(from, to);
    let seconds = (to - from) as f64;
    let mean_tps = calls as f64 / seconds;
    let per_host_per_ttl =
        calls as f64 / scenario.hosts as f64 / (seconds / scenario.ttl.as_secs_f64());
    let recovery_peak = scenario
        .outage
        .map(|(_, up)| account.calls_between(up.as_secs(), to).1);
    let boot_throttled = account.throttled.load(Ordering::Relaxed) - throttled;
    let failed = tally.failed_reads.load(Ordering::Relaxed);
    let quota_tps = scenario.quota.tps();
    let bound = (KEYS as f64 / 10.0).ceil() + DIRS as f64;
    let mut lags = tally.rotation_lags.lock().unwrap().clone();
    lags.sort_by(f64::total_cmp);
    let unseen = tally.rotations_unseen.load(Ordering::Relaxed);
    let lost = tally.rotations_lost.load(Ordering::Relaxed);
    let held = lags.len() as u64 + unseen + lost;
    let within_5s = lags.iter().filter(|lag| **lag <= 5.0).count() as f64 / held.max(1) as f64;
    let throttled_share = throttled as f64 / calls.max(1) as f64;
    let percentile = |q: f64| {
        lags.get(((lags.len() as f64 * q) as usize).min(lags.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    let rotations = scenario.rotate_every.map(|_| {
        format!(
            "{{\"host_rotations\": {held}, \"visible_within_5s\": {within_5s:.4}, \"lag_p50_s\": {:.2}, \"lag_p99_s\": {:.2}, \"lag_max_s\": {:.2}, \"never_visible\": {unseen}, \"never_visible_event_lost\": {lost}}}",
            percentile(0.5),
            percentile(0.99),
            lags.last().copied().unwrap_or(f64::NAN)
        )
    });
    let met = failed == 0
        && match scenario.name {
            "steady_state" => mean_tps < quota_tps / 2.0 && per_host_per_ttl <= bound,
            "ssm_outage" => recovery_peak.is_some_and(|p| p < quota_tps),
            // A rotation without a herd: paced refetches, nearly no throttling.
            "events_1h_default_quota" => {
                throttled_share <= 0.01
                    && mean_tps <= 12.0
                    && unseen == 0
                    && percentile(0.99) <= 60.0
            }
            // Fresh within seconds at an hour's TTL, for far less than the quota.
            "events_1h_higher_throughput" => {
                within_5s >= 0.99
                    && mean_tps < quota_tps / 10.0
                    && percentile(0.99) <= 5.0
                    && throttled == 0
                    && unseen == 0
            }
            // Half the quota left to everyone else; all hosts within 10 min.
            "events_10k_hosts_default_quota" => {
                throttled_share <= 0.01
                    && mean_tps <= 20.0
                    && unseen == 0
                    && lags.last().is_some_and(|l| *l <= 600.0)
            }
            _ => true,
        };
    let json = format!(
        "{{\"scenario\": \"{}\", \"hosts\": {}, \"keys_per_host\": {KEYS}, \"dirs_per_host\": {DIRS}, \"ttl_s\": {}, \"quota\": \"{}\", \"simulated_s\": {}, \"measured_s\": {seconds}, \"reads\": {}, \"mean_tps\": {mean_tps:.2}, \"peak_tps\": {peak:.1}, \"recovery_peak_tps\": {}, \"throttled_calls\": {throttled}, \"throttled_calls_before_measuring\": {boot_throttled}, \"failed_reads\": {failed}, \"stale_reads\": {}, \"cache_hits\": {}, \"cache_misses\": {}, \"calls_per_host_per_ttl\": {per_host_per_ttl:.2}, \"calls_by_api\": {{\"GetParameter\": {}, \"GetParameters\": {}, \"GetParametersByPath\": {}}}, \"rotations\": {}, \"target_met\": {met}, \"wall_s\": {:.1}}}",
        scenario.name,
        scenario.hosts,
        scenario.ttl.as_secs(),
        match scenario.quota {
            Quota::Default => "default 40 TPS shared",
            Quota::Higher => "higher throughput",
        },
        scenario.end.as_secs(),
        tally.reads.load(Ordering::Relaxed),
        recovery_peak.map_or("null".into(), |p| format!("{p:.1}")),
        tally.stale_reads.load(Ordering::Relaxed),
        tally.cache_hits.load(Ordering::Relaxed),
        tally.cache_misses.load(Ordering::Relaxed),
        account.calls_by_api[0].load(Ordering::Relaxed),
        account.calls_by_api[1].load(Ordering::Relaxed),
        account.calls_by_api[2].load(Ordering::Relaxed),
        rotations.clone().unwrap_or_else(|| "null".into()),
        wall.elapsed().as_secs_f64(),
    );
    let row = format!(
        "| {} | {} | {}s | {:.1} | {:.1} | {} | {} | {} | {:.2} |",
        scenario.name,
        scenario.hosts,
        scenario.ttl.as_secs(),
        mean_tps,
        peak,
        recovery_peak.map_or("-".into(), |p| format!("{p:.1}")),
        throttled,
        failed,
        per_host_per_ttl,
    );
    let rotation_row = scenario.rotate_every.map(|every| {
        format!(
            "| {} | {} | {}s | one per {}s | {held} | {:.1}% | {:.2} | {:.2} | {unseen} | {lost} |",
            scenario.name,
            scenario.hosts,
            scenario.ttl.as_secs(),
            every.as_secs(),
            within_5s * 100.0,
            percentile(0.5),
            percentile(0.99),
        )
    });
    Outcome {
        json,
        row,
        rotation_row,
        met,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| ".ssmfs-run/fleet.json".into());
    // Smoke: a tenth of the hosts, and a fifth of the TTL and of every
    // duration, only to show it runs.
    let (scale, ttl) = if smoke {
        (10, Duration::from_secs(60))
    } else {
        (1, Duration::from_secs(300))
    };
    let time_scale = ttl.as_secs_f64() / 300.0;
    let min = |m: f64| Duration::from_secs_f64(m * 60.0 * time_scale);
    let mut scenarios = vec![
        // Hosts of a running fleet came up over half an hour, not at once.
        Scenario {
            name: "steady_state",
            hosts: 1_000 / scale,
            quota: Quota::Default,
            ttl,
            start_within: min(30.0),
            measure_from: min(40.0),
            end: min(100.0),
            outage: None,
            reads_per_second: 2.0,
            rotate_every: None,
            converge: Duration::ZERO,
        },
        Scenario {
            name: "cold_boot",
            hosts: 1_000 / scale,
            quota: Quota::Default,
            ttl,
            start_within: min(1.0),
            measure_from: Duration::ZERO,
            end: min(15.0),
            outage: None,
            reads_per_second: 2.0,
            rotate_every: None,
            converge: Duration::ZERO,
        },
        Scenario {
            name: "ssm_outage",
            hosts: 1_000 / scale,
            quota: Quota::Default,
            ttl,
            start_within: min(30.0),
            measure_from: min(40.0),
            end: min(80.0),
            outage: Some((min(45.0), min(55.0))),
            reads_per_second: 2.0,
            rotate_every: None,
            converge: Duration::ZERO,
        },
        Scenario {
            name: "higher_throughput_10k",
            hosts: 10_000 / scale,
            quota: Quota::Higher,
            ttl,
            start_within: min(30.0),
            measure_from: min(40.0),
            end: min(70.0),
            outage: None,
            reads_per_second: 0.5,
            rotate_every: None,
            converge: Duration::ZERO,
        },
    ];
    // Change events: an hour's TTL, a hot key rotated every two minutes, each
    // event reaching every host (one in a thousand lost). The quota decides:
    // 1,000 hosts refetching one key need 25 s of the default 40 TPS.
    for (name, quota) in [
        ("events_1h_default_quota", Quota::Default),
        ("events_1h_higher_throughput", Quota::Higher),
    ] {
        scenarios.push(Scenario {
            name,
            hosts: 1_000 / scale,
            quota,
            ttl: Duration::from_secs(3600),
            start_within: min(10.0),
            measure_from: min(20.0),
            end: min(50.0),
            outage: None,
            reads_per_second: 2.0,
            rotate_every: Some(min(2.0)),
            converge: Duration::from_secs(60),
        });
    }
    // Ten times the fleet, a hot key rotated every half hour: at the default
    // quota's half, 10,000 refetches take 500 s; every host must see each
    // rotation within 10 minutes. The fleet came up over an hour.
    scenarios.push(Scenario {
        name: "events_10k_hosts_default_quota",
        hosts: 10_000 / scale,
        quota: Quota::Default,
        ttl: Duration::from_secs(3600),
        start_within: min(60.0),
        measure_from: min(70.0),
        end: min(150.0),
        outage: None,
        reads_per_second: 0.5,
        rotate_every: Some(min(30.0)),
        converge: min(11.0),
    });
    if let Some(i) = args.iter().position(|a| a == "--check") {
        let number = |k: usize| -> u64 {
            args.get(i + k)
                .and_then(|a| a.parse().ok())
                .expect("--check HOSTS TTL_S SECONDS")
        };
        let (hosts, ttl_s, seconds) = (number(1), number(2), number(3));
        scenarios = vec![Scenario {
            name: "reality_check",
            hosts: hosts as usize,
            quota: Quota::Default,
            ttl: Duration::from_secs(ttl_s),
            start_within: Duration::from_secs(10),
            measure_from: Duration::from_secs(2 * ttl_s),
            end: Duration::from_secs(seconds),
            outage: None,
            reads_per_second: 2.0,
            rotate_every: None,
            converge: Duration::ZERO,
        }];
    }
    if let Some(only) = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
    {
        scenarios.retain(|s| s.name.contains(only.as_str()));
    }
    println!("| scenario | hosts | TTL | mean TPS | peak TPS (10 s) | recovery peak (10 s) | throttled calls | failed reads | calls/host/TTL | target met |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut objects = Vec::new();
    let mut rotation_rows = Vec::new();
    let mut all_met = true;
    for scenario in scenarios {
        let outcome = simulate(scenario);
        // The targets are set for the full fleet; a smoke run only shows it runs.
        let verdict = match (smoke, outcome.met) {
            (true, _) => "- (smoke)",
            (false, true) => "yes",
            (false, false) => "NO",
        };
        println!("{} {verdict} |", outcome.row);
        objects.push(outcome.json);
        rotation_rows.extend(outcome.rotation_row);
        all_met &= outcome.met;
    }
    if !rotation_rows.is_empty() {
        println!();
        println!("| scenario | hosts | TTL | rotations | host x rotation (key held) | visible within 5 s | lag p50 (s) | lag p99 (s) | never visible | event lost (TTL covers) |");
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for row in rotation_rows {
            println!("{row}");
        }
    }
    let json = format!("[\n{}\n]\n", objects.join(",\n"));
    if let Some(dir) = std::path::Path::new(&out).parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&out, json).expect("writing the fleet report");
    if smoke {
        println!("wrote {out}; smoke run: targets are checked at full scale only");
    } else {
        println!("wrote {out}; every target met: {all_met}");
    }
}
