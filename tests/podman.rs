//! The image under a real container runtime (Debian's podman with runc), laid
//! out as the DaemonSet's pod: a privileged plugin container, an
//! unprivileged serving container (`csi-serve`: uid 64721, no capabilities,
//! read-only root, no /dev/fuse), an rshared host directory standing in for
//! kubelet's, this test standing in for kubelet over the plugin's socket, and
//! a workload container that reads through the published target with rslave
//! propagation while the plugin container, then the serving container, are
//! restarted, and then both DaemonSets are updated at once: a surge serving
//! container takes every mount over and turns ready, the old one is
//! removed, and the plugin container is replaced. The image comes from
//! scripts/image.sh (scripts/test.sh builds it from the tests' binary).

#![allow(clippy::result_large_err)] // tonic::Status is what a CSI client gets

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use aws_sdk_ssm::types::ParameterType;
use ssmfs::csi::v1::identity_client::IdentityClient;
use ssmfs::csi::v1::node_client::NodeClient;
use ssmfs::csi::v1::ProbeRequest;
use support::csi::*;
use support::*;

const ULIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=20000:20000",
    "--ulimit",
    "nproc=4096:4096",
];

fn image() -> String {
    std::env::var("SSMFS_IMAGE")
        .unwrap_or_else(|_| format!("localhost/ssmfs:{}", env!("CARGO_PKG_VERSION")))
}

fn have_podman_and_image() -> bool {
    let podman = run("sh", &["-c", "command -v podman && command -v runc"]).0 == 0;
    require(podman, "podman and runc (scripts/setup.sh)")
        && require(
            run("podman", &["image", "exists", &image()]).0 == 0,
            &format!("the image {} (scripts/image.sh)", image()),
        )
}

fn podman(args: &[&str]) -> String {
    let (code, out, err) = run("podman", args);
    assert_eq!(code, 0, "podman {}: {err}", args.join(" "));
    out
}

/// Containers of one test, removed at the end whatever happens.
struct Pod {
    names: Vec<String>,
    dir: tempfile::TempDir,
}

impl Drop for Pod {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = run("podman", &["rm", "-f", "-t", "2", name]);
        }
        unmount_all_under(self.dir.path());
    }
}

#[test]
fn the_image_runs_with_no_network() {
    if !have_podman_and_image() {
        return;
    }
    let base = ["run", "--rm", "--runtime", "runc", "--network", "none"];
    let version = podman(&[&base[..], &ULIMITS, &[&image(), "--version"]].concat());
    assert!(version.starts_with("ssmfs "), "{version}");
    let help = podman(&[&base[..], &ULIMITS, &[&image(), "csi", "--help"]].concat());
    assert!(
        help.contains("--node-id") && help.contains("--external-serve"),
        "{help}"
    );
    let help = podman(&[&base[..], &ULIMITS, &[&image(), "csi-serve", "--help"]].concat());
    assert!(help.contains("--run-dir"), "{help}");
}

/// A workload image: busybox (Debian's static build) to read files with.
fn workload_image() -> String {
    let tag = "localhost/ssmfs-test-workload:1".to_string();
    if run("podman", &["image", "exists", &tag]).0 != 0 {
        let context = tempfile::tempdir().unwrap();
        std::fs::copy("/bin/busybox", context.path().join("busybox"))
            .expect("busybox-static (scripts/setup.sh)");
        std::fs::write(
            context.path().join("Containerfile"),
            "FROM scratch\nCOPY busybox /bin/busybox\nENTRYPOINT [\"/bin/busybox\"]\n",
        )
        .unwrap();
        podman(&[
            "build",
            "--runtime",
            "runc",
            "--network",
            "none",
            "-q",
            "-t",
            &tag,
            context.path().to_str().unwrap(),
        ]);
    }
    tag
}

