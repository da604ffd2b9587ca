//! Shared harness for the end-to-end tests: a moto SSM server on loopback, a
//! seeding client, and the real `ssmfs` binary mounted in a temporary directory.
//! Nothing here can reach real AWS: dummy credentials, explicit loopback endpoint.

#![allow(dead_code)]

pub mod csi;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_ssm::types::ParameterType;

/// Fails under CI, skips (with a message) elsewhere, when a real component is missing.
pub fn require(component_ok: bool, what: &str) -> bool {
    if component_ok {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{what} is required under CI=true; run scripts/setup.sh (as root)");
    }
    eprintln!("SKIPPED: {what} is not available; run scripts/setup.sh as root");
    false
}

pub fn have_fuse_and_moto() -> bool {
    let fuse = Path::new("/dev/fuse").exists() && unsafe { libc::geteuid() } == 0;
    require(fuse, "/dev/fuse with root")
        && require(moto_bin().exists(), "moto (.venv/bin/moto_server)")
}

/// For tests whose point needs a real mount and real SSM servers: a missing
/// component fails the test, naming it, rather than skipping it.
pub fn must_have_fuse_and_moto() {
    assert!(
        Path::new("/dev/fuse").exists() && unsafe { libc::geteuid() } == 0,
        "this test needs /dev/fuse and root; run scripts/setup.sh as root"
    );
    assert!(
        moto_bin().exists(),
        "this test needs moto ({}); run scripts/setup.sh",
        moto_bin().display()
    );
}

fn moto_bin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/moto_server")
}

pub struct Moto {
    child: Child,
    pub endpoint: String,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// A loopback port that was free a moment ago (for --metrics-addr, or an
/// address nobody answers), never the same one twice in this test process:
/// the kernel may hand a just-closed port to a parallel test's next ask.
pub fn free_loopback_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap();
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
}

impl Moto {
    /// A server on a port it chose itself (`-p 0`), read back from its log:
    /// a port picked here and handed over could be taken by a parallel test's
    /// server first, and then this test would talk to, and count, the wrong one.
    pub fn start() -> Moto {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("moto.log");
        let (child, port) = Self::spawn(0, &log);
        Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
            log,
            _dir: dir,
        }
    }

    /// Starts moto on `port` (0: any) and waits for its "Running on" line;
    /// a server that exits first (its port taken) fails the test with its log.
    fn spawn(port: u16, log: &Path) -> (Child, u16) {
        const READY: &str = "Running on http://127.0.0.1:";
        let started_before = std::fs::read_to_string(log)
            .unwrap_or_default()
            .matches(READY)
            .count();
        let mut child = Command::new(moto_bin())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .unwrap(),
            )
            .spawn()
            .expect("starting moto_server");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let bound = text
                .split(READY)
                .nth(started_before + 1)
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|digits| digits.parse::<u16>().ok());
            if let Some(bound) = bound {
                if std::net::TcpStream::connect(("127.0.0.1", bound)).is_ok() {
                    return (child, bound);
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("moto_server exited ({status}) before it listened:\n{text}");
            }
            assert!(Instant::now() < deadline, "moto did not start:\n{text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A server holding one SecureString.
    pub fn with_secret(name: &str, value: &str) -> Moto {
        let moto = Moto::start();
        let rt = runtime();
        put(
            &rt,
            &client(&rt, &moto.endpoint),
            name,
            value,
            ParameterType::SecureString,
        );
        moto
    }

    /// A fresh server (empty store) on the same endpoint, after `stop`.
    pub fn restart(&mut self) {
        self.stop();
        self.child = Self::spawn(self.port, &self.log).0;
    }

    /// SSM API requests the server has answered (one access-log line each).
    pub fn requests(&self) -> usize {
        std::thread::sleep(Duration::from_millis(100)); // let the log line land
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"POST /"))
            .count()
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn aws_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_SESSION_TOKEN", "testing"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_CONFIG_FILE", "/dev/null"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
    ]
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub fn client(rt: &tokio::runtime::Runtime, endpoint: &str) -> aws_sdk_ssm::Client {
    client_in(rt, endpoint, "us-east-1")
}

/// A client signing for `region` (moto keeps one store per region).
pub fn client_in(
    rt: &tokio::runtime::Runtime,
    endpoint: &str,
    region: &str,
) -> aws_sdk_ssm::Client {
    let creds = aws_sdk_ssm::config::Credentials::new("testing", "testing", None, None, "test");
    let config = aws_sdk_ssm::Config::builder()
        .behavior_version(aws_sdk_ssm::config::BehaviorVersion::latest())
        .region(aws_sdk_ssm::config::Region::new(region.to_string()))
        .credentials_provider(creds)
        .endpoint_url(endpoint)
        .build();
    let _guard = rt.enter();
    aws_sdk_ssm::Client::from_conf(config)
}

