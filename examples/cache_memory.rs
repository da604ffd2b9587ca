//! Memory held by the cache for N cached parameters of 100 bytes.
//!
//! Seeds the in-memory store, notes resident memory, then lists and reads every
//! parameter through the filesystem core with a cache big enough for all of
//! them, and prints the growth in resident memory: what the cache and inode
//! bookkeeping cost, apart from the store double. Prints the count, the growth
//! of resident memory in KiB, and the live heap bytes per parameter (counted by
//! a wrapping allocator, so malloc's own overhead is the difference). Used by
//! scripts/bench.sh.
//!
//!     cargo run --release --example cache_memory -- 100000

use std::ffi::OsStr;
use std::sync::Arc;

use ssmfs::config::FsConfig;
use ssmfs::fs::Fs;
use ssmfs::fs::ROOT_INO;
use ssmfs::metrics::Metrics;
use ssmfs::store::memory::MemoryStore;
use ssmfs::store::resilient::Resilient;
use ssmfs::store::ParameterKind;

/// Counts live heap bytes, so the report can say where the memory goes.
struct Counting;
static LIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), std::sync::atomic::Ordering::Relaxed);
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        LIVE.fetch_sub(layout.size(), std::sync::atomic::Ordering::Relaxed);
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}
#[global_allocator]
static ALLOCATOR: Counting = Counting;
fn live() -> usize {
    LIVE.load(std::sync::atomic::Ordering::Relaxed)
}

fn resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::main]
async fn main() {
    let count: usize = std::env::args()
        .nth(1)
        .map_or(100_000, |n| n.parse().expect("a count"));
    let store = MemoryStore::new();
    for i in 0..count {
        store.put(
            &format!("/bench/params/p{i:06}"),
            vec![b'v'; 100],
            ParameterKind::String,
        );
    }
    let mut config = FsConfig::new("/bench");
    config.cache.max_entries = count + 10;
    config.request.max_tps = 1_000_000;
    let metrics = Arc::new(Metrics::default());
    let store = Resilient::new(store, config.request.clone(), metrics.clone());
    let (fs, _invalidations) = Fs::new(store, config, metrics);
    let before = resident_kib();
    let heap0 = live();
    let dir = fs
        .lookup(ROOT_INO, OsStr::new("params"))
        .await
        .unwrap()
        .attr
        .ino;
    let handle = fs.opendir(dir).await.unwrap();
    let items = fs.readdir(handle, 0, usize::MAX).unwrap();
    fs.releasedir(handle);
    for (_, item) in items.iter().filter(|(_, i)| i.name.starts_with('p')) {
        let entry = fs.lookup(dir, OsStr::new(&item.name)).await.unwrap();
        assert_eq!(
            fs.read(entry.attr.ino, 0, 4096)
                .await
                .unwrap()
                .bytes()
                .len(),
            100
        );
    }
    drop(items);
    assert!(fs.cached_values() >= count, "every value is cached");
    // What the daemon's periodic trim (heap::TRIM_EVERY) does.
    ssmfs::heap::release_freed();
    let grown = resident_kib().saturating_sub(before);
    let heap_per_parameter = live().saturating_sub(heap0) / count;
    println!("{count} {grown} {heap_per_parameter}");
}
