//! The CSI node plugin end to end: the real binary (`ssmfs csi`, which
//! starts its own unprivileged serving side) driven over its unix socket by
//! a tonic client, as kubelet drives it; real FUSE mounts as root; moto for
//! SSM and STS (AssumeRoleWithWebIdentity with a made-up token), behind a
//! gate (tests/support/sts_gate.py) that refuses one role and counts.
//! Ported csi-sanity cases are named `sanity_*` (docs/KUBERNETES.md lists
//! them).

#![allow(clippy::result_large_err)] // tonic::Status is what a CSI client gets

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_ssm::types::ParameterType;
use ssmfs::csi::v1::identity_client::IdentityClient;
use ssmfs::csi::v1::node_client::NodeClient;
use ssmfs::csi::v1::volume_capability::{access_mode::Mode, AccessMode, AccessType, BlockVolume};
use ssmfs::csi::v1::*;
use support::csi::*;
use support::*;
use tonic::transport::Channel;

/// A node: its kubelet directories, the plugin, and a client.
struct Node {
    root: tempfile::TempDir,
    plugin: Option<Child>,
    rt: tokio::runtime::Runtime,
    endpoint: String,
    binary: PathBuf,
    extra: Vec<String>,
}

/// The volume at `target` serves the seeded `db` value.
#[track_caller]
fn assert_serves_db(target: &Path) {
    assert_eq!(
        std::fs::read_to_string(target.join("db")).unwrap(),
        "db-secret"
    );
}

impl Node {
    /// POD's volume of `attrs` published at uid-1's target, which it returns.
    fn publish_first_pod(&self, attrs: &[(&str, &str)]) -> PathBuf {
        let target = self.target("uid-1", "secrets");
        self.publish(request("vol-1", &target, attrs, &POD))
            .unwrap();
        target
    }

    /// A node of this build, or of the build SSMFS_CSI_TEST_BINARY names
    /// (to check that a test fails on an earlier release).
    fn start(gate: &Gate, extra: &[&str]) -> Node {
        let binary = std::env::var_os("SSMFS_CSI_TEST_BINARY")
            .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_ssmfs")), PathBuf::from);
        Self::start_binary(gate, extra, binary)
    }

    /// A node whose plugin runs `binary`.
    fn start_binary(gate: &Gate, extra: &[&str], binary: PathBuf) -> Node {
        let root = tempfile::tempdir().unwrap();
        // The serving side (uid 65534) walks down to its control socket.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir_all(root.path().join("pods")).unwrap();
        let mut node = Node {
            root,
            plugin: None,
            rt: runtime(),
            endpoint: gate.url.clone(),
            binary,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        node.start_plugin();
        node
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.path("plugin.log")).unwrap_or_default()
    }

    /// The binary with the node's AWS settings, logging into plugin.log.
    fn command(&self, subcommand: &str) -> Command {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("plugin.log"))
            .unwrap();
        let mut command = Command::new(&self.binary);
        command
            .arg(subcommand)
            .envs(aws_env())
            .env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("SSMFS_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log);
        command
    }

    fn start_plugin(&mut self) {
        let child = self
            .command("csi")
            .arg("--endpoint")
            .arg(format!("unix://{}", self.path("csi.sock").display()))
            .args(["--node-id", "node-1"])
            .arg("--state-dir")
            .arg(self.path("state"))
            .arg("--run-dir")
            .arg(self.path("run"))
            .arg("--pods-dir")
            .arg(self.path("pods"))
            .args(&self.extra)
            .spawn()
            .expect("starting ssmfs csi");
        self.plugin = Some(child);
        // With the serving side elsewhere, ready waits for it; answering is enough.
        let external = self.extra.iter().any(|arg| arg == "--external-serve");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(self.try_probe() == Some(true) || external && self.try_probe().is_some()) {
            assert!(
                Instant::now() < deadline,
                "the plugin never became ready:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A serving side of its own (as a second container runs it), as root.
    /// A serving side in a container of its own: started as root, it reads
    /// the link key and becomes the serving user (who may write the ready
    /// file's directory, as the chart's emptyDir lets it).
    fn start_serve(&self, ready_file: &Path) -> Child {
        let ready_dir = ready_file.parent().unwrap();
        std::fs::create_dir_all(ready_dir).unwrap();
        std::os::unix::fs::chown(ready_dir, Some(64721), Some(64721)).unwrap();
        self.command("csi-serve")
            .arg("--run-dir")
            .arg(self.path("run"))
            .arg("--ready-file")
            .arg(ready_file)
            .spawn()
            .expect("starting ssmfs csi-serve")
    }

    /// What the serving pod's readiness probe runs.
    fn serve_ready(&self, ready_file: &Path) -> bool {
        Command::new(&self.binary)
            .args(["csi-serve", "--check-ready", "--ready-file"])
            .arg(ready_file)
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    fn kill_plugin(&mut self, signal: i32) {
        if let Some(mut child) = self.plugin.take() {
            unsafe { libc::kill(child.id() as i32, signal) };
            let _ = child.wait();
        }
    }

    fn channel(&self) -> Option<Channel> {
        connect(&self.rt, self.path("csi.sock"))
    }

    fn try_probe(&self) -> Option<bool> {
        let mut client = IdentityClient::new(self.channel()?);
        let answer = self.rt.block_on(client.probe(ProbeRequest {})).ok()?;
        answer.into_inner().ready
    }

    fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel().expect("the plugin's socket"))
    }

    fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel().expect("the plugin's socket"))
    }

    fn publish(&self, request: NodePublishVolumeRequest) -> Result<(), tonic::Status> {
        let mut client = self.node();
        self.rt
            .block_on(client.node_publish_volume(request))
            .map(|_| ())
    }

    fn unpublish(&self, volume: &str, target: &Path) -> Result<(), tonic::Status> {
        let mut client = self.node();
        self.rt
            .block_on(client.node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: volume.into(),
                target_path: target.display().to_string(),
            }))
            .map(|_| ())
    }

    /// The target kubelet would give pod `uid`'s volume `name` (its parent made).
    fn target(&self, uid: &str, name: &str) -> PathBuf {
        let parent = self
            .path("pods")
            .join(uid)
            .join("volumes/kubernetes.io~csi")
            .join(name);
        std::fs::create_dir_all(&parent).unwrap();
        parent.join("mount")
    }

    /// ssmfs mounts under the state directory (shared mounts).
    fn shared_mounts(&self) -> usize {
        let state = self.path("state");
        ssmfs::csi::sys::mounts()
            .unwrap()
            .iter()
            .filter(|m| m.fstype == "fuse.ssmfs" && m.mount_point.starts_with(&state))
            .count()
    }

    /// Every ssmfs mount of this node (shared and targets).
    fn all_mounts(&self) -> usize {
        ssmfs::csi::sys::mounts()
            .unwrap()
            .iter()
            .filter(|m| m.fstype == "fuse.ssmfs" && m.mount_point.starts_with(self.root.path()))
            .count()
    }

    /// Pids of this node's processes whose command line contains `needle`:
    /// those started with its directory, and their descendants (holders and
    /// daemons get their options through an fd, not their command line).
    fn pids(&self, needle: &str) -> Vec<u32> {
        let root = self.root.path().display().to_string();
        let cmdline = |pid: u32| {
            let bytes = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&bytes).replace('\0', " ")
        };
        let all: Vec<u32> = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .collect();
        let mut ours: Vec<u32> = all
            .iter()
            .copied()
            .filter(|pid| cmdline(*pid).contains(&root))
            .collect();
        loop {
            let children: Vec<u32> = all
                .iter()
                .copied()
                .filter(|pid| !ours.contains(pid) && ours.contains(&parent_of(*pid)))
                .collect();
            if children.is_empty() {
                break;
            }
            ours.extend(children);
        }
        ours.into_iter()
            .filter(|pid| cmdline(*pid).contains(needle))
            .collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill_plugin(libc::SIGKILL);
        for pid in self.pids("") {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(200));
        unmount_all_under(self.root.path());
    }
}

fn seed(moto: &Moto, names: &[(&str, &str)]) {
    let rt = runtime();
    let client = client(&rt, &moto.endpoint);
    for (name, value) in names {
        put(&rt, &client, name, value, ParameterType::SecureString);
    }
}

fn setup() -> Option<(Moto, Gate)> {
    if !have_fuse_and_moto() {
        return None;
    }
    let moto = Moto::start();
    seed(
        &moto,
        &[("/k8s/db", "db-secret"), ("/k8s/api", "api-secret")],
    );
    let gate = Gate::start(&moto.endpoint);
    Some((moto, gate))
}

const ATTRS: &[(&str, &str)] = &[("path", "/k8s"), ("roleArn", ROLE), ("region", "us-east-1")];
/// A one-second TTL: the kernel asks again every second, so readers keep
/// reaching the serving side rather than the page cache.
const SHORT_TTL_ATTRS: &[(&str, &str)] = &[
    ("path", "/k8s"),
    ("roleArn", ROLE),
    ("region", "us-east-1"),
    ("ttl", "1s"),
];

