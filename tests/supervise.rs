//! `--supervise` end to end: a real mount against moto, readers as separate
//! processes (tests/support/readers.py: open, read, check, in a loop), and the
//! serving daemon killed with SIGKILL, slowed down, upgraded with SIGUSR2, or
//! unable to start again.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use aws_sdk_ssm::types::ParameterType;
use support::*;

const SECRETS: usize = 20;

fn seed(moto: &Moto) -> Vec<String> {
    let rt = runtime();
    let client = client(&rt, &moto.endpoint);
    put_many(
        &rt,
        &client,
        (0..SECRETS)
            .map(|i| {
                (
                    format!("/sup/s{i:02}"),
                    format!("secret-value-{i:02}-{}", "x".repeat(i)),
                )
            })
            .collect(),
        ParameterType::SecureString,
    );
    (0..SECRETS)
        .map(|i| format!("s{i:02}=secret-value-{i:02}-{}", "x".repeat(i)))
        .collect()
}

fn supervised(moto: &Moto, extra: &[&str], env: &[(&str, &str)]) -> (Mount, PathBuf) {
    let pid_dir = tempfile::tempdir().unwrap().keep();
    let pid_file = pid_dir.join("daemon.pid");
    let mut args = vec![
        "--supervise",
        "--pid-file",
        pid_file.to_str().unwrap(),
        "--ttl",
        "1s",
    ];
    args.extend_from_slice(extra);
    args.push("/sup");
    let mount = Mount::start_with(&moto.endpoint, &args, env);
    // The mount appears when the supervisor mounts; the pid file once its
    // first daemon runs (before the mount is said to be ready).
    within(Duration::from_secs(20), "the pid file", || {
        pid_file.exists()
    });
    (mount, pid_file)
}

