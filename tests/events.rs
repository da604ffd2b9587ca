//! Change events end to end: the real `ssmfs` binary with `--ttl 1h`, a real
//! FUSE mount, moto's SSM on one loopback server and moto's SQS, SNS and
//! EventBridge on another (so SSM calls are counted alone, and the queue can
//! go down while SSM stays up). moto's SSM emits no events, so the tests put
//! them the way EventBridge would: `PutEvents` with source `aws.ssm` through a
//! rule that targets the queue, or a publish to the SNS topic.

mod support;

use std::path::Path;
use std::time::{Duration, SystemTime};

use aws_sdk_ssm::types::ParameterType;
use support::*;

const QUEUE: &str = "ssm-changes";

/// moto's SQS, SNS and EventBridge, with a queue that an EventBridge rule
/// for SSM's change events targets.
struct EventBus {
    moto: Moto,
    rt: tokio::runtime::Runtime,
    sqs: aws_sdk_sqs::Client,
    sns: aws_sdk_sns::Client,
    bridge: aws_sdk_eventbridge::Client,
    queue_url: String,
}

fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(
            aws_credential_types::provider::SharedCredentialsProvider::new(
                aws_credential_types::Credentials::new("testing", "testing", None, None, "test"),
            ),
        )
        .endpoint_url(endpoint)
        .build()
}

impl EventBus {
    fn start() -> EventBus {
        let moto = Moto::start();
        let rt = runtime();
        let config = sdk_config(&moto.endpoint);
        let bus = {
            let _guard = rt.enter();
            EventBus {
                sqs: aws_sdk_sqs::Client::new(&config),
                sns: aws_sdk_sns::Client::new(&config),
                bridge: aws_sdk_eventbridge::Client::new(&config),
                queue_url: String::new(),
                moto,
                rt,
            }
        };
        bus.with_queue()
    }