#[test]
fn sanity_identity_and_node_information() {
    let Some((_moto, gate)) = setup() else { return };
    let node = Node::start(&gate, &[]);
    let rt = &node.rt;
    let info = rt
        .block_on(node.identity().get_plugin_info(GetPluginInfoRequest {}))
        .unwrap()
        .into_inner();
    assert_eq!(info.name, ssmfs::csi::DRIVER_NAME);
    assert!(!info.vendor_version.is_empty());
    rt.block_on(
        node.identity()
            .get_plugin_capabilities(GetPluginCapabilitiesRequest {}),
    )
    .unwrap();
    let probe = rt
        .block_on(node.identity().probe(ProbeRequest {}))
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));
    let caps = rt
        .block_on(
            node.node()
                .node_get_capabilities(NodeGetCapabilitiesRequest {}),
        )
        .unwrap()
        .into_inner();
    assert!(
        caps.capabilities.is_empty(),
        "no STAGE_UNSTAGE_VOLUME: {caps:?}"
    );
    let info = rt
        .block_on(node.node().node_get_info(NodeGetInfoRequest {}))
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "node-1");
    let stage = rt
        .block_on(
            node.node()
                .node_stage_volume(NodeStageVolumeRequest::default()),
        )
        .unwrap_err();
    assert_eq!(stage.code(), tonic::Code::Unimplemented);
}

#[test]
fn sanity_publish_and_unpublish_refuse_bad_requests_and_leave_nothing_mounted() {
    let Some((_moto, gate)) = setup() else { return };
    let node = Node::start(&gate, &[]);
    let target = node.target("uid-1", "secrets");
    let good = request("vol-1", &target, ATTRS, &POD);
    let mut cases: Vec<(&str, NodePublishVolumeRequest, &str)> = Vec::new();
    let mut r = good.clone();
    r.volume_id.clear();
    cases.push(("no volume id", r, "volume_id"));
    let mut r = good.clone();
    r.target_path.clear();
    cases.push(("no target path", r, "target_path"));
    let mut r = good.clone();
    r.volume_capability = None;
    cases.push(("no capability", r, "volume_capability"));
    let mut r = good.clone();
    r.volume_capability.as_mut().unwrap().access_mode = Some(AccessMode {
        mode: Mode::SingleNodeWriter as i32,
    });
    r.readonly = false;
    cases.push(("a writable access mode", r, "readOnly"));
    let mut r = good.clone();
    r.volume_capability.as_mut().unwrap().access_type = Some(AccessType::Block(BlockVolume {}));
    cases.push(("block access", r, "block"));
    let mut r = good.clone();
    r.volume_context.insert("tll".into(), "5m".into());
    r.volume_context.insert("colour".into(), "blue".into());
    cases.push(("unknown attributes", r, "colour, tll"));
    let mut r = good.clone();
    r.volume_context.insert("ttl".into(), "five minutes".into());
    cases.push(("a malformed ttl", r, "ttl"));
    let mut r = good.clone();
    r.volume_context
        .insert("airflowKwargs".into(), "{not json".into());
    r.volume_context.remove("path");
    cases.push(("malformed Airflow kwargs", r, "airflowKwargs"));
    let mut r = good.clone();
    r.volume_context
        .remove("csi.storage.k8s.io/serviceAccount.tokens");
    cases.push(("no token for the audience", r, "sts.amazonaws.com"));
    let mut r = good.clone();
    r.volume_context.insert(
        "csi.storage.k8s.io/serviceAccount.tokens".into(),
        r#"{"vault": {"token": "x"}}"#.into(),
    );
    cases.push(("a token for another audience", r, "sts.amazonaws.com"));
    let mut r = good.clone();
    r.volume_context.remove("roleArn");
    cases.push(("no identity", r, "usePodIdentity"));
    let outside = node.path("elsewhere/mount");
    std::fs::create_dir_all(outside.parent().unwrap()).unwrap();
    cases.push((
        "a target outside the pods directory",
        request("vol-1", &outside, ATTRS, &POD),
        "--pods-dir",
    ));
    let dotted = node.path("pods/uid-1/../../elsewhere/mount");
    cases.push((
        "a target that climbs out",
        request("vol-1", &dotted, ATTRS, &POD),
        "--pods-dir",
    ));
    let link = node.target("uid-2", "secrets");
    std::os::unix::fs::symlink("/etc", &link).unwrap();
    cases.push((
        "a symlink at the target",
        request("vol-1", &link, ATTRS, &POD),
        "symlink",
    ));
    for (what, request, named) in cases {
        let status = node.publish(request).expect_err(what);
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{what}: {status:?}"
        );
        assert!(
            status.message().contains(named),
            "{what}: {:?} should name {named}",
            status.message()
        );
        assert!(
            !status.message().contains(TOKEN),
            "{what}: the token is repeated"
        );
        assert_eq!(node.all_mounts(), 0, "{what} left a mount");
    }
    assert!(
        std::fs::read_link(&link).is_ok(),
        "the symlink is untouched"
    );
    assert!(!target.exists(), "no target was made");
    // Unpublish: the same required fields; an unknown target is fine.
    assert_eq!(
        node.unpublish("", &target).unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        node.unpublish("vol-1", Path::new("")).unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    node.unpublish("vol-1", &target)
        .expect("unpublishing what is not published");
    assert!(
        !node.log_text().contains(TOKEN),
        "the token reached the log"
    );
}

#[test]
fn sts_refusing_the_role_fails_the_publish_and_mounts_nothing() {
    let Some((_moto, gate)) = setup() else { return };
    let node = Node::start(&gate, &[]);
    let target = node.target("uid-1", "secrets");
    let refused = [
        ("path", "/k8s"),
        ("roleArn", "arn:aws:iam::123456789012:role/refused"),
        ("region", "us-east-1"),
    ];
    let status = node
        .publish(request("vol-1", &target, &refused, &POD))
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("AccessDenied") || status.message().contains("ot authorized"),
        "{status:?}"
    );
    // STS's code and message, not the SDK's Rust structure.
    assert!(!status.message().contains("Error {"), "{status:?}");
    assert_eq!(node.all_mounts(), 0);
    assert!(!target.exists());
    assert_eq!(
        std::fs::read_dir(node.path("state/mounts"))
            .unwrap()
            .count(),
        0,
        "a record was left"
    );
    // The node is fine for the next pod.
    node.publish(request("vol-1", &target, ATTRS, &POD))
        .unwrap();
    assert_serves_db(&target);
    assert!(!node.log_text().contains(TOKEN));
}

