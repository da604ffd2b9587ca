//! Unit tests of `cache`, apart so the module reads as its model.

use super::*;
use crate::secret::SecretBytes;
use crate::store::ParameterKind;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::SystemTime;

fn parameter(name: &str, value: &str, version: i64) -> Known {
    Known::Present(Arc::new(Parameter {
        name: name.into(),
        value: SecretBytes::new(value.as_bytes().to_vec()),
        version,
        last_modified: SystemTime::now().into(),
        kind: ParameterKind::String,
        data_type: Default::default(),
    }))
}

fn cache(max_entries: usize, max_bytes: usize) -> Cache {
    let config = CacheConfig {
        max_entries,
        max_bytes,
        ..Default::default()
    };
    Cache::new(config, Arc::new(Metrics::default()))
}

#[test]
fn evicts_least_recently_used_by_count() {
    let cache = cache(2, usize::MAX);
    cache.put_value("/a", parameter("/a", "1", 1));
    cache.put_value("/b", parameter("/b", "2", 1));
    assert!(cache.value("/a").is_some());
    cache.put_value("/c", parameter("/c", "3", 1));
    assert!(cache.value("/b").is_none(), "b was least recently used");
    assert!(cache.value("/a").is_some() && cache.value("/c").is_some());
    assert_eq!(cache.usage().values, 2);
}

#[test]
fn evicts_by_bytes() {
    let cache = cache(100, 100);
    for i in 0..10 {
        cache.put_value(
            &format!("/p{i}"),
            parameter(&format!("/p{i}"), &"x".repeat(40), 1),
        );
    }
    let usage = cache.usage();
    assert!(usage.value_bytes <= 100, "{usage:?}");
    assert!(usage.values < 10);
}

#[test]
fn reports_changes_and_keeps_the_previous_version() {
    let cache = cache(10, usize::MAX);
    assert_eq!(
        cache.put_value("/a", parameter("/a", "1", 1)).0,
        Change::None
    );
    assert_eq!(
        cache.put_value("/a", parameter("/a", "1", 1)).0,
        Change::None
    );
    assert_eq!(
        cache.put_value("/a", parameter("/a", "22", 2)).0,
        Change::NewVersion
    );
    let entry = cache.value("/a").unwrap();
    assert_eq!(entry.previous.unwrap().version, 1);
    assert_eq!(cache.put_value("/a", Known::Absent).0, Change::Disappeared);
    assert_eq!(
        cache.put_value("/a", parameter("/a", "3", 3)).0,
        Change::Appeared
    );
}

#[test]
fn refresh_comes_before_expiry_with_jitter() {
    let cache = cache(10, usize::MAX);
    let ttl = Duration::from_secs(100);
    let points: Vec<Duration> = (0..50)
        .map(|_| {
            let v = cache.validity(ttl);
            assert!(v.refresh_at() < v.expires());
            v.refresh_at() - v.fetched
        })
        .collect();
    assert!(
        points.iter().any(|p| *p != points[0]),
        "refresh points must be jittered"
    );
}

#[tokio::test(start_paused = true)]
async fn only_read_values_due_soon_are_picked_for_a_refresh_batch() {
    let cache = cache(100, usize::MAX);
    let ttl = cache.config().ttl;
    for i in 0..20 {
        let name = format!("/k{i:02}");
        cache.put_value(&name, parameter(&name, "v", 1));
        if i % 2 == 0 {
            cache.mark_read(&name);
        }
    }
    cache.put_value("/absent", Known::Absent);
    cache.mark_read("/absent");
    let now = Instant::now();
    assert!(
        cache
            .due_for_refresh(now, ttl / 10, 10, |_| false)
            .is_empty(),
        "nothing due yet"
    );
    let due = cache.due_for_refresh(now, ttl, 10, |n| n == "/k00");
    assert_eq!(due.len(), 9, "the ten read ones, less the busy one");
    assert!(due
        .iter()
        .all(|n| n.as_ref() != "/k00" && n[2..].parse::<u32>().unwrap() % 2 == 0));
    tokio::time::advance(ttl).await;
    assert_eq!(
        cache
            .due_for_refresh(Instant::now(), ttl, 10, |_| false)
            .len(),
        10,
        "expired but still servable (an outage): retried in batches"
    );
}

#[tokio::test(start_paused = true)]
async fn refusals_expire_with_the_ttl_and_notes_stay_bounded() {
    let cache = cache(100, usize::MAX);
    assert!(cache.refuse_listing("/a"), "the first refusal is news");
    assert!(!cache.refuse_listing("/a"), "a repeated one is not");
    assert!(cache.listing_refused("/a", Instant::now()));
    tokio::time::advance(cache.config().ttl).await;
    assert!(!cache.listing_refused("/a", Instant::now()));
    assert!(cache.refuse_listing("/a"), "news again once expired");
    for i in 0..1_000 {
        cache.count_probe(&format!("/d{i}"));
    }
    assert_eq!(cache.usage().notes, 100);
    assert_eq!(cache.probes_below("/d999"), 1);
    assert_eq!(cache.probes_below("/d0"), 0, "the oldest were evicted");
}

#[tokio::test]
async fn single_flight_runs_one_call_for_concurrent_callers() {
    let flights: Arc<SingleFlight<String, u32>> = Arc::new(SingleFlight::default());
    let runs = Arc::new(AtomicU32::new(0));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (flights, runs) = (flights.clone(), runs.clone());
            tokio::spawn(async move {
                flights
                    .run("k".to_string(), || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        7
                    })
                    .await
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), 7);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
