//! A regional outage, for real: two moto servers, one per region, holding the
//! same names with values that tell the regions apart; a FUSE mount read by
//! real clients (cat, ls, find, Python, std::fs) while the primary's server is
//! stopped and after it starts again on the same port. Needs /dev/fuse, root
//! and moto: without them the test fails, naming what is missing.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use aws_sdk_ssm::types::ParameterType;
use support::*;

const PRIMARY: &str = "us-east-1";
const FAILOVER: &str = "us-west-2";
/// The names below /fo, in both regions; `late` is put after the mount
/// started, so nothing of it was ever read from the primary.
const NAMES: [&str; 5] = ["a", "b", "dir/c", "dir/d", "late"];
/// Short, so the test sees reads return to the primary within seconds.
const RETRY_AFTER: &str = "2s";

/// Puts `names` below /fo, their values naming `region`; `late`'s first
/// version is labelled `stable`.
fn seed(moto: &Moto, region: &str, names: &[&str]) {
    let rt = runtime();
    let client = client_in(&rt, &moto.endpoint, region);
    for name in names {
        put(
            &rt,
            &client,
            &format!("/fo/{name}"),
            &format!("{name} from {region}"),
            ParameterType::SecureString,
        );
    }
    if names.contains(&"late") {
        let label = client
            .label_parameter_version()
            .name("/fo/late")
            .parameter_version(1)
            .labels("stable")
            .send();
        rt.block_on(label).expect("labelling /fo/late");
    }
}