/// PutParameter (overwriting), panicking with the SDK's whole error.
async fn put_async(client: &aws_sdk_ssm::Client, name: &str, value: &str, kind: ParameterType) {
    client
        .put_parameter()
        .name(name)
        .value(value)
        .r#type(kind)
        .overwrite(true)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "seeding {name}: {}",
                aws_sdk_ssm::error::DisplayErrorContext(&e)
            )
        });
}

pub fn put(
    rt: &tokio::runtime::Runtime,
    client: &aws_sdk_ssm::Client,
    name: &str,
    value: &str,
    kind: ParameterType,
) {
    rt.block_on(put_async(client, name, value, kind));
}

/// Seeds many parameters of one type, 16 requests at a time (so in no
/// particular order: tests that rely on moto's insertion order use `put`).
pub fn put_many(
    rt: &tokio::runtime::Runtime,
    client: &aws_sdk_ssm::Client,
    items: Vec<(String, String)>,
    kind: ParameterType,
) {
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for (name, value) in items {
            let client = client.clone();
            let kind = kind.clone();
            let permit = semaphore.clone().acquire_owned().await.unwrap();
            tasks.spawn(async move {
                let _permit = permit;
                put_async(&client, &name, &value, kind).await;
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
    });
}

pub struct Mount {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
}

impl Mount {
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    /// Starts `ssmfs --foreground <args> <prefix> <mnt>` and waits for the mount.
    pub fn start(endpoint: &str, prefix: &str, extra: &[&str]) -> Mount {
        let mut args: Vec<&str> = extra.to_vec();
        args.push(prefix);
        Mount::start_with(endpoint, &args, &[])
    }

    /// Starts `ssmfs --foreground --endpoint-url E <args> <mnt>` with extra environment.
    pub fn start_with(endpoint: &str, args: &[&str], env: &[(&str, &str)]) -> Mount {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let log = dir.path().join("ssmfs.log");
        let child = Command::new(env!("CARGO_BIN_EXE_ssmfs"))
            .arg("--foreground")
            .args(["--endpoint-url", endpoint])
            .args(args)
            .arg(&mnt)
            .envs(aws_env())
            .envs(env.iter().copied())
            .env("SSMFS_LOG", "trace")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting ssmfs");
        let mount = Mount {
            child: Some(child),
            dir,
            log,
        };
        mount.wait_mounted(true);
        mount
    }

    pub fn wait_mounted(&self, wanted: bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while ssmfs::daemon::is_mount_point(&self.path()) != wanted {
            assert!(
                Instant::now() < deadline,
                "mount state never became {wanted}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal and returns the exit status.
    pub fn signal(&mut self, signal: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "ssmfs did not exit after signal {signal}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.signal(libc::SIGTERM);
        }
        if ssmfs::daemon::is_mount_point(&self.path()) {
            let _ = ssmfs::daemon::lazy_unmount(&self.path());
        }
    }
}

/// Waits up to `limit` for `check` and returns how long it took.
pub fn within(limit: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

/// Runs a program and returns (status code, stdout, stderr).
pub fn run(program: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// tests/support/throttle_proxy.py in front of `upstream`, killed on drop.
pub struct ThrottleProxy {
    child: std::process::Child,
    pub url: String,
}

impl ThrottleProxy {
    /// Throttles past `tps` calls a second.
    pub fn start(upstream: &str, tps: u32) -> ThrottleProxy {
        Self::with_args(upstream, &[&tps.to_string()])
    }

    /// Refuses, as real SSM does, every decrypting call that would return one
    /// of `names` (parameters under a KMS key the caller may not use).
    pub fn undecryptable(upstream: &str, names: &[&str]) -> ThrottleProxy {
        let mut args = vec!["100000", "--undecryptable"];
        args.extend_from_slice(names);
        Self::with_args(upstream, &args)
    }

    fn with_args(upstream: &str, args: &[&str]) -> ThrottleProxy {
        use std::io::BufRead;
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut child = std::process::Command::new(root.join(".venv/bin/python"))
            .arg(root.join("tests/support/throttle_proxy.py"))
            .arg(upstream)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("starting the SSM proxy");
        let mut port = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut port)
            .unwrap();
        let url = format!("http://127.0.0.1:{}", port.trim());
        ThrottleProxy { child, url }
    }

    /// A count the proxy keeps: "admitted", "throttled" or "refused".
    pub fn count(&self, what: &str) -> u64 {
        let (code, body, _) = run("curl", &["-sf", &format!("{}/counts", self.url)]);
        assert_eq!(code, 0);
        let counts: serde_json::Value = serde_json::from_str(&body).unwrap();
        counts[what].as_u64().unwrap()
    }

    /// (calls let through, calls throttled) so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.count("admitted"), self.count("throttled"))
    }
}

impl Drop for ThrottleProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process a test started in the background, its stderr in `log`: stopped
/// with SIGTERM (and SIGKILL after 5 s) when dropped, so a failing test
/// leaves nothing running.
pub struct Background {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Background {
    /// Starts `command` with stdin and stdout closed and stderr in `log`.
    pub fn start(mut command: Command, log: PathBuf) -> Background {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {:?}: {e}", command.get_program()));
        Background {
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    pub fn signal(&self, number: i32) {
        // SAFETY: kill with integer arguments.
        unsafe { libc::kill(self.pid(), number) };
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| child.try_wait().unwrap().is_none())
    }

    /// Waits up to `limit` for the process to exit on its own.
    pub fn wait(mut self, limit: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{} did not exit within {limit:?}", self.log.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill with integer arguments.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The lines of a file a process appends to (none while it does not exist).
pub fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// A moto server seeded with SecureStrings, with a runtime and a client to
/// put more (the start of most tests).
pub struct Ssm {
    pub moto: Moto,
    pub rt: tokio::runtime::Runtime,
    pub client: aws_sdk_ssm::Client,
}

impl Ssm {
    pub fn start(parameters: &[(&str, &str)]) -> Ssm {
        let moto = Moto::start();
        let rt = runtime();
        let client = client(&rt, &moto.endpoint);
        let ssm = Ssm { moto, rt, client };
        for (name, value) in parameters {
            ssm.put(name, value);
        }
        ssm
    }

    /// Puts a new version of `name` (a SecureString).
    pub fn put(&self, name: &str, value: &str) {
        put(
            &self.rt,
            &self.client,
            name,
            value,
            ParameterType::SecureString,
        );
    }
}

/// What the readers of a mount (tests/support/readers.py) saw, in sum.
pub struct ReaderTotals {
    pub reads: u64,
    pub failures: u64,
    pub wrong: u64,
    pub longest_ms: f64,
    /// Each reader's errors, as it reported them (JSON), one after another.
    pub errors: String,
}

/// Eight readers of `mount` for `seconds`, each reading the `NAME=VALUE`
/// pairs over and over and counting failures and wrong values.
pub fn start_readers<S: AsRef<std::ffi::OsStr>>(
    mount: &Path,
    seconds: u64,
    pairs: &[S],
) -> Vec<Child> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/readers.py");
    (0..8)
        .map(|_| {
            Command::new(&python)
                .arg(&script)
                .arg(mount)
                .arg(seconds.to_string())
                .args(pairs)
                .stdout(Stdio::piped())
                .spawn()
                .expect("starting a reader")
        })
        .collect()
}

/// Waits for every reader and sums what they saw. Each stops at its
/// deadline after at most one more read: one still running 30 s later
/// hangs on the mount (in D state if the kernel waits for an answer that
/// never comes), and fails the test with its state.
pub fn finish_readers(mut readers: Vec<Child>) -> ReaderTotals {
    let limit = Instant::now() + Duration::from_secs(30);
    for reader in &mut readers {
        while reader.try_wait().unwrap().is_none() {
            if Instant::now() > limit {
                let stat = std::fs::read_to_string(format!("/proc/{}/stat", reader.id()))
                    .unwrap_or_default();
                let state = stat.rsplit_once(") ").map_or("?", |(_, rest)| &rest[..1]);
                let _ = reader.kill();
                panic!("reader {} still running, state {state}", reader.id());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let mut totals = ReaderTotals {
        reads: 0,
        failures: 0,
        wrong: 0,
        longest_ms: 0.0,
        errors: String::new(),
    };
    for reader in readers {
        let out = reader.wait_with_output().unwrap();
        let line = String::from_utf8_lossy(&out.stdout);
        let report: serde_json::Value = serde_json::from_str(line.trim())
            .unwrap_or_else(|e| panic!("reader output {line:?}: {e}"));
        totals.reads += report["reads"].as_u64().unwrap();
        totals.failures += report["failures"].as_u64().unwrap();
        totals.wrong += report["wrong"].as_u64().unwrap();
        totals.longest_ms = totals
            .longest_ms
            .max(report["longest_ms"].as_f64().unwrap_or(0.0));
        totals.errors.push_str(&report["errors"].to_string());
    }
    // For docs/BENCHMARKS.md (seen with --nocapture).
    println!(
        "readers: {} reads, the longest took {} ms",
        totals.reads, totals.longest_ms
    );
    totals
}
