//! The command line: clap's `CliArgs`, `-o` mount options rewritten into the
//! same long flags (so `mount -t fuse.ssmfs` and /etc/fstab work), and the
//! conversion into plain settings. No clap type leaves this module.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::airflow::{self, KwargsError};
use crate::config::{self, CacheConfig, EventsSource, FsConfig, RequestConfig};
use crate::names;
use crate::store::ssm::AwsOptions;

#[derive(Debug, Parser)]
#[command(
    name = "ssmfs",
    version,
    about = "Mount an AWS SSM Parameter Store path as a read-only filesystem",
    after_help = "Example: ssmfs /airflow /mnt/airflow\n         cat /mnt/airflow/variables/my_secret\n\
                  Unmount with: umount /mnt/airflow (or Ctrl-C / SIGTERM in --foreground)"
)]
pub struct CliArgs {
    /// SSM path to mount (`/airflow`, or `/` for the whole store), then the mount point.
    /// With --airflow or --airflow-kwargs, only the mount point.
    #[arg(value_name = "PREFIX> <MOUNTPOINT", num_args = 1..=2, required = true)]
    pub positional: Vec<OsString>,

    // ----- mount -----
    /// Stay attached until the filesystem is unmounted (otherwise daemonize once mounted).
    #[arg(short, long, help_heading = "Mount")]
    pub foreground: bool,
    /// Mount options, comma separated: the long options below without dashes
    /// (`-o allow_other,uid=50000,ttl=5m`). Generic ones (ro, nosuid, _netdev...) are accepted.
    #[arg(short = 'o', value_name = "OPTIONS", help_heading = "Mount")]
    pub options: Vec<String>,
    /// Let users other than the mounting one enter the mount (modes still apply).
    #[arg(long, help_heading = "Mount")]
    pub allow_other: bool,
    /// Let root enter the mount as well as the mounting user.
    #[arg(long, help_heading = "Mount", conflicts_with = "allow_other")]
    pub allow_root: bool,
    /// Owner of every file and directory [default: the mounting user].
    #[arg(long, help_heading = "Mount")]
    pub uid: Option<u32>,
    /// Group of every file and directory [default: the mounting user's group].
    #[arg(long, help_heading = "Mount")]
    pub gid: Option<u32>,
    /// Permission bits of files, octal.
    #[arg(long, default_value = "0400", value_parser = config::parse_mode, help_heading = "Mount")]
    pub file_mode: u16,
    /// Permission bits of directories, octal.
    #[arg(long, default_value = "0500", value_parser = config::parse_mode, help_heading = "Mount")]
    pub dir_mode: u16,
    /// Permit a file mode that lets every user read secrets (o+r).
    #[arg(long, help_heading = "Mount")]
    pub allow_world_readable: bool,
    /// Lock the daemon's memory so secrets never reach swap (needs CAP_IPC_LOCK).
    #[arg(long, help_heading = "Mount")]
    pub mlock: bool,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 4, help_heading = "Mount")]
    pub threads: usize,
    /// Hold the mount in a small supervisor that restarts the serving daemon
    /// when it dies and replaces it on SIGUSR2, with no failed read (root).
    #[arg(long, help_heading = "Mount")]
    pub supervise: bool,
    /// With --supervise: write the serving daemon's pid here (after each restart).
    #[arg(
        long,
        value_name = "PATH",
        help_heading = "Mount",
        requires = "supervise"
    )]
    pub pid_file: Option<PathBuf>,
    /// With --supervise: how long readers wait for a daemon that cannot
    /// start before the connection is aborted (they get an error).
    #[arg(long, default_value = "30s", value_parser = config::parse_duration, allow_hyphen_values = true, help_heading = "Mount")]
    pub restart_deadline: Duration,
    /// Internal: serve the supervisor's socket on fd 3 (inode journal on fd 4).
    #[arg(long, hide = true, conflicts_with = "supervise")]
    pub serve_fd: bool,
    /// Internal (the CSI driver's serving side): with --supervise, hold the
    /// mount the plugin made, handed over on fds 3-7 (`crate::handoff`).
    #[arg(long, hide = true, requires = "supervise")]
    pub adopt_fds: bool,

    // ----- cache -----
    /// How long a value or listing is trusted.
    #[arg(long, default_value = "5m", value_parser = config::parse_duration, allow_hyphen_values = true, help_heading = "Cache")]
    pub ttl: Duration,
    /// How long "no such parameter" is trusted.
    #[arg(long, default_value = "30s", value_parser = config::parse_duration, allow_hyphen_values = true, help_heading = "Cache")]
    pub negative_ttl: Duration,
    /// How long past its TTL a cached value is served while SSM is failing.
    #[arg(long, default_value = "1h", value_parser = config::parse_duration, allow_hyphen_values = true, help_heading = "Cache")]
    pub stale_ttl: Duration,
    /// Most values held in memory (least recently used evicted first).
    #[arg(long, default_value_t = config::DEFAULT_CACHE_ENTRIES, help_heading = "Cache")]
    pub cache_entries: usize,
    /// Most bytes of values held in memory.
    #[arg(long, default_value_t = config::DEFAULT_CACHE_BYTES, help_heading = "Cache")]
    pub cache_bytes: usize,

    // ----- AWS -----
    /// AWS region [default: the standard chain: AWS_REGION, profile, instance metadata].
    #[arg(long, help_heading = "AWS")]
    pub region: Option<String>,
    /// Named profile from ~/.aws/config.
    #[arg(long, help_heading = "AWS")]
    pub profile: Option<String>,
    /// SSM endpoint (for VPC endpoints or a local test server); AWS_ENDPOINT_URL_SSM also works.
    #[arg(long, help_heading = "AWS")]
    pub endpoint_url: Option<String>,
    /// Assume this IAM role (through STS) for every SSM call.
    #[arg(long, help_heading = "AWS")]
    pub role_arn: Option<String>,
    /// Assume --role-arn with this OIDC token (AssumeRoleWithWebIdentity,
    /// as IRSA does) instead of with the ambient credentials; re-read at
    /// every refresh of the session.
    #[arg(long, value_name = "PATH", requires = "role_arn", help_heading = "AWS")]
    pub web_identity_token_file: Option<PathBuf>,
    /// Take credentials from EKS Pod Identity's agent with this pod token
    /// (audience pods.eks.amazonaws.com), sent as the Authorization header
    /// as the SDKs' container credentials provider does; re-read at every
    /// refresh. The CSI driver sets it for volumes with usePodIdentity.
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with = "role_arn",
        help_heading = "AWS"
    )]
    pub pod_identity_token_file: Option<PathBuf>,
    /// Where EKS Pod Identity's agent answers (with --pod-identity-token-file).
    #[arg(
        long,
        value_name = "URL",
        default_value = crate::store::ssm::POD_IDENTITY_AGENT_URL,
        help_heading = "AWS"
    )]
    pub pod_identity_agent_url: String,
    /// The STS session name for --role-arn (CloudTrail shows it).
    #[arg(
        long,
        default_value = "ssmfs",
        requires = "role_arn",
        help_heading = "AWS"
    )]
    pub role_session_name: String,
    /// Serve SecureString values as SSM stores them (ciphertext), without kms:Decrypt.
    #[arg(long, help_heading = "AWS")]
    pub no_decrypt: bool,
    /// Deadline for one answer from SSM, retries included.
    #[arg(long, default_value = "5s", value_parser = config::parse_duration, allow_hyphen_values = true, help_heading = "AWS")]
    pub request_timeout: Duration,
    /// How long a reader of an uncached value waits through SSM throttling
    /// before EIO (outages fail after --request-timeout).
    #[arg(long, default_value = "10m", value_parser = config::parse_duration, allow_hyphen_values = true, help_heading = "AWS")]
    pub throttle_patience: Duration,
    /// Most SSM calls per second from this host; more are queued.
    #[arg(long, default_value_t = config::DEFAULT_MAX_TPS, value_parser = clap::value_parser!(u32).range(1..), help_heading = "AWS")]
    pub max_tps: u32,
    /// Retries of a throttled or failed call.
    #[arg(long, default_value_t = config::DEFAULT_MAX_RETRIES, help_heading = "AWS")]
    pub max_retries: u32,
    /// A second region asked while the primary fails (5xx, timeouts, throttling
    /// past the retries): same credentials, the replica you keep there.
    #[arg(long, value_name = "REGION", help_heading = "AWS")]
    pub failover_region: Option<String>,
    /// The failover region's SSM endpoint [default: the region's own]. Unused
    /// without --failover-region, so an environment may set it for every mount.
    #[arg(
        long,
        value_name = "URL",
        env = "SSMFS_FAILOVER_ENDPOINT_URL",
        help_heading = "AWS"
    )]
    pub failover_endpoint_url: Option<String>,
    /// How long a failing primary region is left alone (calls go to the
    /// failover region) before it is tried again.
    #[arg(long, default_value = "10s", value_parser = config::parse_duration, allow_hyphen_values = true, help_heading = "AWS")]
    pub failover_retry_after: Duration,

    // ----- change events -----
    /// SQS queue (URL) that receives SSM's "Parameter Store Change" events from
    /// EventBridge, read by this host alone: changed values are fetched within
    /// seconds, so the TTL can be long.
    #[arg(long, value_name = "URL", help_heading = "Change events")]
    pub events_queue: Option<String>,
    /// SNS topic (ARN) that carries those events, for fleets: this host makes
    /// and subscribes a queue of its own, removed at unmount.
    #[arg(
        long,
        value_name = "ARN",
        help_heading = "Change events",
        conflicts_with = "events_queue"
    )]
    pub events_topic: Option<String>,
    /// How many hosts receive each change event (one queue each): their
    /// refetches are spread so the fleet takes half of --ssm-quota-tps. In
    /// topic mode the topic's subscriptions are counted too (the larger wins).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Change events")]
    pub events_hosts: u32,
    /// The account's SSM quota for GetParameters, calls a second: 40 by
    /// default; with higher throughput enabled, the quota it gives.
    #[arg(long, value_name = "TPS", default_value_t = config::DEFAULT_SSM_QUOTA_TPS, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Change events")]
    pub ssm_quota_tps: u32,

    // ----- airflow -----
    /// Mount Airflow's secrets layout (variables/, connections/, config/) from the
    /// JSON kwargs of SystemsManagerParameterStoreBackend, as Airflow reads them.
    /// Takes only MOUNTPOINT.
    #[arg(
        long,
        value_name = "JSON",
        help_heading = "Airflow",
        conflicts_with = "airflow"
    )]
    pub airflow_kwargs: Option<String>,
    /// Like --airflow-kwargs, reading the AIRFLOW__SECRETS__BACKEND_KWARGS variable.
    #[arg(long, help_heading = "Airflow")]
    pub airflow: bool,
    /// The kwargs are SecretsManagerBackend's: its prefixes name secrets, read
    /// through SSM's /aws/reference/secretsmanager/ (only sep "/").
    #[arg(long, help_heading = "Airflow")]
    pub airflow_secrets_manager: bool,

    // ----- logging -----
    /// Write logs to this file instead of stderr (background mode: instead of syslog).
    #[arg(long, help_heading = "Logging")]
    pub log_file: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9108), or
    /// on a unix socket (unix:/run/ssmfs/metrics.sock).
    #[arg(long, help_heading = "Logging")]
    pub metrics_addr: Option<crate::daemon::metrics_http::MetricsAddr>,
}

