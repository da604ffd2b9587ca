//! Pacing, retries and deadlines around any store.
//!
//! Every attempt first takes a token from a client-side budget of `max_tps`
//! calls per second (a token bucket holding `BURST_SECONDS` of them), so a
//! busy host queues instead of eating its account's shared SSM quota, while
//! a cold host's first reads go out at once. Readers go first: background
//! work leaves part of the bucket to them. Retryable failures (throttling,
//! 5xx, connection errors) are retried with exponential backoff and full
//! jitter, at most `max_retries` times, and the whole call including retries
//! must finish within `timeout` or fails with `Timeout`. Every attempt is
//! counted in the metrics by operation and outcome, and by region when the
//! store is told which one it talks to (`in_region`).
//!
//! Throttling is different for a reader who waits: SSM answers, just not yet
//! (a fleet booting at once shares 40 TPS), so a call made for a reader keeps
//! backing off (up to 30 s between attempts) for up to `throttle_patience`
//! rather than failing the read. Work done `in_background` (refreshes of
//! values that are still cached) gets no such patience: it fails fast and the
//! caller stretches its own cycle instead of retrying harder.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use super::{Batch, Page, PageContent, Parameter, ParameterStore, StoreError};
use crate::config::RequestConfig;
use crate::metrics::Metrics;

/// First backoff step; doubled per retry, capped by `MAX_BACKOFF`.
const BASE_BACKOFF: Duration = Duration::from_millis(100);
/// No single wait longer than this: the request deadline is a few seconds.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Seconds of the budget that may be spent at once: a cold Airflow task's
/// first reads (two calls each in a large directory) go out without waiting,
/// while over time the budget holds (see docs/CONFIGURATION.md, --max-tps).
const BURST_SECONDS: u32 = 5;
/// Share of the burst kept for readers: background work waits rather than
/// take it, so a reader arriving after a listing or refresh burst does not
/// queue behind it.
const READER_RESERVE: f64 = 0.5;
/// Longest wait between attempts of a throttled reader's call: long enough
/// that a booting fleet's retries stay a small share of the quota (1,000
/// hosts retrying every 15 s on average is 67 TPS of refused attempts).
const MAX_THROTTLE_BACKOFF: Duration = Duration::from_secs(30);

/// Work no reader is waiting for (a reader's work is not marked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unattended {
    /// Refreshes: not patient with throttling, retried like any call.
    Background,
    /// Work with a backoff of its own (change events): one attempt per call,
    /// so a throttled fleet does not multiply its calls by the retries.
    OneAttempt,
}

tokio::task_local! {
    static UNATTENDED: Unattended;
}

/// Whether the current task is doing background work (see `in_background`).
pub fn is_background() -> bool {
    UNATTENDED.try_with(|_| ()).is_ok()
}

/// Runs `work` as background work: its calls are not patient with throttling.
pub async fn in_background<F: Future>(work: F) -> F::Output {
    UNATTENDED.scope(Unattended::Background, work).await
}

/// Runs `work` as background work whose caller retries on its own schedule:
/// each call is made once.
pub async fn once_in_background<F: Future>(work: F) -> F::Output {
    UNATTENDED.scope(Unattended::OneAttempt, work).await
}

/// A token bucket: `max_tps` tokens a second, at most `BURST_SECONDS` of
/// them saved up. A reader's call takes a token or, when none is left, the
/// next one due (readers are served in the order they came). Work no reader
/// waits for takes a token only while `READER_RESERVE` of the bucket is
/// left, so listing pages and refreshes never make a reader wait.
struct Pacer {
    per_second: f64,
    burst: f64,
    reserve: f64,
    bucket: Mutex<Bucket>,
}

struct Bucket {
    /// Below zero: tokens promised to readers now waiting for them.
    tokens: f64,
    at: Instant,
}

impl Pacer {
    fn new(max_tps: u32) -> Self {
        let per_second = f64::from(max_tps.max(1));
        let burst = per_second * f64::from(BURST_SECONDS);
        Self {
            per_second,
            burst,
            reserve: burst * READER_RESERVE,
            bucket: Mutex::new(Bucket {
                tokens: burst,
                at: Instant::now(),
            }),
        }
    }

