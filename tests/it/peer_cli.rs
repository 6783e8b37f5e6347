//! `mosaicd peer ...` as an operator uses it against two running daemons: JSON
//! output, and exit codes that say what went wrong.

use std::process::Output;
use std::time::Duration;

use mosaic_mesh::auth::Scope;
use mosaic_mesh::identity::PublicKey;

use crate::support::Backend;
use crate::support::daemon::{TestDaemon, TestEnvironment, mosaicd_binary, spki_of_pem};

/// Runs `mosaicd ARGS --json` as a client of `daemon`, with no `MOSAIC_*`
/// variables inherited from the developer's shell.
pub(crate) async fn mosaicd(daemon: &TestDaemon, api_key: &str, args: &[&str]) -> Output {
    let mut json_args = vec!["--json"];
    json_args.extend_from_slice(args);
    mosaicd_text(daemon, api_key, &json_args).await
}

/// The same without `--json`: what a person reads.
pub(crate) async fn mosaicd_text(daemon: &TestDaemon, api_key: &str, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(mosaicd_binary());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("MOSAIC_") {
            command.env_remove(name);
        }
    }
    command
        .arg("--data-dir")
        .arg(&daemon.data_dir)
        .arg("--server")
        .arg(daemon.url())
        .arg("--api-key")
        .arg(api_key)
        .args(args)
        .env("MOSAIC_LOG", "warn");
    command.output().await.expect("run mosaicd")
}

pub(crate) fn json_of(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "mosaicd failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("json output")
}

#[tokio::test(flavor = "multi_thread")]
async fn peer_commands_drive_a_handshake() {
    let environment_a = TestEnvironment::new(Backend::Sqlite).await;
    let environment_b = TestEnvironment::new(Backend::Sqlite).await;
    let a = environment_a.start_peer(0, |_| {}).await;
    let b = environment_b.start_peer(0, |_| {}).await;
    let key_a = a.api_key(&[Scope::Admin]).await;
    let key_b = b.api_key(&[Scope::Admin]).await;
    let fingerprint_of = |daemon: &TestDaemon| {
        PublicKey::from_spki_der(&spki_of_pem(&daemon.certificate_pem()))
            .expect("daemon key")
            .fingerprint()
    };
    let fingerprint_b = fingerprint_of(&b);

    // A wrong fingerprint (A's own) is refused with exit code 4, and nothing is stored.
    let wrong = fingerprint_of(&a);
    let refused = mosaicd(
        &a,
        &key_a,
        &[
            "peer",
            "connect",
            &b.url(),
            "--workspace",
            "ws",
            "--fingerprint",
            &wrong,
        ],
    )
    .await;
    assert_eq!(refused.status.code(), Some(4), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("fingerprint"));
    assert_eq!(
        json_of(&mosaicd(&a, &key_a, &["peer", "list"]).await),
        serde_json::json!({ "connections": [], "next_page_token": "" })
    );

    let requested = json_of(
        &mosaicd(
            &a,
            &key_a,
            &[
                "peer",
                "connect",
                &b.url(),
                "--workspace",
                "ws",
                "--fingerprint",
                &fingerprint_b,
                "--grant",
                "agent.status",
            ],
        )
        .await,
    );
    assert_eq!(requested["state"], "PENDING");
    assert_eq!(requested["direction"], "outbound");
    let on_a = requested["connection_id"].as_str().expect("id").to_owned();

    // States print in upper case; --state takes any case.
    let pending = json_of(&mosaicd(&b, &key_b, &["peer", "list", "--state", "pending"]).await);
    assert_eq!(pending["next_page_token"], "", "{pending}");
    let pending = pending["connections"].as_array().expect("connections");
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0]["direction"], "inbound");
    assert_eq!(pending[0]["state"], "PENDING");
    assert_eq!(
        pending[0]["capabilities_granted_to_us"],
        serde_json::json!(["agent.status"])
    );
    let on_b = pending[0]["connection_id"].as_str().expect("id").to_owned();
    let upper = json_of(&mosaicd(&b, &key_b, &["peer", "list", "--state", "PENDING"]).await);
    assert_eq!(
        upper["connections"][0]["connection_id"],
        on_b.as_str(),
        "{upper}"
    );

    let accepted = json_of(
        &mosaicd(
            &b,
            &key_b,
            &[
                "peer",
                "accept",
                &on_b,
                "--grant",
                "agent.spawn,agent.status",
            ],
        )
        .await,
    );
    assert_eq!(accepted["state"], "ACTIVE");
    assert_eq!(
        accepted["granted_capabilities"],
        serde_json::json!(["agent.spawn", "agent.status"])
    );

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let shown = loop {
        let shown = json_of(&mosaicd(&a, &key_a, &["peer", "show", &on_a]).await);
        if shown["state"] == "ACTIVE" {
            break shown;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "A never saw the accept: {shown}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        shown["capabilities_granted_to_us"],
        serde_json::json!(["agent.spawn", "agent.status"])
    );
    assert_eq!(shown["events"].as_array().expect("events").len(), 2);
    assert_eq!(shown["events"][0]["to_state"], "PENDING", "{shown}");
    assert_eq!(shown["events"][1]["to_state"], "ACTIVE", "{shown}");
    // For people, times are RFC 3339, not epoch milliseconds.
    let text = mosaicd_text(&a, &key_a, &["peer", "show", &on_a]).await;
    assert!(text.status.success(), "{text:?}");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(!text.contains(" ms"), "{text}");
    let year = format!(
        " {}-",
        &humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()[..4]
    );
    assert!(
        text.lines()
            .filter(|line| line.contains("last contact") || line.contains(" by "))
            .all(|line| line.contains(&year) || line.contains("never")),
        "{text}"
    );

    // The list shows each peer's fingerprint, which tells it from another
    // key claiming its name.
    let listed = mosaicd_text(&a, &key_a, &["peer", "list"]).await;
    assert!(listed.status.success(), "{listed:?}");
    let fingerprint = shown["remote_fingerprint"].as_str().expect("fingerprint");
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains(fingerprint),
        "{listed:?}"
    );

    // Exit codes: unknown id 3, a change that does not apply 4, bad usage 2.
    let missing = mosaicd(&a, &key_a, &["peer", "suspend", "no-such-connection"]).await;
    assert_eq!(missing.status.code(), Some(3), "{missing:?}");
    let not_suspended = mosaicd(&a, &key_a, &["peer", "resume", &on_a]).await;
    assert_eq!(not_suspended.status.code(), Some(4), "{not_suspended:?}");
    let bad_state = mosaicd(&a, &key_a, &["peer", "list", "--state", "sleepy"]).await;
    assert_eq!(bad_state.status.code(), Some(2), "{bad_state:?}");

    let suspended = json_of(
        &mosaicd(
            &a,
            &key_a,
            &["peer", "suspend", &on_a, "--reason", "upgrade"],
        )
        .await,
    );
    assert_eq!(suspended["state"], "SUSPENDED");
    let disconnected = json_of(&mosaicd(&b, &key_b, &["peer", "disconnect", &on_b]).await);
    assert_eq!(disconnected["state"], "DISCONNECTED");

    a.stop().await;
    b.stop().await;
    environment_a.cleanup().await;
    environment_b.cleanup().await;
}
