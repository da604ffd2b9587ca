//! Beyond the plain tree, end to end: selectors (`NAME:3`, `NAME:prod`),
//! extended attributes (`getfattr`), field views (`NAME@json/`,
//! `NAME@conn/`), and Secrets Manager through SSM's pass-through, on a real
//! mount against moto, read with real tools, API calls counted in moto's log.

mod support;

use std::path::Path;

use aws_sdk_ssm::types::ParameterType;
use support::*;

fn cat(path: &Path) -> Result<String, i32> {
    std::fs::read_to_string(path).map_err(|e| e.raw_os_error().unwrap_or(-1))
}

fn getfattr(args: &[&str]) -> String {
    let (code, out, err) = run("getfattr", args);
    assert_eq!(code, 0, "getfattr {args:?}: {err}");
    out
}

fn label(
    rt: &tokio::runtime::Runtime,
    client: &aws_sdk_ssm::Client,
    name: &str,
    version: i64,
    label: &str,
) {
    rt.block_on(
        client
            .label_parameter_version()
            .name(name)
            .parameter_version(version)
            .labels(label)
            .send(),
    )
    .unwrap();
}

#[test]
fn versions_and_labels_read_with_ssms_own_syntax_at_one_call_each() {
    if !have_fuse_and_moto() {
        return;
    }
    let moto = Moto::start();
    let rt = runtime();
    let client = client(&rt, &moto.endpoint);
    for value in ["first", "second", "third"] {
        put(
            &rt,
            &client,
            "/sel/db/password",
            value,
            ParameterType::SecureString,
        );
    }
    label(&rt, &client, "/sel/db/password", 1, "prod");
    let mount = Mount::start(&moto.endpoint, "/sel", &["--ttl", "2s"]);
    let db = mount.path().join("db");
    assert_eq!(cat(&db.join("password")).unwrap(), "third");
    let base = moto.requests();
    assert_eq!(cat(&db.join("password:1")).unwrap(), "first");
    assert_eq!(cat(&db.join("password:2")).unwrap(), "second");
    assert_eq!(cat(&db.join("password:prod")).unwrap(), "first");
    assert_eq!(moto.requests() - base, 3, "one GetParameter each");
    for _ in 0..5 {
        assert_eq!(cat(&db.join("password:1")).unwrap(), "first");
        assert_eq!(cat(&db.join("password:prod")).unwrap(), "first");
    }
    assert_eq!(moto.requests() - base, 3, "cached");
    // Absent versions and labels are ENOENT; impossible selectors cost nothing.
    assert_eq!(cat(&db.join("password:9")), Err(libc::ENOENT));
    assert_eq!(cat(&db.join("password:nolabel")), Err(libc::ENOENT));
    let base = moto.requests();
    for bad in [
        "password:0",
        "password:1x",
        "password:aws-x",
        "password:",
        "password:-1",
        "pass word:1",
    ] {
        assert_eq!(cat(&db.join(bad)), Err(libc::ENOENT), "{bad}");
    }
    assert_eq!(moto.requests(), base, "no call for an impossible selector");
    // Never listed.
    let (_, listing, _) = run("ls", &["-a", db.to_str().unwrap()]);
    assert_eq!(
        listing.split_whitespace().collect::<Vec<_>>(),
        [".", "..", "password"]
    );
    let (_, found, _) = run("find", &[mount.path().to_str().unwrap()]);
    assert!(!found.contains(':'), "{found}");
    // The label moves: seen after the TTL; a version never changes, never refetched.
    label(&rt, &client, "/sel/db/password", 3, "prod");
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert_eq!(cat(&db.join("password")).unwrap(), "third"); // the directory, again
    let base = moto.requests();
    assert_eq!(cat(&db.join("password:1")).unwrap(), "first");
    assert_eq!(moto.requests(), base, "a version is not refetched");
    assert_eq!(cat(&db.join("password:prod")).unwrap(), "third");
}

