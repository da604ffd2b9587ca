//! `ssmfs csi`: a CSI node plugin that mounts Parameter Store into pods.
//!
//! Model: two processes of this one binary. The plugin (root) answers the
//! CSI Identity and Node services on a unix socket, mounts one FUSE
//! connection per identity and options under its state directory, and
//! bind-mounts it read-only into each pod's target path (`node`). The
//! serving side (`ssmfs csi-serve`, unprivileged: its own user, no
//! capabilities, no /dev/fuse, / read-only) holds each connection and runs
//! the daemons that talk to AWS (`serve`, `crate::supervisor`). Both keep
//! copies of every connection's fds over a control socket (`control`), so
//! either side may die, restart or be upgraded while pods read: one of them
//! always holds the connection, and requests a dead holder had taken are
//! resent by the kernel. `ssmfs csi` alone starts its serving side (one
//! host); `--external-serve` leaves that to a second container.

pub mod authority;
pub use crate::fd_link as control;
pub mod error;
pub mod node;
pub mod policy;
pub mod serve;
pub mod streams;
pub mod sys;
pub mod volume;

/// The CSI specification's messages and services (`csi.v1`), generated at
/// build time from the vendored `proto/csi.proto` (spec v1.9.0; see
/// proto/README.md and build.rs).
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("csi.v1");
}

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

/// The driver's name, as the CSIDriver object and the pod specs spell it.
pub const DRIVER_NAME: &str = "ssmfs.csi.aws-ssm.dev";

#[derive(Debug, Parser)]
#[command(
    name = "ssmfs csi",
    version,
    about = "CSI node plugin: mounts Parameter Store paths into pods, read-only, one warm cache per node and identity"
)]
pub struct PluginArgs {
    /// Where kubelet reaches the plugin (unix:///path or a path).
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    pub endpoint: String,
    /// This node's name, as kubelet knows it.
    #[arg(long, env = "NODE_NAME")]
    pub node_id: String,
    /// The driver name pods ask for.
    #[arg(long, default_value = DRIVER_NAME)]
    pub driver_name: String,
    /// Shared mounts and their records (no token, no value is ever written).
    #[arg(long, default_value = "/var/lib/ssmfs-csi")]
    pub state_dir: PathBuf,
    /// The control socket between the plugin and its serving side (in
    /// Kubernetes: a host directory both DaemonSets mount). Root's; the
    /// serving user owns only the socket.
    #[arg(long, default_value = "/run/ssmfs-csi")]
    pub run_dir: PathBuf,
    /// Target paths must lie inside this directory (kubelet's pods).
    #[arg(long, default_value = "/var/lib/kubelet/pods")]
    pub pods_dir: PathBuf,
    /// UID:GID of the serving side (never root). A user of its own: the
    /// plugin hands its FUSE connections only to a peer of this uid, so it
    /// must not be one that other processes on the node run as (65534,
    /// nobody, is).
    #[arg(long, default_value = sys::DEFAULT_SERVE_USER)]
    pub serve_user: sys::ServeUser,
    /// Do not start the serving side: a second container runs `ssmfs csi-serve`.
    #[arg(long)]
    pub external_serve: bool,
    /// How long a shared mount outlives its last pod. Ten minutes keeps a
    /// node warm between KubernetesExecutor task pods that come minutes
    /// apart, at the cost of one idle serving process per mount.
    #[arg(long, default_value = "10m", value_parser = crate::config::parse_duration)]
    pub linger: Duration,
    /// Attribute defaults for every volume (`defaults.json`) and named
    /// classes a volume picks with `class` (`classes.json`): JSON objects of
    /// strings, as a ConfigMap mounts them.
    #[arg(long)]
    pub attributes_dir: Option<PathBuf>,
    /// Serve Prometheus metrics (shared mounts, pods attached) on this address.
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Namespaces whose volumes may ask for the node's own credentials
    /// (useNodeIdentity: "true"), comma-separated. None by default: a tenant
    /// must not read with the node's role.
    #[arg(long, value_delimiter = ',')]
    pub node_identity_namespaces: Vec<String>,
    /// Most shared mounts (each a serving daemon) one namespace may hold on
    /// this node: a task pod needs one or two; this leaves room for a few
    /// option sets while one tenant cannot fill the node.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_mounts_per_namespace: u32,
    /// Most shared mounts on this node: each daemon takes a few MiB in the
    /// serving container, so 64 stays well inside its memory limit.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_mounts: u32,
    /// Most shared mounts of one namespace that differ only in tuning
    /// attributes (TTLs, rate, owner, modes): two allow a rollout from one
    /// setting to the next; more would only multiply daemons for one source.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_variants_per_source: u32,
    /// Where EKS Pod Identity's agent answers (volumes with usePodIdentity).
    #[arg(long, default_value = crate::store::ssm::POD_IDENTITY_AGENT_URL)]
    pub pod_identity_agent_url: String,
}