/// `ssmfs_region_api_calls_total` for `role`, from the metrics endpoint.
fn region_calls(addr: &str, role: &str) -> u64 {
    let (code, body, _) = run("curl", &["-sf", &format!("http://{addr}/metrics")]);
    assert_eq!(code, 0, "metrics at {addr}");
    let prefix = format!("ssmfs_region_api_calls_total{{role=\"{role}\",");
    body.lines()
        .filter(|line| line.starts_with(&prefix))
        .map(|line| line.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// Every name read by cat, Python and std::fs, and the tree listed by ls and
/// find; what each read returned (the region it names), and the failures.
fn read_everything(mnt: &Path) -> (Vec<String>, Vec<String>) {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let mut values = Vec::new();
    let mut failures = Vec::new();
    let (code, out, err) = run("ls", &[mnt.to_str().unwrap()]);
    if code != 0 || out.split_whitespace().collect::<Vec<_>>() != ["a", "b", "dir", "late"] {
        failures.push(format!("ls: {code} {out:?} {err}"));
    }
    let (code, out, err) = run("find", &[mnt.to_str().unwrap(), "-type", "f"]);
    if code != 0 || out.lines().count() != NAMES.len() {
        failures.push(format!("find: {code} {out:?} {err}"));
    }
    // A label is never listed: GetParameter, a cold read of its own.
    match run("cat", &[mnt.join("late:stable").to_str().unwrap()]) {
        (0, out, _) => values.push(out),
        (code, _, err) => failures.push(format!("cat late:stable: {code} {err}")),
    }
    for name in NAMES {
        let path = mnt.join(name);
        let path = path.to_str().unwrap();
        match run("cat", &[path]) {
            (0, out, _) => values.push(out),
            (code, _, err) => failures.push(format!("cat {name}: {code} {err}")),
        }
        let script = "import sys; print(open(sys.argv[1]).read(), end='')";
        match run(python.to_str().unwrap(), &["-c", script, path]) {
            (0, out, _) => values.push(out),
            (code, _, err) => failures.push(format!("python {name}: {code} {err}")),
        }
        match std::fs::read_to_string(path) {
            Ok(value) => values.push(value),
            Err(error) => failures.push(format!("std::fs {name}: {error}")),
        }
    }
    (values, failures)
}

#[test]
fn a_regional_outage_is_read_through_the_failover_region() {
    must_have_fuse_and_moto();
    let mut primary = Moto::start();
    let failover = Moto::start();
    let early = &NAMES[..4];
    seed(&primary, PRIMARY, early);
    seed(&failover, FAILOVER, early);
    let addr = format!("127.0.0.1:{}", free_loopback_port());
    let mount = Mount::start_with(
        &primary.endpoint,
        &[
            "--region",
            PRIMARY,
            "--failover-region",
            FAILOVER,
            "--failover-endpoint-url",
            &failover.endpoint,
            "--failover-retry-after",
            RETRY_AFTER,
            // Short, so values cached from the replica are read again soon.
            "--ttl",
            "1s",
            "--metrics-addr",
            &addr,
            "/fo",
        ],
        &[],
    );
    let mnt = mount.path();
    // The mount's first listing came from the primary.
    assert_eq!(
        std::fs::read_to_string(mnt.join("a")).unwrap(),
        format!("a from {PRIMARY}")
    );
    assert_eq!(region_calls(&addr, "failover"), 0);
    seed(&primary, PRIMARY, &["late"]);
    seed(&failover, FAILOVER, &["late"]);
    let failover_requests = failover.requests();

    // The primary's server stops. Once what the mount cached has expired,
    // listings, refreshes and cold reads come from the failover region, and
    // none fails.
    primary.stop();
    std::thread::sleep(Duration::from_millis(1100));
    let (values, failures) = read_everything(&mnt);
    assert!(failures.is_empty(), "{failures:#?}\n{}", mount.log_text());
    assert_eq!(values.len(), NAMES.len() * 3 + 1);
    for value in &values {
        assert!(value.ends_with(&format!("from {FAILOVER}")), "{value}");
    }
    // A version number is a region's own: a pinned version is the
    // primary's to answer, and it cannot.
    let (code, _, err) = run("cat", &[mnt.join("late:1").to_str().unwrap()]);
    assert!(
        code != 0 && err.contains("Input/output error"),
        "{code} {err}"
    );
    let during = (
        region_calls(&addr, "primary"),
        region_calls(&addr, "failover"),
    );
    assert!(during.1 > 0, "calls to the failover region: {during:?}");
    // Read after the scrape: the server has answered at least those calls
    // (background refreshes may have added some since).
    let answered = failover.requests() - failover_requests;
    assert!(
        answered >= during.1 as usize,
        "{answered} answered, {during:?}"
    );
    eprintln!("while the primary was down: {during:?} calls (primary, failover)");

    // The primary's server starts again, on the same port (empty: seeded
    // again). After the back-off reads return to it, with no failed read
    // on the way.
    primary.restart();
    seed(&primary, PRIMARY, &NAMES);
    let restarted = Instant::now();
    let mut reads = 0;
    let mut failed = Vec::new();
    let back = within(Duration::from_secs(15), "reads back in the primary", || {
        reads += 1;
        match std::fs::read_to_string(mnt.join("a")) {
            Ok(value) => value == format!("a from {PRIMARY}"),
            Err(error) => {
                failed.push(error.to_string());
                false
            }
        }
    });
    assert!(failed.is_empty(), "{failed:?}");
    eprintln!("back in the primary {back:?} after its restart ({reads} reads)");
    // Once the values cached from the replica expire, everything is the primary's.
    std::thread::sleep(Duration::from_millis(1100));
    let (values, failures) = read_everything(&mnt);
    assert!(failures.is_empty(), "{failures:#?}");
    for value in &values {
        assert!(value.ends_with(&format!("from {PRIMARY}")), "{value}");
    }
    let after = (
        region_calls(&addr, "primary"),
        region_calls(&addr, "failover"),
    );
    assert!(after.0 > during.0, "{during:?} -> {after:?}");
    let settled = region_calls(&addr, "failover");
    std::thread::sleep(Duration::from_millis(1100));
    read_everything(&mnt);
    assert_eq!(
        region_calls(&addr, "failover"),
        settled,
        "the failover region is no longer asked"
    );
    eprintln!("calls in all (primary, failover): {after:?}");
    assert!(
        restarted.elapsed() < Duration::from_secs(20),
        "{:?}",
        restarted.elapsed()
    );
}
