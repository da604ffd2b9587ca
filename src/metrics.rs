//! Process-wide counters, rendered as Prometheus text.
//!
//! Counting is lock-free for the hot paths (cache hits) and a short mutex for
//! labelled families. Nothing here ever sees a value: labels are operation
//! names, outcomes and FUSE opcodes.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds (seconds) of the FUSE latency histogram buckets: from a cached
/// answer (tens of microseconds) to an SSM call that hits the request timeout.
const LATENCY_BUCKETS: [f64; 10] = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];

/// Upper bounds (seconds) of the change-event lag histogram: from an event
/// applied within its second to one that waited out an outage.
const LAG_BUCKETS: [f64; 9] = [1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];

/// Cumulative buckets over `N` fixed upper bounds, as Prometheus wants them.
struct Histogram<const N: usize> {
    buckets: [u64; N],
    count: u64,
    sum: f64,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Self {
            buckets: [0; N],
            count: 0,
            sum: 0.0,
        }
    }
}

impl<const N: usize> Histogram<N> {
    fn observe(&mut self, seconds: f64, bounds: &[f64; N]) {
        self.count += 1;
        self.sum += seconds;
        for (bucket, bound) in self.buckets.iter_mut().zip(bounds) {
            if seconds <= *bound {
                *bucket += 1;
            }
        }
    }