#[test]
fn pods_with_one_identity_share_a_warm_mount_and_others_do_not() {
    let Some((_moto, gate)) = setup() else { return };
    let metrics_port = free_loopback_port().to_string();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let node = Node::start(&gate, &["--linger", "2s", "--metrics-addr", &metrics_addr]);
    let a = node.target("uid-a", "secrets");
    node.publish(request("vol-a", &a, ATTRS, &POD)).unwrap();
    // Publishing again (a retry, a republish with a fresh token) is a no-op.
    node.publish(request("vol-a", &a, ATTRS, &POD)).unwrap();
    assert_eq!(std::fs::read_to_string(a.join("db")).unwrap(), "db-secret");
    let listing: Vec<String> = std::fs::read_dir(&a)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(listing.len(), 2, "{listing:?}");
    // Read-only for the pod, whatever it tries.
    assert!(std::fs::write(a.join("db"), "x").is_err());
    let calls = gate.ssm_calls();
    let b_pod = PodSpec {
        name: "task-2",
        uid: "uid-b",
        ..POD
    };
    let b = node.target("uid-b", "secrets");
    node.publish(request("vol-b", &b, ATTRS, &b_pod)).unwrap();
    assert_eq!(std::fs::read_to_string(b.join("db")).unwrap(), "db-secret");
    assert_eq!(
        std::fs::read_to_string(b.join("api")).unwrap(),
        "api-secret"
    );
    assert_eq!(
        gate.ssm_calls(),
        calls,
        "the second pod's reads cost SSM calls"
    );
    assert_eq!(node.shared_mounts(), 1);
    let (code, metrics, _) = run("curl", &["-sf", &format!("http://{metrics_addr}/metrics")]);
    assert_eq!(code, 0);
    let attached = metrics
        .lines()
        .find(|l| l.starts_with("ssmfs_csi_pods_attached{"))
        .unwrap_or_default()
        .to_string();
    assert!(attached.ends_with(" 2"), "{metrics}");
    let hits = metrics
        .lines()
        .find(|l| l.starts_with("ssmfs_cache_hits_total{mount="))
        .unwrap_or_default()
        .to_string();
    assert!(
        !hits.is_empty() && !hits.ends_with(" 0"),
        "per-mount hits: {metrics}"
    );
    assert!(
        metrics.contains("ssmfs_api_calls_total{mount="),
        "per-mount calls: {metrics}"
    );
    // Gathered from unix sockets in the run directory: the serving side
    // needs no network shared with the plugin (and no port to race for).
    // The socket, named as its mount, is not in the recorded options, which
    // an earlier release (its --metrics-addr an IP address) must read on a
    // rollback; and each record is named as its mount point is.
    for record in std::fs::read_dir(node.path("state/mounts")).unwrap() {
        let path = record.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let record: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            let name = path.file_stem().unwrap().to_str().unwrap();
            let socket = node.path("run/metrics").join(format!("{name}.sock"));
            use std::os::unix::fs::FileTypeExt;
            assert!(
                std::fs::symlink_metadata(&socket).is_ok_and(|m| m.file_type().is_socket()),
                "no metrics socket at {}",
                socket.display()
            );
            assert!(
                !record["args"].to_string().contains("--metrics-addr"),
                "{record}"
            );
            let mountpoint = PathBuf::from(record["mountpoint"].as_str().unwrap());
            assert_eq!(
                mountpoint.file_name(),
                path.file_stem(),
                "the record is named as its mount point"
            );
        }
    }
    let assumed = gate.counts().0;
    assert_eq!(
        assumed.get(ROLE),
        Some(&1),
        "one role session for both pods: {assumed:?}"
    );
    // Another service account, or other options: a mount of their own.
    let c_pod = PodSpec {
        name: "other",
        uid: "uid-c",
        service_account: "reporting",
        ..POD
    };
    let c = node.target("uid-c", "secrets");
    node.publish(request("vol-c", &c, ATTRS, &c_pod)).unwrap();
    let d_pod = PodSpec {
        name: "task-3",
        uid: "uid-d",
        ..POD
    };
    let d = node.target("uid-d", "secrets");
    let other_ttl = [
        ("path", "/k8s"),
        ("roleArn", ROLE),
        ("region", "us-east-1"),
        ("ttl", "1m"),
    ];
    node.publish(request("vol-d", &d, &other_ttl, &d_pod))
        .unwrap();
    assert_eq!(node.shared_mounts(), 3);
    assert_eq!(std::fs::read_to_string(c.join("db")).unwrap(), "db-secret");
    // A target taken by another volume is refused.
    let clash = node.publish(request("vol-x", &a, ATTRS, &POD)).unwrap_err();
    assert_eq!(clash.code(), tonic::Code::AlreadyExists);
    // The last pod's unpublish keeps the mount for the linger, then it goes.
    for (volume, target) in [("vol-a", &a), ("vol-b", &b), ("vol-c", &c), ("vol-d", &d)] {
        node.unpublish(volume, target).unwrap();
        node.unpublish(volume, target).unwrap();
        assert!(!target.exists());
    }
    assert_eq!(node.shared_mounts(), 3, "removed before the linger");
    within(
        Duration::from_secs(10),
        "the shared mounts go after the linger",
        || node.shared_mounts() == 0,
    );
    within(Duration::from_secs(10), "their holders end", || {
        node.pids("--adopt-fds").is_empty()
    });
    let log = node.log_text();
    assert!(log.contains("airflow/task-2"), "log lines name the pod");
    assert!(
        !log.contains(TOKEN) && !log.contains("db-secret"),
        "a token or value reached the log"
    );
}

#[test]
fn the_serving_side_runs_unprivileged() {
    let Some((_moto, gate)) = setup() else { return };
    let node = Node::start(&gate, &[]);
    let target = node.publish_first_pod(ATTRS);
    assert_serves_db(&target);
    // Everything but the plugin: the serving side, the holder, the daemon.
    let plugin = node.plugin.as_ref().map(|child| child.id());
    let serving: Vec<u32> = node
        .pids("")
        .into_iter()
        .filter(|pid| Some(*pid) != plugin)
        .collect();
    assert!(
        serving.len() >= 3,
        "serving side, holder and daemon: {serving:?}"
    );
    // Issue 31: the role, the session name (namespace and service account),
    // the path and the key were in every holder's and daemon's
    // /proc/PID/cmdline, and the path in the mount source.
    let key = std::fs::read_dir(node.path("state/mounts"))
        .unwrap()
        .filter_map(|e| {
            let path = e.ok()?.path();
            let record: serde_json::Value =
                serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
            record["key"].as_str().map(String::from)
        })
        .next()
        .expect("a mount record");
    let secret_words = [
        ROLE,
        "airflow-worker",
        "ssmfs-airflow",
        ":/k8s",
        key.as_str(),
    ];
    for pid in node.pids("") {
        for what in ["cmdline", "environ"] {
            let bytes = std::fs::read(format!("/proc/{pid}/{what}")).unwrap_or_default();
            let text = String::from_utf8_lossy(&bytes);
            for word in secret_words {
                assert!(
                    !text.contains(word),
                    "pid {pid}'s {what} tells {word:?}: {text}"
                );
            }
        }
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = node.root.path().display().to_string();
    let ours = |line: &&str| line.contains("fuse.ssmfs") && line.contains(&root);
    for line in mountinfo.lines().filter(ours) {
        for word in secret_words {
            assert!(!line.contains(word), "mountinfo tells {word:?}: {line}");
        }
        assert_eq!(
            line.split(' ').rev().nth(1),
            Some("ssmfs"),
            "the mount source: {line}"
        );
    }
    for pid in serving {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .unwrap()
                .to_string()
        };
        assert!(
            field("CapEff:").ends_with("0000000000000000"),
            "pid {pid}: {}",
            field("CapEff:")
        );
        assert!(
            !field("Uid:")
                .split_whitespace()
                .skip(1)
                .any(|uid| uid == "0"),
            "pid {pid}: {}",
            field("Uid:")
        );
        assert!(field("NoNewPrivs:").ends_with('1'), "pid {pid}");
        // No /dev/fuse to open, and / is read-only, in its mount namespace.
        let fuse = std::fs::metadata(format!("/proc/{pid}/root/dev/fuse")).ok();
        let root_mount = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
        let root_line = root_mount
            .lines()
            .find(|l| l.split(' ').nth(4) == Some("/"))
            .unwrap()
            .to_string();
        assert!(
            root_line.split(' ').nth(5).unwrap().starts_with("ro"),
            "pid {pid}: {root_line}"
        );
        let _ = fuse;
        let dev_fuse_line = root_mount
            .lines()
            .find(|l| l.split(' ').nth(4) == Some("/dev/fuse"));
        assert!(
            dev_fuse_line.is_some(),
            "pid {pid}: /dev/fuse is not covered"
        );
    }
}

