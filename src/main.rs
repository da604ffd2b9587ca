//! `ssmfs [OPTIONS] <PREFIX> <MOUNTPOINT>`: parse, check, (daemonize), mount,
//! serve until unmounted or signalled. All filesystem logic lives in the library.

// The daemon's futures nest deep (FUSE op, lookup, listing, pacing, the
// SDK's layers): computing their layout needs more than the default 128.
#![recursion_limit = "256"]

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use ssmfs::cli::{CliArgs, CliError, Settings};
use ssmfs::daemon::{self, Forked, MountSettings, Readiness};
use ssmfs::events;
use ssmfs::fs::Fs;
use ssmfs::store::failover::Failover;
use ssmfs::store::resilient::Resilient;
use ssmfs::store::ssm::{load_aws_config, SsmStore};
use tracing_subscriber::EnvFilter;

/// Exit status for a command line that cannot be used (as clap and mount(8) use).
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let args = match ssmfs::cli::process_args() {
        Ok(args) => args,
        Err(error) => {
            eprintln!("ssmfs: {error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Some(code) = ssmfs::csi::run_subcommand(&args) {
        return code;
    }
    if let Some(code) = ssmfs::client::run_subcommand(&args) {
        return code;
    }
    let settings =
        match CliArgs::parse_with_mount_options(args.clone()).and_then(CliArgs::into_settings) {
            Ok(settings) => settings,
            Err(CliError::Informational(text)) => {
                print!("{text}");
                return ExitCode::SUCCESS;
            }
            Err(error) => {
                eprintln!("ssmfs: {error}");
                return ExitCode::from(EXIT_USAGE);
            }
        };
    ssmfs::store::ssm::use_pod_identity(&settings.aws);
    let mut readiness = match prepare(&settings) {
        Ok(Some(readiness)) => readiness,
        // The parent of a background daemon: the daemon reported success.
        Ok(None) => return ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ssmfs: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    // When the log is stderr, the one-line message below already says it.
    let log_is_stderr = settings.foreground && settings.log_file.is_none();
    // A serving daemon logs where its supervisor does (it has no terminal
    // of its own once the supervisor runs in the background).
    let background = readiness.is_background() || (settings.serve_fd && !settings.foreground);
    let result = init_logging(&settings, background).and_then(|()| {
        for warning in &settings.warnings {
            tracing::warn!("{warning}");
        }
        if settings.supervise {
            return supervise(settings, &mut readiness);
        }
        run(settings, &mut readiness)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let failure = start_failure(&error);
            if !log_is_stderr {
                tracing::error!("{failure}");
            }
            if !readiness.failed(&failure) {
                eprintln!("ssmfs: {failure}");
            }
            ExitCode::FAILURE
        }
    }
}

/// What a failed start says on its verdict pipe: the whole error on one
/// line, and whether AWS refused the identity (told by type anywhere in the
/// chain: the store's error, the core's, a daemon's verdict a holder passed on).
fn start_failure(error: &anyhow::Error) -> daemon::StartFailure {
    use ssmfs::fs::FsError;
    use ssmfs::store::StoreError;
    let identity_refused = error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<StoreError>(),
            Some(StoreError::IdentityRefused(_))
        ) || matches!(
            cause.downcast_ref::<FsError>(),
            Some(FsError::Store(StoreError::IdentityRefused(_)))
        ) || cause
            .downcast_ref::<daemon::StartFailure>()
            .is_some_and(|failure| failure.identity_refused)
            || matches!(
                cause.downcast_ref::<ssmfs::supervisor::SupervisorError>(),
                Some(ssmfs::supervisor::SupervisorError::GaveUp(failure)) if failure.identity_refused
            )
    });
    daemon::StartFailure {
        why: format!("{error:#}"),
        identity_refused,
    }
}

/// Checks made before forking, so the user sees the reason on their terminal,
/// then the fork. `None`: this is the parent of a daemon that mounted.
fn prepare(settings: &Settings) -> anyhow::Result<Option<Readiness>> {
    if settings.adopt_fds {
        // A holder of the CSI plugin's mount: the serving side that started
        // it hears its verdict; nothing to fork, the mount exists.
        daemon::harden_process(false)?;
        // Its daemons must not inherit the holder's verdict pipe.
        // SAFETY: F_SETFD on an fd number.
        unsafe {
            libc::fcntl(
                ssmfs::handoff::HOLDER_VERDICT_FD,
                libc::F_SETFD,
                libc::FD_CLOEXEC,
            )
        };
        return Ok(Some(Readiness::reporting_to(
            ssmfs::handoff::HOLDER_VERDICT_FD,
        )));
    }
    if settings.serve_fd {
        // The supervisor holds the mount and stays in charge of readiness;
        // it hears this daemon's verdict, and says why it could not start.
        daemon::harden_process(settings.mlock)?;
        return Ok(Some(Readiness::reporting_to(ssmfs::handoff::VERDICT_FD)));
    }
    daemon::prepare_mountpoint(&settings.mountpoint)?;
    daemon::harden_process(settings.mlock)?;
    if settings.foreground {
        return Ok(Some(Readiness::foreground()));
    }
    match daemon::daemonize()? {
        Forked::Daemon(readiness) => Ok(Some(readiness)),
        Forked::Parent(Ok(())) => Ok(None),
        Forked::Parent(Err(failure)) => Err(failure.into()),
    }
}

