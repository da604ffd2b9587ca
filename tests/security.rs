//! Security end to end: who may read (the kernel enforcing modes, other users
//! kept out unless allowed), process hardening, and hostile names and sizes
//! through a real mount.

mod support;

use std::process::Command;

use aws_sdk_ssm::types::ParameterType;
use support::*;

/// Runs `cat path` as `uid` (gid the same) and returns (exit code, stderr).
fn cat_as(uid: u32, path: &std::path::Path) -> (i32, String, String) {
    let id = uid.to_string();
    let reuid = format!("--reuid={id}");
    let regid = format!("--regid={id}");
    run(
        "setpriv",
        &[
            &reuid,
            &regid,
            "--clear-groups",
            "cat",
            path.to_str().unwrap(),
        ],
    )
}

#[test]
fn only_the_mounting_user_enters_by_default() {
    if !have_fuse_and_moto() {
        return;
    }
    let moto = Moto::with_secret("/acl/secret", "for-root-only");
    let mount = Mount::start(&moto.endpoint, "/acl", &[]);
    let file = mount.path().join("secret");
    assert_eq!(std::fs::read(&file).unwrap(), b"for-root-only");
    let (code, out, err) = cat_as(65534, &file);
    assert_ne!(code, 0);
    assert!(out.is_empty() && err.contains("Permission denied"), "{err}");
}

#[test]
fn allow_other_with_uid_lets_exactly_that_user_read() {
    if !have_fuse_and_moto() {
        return;
    }
    let moto = Moto::with_secret("/acl2/secret", "for-the-airflow-user");
    let mount = Mount::start(
        &moto.endpoint,
        "/acl2",
        &[
            "--allow-other",
            "--uid",
            "50000",
            "--gid",
            "50000",
            "--file-mode",
            "0400",
        ],
    );
    let file = mount.path().join("secret");
    let (code, out, err) = cat_as(50000, &file);
    assert_eq!((code, out.as_str()), (0, "for-the-airflow-user"), "{err}");
    let (code, out, err) = cat_as(50001, &file);
    assert_ne!(code, 0);
    assert!(out.is_empty() && err.contains("Permission denied"), "{err}");
    let (code, _, err) = cat_as(65534, &file);
    assert!(code != 0 && err.contains("Permission denied"), "{err}");
}

#[test]
fn mlock_without_privilege_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let out = Command::new("prlimit")
        .args([
            "--memlock=0:0",
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ])
        .arg(env!("CARGO_BIN_EXE_ssmfs"))
        .args(["--mlock", "-f", "/x"])
        .arg(&mnt)
        .envs(aws_env())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--mlock") && err.contains("CAP_IPC_LOCK"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(!ssmfs::daemon::is_mount_point(&mnt));
}

#[test]
fn hardening_makes_the_process_non_dumpable_without_core_files() {
    // In a child, so the test process itself stays as it was.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let ok = ssmfs::daemon::harden_process(false).is_ok()
            && unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) } == 0
            && {
                let mut limit = libc::rlimit {
                    rlim_cur: 1,
                    rlim_max: 1,
                };
                unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut limit) };
                limit.rlim_cur == 0 && limit.rlim_max == 0
            };
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
}