fn daemon_pid(pid_file: &Path) -> i32 {
    std::fs::read_to_string(pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// No daemon met a node id it could not name. The kernel retries a path
/// lookup once after ESTALE, which hides most such answers from readers: the
/// daemons' log shows every one.
fn assert_every_number_known(log: &str) {
    assert!(!log.contains("unknown inode"), "{log}");
}

fn inode(path: &Path) -> String {
    let (code, out, err) = run("stat", &["-c", "%i", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    out.trim().to_string()
}

fn drop_kernel_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "2");
}

#[test]
fn readers_never_fail_while_the_daemon_is_killed_every_few_seconds() {
    if !have_fuse_and_moto() {
        return;
    }
    let moto = Moto::start();
    let pairs = seed(&moto);
    let (mount, pid_file) = supervised(&moto, &[], &[]);
    let root = mount.path();
    let before = inode(&root.join("s03"));
    let seconds = 60;
    let readers = start_readers(&root, seconds, &pairs);
    let started = Instant::now();
    let mut kills = 0;
    while started.elapsed() < Duration::from_secs(seconds - 3) {
        std::thread::sleep(Duration::from_millis(2500));
        let pid = daemon_pid(&pid_file);
        // SAFETY: signalling a process this test started (through the supervisor).
        unsafe { libc::kill(pid, libc::SIGKILL) };
        kills += 1;
        drop_kernel_caches();
    }
    let ReaderTotals {
        reads,
        failures,
        wrong,
        longest_ms: longest,
        ..
    } = finish_readers(readers);
    eprintln!("{reads} reads, {kills} kills, longest read {longest} ms");
    assert_eq!((failures, wrong), (0, 0));
    assert!(reads > 1000, "{reads}");
    assert!(kills >= 20);
    // A restart takes a few hundred ms (a new process, one SSM call).
    assert!(longest < 3000.0, "longest read {longest} ms");
    assert_eq!(
        inode(&root.join("s03")),
        before,
        "inode numbers survive restarts"
    );
    let log = mount.log_text();
    assert_every_number_known(&log);
    assert!(
        log.matches("serving daemon started").count() > kills / 2,
        "{log}"
    );
}

#[test]
fn requests_in_flight_when_the_daemon_dies_are_resent_and_an_upgrade_fails_none() {
    if !have_fuse_and_moto() {
        return;
    }
    let moto = Moto::start();
    let pairs = seed(&moto);
    // Every request waits 300 ms in the daemon: kills always find some in flight.
    let (mut mount, pid_file) = supervised(&moto, &[], &[("SSMFS_TEST_REQUEST_DELAY_MS", "300")]);
    let root = mount.path();
    let seconds = 20;
    let readers = start_readers(&root, seconds, &pairs);
    let started = Instant::now();
    let supervisor = mount.child.as_ref().unwrap().id() as i32;
    let mut round = 0;
    while started.elapsed() < Duration::from_secs(seconds - 3) {
        std::thread::sleep(Duration::from_millis(1500));
        drop_kernel_caches();
        std::thread::sleep(Duration::from_millis(100));
        round += 1;
        let signal = if round % 2 == 0 {
            // SAFETY: signalling the daemon (a kill) or the supervisor (an upgrade).
            unsafe { libc::kill(daemon_pid(&pid_file), libc::SIGKILL) };
            "kill"
        } else {
            unsafe { libc::kill(supervisor, libc::SIGUSR2) };
            "upgrade"
        };
        let _ = signal;
    }
    let ReaderTotals {
        reads,
        failures,
        wrong,
        longest_ms: longest,
        ..
    } = finish_readers(readers);
    eprintln!("{reads} reads, longest {longest} ms");
    assert_eq!((failures, wrong), (0, 0));
    let log = mount.log_text();
    assert_every_number_known(&log);
    assert!(log.contains("resending the requests"), "{log}");
    assert!(
        log.contains("upgrade: the serving daemon was replaced"),
        "{log}"
    );
    assert!(mount.signal(libc::SIGTERM).success());
    mount.wait_mounted(false);
}

#[test]
fn a_successor_that_cannot_start_fails_readers_within_the_deadline_not_forever() {
    if !have_fuse_and_moto() {
        return;
    }
    let mut moto = Moto::start();
    let pairs = seed(&moto);
    let (mut mount, pid_file) = supervised(
        &moto,
        &["--restart-deadline", "4s", "--request-timeout", "1s"],
        &[],
    );
    let root = mount.path();
    assert_eq!(
        std::fs::read_to_string(root.join("s01")).unwrap(),
        pairs[1].split_once('=').unwrap().1
    );
    // SSM goes away, then the daemon: no successor can check its access.
    moto.stop();
    // SAFETY: signalling the daemon.
    unsafe { libc::kill(daemon_pid(&pid_file), libc::SIGKILL) };
    let started = Instant::now();
    drop_kernel_caches();
    let (code, _, err) = run("cat", &[root.join("s02").to_str().unwrap()]);
    let waited = started.elapsed();
    assert_ne!(code, 0, "the read fails");
    assert!(waited < Duration::from_secs(15), "waited {waited:?}: {err}");
    let status = mount.child.as_mut().unwrap().wait().unwrap();
    mount.child = None;
    assert!(!status.success());
    assert!(
        !ssmfs::daemon::is_mount_point(&root),
        "the mount is cleaned up"
    );
    let log = mount.log_text();
    assert!(log.contains("aborted the FUSE connection"), "{log}");
}

#[test]
fn an_upgrade_that_negotiates_other_fuse_settings_is_refused_and_fails_no_read() {
    if !have_fuse_and_moto() {
        return;
    }
    let moto = Moto::start();
    let pairs = seed(&moto);
    // Daemons started by an upgrade answer INIT with another max_write, as a
    // binary with other FUSE settings would.
    let (mut mount, pid_file) = supervised(&moto, &[], &[("SSMFS_TEST_UPGRADE_MAX_WRITE", "8192")]);
    let root = mount.path();
    let serving = daemon_pid(&pid_file);
    let readers = start_readers(&root, 8, &pairs);
    std::thread::sleep(Duration::from_secs(2));
    let supervisor = mount.child.as_ref().unwrap().id() as i32;
    // SAFETY: signalling the supervisor this test started.
    unsafe { libc::kill(supervisor, libc::SIGUSR2) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !mount
        .log_text()
        .contains("cannot take over the live connection")
    {
        assert!(Instant::now() < deadline, "{}", mount.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    drop_kernel_caches();
    let ReaderTotals {
        reads,
        failures,
        wrong,
        ..
    } = finish_readers(readers);
    assert_eq!((failures, wrong), (0, 0));
    assert!(reads > 100, "{reads}");
    assert_eq!(
        daemon_pid(&pid_file),
        serving,
        "the current daemon serves on"
    );
    let log = mount.log_text();
    assert!(
        !log.contains("upgrade: the serving daemon was replaced"),
        "{log}"
    );
    // A restart after a crash runs the same settings and takes over.
    // SAFETY: signalling the daemon.
    unsafe { libc::kill(serving, libc::SIGKILL) };
    drop_kernel_caches();
    assert_eq!(
        std::fs::read_to_string(root.join("s05")).unwrap(),
        pairs[5].split_once('=').unwrap().1
    );
    assert_ne!(daemon_pid(&pid_file), serving);
    assert!(mount.signal(libc::SIGTERM).success());
    mount.wait_mounted(false);
}

#[test]
fn a_metrics_port_another_process_took_does_not_stop_a_supervised_daemon() {
    if !have_fuse_and_moto() {
        return;
    }
    let moto = Moto::start();
    let pairs = seed(&moto);
    // Any local process may bind a port first (the CSI plugin picks each
    // daemon's port, and a restart binds it again).
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap().to_string();
    let (mount, pid_file) = supervised(&moto, &["--metrics-addr", &taken], &[]);
    let (name, value) = pairs[0].split_once('=').unwrap();
    assert_eq!(
        std::fs::read_to_string(mount.path().join(name)).unwrap(),
        value
    );
    assert!(
        mount.log_text().contains("serving without metrics"),
        "{}",
        mount.log_text()
    );
    // After a crash too: the next daemon serves.
    unsafe { libc::kill(daemon_pid(&pid_file), libc::SIGKILL) };
    let (name, value) = pairs[1].split_once('=').unwrap();
    assert_eq!(
        std::fs::read_to_string(mount.path().join(name)).unwrap(),
        value
    );
    drop(squatter);
}

#[test]
fn a_blocked_change_stream_reader_outlives_a_killed_daemon_and_an_upgrade() {
    if !have_fuse_and_moto() {
        return;
    }
    let moto = Moto::start();
    seed(&moto);
    let (mut mount, pid_file) = supervised(&moto, &[], &[]);
    let root = mount.path();
    assert!(std::fs::read_to_string(root.join("s03"))
        .unwrap()
        .starts_with("secret-value-03"));
    let out = mount.dir.path().join("stream.txt");
    // A shell loop: a read that ended (EOF) would end it.
    let mut reader = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "while read -r line; do echo \"$line\" >> {}; done < {}; echo EOF >> {}",
            out.display(),
            root.join("@changes").display(),
            out.display()
        ))
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let rt = runtime();
    let ssm = client(&rt, &moto.endpoint);
    let supervisor = mount.child.as_ref().unwrap().id() as i32;
    for (round, value) in ["two", "three"].iter().enumerate() {
        let old = daemon_pid(&pid_file);
        if round == 0 {
            // SAFETY: signalling the daemon.
            unsafe { libc::kill(old, libc::SIGKILL) };
        } else {
            // SAFETY: signalling the supervisor (an upgrade).
            unsafe { libc::kill(supervisor, libc::SIGUSR2) };
        }
        within(Duration::from_secs(20), "the next daemon", || {
            std::fs::read_to_string(&pid_file)
                .is_ok_and(|pid| pid.trim().parse::<i32>().is_ok_and(|pid| pid != old))
        });
        // The next daemon says changes may have been missed, and keeps what
        // the kernel holds fresh again (it starts with an empty cache: no
        // read reaches it while the kernel answers them).
        within(Duration::from_secs(20), "@dropped", || {
            lines_of(&out).iter().filter(|l| *l == "@dropped").count() > round
        });
        put(&rt, &ssm, "/sup/s03", value, ParameterType::SecureString);
        let wanted = format!("s03 {}", round + 2);
        within(Duration::from_secs(20), &wanted, || {
            lines_of(&out).contains(&wanted)
        });
    }
    let lines = lines_of(&out);
    assert!(!lines.contains(&"EOF".to_string()), "{lines:?}");
    assert!(reader.try_wait().unwrap().is_none(), "the reader ended");
    let _ = reader.kill();
    let _ = reader.wait();
    assert!(mount.signal(libc::SIGTERM).success());
}