/// `--supervise`: the supervisor holds the mount; the serving daemon is this
/// binary again, with the same options and `--serve-fd`.
fn supervise(settings: Settings, readiness: &mut Readiness) -> anyhow::Result<()> {
    // An adopted mount must not be looked at: it waits for this very
    // process to relay. The plugin gave its absolute path.
    let (mountpoint, adopted) = if settings.adopt_fds {
        (
            settings.mountpoint.clone(),
            Some(ssmfs::supervisor::Adopted::from_handoff_fds()?),
        )
    } else {
        let mountpoint = std::fs::canonicalize(&settings.mountpoint)
            .with_context(|| format!("mount point {}", settings.mountpoint.display()))?;
        (mountpoint, None)
    };
    let daemon_args = ssmfs::cli::daemon_args(ssmfs::cli::process_args()?)?;
    let supervisor = ssmfs::supervisor::SupervisorSettings {
        mount: MountSettings {
            mountpoint,
            fsname: settings.fsname.clone(),
            allow_other: settings.allow_other,
            allow_root: settings.allow_root,
            threads: settings.threads,
            serve_fd: None,
        },
        daemon_args,
        pid_file: settings.pid_file.clone(),
        restart_deadline: settings.restart_deadline,
        adopted,
    };
    ssmfs::supervisor::run(supervisor, readiness)?;
    Ok(())
}

/// The primary region's store, and the failover region's if there is one:
/// each paced, retried and counted on its own.
fn regions(
    sdk_config: &aws_config::SdkConfig,
    settings: &Settings,
    metrics: &Arc<ssmfs::metrics::Metrics>,
) -> anyhow::Result<Failover<Resilient<SsmStore>>> {
    let request = &settings.fs.request;
    let primary_region = sdk_config
        .region()
        .map_or_else(|| "unknown".to_string(), |r| r.to_string());
    let primary = Resilient::new(
        SsmStore::new(sdk_config, &settings.aws),
        request.clone(),
        metrics.clone(),
    )
    .in_region("primary", &primary_region);
    let Some(failover) = &settings.aws.failover else {
        return Ok(Failover::single(primary));
    };
    if failover.region == primary_region {
        anyhow::bail!(
            "--failover-region {} is the primary region; name another one",
            failover.region
        );
    }
    tracing::info!(
        primary = %primary_region,
        failover = %failover.region,
        retry_after = ?failover.retry_after,
        "calls go to the failover region while the primary fails"
    );
    let secondary = Resilient::new(
        SsmStore::failover(sdk_config, &settings.aws, failover),
        request.clone(),
        metrics.clone(),
    )
    .in_region("failover", &failover.region);
    Ok(Failover::new(primary, secondary, failover.retry_after))
}

