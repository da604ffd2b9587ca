//! Unit tests of `policy`, apart so the module reads as its model.

use super::*;
use crate::csi::v1::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
use crate::csi::v1::VolumeCapability;
use proptest::prelude::*;
use std::collections::HashMap;
use std::time::Duration;

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn class(pairs: &[(&str, &str)], open: Option<&[&str]>) -> Class {
    Class {
        attributes: map(pairs),
        open: open.map(|names| names.iter().map(|n| n.to_string()).collect()),
    }
}

const PODS: &str = "/var/lib/kubelet/pods";

/// A JWT whose subject is the pod's service account (unsigned: the
/// plugin only compares the subject; STS checks the signature).
fn token(namespace: &str, service_account: &str) -> String {
    use base64::Engine;
    let claims =
        serde_json::json!({"sub": format!("system:serviceaccount:{namespace}:{service_account}")});
    let encode = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    format!("{}.{}.sig", encode("{}"), encode(&claims.to_string()))
}

/// A request as kubelet sends it for pod `uid` of `namespace`.
fn request(namespace: &str, uid: &str, attributes: &[(&str, &str)]) -> NodePublishVolumeRequest {
    let mut context: HashMap<String, String> = attributes
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let tokens = serde_json::json!({
        "sts.amazonaws.com": {"token": token(namespace, "worker")},
        "pods.eks.amazonaws.com": {"token": token(namespace, "worker")},
    });
    for (key, value) in [
        ("pod.namespace", namespace.to_string()),
        ("pod.name", format!("pod-{uid}")),
        ("pod.uid", uid.to_string()),
        ("serviceAccount.name", "worker".to_string()),
        ("serviceAccount.tokens", tokens.to_string()),
    ] {
        context.insert(format!("csi.storage.k8s.io/{key}"), value);
    }
    NodePublishVolumeRequest {
        volume_id: "vol".into(),
        target_path: format!("{PODS}/{uid}/volumes/kubernetes.io~csi/secrets/mount"),
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

/// The admin's policy of the tests: a class that grants the node's
/// credentials (with ttl open), one that does not, and namespace ops
/// allowed the node's credentials itself.
fn policy() -> Policy {
    Policy {
        classes: [
            (
                "shared".to_string(),
                class(
                    &[
                        ("path", "/shared"),
                        ("useNodeIdentity", "true"),
                        ("region", "eu-west-1"),
                    ],
                    Some(&["ttl"]),
                ),
            ),
            (
                "closed".to_string(),
                class(&[("path", "/shared"), ("useNodeIdentity", "true")], None),
            ),
            (
                "airflow".to_string(),
                class(&[("airflowKwargs", "{}"), ("uid", "50000")], None),
            ),
        ]
        .into_iter()
        .collect(),
        node_identity_namespaces: ["ops".to_string()].into_iter().collect(),
        key_salt: b"salt".to_vec(),
        ..Policy::default()
    }
}

const ROLE: &str = "arn:aws:iam::123456789012:role/team";

#[test]
fn a_class_is_fixed_and_a_volume_wins_over_the_defaults() {
    let policy = Policy {
        defaults: map(&[("region", "eu-west-1"), ("ttl", "5m"), ("path", "/shared")]),
        classes: [(
            "airflow".to_string(),
            class(
                &[("airflowKwargs", "{}"), ("ttl", "1m"), ("uid", "50000")],
                None,
            ),
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    };
    let merged = policy
        .apply(map(&[("class", "airflow"), ("gid", "1000")]))
        .unwrap();
    assert_eq!(
        merged,
        map(&[
            ("region", "eu-west-1"),
            ("ttl", "1m"),
            ("airflowKwargs", "{}"),
            ("uid", "50000"),
            ("gid", "1000")
        ]),
        "the class's airflowKwargs drops the defaults' path"
    );
    let fixed = policy
        .apply(map(&[("class", "airflow"), ("uid", "1000")]))
        .unwrap_err();
    assert!(fixed.to_string().contains("uid"), "{fixed}");
    let own_path = policy.apply(map(&[("path", "/mine")])).unwrap();
    assert_eq!(own_path.get("path").map(String::as_str), Some("/mine"));
    assert_eq!(own_path.get("ttl").map(String::as_str), Some("5m"));
    let unknown = policy.apply(map(&[("class", "nope")])).unwrap_err();
    assert!(unknown.to_string().contains("airflow"), "{unknown}");
}

#[test]
fn a_class_with_the_node_credentials_opens_only_what_it_lists() {
    let policy = policy();
    // Issue 31's finding: region (or maxTps, eventsTopic) added to a
    // node-credentials class that does not set it was accepted.
    for (name, value) in [
        ("region", "us-east-1"),
        ("maxTps", "1000"),
        ("eventsTopic", "arn:aws:sns:us-east-1:999999999999:t"),
        ("staleTtl", "1h"),
    ] {
        for class_name in ["shared", "closed"] {
            let error = admit(
                &request("team-a", "u1", &[("class", class_name), (name, value)]),
                &policy,
                &Counts::default(),
            )
            .err()
            .unwrap_or_else(|| panic!("{name} was accepted in class {class_name}"));
            assert!(
                matches!(error, CsiError::PermissionDenied(_)) && error.to_string().contains(name),
                "{error}"
            );
        }
    }
    // What the class opens, a volume may set.
    let decision = admit(
        &request("team-a", "u1", &[("class", "shared"), ("ttl", "1m")]),
        &policy,
        &Counts::default(),
    )
    .unwrap();
    assert_eq!(decision.publish.identity, Identity::Node);
    assert_eq!(decision.publish.options["region"], "eu-west-1");
    assert_eq!(decision.publish.options["ttl"], "1m");
    assert_eq!(decision.room, Room::Free);
}

#[test]
fn classes_json_names_only_volume_attributes_and_opens_no_identity() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    write("defaults.json", r#"{"region": "us-east-1"}"#);
    write(
        "classes.json",
        r#"{"a": {"ttl": "1m", "openAttributes": "uid, gid"}}"#,
    );
    let (_, classes) = load_attributes(dir.path()).unwrap();
    assert_eq!(classes["a"].attributes["ttl"], "1m");
    assert_eq!(
        classes["a"].open,
        Some(["gid".to_string(), "uid".to_string()].into_iter().collect())
    );
    for (text, named) in [
        (r#"{"a": {"colour": "blue"}}"#, "colour"),
        (r#"{"a": {"openAttributes": "colour"}}"#, "colour"),
        (
            r#"{"open": {"useNodeIdentity": "true", "region": "eu-west-1"}}"#,
            "path or airflowKwargs",
        ),
        (
            r#"{"n": {"useNodeIdentity": "true", "path": "/p", "openAttributes": "ttl,path"}}"#,
            "may not open path",
        ),
    ] {
        write("classes.json", text);
        let error = load_attributes(dir.path()).unwrap_err();
        assert!(error.contains(named), "{error}");
    }
    write("classes.json", "{}");
    write("defaults.json", r#"{"useNodeIdentity": "true"}"#);
    assert!(load_attributes(dir.path())
        .unwrap_err()
        .contains("useNodeIdentity"));
    assert!(load_attributes(Path::new("/nonexistent"))
        .unwrap()
        .0
        .is_empty());
}

#[test]
fn a_target_is_refused_with_a_trailing_slash_outside_the_pods_or_in_another_pods_directory() {
    let pods = Path::new(PODS);
    for bad in [
        format!("{PODS}/u1/volumes/kubernetes.io~csi/secrets/mount/"),
        format!("{PODS}/u1/../u2/volumes/x/mount"),
        PODS.to_string(),
        "/etc/mount".to_string(),
        "relative/mount".to_string(),
        String::new(),
    ] {
        assert!(check_target(&bad, pods).is_err(), "{bad:?} was accepted");
    }
    let good = format!("{PODS}/u1/volumes/kubernetes.io~csi/secrets/mount");
    let target = check_target(&good, pods).unwrap();
    assert_eq!(target_pod_uid(&target, pods), Some("u1"));
    // Issue 31's finding: a target in another pod's directory was published.
    let mut other_pod = request("team-a", "u1", &[("path", "/p"), ("roleArn", ROLE)]);
    other_pod.target_path = format!("{PODS}/u2/volumes/kubernetes.io~csi/secrets/mount");
    let error = admit(&other_pod, &policy(), &Counts::default())
        .err()
        .unwrap();
    assert!(matches!(error, CsiError::PermissionDenied(_)), "{error}");
    assert!(error.to_string().contains("u1"), "{error}");
    // Pod information in part (a tenant's own attributes) is refused.
    let mut partial = request("ops", "u1", &[("path", "/p"), ("useNodeIdentity", "true")]);
    partial.volume_context.remove("csi.storage.k8s.io/pod.uid");
    let error = admit(&partial, &policy(), &Counts::default())
        .err()
        .unwrap();
    assert!(error.to_string().contains("pod.uid"), "{error}");
}

fn held(key: &str, namespace: &str, ttl: &str, idle: Option<u64>) -> Held {
    let base = Instant::now();
    Held {
        name: key.into(),
        key: key.into(),
        namespace: namespace.into(),
        identity: Identity::Node,
        options: map(&[("path", "/p"), ("ttl", ttl)]),
        idle_since: idle.map(|secs| base + Duration::from_secs(secs)),
        live: true,
    }
}

fn source(ttl: &str) -> String {
    source_of(&Identity::Node, &map(&[("path", "/p"), ("ttl", ttl)]))
}

#[test]
fn tuning_variants_of_one_source_are_capped() {
    let caps = Caps {
        per_namespace: 8,
        node: 64,
        variants: 2,
    };
    let counts = Counts {
        mounts: vec![held("a", "team", "1s", None), held("b", "team", "2s", None)],
        ..Default::default()
    };
    assert_eq!(source("1s"), source("3s"), "ttl only tunes");
    let error = room("team", &source("3s"), &counts, &caps).unwrap_err();
    assert!(
        error.to_string().contains("--max-variants-per-source"),
        "{error}"
    );
    // Another namespace's variants are its own.
    assert_eq!(
        room("other", &source("3s"), &counts, &caps).unwrap(),
        Room::Free
    );
    // An idle variant makes room.
    let counts = Counts {
        mounts: vec![
            held("a", "team", "1s", Some(5)),
            held("b", "team", "2s", None),
        ],
        ..Default::default()
    };
    assert_eq!(
        room("team", &source("3s"), &counts, &caps).unwrap(),
        Room::Evict(vec!["a".into()])
    );
}

#[test]
fn a_full_node_is_shared_fairly() {
    let caps = Caps {
        per_namespace: 3,
        node: 4,
        variants: 8,
    };
    // Issue 31's finding: two namespaces of one team fill the node.
    let full = Counts {
        mounts: vec![
            held("a1", "team-a", "1s", None),
            held("a2", "team-a", "2s", Some(10)),
            held("a3", "team-a", "3s", Some(5)),
            held("b1", "team-b", "1s", None),
        ],
        ..Default::default()
    };
    // A newcomer under its share takes the largest holder's longest idle.
    assert_eq!(
        room("team-c", &source("1s"), &full, &caps).unwrap(),
        Room::Evict(vec!["a3".into()])
    );
    // With nothing idle, a namespace's first mount still goes in.
    let busy = Counts {
        mounts: full
            .mounts
            .iter()
            .map(|m| Held {
                idle_since: None,
                ..m.clone()
            })
            .collect(),
        ..Default::default()
    };
    assert_eq!(
        room("team-c", &source("1s"), &busy, &caps).unwrap(),
        Room::Free
    );
    // Its second waits for its share, and the largest holder cannot grow.
    let mut with_c = busy.clone();
    with_c.mounts.push(held("c1", "team-c", "1s", None));
    let error = room("team-c", &source("2s"), &with_c, &caps).unwrap_err();
    assert!(error.to_string().contains("--max-mounts"), "{error}");
    let error = room("team-a", &source("9s"), &busy, &caps).unwrap_err();
    assert!(matches!(error, CsiError::ResourceExhausted(_)), "{error}");
    // A namespace at its share evicts only its own idle mounts.
    assert_eq!(
        room("team-a", &source("9s"), &full, &caps).unwrap(),
        Room::Evict(vec!["a3".into()])
    );
    assert!(room("team-b", &source("9s"), &busy, &caps).is_err());
}

fn attribute() -> impl Strategy<Value = (String, String)> {
    let names: Vec<String> = ATTRIBUTES
        .iter()
        .map(|(name, _)| name.to_string())
        .chain(["class", "csi.storage.k8s.io/pod.namespace", "colour"].map(String::from))
        .collect();
    let values = prop_oneof![
        Just("true".to_string()),
        Just("shared".to_string()),
        Just("closed".to_string()),
        Just("/p".to_string()),
        Just(ROLE.to_string()),
        Just("eu-west-1".to_string()),
        Just("1m".to_string()),
        Just(r#"{"endpoint_url": "http://x"}"#.to_string()),
        Just(r#"{"variables_prefix": "/v"}"#.to_string()),
        ".{0,12}",
    ];
    (proptest::sample::select(names), values)
}

fn any_counts() -> impl Strategy<Value = Counts> {
    let mount = (0..4usize, 0..3usize, proptest::option::of(0..100u64));
    proptest::collection::vec(mount, 0..12).prop_map(|mounts| Counts {
        mounts: mounts
            .into_iter()
            .enumerate()
            .map(|(i, (ns, ttl, idle))| {
                held(
                    &format!("k{i}"),
                    &format!("ns{ns}"),
                    &format!("{ttl}s"),
                    idle,
                )
            })
            .collect(),
        ..Default::default()
    })
}

proptest! {
    /// For any attributes a tenant writes: the node's credentials only
    /// through a class or an allowed namespace, no role or endpoint
    /// where the admin fixed one, a node-credentials class's attributes
    /// unchanged, and one line of refusal otherwise.
    #[test]
    fn no_attributes_get_around_the_admins_policy(
        attributes in proptest::collection::vec(attribute(), 0..6),
        namespace in prop_oneof![Just("ops"), Just("team-a")],
    ) {
        let policy = policy();
        let pairs: Vec<(&str, &str)> =
            attributes.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let own: BTreeMap<&str, &str> = pairs.iter().copied().collect();
        match admit(&request(namespace, "u1", &pairs), &policy, &Counts::default()) {
            Ok(decision) => {
                let publish = &decision.publish;
                let class = own.get("class").and_then(|name| policy.classes.get(*name));
                if publish.identity == Identity::Node {
                    let granted = class.is_some_and(Class::grants_node_identity)
                        || namespace == "ops";
                    prop_assert!(granted, "the node's credentials for {own:?}");
                }
                if let Some(class) = class.filter(|c| c.grants_node_identity()) {
                    let open = class.open.clone().unwrap_or_default();
                    for (name, value) in &publish.options {
                        if !open.contains(name) {
                            let admin = class.attributes.get(name).or(policy.defaults.get(name));
                            prop_assert_eq!(Some(value), admin, "{} changed", name);
                        }
                    }
                }
                if let Some(kwargs) = publish.options.get("airflowKwargs") {
                    prop_assert!(!kwargs.contains("endpoint_url"), "{}", kwargs);
                }
            }
            Err(error) => {
                let text = error.to_string();
                prop_assert!(!text.contains('\n') && !text.is_empty(), "{text:?}");
            }
        }
    }

    /// For any node: what `room` allows keeps every cap, or is a
    /// namespace's first mount while another is over its fair share.
    #[test]
    fn the_caps_hold_for_any_node(
        counts in any_counts(),
        namespace in 0..5usize,
        ttl in 0..4usize,
        per_namespace in 1..5usize,
        node in 1..10usize,
        variants in 1..3usize,
    ) {
        let caps = Caps { per_namespace, node, variants };
        let namespace = format!("ns{namespace}");
        let source = source(&format!("{ttl}s"));
        if let Ok(room) = room(&namespace, &source, &counts, &caps) {
            let evicted = match &room {
                Room::Evict(keys) => keys.clone(),
                _ => Vec::new(),
            };
            let after: Vec<&Held> =
                counts.mounts.iter().filter(|m| !evicted.contains(&m.name)).collect();
            for key in &evicted {
                let mount = counts.mounts.iter().find(|m| &m.name == key).unwrap();
                prop_assert!(mount.idle_since.is_some(), "evicted a busy mount");
            }
            let own = after.iter().filter(|m| m.namespace == namespace).count();
            let variants_after = after
                .iter()
                .filter(|m| m.namespace == namespace && m.source() == source)
                .count();
            prop_assert!(own < per_namespace, "namespace cap");
            prop_assert!(variants_after < variants, "variant cap");
            if after.len() >= node {
                let mut per: BTreeMap<&str, usize> = BTreeMap::new();
                for m in &counts.mounts {
                    *per.entry(m.namespace.as_str()).or_default() += 1;
                }
                let namespaces = per.len() + usize::from(!per.contains_key(namespace.as_str()));
                let fair = (node / namespaces).max(1);
                prop_assert_eq!(own, 0, "over the node cap for a namespace's second mount");
                prop_assert!(per.values().any(|c| *c > fair), "over the node cap while all are fair");
            }
        }
    }
}
