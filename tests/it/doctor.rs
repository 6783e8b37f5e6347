//! `mosaicd doctor` as an operator runs it: every check ok on a healthy
//! instance with a running daemon, Redis and a reachable peer; a warning with
//! the `chmod` for a database others can read; a failure with a hint when
//! something else holds the listen port; and the exit codes of a wrong master
//! key (2) and a database that does not answer (5). Never a secret printed.

use std::process::Output;

use serde_json::Value;

use crate::support::Backend;
use crate::support::admin::{Admin, connect_and_accept};
use crate::support::binary::mosaicd;
use crate::support::daemon::TestEnvironment;
use crate::support::redis::{free_port, shared_redis_url, unique_prefix};

on_both_backends!(a_healthy_instance_with_a_reachable_peer_passes_every_check);

/// A master key (base64 of 32 bytes) that no test identity was made with.
const OTHER_MASTER_KEY: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";

/// The order in which doctor runs its checks.
const CHECK_NAMES: [&str; 7] = [
    "config", "data_dir", "database", "redis", "identity", "listener", "peers",
];

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A data dir made by `mosaicd init` (so with the modes mosaicd gives it),
/// inside a temporary directory.
struct DataDir {
    path: std::path::PathBuf,
    _parent: tempfile::TempDir,
}

fn initialised_data_dir() -> DataDir {
    let parent = tempfile::tempdir().expect("tempdir");
    let path = parent.path().join("mosaic");
    let output = mosaicd(&path)
        .args(["init", "--json"])
        .output()
        .expect("run mosaicd init");
    assert!(output.status.success(), "{}", text(&output.stderr));
    DataDir {
        path,
        _parent: parent,
    }
}

