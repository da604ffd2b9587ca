//! Plain configuration structs for the filesystem core and its cache.
//!
//! No I/O here and no clap types: `cli.rs` turns the command line into these.
//! Every default states why it was chosen.

use std::time::Duration;

/// How long a fetched value or listing is trusted. AWS's own Parameters and
/// Secrets Lambda extension caches for 300 s; matching it keeps SSM traffic at
/// one call per secret per 5 minutes while rotations show up within minutes.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// A name that did not exist is re-checked sooner than a value, so a freshly
/// created parameter appears quickly, while a loop probing a missing name still
/// costs at most one call per 30 s.
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(30);
/// How long a cached value may be served after its TTL when SSM cannot answer.
/// An hour rides out a regional SSM or network outage of the length seen in
/// practice; a rotation made during the outage cannot be seen anyway.
pub const DEFAULT_STALE_TTL: Duration = Duration::from_secs(3600);
/// Deadline for one answer from SSM, retries included: a reader of an uncached
/// value gets EIO after this long instead of hanging.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a reader of an uncached value waits through throttling before
/// EIO: SSM is answering, only not yet. 1,000 hosts booting within a minute
/// share the default 40 TPS and need about four minutes to read their first
/// 50 secrets each (scripts/fleet.sh, cold_boot). Outages still fail after the
/// request timeout.
pub const DEFAULT_THROTTLE_PATIENCE: Duration = Duration::from_secs(600);
/// A quarter of SSM's default 40 TPS per account and region, so several hosts
/// can share an account before they throttle each other.
pub const DEFAULT_MAX_TPS: u32 = 10;
/// Ten thousand values is far more than any Airflow deployment reads, yet the
/// bookkeeping stays in the low megabytes.
pub const DEFAULT_CACHE_ENTRIES: usize = 10_000;
/// 64 MiB bounds memory even if every value were an 8 KB advanced parameter.
pub const DEFAULT_CACHE_BYTES: usize = 64 * 1024 * 1024;
/// Owner-only read: a secret file should be readable by exactly one user.
pub const DEFAULT_FILE_MODE: u16 = 0o400;
/// Owner-only traverse and list, matching the file mode.
pub const DEFAULT_DIR_MODE: u16 = 0o500;
/// SSM's default throughput quota per account and region (GetParameter,
/// GetParameters and GetParametersByPath together): what the pacing of
/// change events divides among the hosts unless told of a higher one.
pub const DEFAULT_SSM_QUOTA_TPS: u32 = 40;
/// The share of that quota the refetches one change causes may take across
/// the fleet: half, leaving the other half to Airflow's schedulers, CI and
/// deploy tools that share the account.
pub const EVENTS_QUOTA_SHARE: f64 = 0.5;
/// How long a failing primary region rests before it is tried again
/// (`--failover-retry-after`): a region back from an outage gets its readers
/// back within 10 s, while one still down costs a single failed call per 10 s
/// rather than every read paying its retries and deadline first.
pub const DEFAULT_FAILOVER_RETRY_AFTER: Duration = Duration::from_secs(10);
/// Retries of throttled or failed calls. Three retries with backoff ride out a
/// throttling burst while keeping a cold read well inside the request timeout.
pub const DEFAULT_MAX_RETRIES: u32 = 3;

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub stale_ttl: Duration,
    pub max_entries: usize,
    pub max_bytes: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_TTL,
            negative_ttl: DEFAULT_NEGATIVE_TTL,
            stale_ttl: DEFAULT_STALE_TTL,
            max_entries: DEFAULT_CACHE_ENTRIES,
            max_bytes: DEFAULT_CACHE_BYTES,
        }
    }
}

/// How calls to SSM are paced and retried.
#[derive(Debug, Clone)]
pub struct RequestConfig {
    pub timeout: Duration,
    pub throttle_patience: Duration,
    pub max_tps: u32,
    pub max_retries: u32,
}

impl Default for RequestConfig {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_REQUEST_TIMEOUT,
            throttle_patience: DEFAULT_THROTTLE_PATIENCE,
            max_tps: DEFAULT_MAX_TPS,
            max_retries: DEFAULT_MAX_RETRIES,
        }
    }
}