#[derive(Debug, Parser)]
#[command(
    name = "ssmfs csi-serve",
    version,
    about = "The CSI driver's unprivileged serving side: holds the plugin's FUSE connections and serves them"
)]
pub struct ServeArgs {
    /// The directory holding the plugin's control socket.
    #[arg(long, default_value = "/run/ssmfs-csi")]
    pub run_dir: PathBuf,
    /// A file that exists while this serving side serves every mount (the
    /// plugin says so): what the pod's readiness probe checks.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Only check the ready file: exit 0 if it exists (a readiness probe
    /// in an image without a shell).
    #[arg(long, requires = "ready_file")]
    pub check_ready: bool,
    /// UID:GID this side becomes when started as root (its own container:
    /// it reads the plugin's link key first). The plugin's --serve-user.
    #[arg(long, default_value = sys::DEFAULT_SERVE_USER)]
    pub serve_user: sys::ServeUser,
}

/// `Some(exit code)` when `args` name a CSI subcommand.
pub fn run_subcommand(args: &[OsString]) -> Option<ExitCode> {
    // "ssmfs csi" as the program's name, so usage lines read as typed.
    let rest = || {
        let name = format!("ssmfs {}", args[1].to_string_lossy());
        std::iter::once(OsString::from(name)).chain(args.iter().skip(2).cloned())
    };
    let outcome = match args.get(1).and_then(|arg| arg.to_str()) {
        Some("csi") => PluginArgs::try_parse_from(rest()).map(run_plugin),
        Some("csi-serve") => ServeArgs::try_parse_from(rest()).map(|a| match a.ready_file {
            Some(file) if a.check_ready => serve::check_ready(&file),
            ready_file => {
                init_logging();
                serve::link_key(&a.run_dir, a.serve_user).and_then(|key| {
                    serve::run(node::Driver::control_socket(&a.run_dir), ready_file, key)
                })
            }
        }),
        _ => return None,
    };
    Some(match outcome {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(error)) => {
            eprintln!("ssmfs: {error:#}");
            ExitCode::FAILURE
        }
        Err(error) if !error.use_stderr() => {
            print!("{error}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            let _ = error.print();
            ExitCode::from(2)
        }
    })
}

/// Logs to stderr (a container's log), filtered by SSMFS_LOG; the AWS and
/// HTTP crates are capped at INFO, as the daemon's are.
fn init_logging() {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("SSMFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let only_ssmfs_below_info = Targets::new()
        .with_default(LevelFilter::INFO)
        .with_target("ssmfs", LevelFilter::TRACE);
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(filter)
                .with_filter(only_ssmfs_below_info),
        )
        .try_init();
}

fn socket_path(endpoint: &str) -> PathBuf {
    PathBuf::from(endpoint.strip_prefix("unix://").unwrap_or(endpoint))
}

