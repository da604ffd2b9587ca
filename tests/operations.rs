//! End-to-end operation of the daemon as a host service: Airflow kwargs,
//! background mode, the mount(8) helper, systemd notification, signals,
//! stale-mount recovery, metrics and an assumed role. Real binary, real FUSE,
//! moto on loopback.

mod support;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use aws_sdk_ssm::types::ParameterType;
use support::*;

fn seed_airflow(rt: &tokio::runtime::Runtime, client: &aws_sdk_ssm::Client) {
    put(
        rt,
        client,
        "/airflow/variables/my_var",
        "variable-value",
        ParameterType::String,
    );
    put(
        rt,
        client,
        "/airflow/variables/other",
        "x",
        ParameterType::String,
    );
    put(
        rt,
        client,
        "/airflow/connections/my_postgres",
        "postgresql://u:pw@h/db",
        ParameterType::SecureString,
    );
    put(
        rt,
        client,
        "/airflow/connections/skip_me",
        "nope",
        ParameterType::String,
    );
    put(
        rt,
        client,
        "/airflow/config/core.parallelism",
        "16",
        ParameterType::String,
    );
}

#[test]
fn airflow_kwargs_mount_the_backends_layout() {
    if !have_fuse_and_moto() {
        return;
    }
    let moto = Moto::start();
    let rt = runtime();
    let client = client(&rt, &moto.endpoint);
    seed_airflow(&rt, &client);
    let kwargs = r#"{"connections_prefix": "airflow/connections", "variables_prefix": "airflow/variables", "role_arn": null, "region_name": "us-east-1", "connections_lookup_pattern": "my_", "use_ssl": true}"#;
    let mount = Mount::start_with(&moto.endpoint, &["--airflow-kwargs", kwargs], &[]);
    let m = mount.path();
    assert_eq!(
        std::fs::read(m.join("variables/my_var")).unwrap(),
        b"variable-value"
    );
    assert_eq!(
        std::fs::read(m.join("connections/my_postgres")).unwrap(),
        b"postgresql://u:pw@h/db"
    );
    assert_eq!(
        std::fs::read(m.join("config/core.parallelism")).unwrap(),
        b"16"
    );
    let err = std::fs::read(m.join("connections/skip_me")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    let (_, out, _) = run("ls", &[m.join("connections").to_str().unwrap()]);
    assert_eq!(out.trim(), "my_postgres");
    assert!(
        mount.log_text().contains("use_ssl"),
        "unused keys are named in a warning"
    );

    // --airflow reads the same JSON from Airflow's own variable.
    drop(mount);
    let mount = Mount::start_with(
        &moto.endpoint,
        &["--airflow"],
        &[(
            "AIRFLOW__SECRETS__BACKEND_KWARGS",
            r#"{"config_prefix": null}"#,
        )],
    );
    let mut names: Vec<String> = std::fs::read_dir(mount.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["connections", "variables"]);
}

/// `ssmfs` linked into /usr/local/bin for the test's duration (unless a real
/// install is already there), as an operator's install would place it.
struct InstalledBinary(Option<std::path::PathBuf>);

impl InstalledBinary {
    fn new() -> Self {
        let target = std::path::PathBuf::from("/usr/local/bin/ssmfs");
        if target.exists() {
            return InstalledBinary(None);
        }
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_ssmfs"), &target).unwrap();
        InstalledBinary(Some(target))
    }
}

impl Drop for InstalledBinary {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn daemon_running_for(mnt: &std::path::Path) -> bool {
    let needle = mnt.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c).contains(&needle)
                        && String::from_utf8_lossy(&c).contains("ssmfs")
                })
                .unwrap_or(false)
        })
}

#[test]
fn background_mode_returns_once_mounted_and_umount_ends_the_daemon() {
    if !have_fuse_and_moto() {
        return;
    }
    let moto = Moto::start();
    let rt = runtime();
    let client = client(&rt, &moto.endpoint);
    put(&rt, &client, "/bg/value", "ready", ParameterType::String);
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let log = dir.path().join("log");
    let status = Command::new(env!("CARGO_BIN_EXE_ssmfs"))
        .args([
            "--endpoint-url",
            &moto.endpoint,
            "--log-file",
            log.to_str().unwrap(),
            "/bg",
        ])
        .arg(&mnt)
        .envs(aws_env())
        .status()
        .unwrap();
    assert!(status.success());
    // No waiting: the command returned only once the mount was ready.
    assert!(
        ssmfs::daemon::is_mount_point(&mnt),
        "mounted when the command returned"
    );
    assert_eq!(std::fs::read(mnt.join("value")).unwrap(), b"ready");
    assert_eq!(run("umount", &[mnt.to_str().unwrap()]).0, 0);
    within(
        Duration::from_secs(5),
        "the daemon ends with its mount",
        || !daemon_running_for(&mnt),
    );

    // A failure in background mode is reported by the command itself.
    let out = Command::new(env!("CARGO_BIN_EXE_ssmfs"))
        .args(["/bg", "/no/such/dir"])
        .envs(aws_env())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}