/// Everything `main` needs, in plain types.
#[derive(Debug)]
pub struct Settings {
    pub fs: FsConfig,
    /// Names the mount in mount(8): `ssmfs:<prefix>` or `ssmfs:airflow`.
    pub fsname: String,
    /// Said once logging is up (e.g. Airflow kwargs that ssmfs does not use).
    pub warnings: Vec<String>,
    pub aws: AwsOptions,
    pub mountpoint: PathBuf,
    pub foreground: bool,
    pub allow_other: bool,
    pub allow_root: bool,
    pub threads: usize,
    pub mlock: bool,
    pub log_file: Option<PathBuf>,
    pub metrics_addr: Option<crate::daemon::metrics_http::MetricsAddr>,
    pub events: Option<EventsSource>,
    pub supervise: bool,
    pub pid_file: Option<PathBuf>,
    pub restart_deadline: Duration,
    pub serve_fd: bool,
    pub adopt_fds: bool,
}

/// The arguments of the serving daemon a supervisor starts: the supervisor's
/// own (mount options expanded), without what only the supervisor uses, and
/// with `--serve-fd`.
/// This process's command line, with the part an `--args-fd` holds put in
/// its place (read once: the fd is closed after).
pub fn process_args() -> std::io::Result<Vec<OsString>> {
    static ARGS: std::sync::OnceLock<Result<Vec<OsString>, String>> = std::sync::OnceLock::new();
    ARGS.get_or_init(|| {
        crate::handoff::expand_args(std::env::args_os().collect()).map_err(|e| e.to_string())
    })
    .clone()
    .map_err(std::io::Error::other)
}