/// How the refetches change events cause are spread (see `fs::apply_events`).
#[derive(Debug, Clone)]
pub struct EventsPacing {
    /// How many hosts receive each event: `--events-hosts`, or in topic mode
    /// the topic's confirmed subscriptions (learned at run time).
    pub hosts: u32,
    /// The account's quota for GetParameters (`--ssm-quota-tps`).
    pub quota_tps: u32,
}

impl Default for EventsPacing {
    fn default() -> Self {
        Self {
            // Unknown: throttling feedback widens the spread (see `fs::apply_events`).
            hosts: 1,
            quota_tps: DEFAULT_SSM_QUOTA_TPS,
        }
    }
}

#[derive(Debug, Clone)]
pub struct FsConfig {
    /// The SSM path shown at the mount root, normalised (`/` or `/a/b`).
    /// Unused when `areas` is set.
    pub prefix: String,
    /// Airflow layout: the root holds one folder per area instead.
    pub areas: Vec<crate::airflow::Area>,
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u16,
    pub dir_mode: u16,
    pub cache: CacheConfig,
    pub request: RequestConfig,
    pub events: EventsPacing,
}

impl FsConfig {
    /// A configuration with every default, owned by the current user.
    pub fn new(prefix: impl Into<String>) -> Self {
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Self {
            prefix: prefix.into(),
            areas: Vec::new(),
            uid,
            gid,
            file_mode: DEFAULT_FILE_MODE,
            dir_mode: DEFAULT_DIR_MODE,
            cache: CacheConfig::default(),
            request: RequestConfig::default(),
            events: EventsPacing::default(),
        }
    }
}

/// Where change events come from (see `crate::events`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventsSource {
    /// An SQS queue this host reads alone.
    Queue(String),
    /// An SNS topic: this host subscribes a queue of its own.
    Topic(String),
}

impl FsConfig {
    /// The SSM paths whose names the mount serves: the prefix, or each area's.
    pub fn served_prefixes(&self) -> Vec<String> {
        if self.areas.is_empty() {
            vec![self.prefix.clone()]
        } else {
            self.areas.iter().map(|a| a.prefix.clone()).collect()
        }
    }
}

/// A setting's text that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("'{0}' is negative; use a duration such as 30s, 5m or 1h")]
    NegativeDuration(String),
    #[error("'{0}' has no unit; use a duration such as 30s, 5m or 1h")]
    DurationWithoutUnit(String),
    #[error("'{0}' is not a duration; use a form such as 30s, 5m or 1h")]
    NotADuration(String),
    #[error("'{0}' is not an octal permission mode such as 0400")]
    NotAMode(String),
}

/// Parses a duration such as `30s`, `5m`, `1h` or `1h30m`. A bare number is
/// refused: `--ttl 300` is too easy to misread as milliseconds.
pub fn parse_duration(raw: &str) -> Result<Duration, ValueError> {
    let trimmed = raw.trim();
    if trimmed.starts_with('-') {
        return Err(ValueError::NegativeDuration(raw.to_string()));
    }
    if !trimmed.is_empty() && trimmed.chars().all(|c| c.is_ascii_digit()) {
        return Err(ValueError::DurationWithoutUnit(raw.to_string()));
    }
    humantime::parse_duration(trimmed).map_err(|_| ValueError::NotADuration(raw.to_string()))
}

/// Parses an octal permission mode such as `0400` or `440`.
pub fn parse_mode(raw: &str) -> Result<u16, ValueError> {
    let digits = raw.trim().trim_start_matches("0o");
    u16::from_str_radix(digits, 8)
        .ok()
        .filter(|mode| *mode <= 0o7777 && !digits.is_empty())
        .ok_or_else(|| ValueError::NotAMode(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("-5s")
            .unwrap_err()
            .to_string()
            .contains("negative"));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("300")
            .unwrap_err()
            .to_string()
            .contains("no unit"));
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0400").unwrap(), 0o400);
        assert_eq!(parse_mode("440").unwrap(), 0o440);
        assert!(parse_mode("999").is_err());
        assert!(parse_mode("rw").is_err());
        assert!(parse_mode("").is_err());
        assert!(parse_mode("77777").is_err());
    }
}
