//! The change stream (`@changes`) on a real mount: moto's SSM on loopback, the
//! real binary, and real readers (`cat`, the shell's `read`, Python's
//! `open()` with poll and O_NONBLOCK, a non-root user through a bind mount).
//! Freshness is proven by lines and by counting SSM calls, not by timing.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use aws_sdk_ssm::types::ParameterType;
use support::*;

/// A rotation shows within the TTL plus a second; the rest is slack for a
/// loaded 2-core machine.
const TTL: &str = "3s";
const SHOWS_WITHIN: Duration = Duration::from_secs(12);

/// Follows a stream file in a thread: every line it reads, as it reads it.
fn follow(path: std::path::PathBuf) -> mpsc::Receiver<String> {
    let (sender, lines) = mpsc::channel();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("opening the stream");
        for line in BufReader::new(file).lines() {
            let Ok(line) = line else { return };
            if sender.send(line).is_err() {
                return;
            }
        }
    });
    lines
}

/// Lines received until `wanted` is among them (or the time is up).
fn wait_for(lines: &mpsc::Receiver<String>, wanted: &str) -> Vec<String> {
    let deadline = std::time::Instant::now() + SHOWS_WITHIN;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(line) => {
                let done = line == wanted;
                seen.push(line);
                if done {
                    return seen;
                }
            }
            Err(_) => break,
        }
    }
    panic!("no line {wanted:?} within {SHOWS_WITHIN:?}; got {seen:?}");
}

fn lines_so_far(lines: &mpsc::Receiver<String>) -> Vec<String> {
    std::thread::sleep(Duration::from_millis(300));
    lines.try_iter().collect()
}

#[test]
fn a_rotation_is_one_line_on_every_open_stream_and_on_its_subtree_only() {
    if !have_fuse_and_moto() {
        return;
    }
    let ssm = Ssm::start(&[]);
    ssm.put("/app/db/password", "first");
    ssm.put("/app/other", "x1");
    let mount = Mount::start(&ssm.moto.endpoint, "/app", &["--ttl", TTL]);
    let mnt = mount.path();
    assert_eq!(
        std::fs::read_to_string(mnt.join("db/password")).unwrap(),
        "first"
    );
    assert_eq!(std::fs::read_to_string(mnt.join("other")).unwrap(), "x1");

    let whole = follow(mnt.join("@changes"));
    let second = follow(mnt.join("@changes"));
    let db_only = follow(mnt.join("db/@changes"));
    // The shell's own loop, as the docs show it.
    let shell_out = mount.dir.path().join("shell.txt");
    let mut shell = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "while read -r path version; do echo \"$path=$version\" >> {}; done < {}",
            shell_out.display(),
            mnt.join("@changes").display()
        ))
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));

    ssm.put("/app/db/password", "second");
    ssm.put("/app/other", "x2");

    let mut got = wait_for(&whole, "db/password 2");
    if !got.contains(&"other 2".to_string()) {
        got.extend(wait_for(&whole, "other 2"));
    }
    assert_eq!(got.len(), 2, "one line per change: {got:?}");
    wait_for(&second, "db/password 2");
    let db_lines = wait_for(&db_only, "db/password 2");
    assert_eq!(db_lines, ["db/password 2"]);
    // Past the other rotation: still nothing outside db/ on db/@changes.
    std::thread::sleep(Duration::from_secs(1));
    assert!(lines_so_far(&db_only).is_empty());
    within(SHOWS_WITHIN, "the shell loop's line", || {
        std::fs::read_to_string(&shell_out).is_ok_and(|t| t.contains("db/password=2"))
    });
    // The kernel dropped its copy: a reader now sees the new value.
    assert_eq!(
        std::fs::read_to_string(mnt.join("db/password")).unwrap(),
        "second"
    );
    let _ = shell.kill();
    let _ = shell.wait();
}

#[test]
fn a_deleted_parameter_is_a_deleted_line() {
    if !have_fuse_and_moto() {
        return;
    }
    let ssm = Ssm::start(&[]);
    ssm.put("/app/keep", "k");
    ssm.put("/app/gone", "g");
    let mount = Mount::start(&ssm.moto.endpoint, "/app", &["--ttl", TTL]);
    let mnt = mount.path();
    assert_eq!(std::fs::read_to_string(mnt.join("gone")).unwrap(), "g");
    let lines = follow(mnt.join("@changes"));
    std::thread::sleep(Duration::from_millis(300));
    ssm.rt
        .block_on(ssm.client.delete_parameter().name("/app/gone").send())
        .unwrap();
    wait_for(&lines, "gone deleted");
    assert!(!mnt.join("gone").exists());
}