#[test]
fn getfattr_shows_the_metadata_of_a_value_without_a_call() {
    if !have_fuse_and_moto() {
        return;
    }
    let moto = Moto::start();
    let rt = runtime();
    let client = client(&rt, &moto.endpoint);
    put(&rt, &client, "/xa/key", "one", ParameterType::String);
    put(&rt, &client, "/xa/key", "two", ParameterType::SecureString);
    let mount = Mount::start(&moto.endpoint, "/xa", &[]);
    let key = mount.path().join("key");
    let key = key.to_str().unwrap();
    assert_eq!(cat(Path::new(key)).unwrap(), "two");
    let base = moto.requests();
    let value = |name: &str| getfattr(&["--only-values", "-n", name, key]);
    assert_eq!(value("user.ssm.version"), "2");
    assert_eq!(value("user.ssm.type"), "SecureString");
    assert_eq!(value("user.ssm.data_type"), "text");
    assert_eq!(
        value("user.ssm.arn"),
        "arn:aws:ssm:us-east-1:123456789012:parameter/xa/key"
    );
    assert_eq!(value("user.ssmfs.stale"), "0");
    for time in [
        value("user.ssm.last_modified"),
        value("user.ssmfs.fetched_at"),
    ] {
        assert!(humantime::parse_rfc3339(&time).is_ok(), "{time}");
        assert!(time.ends_with('Z'), "UTC: {time}");
    }
    let dump = getfattr(&["-d", key]);
    for name in ssmfs::fs::XATTR_NAMES {
        assert!(dump.contains(name), "{dump}");
    }
    assert!(!dump.contains("two"), "never the value: {dump}");
    assert_eq!(moto.requests(), base, "no API call for metadata");
    // Unknown names and directories have none.
    let (code, _, err) = run("getfattr", &["-n", "user.other", key]);
    assert_ne!(code, 0);
    assert!(err.contains("No such attribute"), "{err}");
    let dir_dump = getfattr(&["-d", mount.path().to_str().unwrap()]);
    assert!(dir_dump.trim().is_empty(), "{dir_dump}");
}