/// The parent of process `pid` (0 once it is gone).
fn parent_of(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit(')')
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// What each reader of a pod's volume checks.
const READ_PAIRS: [&str; 2] = ["db=db-secret", "api=api-secret"];

#[test]
fn reads_survive_the_serving_side_killed_the_plugin_killed_and_the_plugin_upgraded() {
    let Some((_moto, gate)) = setup() else { return };
    let mut node = Node::start(&gate, &[]);
    let attrs = SHORT_TTL_ATTRS;
    let target = node.publish_first_pod(attrs);
    let served = |calls_before: u64| {
        let now = gate.ssm_calls();
        assert!(
            now >= calls_before + 3,
            "the mount was not asked: {calls_before} -> {now} calls"
        );
        now
    };
    let mut calls = gate.ssm_calls();
    // 1. The serving side (with its holders and daemons) killed every 2 s.
    let readers = start_readers(&target, 10, &READ_PAIRS);
    for _ in 0..4 {
        std::thread::sleep(Duration::from_secs(2));
        let serve = node.pids("csi-serve");
        assert_eq!(serve.len(), 1, "{serve:?}");
        unsafe { libc::kill(serve[0] as i32, libc::SIGKILL) };
    }
    let ReaderTotals {
        reads,
        failures,
        wrong,
        errors,
        ..
    } = finish_readers(readers);
    assert!(reads > 100, "{reads} reads");
    assert_eq!(
        (failures, wrong),
        (0, 0),
        "serving side killed: {errors}\n{}",
        node.log_text()
    );
    calls = served(calls);
    let log = node.log_text();
    assert!(
        log.contains("asked the kernel to resend"),
        "no holder resumed:\n{log}"
    );
    assert!(!log.contains("refused FUSE_NOTIFY_RESEND"), "{log}");
    // 2. The plugin killed and started again: it adopts the mount.
    let readers = start_readers(&target, 6, &READ_PAIRS);
    std::thread::sleep(Duration::from_secs(1));
    node.kill_plugin(libc::SIGKILL);
    std::thread::sleep(Duration::from_secs(1));
    let connected = |node: &Node| {
        node.log_text()
            .matches("a serving side is connected")
            .count()
    };
    let before = connected(&node);
    node.start_plugin();
    // Once the serving side is back on the link, the plugin holds the fds
    // again (it sent them first): the serving side may go now.
    within(
        Duration::from_secs(20),
        "the serving side reconnects",
        || connected(&node) > before,
    );
    std::thread::sleep(Duration::from_millis(200));
    let serve = node.pids("csi-serve");
    unsafe { libc::kill(serve[0] as i32, libc::SIGKILL) };
    let ReaderTotals {
        reads,
        failures,
        wrong,
        errors,
        ..
    } = finish_readers(readers);
    assert!(reads > 50);
    assert_eq!(
        (failures, wrong),
        (0, 0),
        "plugin killed: {errors}\n{}",
        node.log_text()
    );
    calls = served(calls);
    node.publish(request("vol-1", &target, attrs, &POD))
        .expect("republish after adoption");
    // 3. An upgrade: the plugin stopped (SIGTERM, as a DaemonSet update
    // does) and a new binary started in its place.
    let upgraded = node.path("ssmfs-upgraded");
    std::fs::copy(&node.binary, &upgraded).unwrap();
    let readers = start_readers(&target, 6, &READ_PAIRS);
    std::thread::sleep(Duration::from_secs(1));
    node.kill_plugin(libc::SIGTERM);
    node.binary = upgraded;
    node.start_plugin();
    std::thread::sleep(Duration::from_secs(1));
    let serve = node.pids("csi-serve");
    unsafe { libc::kill(serve[0] as i32, libc::SIGKILL) };
    let ReaderTotals {
        reads,
        failures,
        wrong,
        errors,
        ..
    } = finish_readers(readers);
    assert!(reads > 50);
    assert_eq!(
        (failures, wrong),
        (0, 0),
        "plugin upgraded: {errors}\n{}",
        node.log_text()
    );
    served(calls);
    within(
        Duration::from_secs(10),
        "the upgraded binary serves",
        || !node.pids("ssmfs-upgraded csi-serve").is_empty(),
    );
    // 4. Everything dies: readers get an error, not a wait.
    node.kill_plugin(libc::SIGKILL);
    for pid in node.pids("csi-serve") {
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    within(Duration::from_secs(5), "every serving process ends", || {
        node.pids("--adopt-fds").is_empty() && node.pids("--serve-fd").is_empty()
    });
    let started = Instant::now();
    // (A file read before may still come from the page cache: ssmfs runs
    // the kernel in no-open mode. Whatever needs an answer fails.) A request
    // the kernel queued while the last fd was being closed ends with
    // ECONNABORTED; every later one with ENOTCONN. Both are the error the
    // reader must get instead of a wait.
    let disconnected = [Some(libc::ENOTCONN), Some(libc::ECONNABORTED)];
    let error = std::fs::metadata(target.join("never-looked-up")).unwrap_err();
    assert!(disconnected.contains(&error.raw_os_error()), "{error}");
    let error = std::fs::read_dir(&target)
        .and_then(|mut d| d.next().transpose())
        .unwrap_err();
    assert!(disconnected.contains(&error.raw_os_error()), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the read waited"
    );
    // 5. The next plugin cleans up, and the next publish heals.
    node.start_plugin();
    node.publish(request("vol-1", &target, attrs, &POD))
        .unwrap();
    let healed = std::fs::read_to_string(target.join("api"));
    assert_eq!(
        healed.as_deref().ok(),
        Some("api-secret"),
        "{healed:?}\nmounts: {}\nlog:\n{}",
        std::fs::read_to_string("/proc/self/mountinfo").unwrap(),
        node.log_text()
    );
    assert!(!node.log_text().contains(TOKEN));
}

/// A KubernetesExecutor's day on one node: 100 task pods one after another,
/// each reading the same 20 secrets. Counted: the node pays what one pod
/// pays, because every pod after the first finds the mount warm. Publish
/// times are printed (docs/BENCHMARKS.md has a release build's).
#[test]
fn a_hundred_task_pods_cost_what_one_pod_costs() {
    let Some((moto, gate)) = setup() else { return };
    let secrets: Vec<(String, String)> = (0..20)
        .map(|i| (format!("/k8s/task/s{i:02}"), format!("value-{i:02}")))
        .collect();
    let rt = runtime();
    put_many(
        &rt,
        &client(&rt, &moto.endpoint),
        secrets.clone(),
        ParameterType::SecureString,
    );
    let node = Node::start(&gate, &[]);
    let calls_before = gate.ssm_calls();
    let (mut cold, mut warm) = (Duration::ZERO, Vec::new());
    let mut first_pod_calls = 0;
    for pod in 0..100 {
        let uid = format!("task-{pod}");
        let spec = PodSpec {
            name: &uid,
            uid: &uid,
            ..POD
        };
        let target = node.target(&uid, "secrets");
        let started = Instant::now();
        node.publish(request("vol", &target, ATTRS, &spec)).unwrap();
        let took = started.elapsed();
        if pod == 0 {
            cold = took;
        } else {
            warm.push(took);
        }
        for (name, value) in &secrets {
            let file = target.join(name.trim_start_matches("/k8s/"));
            assert_eq!(&std::fs::read_to_string(file).unwrap(), value);
        }
        if pod == 0 {
            first_pod_calls = gate.ssm_calls() - calls_before;
        }
        node.unpublish("vol", &target).unwrap();
    }
    let total = gate.ssm_calls() - calls_before;
    warm.sort();
    eprintln!(
        "100 pods: {total} SSM calls (the first pod: {first_pod_calls}); publish cold {:.1} ms, warm p50 {:.1} ms, p99 {:.1} ms",
        cold.as_secs_f64() * 1e3,
        warm[warm.len() / 2].as_secs_f64() * 1e3,
        warm[warm.len() * 99 / 100].as_secs_f64() * 1e3,
    );
    let rss = |pid: u32| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .unwrap_or("VmRSS: ?")
            .split_whitespace()
            .nth(1)
            .unwrap_or("?")
            .to_string()
    };
    let plugin = node.plugin.as_ref().unwrap().id();
    for (what, pids) in [
        ("plugin", vec![plugin]),
        ("csi-serve", node.pids("csi-serve")),
        ("holder", node.pids("--adopt-fds")),
        ("daemon", node.pids("--serve-fd")),
    ] {
        eprintln!(
            "resident memory, {what}: {} kB",
            pids.iter().map(|p| rss(*p)).collect::<Vec<_>>().join(", ")
        );
    }
    assert_eq!(total, first_pod_calls, "pods after the first cost calls");
    assert!(
        first_pod_calls <= 25,
        "{first_pod_calls} calls for one pod's 20 reads"
    );
    assert_eq!(node.shared_mounts(), 1, "one mount, lingering");
    assert_eq!(
        gate.counts().0.get(ROLE),
        Some(&1),
        "one role session for 100 pods"
    );
}

#[test]
fn volume_classes_fill_in_what_a_volume_leaves_out() {
    let Some((_moto, gate)) = setup() else { return };
    let attributes = tempfile::tempdir().unwrap();
    std::fs::write(
        attributes.path().join("defaults.json"),
        r#"{"region": "us-east-1"}"#,
    )
    .unwrap();
    std::fs::write(
        attributes.path().join("classes.json"),
        r#"{"k8s": {"path": "/k8s", "ttl": "1m"}}"#,
    )
    .unwrap();
    let dir = attributes.path().to_str().unwrap();
    let node = Node::start(&gate, &["--attributes-dir", dir]);
    let target = node.target("uid-1", "secrets");
    let own = [("class", "k8s"), ("roleArn", ROLE)];
    node.publish(request("vol-1", &target, &own, &POD)).unwrap();
    assert_serves_db(&target);
    // The same options spelt out share the class's mount.
    let spelt = [
        ("path", "/k8s"),
        ("ttl", "1m"),
        ("region", "us-east-1"),
        ("roleArn", ROLE),
    ];
    let other = node.target("uid-2", "secrets");
    let pod2 = PodSpec {
        name: "task-2",
        uid: "uid-2",
        ..POD
    };
    node.publish(request("vol-2", &other, &spelt, &pod2))
        .unwrap();
    assert_eq!(node.shared_mounts(), 1);
    let unknown = [("class", "nope"), ("roleArn", ROLE)];
    let status = node
        .publish(request("vol-3", &node.target("uid-3", "s"), &unknown, &POD))
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("k8s"), "{status:?}");
}