fn run_plugin(args: PluginArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    init_logging();
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("ssmfs csi needs root: it mounts FUSE and bind-mounts into pods");
    }
    if args.endpoint.contains("://") && !args.endpoint.starts_with("unix://") {
        anyhow::bail!(
            "--endpoint {}: only unix:// endpoints are served",
            args.endpoint
        );
    }
    let endpoint = socket_path(&args.endpoint);
    let (defaults, classes) = match &args.attributes_dir {
        Some(dir) => policy::load_attributes(dir)
            .map_err(|why| anyhow::anyhow!("--attributes-dir: {why}"))?,
        None => Default::default(),
    };
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("--state-dir {}", args.state_dir.display()))?;
    sys::make_private(&args.state_dir)
        .with_context(|| format!("--state-dir {}", args.state_dir.display()))?;
    let key_salt = sys::node_secret(&args.state_dir.join("key.salt"))
        .with_context(|| format!("--state-dir {}: key.salt", args.state_dir.display()))?;
    // The whole policy, in one place: nothing is filled in later.
    let policy = policy::Policy {
        pods_dir: args.pods_dir,
        defaults,
        classes,
        node_identity_namespaces: args
            .node_identity_namespaces
            .iter()
            .map(|ns| ns.trim().to_string())
            .filter(|ns| !ns.is_empty())
            .collect(),
        key_salt,
        caps: policy::Caps {
            per_namespace: args.max_mounts_per_namespace as usize,
            node: args.max_mounts as usize,
            variants: args.max_variants_per_source as usize,
        },
    };
    let driver = node::Driver::new(node::DriverSettings {
        driver_name: args.driver_name,
        node_id: args.node_id,
        state_dir: args.state_dir.clone(),
        run_dir: args.run_dir,
        serve_user: args.serve_user,
        external_serve: args.external_serve,
        linger: args.linger,
        policy,
        pod_identity_agent_url: args.pod_identity_agent_url,
    });
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("--state-dir {}", args.state_dir.display()))?;
    driver.recover().context("reading the state directory")?;
    driver
        .start_serving_link()
        .context("starting the serving side's control socket")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .thread_name("ssmfs-csi")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        if let Some(parent) = endpoint.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("--endpoint directory {}", parent.display()))?;
        }
        let _ = std::fs::remove_file(&endpoint);
        let listener = tokio::net::UnixListener::bind(&endpoint)
            .with_context(|| format!("--endpoint {}", endpoint.display()))?;
        {
            let driver = driver.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    let driver = driver.clone();
                    let _ = tokio::task::spawn_blocking(move || driver.remove_lingering()).await;
                }
            });
        }
        if let Some(addr) = args.metrics_addr {
            serve_metrics(driver.clone(), addr).await?;
        }
        tracing::info!(endpoint = %endpoint.display(), "CSI plugin serving");
        let services = node::Services(driver.clone());
        let stop = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("signal handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            // Mounts stay: pods keep reading while a new plugin starts.
            tracing::info!("stopping; the shared mounts and the serving side stay");
        };
        tonic::transport::Server::builder()
            .add_service(v1::identity_server::IdentityServer::new(services.clone()))
            .add_service(v1::node_server::NodeServer::new(services))
            .serve_with_incoming_shutdown(
                tokio_stream::StreamExt::map(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    |accepted| accepted.map(authority::AnyAuthority::new),
                ),
                stop,
            )
            .await
            .context("the CSI gRPC server")?;
        Ok::<_, anyhow::Error>(())
    })?;
    // The connections' fds go with this process; the serving side holds them.
    std::process::exit(0);
}

async fn serve_metrics(
    driver: Arc<node::Driver>,
    addr: std::net::SocketAddr,
) -> anyhow::Result<()> {
    use crate::daemon::metrics_http::{serve_text, MetricsAddr};
    use anyhow::Context;
    serve_text(MetricsAddr::Tcp(addr), move || driver.metrics())
        .await
        .with_context(|| format!("--metrics-addr {addr}"))
}