#[test]
fn json_and_connection_views_show_fields_and_are_never_listed() {
    if !have_fuse_and_moto() {
        return;
    }
    let moto = Moto::start();
    let rt = runtime();
    let client = client(&rt, &moto.endpoint);
    let json = r#"{"username": "app", "password": "s3cr3t", "port": 5432, "opts": {"ssl": true}}"#;
    put(&rt, &client, "/vw/db", json, ParameterType::SecureString);
    put(
        &rt,
        &client,
        "/vw/db",
        r#"{"password": "rotated"}"#,
        ParameterType::SecureString,
    );
    label(&rt, &client, "/vw/db", 1, "prod");
    put(
        &rt,
        &client,
        "/vw/pg",
        "postgresql://app:p%40ss@DB.example:5432/app?sslmode=require",
        ParameterType::SecureString,
    );
    put(&rt, &client, "/vw/plain", "not json", ParameterType::String);
    let mount = Mount::start(&moto.endpoint, "/vw", &[]);
    let root = mount.path();
    let (_, before, _) = run("find", &[root.to_str().unwrap()]);
    let base = moto.requests();
    let prod = root.join("db:prod@json");
    let (_, fields, _) = run("ls", &[prod.to_str().unwrap()]);
    assert_eq!(
        fields.split_whitespace().collect::<Vec<_>>(),
        ["opts", "password", "port", "username"]
    );
    assert_eq!(cat(&prod.join("password")).unwrap(), "s3cr3t");
    assert_eq!(cat(&prod.join("port")).unwrap(), "5432");
    assert_eq!(cat(&prod.join("opts")).unwrap(), r#"{"ssl":true}"#);
    assert_eq!(cat(&root.join("db@json/password")).unwrap(), "rotated");
    assert_eq!(cat(&root.join("db@json/username")), Err(libc::ENOENT));
    let conn = root.join("pg@conn");
    assert_eq!(cat(&conn.join("conn_type")).unwrap(), "postgres");
    assert_eq!(cat(&conn.join("host")).unwrap(), "db.example");
    assert_eq!(cat(&conn.join("login")).unwrap(), "app");
    assert_eq!(cat(&conn.join("password")).unwrap(), "p@ss");
    assert_eq!(cat(&conn.join("schema")).unwrap(), "app");
    assert_eq!(cat(&conn.join("port")).unwrap(), "5432");
    assert_eq!(
        cat(&conn.join("extra")).unwrap(),
        r#"{"sslmode": "require"}"#
    );
    let (_, stat, _) = run(
        "stat",
        &["-c", "%s", conn.join("password").to_str().unwrap()],
    );
    assert_eq!(stat.trim(), "4", "st_size is the field's length");
    assert_eq!(
        getfattr(&[
            "--only-values",
            "-n",
            "user.ssm.version",
            conn.join("password").to_str().unwrap()
        ]),
        "1"
    );
    assert_eq!(
        moto.requests() - base,
        1,
        "db:prod; db, pg and plain came with the listing"
    );
    // Not a JSON object / not a connection: no view.
    assert_eq!(cat(&root.join("plain@json/x")), Err(libc::ENOENT));
    assert!(!root.join("plain@json").exists());
    assert!(!root.join("plain@conn").exists());
    // JSON with Airflow's field names is a connection too (Connection.from_json).
    assert_eq!(cat(&root.join("db@conn/password")).unwrap(), "rotated");
    // Listings, find and diff -r see exactly what they saw before.
    let (_, after, _) = run("find", &[root.to_str().unwrap()]);
    assert_eq!(before, after);
    assert!(!after.contains('@'));
}

#[test]
fn secrets_manager_secrets_through_ssm_one_by_one() {
    if !have_fuse_and_moto() {
        return;
    }
    let moto = Moto::start();
    let rt = runtime();
    let config = aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(
            aws_credential_types::provider::SharedCredentialsProvider::new(
                aws_credential_types::Credentials::new("testing", "testing", None, None, "test"),
            ),
        )
        .endpoint_url(&moto.endpoint)
        .build();
    let secrets = {
        let _guard = rt.enter();
        aws_sdk_secretsmanager::Client::new(&config)
    };
    for (name, value) in [
        ("prod/db", r#"{"username": "app", "password": "sm-pass"}"#),
        ("team+a=b@c", "odd-but-valid"),
        ("airflow/connections/pg", "postgresql://u:p@h:5432/db"),
    ] {
        rt.block_on(
            secrets
                .create_secret()
                .name(name)
                .secret_string(value)
                .send(),
        )
        .unwrap();
    }
    let addr = format!("127.0.0.1:{}", free_loopback_port());
    let mount = Mount::start(
        &moto.endpoint,
        "/aws/reference/secretsmanager",
        &["--metrics-addr", &addr],
    );
    let root = mount.path();
    assert_eq!(cat(&root.join("prod/db@json/password")).unwrap(), "sm-pass");
    assert_eq!(
        cat(&root.join("prod/db")).unwrap(),
        r#"{"username": "app", "password": "sm-pass"}"#
    );
    assert_eq!(cat(&root.join("team+a=b@c")).unwrap(), "odd-but-valid");
    assert_eq!(
        cat(&root.join("airflow/connections/pg@conn/password")).unwrap(),
        "p"
    );
    // Without a listing, a name that is no secret may be a level of a longer
    // one (`prod` of `prod/db`): it reads as a directory that cannot be listed.
    assert_eq!(cat(&root.join("prod/missing")), Err(libc::EACCES));
    // SSM cannot list Secrets Manager's tree: ssmfs never asks.
    let (code, _, err) = run("ls", &[root.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("Permission denied"), "{err}");
    let (_, metrics, _) = run("curl", &["-sf", &format!("http://{addr}/metrics")]);
    assert!(!metrics.contains("GetParametersByPath"), "{metrics}");
    assert!(mount
        .log_text()
        .contains("Secrets Manager secrets are read one by one"));
}