/// A DaemonSet surge update of the serving side (the new pod starts before
/// the old one is deleted), while the plugin's own DaemonSet replaces the
/// plugin at the same moment: the younger serving side takes every mount
/// over, the older one goes, and no read fails.
#[test]
fn a_surge_serving_side_takes_over_while_the_plugin_is_replaced() {
    let Some((_moto, gate)) = setup() else { return };
    let mut node = Node::start(&gate, &["--external-serve"]);
    let (ready_old, ready_new) = (node.path("ready/old"), node.path("ready/new"));
    let mut old = node.start_serve(&ready_old);
    within(
        Duration::from_secs(10),
        "the plugin sees the serving side",
        || node.try_probe() == Some(true),
    );
    let attrs = SHORT_TTL_ATTRS;
    let target = node.publish_first_pod(attrs);
    within(Duration::from_secs(5), "the serving side is ready", || {
        node.serve_ready(&ready_old)
    });
    assert!(!node.serve_ready(&ready_new));
    let calls = gate.ssm_calls();
    let readers = start_readers(&target, 8, &READ_PAIRS);
    std::thread::sleep(Duration::from_secs(1));
    // The surge pod: ready once it serves the mount, and the old one not.
    let mut new = node.start_serve(&ready_new);
    within(
        Duration::from_secs(10),
        "the younger serving side is ready",
        || node.serve_ready(&ready_new),
    );
    assert!(!node.serve_ready(&ready_old), "both claim the mount");
    // A holder's child between fork and exec still shows the holder's
    // command line (CI saw one): a child of a holder is not a holder.
    let all = node.pids("--adopt-fds");
    let holders: Vec<u32> = all
        .iter()
        .copied()
        .filter(|pid| !all.contains(&parent_of(*pid)))
        .collect();
    assert_eq!(holders.len(), 1, "{all:?}");
    let parent = std::fs::read_to_string(format!("/proc/{}/stat", holders[0])).unwrap();
    let parent: u32 = parent
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(parent, new.id(), "the holder is not the younger side's");
    // The old pod deleted and the plugin replaced, at once.
    std::thread::sleep(Duration::from_secs(1));
    unsafe { libc::kill(old.id() as i32, libc::SIGTERM) };
    node.kill_plugin(libc::SIGKILL);
    let _ = old.wait();
    node.start_plugin();
    let ReaderTotals {
        reads,
        failures,
        wrong,
        errors,
        ..
    } = finish_readers(readers);
    assert!(reads > 50, "{reads} reads");
    assert_eq!(
        (failures, wrong),
        (0, 0),
        "surge and plugin replaced: {errors}\n{}",
        node.log_text()
    );
    assert!(gate.ssm_calls() >= calls + 3, "the mount was not asked");
    let log = node.log_text();
    assert!(
        log.contains("a younger serving side takes the mount over")
            && log.contains("asked the kernel to resend"),
        "no handover:\n{log}"
    );
    within(
        Duration::from_secs(5),
        "the younger side is ready again",
        || node.serve_ready(&ready_new),
    );
    node.publish(request("vol-1", &target, attrs, &POD))
        .expect("republish to the replaced plugin");
    assert_serves_db(&target);
    let _ = new.kill();
    let _ = new.wait();
}

#[test]
fn the_serving_side_starts_from_a_binary_only_root_may_reach() {
    let Some((_moto, gate)) = setup() else { return };
    // As `cargo install` leaves it in /root/.cargo/bin, or a clone in a
    // `mktemp -d` directory: mode 0700, so the serving user cannot search it.
    let hidden = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(hidden.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let binary = hidden.path().join("ssmfs");
    std::fs::copy(env!("CARGO_BIN_EXE_ssmfs"), &binary).unwrap();
    let node = Node::start_binary(&gate, &[], binary.clone());
    let target = node.publish_first_pod(ATTRS);
    assert_serves_db(&target);
    let log = node.log_text();
    assert!(!log.contains("cannot start the serving side"), "{log}");
}

// Issue 26: a shared cluster. Each test below failed on the driver before
// these rules (checked by running it against that build).

/// Publishes `attributes` for `pod` and expects `code` with a message that
/// names `named`, and nothing mounted or left at the target.
fn refused(
    node: &Node,
    uid: &str,
    attributes: &[(&str, &str)],
    pod: &PodSpec,
    code: tonic::Code,
    named: &str,
) {
    let target = node.target(uid, "secrets");
    let before = node.all_mounts();
    let status = node
        .publish(request("vol-x", &target, attributes, pod))
        .expect_err(named);
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(named) && !status.message().contains('\n'),
        "{:?} should name {named} in one line",
        status.message()
    );
    assert_eq!(
        node.all_mounts(),
        before,
        "{named}: something stayed mounted"
    );
    assert!(!target.exists(), "{named}: the target was left");
}

#[test]
fn a_tenant_cannot_choose_the_node_credentials_an_endpoint_or_a_role_inside_airflow_kwargs() {
    let Some((_moto, gate)) = setup() else { return };
    let node = Node::start(&gate, &[]);
    let node_identity = [
        ("path", "/k8s"),
        ("useNodeIdentity", "true"),
        ("region", "us-east-1"),
    ];
    let denied = tonic::Code::PermissionDenied;
    refused(
        &node,
        "u1",
        &node_identity,
        &POD,
        denied,
        "--node-identity-namespaces",
    );
    for key in ["endpoint_url", "role_arn", "profile_name"] {
        let kwargs = format!(r#"{{"variables_prefix": "k8s", "{key}": "x"}}"#);
        let attributes = [
            ("airflowKwargs", kwargs.as_str()),
            ("roleArn", ROLE),
            ("region", "us-east-1"),
        ];
        refused(&node, "u2", &attributes, &POD, denied, key);
    }
    let bad_region = [("path", "/k8s"), ("roleArn", ROLE), ("region", "mars-1")];
    refused(
        &node,
        "u3",
        &bad_region,
        &POD,
        tonic::Code::InvalidArgument,
        "region",
    );
    let kwargs_region = [
        (
            "airflowKwargs",
            r#"{"variables_prefix": "k8s", "region_name": "x y"}"#,
        ),
        ("roleArn", ROLE),
    ];
    refused(
        &node,
        "u4",
        &kwargs_region,
        &POD,
        tonic::Code::InvalidArgument,
        "region_name",
    );
    // A token whose subject is another service account than the pod's.
    let other = token_for("airflow", "admin");
    let stolen = PodSpec {
        token: Some(&other),
        ..POD
    };
    refused(
        &node,
        "u5",
        ATTRS,
        &stolen,
        denied,
        "system:serviceaccount:airflow:airflow-worker",
    );
    // Unpublish touches only kubelet's targets.
    let outside = node.path("outside");
    std::fs::create_dir_all(&outside).unwrap();
    assert_eq!(
        run(
            "mount",
            &["-t", "tmpfs", "tmpfs", outside.to_str().unwrap()]
        )
        .0,
        0
    );
    let status = node.unpublish("vol-x", &outside).unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("--pods-dir"), "{status:?}");
    assert!(
        ssmfs::daemon::is_mount_point(&outside),
        "unmounted outside the pods directory"
    );
    let _ = ssmfs::daemon::lazy_unmount(&outside);
}

#[test]
fn the_node_credentials_go_where_the_admin_says() {
    let Some((_moto, gate)) = setup() else { return };
    let attributes = tempfile::tempdir().unwrap();
    std::fs::write(
        attributes.path().join("classes.json"),
        r#"{"shared": {"path": "/k8s", "useNodeIdentity": "true", "region": "us-east-1"}}"#,
    )
    .unwrap();
    let dir = attributes.path().to_str().unwrap();
    let node = Node::start(
        &gate,
        &["--attributes-dir", dir, "--node-identity-namespaces", "ops"],
    );
    // A class that sets useNodeIdentity: what it sets is fixed.
    let target = node.publish_first_pod(&[("class", "shared")]);
    assert_serves_db(&target);
    let elsewhere = [("class", "shared"), ("path", "/team-b")];
    refused(
        &node,
        "u2",
        &elsewhere,
        &POD,
        tonic::Code::PermissionDenied,
        "fixed",
    );
    // Nor the other half of a pair the class sets, which would drop it.
    let kwargs = [
        ("class", "shared"),
        ("airflowKwargs", r#"{"variables_prefix": "/team-b"}"#),
    ];
    refused(
        &node,
        "u2",
        &kwargs,
        &POD,
        tonic::Code::PermissionDenied,
        "fixed",
    );
    // Issue 31: what the class does not set is not the tenant's either
    // (the class opens nothing): a rate, a topic, a region of its own.
    for added in [
        ("maxTps", "1000"),
        (
            "eventsTopic",
            "arn:aws:sns:us-east-1:999999999999:elsewhere",
        ),
        ("failoverRegion", "us-west-2"),
    ] {
        let attributes = [("class", "shared"), added];
        refused(
            &node,
            "u2",
            &attributes,
            &POD,
            tonic::Code::PermissionDenied,
            added.0,
        );
    }
    let own_role = [("class", "shared"), ("roleArn", ROLE)];
    refused(
        &node,
        "u2",
        &own_role,
        &POD,
        tonic::Code::PermissionDenied,
        "fixed",
    );
    // A namespace the flag names may ask for them itself.
    let ops = PodSpec {
        namespace: "ops",
        ..POD
    };
    let own = [
        ("path", "/k8s"),
        ("useNodeIdentity", "true"),
        ("region", "us-east-1"),
    ];
    let target = node.target("uid-3", "secrets");
    node.publish(request("vol-3", &target, &own, &ops)).unwrap();
    assert_eq!(
        std::fs::read_to_string(target.join("api")).unwrap(),
        "api-secret"
    );
    refused(
        &node,
        "u4",
        &own,
        &POD,
        tonic::Code::PermissionDenied,
        "airflow",
    );
    // defaults.json cannot give every volume the node's credentials.
    std::fs::write(
        attributes.path().join("defaults.json"),
        r#"{"useNodeIdentity": "true"}"#,
    )
    .unwrap();
    let (code, _, err) = run(
        env!("CARGO_BIN_EXE_ssmfs"),
        &["csi", "--node-id", "n", "--attributes-dir", dir],
    );
    assert_ne!(code, 0);
    assert!(err.contains("useNodeIdentity"), "{err}");
}

#[test]
fn only_the_serving_user_may_speak_for_the_serving_side() {
    let Some((_moto, gate)) = setup() else { return };
    let node = Node::start(&gate, &[]);
    let target = node.publish_first_pod(ATTRS);
    use std::os::unix::fs::MetadataExt;
    let run_dir = std::fs::metadata(node.path("run")).unwrap();
    assert_eq!(run_dir.uid(), 0, "the run directory is root's");
    let socket = node.path("run/control.sock");
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (64721, 0o600));
    // As if another uid could reach the socket (a hostPath, a bind mount):
    // the plugin checks who connected, not what it claims.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let claim = r#"
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])
s.settimeout(3)
try:
    s.sendmsg([json.dumps({"op": "hello", "born": 99999999999999}).encode()])
    data, fds, flags, _ = socket.recv_fds(s, 65536, 16)
    print("closed" if not data else "received %d bytes and %d fds" % (len(data), len(fds)))