#[test]
fn mount_t_fuse_ssmfs_works_through_mount_fuse3() {
    if !have_fuse_and_moto() {
        return;
    }
    assert!(require(
        std::path::Path::new("/sbin/mount.fuse3").exists()
            || std::path::Path::new("/usr/sbin/mount.fuse3").exists(),
        "mount.fuse3 (Debian package fuse3)"
    ));
    let moto = Moto::with_secret("/viamount/secret", "through-the-helper");
    // mount(8) runs helpers with a sanitised PATH: install as an operator would.
    let _installed = InstalledBinary::new();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let options = format!(
        "ro,nosuid,nodev,_netdev,uid=4242,file_mode=0440,ttl=5m,endpoint_url={},log_file={}",
        moto.endpoint,
        dir.path().join("log").display()
    );
    mount_8(&[
        "-t",
        "fuse.ssmfs",
        "/viamount",
        mnt.to_str().unwrap(),
        "-o",
        &options,
    ]);
    let result = std::panic::catch_unwind(|| {
        assert_eq!(
            std::fs::read(mnt.join("secret")).unwrap(),
            b"through-the-helper"
        );
        let (_, out, _) = run(
            "stat",
            &["-c", "%u %a", mnt.join("secret").to_str().unwrap()],
        );
        assert_eq!(out.trim(), "4242 440");
        let (_, out, _) = run(
            "findmnt",
            &["-n", "-o", "FSTYPE,SOURCE", mnt.to_str().unwrap()],
        );
        assert_eq!(
            out.split_whitespace().collect::<Vec<_>>(),
            vec!["fuse.ssmfs", "ssmfs:/viamount"]
        );
    });
    let _ = run("umount", &[mnt.to_str().unwrap()]);
    result.unwrap();
    within(
        Duration::from_secs(10),
        "the daemon ends with umount",
        || !daemon_running_for(&mnt),
    );

    // The same as an /etc/fstab line (`mount -T` reads an fstab of our own, so
    // the host's is left alone): `mount <mountpoint>` finds the rest there.
    let fstab = dir.path().join("fstab");
    std::fs::write(
        &fstab,
        format!("/viamount {} fuse.ssmfs {options} 0 0\n", mnt.display()),
    )
    .unwrap();
    mount_8(&["-T", fstab.to_str().unwrap(), mnt.to_str().unwrap()]);
    let read = std::fs::read(mnt.join("secret"));
    let _ = run("umount", &[mnt.to_str().unwrap()]);
    assert_eq!(read.unwrap(), b"through-the-helper");
}

/// Runs mount(8) with the test's AWS environment and requires it to succeed.
fn mount_8(args: &[&str]) {
    let out = Command::new("mount")
        .args(args)
        .envs(aws_env())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The shipped unit's ExecStart and example environment file, as systemd would
/// expand them: `${VAR}` from the file (single quotes stripped), the mount point
/// (last argument) and --foreground left to the harness.
fn shipped_unit_command_line() -> (Vec<String>, Vec<(String, String)>) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/systemd");
    let unit = std::fs::read_to_string(root.join("ssmfs-airflow.service")).unwrap();
    let env_file = std::fs::read_to_string(root.join("ssmfs-airflow.env")).unwrap();
    let env: Vec<(String, String)> = env_file
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.contains('='))
        .map(|l| {
            let (key, value) = l.split_once('=').unwrap();
            (key.to_string(), value.trim_matches('\'').to_string())
        })
        .collect();
    let exec_start = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("the unit has an ExecStart");
    let lookup = |key: &str| {
        env.iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("the unit uses ${key}, which the env file does not set"))
    };
    let mut args: Vec<String> = exec_start
        .split_whitespace()
        .skip(1)
        .flat_map(|word| match word.strip_prefix('$') {
            // `$VAR` alone: systemd splits the value into words (none if empty).
            Some(key) if !key.starts_with('{') => lookup(key)
                .split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>(),
            _ => vec![env.iter().fold(word.to_string(), |w, (k, v)| {
                w.replace(&format!("${{{k}}}"), v)
            })],
        })
        .filter(|a| a != "--foreground")
        .collect();
    assert_eq!(args.pop().as_deref(), Some("/mnt/airflow"));
    (args, env)
}