/// The report of `doctor --json` (printed whether checks failed or not),
/// after checking that it lists every check in order and that the exit code
/// is `code`.
fn report(output: &Output, code: i32) -> Value {
    assert_eq!(
        output.status.code(),
        Some(code),
        "stdout {} stderr {}",
        text(&output.stdout),
        text(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|error| panic!("no JSON ({error}): {}", text(&output.stdout)));
    let names: Vec<&str> = report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|check| check["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, CHECK_NAMES, "{report:#}");
    assert_eq!(report["healthy"], code == 0, "{report:#}");
    report
}

/// The check called `name` in a report.
fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|check| check["name"] == name)
        .unwrap_or_else(|| panic!("no {name} check in {report:#}"))
}

async fn a_healthy_instance_with_a_reachable_peer_passes_every_check(backend: Backend) {
    use std::os::unix::fs::PermissionsExt as _;
    let redis_url = shared_redis_url();
    let prefix = unique_prefix();
    let environment_a = TestEnvironment::new(backend).await;
    let environment_b = TestEnvironment::new(backend).await;
    let a = environment_a
        .start_peer(0, |config| {
            config.redis_url = Some(redis_url.clone());
            config.rate_limit.storage = mosaic_mesh::ratelimit::Storage::Redis;
            config.rate_limit.redis_prefix = prefix.clone();
        })
        .await;
    let b = environment_b.start_peer(0, |_| {}).await;
    let (admin_a, admin_b) = (Admin::of(&a).await, Admin::of(&b).await);
    let (outbound, _) = connect_and_accept(&admin_a, &admin_b, &b, "ws", &[]).await;
    admin_a
        .wait_for(&outbound, "a ping answered", |connection| {
            connection.reachable && connection.last_contact_at.is_some()
        })
        .await;
    let instance_b = admin_b.instance().await;
    // The test environment's temporary dir is 0755; `mosaicd init` and
    // `serve` make a new data dir 0700.
    std::fs::set_permissions(&a.data_dir, std::fs::Permissions::from_mode(0o700))
        .expect("chmod 700 the data dir");

    let run = |json: bool| {
        let mut command = tokio::process::Command::from(mosaicd(&a.data_dir));
        command
            .args(["--listen", &a.address.to_string()])
            .args(["--database-url", &a.config.database_url])
            .args(["--redis-url", &redis_url])
            .args(["--api-key", &admin_a.key])
            .env("MOSAIC_RATE_LIMIT_STORAGE", "redis")
            .env("MOSAIC_RATE_LIMIT_REDIS_PREFIX", &prefix)
            // What one PING may take on a busy test machine.
            .env("MOSAIC_RATE_LIMIT_REDIS_TIMEOUT_MS", "2000")
            .arg("doctor")
            .args(json.then_some("--json"))
            .kill_on_drop(true);
        async move { command.output().await.expect("run mosaicd doctor") }
    };

    let output = run(true).await;
    let report = report(&output, 0);
    for name in CHECK_NAMES {
        assert_eq!(check(&report, name)["status"], "OK", "{report:#}");
    }
    let peers = check(&report, "peers");
    let connections = peers["connections"].as_array().expect("connections");
    assert_eq!(connections.len(), 1, "{peers:#}");
    assert_eq!(connections[0]["remote_instance_id"], instance_b.instance_id);
    assert_eq!(connections[0]["reachable"], true);
    assert!(connections[0]["last_contact_at_ms"].is_i64(), "{peers:#}");
    assert!(
        check(&report, "listener")["detail"]
            .as_str()
            .expect("detail")
            .contains("SERVING"),
        "{report:#}"
    );

    // For people: one line per check, each `ok`, and no secret anywhere.
    let output = run(false).await;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    let check_lines: Vec<&str> = stdout
        .lines()
        .filter(|line| !line.starts_with(' '))
        .take(CHECK_NAMES.len())
        .collect();
    assert!(
        check_lines.iter().all(|line| line.starts_with("ok ")),
        "{stdout}"
    );
    assert!(stdout.ends_with("no problems found\n"), "{stdout}");
    let master_key = std::fs::read_to_string(a.data_dir.join("master.key")).expect("key file");
    for secret in [admin_a.key.as_str(), master_key.trim()] {
        assert!(!stdout.contains(secret), "{stdout}");
        assert!(!text(&output.stderr).contains(secret));
    }

    crate::support::redis::delete_keys(&redis_url, &prefix).await;
    drop((a, b));
    environment_a.cleanup().await;
    environment_b.cleanup().await;
}

#[test]
fn a_database_others_can_read_is_a_warning_with_the_chmod() {
    use std::os::unix::fs::PermissionsExt as _;
    let data_dir = initialised_data_dir();
    let database = data_dir.path.join("mosaic.db");
    std::fs::set_permissions(&database, std::fs::Permissions::from_mode(0o644)).expect("chmod");

    let output = mosaicd(&data_dir.path)
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["doctor", "--json"])
        .output()
        .expect("run mosaicd doctor");
    // A warning is no failure.
    let report = report(&output, 0);
    let data_dir_check = check(&report, "data_dir");
    assert_eq!(data_dir_check["status"], "WARN", "{report:#}");
    let detail = data_dir_check["detail"].as_str().expect("detail");
    assert!(
        detail.contains(&database.display().to_string()) && detail.contains("0644"),
        "{detail}"
    );
    assert_eq!(
        data_dir_check["hint"],
        format!("chmod 600 {}", database.display())
    );
    for name in ["config", "database", "identity", "listener"] {
        assert_eq!(check(&report, name)["status"], "OK", "{report:#}");
    }
    // Not configured, and no daemon to ask.
    assert_eq!(check(&report, "redis")["status"], "SKIP");
    assert_eq!(check(&report, "peers")["status"], "SKIP");
}

