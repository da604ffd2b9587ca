//! Core tests: the filesystem core driven directly (no mount) over the
//! in-memory store, proving caching and batching by counting store calls.
//! Time is tokio's paused clock, so TTLs are crossed by advancing it.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::Duration;

use ssmfs::config::{CacheConfig, FsConfig, RequestConfig};
use ssmfs::fs::ROOT_INO;
use ssmfs::fs::{Entry, FileKind, Fs, Invalidation};
use ssmfs::metrics::Metrics;
use ssmfs::store::failover::Failover;
use ssmfs::store::memory::{CallCounts, MemoryStore};
use ssmfs::store::resilient::Resilient;
use ssmfs::store::{ParameterKind, ParameterStore, StoreError};
use tokio::sync::mpsc::UnboundedReceiver;

type TestFs = Arc<Fs<Resilient<MemoryStore>>>;

fn config(prefix: &str) -> FsConfig {
    let mut config = FsConfig::new(prefix);
    config.cache = CacheConfig {
        ttl: Duration::from_secs(300),
        negative_ttl: Duration::from_secs(30),
        ..Default::default()
    };
    config.request = RequestConfig {
        max_tps: 10_000,
        ..Default::default()
    };
    // Change events refetch at once unless a test sets a fleet to pace for.
    config.events.quota_tps = u32::MAX;
    config
}

fn mount(store: MemoryStore, config: FsConfig) -> (TestFs, UnboundedReceiver<Invalidation>) {
    let metrics = Arc::new(Metrics::default());
    let store = Resilient::new(store, config.request.clone(), metrics.clone());
    Fs::new(store, config, metrics)
}

fn airflow_store() -> MemoryStore {
    let store = MemoryStore::new();
    store.put_string("/airflow/variables/my_secret", "s3cr3t-value");
    store.put_string("/airflow/variables/region", "eu-west-1");
    store.put(
        "/airflow/variables/list",
        b"a,b,c".to_vec(),
        ParameterKind::StringList,
    );
    store.put(
        "/airflow/connections/my_postgres",
        b"postgresql://u:p@h:5432/db".to_vec(),
        ParameterKind::SecureString,
    );
    store.put_string("/airflow/config/sql_alchemy_conn", "sqlite://");
    store.put_string("/other/thing", "not mounted");
    store
}

fn calls(fs: &TestFs) -> CallCounts {
    fs.store().inner().counts()
}

async fn walk<S: ParameterStore>(fs: &Arc<Fs<S>>, path: &str) -> Result<Entry, i32> {
    let mut ino = ROOT_INO;
    let mut last = None;
    for segment in path.split('/') {
        let entry = fs
            .lookup(ino, OsStr::new(segment))
            .await
            .map_err(|e| e.errno())?;
        ino = entry.attr.ino;
        last = Some(entry);
    }
    Ok(last.expect("non-empty path"))
}

async fn cat<S: ParameterStore>(fs: &Arc<Fs<S>>, path: &str) -> Result<Vec<u8>, i32> {
    let entry = walk(fs, path).await?;
    let data = fs
        .read(entry.attr.ino, 0, 1 << 20)
        .await
        .map_err(|e| e.errno())?;
    assert_eq!(
        data.bytes().len() as u64,
        entry.attr.size,
        "st_size must equal the bytes read"
    );
    Ok(data.bytes().to_vec())
}

/// Reads a directory handle in small batches, continuing from the last
/// offset as the kernel does.
fn read_whole_dir<S: ParameterStore>(
    fs: &Arc<Fs<S>>,
    handle: u64,
) -> Result<Vec<(u64, ssmfs::fs::DirItem)>, ssmfs::fs::FsError> {
    let mut items = Vec::new();
    loop {
        let offset = items.last().map_or(0, |(o, _)| *o);
        let batch = fs.readdir(handle, offset, 7)?;
        if batch.is_empty() {
            return Ok(items);
        }
        items.extend(batch);
    }
}

async fn ls<S: ParameterStore>(
    fs: &Arc<Fs<S>>,
    path: &str,
) -> Result<Vec<(String, FileKind)>, i32> {
    let ino = if path.is_empty() {
        ROOT_INO
    } else {
        walk(fs, path).await?.attr.ino
    };
    let handle = fs.opendir(ino).await.map_err(|e| e.errno())?;
    let items = read_whole_dir(fs, handle).map_err(|e| e.errno())?;
    fs.releasedir(handle);
    Ok(items
        .into_iter()
        .map(|(_, i)| (i.name, i.kind))
        .filter(|(n, _)| n != "." && n != "..")
        .collect())
}

#[tokio::test(start_paused = true)]
async fn mounting_costs_nothing_and_cat_returns_exact_bytes() {
    let (fs, _inval) = mount(airflow_store(), config("/airflow"));
    assert_eq!(calls(&fs).total(), 0, "mounting makes no API call");
    assert_eq!(
        cat(&fs, "variables/my_secret").await.unwrap(),
        b"s3cr3t-value"
    );
    assert_eq!(cat(&fs, "variables/list").await.unwrap(), b"a,b,c");
    assert_eq!(
        cat(&fs, "connections/my_postgres").await.unwrap(),
        b"postgresql://u:p@h:5432/db"
    );
}

#[tokio::test(start_paused = true)]
async fn a_cold_cat_costs_one_round_trip_per_component_and_a_warm_one_nothing() {
    let store = MemoryStore::new();
    // Enough siblings that no listing page covers the whole directory.
    for i in 0..40 {
        store.put_string(&format!("/p/a/b/x{i:02}"), "v");
    }
    store.put_string("/p/a/b/target", "value");
    store.set_latency(Duration::from_millis(100));
    let (fs, _inval) = mount(store, config("/p"));
    let started = tokio::time::Instant::now();
    assert_eq!(cat(&fs, "a/b/target").await.unwrap(), b"value");
    let round_trips = started.elapsed().as_millis() / 100;
    assert!(
        round_trips <= 3,
        "3 components took {round_trips} sequential round trips"
    );
    assert!(calls(&fs).total() <= 6, "{:?}", calls(&fs));
    let before = calls(&fs);
    for _ in 0..10 {
        assert_eq!(cat(&fs, "a/b/target").await.unwrap(), b"value");
    }
    assert_eq!(calls(&fs), before, "warm reads within the TTL make no call");
}

#[tokio::test(start_paused = true)]
async fn listing_a_directory_costs_a_page_per_ten_and_fills_the_cache() {
    let store = MemoryStore::new();
    for i in 0..250 {
        store.put_string(&format!("/p/big/k{i:03}"), &format!("value-{i}"));
    }
    let (fs, _inval) = mount(store, config("/p"));
    let entries = ls(&fs, "big").await.unwrap();
    assert_eq!(entries.len(), 250);
    let after_ls = calls(&fs);
    assert!(
        after_ls.total() <= 25 + 1 + 2,
        "ls of 250 cost {after_ls:?}"
    );
    for i in 0..250 {
        assert_eq!(
            cat(&fs, &format!("big/k{i:03}")).await.unwrap(),
            format!("value-{i}").as_bytes()
        );
    }
    assert_eq!(calls(&fs), after_ls, "every value came from the listing");
}

#[tokio::test(start_paused = true)]
async fn a_whole_tree_walk_costs_one_listing() {
    let (fs, _inval) = mount(airflow_store(), config("/airflow"));
    let mut top = ls(&fs, "").await.unwrap();
    top.sort();
    assert_eq!(
        top,
        vec![
            ("config".into(), FileKind::Dir),
            ("connections".into(), FileKind::Dir),
            ("variables".into(), FileKind::Dir)
        ]
    );
    let after = calls(&fs);
    assert_eq!(after.list_page, 1, "5 parameters fit one page");
    assert_eq!(ls(&fs, "variables").await.unwrap().len(), 3);
    assert_eq!(
        cat(&fs, "config/sql_alchemy_conn").await.unwrap(),
        b"sqlite://"
    );
    assert_eq!(
        calls(&fs),
        after,
        "subdirectories were known complete from the root listing"
    );
}