#[test]
fn the_shipped_systemd_unit_mounts_and_speaks_sd_notify() {
    if !have_fuse_and_moto() {
        return;
    }
    let moto = Moto::start();
    let rt = runtime();
    let client = client(&rt, &moto.endpoint);
    seed_airflow(&rt, &client);
    let (args, env) = shipped_unit_command_line();
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    env.push(("NOTIFY_SOCKET", socket_path.to_str().unwrap()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut mount = Mount::start_with(&moto.endpoint, &args, &env);
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    let secret = mount.path().join("variables/my_var");
    assert_eq!(std::fs::read(&secret).unwrap(), b"variable-value");
    let (_, out, _) = run("stat", &["-c", "%u %g %a", secret.to_str().unwrap()]);
    assert_eq!(out.trim(), "50000 50000 400", "owned by AIRFLOW_UID/GID");
    assert!(mount.signal(libc::SIGTERM).success());
    let n = socket.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
}

#[test]
fn sighup_drops_cached_values() {
    if !have_fuse_and_moto() {
        return;
    }
    let moto = Moto::start();
    let rt = runtime();
    let client = client(&rt, &moto.endpoint);
    put(&rt, &client, "/hup/key", "before", ParameterType::String);
    let mount = Mount::start(&moto.endpoint, "/hup", &["--ttl", "1h"]);
    assert_eq!(std::fs::read(mount.path().join("key")).unwrap(), b"before");
    put(
        &rt,
        &client,
        "/hup/key",
        "after-the-hangup",
        ParameterType::String,
    );
    assert_eq!(
        std::fs::read(mount.path().join("key")).unwrap(),
        b"before",
        "cached for an hour"
    );
    unsafe { libc::kill(mount.child.as_ref().unwrap().id() as i32, libc::SIGHUP) };
    within(Duration::from_secs(3), "SIGHUP drops the cache", || {
        std::fs::read(mount.path().join("key")).unwrap() == b"after-the-hangup"
    });
}

#[test]
fn a_stale_mount_left_by_a_killed_daemon_is_recovered() {
    if !have_fuse_and_moto() {
        return;
    }
    let moto = Moto::start();
    let rt = runtime();
    let client = client(&rt, &moto.endpoint);
    put(&rt, &client, "/stale/k", "v", ParameterType::String);
    let mut first = Mount::start(&moto.endpoint, "/stale", &[]);
    let mnt = first.path();
    let status = first.signal(libc::SIGKILL);
    assert!(!status.success());
    let err = std::fs::metadata(&mnt).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOTCONN),
        "the kill left a stale mount"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_ssmfs"))
        .args([
            "--endpoint-url",
            &moto.endpoint,
            "--log-file",
            first.dir.path().join("second.log").to_str().unwrap(),
            "/stale",
        ])
        .arg(&mnt)
        .envs(aws_env())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(mnt.join("k")).unwrap(), b"v");
    assert_eq!(run("umount", &[mnt.to_str().unwrap()]).0, 0);
}

#[test]
fn metrics_count_what_was_done() {
    if !have_fuse_and_moto() {
        return;
    }
    let moto = Moto::with_secret("/met/a", "secret-metrics-value");
    let addr = format!("127.0.0.1:{}", free_loopback_port());
    let mount = Mount::start(&moto.endpoint, "/met", &["--metrics-addr", &addr]);
    for _ in 0..5 {
        assert_eq!(
            std::fs::read(mount.path().join("a")).unwrap(),
            b"secret-metrics-value"
        );
    }
    let _ = std::fs::read(mount.path().join("missing"));
    let (code, body, _) = run("curl", &["-sf", &format!("http://{addr}/metrics")]);
    assert_eq!(code, 0);
    let value = |prefix: &str| -> f64 {
        body.lines()
            .filter(|l| l.starts_with(prefix))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    };
    // The mount's one call listed /met completely: five reads of `a` and the
    // lookup of `missing` were answered from that listing.
    assert_eq!(value("ssmfs_api_calls_total"), 1.0, "{body}");
    assert_eq!(
        value("ssmfs_api_calls_total{operation=\"GetParametersByPath\",outcome=\"ok\"}"),
        1.0,
        "{body}"
    );
    assert!(value("ssmfs_cache_hits_total") >= 1.0, "{body}");
    assert!(
        value("ssmfs_fuse_request_seconds_count{operation=\"lookup\"}") >= 2.0,
        "{body}"
    );
    assert!(value("ssmfs_cache_entries") >= 1.0);
    assert!(!body.contains("secret-metrics-value"));
}

#[test]
fn role_arn_is_assumed_through_sts() {
    if !have_fuse_and_moto() {
        return;
    }
    let moto = Moto::start();
    let rt = runtime();
    let client = client(&rt, &moto.endpoint);
    put(&rt, &client, "/role/a", "as-role", ParameterType::String);
    let base = moto.requests();
    let plain = Mount::start(&moto.endpoint, "/role", &[]);
    assert_eq!(std::fs::read(plain.path().join("a")).unwrap(), b"as-role");
    let without_role = moto.requests() - base;
    drop(plain);
    let base = moto.requests();
    let role = Mount::start(
        &moto.endpoint,
        "/role",
        &[
            "--role-arn",
            "arn:aws:iam::123456789012:role/airflow-worker",
        ],
    );
    assert_eq!(std::fs::read(role.path().join("a")).unwrap(), b"as-role");
    let with_role = moto.requests() - base;
    assert_eq!(
        with_role,
        without_role + 1,
        "one AssumeRole call to STS, then the same SSM calls"
    );
}