    async fn wait_turn(&self, background: bool) {
        loop {
            let wait = {
                let mut bucket = self.bucket.lock().unwrap();
                let now = Instant::now();
                let earned = now.duration_since(bucket.at).as_secs_f64() * self.per_second;
                bucket.tokens = (bucket.tokens + earned).min(self.burst);
                bucket.at = now;
                if background {
                    let needed = 1.0 + self.reserve;
                    if bucket.tokens >= needed {
                        bucket.tokens -= 1.0;
                        return;
                    }
                    Duration::from_secs_f64((needed - bucket.tokens) / self.per_second)
                } else {
                    bucket.tokens -= 1.0;
                    if bucket.tokens >= 0.0 {
                        return;
                    }
                    Duration::from_secs_f64(-bucket.tokens / self.per_second)
                }
            };
            tokio::time::sleep(wait).await;
            if !background {
                return; // the token was promised when the wait began
            }
        }
    }
}

pub struct Resilient<S> {
    inner: S,
    config: RequestConfig,
    pacer: Pacer,
    metrics: Arc<Metrics>,
    /// (role, region name) for `ssmfs_region_api_calls_total`, if known.
    region: Option<(&'static str, Arc<str>)>,
}

fn outcome<T>(result: &Result<T, StoreError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(StoreError::NotFound) => "not_found",
        Err(StoreError::AccessDenied { .. }) => "access_denied",
        Err(StoreError::Credentials(_)) => "credentials_rejected",
        Err(StoreError::IdentityRefused(_)) => "identity_refused",
        Err(StoreError::Throttled) => "throttled",
        Err(StoreError::Unavailable(_)) => "unavailable",
        Err(StoreError::Timeout) => "timeout",
        Err(StoreError::InvalidNextToken) => "invalid_next_token",
        Err(StoreError::Rejected { .. }) => "rejected",
    }
}

impl<S: ParameterStore> Resilient<S> {
    pub fn new(inner: S, config: RequestConfig, metrics: Arc<Metrics>) -> Self {
        let pacer = Pacer::new(config.max_tps);
        Self {
            inner,
            config,
            pacer,
            metrics,
            region: None,
        }
    }

    /// Counts this store's calls as calls to `region` in `role` (`primary`
    /// or `failover`).
    pub fn in_region(mut self, role: &'static str, region: &str) -> Self {
        self.region = Some((role, region.into()));
        self
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    async fn call<T, F, Fut>(&self, operation: &'static str, attempt: F) -> Result<T, StoreError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let unattended = UNATTENDED.try_with(|mode| *mode).ok();
        let patient = unattended.is_none();
        let max_retries = match unattended {
            Some(Unattended::OneAttempt) => 0,
            _ => self.config.max_retries,
        };
        let started = Instant::now();
        let deadline = started + self.config.timeout;
        let throttle_deadline = match patient {
            true => started + self.config.throttle_patience.max(self.config.timeout),
            false => deadline,
        };
        let mut limit = deadline;
        let mut tries = 0;
        loop {
            let remaining = limit.saturating_duration_since(Instant::now());
            let turn = async {
                self.pacer.wait_turn(unattended.is_some()).await;
                let result = attempt().await;
                self.metrics.api_call(operation, outcome(&result));
                if let Some((role, region)) = &self.region {
                    self.metrics.region_call(role, region);
                }
                result
            };
            let result = tokio::time::timeout(remaining, turn)
                .await
                .unwrap_or(Err(StoreError::Timeout));
            let (ceiling, budget) = match &result {
                Err(StoreError::Throttled) if patient && Instant::now() < throttle_deadline => {
                    limit = throttle_deadline;
                    (MAX_THROTTLE_BACKOFF, throttle_deadline)
                }
                Err(error) if error.is_retryable() && tries < max_retries => (MAX_BACKOFF, limit),
                _ => return result,
            };
            if matches!(result, Err(StoreError::Throttled)) {
                Metrics::inc(&self.metrics.throttles);
            }
            Metrics::inc(&self.metrics.retries);
            let step = (BASE_BACKOFF * 2u32.saturating_pow(tries.min(16))).min(ceiling);
            let jittered = rand::thread_rng().gen_range(Duration::ZERO..=step);
            tries += 1;
            if Instant::now() + jittered >= budget {
                return result;
            }
            tokio::time::sleep(jittered).await;
        }
    }
}

impl<S: ParameterStore> ParameterStore for Resilient<S> {
    async fn get(&self, name: &str) -> Result<Parameter, StoreError> {
        self.call("GetParameter", || self.inner.get(name)).await
    }

    async fn get_many(&self, names: &[&str]) -> Result<Batch, StoreError> {
        self.call("GetParameters", || self.inner.get_many(names))
            .await
    }

    async fn list_page(
        &self,
        path: &str,
        max_results: usize,
        next_token: Option<String>,
        content: PageContent,
    ) -> Result<Page, StoreError> {
        self.call("GetParametersByPath", || {
            self.inner
                .list_page(path, max_results, next_token.clone(), content)
        })
        .await
    }