except socket.timeout:
    print("no answer")
except OSError:
    print("closed")
"#;
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python3");
    let (code, out, err) = run(
        "setpriv",
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            python.to_str().unwrap(),
            "-c",
            claim,
            socket.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "closed", "nobody got: {out}");
    assert!(
        node.log_text().contains("refused a control connection"),
        "no refusal logged"
    );
    // Issue 31: a holder or daemon runs as the serving uid too. Without the
    // link key (which only csi-serve reads), claiming to be the youngest
    // serving side gets nothing either, with no proof, a wrong one, or a
    // silent wait.
    let as_serving_user = |script: &str| {
        run(
            "setpriv",
            &[
                "--reuid=64721",
                "--regid=64721",
                "--clear-groups",
                python.to_str().unwrap(),
                "-c",
                script,
                socket.to_str().unwrap(),
            ],
        )
    };
    let wrong_key = claim.replace(
        r#"s.sendmsg([json.dumps({"op": "hello""#,
        r#"s.sendmsg([json.dumps({"op": "auth", "key": "00" * 32}).encode()]); s.sendmsg([json.dumps({"op": "hello""#,
    );
    let (code, out, err) = as_serving_user(&wrong_key);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "closed", "the serving uid got: {out}");
    assert!(
        node.log_text()
            .contains("only csi-serve holds the link key"),
        "no refusal of the serving uid logged"
    );
    // Without any key it is taken for a serving side of an earlier release
    // (an upgrade): it may say what it holds, and is handed nothing, however
    // young it claims to be; a new mount still goes to the real one.
    let (code, out, err) = as_serving_user(claim);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.trim() == "no answer" || out.trim() == "closed",
        "the serving uid without a key got: {out}"
    );
    let other = node.target("uid-2", "secrets");
    node.publish(request("vol-2", &other, SHORT_TTL_ATTRS, &POD))
        .unwrap();
    assert!(std::fs::read_to_string(other.join("db")).is_ok());
    // The key is root's alone.
    let key = std::fs::metadata(node.path("run/link.key")).unwrap();
    assert_eq!((key.uid(), key.mode() & 0o777), (0, 0o600));
    // Reads go on: the real serving side was not displaced.
    assert_serves_db(&target);
    // csi-serve is not dumpable: its /proc entries are root's, not its uid's.
    for pid in node.pids("csi-serve") {
        let fd_dir = std::fs::metadata(format!("/proc/{pid}/fd")).unwrap();
        assert_eq!(
            fd_dir.uid(),
            0,
            "pid {pid}: its fds are readable by its uid"
        );
    }
}

#[test]
fn a_mount_is_keyed_by_its_whole_identity_compared_before_a_bind_and_kept_from_the_host() {
    let Some((_moto, gate)) = setup() else { return };
    let metrics_addr = format!("127.0.0.1:{}", free_loopback_port());
    let mut node = Node::start(&gate, &["--metrics-addr", &metrics_addr]);
    node.publish_first_pod(ATTRS);
    use std::os::unix::fs::MetadataExt;
    let records: Vec<PathBuf> = std::fs::read_dir(node.path("state/mounts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    assert_eq!(records.len(), 1);
    let recorded: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&records[0]).unwrap()).unwrap();
    let key = recorded["key"].as_str().unwrap().to_string();
    assert_eq!(key.len(), 64, "the whole SHA-256: {key}");
    let mountpoint = recorded["mountpoint"].as_str().unwrap().to_string();
    // Root's alone: host users cannot walk to the mount or read records.
    for dir in ["state", "state/mounts"] {
        assert_eq!(
            std::fs::metadata(node.path(dir)).unwrap().mode() & 0o777,
            0o700,
            "{dir}"
        );
    }
    assert_eq!(
        std::fs::metadata(&records[0]).unwrap().mode() & 0o777,
        0o600
    );
    let (code, out, _) = run(
        "setpriv",
        &[
            "--reuid=1000",
            "--regid=1000",
            "--clear-groups",
            "ls",
            &mountpoint,
        ],
    );
    assert!(
        code != 0 && out.is_empty(),
        "host user 1000 listed the shared mount: {out}"
    );
    let (_, metrics, _) = run("curl", &["-sf", &format!("http://{metrics_addr}/metrics")]);
    assert!(metrics.contains("ssmfs_csi_pods_attached"), "{metrics}");
    assert!(!metrics.contains(&key), "the key is in the metrics");
    // The key is an HMAC under the node's secret: what a tenant knows does
    // not give it, so mount paths in mountinfo reveal nothing searchable.
    let salt = std::fs::metadata(node.path("state/key.salt")).unwrap();
    assert_eq!((salt.len(), salt.mode() & 0o777), (32, 0o600));
    // A record that says another identity (as a colliding key would): the
    // next pod is not bound to it.
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&records[0]).unwrap()).unwrap();
    record["identity"]["serviceAccount"] = "someone-else".into();
    std::fs::write(&records[0], serde_json::to_vec(&record).unwrap()).unwrap();
    node.kill_plugin(libc::SIGKILL);
    node.start_plugin();
    std::thread::sleep(Duration::from_secs(2));
    let pod2 = PodSpec {
        name: "task-2",
        uid: "uid-2",
        ..POD
    };
    refused(
        &node,
        "uid-2",
        ATTRS,
        &pod2,
        tonic::Code::Internal,
        "another identity",
    );
}

#[test]
fn a_namespace_cannot_fill_the_node() {
    let Some((_moto, gate)) = setup() else { return };
    let node = Node::start(
        &gate,
        &[
            "--max-mounts-per-namespace",
            "4",
            "--max-mounts",
            "6",
            "--linger",
            "1h",
        ],
    );
    let attrs = |path: &'static str, ttl: &'static str| {
        vec![
            ("path", path),
            ("roleArn", ROLE),
            ("region", "us-east-1"),
            ("ttl", ttl),
        ]
    };
    let in_ns = |namespace: &'static str, uid: &'static str| PodSpec {
        namespace,
        uid,
        name: uid,
        ..POD
    };
    let publish = |uid: &'static str, namespace, attributes: &[(&str, &str)]| {
        let target = node.target(uid, "secrets");
        node.publish(request(uid, &target, attributes, &in_ns(namespace, uid)))
            .map(|()| target)
    };
    let exhausted = tonic::Code::ResourceExhausted;
    // Tuning variants of one source do not multiply (the third is refused).
    let a1 = publish("a1", "airflow", &attrs("/k8s", "1s")).unwrap();
    let a2 = publish("a2", "airflow", &attrs("/k8s", "2s")).unwrap();
    refused(
        &node,
        "a3",
        &attrs("/k8s", "3s"),
        &in_ns("airflow", "a3"),
        exhausted,
        "--max-variants-per-source",
    );
    publish("a3", "airflow", &attrs("/other", "1s")).unwrap();
    publish("a4", "airflow", &attrs("/other", "2s")).unwrap();
    publish("b1", "team-b", &attrs("/k8s", "1s")).unwrap();
    publish("b2", "team-b", &attrs("/k8s", "2s")).unwrap();
    assert_eq!(node.shared_mounts(), 6);
    // The node is full, airflow is over its fair share (6 / 3 = 2): a third
    // namespace's first mount still goes in, with nothing idle to evict.
    publish("c1", "team-c", &attrs("/k8s", "1s")).unwrap();
    assert_eq!(node.shared_mounts(), 7);
    // Its second waits for room, which the largest holder's idle mounts
    // give (and the smaller holder's are kept).
    refused(
        &node,
        "c2",
        &attrs("/k8s", "2s"),
        &in_ns("team-c", "c2"),
        exhausted,
        "--max-mounts",
    );
    node.unpublish("a1", &a1).unwrap();
    node.unpublish("a2", &a2).unwrap();
    publish("c2", "team-c", &attrs("/k8s", "2s")).unwrap();
    assert_eq!(node.shared_mounts(), 6, "airflow's two idle mounts went");
    // A namespace at its share cannot take others' idle mounts.
    node.unpublish("c1", &node.target("c1", "secrets")).unwrap();
    refused(
        &node,
        "b3",
        &attrs("/b", "1s"),
        &in_ns("team-b", "b3"),
        exhausted,
        "--max-mounts",
    );
    assert_eq!(node.shared_mounts(), 6, "team-c's idle mount stayed");
}

