//! `ssmfs exec` and `ssmfs render` driven as users run them, without FUSE:
//! the values are files in a temporary directory and the change stream is
//! a FIFO named `@changes` there (`--changes`), which the test holds open
//! for writing and announces rotations on, as a mount's stream would. The
//! tests count what happened (restarts, renders, command runs, log lines);
//! they wait for a count, never assert how long something took.

mod support;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use support::{lines_of, within, Background};

const SSMFS: &str = env!("CARGO_BIN_EXE_ssmfs");

/// Long enough for a loaded CI machine; a pass never waits this long.
const PATIENCE: Duration = Duration::from_secs(30);

struct Fixture {
    dir: tempfile::TempDir,
    /// The FIFO's write end (opened read-write, so opening never blocks
    /// and the reader never sees EOF).
    stream: fs::File,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("@changes");
        let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let stream = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fifo)
            .unwrap();
        Self { dir, stream }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn changes(&self) -> String {
        self.path("@changes").display().to_string()
    }

    /// Replaces a value the way a mount shows a new version: whole.
    fn put(&self, name: &str, value: &str) {
        // Beside the directories, not in them: a listing sees no temp file.
        let temp = self.path(&format!(".{}.tmp", name.replace('/', "_")));
        fs::write(&temp, value).unwrap();
        fs::rename(&temp, self.path(name)).unwrap();
    }

    fn announce(&mut self, line: &str) {
        self.stream
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
    }

    fn lines(&self, name: &str) -> Vec<String> {
        lines_of(&self.path(name))
    }

    fn log(&self) -> String {
        fs::read_to_string(self.path("stderr.log")).unwrap_or_default()
    }

    /// Runs `ssmfs ARGS...` in the fixture's directory, its stderr in `stderr.log`.
    fn start(&self, args: &[&str]) -> Background {
        let mut command = Command::new(SSMFS);
        command.args(args).current_dir(self.dir.path());
        Background::start(command, self.path("stderr.log"))
    }
}

fn wait_for(what: &str, done: impl FnMut() -> bool) {
    within(PATIENCE, what, done);
}

fn exec_args<'a>(fixture: &'a Fixture, extra: &[&'a str], script: &'a str) -> Vec<String> {
    let mut args: Vec<String> = ["exec", "--changes", &fixture.changes()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["--", "sh", "-c", script].iter().map(|s| s.to_string()));
    args
}