pub fn daemon_args(args: Vec<OsString>) -> Result<Vec<OsString>, CliError> {
    let mut out = vec![OsString::from("--serve-fd")];
    let mut iter = expand_mount_options(args)?.into_iter().skip(1);
    while let Some(arg) = iter.next() {
        let text = arg.to_string_lossy();
        if text == "--supervise" || text == "--adopt-fds" {
            continue;
        }
        if text == "--pid-file" || text == "--restart-deadline" {
            iter.next();
            continue;
        }
        if text.starts_with("--pid-file=") || text.starts_with("--restart-deadline=") {
            continue;
        }
        out.push(arg);
    }
    Ok(out)
}

/// Mount options that belong to mount(8) itself or that ssmfs always applies.
const GENERIC_MOUNT_OPTIONS: &[&str] = &[
    "ro",
    "rw",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "auto",
    "noauto",
    "user",
    "users",
    "nouser",
    "_netdev",
    "nofail",
    "defaults",
    "default_permissions",
    "async",
    "sync",
];

/// A command line that cannot be used, in one line that names the problem.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Not an error: `--help` or `--version` text, for standard output.
    #[error("{0}")]
    Informational(String),
    #[error("{0} (see ssmfs --help)")]
    Usage(String),
    #[error("-o needs a list of options")]
    EmptyMountOptions,
    #[error("{flag}: {cause}")]
    Kwargs {
        flag: &'static str,
        cause: KwargsError,
    },
    #[error("with {0} give only MOUNTPOINT: ssmfs {0} <MOUNTPOINT>")]
    AirflowTakesOnlyMountpoint(&'static str),
    #[error("missing MOUNTPOINT: usage is ssmfs <PREFIX> <MOUNTPOINT>")]
    MissingMountpoint,
    #[error("usage is ssmfs <PREFIX> <MOUNTPOINT>")]
    MissingArguments,
    #[error("invalid PREFIX '{prefix}': {cause}")]
    BadPrefix {
        prefix: String,
        cause: names::NameError,
    },
    #[error("--file-mode {0:04o} lets every user read secrets; add --allow-world-readable if that is intended")]
    WorldReadable(u16),
    #[error("--threads must be at least 1")]
    NoThreads,
    #[error("--failover-region {0} is the primary region; name another one")]
    FailoverToItself(String),
    #[error("--cache-entries and --cache-bytes must be at least 1")]
    EmptyCache,
    #[error("--restart-deadline must be at least {MIN_RESTART_DEADLINE:?}: starting a daemon takes a few hundred milliseconds")]
    RestartDeadlineTooShort,
    #[error(
        "--events-queue '{0}' is not a queue URL (https://sqs.REGION.amazonaws.com/ACCOUNT/NAME)"
    )]
    BadQueueUrl(String),
    #[error("--events-topic '{0}' is not an SNS topic ARN (arn:aws:sns:REGION:ACCOUNT:NAME)")]
    BadTopicArn(String),
}