    fn arn(&self, name: &str) -> Option<String> {
        self.inner.arn(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    fn resilient(config: RequestConfig) -> Resilient<MemoryStore> {
        let store = MemoryStore::new();
        store.put_string("/a", "1");
        Resilient::new(store, config, Arc::new(Metrics::default()))
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_is_retried_then_succeeds() {
        let store = resilient(RequestConfig::default());
        store.inner().fail_next_calls(2, StoreError::Throttled);
        assert!(store.get("/a").await.is_ok());
        assert_eq!(store.inner().counts().get, 3);
        assert_eq!(
            store
                .metrics
                .throttles
                .load(std::sync::atomic::Ordering::SeqCst),
            2
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_bounded() {
        let store = resilient(RequestConfig {
            max_retries: 3,
            ..Default::default()
        });
        store
            .inner()
            .fail_every_call(Some(StoreError::Unavailable("down".into())));
        assert!(store.get("/a").await.is_err());
        assert_eq!(store.inner().counts().get, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_waits_through_throttling_and_background_work_does_not() {
        let store = resilient(RequestConfig::default());
        store.inner().fail_every_call(Some(StoreError::Throttled));
        let started = Instant::now();
        assert_eq!(store.get("/a").await.unwrap_err(), StoreError::Throttled);
        let waited = started.elapsed();
        assert!(waited > RequestConfig::default().timeout, "{waited:?}");
        assert!(
            waited <= RequestConfig::default().throttle_patience,
            "{waited:?}"
        );
        let attempts = store.inner().counts().get;
        // Ten minutes of patience at up to 30 s (15 s on average) apart.
        assert!(attempts < 80, "backed off: {attempts} attempts");

        // Throttled for a dozen attempts, then answered: the reader gets its value.
        store.inner().fail_every_call(None);
        store.inner().fail_next_calls(12, StoreError::Throttled);
        assert!(store.get("/a").await.is_ok());

        let before = store.inner().counts().get;
        store.inner().fail_every_call(Some(StoreError::Throttled));
        let started = Instant::now();
        assert!(in_background(store.get("/a")).await.is_err());
        assert!(started.elapsed() <= RequestConfig::default().timeout);
        assert!(
            store.inner().counts().get - before <= 4,
            "no more than the retries"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn not_found_and_denied_are_not_retried() {
        let store = resilient(RequestConfig::default());
        assert_eq!(
            store.get("/missing").await.unwrap_err(),
            StoreError::NotFound
        );
        store
            .inner()
            .fail_name("/a", StoreError::access_denied("no"));
        assert!(store.get("/a").await.is_err());
        assert_eq!(store.inner().counts().get, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_store_times_out_at_the_deadline() {
        let store = resilient(RequestConfig {
            timeout: Duration::from_secs(2),
            ..Default::default()
        });
        store.inner().set_latency(Duration::from_secs(60));
        let started = Instant::now();
        assert_eq!(store.get("/a").await.unwrap_err(), StoreError::Timeout);
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_queues_calls_instead_of_failing_them() {
        let store = Arc::new(resilient(RequestConfig {
            max_tps: 5,
            timeout: Duration::from_secs(60),
            ..Default::default()
        }));
        let started = Instant::now();
        let calls: Vec<_> = (0..40)
            .map(|_| {
                let s = store.clone();
                tokio::spawn(async move { s.get("/a").await })
            })
            .collect();
        for call in calls {
            assert!(call.await.unwrap().is_ok());
        }
        // 25 go out as the burst (5 s of 5 TPS), the other 15 are spaced 200 ms apart.
        assert!(
            started.elapsed() >= Duration::from_millis(2900),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(store.inner().counts().get, 40);
    }

    #[tokio::test(start_paused = true)]
    async fn readers_go_ahead_of_background_work() {
        let store = Arc::new(resilient(RequestConfig {
            max_tps: 5,
            timeout: Duration::from_secs(60),
            ..Default::default()
        }));
        let background: Vec<_> = (0..30)
            .map(|_| {
                let s = store.clone();
                tokio::spawn(in_background(async move { s.get("/a").await }))
            })
            .collect();
        tokio::task::yield_now().await;
        // Background work took what it may of the burst and waits for more.
        let taken = store.inner().counts().get;
        assert!((10..=13).contains(&taken), "{taken}");
        let started = Instant::now();
        for _ in 0..12 {
            store.get("/a").await.unwrap();
        }
        assert_eq!(started.elapsed(), Duration::ZERO, "readers never waited");
        for call in background {
            assert!(call.await.unwrap().is_ok());
        }
        assert_eq!(store.inner().counts().get, 42);
    }
}