#[test]
fn eks_pod_identity_signs_with_the_agents_credentials_for_the_pods_token() {
    if !have_fuse_and_moto() {
        return;
    }
    let moto = Moto::start();
    seed(&moto, &[("/k8s/db", "db-secret")]);
    let gate = Gate::with_pod_identity(
        &moto.endpoint,
        &["system:serviceaccount:airflow:airflow-worker"],
    );
    let agent = format!("--pod-identity-agent-url={}/v1/credentials", gate.url);
    let node = Node::start(&gate, &[&agent]);
    let attributes = [
        ("path", "/k8s"),
        ("usePodIdentity", "true"),
        ("region", "us-east-1"),
    ];
    let target = node.publish_first_pod(&attributes);
    assert_serves_db(&target);
    let signed = gate.count_map("signed_by");
    assert!(
        signed.get("AKIAPODIDENTITYAIRFLOW").is_some_and(|n| *n > 0),
        "{signed:?}"
    );
    assert_eq!(
        signed.len(),
        1,
        "every SSM call with the agent's key: {signed:?}"
    );
    let asked = gate.count_map("agent");
    assert!(
        asked.contains_key("system:serviceaccount:airflow:airflow-worker"),
        "{asked:?}"
    );
    // Another service account, in its own mount: the agent refuses it.
    let refused_pod = PodSpec {
        namespace: "team-b",
        service_account: "worker",
        uid: "uid-b",
        ..POD
    };
    let status = node
        .publish(request(
            "vol-b",
            &node.target("uid-b", "secrets"),
            &attributes,
            &refused_pod,
        ))
        .unwrap_err();
    assert_ne!(status.code(), tonic::Code::Ok);
    assert_eq!(node.shared_mounts(), 1, "{status:?}");
    assert!(!node.log_text().contains(TOKEN));
}

/// Python's grpcio, a real CSI client of another language: over a unix
/// socket it sends the socket's path as `:authority`, which the HTTP/2
/// server under tonic resets unless the plugin mends it.
#[test]
fn a_grpcio_client_that_sends_the_socket_path_as_authority_is_answered() {
    let Some((_moto, gate)) = setup() else { return };
    let node = Node::start(&gate, &[]);
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let client = r#"
import sys, grpc
channel = grpc.insecure_channel("unix://" + sys.argv[1])
for method in ["/csi.v1.Identity/GetPluginInfo", "/csi.v1.Node/NodeGetInfo", "/csi.v1.Identity/Probe"]:
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    answer = call(b"", timeout=10)
    print(method, len(answer), answer.decode("utf-8", "replace").isprintable() or "bytes")
"#;
    let socket = node.path("csi.sock");
    let (code, out, err) = run(
        python.to_str().unwrap(),
        &["-c", client, socket.to_str().unwrap()],
    );
    assert_eq!(code, 0, "grpcio failed: {err}");
    assert!(
        out.contains("GetPluginInfo") && out.contains("NodeGetInfo"),
        "{out}"
    );
    let (_, version, _) = run(
        python.to_str().unwrap(),
        &["-c", "import grpc; print(grpc.__version__)"],
    );
    eprintln!("grpcio {} answered:\n{out}", version.trim());
}

#[test]
fn a_slow_publish_does_not_hold_up_another_pods() {
    let Some((_moto, gate)) = setup() else { return };
    let node = Node::start(&gate, &[]);
    let slow = [
        ("path", "/k8s"),
        ("roleArn", "arn:aws:iam::123456789012:role/slow-team"),
        ("region", "us-east-1"),
    ];
    let pod2 = PodSpec {
        name: "task-2",
        uid: "uid-2",
        ..POD
    };
    std::thread::scope(|scope| {
        let slow_publish = scope.spawn(|| {
            let target = node.target("uid-1", "secrets");
            let started = Instant::now();
            node.publish(request("vol-1", &target, &slow, &POD))
                .unwrap();
            started.elapsed()
        });
        std::thread::sleep(Duration::from_millis(500));
        let started = Instant::now();
        let target = node.target("uid-2", "secrets");
        node.publish(request("vol-2", &target, ATTRS, &pod2))
            .unwrap();
        let quick = started.elapsed();
        let slow = slow_publish.join().unwrap();
        eprintln!("a publish beside one waiting 3 s on STS took {quick:?} (that one {slow:?})");
        assert!(slow >= Duration::from_secs(3), "the gate delays: {slow:?}");
        assert!(
            quick < Duration::from_secs(2),
            "it waited on the other: {quick:?}"
        );
    });
}

/// kubelet (1.34, as the one-node cluster of scripts/k8s_e2e.sh showed)
/// asks for an inline volume as SINGLE_NODE_WRITER and passes the pod's
/// `readOnly: true` as `readonly`: published, and read-only all the same.
#[test]
fn an_inline_volume_as_kubelet_asks_for_it_is_published_read_only() {
    let Some((_moto, gate)) = setup() else { return };
    let node = Node::start(&gate, &[]);
    let target = node.target("uid-1", "secrets");
    let mut inline = request("csi-0123abcd", &target, ATTRS, &POD);
    inline.volume_capability.as_mut().unwrap().access_mode = Some(AccessMode {
        mode: Mode::SingleNodeWriter as i32,
    });
    node.publish(inline).unwrap();
    assert_serves_db(&target);
    assert!(std::fs::write(target.join("db"), "x").is_err(), "writable");
}

#[test]
fn a_pod_follows_its_volumes_change_stream() {
    let Some((moto, gate)) = setup() else { return };
    let node = Node::start(&gate, &[]);
    let target = node.publish_first_pod(SHORT_TTL_ATTRS);
    assert_serves_db(&target);
    // The daemon runs unprivileged and cannot open the stream's end itself:
    // the plugin opens it for it.
    let reader = Command::new("timeout")
        .args(["30", "head", "-n1"])
        .arg(target.join("@changes"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let rt = runtime();
    let ssm = client(&rt, &moto.endpoint);
    put(
        &rt,
        &ssm,
        "/k8s/db",
        "db-secret-2",
        ParameterType::SecureString,
    );
    let out = reader.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "db 2\n",
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issue 31: a target ending in `/` whose last component is a link out of
/// kubelet's pods directory, a link above the target, and a target in
/// another pod's directory were all published. The target is now resolved
/// once, below the pods directory, following no link, and mounted through
/// that resolution; unpublish goes the same way.
#[test]
fn a_target_is_resolved_once_without_links_and_only_in_its_pods_directory() {
    let Some((_moto, gate)) = setup() else { return };
    let node = Node::start(&gate, &[]);
    let outside = node.path("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let mounted_outside = || {
        ssmfs::csi::sys::mounts()
            .unwrap()
            .iter()
            .any(|m| m.mount_point.starts_with(&outside))
    };
    // 1. A trailing slash after a link to a directory outside.
    let target = node.target("uid-1", "secrets");
    std::os::unix::fs::symlink(&outside, &target).unwrap();
    let mut slash = request("vol-1", &target, ATTRS, &POD);
    slash.target_path.push('/');
    let status = node.publish(slash).unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("ends with /"), "{status:?}");
    assert!(!mounted_outside(), "mounted through the link");
    // 2. A link above the target: the volume's directory points outside.
    let volume_dir = target.parent().unwrap().to_path_buf();
    std::fs::remove_file(&target).unwrap();
    std::fs::remove_dir(&volume_dir).unwrap();
    std::os::unix::fs::symlink(&outside, &volume_dir).unwrap();
    let status = node
        .publish(request("vol-1", &target, ATTRS, &POD))
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("symlink"), "{status:?}");
    assert!(
        !mounted_outside(),
        "mounted through a link above the target"
    );
    assert!(
        !outside.join("mount").exists(),
        "created a directory outside"
    );
    // Unpublish does not follow it either: a mount there stays.
    std::fs::create_dir_all(outside.join("mount")).unwrap();
    let held = outside.join("mount");
    assert_eq!(
        run("mount", &["-t", "tmpfs", "tmpfs", held.to_str().unwrap()]).0,
        0
    );
    let status = node.unpublish("vol-1", &target).unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        ssmfs::daemon::is_mount_point(&held),
        "unmounted through a link"
    );
    let _ = ssmfs::daemon::lazy_unmount(&held);
    // 3. A target in another pod's directory than the request's pod.uid.
    let other = node.target("uid-2", "secrets");
    let mut stolen = request("vol-2", &other, ATTRS, &POD);
    stolen
        .volume_context
        .insert("csi.storage.k8s.io/pod.uid".into(), "uid-1".into());
    let status = node.publish(stolen).unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("uid-1"), "{status:?}");
    assert_eq!(node.all_mounts(), 0, "something was mounted");
    // The same request in its own pod's directory is published.
    node.publish(request("vol-2", &other, ATTRS, &POD)).unwrap();
    assert_serves_db(&other);
    node.unpublish("vol-2", &other).unwrap();
    assert!(!other.exists(), "the target was left");
}