fn start_exec(fixture: &Fixture, extra: &[&str], script: &str) -> Background {
    let args = exec_args(fixture, extra, script);
    fixture.start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn exec_restarts_the_child_with_the_new_value() {
    let mut fixture = Fixture::new();
    fixture.put("db", "pw-one-7f3a");
    let env = format!("DB={}", fixture.path("db").display());
    let running = start_exec(
        &fixture,
        &["--env", &env, "--debounce", "100ms"],
        "echo \"$DB\" >> out; exec sleep 1000",
    );
    wait_for("the first start", || fixture.lines("out").len() == 1);
    fixture.put("db", "pw-two-9c1e");
    fixture.announce("db 2");
    wait_for("the restart", || fixture.lines("out").len() == 2);
    assert_eq!(fixture.lines("out"), ["pw-one-7f3a", "pw-two-9c1e"]);
    drop(running);
    let log = fixture.log();
    assert!(log.contains("DB changed: restarting"), "{log}");
    assert!(
        !log.contains("pw-one") && !log.contains("pw-two"),
        "a value was logged: {log}"
    );
}

#[test]
fn a_restart_kills_what_is_left_of_the_old_process_group() {
    let mut fixture = Fixture::new();
    fixture.put("db", "pw-one");
    let env = format!("DB={}", fixture.path("db").display());
    // A member of the child's group that ignores SIGTERM; the grace is long,
    // so only the kill before the new child can end it.
    let running = start_exec(
        &fixture,
        &["--env", &env, "--debounce", "100ms", "--grace", "60s"],
        "sh -c \"trap '' TERM; exec sleep 1000\" & echo $! >> pids; echo \"$DB\" >> out; exec sleep 1000",
    );
    wait_for("the first start", || fixture.lines("pids").len() == 1);
    let first: i32 = fixture.lines("pids")[0].parse().unwrap();
    fixture.put("db", "pw-two");
    fixture.announce("db 2");
    wait_for("the restart", || fixture.lines("out").len() == 2);
    // SAFETY: kill with signal 0 only asks whether the process exists.
    wait_for("the old group's member to be gone", || unsafe {
        libc::kill(first, 0) != 0
    });
    drop(running);
}

#[test]
fn ten_rotations_in_a_burst_are_one_restart_and_an_unchanged_value_none() {
    let mut fixture = Fixture::new();
    fixture.put("db", "v0");
    fixture.put("unrelated", "u0");
    let env = format!("DB={}", fixture.path("db").display());
    let _running = start_exec(
        &fixture,
        &["--env", &env, "--debounce", "500ms"],
        "echo \"$DB\" >> out; exec sleep 1000",
    );
    wait_for("the first start", || fixture.lines("out").len() == 1);
    for version in 1..=10 {
        fixture.put("db", &format!("v{version}"));
        fixture.announce(&format!("db {version}"));
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_for("the restart", || fixture.lines("out").len() >= 2);
    // A line for a file it does not use, and one for its file whose value
    // is what the child already has: neither restarts it.
    fixture.put("unrelated", "u1");
    fixture.announce("unrelated 1");
    fixture.announce("db 10");
    std::thread::sleep(Duration::from_millis(1500));
    fixture.put("db", "v11");
    fixture.announce("db 11");
    wait_for("the next restart", || fixture.lines("out").len() >= 3);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(fixture.lines("out"), ["v0", "v10", "v11"]);
}

#[test]
fn exec_sends_the_signal_instead_of_restarting() {
    let mut fixture = Fixture::new();
    fixture.put("db", "a1");
    let env = format!("DB={}", fixture.path("db").display());
    let _running = start_exec(
        &fixture,
        &[
            "--env",
            &env,
            "--debounce",
            "50ms",
            "--on-change",
            "signal:HUP",
        ],
        "trap 'echo hup >> out' HUP; echo start >> out; while :; do sleep 0.05; done",
    );
    wait_for("the start", || fixture.lines("out").len() == 1);
    fixture.put("db", "a2");
    fixture.announce("db 2");
    wait_for("the signal", || {
        fixture.lines("out").contains(&"hup".to_string())
    });
    assert_eq!(fixture.lines("out"), ["start", "hup"]);
}

#[test]
fn on_change_exit_stops_the_child_and_exits_zero() {
    let mut fixture = Fixture::new();
    fixture.put("db", "a1");
    let env = format!("DB={}", fixture.path("db").display());
    let running = start_exec(
        &fixture,
        &["--env", &env, "--debounce", "50ms", "--on-change", "exit"],
        "echo start >> out; exec sleep 1000",
    );
    wait_for("the start", || fixture.lines("out").len() == 1);
    fixture.put("db", "a2");
    fixture.announce("db 2");
    assert_eq!(running.wait(PATIENCE).code(), Some(0));
}

#[test]
fn exec_exits_with_the_childs_code() {
    let fixture = Fixture::new();
    fixture.put("db", "x");
    let env = format!("DB={}", fixture.path("db").display());
    let status = start_exec(&fixture, &["--env", &env], "exit 7").wait(PATIENCE);
    assert_eq!(status.code(), Some(7));
    let status = start_exec(&fixture, &["--env", &env], "kill -TERM $$").wait(PATIENCE);
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    // A command that does not exist: what a shell answers.
    let args = ["exec", "--env", &env, "--", "/nonexistent/program"];
    assert_eq!(fixture.start(&args).wait(PATIENCE).code(), Some(127));
}

#[test]
fn sigterm_is_forwarded_and_the_childs_code_returned() {
    let fixture = Fixture::new();
    fixture.put("db", "x");
    let env = format!("DB={}", fixture.path("db").display());
    let running = start_exec(
        &fixture,
        &["--env", &env],
        "trap 'exit 5' TERM; echo ready >> out; while :; do sleep 0.05; done",
    );
    wait_for("the start", || fixture.lines("out").len() == 1);
    running.signal(libc::SIGTERM);
    assert_eq!(running.wait(PATIENCE).code(), Some(5));
}

#[test]
fn a_missing_file_at_start_waits_and_never_starts_with_part_of_the_values() {
    let fixture = Fixture::new();
    fixture.put("a", "value-a-55e1");
    let env_a = format!("A={}", fixture.path("a").display());
    let env_b = format!("B={}", fixture.path("b").display());
    let _running = start_exec(
        &fixture,
        &["--env", &env_a, "--env", &env_b],
        "echo \"$A $B\" >> out; exec sleep 1000",
    );
    let missing = fixture.path("b").display().to_string();
    wait_for("the error line", || fixture.log().contains(&missing));
    assert!(
        fixture.lines("out").is_empty(),
        "started with part of its values"
    );
    std::thread::sleep(Duration::from_millis(1500));
    fixture.put("b", "value-b-0a9d");
    wait_for("the start", || fixture.lines("out").len() == 1);
    assert_eq!(fixture.lines("out"), ["value-a-55e1 value-b-0a9d"]);
    let log = fixture.log();
    let errors = log.lines().filter(|line| line.contains(&missing)).count();
    // One line per back-off step (1 s, 2 s, ...), not a flood.
    assert!((1..=3).contains(&errors), "{errors} lines: {log}");
    assert!(log.contains("No such file"), "{log}");
    assert!(!log.contains("value-a"), "a value was logged: {log}");
}

#[test]
fn a_crash_loop_backs_off_one_line_per_step() {
    let fixture = Fixture::new();
    fixture.put("db", "x");
    let env = format!("DB={}", fixture.path("db").display());
    let running = start_exec(
        &fixture,
        &["--env", &env, "--on-exit", "restart"],
        "echo run >> out; exit 3",
    );
    // Starts at 0 s, then after 1 s and 2 s more.
    wait_for("three runs", || fixture.lines("out").len() == 3);
    running.signal(libc::SIGTERM);
    // Between runs it exits as SIGTERM would end it; during one (rare:
    // the child lives a few milliseconds), with the child's code.
    let code = running.wait(PATIENCE).code();
    assert!(
        code == Some(128 + libc::SIGTERM) || code == Some(3),
        "{code:?}"
    );
    let log = fixture.log();
    let steps: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("exited with 3"))
        .collect();
    assert!(steps.len() == 3 || steps.len() == 2, "{log}");
    assert!(
        steps[0].ends_with("in 1s") && steps[1].ends_with("in 2s"),
        "{log}"
    );
}

#[test]
fn usage_errors_are_one_line_with_exit_2() {
    let fixture = Fixture::new();
    for (args, says) in [
        (&["exec", "--env", "DB", "--", "true"][..], "NAME=PATH"),
        (&["exec", "--env", "=/x", "--", "true"], "empty"),
        (&["exec", "--env", "1X=/x", "--", "true"], "'1X'"),
        (
            &["exec", "--on-change", "signal:BOGUS", "--", "true"],
            "BOGUS",
        ),
        (
            &["render", "--template", "a:b:999"],
            "'999' is not an octal",
        ),
        (
            &["render", "--template", "a:b", "--owner", "nginx"],
            "numeric",
        ),
    ] {
        let output = Command::new(SSMFS)
            .args(args)
            .current_dir(fixture.dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

#[test]
fn render_once_writes_the_output_with_its_mode() {
    let fixture = Fixture::new();
    fixture.put("pw", "s3cret-1");
    fixture.put("cfg", r#"{"user": "app"}"#);
    fs::write(
        fixture.path("t.j2"),
        "user={{ json('cfg', 'user') }}\npassword={{ file('pw') }}\n",
    )
    .unwrap();
    let root = fixture.dir.path().display().to_string();
    let status = fixture
        .start(&[
            "render",
            "--once",
            "--root",
            &root,
            "--template",
            "t.j2:out.conf:0640",
        ])
        .wait(PATIENCE);
    assert!(status.success(), "{}", fixture.log());
    assert_eq!(
        fs::read_to_string(fixture.path("out.conf")).unwrap(),
        "user=app\npassword=s3cret-1\n"
    );
    let mode = fs::metadata(fixture.path("out.conf"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640);
}

#[test]
fn a_missing_dest_directory_is_named() {
    let fixture = Fixture::new();
    fixture.put("pw", "s3cret-1");
    fs::write(fixture.path("t.j2"), "{{ file('pw') }}").unwrap();
    let root = fixture.dir.path().display().to_string();
    let status = fixture
        .start(&[
            "render",
            "--once",
            "--root",
            &root,
            "--template",
            "t.j2:no-such-dir/out.conf",
        ])
        .wait(PATIENCE);
    assert!(!status.success());
    let log = fixture.log();
    assert!(
        log.contains("its directory no-such-dir does not exist"),
        "{log}"
    );
    assert!(!log.contains("s3cret"), "{log}");
}

#[test]
fn a_render_error_is_one_line_keeps_the_old_output_and_runs_no_command() {
    let fixture = Fixture::new();
    fixture.put("pw", "hunter22-secret");
    fs::write(fixture.path("out"), "old").unwrap();
    fs::write(
        fixture.path("t.j2"),
        "a={{ file('pw') }}\n\nb={{ file('db/missing') }}\n",
    )
    .unwrap();
    let root = fixture.dir.path().display().to_string();
    let status = fixture
        .start(&[
            "render",
            "--once",
            "--root",
            &root,
            "--template",
            "t.j2:out",
            "--command",
            "touch ran",
        ])
        .wait(PATIENCE);
    assert_eq!(status.code(), Some(1));
    assert_eq!(fs::read_to_string(fixture.path("out")).unwrap(), "old");
    assert!(!fixture.path("ran").exists(), "the command ran");
    let log = fixture.log();
    assert_eq!(log.lines().count(), 1, "{log}");
    assert!(log.contains("template t.j2 line 3"), "{log}");
    assert!(
        log.contains(&fixture.path("db/missing").display().to_string()),
        "{log}"
    );
    assert!(!log.contains("hunter22"), "a value was logged: {log}");
}

#[test]
fn a_failing_or_hanging_command_is_one_line() {
    let fixture = Fixture::new();
    fs::write(fixture.path("t.j2"), "static\n").unwrap();
    let status = fixture
        .start(&[
            "render",
            "--once",
            "--template",
            "t.j2:out1",
            "--command",
            "exit 4",
        ])
        .wait(PATIENCE);
    assert_eq!(status.code(), Some(1));
    let log = fixture.log();
    assert!(log.contains("--command failed: exit status: 4"), "{log}");
    let status = fixture
        .start(&[
            "render",
            "--once",
            "--template",
            "t.j2:out2",
            "--command",
            "sleep 100",
            "--command-timeout",
            "1s",
        ])
        .wait(PATIENCE);
    assert_eq!(status.code(), Some(1));
    let log = fixture.log();
    assert!(log.contains("--command timed out after 1s"), "{log}");
    assert_eq!(
        log.lines().filter(|l| l.contains("--command")).count(),
        1,
        "{log}"
    );
}

#[test]
fn render_follows_changes_and_runs_the_command_only_when_the_output_changed() {
    let mut fixture = Fixture::new();
    fixture.put("pw", "v1");
    fixture.put("other", "o1");
    fs::write(fixture.path("t.j2"), "pw={{ file('pw') }}\n").unwrap();
    let ran = fixture.path("ran").display().to_string();
    let command = format!("echo run >> {ran}");
    let _running = fixture.start(&[
        "render",
        "--changes",
        &fixture.changes(),
        "--debounce",
        "100ms",
        "--template",
        "t.j2:out",
        "--command",
        &command,
    ]);
    wait_for("the first render", || fixture.lines("ran").len() == 1);
    assert_eq!(fixture.lines("out"), ["pw=v1"]);
    // Announced but unchanged, and a file the template does not read.
    fixture.announce("pw 1");
    fixture.put("other", "o2");
    fixture.announce("other 2");
    std::thread::sleep(Duration::from_millis(600));
    fixture.put("pw", "v2");
    fixture.announce("pw 2");
    wait_for("the second render", || fixture.lines("out") == ["pw=v2"]);
    wait_for("the command", || fixture.lines("ran").len() >= 2);
    // A missing file keeps the output, then renders once it appears.
    fs::write(
        fixture.path("t.j2"),
        "pw={{ file('pw') }} {{ file('later') }}\n",
    )
    .unwrap();
    fixture.announce("@dropped");
    wait_for("the error", || fixture.log().contains("later"));
    assert_eq!(fixture.lines("out"), ["pw=v2"]);
    fixture.put("later", "L");
    fixture.announce("later 1");
    wait_for("the third render", || fixture.lines("out") == ["pw=v2 L"]);
    wait_for("the command", || fixture.lines("ran").len() >= 3);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fixture.lines("ran").len(), 3, "{}", fixture.log());
}

#[test]
fn readers_never_see_a_partial_output_over_many_rewrites() {
    const ROTATIONS: usize = 300;
    const SIZE: usize = 4096;
    let mut fixture = Fixture::new();
    let value = |i: usize| String::from_utf8(vec![b'a' + (i % 26) as u8; SIZE]).unwrap();
    fixture.put("v", &value(0));
    fs::write(fixture.path("t.j2"), "{{ file('v') }}").unwrap();
    let _running = fixture.start(&[
        "render",
        "--changes",
        &fixture.changes(),
        "--debounce",
        "0s",
        "--template",
        "t.j2:out",
    ]);
    let out = fixture.path("out");
    wait_for("the first render", || out.exists());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (out, stop) = (out.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut reads, mut partial) = (0usize, 0usize);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let bytes = fs::read(&out).unwrap();
                reads += 1;
                if bytes.len() != SIZE || bytes.iter().any(|b| *b != bytes[0]) {
                    partial += 1;
                }
            }
            (reads, partial)
        })
    };
    for i in 1..=ROTATIONS {
        fixture.put("v", &value(i));
        fixture.announce(&format!("v {i}"));
        let want = b'a' + (i % 26) as u8;
        wait_for("the render", || {
            fs::read(&out).is_ok_and(|b| b.first() == Some(&want))
        });
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (reads, partial) = reader.join().unwrap();
    assert!(reads > ROTATIONS, "the reader read {reads} times");
    assert_eq!(
        partial, 0,
        "{partial} of {reads} reads saw a partial or mixed file"
    );
    let leftovers: Vec<_> = fs::read_dir(fixture.dir.path())
        .unwrap()
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_name().to_string_lossy().contains("ssmfs-render"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn airflow_and_chamber_directories_name_variables() {
    let fixture = Fixture::new();
    fs::create_dir_all(fixture.path("app")).unwrap();
    fs::create_dir_all(fixture.path("airflow/variables")).unwrap();
    fs::create_dir_all(fixture.path("airflow/connections")).unwrap();
    fs::write(fixture.path("app/db-host"), "db.internal").unwrap();
    fs::write(fixture.path("airflow/variables/env_name"), "prod").unwrap();
    fs::write(
        fixture.path("airflow/connections/my_pg"),
        "postgres://u:p@h/db",
    )
    .unwrap();
    let dir = |name: &str| fixture.path(name).display().to_string();
    let status = fixture
        .start(&[
            "exec",
            "--env-dir",
            &dir("app"),
            "--airflow-dir",
            &dir("airflow"),
            "--",
            "sh",
            "-c",
            "echo \"$DB_HOST|$AIRFLOW_VAR_ENV_NAME|$AIRFLOW_CONN_MY_PG\" > out",
        ])
        .wait(PATIENCE);
    assert!(status.success(), "{}", fixture.log());
    assert_eq!(
        fixture.lines("out"),
        ["db.internal|prod|postgres://u:p@h/db"]
    );
}

#[test]
fn a_file_created_in_an_env_dir_restarts_the_child_with_it() {
    let mut fixture = Fixture::new();
    fs::create_dir_all(fixture.path("app")).unwrap();
    fs::write(fixture.path("app/db-host"), "h1").unwrap();
    let dir = fixture.path("app").display().to_string();
    let _running = start_exec(
        &fixture,
        &["--env-dir", &dir, "--debounce", "50ms"],
        "echo \"$DB_HOST|${API_KEY:-none}\" >> out; exec sleep 1000",
    );
    wait_for("the first start", || fixture.lines("out").len() == 1);
    // A name in the directory the child does not have yet.
    fixture.put("app/api-key", "k1");
    fixture.announce("app/api-key 1");
    wait_for("the restart", || fixture.lines("out").len() >= 2);
    fs::remove_file(fixture.path("app/api-key")).unwrap();
    fixture.announce("app/api-key deleted");
    wait_for("the next restart", || fixture.lines("out").len() >= 3);
    assert_eq!(fixture.lines("out"), ["h1|none", "h1|k1", "h1|none"]);
}

#[test]
fn python_reads_airflow_names_as_airflow_does() {
    if Command::new("python3").args(["-c", "0"]).output().is_err() {
        eprintln!("skipped: no python3");
        return;
    }
    let fixture = Fixture::new();
    fs::create_dir_all(fixture.path("airflow/connections")).unwrap();
    fs::write(
        fixture.path("airflow/connections/my-pg"),
        "postgres://u:p@h/db",
    )
    .unwrap();
    let dir = fixture.path("airflow").display().to_string();
    let status = fixture
        .start(&[
            "exec",
            "--airflow-dir",
            &dir,
            "--",
            "python3",
            "-c",
            // Airflow's lookup: os.environ.get("AIRFLOW_CONN_" + conn_id.upper()).
            "import os; open('out', 'w').write(os.environ['AIRFLOW_CONN_' + 'my-pg'.upper()])",
        ])
        .wait(PATIENCE);
    assert!(status.success(), "{}", fixture.log());
    assert_eq!(fixture.lines("out"), ["postgres://u:p@h/db"]);
}
