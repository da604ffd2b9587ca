//! Unit tests of `cli`, apart so the module reads as its model.

use super::*;

fn parse(args: &[&str]) -> Result<Settings, String> {
    CliArgs::parse_with_mount_options(args.iter().map(OsString::from).collect())
        .and_then(CliArgs::into_settings)
        .map_err(|e| e.to_string())
}

#[test]
fn defaults_and_flags() {
    let s = parse(&["ssmfs", "/airflow/", "/mnt/x"]).unwrap();
    assert_eq!(s.fs.prefix, "/airflow");
    assert_eq!(s.fs.cache.ttl, Duration::from_secs(300));
    assert_eq!(s.fs.file_mode, 0o400);
    assert!(!s.foreground);
    let s = parse(&[
        "ssmfs", "-f", "--ttl", "30s", "--uid", "50000", "/", "/mnt/x",
    ])
    .unwrap();
    assert!(s.foreground);
    assert_eq!(s.fs.uid, 50000);
    assert_eq!(s.fs.prefix, "/");
}

#[test]
fn mount_options_become_flags() {
    let s = parse(&[
        "ssmfs",
        "/a",
        "/mnt/x",
        "-o",
        "rw,nosuid,allow_other,uid=7,ttl=5m,file_mode=0440,_netdev",
    ])
    .unwrap();
    assert!(s.allow_other);
    assert_eq!(s.fs.uid, 7);
    assert_eq!(s.fs.file_mode, 0o440);
    assert_eq!(s.fs.cache.ttl, Duration::from_secs(300));
}

#[test]
fn events_pacing_from_flags_and_mount_options() {
    let s = parse(&["ssmfs", "/a", "/mnt/x"]).unwrap();
    assert_eq!((s.fs.events.hosts, s.fs.events.quota_tps), (1, 40));
    let s = parse(&[
        "ssmfs",
        "--events-hosts",
        "1000",
        "/a",
        "/mnt/x",
        "-o",
        "ssm_quota_tps=10000",
    ])
    .unwrap();
    assert_eq!((s.fs.events.hosts, s.fs.events.quota_tps), (1000, 10_000));
    for bad in [
        "--events-hosts=0",
        "--ssm-quota-tps=0",
        "--events-hosts=many",
    ] {
        let error = parse(&["ssmfs", bad, "/a", "/mnt/x"]).unwrap_err();
        assert!(error.contains(bad.split('=').next().unwrap()), "{error}");
    }
}

#[test]
fn events_sources_from_flags_and_mount_options() {
    let url = "https://sqs.us-east-1.amazonaws.com/123456789012/ssm-changes";
    let s = parse(&[
        "ssmfs",
        "/a",
        "/mnt/x",
        "-o",
        &format!("ttl=1h,events_queue={url}"),
    ])
    .unwrap();
    assert_eq!(s.events, Some(EventsSource::Queue(url.into())));
    let arn = "arn:aws:sns:us-east-1:123456789012:ssm-changes";
    let s = parse(&["ssmfs", "--events-topic", arn, "/a", "/mnt/x"]).unwrap();
    assert_eq!(s.events, Some(EventsSource::Topic(arn.into())));
    assert!(parse(&["ssmfs", "/a", "/mnt/x"]).unwrap().events.is_none());
    let both = parse(&[
        "ssmfs",
        "--events-topic",
        arn,
        "--events-queue",
        url,
        "/a",
        "/mnt/x",
    ]);
    assert!(both.unwrap_err().contains("cannot be used with"));
    let bad = parse(&["ssmfs", "--events-queue", "ssm-changes", "/a", "/mnt/x"]);
    assert!(bad.unwrap_err().contains("is not a queue URL"));
    let bad = parse(&["ssmfs", "--events-topic", "ssm-changes", "/a", "/mnt/x"]);
    assert!(bad.unwrap_err().contains("is not an SNS topic ARN"));
}