/// Four readers in one container, for `seconds`: "reads failures wrong" each.
const READERS: &str = r#"
loop() {
  end=$(( $(busybox date +%s) + $1 )); reads=0; fail=0; wrong=0
  while [ "$(busybox date +%s)" -lt "$end" ]; do
    for pair in db:db-secret api:api-secret; do
      name=${pair%%:*}; want=${pair#*:}
      if got=$(busybox cat "/pod/volumes/kubernetes.io~csi/secrets/mount/$name" 2>/dev/null); then
        [ "$got" = "$want" ] || wrong=$((wrong+1))
      else
        fail=$((fail+1))
      fi
      reads=$((reads+1))
    done
  done
  echo "$reads $fail $wrong"
}
for i in 1 2 3 4; do loop "$SECONDS_TO_READ" > /dev/shm/out$i & done
wait
busybox cat /dev/shm/out*
"#;

#[test]
fn a_workload_reads_through_restarts_of_the_plugin_and_serving_containers() {
    if !have_fuse_and_moto() || !have_podman_and_image() {
        return;
    }
    let moto = Moto::start();
    let rt = runtime();
    let ssm = client(&rt, &moto.endpoint);
    put(
        &rt,
        &ssm,
        "/k8s/db",
        "db-secret",
        ParameterType::SecureString,
    );
    put(
        &rt,
        &ssm,
        "/k8s/api",
        "api-secret",
        ParameterType::SecureString,
    );
    let suffix = std::process::id().to_string();
    let dir = tempfile::tempdir().unwrap();
    let mut pod = Pod {
        names: Vec::new(),
        dir,
    };
    let root = pod.dir.path().to_path_buf();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    // kubelet's directory is shared, so mounts made in the plugin's
    // container reach the host and the workload.
    assert_eq!(
        run(
            "mount",
            &["--bind", root.to_str().unwrap(), root.to_str().unwrap()]
        )
        .0,
        0
    );
    assert_eq!(
        run("mount", &["--make-rshared", root.to_str().unwrap()]).0,
        0
    );
    for sub in ["kubelet/pods", "csi", "state", "run"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    let path = |sub: &str| root.join(sub).display().to_string();
    let aws: Vec<String> = aws_env()
        .into_iter()
        .flat_map(|(k, v)| ["-e".to_string(), format!("{k}={v}")])
        .chain(["-e".into(), format!("AWS_ENDPOINT_URL={}", moto.endpoint)])
        .collect();
    let aws: Vec<&str> = aws.iter().map(String::as_str).collect();
    let image = image();
    let plugin = format!("ssmfs-test-plugin-{suffix}");
    let serve = format!("ssmfs-test-serve-{suffix}");
    let surge = format!("ssmfs-test-serve-surge-{suffix}");
    let workload = format!("ssmfs-test-workload-{suffix}");
    pod.names = vec![
        plugin.clone(),
        serve.clone(),
        surge.clone(),
        workload.clone(),
    ];
    let root_volume = format!("{0}:{0}:rshared", root.display());
    let run_volume = format!("{}:/run/ssmfs-csi", path("run"));
    let pods_dir = path("kubelet/pods");
    let endpoint = format!("unix://{}/csi.sock", path("csi"));
    let state_dir = path("state");
    podman(
        &[
            &[
                "run",
                "-d",
                "--name",
                &plugin,
                "--runtime",
                "runc",
                "--network",
                "host",
                "--privileged",
                "--user",
                "0:0",
            ][..],
            &ULIMITS,
            &[
                "-v",
                &root_volume,
                "-v",
                &run_volume,
                "--device",
                "/dev/fuse",
                "-v",
                "/sys/fs/fuse/connections:/sys/fs/fuse/connections",
            ],
            &aws,
            &[
                "-e",
                "SSMFS_LOG=debug",
                &image,
                "csi",
                "--endpoint",
                &endpoint,
                "--node-id",
                "node-1",
                "--external-serve",
                "--pods-dir",
                &pods_dir,
                "--state-dir",
                &state_dir,
            ],
        ]
        .concat(),
    );
    // The serving DaemonSet's pod: unprivileged, the host's run directory,
    // its ready file in the container's own /tmp (podman's tmpfs under
    // --read-only; the DaemonSet uses an emptyDir).
    let start_serve = |name: &str| {
        podman(
            &[
                &[
                    "run",
                    "-d",
                    "--name",
                    name,
                    "--runtime",
                    "runc",
                    "--network",
                    "host",
                    // Root for an instant, able only to change its ids,
                    // as the chart runs it: it reads the link key, then
                    // becomes 64721.
                    "--user",
                    "0:0",
                    "--cap-drop",
                    "ALL",
                    "--cap-add",
                    "SETUID",
                    "--cap-add",
                    "SETGID",
                    "--security-opt",
                    "no-new-privileges",
                    "--read-only",
                ][..],
                &ULIMITS,
                &["-v", &run_volume],
                &aws,
                &[
                    "-e",
                    "SSMFS_LOG=info",
                    &image,
                    "csi-serve",
                    "--ready-file=/tmp/serving",
                ],
            ]
            .concat(),
        );
    };
    // What the serving pod's readiness probe runs, in its container.
    let serve_ready = |name: &str| {
        run(
            "podman",
            &[
                "exec",
                name,
                "/usr/bin/ssmfs",
                "csi-serve",
                "--check-ready",
                "--ready-file=/tmp/serving",
            ],
        )
        .0 == 0
    };
    start_serve(&serve);
    let socket = root.join("csi/csi.sock");
    let ready = || {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let probe = connect(&rt, socket.clone()).and_then(|channel| {
                rt.block_on(IdentityClient::new(channel).probe(ProbeRequest {}))
                    .ok()
            });
            if probe.is_some_and(|answer| answer.into_inner().ready == Some(true)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the plugin container never became ready:\n{}\n{}",
                run("podman", &["logs", &plugin]).2,
                run("podman", &["logs", &serve]).2
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    ready();
    let target_parent = root.join("kubelet/pods/uid-1/volumes/kubernetes.io~csi/secrets");
    std::fs::create_dir_all(&target_parent).unwrap();
    let target = target_parent.join("mount");
    let attrs = [
        ("path", "/k8s"),
        ("roleArn", ROLE),
        ("region", "us-east-1"),
        ("ttl", "1s"),
    ];
    let publish = || {
        let mut node = NodeClient::new(connect(&rt, socket.clone()).unwrap());
        rt.block_on(node.node_publish_volume(request("vol-1", &target, &attrs, &POD)))
            .map(|_| ())
    };
    publish().unwrap_or_else(|status| panic!("{status:?}\n{}", run("podman", &["logs", &serve]).2));
    assert_eq!(
        std::fs::read_to_string(target.join("db")).unwrap(),
        "db-secret",
        "seen from the host"
    );
    let workload_image = workload_image();
    let pod_volume = format!("{}:/pod:rslave", root.join("kubelet/pods/uid-1").display());
    podman(&[
        "run",
        "-d",
        "--name",
        &workload,
        "--runtime",
        "runc",
        "--network",
        "none",
        "--user",
        "0:0",
        ULIMITS[0],
        ULIMITS[1],
        ULIMITS[2],
        ULIMITS[3],
        "-v",
        &pod_volume,
        "-e",
        "SECONDS_TO_READ=24",
        &workload_image,
        "sh",
        "-c",
        READERS,
    ]);
    std::thread::sleep(Duration::from_secs(3));
    podman(&["restart", "-t", "10", &plugin]);
    ready();
    publish().expect("a republish to the restarted plugin");
    std::thread::sleep(Duration::from_secs(3));
    podman(&["restart", "-t", "10", &serve]);
    std::thread::sleep(Duration::from_secs(3));
    // Both DaemonSets updated at once: the serving pod surges (the new one
    // takes every mount over and turns ready, then the old one is deleted)
    // while the plugin's pod is replaced.
    let wait_ready = |name: &str| {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !serve_ready(name) {
            assert!(
                Instant::now() < deadline,
                "{name} never turned ready:\n{}\n{}",
                run("podman", &["logs", &plugin]).2,
                run("podman", &["logs", name]).2
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_ready(&serve);
    start_serve(&surge);
    wait_ready(&surge);
    assert!(
        !serve_ready(&serve),
        "both serving containers claim the mount"
    );
    podman(&["rm", "-f", "-t", "10", &serve]);
    podman(&["restart", "-t", "10", &plugin]);
    ready();
    publish().expect("a republish to the replaced plugin");
    assert_eq!(
        podman(&["inspect", "-f", "{{.State.Running}}", &workload]).trim(),
        "true",
        "the workload stopped reading before the updates ended"
    );
    podman(&["wait", &workload]);
    let out = podman(&["logs", &workload]);
    let (mut reads, mut failures, mut wrong) = (0u64, 0u64, 0u64);
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let numbers: Vec<u64> = line
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect();
        reads += numbers[0];
        failures += numbers[1];
        wrong += numbers[2];
    }
    let logs = format!(
        "{}\n{}",
        run("podman", &["logs", &plugin]).2,
        run("podman", &["logs", &surge]).2
    );
    assert!(reads > 100, "{reads} reads: {out}");
    assert_eq!(
        (failures, wrong),
        (0, 0),
        "reads failed across the restarts ({reads} reads)\n{logs}"
    );
    assert!(
        logs.contains("asked the kernel to resend"),
        "the serving container did not resume:\n{logs}"
    );
    assert!(
        !logs.contains(TOKEN) && !logs.contains("db-secret"),
        "a token or value reached the logs"
    );
    // The serving container's processes: not root, no capability.
    let top = podman(&["top", &surge, "user", "capeff", "args"]);
    assert!(top.lines().skip(1).all(|l| !l.starts_with("root")), "{top}");
    let _ = Path::new(&target);
}

#[test]
fn ssmfs_exec_is_a_containers_pid_1_and_restarts_its_child_on_a_rotation() {
    if !have_fuse_and_moto() || !have_podman_and_image() {
        return;
    }
    let ssm = Ssm::start(&[("/pid1/db", "v1")]);
    let mount = Mount::start(
        &ssm.moto.endpoint,
        "/pid1",
        &[
            "--ttl",
            "3s",
            "--allow-other",
            "--file-mode",
            "0444",
            "--dir-mode",
            "0555",
            "--allow-world-readable",
        ],
    );
    let name = format!("ssmfs-pid1-{}", std::process::id());
    let pod = Pod {
        names: vec![name.clone()],
        dir: tempfile::tempdir().unwrap(),
    };
    let volume = format!("{}:/secrets", mount.path().display());
    // The child: says which value it started with, exits 3 on SIGTERM.
    let child = "echo \"start $DB\"; trap 'exit 3' TERM; while true; do /bin/busybox sleep 1; done";
    podman(
        &[
            &[
                "run",
                "-d",
                "--name",
                &name,
                "--runtime",
                "runc",
                "--network",
                "none",
                "--user",
                "0",
            ][..],
            &ULIMITS,
            &[
                "-v",
                &volume,
                "-v",
                "/bin/busybox:/bin/busybox:ro",
                &image(),
            ],
            &[
                "exec",
                "--env",
                "DB=/secrets/db",
                "--on-change",
                "restart",
                "--grace",
                "5s",
            ],
            &["--", "/bin/busybox", "sh", "-c", child],
        ]
        .concat(),
    );
    let logs = || run("podman", &["logs", &name]);
    within(Duration::from_secs(20), "the child's start", || {
        logs().1.contains("start v1")
    });
    // ssmfs is PID 1: it forwards the stop, reaps, and exits with the child's code.
    let top = podman(&["top", &name, "pid", "comm"]);
    assert!(
        top.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["1", "ssmfs"]),
        "{top}"
    );
    ssm.put("/pid1/db", "v2");
    within(
        Duration::from_secs(20),
        "the restart with the new value",
        || logs().1.contains("start v2"),
    );
    let (_, out, err) = logs();
    assert_eq!(out.matches("start ").count(), 2, "one restart: {out}");
    assert!(
        !err.contains("v1") && !err.contains("v2"),
        "a value was logged: {err}"
    );
    podman(&["stop", "-t", "10", &name]);
    let code = podman(&["inspect", &name, "--format", "{{.State.ExitCode}}"]);
    assert_eq!(code.trim(), "3", "the child's exit code");
    drop(pod);
}