/// A deadline shorter than one daemon start would abort every restart.
const MIN_RESTART_DEADLINE: Duration = Duration::from_secs(1);

/// Rewrites `-o a,b=c` into `--a --b c`, dropping generic mount options.
pub fn expand_mount_options(args: Vec<OsString>) -> Result<Vec<OsString>, CliError> {
    let mut out = Vec::with_capacity(args.len());
    let mut iter = args.into_iter();
    while let Some(arg) = iter.next() {
        let text = arg.to_string_lossy().into_owned();
        let list = if text == "-o" {
            iter.next()
                .ok_or(CliError::EmptyMountOptions)?
                .to_string_lossy()
                .into_owned()
        } else if let Some(rest) = text.strip_prefix("-o").filter(|r| !r.is_empty()) {
            rest.to_string()
        } else {
            out.push(arg);
            continue;
        };
        for option in list.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let (key, value) = match option.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (option, None),
            };
            if GENERIC_MOUNT_OPTIONS.contains(&key)
                || key.starts_with("x-")
                || key == "fsname"
                || key == "subtype"
            {
                continue;
            }
            out.push(format!("--{}", key.replace('_', "-")).into());
            if let Some(value) = value {
                out.push(value.into());
            }
        }
    }
    Ok(out)
}

impl CliArgs {
    /// Parses `args` (the process's, program name first), mount options included.
    pub fn parse_with_mount_options(args: Vec<OsString>) -> Result<Self, CliError> {
        CliArgs::try_parse_from(expand_mount_options(args)?).map_err(|error| {
            use clap::error::ErrorKind;
            if matches!(
                error.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                return CliError::Informational(error.render().to_string());
            }
            // One line naming the problem, instead of clap's three.
            let rendered = error.render().to_string();
            let problem: Vec<&str> = rendered
                .lines()
                .take_while(|line| !line.trim().is_empty())
                .map(str::trim)
                .collect();
            let problem = problem.join(" ");
            CliError::Usage(
                problem
                    .strip_prefix("error: ")
                    .unwrap_or(&problem)
                    .to_string(),
            )
        })
    }