    /// Creates the queue and the rule (again, after a restart of moto).
    fn with_queue(mut self) -> EventBus {
        let (sqs, bridge) = (self.sqs.clone(), self.bridge.clone());
        self.queue_url = self.rt.block_on(async move {
            let url = sqs
                .create_queue()
                .queue_name(QUEUE)
                .send()
                .await
                .unwrap()
                .queue_url
                .unwrap();
            bridge
                .put_rule()
                .name("ssm-parameter-changes")
                .event_pattern(r#"{"source":["aws.ssm"],"detail-type":["Parameter Store Change"]}"#)
                .send()
                .await
                .unwrap();
            let target = aws_sdk_eventbridge::types::Target::builder()
                .id("queue")
                .arn(format!("arn:aws:sqs:us-east-1:123456789012:{QUEUE}"))
                .build()
                .unwrap();
            bridge
                .put_targets()
                .rule("ssm-parameter-changes")
                .targets(target)
                .send()
                .await
                .unwrap();
            url
        });
        self
    }

    /// Where ssmfs finds SQS and SNS: this server (SSM stays on its own).
    fn env(&self) -> [(&'static str, &str); 2] {
        [
            ("AWS_ENDPOINT_URL_SQS", self.moto.endpoint.as_str()),
            ("AWS_ENDPOINT_URL_SNS", self.moto.endpoint.as_str()),
        ]
    }

    /// `ssmfs ARGS` against `ssm`, its events from this server.
    fn mount(&self, ssm: &Moto, args: &[&str]) -> Mount {
        Mount::start_with(&ssm.endpoint, args, &self.env())
    }

    /// What EventBridge puts on the bus when SSM changes `name`.
    fn put_event(&self, name: &str, operation: &str, time: SystemTime) {
        let entry = aws_sdk_eventbridge::types::PutEventsRequestEntry::builder()
            .source("aws.ssm")
            .detail_type("Parameter Store Change")
            .detail(
                serde_json::json!({"name": name, "type": "String", "operation": operation})
                    .to_string(),
            )
            .resources(format!(
                "arn:aws:ssm:us-east-1:123456789012:parameter{name}"
            ))
            .time(aws_smithy_types::DateTime::from(time))
            .build();
        let out = self
            .rt
            .block_on(self.bridge.put_events().entries(entry).send())
            .unwrap();
        assert_eq!(out.failed_entry_count, 0);
    }

    /// A message straight onto the queue (a redelivery, or garbage).
    fn send_raw(&self, body: &str) {
        self.rt
            .block_on(
                self.sqs
                    .send_message()
                    .queue_url(&self.queue_url)
                    .message_body(body)
                    .send(),
            )
            .unwrap();
    }

    /// The SNS topic that carries the events to topic-mode hosts.
    fn create_topic(&self) -> String {
        self.rt
            .block_on(self.sns.create_topic().name("ssm-changes").send())
            .unwrap()
            .topic_arn
            .unwrap()
    }

    fn queue_urls(&self) -> Vec<String> {
        self.rt
            .block_on(self.sqs.list_queues().queue_name_prefix("ssmfs-").send())
            .unwrap()
            .queue_urls
            .unwrap_or_default()
    }

    fn subscriptions(&self, topic: &str) -> Vec<aws_sdk_sns::types::Subscription> {
        self.rt
            .block_on(
                self.sns
                    .list_subscriptions_by_topic()
                    .topic_arn(topic)
                    .send(),
            )
            .unwrap()
            .subscriptions
            .unwrap_or_default()
    }
}

/// SSM on a server of its own (so its calls are counted alone), a client
/// to seed it, and the event bus on another server.
fn ssm_and_bus() -> (Moto, EventBus, tokio::runtime::Runtime, aws_sdk_ssm::Client) {
    let ssm = Moto::start();
    let bus = EventBus::start();
    let rt = runtime();
    let client = client(&rt, &ssm.endpoint);
    (ssm, bus, rt, client)
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn metric(addr: &str, name: &str) -> f64 {
    let (code, body, _) = run("curl", &["-sf", &format!("http://{addr}/metrics")]);
    assert_eq!(code, 0);
    body.lines()
        .filter(|l| l.starts_with(name))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

fn ls(dir: &Path) -> Vec<String> {
    let (code, out, err) = run("ls", &[dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    out.lines().map(str::to_string).collect()
}

#[test]
fn updates_creates_and_deletes_show_within_two_seconds_at_one_call_each() {
    if !have_fuse_and_moto() {
        return;
    }
    let (ssm, bus, rt, client) = ssm_and_bus();
    put(
        &rt,
        &client,
        "/ev/app/db",
        "v1",
        ParameterType::SecureString,
    );
    put(&rt, &client, "/ev/app/old", "going", ParameterType::String);
    let mount = bus.mount(
        &ssm,
        &["--ttl", "1h", "--events-queue", &bus.queue_url, "/ev"],
    );
    let app = mount.path().join("app");
    assert_eq!(read(&app.join("db")).as_deref(), Some("v1"));
    assert_eq!(ls(&app), ["db", "old"]);
    let mut file = std::fs::File::open(app.join("db")).unwrap();

    // Update: the next read is the new value; the open file sees it whole.
    put(
        &rt,
        &client,
        "/ev/app/db",
        "v2-rotated",
        ParameterType::SecureString,
    );
    let base_after_put = ssm.requests();
    bus.put_event("/ev/app/db", "Update", SystemTime::now());
    let took = within(Duration::from_secs(2), "the update", || {
        read(&app.join("db")).as_deref() == Some("v2-rotated")
    });
    eprintln!("update visible after {took:?}");
    let mut through_open = String::new();
    std::io::Read::read_to_string(&mut file, &mut through_open).unwrap();
    assert!(
        through_open == "v1" || through_open == "v2-rotated",
        "{through_open:?}"
    );
    assert_eq!(ssm.requests() - base_after_put, 1, "one SSM call");

    // Create: `ls` shows it without waiting for the hour-long TTL.
    put(&rt, &client, "/ev/app/new", "fresh", ParameterType::String);
    let base = ssm.requests();
    bus.put_event("/ev/app/new", "Create", SystemTime::now());
    let took = within(Duration::from_secs(2), "the create", || {
        ls(&app).contains(&"new".to_string())
    });
    eprintln!("create visible after {took:?}");
    assert_eq!(read(&app.join("new")).as_deref(), Some("fresh"));
    assert_eq!(ssm.requests() - base, 1, "one SSM call");

    // Delete: ENOENT at once, gone from `ls`.
    rt.block_on(client.delete_parameter().name("/ev/app/old").send())
        .unwrap();
    let base = ssm.requests();
    bus.put_event("/ev/app/old", "Delete", SystemTime::now());
    let took = within(Duration::from_secs(2), "the delete", || {
        std::fs::metadata(app.join("old")).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
    });
    eprintln!("delete visible after {took:?}");
    assert_eq!(ls(&app), ["db", "new"]);
    assert_eq!(ssm.requests() - base, 1, "one SSM call");
}

#[test]
fn redelivered_late_foreign_and_malformed_events_cost_no_ssm_call() {
    if !have_fuse_and_moto() {
        return;
    }
    let (ssm, bus, rt, client) = ssm_and_bus();
    put(&rt, &client, "/dup/key", "one", ParameterType::String);
    put(&rt, &client, "/elsewhere/key", "x", ParameterType::String);
    let addr = format!("127.0.0.1:{}", free_loopback_port());
    let mount = bus.mount(
        &ssm,
        &[
            "--ttl",
            "1h",
            "--events-queue",
            &bus.queue_url,
            "--metrics-addr",
            &addr,
            "/dup",
        ],
    );
    let key = mount.path().join("key");
    assert_eq!(read(&key).as_deref(), Some("one"));
    put(&rt, &client, "/dup/key", "two", ParameterType::String);
    let update = ssmfs::events::event_json("/dup/key", "Update", SystemTime::now());
    bus.send_raw(&update);
    within(Duration::from_secs(2), "the update", || {
        read(&key).as_deref() == Some("two")
    });
    let base = ssm.requests();
    // SQS redelivers the same message; an old change arrives late; another
    // prefix; a moved label; garbage.
    bus.send_raw(&update);
    bus.put_event(
        "/dup/key",
        "Update",
        SystemTime::now() - Duration::from_secs(120),
    );
    bus.put_event("/elsewhere/key", "Update", SystemTime::now());
    bus.put_event("/dup/key", "LabelParameterVersion", SystemTime::now());
    bus.send_raw("this is not an event");
    within(Duration::from_secs(5), "six messages received", || {
        metric(&addr, "ssmfs_events_received_total") >= 6.0
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ssm.requests(), base, "no SSM call for any of them");
    assert_eq!(read(&key).as_deref(), Some("two"));
    assert_eq!(metric(&addr, "ssmfs_events_applied_total"), 1.0);
    assert_eq!(metric(&addr, "ssmfs_events_ignored_total"), 4.0);
    assert_eq!(metric(&addr, "ssmfs_events_malformed_total"), 1.0);
    assert_eq!(metric(&addr, "ssmfs_event_lag_seconds_count"), 1.0);
    let log = mount.log_text();
    assert_eq!(
        log.matches("not a parameter change event").count(),
        1,
        "{log}"
    );
    let queued = rt
        .block_on(
            bus.sqs
                .get_queue_attributes()
                .queue_url(&bus.queue_url)
                .attribute_names(
                    aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages,
                )
                .send(),
        )
        .unwrap();
    let left = queued
        .attributes
        .unwrap()
        .remove(&aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages);
    assert_eq!(left.as_deref(), Some("0"), "every message deleted");
}

#[test]
fn a_queue_outage_keeps_reads_working_and_events_resume_after_it() {
    if !have_fuse_and_moto() {
        return;
    }
    let (ssm, mut bus, rt, client) = ssm_and_bus();
    put(&rt, &client, "/qd/key", "one", ParameterType::String);
    let mount = bus.mount(
        &ssm,
        &["--ttl", "1h", "--events-queue", &bus.queue_url, "/qd"],
    );
    let key = mount.path().join("key");
    assert_eq!(read(&key).as_deref(), Some("one"));
    bus.moto.stop();
    within(Duration::from_secs(30), "the outage logged", || {
        mount.log_text().contains("the event queue does not answer")
    });
    for _ in 0..20 {
        assert_eq!(read(&key).as_deref(), Some("one"), "reads go on");
    }
    // Back (moto restarts empty: the queue and rule are made again).
    bus.moto.restart();
    let bus = bus.with_queue();
    put(&rt, &client, "/qd/key", "two", ParameterType::String);
    bus.put_event("/qd/key", "Update", SystemTime::now());
    within(Duration::from_secs(40), "events resumed", || {
        read(&key).as_deref() == Some("two")
    });
    assert!(mount.log_text().contains("change events resumed"));
}

#[test]
fn topic_mode_makes_uses_and_removes_its_queue_and_reaps_one_left_by_a_kill() {
    if !have_fuse_and_moto() {
        return;
    }
    let (ssm, bus, rt, client) = ssm_and_bus();
    put(&rt, &client, "/tp/key", "one", ParameterType::String);
    let topic = bus.create_topic();
    let publish = |name: &str| {
        let message = ssmfs::events::event_json(name, "Update", SystemTime::now());
        rt.block_on(bus.sns.publish().topic_arn(&topic).message(message).send())
            .unwrap();
    };
    let args = ["--ttl", "1h", "--events-topic", topic.as_str(), "/tp"];
    let mut mount = bus.mount(&ssm, &args);
    let first_queue = bus.queue_urls();
    assert_eq!(first_queue.len(), 1, "{first_queue:?}");
    let subscriptions = bus.subscriptions(&topic);
    assert_eq!(subscriptions.len(), 1);
    let key = mount.path().join("key");
    assert_eq!(read(&key).as_deref(), Some("one"));
    put(&rt, &client, "/tp/key", "two", ParameterType::String);
    let base = ssm.requests();
    publish("/elsewhere/key"); // not below /tp/: the subscription's filter drops it
    publish("/tp/key");
    within(
        Duration::from_secs(2),
        "the update through the topic",
        || read(&key).as_deref() == Some("two"),
    );
    assert_eq!(ssm.requests() - base, 1);
    // The fleet is counted from the topic (GetTopicAttributes). moto always
    // reports 0 confirmed subscriptions, so --events-hosts (1) stands: one
    // host, whose refetch is not spread.
    within(
        Duration::from_secs(2),
        "the topic's subscriptions counted",
        || {
            mount.log_text().lines().any(|l| {
                l.contains("hosts receiving change events counted")
                    && l.contains("counted=0")
                    && l.contains("hosts=1")
                    && l.contains("spread_ms=0")
            })
        },
    );

    // kill -9 leaves the queue and subscription behind; the next start of the
    // same mount removes them.
    mount.signal(libc::SIGKILL);
    let _ = ssmfs::daemon::lazy_unmount(&mount.path());
    assert_eq!(bus.queue_urls(), first_queue, "left behind");
    let mnt = mount.path();
    let restarted = std::process::Command::new(env!("CARGO_BIN_EXE_ssmfs"))
        .arg("--foreground")
        .args(["--endpoint-url", &ssm.endpoint])
        .args(args)
        .arg(&mnt)
        .envs(aws_env())
        .envs(bus.env())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&mount.log).unwrap())
        .spawn()
        .unwrap();
    mount.child = Some(restarted);
    mount.wait_mounted(true);
    let second_queue = bus.queue_urls();
    assert_eq!(second_queue.len(), 1, "{second_queue:?}");
    assert_ne!(second_queue, first_queue, "the orphan was reaped");
    assert_eq!(bus.subscriptions(&topic).len(), 1);
    assert!(mount.log_text().contains("left behind"));
    put(&rt, &client, "/tp/key", "three", ParameterType::String);
    publish("/tp/key");
    within(
        Duration::from_secs(2),
        "the update after the restart",
        || read(&key).as_deref() == Some("three"),
    );

    // A clean stop removes both.
    assert!(mount.signal(libc::SIGTERM).success());
    mount.wait_mounted(false);
    assert!(bus.queue_urls().is_empty(), "{:?}", bus.queue_urls());
    assert!(bus.subscriptions(&topic).is_empty());
}

#[test]
fn the_documented_cloudformation_for_one_queue_deploys_and_delivers_an_update() {
    if !have_fuse_and_moto() {
        return;
    }
    let (ssm, bus, rt, client) = ssm_and_bus();
    put(
        &rt,
        &client,
        "/airflow/variables/rotated",
        "one",
        ParameterType::SecureString,
    );
    // docs/EVENTS.md's templates, as a user applies them, on moto's
    // CloudFormation (its EventBridge cannot target SNS: the topic's stack
    // is only deployed, then removed).
    let deploy = |stack: &str, heading: &str, then: &[&str]| -> serde_json::Value {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = std::process::Command::new(root.join(".venv/bin/python"))
            .arg(root.join("tests/support/deploy_stack.py"))
            .args([&bus.moto.endpoint, stack])
            .arg(root.join("docs/EVENTS.md"))
            .arg(heading)
            .args(then)
            .envs(aws_env())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "deploying {heading}: {stderr}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    deploy(
        "ssmfs-topic",
        "### CloudFormation: EventBridge rule -> SNS topic (fleets, `--events-topic`)",
        &["--then-delete"],
    );
    let outputs = deploy(
        "ssmfs-host-queue",
        "### CloudFormation: EventBridge rule -> one SQS queue (`--events-queue`)",
        &[],
    );
    let queue_url = outputs["QueueUrl"].as_str().unwrap().to_string();
    let mount = bus.mount(
        &ssm,
        &["--ttl", "1h", "--events-queue", &queue_url, "/airflow"],
    );
    let secret = mount.path().join("variables/rotated");
    assert_eq!(read(&secret).as_deref(), Some("one"));
    put(
        &rt,
        &client,
        "/airflow/variables/rotated",
        "two",
        ParameterType::SecureString,
    );
    let base = ssm.requests();
    bus.put_event("/airflow/variables/rotated", "Update", SystemTime::now());
    let took = within(
        Duration::from_secs(2),
        "the update through the stack's queue",
        || read(&secret).as_deref() == Some("two"),
    );
    eprintln!("update through the documented stack visible after {took:?}");
    assert_eq!(ssm.requests() - base, 1, "one SSM call");
}

#[test]
fn a_fleet_spreads_its_refetches_over_the_window_without_a_throttled_call() {
    if !have_fuse_and_moto() {
        return;
    }
    const HOSTS: usize = 5;
    let (ssm, bus, rt, client) = ssm_and_bus();
    put(&rt, &client, "/fl/key", "one", ParameterType::String);
    let topic = bus.create_topic();
    // The account's quota: 5 TPS, a second's worth in its bucket.
    let proxy = ThrottleProxy::start(&ssm.endpoint, 5);
    let hosts = HOSTS.to_string();
    let args = [
        "--ttl",
        "1h",
        "--events-topic",
        topic.as_str(),
        "--events-hosts",
        hosts.as_str(),
        "--ssm-quota-tps",
        "5",
        "/fl",
    ];
    let mounts: Vec<Mount> = (0..HOSTS)
        .map(|_| Mount::start_with(&proxy.url, &args, &bus.env()))
        .collect();
    for mount in &mounts {
        assert_eq!(read(&mount.path().join("key")).as_deref(), Some("one"));
    }
    std::thread::sleep(Duration::from_secs(2)); // the bucket refills
    let (admitted, throttled) = proxy.counts();
    put(&rt, &client, "/fl/key", "two", ParameterType::String);
    let message = ssmfs::events::event_json("/fl/key", "Update", SystemTime::now());
    let published = std::time::Instant::now();
    rt.block_on(bus.sns.publish().topic_arn(&topic).message(message).send())
        .unwrap();
    let mut lags = vec![None; HOSTS];
    within(
        Duration::from_secs(6),
        "every host to see the rotation",
        || {
            for (lag, mount) in lags.iter_mut().zip(&mounts) {
                if lag.is_none() && read(&mount.path().join("key")).as_deref() == Some("two") {
                    *lag = Some(published.elapsed());
                }
            }
            lags.iter().all(Option::is_some)
        },
    );
    let lags: Vec<Duration> = lags.into_iter().flatten().collect();
    let (admitted_after, throttled_after) = proxy.counts();
    assert_eq!(throttled_after - throttled, 0, "throttled refetches");
    assert_eq!(admitted_after - admitted, HOSTS as u64, "one refetch each");
    // The window is 5 hosts / (5 TPS / 2) = 2 s. Five waits drawn over it
    // all fall in its first 0.4 s with probability 0.2^5 (0.03%): a herd.
    let slowest = *lags.iter().max().unwrap();
    assert!(
        slowest >= Duration::from_millis(400) && slowest <= Duration::from_millis(3500),
        "refetches at {lags:?}, not spread over the 2 s window"
    );
}