#[test]
fn a_failover_region_from_flags_and_mount_options() {
    assert!(parse(&["ssmfs", "/a", "/mnt/x"])
        .unwrap()
        .aws
        .failover
        .is_none());
    let s = parse(&[
        "ssmfs",
        "/a",
        "/mnt/x",
        "-o",
        "region=us-east-1,failover_region=us-west-2,failover_retry_after=2s",
    ])
    .unwrap();
    let failover = s.aws.failover.unwrap();
    assert_eq!(failover.region, "us-west-2");
    assert_eq!(failover.retry_after, Duration::from_secs(2));
    assert_eq!(failover.endpoint_url, None);
    let s = parse(&["ssmfs", "--failover-region", "eu-west-1", "/a", "/mnt/x"]).unwrap();
    assert_eq!(
        s.aws.failover.unwrap().retry_after,
        config::DEFAULT_FAILOVER_RETRY_AFTER
    );
    let itself = parse(&[
        "ssmfs",
        "--region=eu-west-1",
        "--failover-region=eu-west-1",
        "/a",
        "/mnt/x",
    ]);
    assert!(itself.unwrap_err().contains("is the primary region"));
    let alone = parse(&["ssmfs", "--failover-endpoint-url=http://x", "/a", "/mnt/x"]);
    assert!(alone.unwrap().aws.failover.is_none(), "unused");
}

#[test]
fn airflow_kwargs_mount_only_takes_a_mountpoint() {
    let kwargs = r#"{"connections_prefix": "airflow/connections", "variables_prefix": "airflow/variables", "region_name": "eu-west-1", "extra": 1}"#;
    let s = parse(&["ssmfs", "--airflow-kwargs", kwargs, "/mnt/x"]).unwrap();
    assert_eq!(s.fs.areas.len(), 3);
    assert_eq!(s.aws.region.as_deref(), Some("eu-west-1"));
    assert_eq!(s.fsname, "ssmfs:airflow");
    assert!(s.warnings[0].contains("extra"));
    let s = parse(&[
        "ssmfs",
        "--region",
        "us-east-2",
        "--airflow-kwargs",
        kwargs,
        "/mnt/x",
    ])
    .unwrap();
    assert_eq!(s.aws.region.as_deref(), Some("us-east-2"), "the flag wins");
    assert!(parse(&["ssmfs", "--airflow-kwargs", "{oops", "/mnt/x"])
        .unwrap_err()
        .contains("--airflow-kwargs"));
    assert!(parse(&["ssmfs", "--airflow-kwargs", "{}", "/a", "/mnt/x"])
        .unwrap_err()
        .contains("only MOUNTPOINT"));
}

#[test]
fn bad_input_is_named() {
    assert!(parse(&["ssmfs", "airflow", "/mnt"])
        .unwrap_err()
        .contains("PREFIX"));
    assert!(parse(&["ssmfs", "", "/mnt"])
        .unwrap_err()
        .contains("PREFIX"));
    assert!(parse(&["ssmfs", "--ttl", "-5s", "/a", "/mnt"])
        .unwrap_err()
        .contains("--ttl"));
    assert!(parse(&["ssmfs", "--ttl", "10 parsecs", "/a", "/mnt"])
        .unwrap_err()
        .contains("--ttl"));
    assert!(parse(&["ssmfs", "--file-mode", "999", "/a", "/mnt"])
        .unwrap_err()
        .contains("--file-mode"));
    assert!(parse(&["ssmfs", "--uid", "bob", "/a", "/mnt"])
        .unwrap_err()
        .contains("--uid"));
    assert!(parse(&["ssmfs", "--file-mode", "0444", "/a", "/mnt"])
        .unwrap_err()
        .contains("--allow-world-readable"));
    assert!(parse(&[
        "ssmfs",
        "--file-mode",
        "0444",
        "--allow-world-readable",
        "/a",
        "/mnt"
    ])
    .is_ok());
    assert!(parse(&["ssmfs", "/a"]).unwrap_err().contains("MOUNTPOINT"));
    assert!(parse(&[
        "ssmfs",
        "--supervise",
        "--restart-deadline",
        "0s",
        "/a",
        "/mnt"
    ])
    .unwrap_err()
    .contains("--restart-deadline must be at least 1s"));
}
