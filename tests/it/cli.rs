//! The `mosaicd` binary as an operator uses it: offline commands, clear errors with
//! meaningful exit codes, and a daemon that drains and exits 0 on SIGTERM.

use std::process::{Command, Output};
use std::time::Duration;

use crate::support::binary::{mosaicd, spawn_serve};

fn run(command: &mut Command) -> Output {
    command.output().expect("run mosaicd")
}

fn stdout_json(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "mosaicd failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("json output")
}

#[test]
fn a_new_data_dir_and_its_database_are_readable_by_their_owner_alone() {
    use std::os::unix::fs::PermissionsExt as _;
    let parent = tempfile::tempdir().expect("tempdir");
    let data_dir = parent.path().join("state").join("mosaic");
    stdout_json(&run(mosaicd(&data_dir).args(["init", "--json"])));
    let mode = |path: &std::path::Path| {
        std::fs::metadata(path)
            .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(&data_dir), 0o700, "the data dir");
    assert_eq!(mode(&data_dir.join("mosaic.db")), 0o600, "the database");
    for sidecar in ["mosaic.db-wal", "mosaic.db-shm"] {
        let path = data_dir.join(sidecar);
        if path.exists() {
            assert_eq!(mode(&path), 0o600, "{sidecar}");
        }
    }
}

#[test]
fn init_show_and_api_keys_work_offline() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let init = stdout_json(&run(mosaicd(data_dir.path()).args(["init", "--json"])));
    let shown = stdout_json(&run(
        mosaicd(data_dir.path()).args(["identity", "show", "--json"])
    ));
    assert_eq!(shown["instance_id"], init["instance_id"]);
    assert_eq!(shown["fingerprint"], init["fingerprint"]);
    let certificate = run(mosaicd(data_dir.path()).args(["identity", "cert"]));
    assert!(
        String::from_utf8_lossy(&certificate.stdout).starts_with("-----BEGIN CERTIFICATE-----")
    );

    let created = stdout_json(&run(mosaicd(data_dir.path()).args([
        "apikey",
        "create",
        "--name",
        "ops",
        "--scope",
        "admin,agents",
        "--json",
    ])));
    let secret = created["key"].as_str().expect("key printed once");
    assert!(secret.starts_with("mosaic_"));
    let listed = stdout_json(&run(
        mosaicd(data_dir.path()).args(["apikey", "list", "--json"])
    ));
    let listed_text = listed.to_string();
    assert!(
        !listed_text.contains(secret),
        "list must never show the secret"
    );
    assert_eq!(listed["next_page_token"], "", "{listed}");
    assert_eq!(
        listed["api_keys"][0]["scopes"],
        serde_json::json!(["admin", "agents"])
    );

    let id = created["id"].as_str().expect("id");
    let revoked = stdout_json(&run(
        mosaicd(data_dir.path()).args(["apikey", "revoke", id, "--json"])
    ));
    assert!(revoked["revoked_at_ms"].is_i64());

    let unknown = run(mosaicd(data_dir.path()).args(["apikey", "revoke", "no-such-id"]));
    assert_eq!(unknown.status.code(), Some(3));
    let bad_scope =
        run(mosaicd(data_dir.path()).args(["apikey", "create", "--name", "x", "--scope", "root"]));
    assert_eq!(bad_scope.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_scope.stderr).contains("unknown scope"));
}

#[test]
fn identity_show_without_an_identity_says_what_to_do() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let output = run(mosaicd(data_dir.path()).args(["identity", "show"]));
    assert_eq!(output.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&output.stderr).contains("mosaicd init"));
    assert!(
        !data_dir.path().join("mosaic.db").exists(),
        "show must not create a database"
    );
}

#[test]
fn plaintext_on_a_public_address_is_refused() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let output =
        run(mosaicd(data_dir.path()).args(["serve", "--plaintext", "--listen", "0.0.0.0:0"]));
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("plaintext") && stderr.contains("loopback"),
        "{stderr}"
    );
    assert!(
        !data_dir.path().join("mosaic.db").exists(),
        "nothing was created"
    );
}

#[test]
fn a_bad_log_filter_or_rotation_grace_is_refused_and_creates_nothing() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let output = run(mosaicd(data_dir.path())
        .env("MOSAIC_LOG", "mosaic_mesh=loudest")
        .arg("init"));
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("MOSAIC_LOG"), "{stderr}");

    let config = data_dir.path().join("mosaic.toml");
    std::fs::write(&config, "[identity]\nrotation_grace_secs = 2592001\n").expect("write config");
    let output = run(mosaicd(data_dir.path())
        .arg("--config")
        .arg(&config)
        .arg("init"));
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("identity.rotation_grace_secs") && stderr.contains("30 days"),
        "{stderr}"
    );
    assert!(
        !data_dir.path().join("mosaic.db").exists(),
        "nothing was created"
    );
}