#[test]
fn a_listen_port_held_by_something_else_fails_the_listener_check() {
    let data_dir = initialised_data_dir();
    // Not a mosaicd: it answers every connection with plain HTTP/1.1.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = squatter.local_addr().expect("address");
    std::thread::spawn(move || {
        for stream in squatter.incoming() {
            let Ok(mut stream) = stream else { return };
            let _ = std::io::Write::write_all(&mut stream, b"HTTP/1.1 400 Bad Request\r\n\r\n");
        }
    });

    let doctor = |json: bool| {
        mosaicd(&data_dir.path)
            .args(["--listen", &address.to_string()])
            .arg("doctor")
            .args(json.then_some("--json"))
            .output()
            .expect("run mosaicd doctor")
    };
    let output = doctor(true);
    // `serve` would exit 1 on this address.
    let report = report(&output, 1);
    let listener = check(&report, "listener");
    assert_eq!(listener["status"], "FAIL", "{report:#}");
    assert!(
        listener["detail"]
            .as_str()
            .expect("detail")
            .contains("not by this instance's mosaicd"),
        "{listener:#}"
    );
    let hint = listener["hint"].as_str().expect("hint");
    assert!(
        hint.contains(&format!(":{}", address.port())) && hint.contains("--listen"),
        "{hint}"
    );
    assert_eq!(check(&report, "identity")["status"], "OK");
    assert_eq!(check(&report, "peers")["status"], "SKIP");

    let output = doctor(false);
    assert_eq!(output.status.code(), Some(1));
    let stdout = text(&output.stdout);
    let line = stdout
        .lines()
        .find(|line| line.starts_with("FAIL"))
        .unwrap_or_else(|| panic!("no FAIL line in {stdout}"));
    assert!(line.contains("listener"), "{stdout}");
    assert!(
        stdout.contains("hint: stop what holds the port"),
        "{stdout}"
    );
    assert!(text(&output.stderr).contains("listener"));
}

#[test]
fn a_wrong_master_key_fails_the_identity_check_with_exit_code_2() {
    let data_dir = initialised_data_dir();
    let output = mosaicd(&data_dir.path)
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["doctor", "--json"])
        .env("MOSAIC_MASTER_KEY", OTHER_MASTER_KEY)
        .output()
        .expect("run mosaicd doctor");
    let report = report(&output, 2);
    let identity = check(&report, "identity");
    assert_eq!(identity["status"], "FAIL", "{report:#}");
    assert!(
        identity["detail"]
            .as_str()
            .expect("detail")
            .contains("does not decrypt"),
        "{identity:#}"
    );
    assert!(
        identity["hint"]
            .as_str()
            .expect("hint")
            .contains("MOSAIC_MASTER_KEY"),
        "{identity:#}"
    );
    // Everything before it is fine; the identity was the first failure.
    for name in ["config", "data_dir", "database"] {
        assert_eq!(check(&report, name)["status"], "OK", "{report:#}");
    }
    assert!(!text(&output.stdout).contains(OTHER_MASTER_KEY));
    assert!(!text(&output.stderr).contains(OTHER_MASTER_KEY));
}

#[test]
fn an_unreachable_database_fails_with_exit_code_5() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let started = std::time::Instant::now();
    let output = mosaicd(data_dir.path())
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args([
            "--database-url",
            "postgres://postgres:secret-password@127.0.0.1:1/none",
        ])
        .args(["doctor", "--json"])
        .output()
        .expect("run mosaicd doctor");
    assert!(started.elapsed() < std::time::Duration::from_secs(15));
    let report = report(&output, 5);
    let database = check(&report, "database");
    assert_eq!(database["status"], "FAIL", "{report:#}");
    assert!(
        database["hint"]
            .as_str()
            .expect("hint")
            .contains("127.0.0.1:1"),
        "{database:#}"
    );
    // What needs the database is skipped, not failed on its account.
    assert_eq!(check(&report, "identity")["status"], "SKIP", "{report:#}");
    for stream in [&output.stdout, &output.stderr] {
        assert!(
            !text(stream).contains("secret-password"),
            "{}",
            text(stream)
        );
    }
}