    pub fn into_settings(self) -> Result<Settings, CliError> {
        let airflow_json = match (&self.airflow_kwargs, self.airflow) {
            (Some(json), _) => Some(("--airflow-kwargs", json.clone())),
            (None, true) => Some((
                "--airflow (AIRFLOW__SECRETS__BACKEND_KWARGS)",
                std::env::var("AIRFLOW__SECRETS__BACKEND_KWARGS").unwrap_or_default(),
            )),
            (None, false) => None,
        };
        let mut warnings = Vec::new();
        let (prefix, mountpoint, airflow) = match (&airflow_json, self.positional.as_slice()) {
            (Some((flag, json)), [mountpoint]) => {
                let json = if json.trim().is_empty() {
                    // Airflow itself falls back to its default prefixes here.
                    warnings.push(format!(
                        "{flag}: not set or empty; using Airflow's default prefixes"
                    ));
                    "{}"
                } else {
                    json.as_str()
                };
                let backend = match self.airflow_secrets_manager {
                    true => airflow::Backend::SecretsManager,
                    false => airflow::Backend::ParameterStore,
                };
                let airflow = airflow::parse_for(json, backend)
                    .map_err(|cause| CliError::Kwargs { flag, cause })?;
                warnings.extend(airflow.notes.iter().map(|note| format!("{flag}: {note}")));
                if !airflow.ignored_keys.is_empty() {
                    warnings.push(format!(
                        "{flag}: ssmfs does not use these keys: {}",
                        airflow.ignored_keys.join(", ")
                    ));
                }
                ("/".to_string(), PathBuf::from(mountpoint), Some(airflow))
            }
            (Some((flag, _)), _) => return Err(CliError::AirflowTakesOnlyMountpoint(flag)),
            (None, _) if self.airflow_secrets_manager => {
                return Err(CliError::Usage(
                    "--airflow-secrets-manager goes with --airflow or --airflow-kwargs".into(),
                ))
            }
            (None, [prefix, mountpoint]) => (
                prefix.to_string_lossy().into_owned(),
                PathBuf::from(mountpoint),
                None,
            ),
            (None, [_]) => return Err(CliError::MissingMountpoint),
            (None, _) => return Err(CliError::MissingArguments),
        };
        let prefix =
            names::parse_prefix(&prefix).map_err(|cause| CliError::BadPrefix { prefix, cause })?;
        if self.file_mode & 0o004 != 0 && !self.allow_world_readable {
            return Err(CliError::WorldReadable(self.file_mode));
        }
        if self.threads == 0 {
            return Err(CliError::NoThreads);
        }
        if self.cache_entries == 0 || self.cache_bytes == 0 {
            return Err(CliError::EmptyCache);
        }
        if self.restart_deadline < MIN_RESTART_DEADLINE {
            return Err(CliError::RestartDeadlineTooShort);
        }
        let events = match (self.events_queue, self.events_topic) {
            (Some(url), _) if !(url.starts_with("https://") || url.starts_with("http://")) => {
                return Err(CliError::BadQueueUrl(url))
            }
            (Some(url), _) => Some(EventsSource::Queue(url)),
            (None, Some(arn)) if !(arn.starts_with("arn:") && arn.contains(":sns:")) => {
                return Err(CliError::BadTopicArn(arn))
            }
            (None, Some(arn)) => Some(EventsSource::Topic(arn)),
            (None, None) => None,
        };
        let mut fs = FsConfig::new(prefix);
        fs.uid = self.uid.unwrap_or(fs.uid);
        fs.gid = self.gid.unwrap_or(fs.gid);
        fs.file_mode = self.file_mode;
        fs.dir_mode = self.dir_mode;
        fs.cache = CacheConfig {
            ttl: self.ttl,
            negative_ttl: self.negative_ttl,
            stale_ttl: self.stale_ttl,
            max_entries: self.cache_entries,
            max_bytes: self.cache_bytes,
        };
        fs.request = RequestConfig {
            timeout: self.request_timeout,
            throttle_patience: self.throttle_patience,
            max_tps: self.max_tps,
            max_retries: self.max_retries,
        };
        fs.events = config::EventsPacing {
            hosts: self.events_hosts,
            quota_tps: self.ssm_quota_tps,
        };
        let fsname = match &airflow {
            Some(_) => "ssmfs:airflow".to_string(),
            None => format!("ssmfs:{}", fs.prefix),
        };
        // Flags on the command line win over the same settings in the kwargs.
        let (mut region, mut profile, mut endpoint_url, mut role_arn) =
            (self.region, self.profile, self.endpoint_url, self.role_arn);
        if let Some(airflow) = airflow {
            fs.areas = airflow.areas;
            region = region.or(airflow.region);
            profile = profile.or(airflow.profile);
            endpoint_url = endpoint_url.or(airflow.endpoint_url);
            role_arn = role_arn.or(airflow.role_arn);
        }
        if let (Some(failover), Some(primary)) = (&self.failover_region, &region) {
            if failover == primary {
                return Err(CliError::FailoverToItself(failover.clone()));
            }
        }
        let failover = self
            .failover_region
            .map(|region| crate::store::ssm::FailoverOptions {
                region,
                endpoint_url: self.failover_endpoint_url,
                retry_after: self.failover_retry_after,
            });
        let aws = AwsOptions {
            region,
            profile,
            endpoint_url,
            role_arn,
            web_identity_token_file: self.web_identity_token_file,
            pod_identity: self
                .pod_identity_token_file
                .map(|token_file| (token_file, self.pod_identity_agent_url)),
            session_name: Some(self.role_session_name),
            no_decrypt: self.no_decrypt,
            attempt_timeout: self.request_timeout,
            failover,
        };
        Ok(Settings {
            fs,
            fsname,
            warnings,
            aws,
            mountpoint,
            foreground: self.foreground,
            allow_other: self.allow_other,
            allow_root: self.allow_root,
            threads: self.threads,
            mlock: self.mlock,
            log_file: self.log_file,
            metrics_addr: self.metrics_addr,
            events,
            supervise: self.supervise,
            pid_file: self.pid_file,
            restart_deadline: self.restart_deadline,
            serve_fd: self.serve_fd,
            adopt_fds: self.adopt_fds,
        })
    }
}

#[cfg(test)]
mod tests;