#[test]
fn malformed_configuration_names_the_key() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let config = data_dir.path().join("mosaic.toml");
    std::fs::write(&config, "[server]\nshutdown_grace_secs = \"soon\"\n").expect("write config");
    let output = run(mosaicd(data_dir.path())
        .arg("--config")
        .arg(&config)
        .arg("init"));
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("shutdown_grace_secs"), "{stderr}");

    let output = run(mosaicd(data_dir.path())
        .env("MOSAIC_LISTEN", "not-an-address")
        .arg("init"));
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--listen"));
    assert!(
        !data_dir.path().join("mosaic.db").exists(),
        "nothing was created"
    );
}

#[test]
fn a_database_that_does_not_answer_is_unavailable_quickly() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let started = std::time::Instant::now();
    let output = run(mosaicd(data_dir.path()).args([
        "migrate",
        "--database-url",
        "postgres://postgres:secret-password@127.0.0.1:1/none",
    ]));
    assert_eq!(
        output.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("secret-password"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_and_exits_zero() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let (mut child, _address) = spawn_serve(data_dir.path()).await;
    let pid = child.id().expect("pid").to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits within the grace period")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn identity_rotate_talks_to_the_daemon_pinned_from_the_data_dir() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let created = stdout_json(&run(mosaicd(data_dir.path()).args([
        "apikey", "create", "--name", "ops", "--scope", "admin", "--json",
    ])));
    let key = created["key"].as_str().expect("key").to_owned();
    let (mut child, address) = spawn_serve(data_dir.path()).await;
    let before = stdout_json(&run(
        mosaicd(data_dir.path()).args(["identity", "show", "--json"])
    ));

    let server = format!("https://{address}");
    let rotated = stdout_json(&run(mosaicd(data_dir.path())
        .args([
            "identity", "rotate", "--grace", "1h", "--json", "--server", &server,
        ])
        .env("MOSAIC_API_KEY", &key)));
    assert_eq!(
        rotated["previous_key"]["fingerprint"],
        before["fingerprint"]
    );
    assert_ne!(rotated["current_key"]["fingerprint"], before["fingerprint"]);

    // Without the API key: refused with the "refused" exit code and a hint.
    let refused = run(mosaicd(data_dir.path()).args(["identity", "rotate", "--server", &server]));
    assert_eq!(refused.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--api-key"));

    // Pinned to a wrong fingerprint: the TLS handshake fails, nothing rotates.
    let wrong = run(mosaicd(data_dir.path())
        .args(["identity", "rotate", "--server", &server])
        .args([
            "--server-fingerprint",
            "AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA",
        ])
        .env("MOSAIC_API_KEY", &key));
    assert_ne!(wrong.status.code(), Some(0));
    let after = stdout_json(&run(
        mosaicd(data_dir.path()).args(["identity", "show", "--json"])
    ));
    assert_eq!(after["fingerprint"], rotated["current_key"]["fingerprint"]);
    // For people, the previous key's end is a date, not epoch milliseconds.
    let shown = run(mosaicd(data_dir.path()).args(["identity", "show"]));
    let text = String::from_utf8_lossy(&shown.stdout);
    let line = text
        .lines()
        .find(|line| line.starts_with("previous key:"))
        .unwrap_or_else(|| panic!("no previous key in {text}"));
    assert!(
        line.contains("valid until 20") && line.ends_with("Z)") && !line.contains(" ms"),
        "{line}"
    );

    child.kill().await.expect("stop daemon");
}

#[test]
fn no_daemon_is_unavailable_with_a_hint() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    stdout_json(&run(mosaicd(data_dir.path()).args(["init", "--json"])));
    let output = run(mosaicd(data_dir.path()).args([
        "identity",
        "rotate",
        "--server",
        "https://127.0.0.1:1",
    ]));
    assert_eq!(output.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&output.stderr).contains("mosaicd serve"));
}

#[test]
fn completions_are_printed_for_each_shell() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    for (shell, marker) in [
        ("bash", "_mosaicd()"),
        ("zsh", "#compdef mosaicd"),
        ("fish", "complete -c mosaicd"),
    ] {
        let output = run(mosaicd(data_dir.path()).args(["completions", shell]));
        assert!(output.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&output.stdout);
        assert!(
            script.contains(marker),
            "{shell}: {}",
            &script[..script.len().min(200)]
        );
        assert!(script.contains("apikey"), "{shell} completes subcommands");
    }
    let unknown = run(mosaicd(data_dir.path()).args(["completions", "tcsh"]));
    assert_eq!(unknown.status.code(), Some(2));

    // `mosaicd completions bash | head`: the reader is gone before the
    // script is written.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let output = mosaicd(data_dir.path())
        .args(["completions", "bash"])
        .stdout(writer)
        .output()
        .expect("run mosaicd");
    assert!(
        output.status.success(),
        "{:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}