    /// The sample lines of `name`, `labels` being `key="value",` or empty.
    fn render(&self, out: &mut String, name: &str, labels: &str, bounds: &[f64; N]) {
        for (bound, n) in bounds.iter().zip(self.buckets) {
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{bound}\"}} {n}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {}", self.count);
        let labels = labels.trim_end_matches(',');
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// API calls per second over the last minute, in one-second buckets: the
/// host's share of its account's SSM quota, as a rate an operator can read.
struct CallRate {
    /// Seconds since the metrics were created, of the newest bucket.
    newest: u64,
    buckets: [u64; 60],
}

impl Default for CallRate {
    fn default() -> Self {
        Self {
            newest: 0,
            buckets: [0; 60],
        }
    }
}

impl CallRate {
    fn advance(&mut self, second: u64) {
        let stale = second.saturating_sub(self.newest).min(60);
        for step in 1..=stale {
            self.buckets[((self.newest + step) % 60) as usize] = 0;
        }
        self.newest = self.newest.max(second);
    }

    fn record(&mut self, second: u64) {
        self.advance(second);
        self.buckets[(second % 60) as usize] += 1;
    }

    fn per_second(&mut self, second: u64) -> f64 {
        self.advance(second);
        self.buckets.iter().sum::<u64>() as f64 / 60.0
    }
}

pub struct Metrics {
    started: std::time::Instant,
    call_rate: Mutex<CallRate>,
    api_calls: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// SSM calls by (role, region): `primary` or `failover`, and its name.
    region_calls: Mutex<BTreeMap<(&'static str, Arc<str>), u64>>,
    fuse_requests: Mutex<BTreeMap<&'static str, Histogram<{ LATENCY_BUCKETS.len() }>>>,
    pub retries: AtomicU64,
    pub throttles: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub cache_evictions: AtomicU64,
    pub stale_serves: AtomicU64,
    pub invalidations: AtomicU64,
    /// GetParameters calls that refreshed hot values, and the values they carried.
    pub refresh_batches: AtomicU64,
    pub refreshed_values: AtomicU64,
    /// Change events: queue messages received, events that made this host
    /// fetch, ignored ones (other prefixes, names not cached here, already
    /// applied), malformed messages, failed receives.
    pub events_received: AtomicU64,
    pub events_applied: AtomicU64,
    pub events_ignored: AtomicU64,
    pub events_malformed: AtomicU64,
    pub event_queue_errors: AtomicU64,
    event_lag: Mutex<Histogram<{ LAG_BUCKETS.len() }>>,
    /// Under `--supervise`: the supervisor's counts when it started this
    /// daemon (restarts, upgrades, resent requests, ms without a daemon).
    pub supervisor: std::sync::OnceLock<[u64; 4]>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            started: std::time::Instant::now(),
            call_rate: Mutex::default(),
            api_calls: Mutex::default(),
            region_calls: Mutex::default(),
            fuse_requests: Mutex::default(),
            retries: AtomicU64::default(),
            throttles: AtomicU64::default(),
            cache_hits: AtomicU64::default(),
            cache_misses: AtomicU64::default(),
            cache_evictions: AtomicU64::default(),
            stale_serves: AtomicU64::default(),
            invalidations: AtomicU64::default(),
            refresh_batches: AtomicU64::default(),
            refreshed_values: AtomicU64::default(),
            events_received: AtomicU64::default(),
            events_applied: AtomicU64::default(),
            events_ignored: AtomicU64::default(),
            events_malformed: AtomicU64::default(),
            event_queue_errors: AtomicU64::default(),
            event_lag: Mutex::default(),
            supervisor: std::sync::OnceLock::new(),
        }
    }
}

/// Gauges read from their owners at scrape time.
pub struct Gauges {
    pub cache_entries: usize,
    /// Short-lived facts about paths (refused listings, probe counts).
    pub cache_notes: usize,
    pub cache_bytes: usize,
    pub inodes: usize,
}

impl Metrics {
    fn second(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// SSM calls per second made by this host over the last minute.
    pub fn calls_per_second(&self) -> f64 {
        self.call_rate.lock().unwrap().per_second(self.second())
    }

    pub fn api_call(&self, operation: &'static str, outcome: &'static str) {
        self.call_rate.lock().unwrap().record(self.second());
        *self
            .api_calls
            .lock()
            .unwrap()
            .entry((operation, outcome))
            .or_default() += 1;
    }

    /// Total API calls with the given operation, any outcome.
    pub fn api_calls(&self, operation: &str) -> u64 {
        let calls = self.api_calls.lock().unwrap();
        calls
            .iter()
            .filter(|((op, _), _)| *op == operation)
            .map(|(_, n)| n)
            .sum()
    }

    /// One SSM call (an attempt) sent to `region`, in its `role`
    /// (`primary`, or `failover` with --failover-region).
    pub fn region_call(&self, role: &'static str, region: &Arc<str>) {
        *self
            .region_calls
            .lock()
            .unwrap()
            .entry((role, region.clone()))
            .or_default() += 1;
    }

    /// SSM calls sent to the region in `role`, whichever region that is.
    pub fn region_calls(&self, role: &str) -> u64 {
        let calls = self.region_calls.lock().unwrap();
        calls
            .iter()
            .filter(|((r, _), _)| *r == role)
            .map(|(_, n)| n)
            .sum()
    }

    pub fn fuse_request(&self, operation: &'static str, elapsed: Duration) {
        let mut requests = self.fuse_requests.lock().unwrap();
        let histogram = requests.entry(operation).or_default();
        histogram.observe(elapsed.as_secs_f64(), &LATENCY_BUCKETS);
    }

    /// How long after a change its event was applied here.
    pub fn event_lag(&self, lag: Duration) {
        let mut histogram = self.event_lag.lock().unwrap();
        histogram.observe(lag.as_secs_f64(), &LAG_BUCKETS);
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::new();
        out.push_str("# HELP ssmfs_api_calls_total SSM API calls by operation and outcome.\n");
        out.push_str("# TYPE ssmfs_api_calls_total counter\n");
        for ((operation, outcome), n) in self.api_calls.lock().unwrap().iter() {
            let _ = writeln!(
                out,
                "ssmfs_api_calls_total{{operation=\"{operation}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        out.push_str("# HELP ssmfs_region_api_calls_total SSM API calls by region: the primary, and the failover region (--failover-region).\n");
        out.push_str("# TYPE ssmfs_region_api_calls_total counter\n");
        for ((role, region), n) in self.region_calls.lock().unwrap().iter() {
            // A region is a flag's text: quoted as Prometheus label values are.
            let region = region.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = writeln!(
                out,
                "ssmfs_region_api_calls_total{{role=\"{role}\",region=\"{region}\"}} {n}"
            );
        }
        let counters: [(&str, &str, &AtomicU64); 14] = [
            (
                "ssmfs_api_retries_total",
                "SSM calls retried after a retryable error.",
                &self.retries,
            ),
            (
                "ssmfs_api_throttles_total",
                "SSM calls answered with throttling.",
                &self.throttles,
            ),
            (
                "ssmfs_cache_hits_total",
                "Lookups answered from the cache.",
                &self.cache_hits,
            ),
            (
                "ssmfs_cache_misses_total",
                "Lookups that needed SSM.",
                &self.cache_misses,
            ),
            (
                "ssmfs_cache_evictions_total",
                "Entries evicted by the LRU bounds.",
                &self.cache_evictions,
            ),
            (
                "ssmfs_stale_serves_total",
                "Values served past their TTL because SSM failed.",
                &self.stale_serves,
            ),
            (
                "ssmfs_kernel_invalidations_total",
                "Kernel cache invalidations sent.",
                &self.invalidations,
            ),
            (
                "ssmfs_refresh_batches_total",
                "GetParameters calls that refreshed hot values ahead of expiry.",
                &self.refresh_batches,
            ),
            (
                "ssmfs_refreshed_values_total",
                "Values refreshed by those batches.",
                &self.refreshed_values,
            ),
            (
                "ssmfs_events_received_total",
                "Messages received from the change event queue.",
                &self.events_received,
            ),
            (
                "ssmfs_events_applied_total",
                "Change events about names cached here, fetched again.",
                &self.events_applied,
            ),
            (
                "ssmfs_events_ignored_total",
                "Change events that cost nothing: other prefixes, names not cached here, already applied, moved labels, other event types.",
                &self.events_ignored,
            ),
            (
                "ssmfs_events_malformed_total",
                "Queue messages that were not change events (deleted).",
                &self.events_malformed,
            ),
            (
                "ssmfs_event_queue_errors_total",
                "Receives from the change event queue that failed.",
                &self.event_queue_errors,
            ),
        ];
        for (name, help, counter) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                counter.load(Ordering::Relaxed)
            );
        }
        let gauge_rows = [
            (
                "ssmfs_cache_entries",
                "Values and listings held in the cache.",
                gauges.cache_entries,
            ),
            (
                "ssmfs_cache_notes",
                "Facts about paths held in the cache (refused listings, probe counts).",
                gauges.cache_notes,
            ),
            (
                "ssmfs_cache_bytes",
                "Bytes of values held in the cache.",
                gauges.cache_bytes,
            ),
            (
                "ssmfs_inodes",
                "Inodes the kernel currently references.",
                gauges.inodes,
            ),
        ];
        for (name, help, value) in gauge_rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP ssmfs_api_calls_per_second SSM calls per second over the last minute: this host's share of the account's quota (40 TPS by default, shared by every host and tool).\n# TYPE ssmfs_api_calls_per_second gauge\nssmfs_api_calls_per_second {:.3}",
            self.calls_per_second()
        );
        out.push_str("# HELP ssmfs_fuse_request_seconds FUSE requests by operation.\n");
        out.push_str("# TYPE ssmfs_fuse_request_seconds histogram\n");
        for (operation, h) in self.fuse_requests.lock().unwrap().iter() {
            let labels = format!("operation=\"{operation}\",");
            h.render(
                &mut out,
                "ssmfs_fuse_request_seconds",
                &labels,
                &LATENCY_BUCKETS,
            );
        }
        if let Some(counts) = self.supervisor.get() {
            let rows = [
                (
                    "ssmfs_supervisor_restarts_total",
                    "Serving daemons that died and were replaced (as of this daemon's start).",
                    counts[0] as f64,
                ),
                (
                    "ssmfs_supervisor_upgrades_total",
                    "Serving daemons replaced on SIGUSR2.",
                    counts[1] as f64,
                ),
                (
                    "ssmfs_supervisor_resent_requests_total",
                    "Requests a dead daemon left unanswered, sent again to its successor.",
                    counts[2] as f64,
                ),
                (
                    "ssmfs_supervisor_seconds_without_daemon_total",
                    "Time the mount waited for a serving daemon.",
                    counts[3] as f64 / 1000.0,
                ),
            ];
            for (name, help, value) in rows {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
                );
            }
        }
        out.push_str("# HELP ssmfs_event_lag_seconds From a parameter change (its event's time, whole seconds) to its fetch here.\n");
        out.push_str("# TYPE ssmfs_event_lag_seconds histogram\n");
        let lag = self.event_lag.lock().unwrap();
        lag.render(&mut out, "ssmfs_event_lag_seconds", "", &LAG_BUCKETS);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_call_rate_is_a_sliding_minute() {
        let mut rate = CallRate::default();
        for second in 0..60 {
            rate.record(second);
            rate.record(second);
        }
        assert_eq!(rate.per_second(59), 2.0);
        assert_eq!(rate.per_second(89), 1.0, "half the minute has passed");
        assert_eq!(rate.per_second(500), 0.0);
        rate.record(500);
        assert!((rate.per_second(500) - 1.0 / 60.0).abs() < 1e-9);
    }
}