#[tokio::test(start_paused = true)]
async fn the_lru_keeps_at_most_its_bound_and_refetches_correctly() {
    let store = MemoryStore::new();
    for i in 0..1000 {
        store.put_string(&format!("/p/k{i:04}"), &format!("v{i}"));
    }
    let mut config = config("/p");
    config.cache.max_entries = 100;
    let (fs, _inval) = mount(store, config);
    for round in 0..2 {
        for i in 0..1000 {
            assert_eq!(
                cat(&fs, &format!("k{i:04}")).await.unwrap(),
                format!("v{i}").as_bytes(),
                "round {round}"
            );
            assert!(fs.cached_values() <= 100);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn impossible_names_are_answered_without_a_call() {
    let (fs, _inval) = mount(airflow_store(), config("/airflow"));
    for bad in ["caf\u{e9}", "a b", "semi;colon", "..", "@value", "star*"] {
        assert_eq!(
            fs.lookup(ROOT_INO, OsStr::new(bad))
                .await
                .unwrap_err()
                .errno(),
            libc::ENOENT,
            "{bad}"
        );
    }
    let long = "a".repeat(1100);
    assert_eq!(
        fs.lookup(ROOT_INO, OsStr::new(&long))
            .await
            .unwrap_err()
            .errno(),
        libc::ENAMETOOLONG
    );
    let (root_fs, _i) = mount(MemoryStore::new(), config("/"));
    assert_eq!(
        root_fs
            .lookup(ROOT_INO, OsStr::new("ssm-x"))
            .await
            .unwrap_err()
            .errno(),
        libc::ENOENT
    );
    assert_eq!(root_fs.store().inner().counts().total(), 0);
    assert_eq!(calls(&fs).total(), 0);
}

#[tokio::test(start_paused = true)]
async fn too_deep_names_are_refused_without_a_call() {
    let store = MemoryStore::new();
    let deep = (1..=15)
        .map(|i| format!("l{i}"))
        .collect::<Vec<_>>()
        .join("/");
    store.put_string(&format!("/{deep}"), "deepest");
    let (fs, _inval) = mount(store, config("/"));
    assert_eq!(cat(&fs, &deep).await.unwrap(), b"deepest");
    let before = calls(&fs).total();
    let deepest = walk(&fs, &deep).await.unwrap();
    // Nothing can exist below level 15: the 15-level name is a file, never a directory.
    let below = fs.lookup(deepest.attr.ino, OsStr::new("x")).await;
    assert_eq!(below.unwrap_err().errno(), libc::ENOTDIR);
    assert_eq!(calls(&fs).total(), before);
}

#[tokio::test(start_paused = true)]
async fn missing_names_are_enoent_and_cached_negatively() {
    let (fs, _inval) = mount(airflow_store(), config("/airflow"));
    let _ = ls(&fs, "variables").await.unwrap();
    let before = calls(&fs);
    assert_eq!(cat(&fs, "variables/nope").await.unwrap_err(), libc::ENOENT);
    assert_eq!(
        calls(&fs),
        before,
        "a complete listing already says it does not exist"
    );
    assert_eq!(cat(&fs, "nothere").await.unwrap_err(), libc::ENOENT);
    let after_first = calls(&fs);
    assert_eq!(cat(&fs, "nothere").await.unwrap_err(), libc::ENOENT);
    assert_eq!(calls(&fs), after_first, "negative answers are cached");
}

#[tokio::test(start_paused = true)]
async fn one_failing_parameter_never_breaks_the_rest() {
    let store = airflow_store();
    store.fail_name(
        "/airflow/variables/region",
        StoreError::access_denied("not allowed"),
    );
    let (fs, _inval) = mount(store, config("/airflow"));
    assert_eq!(
        cat(&fs, "variables/my_secret").await.unwrap(),
        b"s3cr3t-value"
    );
    assert_eq!(
        cat(&fs, "variables/region").await.unwrap_err(),
        libc::EACCES
    );
    assert_eq!(
        cat(&fs, "connections/my_postgres").await.unwrap(),
        b"postgresql://u:p@h:5432/db"
    );
}

#[tokio::test(start_paused = true)]
async fn concurrent_cold_reads_of_one_name_cost_one_call() {
    let store = airflow_store();
    store.set_latency(Duration::from_millis(50));
    let (fs, _inval) = mount(store, config("/airflow"));
    let variables = walk(&fs, "variables").await.unwrap().attr.ino;
    let before = calls(&fs);
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let fs = fs.clone();
            tokio::spawn(async move {
                fs.lookup(variables, OsStr::new("brand_new"))
                    .await
                    .map(|e| e.attr.size)
            })
        })
        .collect();
    fs.store()
        .inner()
        .put_string("/airflow/variables/brand_new", "fresh");
    for task in tasks {
        let _ = task.await.unwrap();
    }
    let after = calls(&fs);
    assert!(
        after.get - before.get <= 1 && after.list_page - before.list_page <= 1,
        "{before:?} -> {after:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_rotated_value_is_seen_after_the_ttl_and_the_kernel_is_told() {
    let (fs, mut invalidations) = mount(airflow_store(), config("/airflow"));
    assert_eq!(
        cat(&fs, "variables/my_secret").await.unwrap(),
        b"s3cr3t-value"
    );
    let ino = walk(&fs, "variables/my_secret").await.unwrap().attr.ino;
    fs.store()
        .inner()
        .put_string("/airflow/variables/my_secret", "rotated-and-longer");
    assert_eq!(
        cat(&fs, "variables/my_secret").await.unwrap(),
        b"s3cr3t-value",
        "within the TTL"
    );
    tokio::time::advance(Duration::from_secs(301)).await;
    assert_eq!(
        cat(&fs, "variables/my_secret").await.unwrap(),
        b"rotated-and-longer"
    );
    let mut told = Vec::new();
    while let Ok(i) = invalidations.try_recv() {
        told.push(i);
    }
    assert!(told.contains(&Invalidation::Inode(ino)), "{told:?}");
}

#[tokio::test(start_paused = true)]
async fn a_reader_told_the_old_size_gets_the_old_value_whole() {
    let (fs, _inval) = mount(airflow_store(), config("/airflow"));
    let entry = walk(&fs, "variables/my_secret").await.unwrap();
    fs.store()
        .inner()
        .put_string("/airflow/variables/my_secret", "new-much-longer-value");
    tokio::time::advance(Duration::from_secs(301)).await;
    // The kernel still holds the old size; the value is refreshed underneath it.
    let data = fs.read(entry.attr.ino, 0, 4096).await.unwrap();
    assert_eq!(data.bytes(), b"s3cr3t-value");
    let fresh = walk(&fs, "variables/my_secret").await.unwrap();
    assert_eq!(
        fs.read(fresh.attr.ino, 0, 4096).await.unwrap().bytes(),
        b"new-much-longer-value"
    );
}

#[tokio::test(start_paused = true)]
async fn deleted_and_new_parameters_show_up_within_the_ttl() {
    let (fs, _inval) = mount(airflow_store(), config("/airflow"));
    assert_eq!(ls(&fs, "variables").await.unwrap().len(), 3);
    fs.store().inner().delete("/airflow/variables/region");
    fs.store()
        .inner()
        .put_string("/airflow/variables/added", "x");
    tokio::time::advance(Duration::from_secs(301)).await;
    let names: Vec<String> = ls(&fs, "variables")
        .await
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(
        names.contains(&"added".to_string()) && !names.contains(&"region".to_string()),
        "{names:?}"
    );
    assert_eq!(
        cat(&fs, "variables/region").await.unwrap_err(),
        libc::ENOENT
    );
    assert_eq!(cat(&fs, "variables/added").await.unwrap(), b"x");
}

#[tokio::test(start_paused = true)]
async fn hot_values_are_refreshed_ahead_of_expiry_without_blocking_readers() {
    let (fs, _inval) = mount(airflow_store(), config("/airflow"));
    assert_eq!(
        cat(&fs, "variables/my_secret").await.unwrap(),
        b"s3cr3t-value"
    );
    let before = calls(&fs);
    fs.store()
        .inner()
        .put_string("/airflow/variables/my_secret", "rotated");
    fs.store().inner().set_latency(Duration::from_secs(1));
    // Past the refresh point (at most 97% of the TTL) but before expiry.
    tokio::time::advance(Duration::from_secs(292)).await;
    let started = tokio::time::Instant::now();
    assert_eq!(
        cat(&fs, "variables/my_secret").await.unwrap(),
        b"s3cr3t-value"
    );
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "the reader did not wait for SSM"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(calls(&fs).get, before.get + 1, "one background refresh");
    assert_eq!(cat(&fs, "variables/my_secret").await.unwrap(), b"rotated");
}

#[tokio::test(start_paused = true)]
async fn an_outage_serves_cached_values_stale_and_fails_uncached_ones_with_eio() {
    let mut config = config("/airflow");
    config.request.timeout = Duration::from_secs(3);
    let (fs, _inval) = mount(airflow_store(), config);
    assert_eq!(
        cat(&fs, "variables/my_secret").await.unwrap(),
        b"s3cr3t-value"
    );
    fs.store()
        .inner()
        .fail_every_call(Some(StoreError::Unavailable("connection refused".into())));
    tokio::time::advance(Duration::from_secs(400)).await;
    assert_eq!(
        cat(&fs, "variables/my_secret").await.unwrap(),
        b"s3cr3t-value",
        "stale but whole"
    );
    let started = tokio::time::Instant::now();
    assert_eq!(
        cat(&fs, "connections/my_postgres").await.unwrap_err(),
        libc::EIO
    );
    assert!(
        started.elapsed() <= Duration::from_secs(3),
        "EIO within the request deadline"
    );
    fs.store().inner().fail_every_call(None);
    tokio::time::advance(Duration::from_secs(11)).await;
    assert_eq!(
        cat(&fs, "connections/my_postgres").await.unwrap(),
        b"postgresql://u:p@h:5432/db",
        "recovers"
    );
}

#[tokio::test(start_paused = true)]
async fn stale_serving_ends_after_the_stale_ttl() {
    let mut config = config("/airflow");
    config.cache.stale_ttl = Duration::from_secs(60);
    let (fs, _inval) = mount(airflow_store(), config);
    assert_eq!(
        cat(&fs, "variables/my_secret").await.unwrap(),
        b"s3cr3t-value"
    );
    fs.store()
        .inner()
        .fail_every_call(Some(StoreError::Throttled));
    tokio::time::advance(Duration::from_secs(300 + 61)).await;
    assert_eq!(
        cat(&fs, "variables/my_secret").await.unwrap_err(),
        libc::EIO
    );
}

#[tokio::test(start_paused = true)]
async fn directory_wins_and_the_shadowed_value_stays_reachable() {
    let store = MemoryStore::new();
    store.put_string("/p/db", "i am shadowed");
    store.put_string("/p/db/password", "pw");
    let (fs, _inval) = mount(store, config("/p"));
    let db = walk(&fs, "db").await.unwrap();
    assert_eq!(db.attr.kind, FileKind::Dir);
    assert_eq!(cat(&fs, "db/password").await.unwrap(), b"pw");
    assert_eq!(cat(&fs, "db/@value").await.unwrap(), b"i am shadowed");
    let names: Vec<String> = ls(&fs, "db")
        .await
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, vec!["@value", "password"]);
}

#[tokio::test(start_paused = true)]
async fn exact_bytes_for_unicode_control_characters_and_large_values() {
    let store = MemoryStore::new();
    let unicode = "päss\u{1F511}\n\t\u{7}end".as_bytes().to_vec();
    let large: Vec<u8> = (0..8192u32).map(|i| b'a' + (i % 26) as u8).collect();
    store.put("/p/unicode", unicode.clone(), ParameterKind::SecureString);
    store.put("/p/large", large.clone(), ParameterKind::String);
    store.put("/p/empty", Vec::new(), ParameterKind::String);
    let (fs, _inval) = mount(store, config("/p"));
    assert_eq!(cat(&fs, "unicode").await.unwrap(), unicode);
    assert_eq!(cat(&fs, "large").await.unwrap(), large);
    assert_eq!(cat(&fs, "empty").await.unwrap(), b"");
    let entry = walk(&fs, "large").await.unwrap();
    let tail = fs.read(entry.attr.ino, 8000, 4096).await.unwrap();
    assert_eq!(tail.bytes(), &large[8000..]);
}

#[tokio::test(start_paused = true)]
async fn throttling_is_retried_and_counted() {
    let (fs, _inval) = mount(airflow_store(), config("/airflow"));
    fs.store().inner().fail_next_calls(2, StoreError::Throttled);
    assert_eq!(
        cat(&fs, "variables/my_secret").await.unwrap(),
        b"s3cr3t-value"
    );
    assert!(
        fs.metrics()
            .throttles
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 1
    );
}

#[tokio::test(start_paused = true)]
async fn drop_caches_makes_the_next_read_fetch_again() {
    let (fs, _inval) = mount(airflow_store(), config("/airflow"));
    assert_eq!(
        cat(&fs, "variables/my_secret").await.unwrap(),
        b"s3cr3t-value"
    );
    fs.store()
        .inner()
        .put_string("/airflow/variables/my_secret", "after-hup");
    fs.drop_caches();
    assert_eq!(cat(&fs, "variables/my_secret").await.unwrap(), b"after-hup");
}

#[tokio::test(start_paused = true)]
async fn a_directory_of_ten_thousand_lists_completely() {
    let store = MemoryStore::new();
    for i in 0..10_000 {
        store.put_string(&format!("/p/many/n{i:05}"), "v");
    }
    let (fs, _inval) = mount(store, config("/p"));
    assert_eq!(ls(&fs, "many").await.unwrap().len(), 10_000);
    assert!(calls(&fs).list_page <= 1001 + 1);
}

#[tokio::test(start_paused = true)]
async fn ls_after_a_lookup_continues_the_first_page_instead_of_rereading_it() {
    let store = MemoryStore::new();
    for i in 0..1000 {
        store.put_string(&format!("/p/big/k{i:04}"), "v");
    }
    let (fs, _inval) = mount(store, config("/p"));
    assert_eq!(ls(&fs, "big").await.unwrap().len(), 1000);
    let c = calls(&fs);
    // lookup of "big": one GetParameter and the first page; ls: the other 99 pages.
    assert_eq!(c.list_page, 100, "{c:?}");
    assert_eq!(c.total(), 1000 / 10 + 1, "ceil(N/10)+1 calls, {c:?}");
}

#[tokio::test(start_paused = true)]
async fn reading_many_siblings_costs_a_page_per_ten_in_any_order() {
    for (n, order) in [
        (50, "ascending"),
        (50, "descending"),
        (50, "scattered"),
        (100, "descending"),
    ] {
        let store = MemoryStore::new();
        store.put_string(
            "/p/first",
            "a sibling of vars, so the mount check sees vars",
        );
        for i in 0..n {
            store.put_string(&format!("/p/vars/v{i:03}"), &format!("value-{i}"));
        }
        let (fs, _inval) = mount(store, config("/p"));
        fs.check_access().await.unwrap();
        let before = calls(&fs).total();
        let indexes: Vec<usize> = match order {
            "ascending" => (0..n).collect(),
            "descending" => (0..n).rev().collect(),
            _ => (0..n).map(|i| (i * 37) % n).collect(), // 37 is coprime with 50 and 100
        };
        for i in indexes {
            assert_eq!(
                cat(&fs, &format!("vars/v{i:03}")).await.unwrap(),
                format!("value-{i}").as_bytes()
            );
        }
        let cost = calls(&fs).total() - before;
        assert!(
            cost <= (n as u64).div_ceil(10) + 3,
            "{n} siblings read {order}: {cost} calls"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_one_off_read_still_costs_one_round_trip() {
    let store = MemoryStore::new();
    for i in 0..500 {
        store.put_string(&format!("/p/big/k{i:03}"), "v");
    }
    let (fs, _inval) = mount(store, config("/p"));
    assert_eq!(cat(&fs, "big/k321").await.unwrap(), b"v");
    // The root listing page that shows `big`, then one probe of the name:
    // value and first page below it, together.
    assert!(calls(&fs).total() <= 4, "{:?}", calls(&fs));
}

#[tokio::test(start_paused = true)]
async fn the_airflow_layout_maps_folders_to_prefixes_and_filters_keys() {
    let kwargs = r#"{"variables_prefix": "airflow/variables", "connections_prefix": "airflow/connections/",
                     "config_prefix": null, "connections_lookup_pattern": "my_"}"#;
    let airflow = ssmfs::airflow::parse(kwargs).unwrap();
    let mut config = config("/");
    config.areas = airflow.areas;
    let store = airflow_store();
    store.put_string("/airflow/connections/other_db", "hidden by the pattern");
    let (fs, _inval) = mount(store, config);
    let mut top: Vec<String> = ls(&fs, "")
        .await
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    top.sort();
    assert_eq!(
        top,
        vec!["connections", "variables"],
        "config_prefix null leaves config out"
    );
    assert_eq!(calls(&fs).total(), 0, "the root is known without SSM");
    assert_eq!(
        cat(&fs, "variables/my_secret").await.unwrap(),
        b"s3cr3t-value"
    );
    assert_eq!(
        cat(&fs, "connections/MY_postgres").await.unwrap_err(),
        libc::ENOENT
    );
    assert_eq!(
        cat(&fs, "connections/my_postgres").await.unwrap(),
        b"postgresql://u:p@h:5432/db"
    );
    let before = calls(&fs);
    assert_eq!(
        cat(&fs, "connections/other_db").await.unwrap_err(),
        libc::ENOENT
    );
    assert_eq!(
        calls(&fs),
        before,
        "a key the pattern refuses costs no call"
    );
    let conns: Vec<String> = ls(&fs, "connections")
        .await
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        conns,
        vec!["my_postgres"],
        "refused keys are left out of listings"
    );
    assert_eq!(
        cat(&fs, "config/sql_alchemy_conn").await.unwrap_err(),
        libc::ENOENT
    );
}

mod model {
    //! A random tree served from the in-memory store equals a model of it when
    //! walked through the core (listing every directory, reading every file).

    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// What the tree should look like: path below the mount -> file contents.
    /// A name that also has parameters below it is a directory whose own value
    /// is `@value` inside it (directory wins).
    fn expected(params: &BTreeMap<String, Vec<u8>>) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        for (name, value) in params {
            let relative = name.strip_prefix("/m/").unwrap().to_string();
            let prefix = format!("{name}/");
            let shadowed = params.keys().any(|other| other.starts_with(&prefix));
            let path = if shadowed {
                format!("{relative}/@value")
            } else {
                relative
            };
            out.insert(path, value.clone());
        }
        out
    }

    async fn walk_all(fs: &TestFs, ino: u64, path: String, out: &mut BTreeMap<String, Vec<u8>>) {
        let handle = fs.opendir(ino).await.unwrap();
        let items = super::read_whole_dir(fs, handle).unwrap();
        fs.releasedir(handle);
        for (_, item) in items
            .into_iter()
            .filter(|(_, i)| i.name != "." && i.name != "..")
        {
            let child = if path.is_empty() {
                item.name.clone()
            } else {
                format!("{path}/{}", item.name)
            };
            let entry = fs.lookup(ino, OsStr::new(&item.name)).await.unwrap();
            assert_eq!(entry.attr.kind, item.kind, "{child}");
            if item.kind == FileKind::Dir {
                Box::pin(walk_all(fs, entry.attr.ino, child, out)).await;
            } else {
                let data = fs.read(entry.attr.ino, 0, 1 << 16).await.unwrap();
                assert_eq!(data.bytes().len() as u64, entry.attr.size);
                out.insert(child, data.bytes().to_vec());
            }
        }
    }

    fn tree() -> impl Strategy<Value = BTreeMap<String, Vec<u8>>> {
        let segment = prop::sample::select(vec!["a", "b", "c", "x.y", "_z", "a-1"]);
        let name = prop::collection::vec(segment, 1..5).prop_map(|s| format!("/m/{}", s.join("/")));
        let value = prop::collection::vec(any::<u8>(), 0..64);
        prop::collection::btree_map(name, value, 1..40)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn a_random_tree_walks_as_modelled(params in tree(), small_cache in any::<bool>()) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let store = MemoryStore::new();
                for (name, value) in &params {
                    store.put(name, value.clone(), ParameterKind::String);
                }
                let mut config = config("/m");
                if small_cache {
                    config.cache.max_entries = 3;
                }
                let (fs, _inval) = mount(store, config);
                let mut seen = BTreeMap::new();
                walk_all(&fs, ROOT_INO, String::new(), &mut seen).await;
                assert_eq!(seen, expected(&params));
            });
        }

        #[test]
        fn random_operations_answer_as_modelled(
            initial in small_tree(),
            ops in prop::collection::vec(operation(), 1..40),
            small_cache in any::<bool>(),
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .unwrap();
            runtime.block_on(run_operations(initial, ops, small_cache));
        }
    }

    // ----- the reference model of operations (after mountpoint-s3's reftests) -----
    //
    // SSM is the truth; the core caches it for a TTL. So the model keeps every
    // state of the store since the last moment the core must agree with it
    // exactly (the mount, or a clock advanced past every TTL), and accepts an
    // answer that some state in that window gives. A file's kind (from a
    // listing) and its bytes (from its value) are cached apart, so each may
    // come from a different state of the window. An update event narrows that:
    // after one, the name's bytes are the store's latest.

    /// The names the operations touch: few, so that a name and names below
    /// it (a directory with its own value) meet often.
    const NAMES: [&str; 8] = ["a", "b", "a/a", "a/b", "b/a", "a/a/a", "a/b/a", "b/a/b"];
    const VALUES: [&str; 4] = ["", "v1", "value two", "a longer value, three"];

    fn small_tree() -> impl Strategy<Value = BTreeMap<String, Vec<u8>>> {
        let entry = (0..NAMES.len(), 0..VALUES.len())
            .prop_map(|(n, v)| (format!("/m/{}", NAMES[n]), VALUES[v].as_bytes().to_vec()));
        prop::collection::vec(entry, 0..6).prop_map(|entries| entries.into_iter().collect())
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Someone puts a value in SSM (a create or an update).
        Put(usize, usize),
        /// Someone deletes a parameter in SSM.
        Delete(usize),
        /// A change event for the name arrives, saying what SSM now holds.
        Event(usize),
        /// The clock moves on this many seconds.
        Advance(u64),
        /// `cat` of a path: every component looked up, then read whole.
        Read(usize),
        /// A path looked up, then its attributes and one extended attribute.
        Stat(usize),
        /// `ls` of a directory path.
        List(usize),
    }

    /// Paths below the mount the queries ask about: every name, and its `@value`.
    fn paths() -> Vec<String> {
        NAMES
            .iter()
            .flat_map(|n| [n.to_string(), format!("{n}/@value")])
            .collect()
    }

    fn operation() -> impl Strategy<Value = Op> {
        let name = 0..NAMES.len();
        let path = 0..NAMES.len() * 2;
        prop_oneof![
            3 => (name.clone(), 0..VALUES.len()).prop_map(|(n, v)| Op::Put(n, v)),
            2 => name.clone().prop_map(Op::Delete),
            2 => name.prop_map(Op::Event),
            // Within the negative TTL, past it, past the TTL.
            2 => prop::sample::select(vec![1u64, 31, 301]).prop_map(Op::Advance),
            4 => path.clone().prop_map(Op::Read),
            3 => path.prop_map(Op::Stat),
            // The root, and each name as a directory.
            2 => (0..=NAMES.len()).prop_map(Op::List),
        ]
    }

    /// What one path is in one state of the store.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Answer {
        File(Vec<u8>),
        Dir,
        Missing,
    }

    fn answer_in(tree: &BTreeMap<String, Vec<u8>>, path: &str) -> Answer {
        if let Some(bytes) = tree.get(path) {
            return Answer::File(bytes.clone());
        }
        let below = format!("{path}/");
        if path.is_empty() || tree.keys().any(|k| k.starts_with(&below)) {
            return Answer::Dir;
        }
        Answer::Missing
    }

    /// The entries of the directory `path` in one state's tree.
    fn entries_in(tree: &BTreeMap<String, Vec<u8>>, path: &str) -> BTreeMap<String, FileKind> {
        let below = if path.is_empty() {
            String::new()
        } else {
            format!("{path}/")
        };
        tree.keys()
            .filter_map(|k| k.strip_prefix(&below))
            .map(|rest| match rest.split_once('/') {
                Some((child, _)) => (child.to_string(), FileKind::Dir),
                None => (rest.to_string(), FileKind::File),
            })
            .collect()
    }

    /// The parameter whose value a path's file shows.
    fn parameter_of(path: &str) -> String {
        format!("/m/{}", path.strip_suffix("/@value").unwrap_or(path))
    }

    struct Model {
        /// What SSM holds now.
        remote: BTreeMap<String, Vec<u8>>,
        /// Each state of SSM since the core last had to agree exactly, as the
        /// tree the mount shows (`expected`), oldest first; the last is now.
        window: Vec<BTreeMap<String, Vec<u8>>>,
        /// Values of SSM in that window, by parameter name.
        values_seen: BTreeMap<String, Vec<Vec<u8>>>,
        /// Names an update event made the core fetch again: their bytes are
        /// the latest until SSM changes them again.
        fetched_by_event: std::collections::BTreeSet<String>,
        /// Names a delete event was applied for in the window: the cached
        /// listings above them lose every directory the delete emptied, even
        /// one that keeps (or has since gained) a value of its own, until the
        /// listing is read again (a known gap of `fs::apply_events`).
        deleted_by_event: Vec<String>,
    }

    impl Model {
        fn new(remote: BTreeMap<String, Vec<u8>>) -> Self {
            let mut model = Model {
                window: Vec::new(),
                values_seen: BTreeMap::new(),
                fetched_by_event: Default::default(),
                deleted_by_event: Vec::new(),
                remote,
            };
            model.settle();
            model
        }

        /// The core must now agree with SSM exactly.
        fn settle(&mut self) {
            self.window = vec![expected(&self.remote)];
            self.values_seen = self
                .remote
                .iter()
                .map(|(k, v)| (k.clone(), vec![v.clone()]))
                .collect();
            self.deleted_by_event.clear();
        }

        /// Whether `path` is a directory above a name a delete event removed.
        fn emptied_by_event(&self, path: &str) -> bool {
            let below = format!("/m/{path}/");
            self.deleted_by_event
                .iter()
                .any(|name| name.starts_with(&below))
        }

        fn changed(&mut self, name: &str) {
            self.fetched_by_event.remove(name);
            self.window.push(expected(&self.remote));
            if let Some(value) = self.remote.get(name) {
                self.values_seen
                    .entry(name.to_string())
                    .or_default()
                    .push(value.clone());
            }
        }

        fn check(&self, path: &str, got: &Answer) {
            let allowed: Vec<Answer> = self.window.iter().map(|t| answer_in(t, path)).collect();
            let parameter = parameter_of(path);
            let ok = match got {
                // Kind and bytes each from some state in the window.
                Answer::File(bytes) => {
                    let bytes_ok = match self.fetched_by_event.contains(&parameter) {
                        true => self.remote.get(&parameter) == Some(bytes),
                        false => self
                            .values_seen
                            .get(&parameter)
                            .is_some_and(|v| v.contains(bytes)),
                    };
                    // `@value` is looked up in a directory the core still
                    // holds while it fetches the value: its kind is the directory's.
                    let as_own_value = path.strip_suffix("/@value").is_some_and(|dir| {
                        self.window.iter().any(|t| answer_in(t, dir) == Answer::Dir)
                    });
                    bytes_ok
                        && (as_own_value
                            || self.has_own_value(path)
                            || allowed.iter().any(|a| matches!(a, Answer::File(_))))
                }
                Answer::Missing => {
                    // A listing (within its TTL) names a file whose value has
                    // gone since: the file is missing until the listing is read again.
                    let file_gone = allowed.iter().any(|a| matches!(a, Answer::File(_)))
                        && allowed.iter().any(|a| !matches!(a, Answer::File(_)));
                    allowed.contains(got)
                        || file_gone
                        || self.below_own_value(path)
                        || self.emptied_by_event(path.strip_suffix("/@value").unwrap_or(path))
                }
                Answer::Dir => allowed.contains(got),
            };
            assert!(
                ok,
                "{path}: got {got:?}, allowed {allowed:?} (values {:?})",
                self.values_seen.get(&parameter)
            );
        }

        /// Whether `path` is, in some state of the window, a directory with
        /// a value of its own. A lookup past the parent's TTL trusts the
        /// parent's listing that it is a file and asks for the value alone,
        /// so a file that gained names below it stays a file (those names out
        /// of reach) until the parent is listed again: by design, a probe per
        /// lookup saved (see `fs::lookup`).
        fn has_own_value(&self, path: &str) -> bool {
            let own = format!("{path}/@value");
            self.window.iter().any(|t| t.contains_key(&own))
        }

        /// Whether a directory above `path` has a value of its own, so may
        /// still be shown as a file (`has_own_value`).
        fn below_own_value(&self, path: &str) -> bool {
            let mut above = path;
            while let Some((parent, _)) = above.rsplit_once('/') {
                if self.has_own_value(parent) {
                    return true;
                }
                above = parent;
            }
            false
        }

        fn check_listing(&self, path: &str, got: &Result<BTreeMap<String, FileKind>, i32>) {
            let allowed: Vec<_> = self
                .window
                .iter()
                .filter(|t| answer_in(t, path) == Answer::Dir)
                .map(|t| entries_in(t, path))
                .collect();
            let Ok(got) = got else {
                let missing = self
                    .window
                    .iter()
                    .any(|t| answer_in(t, path) != Answer::Dir)
                    || self.emptied_by_event(path)
                    || self.has_own_value(path)
                    || self.below_own_value(path);
                assert!(missing, "ls {path}: {got:?}, allowed {allowed:?}");
                return;
            };
            if self.window.len() == 1 {
                assert_eq!(Some(got), allowed.first(), "ls {path}");
                return;
            }
            // Mid-window a cached listing may have learned some changes and not
            // others: every entry from some state, and none that all states keep missing.
            for (name, kind) in got {
                // A directory from one state, a value from another: a name
                // a lookup found a value for is listed as a file.
                let child = if path.is_empty() {
                    name.clone()
                } else {
                    format!("{path}/{name}")
                };
                let a_value =
                    *kind == FileKind::File && self.values_seen.contains_key(&parameter_of(&child));
                assert!(
                    a_value || allowed.iter().any(|e| e.get(name) == Some(kind)),
                    "ls {path}: {name} {kind:?}, allowed {allowed:?}"
                );
            }
            if allowed.len() == self.window.len() {
                let everywhere = allowed
                    .iter()
                    .skip(1)
                    .fold(allowed[0].clone(), |mut all, e| {
                        all.retain(|n, k| e.get(n) == Some(k));
                        all
                    });
                for (name, kind) in everywhere {
                    let child = if path.is_empty() {
                        name.clone()
                    } else {
                        format!("{path}/{name}")
                    };
                    assert!(
                        got.get(&name).is_some() || self.emptied_by_event(&child),
                        "ls {path}: lacks {name} {kind:?}"
                    );
                }
            }
        }
    }

    /// What a path is, through the core: looked up component by component.
    async fn query(fs: &TestFs, path: &str, read: bool) -> Answer {
        let entry = match walk(fs, path).await {
            Ok(entry) => entry,
            Err(errno) if errno == libc::ENOENT || errno == libc::ENOTDIR => {
                return Answer::Missing
            }
            Err(errno) => panic!("{path}: errno {errno}"),
        };
        if entry.attr.kind == FileKind::Dir {
            return Answer::Dir;
        }
        let ino = entry.attr.ino;
        if !read {
            let attr = fs
                .getattr(ino)
                .await
                .unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(attr.attr.kind, FileKind::File, "{path}");
            let kind = fs.xattr(ino, OsStr::new("user.ssm.type")).await;
            assert_eq!(kind.ok().as_deref(), Some(&b"String"[..]), "{path}");
            // The size the kernel is told, as bytes of some state's value.
            return Answer::File(vec![0; attr.attr.size as usize]);
        }
        let data = fs
            .read(ino, 0, 1 << 16)
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(
            data.bytes().len() as u64,
            entry.attr.size,
            "{path}: st_size"
        );
        Answer::File(data.bytes().to_vec())
    }

    /// Lets the refreshes spawned by the last operation finish, as a
    /// mount's idle moments do.
    async fn settle_tasks() {
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
    }

    async fn run_operations(initial: BTreeMap<String, Vec<u8>>, ops: Vec<Op>, small_cache: bool) {
        let store = MemoryStore::new();
        for (name, value) in &initial {
            store.put(name, value.clone(), ParameterKind::String);
        }
        let mut config = config("/m");
        if small_cache {
            config.cache.max_entries = 3;
        }
        let (fs, _invalidations) = mount(store, config);
        let mut model = Model::new(initial);
        let paths = paths();
        for op in ops {
            match op {
                Op::Put(n, v) => {
                    let name = format!("/m/{}", NAMES[n]);
                    let value = VALUES[v].as_bytes().to_vec();
                    fs.store()
                        .inner()
                        .put(&name, value.clone(), ParameterKind::String);
                    model.remote.insert(name.clone(), value);
                    model.changed(&name);
                }
                Op::Delete(n) => {
                    let name = format!("/m/{}", NAMES[n]);
                    fs.store().inner().delete(&name);
                    if model.remote.remove(&name).is_some() {
                        model.changed(&name);
                    }
                }
                Op::Event(n) => {
                    // As SSM sends them: an update of a parameter that is
                    // there, a delete of one that was.
                    let name = format!("/m/{}", NAMES[n]);
                    let present = model.remote.contains_key(&name);
                    if !present && !model.values_seen.contains_key(&name) {
                        continue;
                    }
                    let operation = if present { "Update" } else { "Delete" };
                    let event =
                        super::events::event(&name, operation, std::time::SystemTime::now());
                    fs.apply_events(vec![event]).await;
                    if present {
                        model.fetched_by_event.insert(name);
                    } else {
                        model.deleted_by_event.push(name);
                    }
                }
                Op::Advance(seconds) => {
                    settle_tasks().await;
                    tokio::time::advance(Duration::from_secs(seconds)).await;
                    if seconds > 300 {
                        model.settle();
                        // Past the TTL nothing cached answers: neither do
                        // event-fetched values need a rule of their own.
                        model.fetched_by_event.clear();
                    }
                }
                Op::Read(p) => {
                    let got = query(&fs, &paths[p], true).await;
                    model.check(&paths[p], &got);
                }
                Op::Stat(p) => {
                    let path = &paths[p];
                    let got = query(&fs, path, false).await;
                    // Only the size is known here: compare it with the sizes allowed.
                    let got = match got {
                        Answer::File(zeros) => {
                            let parameter = parameter_of(path);
                            let size_of = |v: &Vec<u8>| v.len() == zeros.len();
                            let candidates: Vec<Vec<u8>> = match model
                                .fetched_by_event
                                .contains(&parameter)
                            {
                                true => model.remote.get(&parameter).cloned().into_iter().collect(),
                                false => model
                                    .values_seen
                                    .get(&parameter)
                                    .cloned()
                                    .unwrap_or_default(),
                            };
                            // Stand in the value of that size, if one is allowed.
                            Answer::File(candidates.into_iter().find(size_of).unwrap_or(zeros))
                        }
                        other => other,
                    };
                    model.check(path, &got);
                }
                Op::List(d) => {
                    let path = if d == 0 {
                        String::new()
                    } else {
                        NAMES[d - 1].to_string()
                    };
                    let got = ls(&fs, &path)
                        .await
                        .map(|items| items.into_iter().collect());
                    model.check_listing(&path, &got);
                }
            }
            settle_tasks().await;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn the_mount_check_is_one_listing_that_later_lookups_reuse() {
    let (fs, _inval) = mount(airflow_store(), config("/airflow"));
    assert!(fs.check_access().await.is_ok());
    assert_eq!(calls(&fs).list_page, 1);
    assert_eq!(calls(&fs).total(), 1, "mounting costs one call");
    let variables = fs.lookup(ROOT_INO, OsStr::new("variables")).await.unwrap();
    let secret = fs
        .lookup(variables.attr.ino, OsStr::new("my_secret"))
        .await
        .unwrap();
    assert_eq!(
        fs.read(secret.attr.ino, 0, 4096).await.unwrap().bytes(),
        b"s3cr3t-value"
    );
    assert_eq!(
        calls(&fs).total(),
        1,
        "the check's page answered both lookups"
    );
}

#[tokio::test(start_paused = true)]
async fn the_mount_check_refuses_what_would_break_every_read() {
    for (error, expected) in [
        (
            StoreError::Credentials("token expired".into()),
            "credentials",
        ),
        (
            StoreError::Unavailable("connection refused".into()),
            "/airflow",
        ),
        (
            StoreError::Rejected {
                code: "ValidationException".into(),
                message: "bad path".into(),
            },
            "/airflow",
        ),
    ] {
        let store = airflow_store();
        store.fail_every_call(Some(error));
        let (fs, _inval) = mount(store, config("/airflow"));
        let message = fs.check_access().await.unwrap_err().to_string();
        assert!(message.contains(expected), "{message}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_role_with_get_parameter_alone_pays_one_call_per_name() {
    let store = airflow_store();
    store.fail_every_listing(Some(StoreError::access_denied(
        "not authorized to perform ssm:GetParametersByPath",
    )));
    let (fs, _inval) = mount(store, config("/airflow"));
    assert!(fs.check_access().await.is_ok(), "it still mounts");
    assert_eq!(calls(&fs).list_page, 1);
    let variables = fs.lookup(ROOT_INO, OsStr::new("variables")).await.unwrap();
    assert_eq!(variables.attr.kind, FileKind::Dir);
    let before = calls(&fs);
    for name in ["my_secret", "region"] {
        let entry = fs
            .lookup(variables.attr.ino, OsStr::new(name))
            .await
            .unwrap();
        assert_eq!(entry.attr.kind, FileKind::File);
        fs.read(entry.attr.ino, 0, 4096).await.unwrap();
    }
    let after = calls(&fs);
    assert_eq!(after.get - before.get, 2, "one GetParameter per name");
    assert_eq!(
        after.list_page, before.list_page,
        "no listing asked again below a path SSM refused to list"
    );
    let error = fs.opendir(variables.attr.ino).await.unwrap_err();
    assert_eq!(error.errno(), libc::EACCES);
    assert_eq!(calls(&fs).list_page, before.list_page, "EACCES from memory");
    // A name with no value may still have parameters below it: it is served
    // as a directory, and asking again within the TTL costs nothing.
    let unknown = fs
        .lookup(variables.attr.ino, OsStr::new("team"))
        .await
        .unwrap();
    assert_eq!(unknown.attr.kind, FileKind::Dir);
    let settled = calls(&fs);
    fs.lookup(variables.attr.ino, OsStr::new("team"))
        .await
        .unwrap();
    assert_eq!(calls(&fs), settled);
}

#[tokio::test(start_paused = true)]
async fn a_stream_of_distinct_missing_and_denied_names_stays_within_the_cache_bounds() {
    let mut config = config("/p");
    config.cache.max_entries = 1_000;
    let (fs, _inval) = mount(MemoryStore::new(), config);
    // A role with GetParameter alone: no listing, so each name is asked for.
    fs.store()
        .inner()
        .fail_every_listing(Some(StoreError::access_denied("no listing")));
    for i in 0..50_000 {
        // Missing, and SSM will not say whether anything lies below it: served
        // as a directory whose names resolve one by one; the kernel forgets it.
        let entry = fs
            .lookup(ROOT_INO, OsStr::new(&format!("m{i}")))
            .await
            .unwrap();
        assert_eq!(entry.attr.kind, FileKind::Dir);
        fs.forget(entry.attr.ino, 1);
    }
    // A role that may read nothing: every value and listing is refused.
    fs.store()
        .inner()
        .fail_every_call(Some(StoreError::access_denied("not authorized")));
    for i in 0..50_000 {
        let denied = fs.lookup(ROOT_INO, OsStr::new(&format!("d{i}"))).await;
        assert_eq!(denied.unwrap_err().errno(), libc::EACCES);
    }
    let gauges = fs.gauges();
    assert!(
        gauges.cache_entries <= 2 * 1_000,
        "{}",
        gauges.cache_entries
    );
    assert!(gauges.cache_notes <= 1_000, "{}", gauges.cache_notes);
    assert_eq!(
        gauges.inodes, 1,
        "no inode for a name that does not resolve"
    );
    assert!(calls(&fs).total() >= 200_000, "every name was really asked");
}

/// Reads every key of `keys` once a second for `seconds`, like a host whose
/// kernel cache has expired; returns the store calls made meanwhile.
async fn read_steadily(fs: &TestFs, keys: &[String], seconds: u64) -> CallCounts {
    let before = calls(fs);
    for _ in 0..seconds {
        for key in keys {
            assert!(cat(fs, key).await.is_ok(), "{key}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let after = calls(fs);
    CallCounts {
        get: after.get - before.get,
        get_many: after.get_many - before.get_many,
        list_page: after.list_page - before.list_page,
    }
}

fn fifty_keys_in_five_dirs() -> (MemoryStore, Vec<String>) {
    let store = MemoryStore::new();
    let mut keys = Vec::new();
    for d in 0..5 {
        for k in 0..10 {
            store.put_string(&format!("/h/d{d}/k{k}"), &format!("v{d}{k}"));
            keys.push(format!("d{d}/k{k}"));
        }
    }
    (store, keys)
}

#[tokio::test(start_paused = true)]
async fn hot_values_are_refreshed_ten_to_a_call_and_cold_ones_lapse() {
    let (store, keys) = fifty_keys_in_five_dirs();
    let mut config = config("/h");
    config.cache.ttl = Duration::from_secs(60);
    let (fs, _inval) = mount(store, config);
    read_steadily(&fs, &keys, 120).await; // warm up, past the first refreshes
    let ttls = 10;
    let steady = read_steadily(&fs, &keys, 60 * ttls).await;
    let per_ttl = steady.total() as f64 / ttls as f64;
    // ceil(K/10) + D = 5 + 5 per TTL at most.
    assert!(per_ttl <= 10.0, "{per_ttl} calls per TTL: {steady:?}");
    assert!(steady.get_many > 0, "refreshes are batched: {steady:?}");
    assert_eq!(steady.get, 0, "no value was fetched alone: {steady:?}");
    // Half the keys stop being read: after they lapse, only the others cost.
    let hot = &keys[..25];
    read_steadily(&fs, hot, 120).await;
    let half = read_steadily(&fs, hot, 60 * ttls).await;
    let half_per_ttl = half.total() as f64 / ttls as f64;
    assert!(
        half_per_ttl <= 3.0 + 5.0,
        "{half_per_ttl} calls per TTL for 25 keys: {half:?}"
    );
    assert!(half_per_ttl < per_ttl, "unread keys are not refreshed");
    assert!(
        fs.metrics()
            .refresh_batches
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
}

#[tokio::test(start_paused = true)]
async fn without_get_parameters_refreshes_fall_back_to_one_call_per_name() {
    let (store, keys) = fifty_keys_in_five_dirs();
    store.fail_every_batch(Some(StoreError::access_denied("no ssm:GetParameters")));
    let mut config = config("/h");
    config.cache.ttl = Duration::from_secs(60);
    let (fs, _inval) = mount(store, config);
    read_steadily(&fs, &keys, 120).await;
    let steady = read_steadily(&fs, &keys, 600).await;
    assert!(
        steady.get_many <= 1,
        "the refusal is remembered: {steady:?}"
    );
    assert!(
        steady.get >= 50,
        "every value is still refreshed: {steady:?}"
    );
    for key in &keys {
        assert!(cat(&fs, key).await.is_ok());
    }
}

#[tokio::test(start_paused = true)]
async fn throttled_refreshes_stretch_the_cycle_and_serve_the_cached_values() {
    let (store, keys) = fifty_keys_in_five_dirs();
    let mut config = config("/h");
    config.cache.ttl = Duration::from_secs(60);
    config.request.max_retries = 0;
    let (fs, _inval) = mount(store, config);
    read_steadily(&fs, &keys, 120).await;
    fs.store()
        .inner()
        .fail_every_call(Some(StoreError::Throttled));
    let throttled = read_steadily(&fs, &keys, 600).await; // every read succeeds (asserted inside)
                                                          // Without backoff: a retry every 10 s per batch, about 300 calls in 10 minutes.
    assert!(throttled.total() < 100, "{throttled:?}");
    fs.store().inner().fail_every_call(None);
    read_steadily(&fs, &keys, 300).await;
    for key in &keys {
        assert!(cat(&fs, key).await.is_ok());
    }
}

// ----- change events (issue 12) -----

mod events {
    use super::*;
    use ssmfs::events::{event_json, listen, parse, MemoryQueue, Message, ParameterEvent};
    use std::time::SystemTime;

    fn hour_config(prefix: &str) -> FsConfig {
        let mut config = config(prefix);
        config.cache.ttl = Duration::from_secs(3600);
        config
    }

    pub(super) fn event(name: &str, operation: &str, time: SystemTime) -> ParameterEvent {
        match parse(&event_json(name, operation, time)) {
            Ok(Message::Event(event)) => event,
            other => panic!("{other:?}"),
        }
    }

    fn drain(invalidations: &mut UnboundedReceiver<Invalidation>) -> Vec<Invalidation> {
        std::iter::from_fn(|| invalidations.try_recv().ok()).collect()
    }

    fn names(listing: Vec<(String, FileKind)>) -> Vec<String> {
        listing.into_iter().map(|(n, _)| n).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn an_update_costs_one_call_and_tells_the_kernel_and_repeats_cost_nothing() {
        let (fs, mut invalidations) = mount(airflow_store(), hour_config("/airflow"));
        assert_eq!(
            cat(&fs, "variables/my_secret").await.unwrap(),
            b"s3cr3t-value"
        );
        let ino = walk(&fs, "variables/my_secret").await.unwrap().attr.ino;
        drain(&mut invalidations);
        let before = calls(&fs);
        fs.store()
            .inner()
            .put_string("/airflow/variables/my_secret", "rotated");
        let update = event("/airflow/variables/my_secret", "Update", SystemTime::now());
        fs.apply_events(vec![update.clone()]).await;
        assert_eq!(calls(&fs).total() - before.total(), 1, "one fetch");
        assert!(drain(&mut invalidations).contains(&Invalidation::Inode(ino)));
        assert_eq!(cat(&fs, "variables/my_secret").await.unwrap(), b"rotated");
        // A redelivery, and an older event arriving late: nothing to do.
        fs.apply_events(vec![update]).await;
        let late = event(
            "/airflow/variables/my_secret",
            "Update",
            SystemTime::now() - Duration::from_secs(60),
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        fs.apply_events(vec![late]).await;
        assert_eq!(calls(&fs).total() - before.total(), 1, "{:?}", calls(&fs));
        assert_eq!(
            fs.metrics()
                .events_applied
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn events_about_names_not_cached_here_or_outside_the_mount_cost_nothing() {
        let (fs, _inval) = mount(airflow_store(), hour_config("/airflow"));
        assert_eq!(
            cat(&fs, "variables/my_secret").await.unwrap(),
            b"s3cr3t-value"
        );
        let before = calls(&fs);
        let now = SystemTime::now();
        fs.apply_events(vec![
            event("/airflow/connections/my_postgres", "Update", now),
            event("/other/thing", "Update", now),
            event("/airflowx/variables/my_secret", "Delete", now),
            event("/airflow/variables/my_secret", "LabelParameterVersion", now),
        ])
        .await;
        assert_eq!(calls(&fs), before);
        assert_eq!(
            fs.metrics()
                .events_ignored
                .load(std::sync::atomic::Ordering::Relaxed),
            4
        );
    }

    #[tokio::test(start_paused = true)]
    async fn creates_join_cached_listings_and_deletes_leave_them() {
        let (fs, mut invalidations) = mount(airflow_store(), hour_config("/airflow"));
        assert_eq!(ls(&fs, "").await.unwrap().len(), 3);
        assert_eq!(ls(&fs, "variables").await.unwrap().len(), 3);
        let before = calls(&fs);
        let store = fs.store().inner();
        store.put_string("/airflow/variables/added", "new");
        store.put_string("/airflow/team/deep/key", "v");
        store.delete("/airflow/variables/region");
        let now = SystemTime::now();
        fs.apply_events(vec![
            event("/airflow/variables/added", "Create", now),
            event("/airflow/team/deep/key", "Create", now),
            event("/airflow/variables/region", "Delete", now),
        ])
        .await;
        assert_eq!(
            calls(&fs).total() - before.total(),
            1,
            "one GetParameters for three names"
        );
        let variables = names(ls(&fs, "variables").await.unwrap());
        assert!(variables.contains(&"added".into()), "{variables:?}");
        assert!(!variables.contains(&"region".into()), "{variables:?}");
        assert!(names(ls(&fs, "").await.unwrap()).contains(&"team".into()));
        assert_eq!(
            cat(&fs, "variables/region").await.unwrap_err(),
            libc::ENOENT
        );
        assert_eq!(cat(&fs, "variables/added").await.unwrap(), b"new");
        assert_eq!(
            calls(&fs).total() - before.total(),
            1,
            "all of it from the cache"
        );
        let told = drain(&mut invalidations);
        let dropped: Vec<&str> = told
            .iter()
            .filter_map(|i| match i {
                Invalidation::Entry { name, .. } => Some(name.as_str()),
                _ => None,
            })
            .collect();
        for name in ["added", "region", "team"] {
            assert!(dropped.contains(&name), "{told:?}");
        }
        // The last name of a directory goes: the directory goes with it.
        store.delete("/airflow/team/deep/key");
        fs.apply_events(vec![event("/airflow/team/deep/key", "Delete", now)])
            .await;
        assert!(!names(ls(&fs, "").await.unwrap()).contains(&"team".into()));
    }

    #[tokio::test(start_paused = true)]
    async fn ten_changed_names_cost_one_call() {
        let store = MemoryStore::new();
        for i in 0..10 {
            store.put_string(&format!("/app/k{i}"), "old");
        }
        let (fs, _inval) = mount(store, hour_config("/app"));
        for i in 0..10 {
            cat(&fs, &format!("k{i}")).await.unwrap();
        }
        let before = calls(&fs);
        let now = SystemTime::now();
        let events = (0..10)
            .map(|i| {
                fs.store().inner().put_string(&format!("/app/k{i}"), "new");
                event(&format!("/app/k{i}"), "Update", now)
            })
            .collect();
        fs.apply_events(events).await;
        assert_eq!(calls(&fs).get_many - before.get_many, 1);
        assert_eq!(calls(&fs).total() - before.total(), 1);
        for i in 0..10 {
            assert_eq!(cat(&fs, &format!("k{i}")).await.unwrap(), b"new");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn events_received_during_an_outage_are_applied_when_ssm_answers() {
        let (fs, _inval) = mount(airflow_store(), hour_config("/airflow"));
        assert_eq!(
            cat(&fs, "variables/my_secret").await.unwrap(),
            b"s3cr3t-value"
        );
        let store = fs.store().inner();
        store.put_string("/airflow/variables/my_secret", "rotated");
        store.fail_every_call(Some(StoreError::Unavailable("injected".into())));
        fs.apply_events(vec![event(
            "/airflow/variables/my_secret",
            "Update",
            SystemTime::now(),
        )])
        .await;
        assert_eq!(fs.pending_event_names(), 1);
        assert_eq!(
            cat(&fs, "variables/my_secret").await.unwrap(),
            b"s3cr3t-value",
            "still served"
        );
        store.fail_every_call(None);
        fs.retry_pending_events().await;
        assert_eq!(fs.pending_event_names(), 1, "not before the outage backoff");
        tokio::time::advance(Duration::from_secs(20)).await;
        fs.retry_pending_events().await;
        assert_eq!(fs.pending_event_names(), 0);
        assert_eq!(cat(&fs, "variables/my_secret").await.unwrap(), b"rotated");
    }

    /// A host of a fleet of 1,000 at the default quota: refetches spread
    /// over 1,000 / 20 = 50 s.
    fn fleet_config(prefix: &str) -> FsConfig {
        let mut config = hour_config(prefix);
        config.events = ssmfs::config::EventsPacing {
            hosts: 1000,
            quota_tps: 40,
        };
        config
    }

    #[tokio::test(start_paused = true)]
    async fn a_fleet_host_spreads_its_refetch_over_the_window_and_serves_the_old_value_meanwhile() {
        let (fs, _inval) = mount(airflow_store(), fleet_config("/airflow"));
        assert_eq!(fs.event_spread_now(), Duration::from_secs(50));
        assert_eq!(
            cat(&fs, "variables/my_secret").await.unwrap(),
            b"s3cr3t-value"
        );
        let before = calls(&fs);
        fs.store()
            .inner()
            .put_string("/airflow/variables/my_secret", "rotated");
        let update = event("/airflow/variables/my_secret", "Update", SystemTime::now());
        fs.apply_events(vec![update]).await;
        let mut seen_at = None;
        for tick in 0..=210 {
            let value = cat(&fs, "variables/my_secret").await.unwrap();
            match seen_at {
                None if value == b"rotated" => seen_at = Some(tick),
                None => assert_eq!(value, b"s3cr3t-value"),
                Some(_) => assert_eq!(value, b"rotated", "never back to an older version"),
            }
            tokio::time::advance(Duration::from_millis(250)).await;
            fs.retry_pending_events().await;
        }
        let seen_at = seen_at.expect("the rotation is seen within the window");
        assert!(seen_at <= 201, "seen after {} ms", seen_at * 250);
        assert_eq!(calls(&fs).total() - before.total(), 1, "one refetch");
    }

    #[tokio::test(start_paused = true)]
    async fn waits_across_a_fleet_are_spread_evenly_over_the_window() {
        // Forty hosts of a fleet of 1,000 get the same event: their refetches
        // land across the 50 s window, not in its first second.
        let mut at = Vec::new();
        for _ in 0..40 {
            let (fs, _inval) = mount(airflow_store(), fleet_config("/airflow"));
            cat(&fs, "variables/my_secret").await.unwrap();
            let started = tokio::time::Instant::now();
            let before = calls(&fs).total();
            let update = event("/airflow/variables/my_secret", "Update", SystemTime::now());
            fs.apply_events(vec![update]).await;
            while calls(&fs).total() == before {
                tokio::time::advance(Duration::from_millis(250)).await;
                fs.retry_pending_events().await;
            }
            at.push(started.elapsed().as_secs_f64());
        }
        at.sort_by(f64::total_cmp);
        assert!(at[39] <= 50.5, "{at:?}");
        assert!(at[4] < 15.0 && at[35] > 35.0, "spread out: {at:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttled_refetch_widens_the_window_and_an_answered_one_narrows_it() {
        let mut config = fleet_config("/airflow");
        config.events.hosts = 1;
        let (fs, _inval) = mount(airflow_store(), config);
        // A single host: 1 / 20 s, under the second SSM's bucket absorbs.
        assert_eq!(fs.event_spread_now(), Duration::ZERO, "at once");
        let narrow = Duration::from_millis(50);
        cat(&fs, "variables/my_secret").await.unwrap();
        fs.store()
            .inner()
            .put_string("/airflow/variables/my_secret", "rotated");
        fs.store().inner().fail_next_calls(3, StoreError::Throttled);
        let update = event("/airflow/variables/my_secret", "Update", SystemTime::now());
        fs.apply_events(vec![update]).await;
        let mut widest = Duration::ZERO;
        for _ in 0..40 {
            tokio::time::advance(Duration::from_millis(250)).await;
            fs.retry_pending_events().await;
            widest = widest.max(fs.event_spread_now());
        }
        assert_eq!(widest, narrow * 8, "doubled per throttled refetch");
        assert_eq!(fs.pending_event_names(), 0, "fetched once answered");
        assert_eq!(cat(&fs, "variables/my_secret").await.unwrap(), b"rotated");
        assert!(fs.event_spread_now() < widest, "narrowed again");
    }

    #[tokio::test(start_paused = true)]
    async fn the_listener_applies_deletes_and_survives_a_queue_outage() {
        let (fs, _inval) = mount(airflow_store(), hour_config("/airflow"));
        assert_eq!(
            cat(&fs, "variables/my_secret").await.unwrap(),
            b"s3cr3t-value"
        );
        let queue = MemoryQueue::default();
        let listener = tokio::spawn(listen(fs.clone(), queue.clone()));
        let store = fs.store().inner();
        store.put_string("/airflow/variables/my_secret", "one");
        queue.push(event_json(
            "/airflow/variables/my_secret",
            "Update",
            SystemTime::now(),
        ));
        queue.push("not json at all");
        queue.push(r#"{"source":"aws.s3","detail-type":"Object Created","detail":{}}"#);
        let wait_for = |deleted: u64| {
            let queue = queue.clone();
            async move {
                for _ in 0..100 {
                    if queue.deleted() >= deleted {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                panic!(
                    "the listener deleted {} of {deleted} messages",
                    queue.deleted()
                );
            }
        };
        wait_for(3).await;
        assert_eq!(cat(&fs, "variables/my_secret").await.unwrap(), b"one");
        let metrics = fs.metrics();
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(load(&metrics.events_received), 3);
        assert_eq!(load(&metrics.events_malformed), 1);
        assert_eq!(load(&metrics.events_ignored), 1);
        // The queue goes away: reads go on; events resume when it is back.
        queue.set_down(true);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(load(&metrics.event_queue_errors) >= 1);
        assert_eq!(cat(&fs, "variables/my_secret").await.unwrap(), b"one");
        store.put_string("/airflow/variables/my_secret", "two");
        queue.push(event_json(
            "/airflow/variables/my_secret",
            "Update",
            SystemTime::now(),
        ));
        queue.set_down(false);
        tokio::time::sleep(Duration::from_secs(120)).await;
        wait_for(4).await;
        assert_eq!(cat(&fs, "variables/my_secret").await.unwrap(), b"two");
        listener.abort();
    }
}

// ----- selectors, views and names a user can type (issue 13) -----

mod typed_names {
    use super::*;
    use proptest::prelude::*;

    /// Segments a user can type: plain, with selectors and views, and junk.
    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-zA-Z0-9:@+=._%-]{1,40}",
            "(db|k0|x)(:[0-9]{1,25})?(@json|@conn)?",
            "(db|k0)(:[a-zA-Z0-9_.-]{0,120})(@json|@conn)?",
            "(db|k0)@(json|conn|value|x)",
            ".{1,300}",
        ]
    }

    fn store() -> MemoryStore {
        let store = MemoryStore::new();
        store.put_string("/t/db", r#"{"password": "p", "port": 1}"#);
        store.put_string("/t/db", r#"{"password": "q"}"#);
        store.label("/t/db", "prod", 1);
        store.put_string("/t/k0", "postgresql://u:p@h:1/s");
        store.put_string("/aws/reference/secretsmanager/s+1=a@b", "v");
        store
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn no_typed_name_panics_or_reaches_ssm_unless_ssm_could_hold_it(
            first in segment(),
            second in segment(),
            secrets_manager in any::<bool>(),
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let prefix = if secrets_manager { "/aws/reference/secretsmanager" } else { "/t" };
                let (fs, _inval) = mount(store(), config(prefix));
                if let Ok(entry) = fs.lookup(ROOT_INO, OsStr::new(&first)).await {
                    let ino = entry.attr.ino;
                    let _ = fs.getattr(ino).await;
                    let _ = fs.read(ino, 0, 4096).await;
                    let _ = fs.xattr(ino, OsStr::new("user.ssm.version")).await;
                    if let Ok(handle) = fs.opendir(ino).await {
                        let _ = fs.readdir(handle, 0, 100);
                    }
                    let _ = fs.lookup(ino, OsStr::new(&second)).await;
                }
                let invalid = fs.store().inner().invalid_names_asked();
                assert!(invalid.is_empty(), "asked SSM for {invalid:?}");
            });
        }
    }

    #[tokio::test(start_paused = true)]
    async fn selectors_and_views_through_the_core() {
        let (fs, _inval) = mount(store(), config("/t"));
        assert_eq!(cat(&fs, "db:1@json/password").await.unwrap(), b"p");
        assert_eq!(cat(&fs, "db:prod@json/port").await.unwrap(), b"1");
        assert_eq!(cat(&fs, "db@json/password").await.unwrap(), b"q");
        assert_eq!(cat(&fs, "db:2").await.unwrap(), br#"{"password": "q"}"#);
        assert_eq!(cat(&fs, "k0@conn/host").await.unwrap(), b"h");
        let before = calls(&fs);
        assert_eq!(cat(&fs, "db:1@json/password").await.unwrap(), b"p");
        assert_eq!(calls(&fs), before, "cached");
        for missing in ["db:3", "db:nolabel", "db:0", "k0@json", "db@json/nokey"] {
            assert_eq!(
                walk(&fs, missing).await.unwrap_err(),
                libc::ENOENT,
                "{missing}"
            );
        }
        let listed: Vec<String> = ls(&fs, "")
            .await
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(listed, ["db", "k0"]);
        assert!(fs.store().inner().invalid_names_asked().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_stale_attribute_says_when_an_outage_serves_a_value_past_its_ttl() {
        let (fs, _inval) = mount(store(), config("/t"));
        let ino = walk(&fs, "db").await.unwrap().attr.ino;
        let stale = |fs: TestFs| async move {
            fs.xattr(ino, OsStr::new("user.ssmfs.stale")).await.unwrap()
        };
        assert_eq!(stale(fs.clone()).await, b"0");
        fs.store()
            .inner()
            .fail_every_call(Some(StoreError::Unavailable("injected".into())));
        tokio::time::advance(Duration::from_secs(301)).await;
        assert_eq!(
            cat(&fs, "db").await.unwrap(),
            br#"{"password": "q"}"#,
            "served stale"
        );
        assert_eq!(stale(fs.clone()).await, b"1");
        fs.store().inner().fail_every_call(None);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(cat(&fs, "db").await.unwrap(), br#"{"password": "q"}"#);
        assert_eq!(stale(fs.clone()).await, b"0", "fetched again");
        let unsupported = fs.xattr(ino, OsStr::new("security.selinux")).await;
        assert_eq!(unsupported.unwrap_err().errno(), libc::EOPNOTSUPP);
        let unknown = fs.xattr(ino, OsStr::new("user.other")).await;
        assert_eq!(unknown.unwrap_err().errno(), libc::ENODATA);
    }

    #[tokio::test(start_paused = true)]
    async fn a_moved_label_refetches_that_label_alone() {
        use ssmfs::events::{event_json, parse, Message};
        let (fs, _inval) = mount(store(), config("/t"));
        assert_eq!(cat(&fs, "db:prod@json/password").await.unwrap(), b"p");
        assert_eq!(
            cat(&fs, "db:1").await.unwrap(),
            br#"{"password": "p", "port": 1}"#
        );
        fs.store().inner().label("/t/db", "prod", 2);
        let before = calls(&fs);
        let Ok(Message::Event(moved)) = parse(&event_json(
            "/t/db",
            "LabelParameterVersion",
            std::time::SystemTime::now(),
        )) else {
            panic!("an event")
        };
        fs.apply_events(vec![moved]).await;
        assert_eq!(
            calls(&fs).get - before.get,
            1,
            "db:prod only (db:1 never changes)"
        );
        assert_eq!(calls(&fs).total() - before.total(), 1);
        assert_eq!(cat(&fs, "db:prod@json/password").await.unwrap(), b"q");
    }
}

// ----- what real clients found (issue 18) -----

mod new_names_and_large_directories {
    use super::*;
    use ssmfs::events::{listen, MemoryQueue};

    const NEGATIVE_TTL: Duration = Duration::from_secs(30);

    /// `/p/vars` listed whole (by `ls`), then `/p/vars/new_var` created.
    async fn listed_then_created(config: FsConfig) -> (TestFs, UnboundedReceiver<Invalidation>) {
        let store = MemoryStore::new();
        store.put_string("/p/vars/one", "1");
        store.put_string("/p/vars/two", "2");
        let (fs, inval) = mount(store, config);
        assert_eq!(ls(&fs, "vars").await.unwrap().len(), 2);
        fs.store().inner().put_string("/p/vars/new_var", "fresh");
        (fs, inval)
    }

    fn names(listing: Vec<(String, FileKind)>) -> Vec<String> {
        listing.into_iter().map(|(n, _)| n).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_name_a_whole_listing_lacks_appears_after_the_negative_ttl_and_joins_the_listing() {
        let (fs, _inval) = listed_then_created(config("/p")).await;
        let before = calls(&fs);
        assert_eq!(cat(&fs, "vars/new_var").await, Err(libc::ENOENT));
        assert_eq!(calls(&fs), before, "a young listing answers for absence");
        tokio::time::advance(NEGATIVE_TTL).await;
        assert_eq!(cat(&fs, "vars/new_var").await.unwrap(), b"fresh");
        let c = calls(&fs);
        assert_eq!(
            c.total() - before.total(),
            2,
            "one round trip: its value and whether anything is below it: {c:?}"
        );
        assert_eq!(c.get - before.get, 1, "{c:?}");
        assert_eq!(
            names(ls(&fs, "vars").await.unwrap()),
            ["new_var", "one", "two"],
            "ls shows it from the listing, within its TTL"
        );
        assert_eq!(calls(&fs), c, "and ls cost nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn a_loop_probing_a_missing_name_costs_at_most_two_calls_per_negative_ttl() {
        for listed in [false, true] {
            let store = MemoryStore::new();
            for i in 0..30 {
                store.put_string(&format!("/airflow/variables/v{i:02}"), "v");
            }
            let (fs, _inval) = mount(store, config("/airflow"));
            if listed {
                ls(&fs, "variables").await.unwrap();
            }
            let before = calls(&fs).total();
            let windows = 20; // two TTLs' worth at the default ratio
            for _ in 0..windows {
                for _ in 0..50 {
                    assert_eq!(cat(&fs, "variables/not_here").await, Err(libc::ENOENT));
                    tokio::time::advance(NEGATIVE_TTL / 50).await;
                }
            }
            let cost = calls(&fs).total() - before;
            // Airflow asks its secrets backend first for every Variable: per
            // missing name and negative TTL, one round trip of two calls (its
            // value, and whether anything is below it: a new directory shows
            // up as a new file does), plus, once per TTL, the directory's
            // listing (three pages here, shared by every name in it).
            let ttls = windows * 30 / 300;
            assert!(
                cost <= 2 * windows + (ttls + 1) * 4,
                "listed {listed}: {cost} calls in {windows} negative TTLs"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn with_live_events_a_miss_is_trusted_for_the_ttl_until_the_queue_fails() {
        let queue = MemoryQueue::default();
        let store = MemoryStore::new();
        store.put_string("/p/vars/one", "1");
        let (fs, _inval) = mount(store, config("/p"));
        let listener = tokio::spawn(listen(fs.clone(), queue.clone()));
        // Live once a receive came back (an idle long poll takes 20 s).
        tokio::time::sleep(Duration::from_secs(21)).await;
        assert!(queue.receives() >= 2, "the listener polls");
        assert_eq!(ls(&fs, "vars").await.unwrap().len(), 1);
        let before = calls(&fs);
        for _ in 0..8 {
            // sleep, not advance: the listener's receives come back on time.
            tokio::time::sleep(NEGATIVE_TTL).await;
            assert_eq!(cat(&fs, "vars/missing").await, Err(libc::ENOENT));
        }
        assert_eq!(calls(&fs), before, "events live: the listing answers");
        // The queue stops answering: back to the negative TTL.
        queue.set_down(true);
        tokio::time::sleep(Duration::from_secs(25)).await;
        fs.store()
            .inner()
            .put_string("/p/vars/missing", "made while events were down");
        assert_eq!(
            cat(&fs, "vars/missing").await.unwrap(),
            b"made while events were down"
        );
        listener.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn through_an_outage_an_old_miss_is_eio_and_a_listed_value_is_served_stale() {
        let (fs, _inval) = listed_then_created(config("/p")).await;
        fs.store()
            .inner()
            .fail_every_call(Some(StoreError::Unavailable("connection refused".into())));
        tokio::time::advance(NEGATIVE_TTL).await;
        assert_eq!(cat(&fs, "vars/new_var").await, Err(libc::EIO));
        tokio::time::advance(Duration::from_secs(300)).await;
        assert_eq!(
            cat(&fs, "vars/one").await.unwrap(),
            b"1",
            "seen only in a listing"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn random_cold_reads_in_a_large_directory_cost_one_round_trip_each() {
        let round_trip = Duration::from_millis(20);
        let store = MemoryStore::new();
        for i in 0..2500 {
            store.put_string(&format!("/big/variables/k{i:04}"), &format!("value-{i}"));
        }
        store.set_latency(round_trip);
        let (fs, _inval) = mount(store, config("/big"));
        fs.check_access().await.unwrap();
        let before = calls(&fs).total();
        let mut latencies = Vec::new();
        for n in 0..20 {
            let i = (n * 1237 + 411) % 2500; // scattered, no two in one page
            let started = tokio::time::Instant::now();
            let value = cat(&fs, &format!("variables/k{i:04}")).await.unwrap();
            latencies.push(started.elapsed());
            assert_eq!(value, format!("value-{i}").as_bytes());
        }
        let cost = calls(&fs).total() - before;
        latencies.sort();
        let p90 = latencies[17];
        assert!(
            p90 <= 3 * round_trip,
            "p90 {p90:?} against {round_trip:?} a call"
        );
        // Two questions per name ("a value?", "anything below?"), one round
        // trip; the first sibling read on pays the directory's first ten
        // pages (issue 25: at most 60 in all).
        assert!(cost <= 60, "{cost} calls");
    }
}

#[tokio::test(start_paused = true)]
async fn a_name_under_a_refused_kms_key_is_listed_and_only_it_is_refused() {
    let store = MemoryStore::new();
    for i in 0..12 {
        store.put(
            &format!("/k/team/p{i:02}"),
            format!("value-{i}").into_bytes(),
            ParameterKind::SecureString,
        );
    }
    store.deny_decrypting("/k/team/p05");
    let (fs, _inval) = mount(store, config("/k"));
    let names = ls(&fs, "team").await.unwrap();
    assert_eq!(names.len(), 12, "{names:?}");
    // Found by a lookup (`ls -l`, `find`, `du`), unreadable only when read.
    let refused = walk(&fs, "team/p05").await.unwrap();
    assert_eq!(refused.attr.perm, 0, "no read bits");
    assert_eq!(
        fs.getattr(refused.attr.ino).await.unwrap().attr.perm,
        0,
        "stat after the lookup expired"
    );
    assert_eq!(cat(&fs, "team/p05").await.unwrap_err(), libc::EACCES);
    for i in (0..12).filter(|i| *i != 5) {
        assert_eq!(
            cat(&fs, &format!("team/p{i:02}")).await.unwrap(),
            format!("value-{i}").as_bytes()
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_new_directory_shows_up_within_the_negative_ttl_in_one_round_trip() {
    let store = MemoryStore::new();
    store.put_string("/r/v/old", "old");
    let mut config = config("/r");
    config.cache.negative_ttl = Duration::from_secs(1);
    let (fs, _inval) = mount(store, config);
    assert_eq!(ls(&fs, "").await.unwrap().len(), 1);
    fs.store().inner().put_string("/r/w/cold", "cold");
    let before = calls(&fs);
    assert_eq!(cat(&fs, "w/cold").await.unwrap_err(), libc::ENOENT);
    assert_eq!(calls(&fs), before, "absent, as the fresh listing says");
    tokio::time::advance(Duration::from_millis(1100)).await;
    assert_eq!(cat(&fs, "w/cold").await.unwrap(), b"cold");
    let cost = calls(&fs).total() - before.total();
    assert_eq!(cost, 2, "the value and the first page below, together");
    let names: Vec<String> = ls(&fs, "")
        .await
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["v", "w"], "ls shows it from then on");
    assert_eq!(calls(&fs).total() - before.total(), 2, "from the cache");
}

/// Advances the paused clock a second at a time, letting tasks run between.
async fn pass(seconds: u64) {
    for _ in 0..seconds * 10 {
        tokio::time::advance(Duration::from_millis(100)).await;
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn an_open_stream_keeps_what_it_covers_fresh_in_batches_and_names_each_change() {
    let store = MemoryStore::new();
    for i in 0..20 {
        store.put_string(&format!("/app/k{i:02}"), "one");
    }
    store.put_string("/elsewhere/x", "not covered");
    let mut config = config("/app");
    config.cache.ttl = Duration::from_secs(4);
    let (fs, invalidations) = mount(store, config);
    // No kernel: notes are announced at once.
    drop(invalidations);
    for i in 0..20 {
        assert_eq!(cat(&fs, &format!("k{i:02}")).await.unwrap(), b"one");
    }
    tokio::spawn(fs.clone().keep_fresh());
    // Nobody reads and no stream is open: nothing is refreshed.
    let before = calls(&fs).total();
    pass(12).await;
    assert_eq!(calls(&fs).total(), before);
    // A stream at the root: its 20 values are refreshed ten to a call, about
    // once per TTL each, and nothing else is asked.
    let stream = fs.lookup(ROOT_INO, OsStr::new("@changes")).await.unwrap();
    assert_eq!(stream.attr.kind, FileKind::Fifo);
    let mut notes = fs.subscribe_changes();
    let before = calls(&fs);
    pass(12).await;
    let after = calls(&fs);
    let batches = after.get_many - before.get_many;
    assert!((4..=10).contains(&batches), "{batches} batches in 3 TTLs");
    assert_eq!(after.get + after.list_page, before.get + before.list_page);
    // A rotation nobody reads shows on the stream within the TTL + 1 s.
    fs.store().inner().put_string("/app/k07", "two");
    pass(5).await;
    let note = notes.try_recv().expect("a note for the rotation");
    assert_eq!(note.line(), "k07 2\n");
    assert!(notes.try_recv().is_err(), "one note per change");
    // Closed: values lapse again.
    fs.close_stream(stream.attr.ino);
    pass(5).await;
    let before = calls(&fs).total();
    pass(12).await;
    assert_eq!(calls(&fs).total(), before);
}

#[tokio::test(start_paused = true)]
async fn a_reader_cannot_open_streams_without_end() {
    let store = MemoryStore::new();
    store.put_string("/app/a", "1");
    let (fs, _invalidations) = mount(store, config("/app"));
    let mut last = 0;
    for _ in 0..ssmfs::fs::MAX_OPEN_STREAMS {
        last = fs
            .lookup(ROOT_INO, OsStr::new("@changes"))
            .await
            .unwrap()
            .attr
            .ino;
    }
    let refused = fs.lookup(ROOT_INO, OsStr::new("@changes")).await;
    assert_eq!(
        refused.map(|_| ()).map_err(|e| e.errno()),
        Err(libc::ENFILE)
    );
    // A stream's last reader leaves: another may open.
    fs.close_stream(last);
    assert!(fs.lookup(ROOT_INO, OsStr::new("@changes")).await.is_ok());
    assert_eq!(calls(&fs).total(), 0, "streams cost no call");
}

/// Two regions over the in-memory store: `/fo/a` and `/fo/b` in both, with
/// values telling the regions apart.
type TwoRegionsFs = Arc<Fs<Failover<Resilient<MemoryStore>>>>;

fn two_regions(retry_after: Duration) -> (TwoRegionsFs, Arc<Metrics>) {
    let (east, west) = (MemoryStore::new(), MemoryStore::new());
    for name in ["a", "b"] {
        east.put_string(&format!("/fo/{name}"), &format!("{name} from us-east-1"));
        west.put_string(&format!("/fo/{name}"), &format!("{name} from us-west-2"));
    }
    let config = config("/fo");
    let metrics = Arc::new(Metrics::default());
    let region = |store, role, name| {
        Resilient::new(store, config.request.clone(), metrics.clone()).in_region(role, name)
    };
    let store = Failover::new(
        region(east, "primary", "us-east-1"),
        region(west, "failover", "us-west-2"),
        retry_after,
    );
    let (fs, _invalidations) = Fs::new(store, config, metrics.clone());
    (fs, metrics)
}

#[tokio::test(start_paused = true)]
async fn a_regional_outage_is_read_through_the_failover_region_and_reads_return_after_the_back_off()
{
    let rest = Duration::from_secs(10);
    let (fs, metrics) = two_regions(rest);
    let east = || fs.store().primary().inner().counts();
    let west = || fs.store().failover().unwrap().inner().counts();
    // Cached from the primary before the outage.
    assert_eq!(cat(&fs, "a").await.unwrap(), b"a from us-east-1");
    let before = east().total();
    assert_eq!(west().total(), 0);

    fs.store()
        .primary()
        .inner()
        .fail_every_call(Some(StoreError::Unavailable("503".into())));
    // Past the TTL the refresh of `a` fails over: the replica's value.
    tokio::time::advance(Duration::from_secs(301)).await;
    assert_eq!(cat(&fs, "a").await.unwrap(), b"a from us-west-2");
    assert_eq!(
        east().total() - before,
        u64::from(RequestConfig::default().max_retries) + 1,
        "one call to the primary (its retries included), then it rests"
    );
    let primary_calls = east().total();
    // Listings and cold reads go straight to the failover region.
    let listed = ls(&fs, "").await.unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(cat(&fs, "b").await.unwrap(), b"b from us-west-2");
    assert_eq!(east().total(), primary_calls, "the primary rests");
    assert!(west().total() >= 2, "{:?}", west());
    // An answer about a parameter is the failover region's to give while
    // the primary rests, and costs the primary nothing.
    assert_eq!(walk(&fs, "missing").await.unwrap_err(), libc::ENOENT);
    assert_eq!(east().total(), primary_calls);

    // Both regions down: the cached values are served stale, as ever.
    fs.store()
        .failover()
        .unwrap()
        .inner()
        .fail_every_call(Some(StoreError::Unavailable("503".into())));
    tokio::time::advance(Duration::from_secs(301)).await;
    assert_eq!(cat(&fs, "b").await.unwrap(), b"b from us-west-2");
    assert!(
        metrics
            .stale_serves
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );

    // Both answer again: after the back-off, reads return to the primary
    // (a cold one first; values read from the replica are kept for their TTL
    // like any other, then refreshed from the primary).
    fs.store().primary().inner().fail_every_call(None);
    fs.store().failover().unwrap().inner().fail_every_call(None);
    fs.store()
        .primary()
        .inner()
        .put_string("/fo/c", "c from us-east-1");
    fs.store()
        .failover()
        .unwrap()
        .inner()
        .put_string("/fo/c", "c from us-west-2");
    tokio::time::advance(rest).await;
    assert_eq!(cat(&fs, "c").await.unwrap(), b"c from us-east-1");
    tokio::time::advance(Duration::from_secs(301)).await;
    let failover_calls = west().total();
    assert_eq!(cat(&fs, "a").await.unwrap(), b"a from us-east-1");
    assert_eq!(cat(&fs, "b").await.unwrap(), b"b from us-east-1");
    assert_eq!(
        west().total(),
        failover_calls,
        "nothing more from the replica"
    );
    assert_eq!(
        metrics.region_calls("primary"),
        east().total(),
        "every call counted in its region"
    );
    assert_eq!(metrics.region_calls("failover"), west().total());
}

#[tokio::test(start_paused = true)]
async fn a_denied_or_missing_parameter_does_not_fail_over() {
    let (fs, _metrics) = two_regions(Duration::from_secs(10));
    fs.store()
        .primary()
        .inner()
        .fail_name("/fo/a", StoreError::access_denied("not for you"));
    assert_eq!(walk(&fs, "a").await.unwrap_err(), libc::EACCES);
    assert_eq!(walk(&fs, "nope").await.unwrap_err(), libc::ENOENT);
    assert_eq!(fs.store().failover().unwrap().inner().counts().total(), 0);
    assert!(!fs.store().on_failover());
}

/// Found by the reference model: a directory's listing read again past its
/// TTL kept the old listing's word that the directory had no value of its
/// own, so `@value` stayed hidden after the directory gained one.
#[tokio::test(start_paused = true)]
async fn a_value_a_directory_gains_shows_as_value_after_the_ttl() {
    let store = MemoryStore::new();
    store.put_string("/m/b/a/b", "below");
    let (fs, _inval) = mount(store, config("/m"));
    assert_eq!(
        ls(&fs, "b").await.unwrap(),
        [("a".to_string(), FileKind::Dir)]
    );
    fs.store().inner().put_string("/m/b", "own");
    tokio::time::advance(Duration::from_secs(301)).await;
    // Refreshed as a value below `b`: `b` is still a directory without a call.
    let companion = events::event("/m/b/a/b", "Update", std::time::SystemTime::now());
    fs.apply_events(vec![companion]).await;
    assert_eq!(
        ls(&fs, "b").await.unwrap(),
        [
            ("@value".to_string(), FileKind::File),
            ("a".to_string(), FileKind::Dir)
        ]
    );
    assert_eq!(cat(&fs, "b/@value").await.unwrap(), b"own");
}

/// Found by the reference model: past its TTL, a listing that named a file
/// whose value has gone since made a lookup answer ENOENT without asking
/// whether the name had become a directory, until the parent was listed again.
#[tokio::test(start_paused = true)]
async fn a_file_that_became_a_directory_is_found_after_the_ttl() {
    let store = MemoryStore::new();
    store.put_string("/m/a", "file");
    let (fs, _inval) = mount(store, config("/m"));
    assert_eq!(walk(&fs, "b").await.err(), Some(libc::ENOENT));
    // The second sibling looked up reads the root's listing: `a` is a file.
    assert_eq!(cat(&fs, "a").await.unwrap(), b"file");
    fs.store().inner().delete("/m/a");
    fs.store().inner().put_string("/m/a/a", "below");
    tokio::time::advance(Duration::from_secs(301)).await;
    assert_eq!(walk(&fs, "a").await.unwrap().attr.kind, FileKind::Dir);
    assert_eq!(cat(&fs, "a/a").await.unwrap(), b"below");
}

/// Found by the reference model: an event for a name in a directory a stale
/// listing lacked cached that directory as new, holding that name alone, so
/// its other names answered ENOENT for a TTL.
#[tokio::test(start_paused = true)]
async fn an_event_below_a_directory_a_stale_listing_lacks_hides_no_sibling() {
    let store = MemoryStore::new();
    store.put_string("/m/b/a", "");
    let (fs, _inval) = mount(store, config("/m"));
    assert_eq!(walk(&fs, "b/a/b").await.err(), Some(libc::ENOTDIR));
    assert_eq!(walk(&fs, "a/a").await.err(), Some(libc::ENOENT));
    fs.store().inner().put_string("/m/a/a", "one");
    fs.store().inner().put_string("/m/a/b", "two");
    tokio::time::advance(Duration::from_secs(301)).await;
    let update = events::event("/m/a/a", "Update", std::time::SystemTime::now());
    fs.apply_events(vec![update]).await;
    assert_eq!(cat(&fs, "a/b").await.unwrap(), b"two");
    assert_eq!(cat(&fs, "a/a").await.unwrap(), b"one");
}