#[test]
fn a_stream_is_a_pipe_nothing_lists_with_eagain_and_poll() {
    if !have_fuse_and_moto() {
        return;
    }
    let ssm = Ssm::start(&[]);
    ssm.put("/app/a", "1");
    let mount = Mount::start(&ssm.moto.endpoint, "/app", &["--ttl", TTL]);
    let mnt = mount.path();
    let (code, listing, _) = run("ls", &["-a", mnt.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(!listing.contains("@changes"), "{listing}");
    let (_, found, _) = run("find", &[mnt.to_str().unwrap()]);
    assert!(!found.contains('@'), "{found}");
    let (code, kind, _) = run(
        "stat",
        &["-c", "%F", mnt.join("@changes").to_str().unwrap()],
    );
    assert_eq!((code, kind.trim()), (0, "fifo"));
    // Python's open() with O_NONBLOCK and poll, as an event loop uses it.
    let script = r#"
import os, select, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_NONBLOCK)
try:
    os.read(fd, 100)
    print("data")
except BlockingIOError:
    print("eagain")
p = select.poll()
p.register(fd, select.POLLIN)
print("idle" if not p.poll(300) else "busy")
sys.stdout.flush()
print("ready" if p.poll(15000) else "timeout")
print(os.read(fd, 4096).decode().strip())
"#;
    let child = Command::new("python3")
        .args(["-c", script, mnt.join("@changes").to_str().unwrap()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    ssm.put("/app/a", "2");
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text, "eagain\nidle\nready\na 2\n");
}

#[test]
fn an_idle_stream_costs_only_the_paced_refresh_of_what_it_covers() {
    if !have_fuse_and_moto() {
        return;
    }
    let ssm = Ssm::start(&[]);
    let names: Vec<(String, String)> = (0..20)
        .map(|i| (format!("/app/k{i:02}"), format!("v{i}")))
        .collect();
    put_many(&ssm.rt, &ssm.client, names.clone(), ParameterType::String);
    let mount = Mount::start(&ssm.moto.endpoint, "/app", &["--ttl", "4s"]);
    let mnt = mount.path();
    for (name, value) in &names {
        let path = mnt.join(name.trim_start_matches("/app/"));
        assert_eq!(&std::fs::read_to_string(path).unwrap(), value);
    }
    // No stream: values nobody reads are not refreshed.
    let before = ssm.moto.requests();
    std::thread::sleep(Duration::from_secs(10));
    let without = ssm.moto.requests() - before;
    assert_eq!(without, 0, "nothing is refreshed while nobody reads");
    // A blocked reader: the 20 values are refreshed in batches of ten, once
    // per TTL each (about 2 calls per 4 s), and nothing else.
    let lines = follow(mnt.join("@changes"));
    let before = ssm.moto.requests();
    std::thread::sleep(Duration::from_secs(10));
    let with = ssm.moto.requests() - before;
    assert!(
        (2..=10).contains(&with),
        "{with} calls in 10 s for 20 values at a 4 s TTL"
    );
    assert!(lines_so_far(&lines).is_empty(), "no change, no line");
}

#[test]
fn a_non_root_reader_through_a_bind_mount_gets_the_stream() {
    if !have_fuse_and_moto() {
        return;
    }
    let ssm = Ssm::start(&[]);
    ssm.put("/app/shared", "one");
    let mount = Mount::start(
        &ssm.moto.endpoint,
        "/app",
        &[
            "--ttl",
            TTL,
            "--allow-other",
            "--file-mode",
            "0444",
            "--dir-mode",
            "0555",
            "--allow-world-readable",
        ],
    );
    let mnt = mount.path();
    assert_eq!(std::fs::read_to_string(mnt.join("shared")).unwrap(), "one");
    // As a pod sees it: a bind mount of the shared mount, elsewhere.
    let pod = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        pod.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let target = pod.path().join("volume");
    std::fs::create_dir(&target).unwrap();
    let (code, _, err) = run(
        "mount",
        &["--bind", mnt.to_str().unwrap(), target.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{err}");
    let reader = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["timeout", "20", "head", "-n1"])
        .arg(target.join("@changes"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    ssm.put("/app/shared", "two");
    let out = reader.wait_with_output().unwrap();
    let _ = run("umount", &["-l", target.to_str().unwrap()]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "shared 2\n",
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
