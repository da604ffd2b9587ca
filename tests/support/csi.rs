//! The CSI side of the harness: a tonic client over the plugin's unix
//! socket, publish requests as kubelet makes them, and a gate in front of
//! moto that refuses one role and counts (tests/support/sts_gate.py).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ssmfs::csi::v1::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
use ssmfs::csi::v1::{NodePublishVolumeRequest, VolumeCapability};
use tonic::transport::Channel;

use super::run;

/// A channel to the CSI socket at `socket`, as kubelet opens one.
pub fn connect(rt: &tokio::runtime::Runtime, socket: PathBuf) -> Option<Channel> {
    rt.block_on(
        tonic::transport::Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let socket = socket.clone();
                // tonic's channel speaks hyper 1's IO traits.
                async move {
                    tokio::net::UnixStream::connect(socket)
                        .await
                        .map(hyper_util::rt::TokioIo::new)
                }
            })),
    )
    .ok()
}

pub const ROLE: &str = "arn:aws:iam::123456789012:role/airflow-workers";
/// The signature of every made-up service-account token (`token_for`): a
/// log that contains it leaked a token.
pub const TOKEN: &str = "made-up-service-account-token-signature";

/// A service-account token as kubelet passes it: a JWT whose subject is
/// the pod's service account (the plugin checks it; STS checks the rest).
pub fn token_for(namespace: &str, service_account: &str) -> String {
    use base64::Engine;
    let claims = serde_json::json!({
        "sub": format!("system:serviceaccount:{namespace}:{service_account}"),
        "aud": ["sts.amazonaws.com"],
    });
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("eyJhbGciOiJSUzI1NiJ9.{payload}.{TOKEN}")
}

pub struct Gate {
    child: Child,
    pub url: String,
}

impl Gate {
    pub fn start(upstream: &str) -> Gate {
        Self::with_pod_identity(upstream, &[])
    }

    /// A gate whose Pod Identity agent (`/v1/credentials`) hands credentials
    /// to tokens of these subjects (`system:serviceaccount:NS:SA`).
    pub fn with_pod_identity(upstream: &str, subjects: &[&str]) -> Gate {
        use std::io::BufRead;
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut child = Command::new(root.join(".venv/bin/python"))
            .arg(root.join("tests/support/sts_gate.py"))
            .arg(upstream)
            .args(subjects)
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the STS gate");
        let mut port = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut port)
            .unwrap();
        Gate {
            child,
            url: format!("http://127.0.0.1:{}", port.trim()),
        }
    }

    /// One of the gate's counts by name ("signed_by": calls by access key,
    /// "agent": Pod Identity requests by token subject).
    pub fn count_map(&self, what: &str) -> HashMap<String, u64> {
        let (code, body, _) = run("curl", &["-sf", &format!("{}/counts", self.url)]);
        assert_eq!(code, 0, "the gate's counts");
        let counts: serde_json::Value = serde_json::from_str(&body).unwrap();
        counts[what]
            .as_object()
            .unwrap()
            .iter()
            .map(|(name, n)| (name.clone(), n.as_u64().unwrap()))
            .collect()
    }

    /// (AssumeRoleWithWebIdentity calls by role, other calls).
    pub fn counts(&self) -> (HashMap<String, u64>, u64) {
        let (code, body, _) = run("curl", &["-sf", &format!("{}/counts", self.url)]);
        assert_eq!(code, 0, "the gate's counts");
        let counts: serde_json::Value = serde_json::from_str(&body).unwrap();
        let assume = counts["assume"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(role, n)| (role.clone(), n.as_u64().unwrap()))
            .collect();
        (assume, counts["other"].as_u64().unwrap())
    }

    pub fn ssm_calls(&self) -> u64 {
        std::thread::sleep(Duration::from_millis(50));
        self.counts().1
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy)]
pub struct PodSpec<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    pub service_account: &'a str,
    pub token: Option<&'a str>,
}

pub const POD: PodSpec<'static> = PodSpec {
    namespace: "airflow",
    name: "task-1",
    uid: "uid-1",
    service_account: "airflow-worker",
    token: Some(TOKEN),
};

pub fn request(
    volume: &str,
    target: &Path,
    attributes: &[(&str, &str)],
    pod: &PodSpec,
) -> NodePublishVolumeRequest {
    let mut context: HashMap<String, String> = attributes
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    // As kubelet sends it: the pod whose directory holds the target
    // (`PODS/<uid>/volumes/...`); a test of that rule edits the request.
    let components: Vec<String> = target
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let uid = components
        .iter()
        .position(|c| c == "volumes")
        .and_then(|at| at.checked_sub(1))
        .map_or(pod.uid, |at| components[at].as_str());
    for (key, value) in [
        ("csi.storage.k8s.io/pod.namespace", pod.namespace),
        ("csi.storage.k8s.io/pod.name", pod.name),
        ("csi.storage.k8s.io/pod.uid", uid),
        (
            "csi.storage.k8s.io/serviceAccount.name",
            pod.service_account,
        ),
        ("csi.storage.k8s.io/ephemeral", "true"),
    ] {
        context.insert(key.into(), value.into());
    }
    if let Some(token) = pod.token {
        // TOKEN stands for the pod's own token; anything else is sent as is.
        let token = match token {
            TOKEN => token_for(pod.namespace, pod.service_account),
            other => other.to_string(),
        };
        context.insert(
            "csi.storage.k8s.io/serviceAccount.tokens".into(),
            serde_json::json!({
                "sts.amazonaws.com": {"token": token, "expirationTimestamp": "2026-12-02T10:00:00Z"},
                "pods.eks.amazonaws.com": {"token": token, "expirationTimestamp": "2026-12-02T10:00:00Z"},
            })
            .to_string(),
        );
    }
    NodePublishVolumeRequest {
        volume_id: volume.into(),
        target_path: target.display().to_string(),
        volume_capability: Some(VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::MultiNodeReaderOnly as i32,
            }),
            access_type: Some(AccessType::Mount(MountVolume::default())),
        }),
        readonly: true,
        volume_context: context,
        ..Default::default()
    }
}

/// Unmounts every mount below `root`, deepest first (a test's leftovers).
pub fn unmount_all_under(root: &Path) {
    let mut mounts: Vec<PathBuf> = ssmfs::csi::sys::mounts()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.mount_point.starts_with(root))
        .map(|m| m.mount_point)
        .collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    for mount in mounts {
        let _ = ssmfs::daemon::lazy_unmount(&mount);
    }
}