fn run(settings: Settings, readiness: &mut Readiness) -> anyhow::Result<()> {
    let supervised = settings.serve_fd;
    // A supervised daemon must not look at the mount point: the mount is
    // there and waits for this very process to answer. Its supervisor
    // resolved it.
    let mountpoint = if supervised {
        std::env::var_os(ssmfs::handoff::MOUNTPOINT_ENV)
            .map_or_else(|| settings.mountpoint.clone(), Into::into)
    } else {
        std::fs::canonicalize(&settings.mountpoint)
            .with_context(|| format!("mount point {}", settings.mountpoint.display()))?
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ssmfs-worker")
        .build()
        .context("cannot start the async runtime")?;
    let signals = {
        let _in_runtime = runtime.enter();
        daemon::StopSignals::install()?
    };
    let metrics = daemon::new_metrics();
    let sdk_config = runtime.block_on(load_aws_config(&settings.aws))?;
    let store = regions(&sdk_config, &settings, &metrics)?;
    let prefix = settings.fs.prefix.clone();
    let served_prefixes = settings.fs.served_prefixes();
    let (fs, invalidations) = if settings.serve_fd {
        use std::os::fd::FromRawFd;
        // SAFETY: the supervisor passed the journal on this fd for us to own.
        let journal = unsafe { std::fs::File::from_raw_fd(ssmfs::handoff::JOURNAL_FD) };
        let sole_writer = !ssmfs::handoff::started_by_upgrade();
        let inodes = Fs::<Failover<Resilient<SsmStore>>>::inode_table(&settings.fs)
            .with_journal(journal, sole_writer)
            .context("the supervisor's inode journal")?;
        Fs::with_inodes(store, settings.fs, metrics, inodes)
    } else {
        Fs::new(store, settings.fs, metrics)
    };
    runtime.block_on(fs.check_access())?;
    let events = match &settings.events {
        Some(source) => {
            let mount_key = format!("{} {}", settings.fsname, mountpoint.display());
            Some(runtime.block_on(events::sqs::connect(
                &sdk_config,
                source,
                &mount_key,
                &served_prefixes,
            ))?)
        }
        None => None,
    };
    let own_queue = events.as_ref().and_then(|(_, own)| own.as_ref());
    let remove_own_queue = || {
        if let Some(own) = own_queue {
            runtime.block_on(own.remove());
        }
    };
    if let Some(addr) = settings.metrics_addr {
        match runtime.block_on(daemon::serve_metrics(fs.clone(), addr)) {
            Ok(()) => {}
            // Under a holder (a restart, the CSI driver's mounts), a port
            // another process took must not keep the mount from serving.
            Err(error) if settings.serve_fd => {
                tracing::warn!(%error, "serving without metrics");
            }
            Err(error) => return Err(error.into()),
        }
    }
    let mount_settings = MountSettings {
        mountpoint,
        fsname: settings.fsname.clone(),
        allow_other: settings.allow_other,
        allow_root: settings.allow_root,
        threads: settings.threads,
        serve_fd: settings.serve_fd.then_some(ssmfs::handoff::SERVE_FD),
    };
    let mounted = match daemon::mount(
        Arc::clone(&fs),
        invalidations,
        runtime.handle().clone(),
        &mount_settings,
    ) {
        Ok(mounted) => mounted,
        Err(error) => {
            remove_own_queue();
            return Err(error.into());
        }
    };
    tracing::info!(prefix = %prefix, mountpoint = %mount_settings.mountpoint.display(), "mounted");
    let listener = events.as_ref().map(|(queue, _)| {
        tracing::info!(
            queue = queue.url(),
            "applying parameter change events from the queue"
        );
        runtime.spawn(events::listen(fs.clone(), queue.clone()))
    });
    readiness.ready();
    readiness.detach_stdio();
    let reason = runtime.block_on(daemon::serve_until_stopped(fs, &mounted, signals));
    if supervised {
        // Supervised: leave without a word to the kernel. Ending the runtime
        // would answer the requests still in flight with EIO (fuser's reply
        // on drop), where the supervisor has already resent them to our
        // successor. The own event queue is not ours to remove here.
        tracing::info!(reason, "stopping; the supervisor keeps the mount");
        std::process::exit(0);
    }
    daemon::sd_notify("STOPPING=1");
    tracing::info!(reason, "unmounting");
    mounted.unmount();
    if let Some(listener) = listener {
        listener.abort();
    }
    remove_own_queue();
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    Ok(())
}

/// Logs go to stderr (foreground), --log-file, or syslog (background), filtered
/// by SSMFS_LOG (default `info`). Log lines name parameters, never values; the
/// AWS SDK and HTTP crates are capped at INFO whatever SSMFS_LOG says, because
/// their DEBUG/TRACE output includes raw response bodies, i.e. secret values.
fn init_logging(settings: &Settings, background: bool) -> anyhow::Result<()> {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    use tracing_subscriber::prelude::*;
    let filter = EnvFilter::try_from_env("SSMFS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let only_ssmfs_below_info = Targets::new()
        .with_default(LevelFilter::INFO)
        .with_target("ssmfs", LevelFilter::TRACE);
    let (writer, ansi) = if let Some(path) = &settings.log_file {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("--log-file {}", path.display()))?;
        (BoxMakeWriter::new(std::sync::Mutex::new(file)), false)
    } else if background {
        (BoxMakeWriter::new(ssmfs_syslog::Syslog::open), false)
    } else {
        (
            BoxMakeWriter::new(std::io::stderr),
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
        )
    };
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi);
    tracing_subscriber::registry()
        .with(layer.with_filter(filter).with_filter(only_ssmfs_below_info))
        .init();
    Ok(())
}

/// A minimal syslog writer: each formatted line becomes one syslog record
/// (journald picks these up on systemd hosts).
mod ssmfs_syslog {
    use std::ffi::CString;
    use std::io;

    pub struct Syslog(Vec<u8>);

    impl Syslog {
        pub fn open() -> Self {
            static IDENT: &[u8] = b"ssmfs\0";
            static ONCE: std::sync::Once = std::sync::Once::new();
            // SAFETY: IDENT is a static NUL-terminated string that outlives every call.
            ONCE.call_once(|| unsafe {
                libc::openlog(IDENT.as_ptr().cast(), libc::LOG_PID, libc::LOG_DAEMON)
            });
            Syslog(Vec::new())
        }
    }

    impl io::Write for Syslog {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Drop for Syslog {
        fn drop(&mut self) {
            let text = String::from_utf8_lossy(&self.0)
                .trim_end()
                .replace('\0', " ");
            if let Ok(line) = CString::new(text) {
                // SAFETY: "%s" with one valid C string argument.
                unsafe { libc::syslog(libc::LOG_INFO, c"%s".as_ptr(), line.as_ptr()) };
            }
        }
    }
}