/// Hostile bytes on the plugin's socket (issue 31): 1,000 connections of
/// garbage, cut prefaces, bad HPACK, lying frame lengths and header blocks
/// past the limits, 50 of them left open and silent; then kubelet's
/// publish is answered, the plugin lives, and its memory has not grown
/// with them.
#[test]
fn a_thousand_malformed_connections_leave_the_plugin_serving() {
    use rand::{Rng, SeedableRng};
    use std::io::Write;
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend([kind, flags]);
        out.extend(stream.to_be_bytes());
        out.extend(payload);
        out
    }
    fn rss_kib(pid: u32) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
    let Some((_moto, gate)) = setup() else { return };
    let mut node = Node::start(&gate, &[]);
    let pid = node.plugin.as_ref().unwrap().id();
    let socket = node.path("csi.sock");
    let mut rng = rand::rngs::StdRng::seed_from_u64(31);
    let settings = frame(0x4, 0, 0, &[]);
    let valid_block = fluke_hpack::Encoder::new().encode(vec![
        (&b":method"[..], &b"POST"[..]),
        (b":path", b"/csi.v1.Node/NodePublishVolume"),
        (b":authority", b"/var/lib/kubelet/plugins/x/csi.sock"),
    ]);
    // Warm up (the first connections allocate the runtime's pools), then measure.
    node.try_probe().unwrap();
    let rss_before = rss_kib(pid);
    let started = Instant::now();
    let mut open = Vec::new();
    let mut kinds = [0u32; 8];
    for n in 0..1000 {
        let random: Vec<u8> = (0..rng.gen_range(0..600)).map(|_| rng.gen()).collect();
        let kind = n % 8;
        kinds[kind] += 1;
        let wire: Vec<u8> = match kind {
            // Garbage from the first byte.
            0 => random,
            // A preface cut short.
            1 => PREFACE[..rng.gen_range(0..PREFACE.len())].to_vec(),
            // A header block of garbage.
            2 => [PREFACE, &settings, &frame(0x1, 0x5, 1, &random)].concat(),
            // HPACK integers that overflow, and an index past every table.
            3 => {
                let mut block = vec![0x1f];
                block.extend(std::iter::repeat_n(0xff, rng.gen_range(1..40)));
                block.extend([0x7f, 0xff, 0xff, 0xff, 0xff, 0x0f, 0xff, 0xff]);
                [PREFACE, &settings, &frame(0x1, 0x5, 1, &block)].concat()
            }
            // A frame length past what the server accepts.
            4 => {
                let mut lying = frame(0x1, 0x4, 1, &random);
                lying[..3].copy_from_slice(&[0xff, 0xff, 0xff]);
                [PREFACE, &settings, &lying].concat()
            }
            // A header block of CONTINUATIONs past the limit.
            5 => {
                let mut wire = [PREFACE, &settings, &frame(0x1, 0, 1, &valid_block)].concat();
                for _ in 0..6 {
                    wire.extend(frame(0x9, 0, 1, &vec![0x40; 16_000]));
                }
                wire
            }
            // A valid request's block cut anywhere, then the connection ends.
            6 => {
                let cut = rng.gen_range(0..valid_block.len());
                let whole = [PREFACE, &settings, &frame(0x1, 0x5, 1, &valid_block)].concat();
                whole[..PREFACE.len() + settings.len() + 9 + cut].to_vec()
            }
            // Nothing at all.
            _ => Vec::new(),
        };
        let mut stream = std::os::unix::net::UnixStream::connect(&socket)
            .unwrap_or_else(|e| panic!("connection {n} refused: {e}\n{}", node.log_text()));
        stream
            .set_write_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // The server may close first (a write then fails): what it read is enough.
        let _ = stream.write_all(&wire);
        if n % 20 == 0 {
            open.push(stream);
        }
    }
    let sent = started.elapsed();
    // kubelet's publish, with the 50 silent connections still open.
    let target = node.target("uid-1", "secrets");
    node.publish(request("vol-1", &target, ATTRS, &POD))
        .unwrap_or_else(|e| panic!("publish after the flood: {e}\n{}", node.log_text()));
    assert_serves_db(&target);
    assert!(
        node.plugin.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the plugin exited:\n{}",
        node.log_text()
    );
    drop(open);
    std::thread::sleep(Duration::from_millis(200));
    let rss_after = rss_kib(pid);
    eprintln!(
        "1,000 malformed connections ({kinds:?} of each kind) sent in {sent:?}; publish ok; \
         plugin RSS {rss_before} -> {rss_after} KiB"
    );
    assert!(
        rss_after < rss_before + 32 * 1024,
        "the plugin grew from {rss_before} to {rss_after} KiB"
    );
    assert!(sent < Duration::from_secs(20), "{sent:?}");
    assert_eq!(node.try_probe(), Some(true));
    // A panic in a connection's task would be caught by tokio and leave
    // the plugin up: only its log would tell.
    assert!(!node.log_text().contains("panicked"), "{}", node.log_text());
}

/// Connections to the plugin's stream socket that never send a request,
/// more than it serves at once (as the serving user or root may make
/// them): they are dropped after a few seconds, and a pod's `@changes`
/// opens and follows a rotation meanwhile. Before, each held its slot for
/// good and every stream of the node waited.
#[test]
fn silent_peers_on_the_stream_socket_do_not_hold_up_a_pods_changes() {
    let Some((moto, gate)) = setup() else { return };
    let node = Node::start(&gate, &[]);
    let target = node.publish_first_pod(SHORT_TTL_ATTRS);
    assert_serves_db(&target);
    // 32 slots, one more accepted and waiting for a slot, one in the
    // backlog (a 35th connect would wait for room in it).
    let socket = node.path("run").join("streams.sock");
    let silent: Vec<_> = (0..34)
        .map(|_| ssmfs::fd_link::connect(&socket).unwrap())
        .collect();
    let started = Instant::now();
    let reader = Command::new("timeout")
        .args(["30", "head", "-n1"])
        .arg(target.join("@changes"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // When the stream opens is not known here: a new version every second
    // until the reader has a line.
    let rt = runtime();
    let ssm = client(&rt, &moto.endpoint);
    let reader = std::thread::spawn(move || reader.wait_with_output());
    let mut n = 2;
    while !reader.is_finished() && started.elapsed() < Duration::from_secs(32) {
        put(
            &rt,
            &ssm,
            "/k8s/db",
            &format!("db-secret-{n}"),
            ParameterType::SecureString,
        );
        n += 1;
        std::thread::sleep(Duration::from_secs(1));
    }
    // Without a line, `head` may be stuck in the lookup of `@changes`
    // (uninterruptible once the daemon has it): fail without waiting for
    // it; the node's drop kills the daemon, which frees it.
    assert!(
        reader.is_finished(),
        "no change stream opened in {:?}:\n{}",
        started.elapsed(),
        node.log_text()
    );
    let out = reader.join().unwrap();
    drop(silent);
    let line = out
        .as_ref()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    eprintln!(
        "with 34 silent peers, a change line after {:?}: {line:?}",
        started.elapsed()
    );
    assert!(
        line.starts_with("db ") && line.ends_with('\n'),
        "no change line ({:?}):\n{}",
        out.map(|o| String::from_utf8_lossy(&o.stderr).to_string()),
        node.log_text()
    );
}