#[test]
fn hostile_names_and_sizes_get_the_right_answer_and_the_daemon_stays_up() {
    if !have_fuse_and_moto() {
        return;
    }
    let moto = Moto::start();
    let rt = runtime();
    let client = client(&rt, &moto.endpoint);
    let big: String = (0..8192).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    let tricky = "multi-byte \u{1F511} \u{e9}\u{4e2d} and control \u{1}\u{7}\t\r\n end";
    rt.block_on(
        client
            .put_parameter()
            .name("/h/big")
            .value(&big)
            .r#type(ParameterType::String)
            .tier(aws_sdk_ssm::types::ParameterTier::Advanced)
            .send(),
    )
    .unwrap();
    put(
        &rt,
        &client,
        "/h/tricky",
        tricky,
        ParameterType::SecureString,
    );
    put(&rt, &client, "/h/dots...", "dots", ParameterType::String);
    let mount = Mount::start(&moto.endpoint, "/h", &[]);
    let m = mount.path();
    assert_eq!(std::fs::read(m.join("big")).unwrap(), big.as_bytes());
    assert_eq!(std::fs::metadata(m.join("big")).unwrap().len(), 8192);
    assert_eq!(std::fs::read(m.join("tricky")).unwrap(), tricky.as_bytes());
    assert_eq!(std::fs::read(m.join("dots...")).unwrap(), b"dots");
    let before = moto.requests();
    for (name, errno) in [
        ("sp ace", libc::ENOENT),
        ("semi;colon", libc::ENOENT),
        ("caf\u{e9}", libc::ENOENT),
        ("@value", libc::ENOENT),
        ("back\\slash", libc::ENOENT),
    ] {
        let err = std::fs::read(m.join(name)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(errno), "{name}");
    }
    let long = "a".repeat(250);
    let mut path = m.clone();
    for _ in 0..5 {
        path = path.join(&long);
    }
    let err = std::fs::read(&path).unwrap_err();
    assert!(
        matches!(
            err.raw_os_error(),
            Some(libc::ENOENT) | Some(libc::ENAMETOOLONG)
        ),
        "{err}"
    );
    let deep: std::path::PathBuf = (0..20).map(|i| format!("d{i}")).collect();
    assert_eq!(
        std::fs::read(m.join(deep)).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
    // Only the first segment of the long and deep paths could ever be asked about.
    assert!(
        moto.requests() - before <= 4,
        "impossible names reached SSM"
    );
    assert_eq!(
        std::fs::read(m.join("tricky")).unwrap(),
        tricky.as_bytes(),
        "still serving"
    );
}

#[test]
fn a_dedicated_unprivileged_user_can_run_the_daemon() {
    if !have_fuse_and_moto() {
        return;
    }
    assert!(
        require(
            std::path::Path::new("/usr/bin/fusermount3").exists(),
            "fusermount3 (Debian package fuse3)"
        ),
        "fusermount3 is needed"
    );
    let moto = Moto::with_secret("/unpriv/secret", "served-by-nobody");
    // Distributions make /dev/fuse 0666 and let the setuid fusermount3 do the
    // mount(2); some containers ship it 0600, so open it up as a host would.
    use std::os::unix::fs::PermissionsExt;
    let dev_mode = std::fs::metadata("/dev/fuse").unwrap().permissions().mode();
    std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(0o666)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let binary = dir.path().join("ssmfs");
    std::fs::copy(env!("CARGO_BIN_EXE_ssmfs"), &binary).unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    std::os::unix::fs::chown(&mnt, Some(65534), Some(65534)).unwrap();
    let log = dir.path().join("log");
    let mut child = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&binary)
        .args(["--foreground", "--endpoint-url", &moto.endpoint, "/unpriv"])
        .arg(&mnt)
        .envs(aws_env())
        .env("HOME", dir.path())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let result = std::panic::catch_unwind(|| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !ssmfs::daemon::is_mount_point(&mnt) {
            assert!(
                std::time::Instant::now() < deadline && child_alive(child.id()),
                "not mounted: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let file = mnt.join("secret");
        let (code, out, err) = cat_as(65534, &file);
        assert_eq!((code, out.as_str()), (0, "served-by-nobody"), "{err}");
        // Not even root enters a mount that did not allow it.
        let denied = std::fs::read(&file).unwrap_err();
        assert_eq!(denied.raw_os_error(), Some(libc::EACCES));
    });
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let still_mounted = ssmfs::daemon::is_mount_point(&mnt);
    if still_mounted {
        let _ = ssmfs::daemon::lazy_unmount(&mnt);
    }
    std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(dev_mode)).unwrap();
    result.unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!still_mounted, "SIGTERM must unmount through fusermount3");
}

fn child_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn ten_thousand_entries_in_one_directory_list_completely() {
    if !have_fuse_and_moto() {
        return;
    }
    let moto = Moto::start();
    let rt = runtime();
    let client = client(&rt, &moto.endpoint);
    let started = std::time::Instant::now();
    put_many(
        &rt,
        &client,
        (0..10_000)
            .map(|i| (format!("/wide/dir/k{i:05}"), format!("{i}")))
            .collect(),
        ParameterType::String,
    );
    eprintln!("seeded 10,000 parameters in {:?}", started.elapsed());
    let mount = Mount::start(&moto.endpoint, "/wide", &["--max-tps", "1000"]);
    let dir = mount.path().join("dir");
    let (code, out, err) = run("ls", &[dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let names: Vec<&str> = out.lines().collect();
    assert_eq!(names.len(), 10_000);
    assert_eq!(names.first(), Some(&"k00000"));
    assert_eq!(names.last(), Some(&"k09999"));
    let (code, out, _) = run("find", &[dir.to_str().unwrap(), "-type", "f"]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 10_000);
    assert_eq!(std::fs::read(dir.join("k04321")).unwrap(), b"4321");
}
