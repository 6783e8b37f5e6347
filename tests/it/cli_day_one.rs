//! What an operator meets on day one with the `mosaicd` binary (issue #21):
//! `job dispatch` against real daemons (here and on a peer), `config check`,
//! the exit codes of a wrong master key and an unknown peer, listen addresses
//! and the variables they came from, unknown `MOSAIC_*` variables, `init` run
//! twice, `--version`, completion of `--scope`, and a reader that goes away.

use std::process::Output;

use mosaic_mesh::auth::Scope;
use serde_json::Value;

use crate::support::Backend;
use crate::support::admin::{Admin, connect_and_accept};
use crate::support::agents::{AGENT_DEADLINE, agent_config, with_agent_types};
use crate::support::binary::mosaicd;
use crate::support::daemon::{TestDaemon, TestEnvironment, mosaicd_binary};

on_both_backends!(
    job_dispatch_starts_a_local_agent_and_the_job_follows_it,
    job_dispatch_with_peer_runs_the_agent_on_the_peer,
);

/// A master key (base64 of 32 bytes) that no test identity was made with.
const OTHER_MASTER_KEY: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";

/// The `mosaicd` binary as a client of one daemon, with one API key.
struct Client {
    data_dir: std::path::PathBuf,
    url: String,
    key: String,
}

impl Client {
    async fn of(daemon: &TestDaemon, scopes: &[Scope]) -> Client {
        Client {
            data_dir: daemon.data_dir.clone(),
            url: daemon.url(),
            key: daemon.api_key(scopes).await,
        }
    }

    /// `mosaicd ARGS`, given [`AGENT_DEADLINE`] to finish.
    async fn run(&self, args: &[&str]) -> Output {
        let mut command = tokio::process::Command::from(mosaicd(&self.data_dir));
        command
            .args(["--server", &self.url, "--api-key", &self.key])
            .args(args)
            .kill_on_drop(true);
        tokio::time::timeout(AGENT_DEADLINE, command.output())
            .await
            .unwrap_or_else(|_| panic!("mosaicd {args:?} did not finish"))
            .expect("run mosaicd")
    }

    /// `mosaicd --json ARGS`, which must succeed; its output parsed.
    async fn json(&self, args: &[&str]) -> Value {
        let mut with_json = vec!["--json"];
        with_json.extend_from_slice(args);
        stdout_json(&self.run(&with_json).await)
    }

    /// `mosaicd ARGS`, which must fail with `code` and print no data; its stderr.
    async fn fails(&self, args: &[&str], code: i32) -> String {
        failure(&self.run(args).await, code)
    }

    /// `job watch ID --json` to the end of the job; the job as it ended.
    async fn job_when_ended(&self, job_id: &str) -> Value {
        let output = self.run(&["--json", "job", "watch", job_id]).await;
        assert!(output.status.success(), "{}", stderr(&output));
        let text = String::from_utf8_lossy(&output.stdout);
        let last = text.lines().last().expect("at least one change");
        let message: Value = serde_json::from_str(last).expect("one JSON object per line");
        message["job"].clone()
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout_json(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "mosaicd failed: {}",
        stderr(output)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "no JSON ({error}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

fn failure(output: &Output, code: i32) -> String {
    let stderr = stderr(output);
    assert_eq!(
        output.status.code(),
        Some(code),
        "stdout {} stderr {stderr}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(output.stdout.is_empty(), "a failure prints no data");
    stderr
}

fn dispatch_args<'a>(agent_type: &'a str, prompt: &'a str) -> Vec<&'a str> {
    vec![
        "job",
        "dispatch",
        "--type",
        "review",
        "--agent-type",
        agent_type,
        "--prompt",
        prompt,
    ]
}

async fn job_dispatch_starts_a_local_agent_and_the_job_follows_it(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let daemon = environment
        .start_with(agent_config(&environment))
        .await
        .expect("daemon");
    let bot = Client::of(&daemon, &[Scope::Webhook]).await;
    let jobs = Client::of(&daemon, &[Scope::Coordinator]).await;

    let mut args = dispatch_args("printf", "hello from the cli");
    args.extend([
        "--workspace",
        "w1",
        "--label",
        "team=red",
        "--idempotency-key",
        "day-one-1",
    ]);
    let dispatched = bot.json(&args).await;
    assert_eq!(dispatched["created"], true, "{dispatched}");
    assert_eq!(dispatched["state"], "RUNNING", "{dispatched}");
    assert_eq!(dispatched["workspace"], "w1");
    assert_eq!(dispatched["labels"]["team"], "red");
    assert_eq!(dispatched["idempotency_key"], "day-one-1");
    let job_id = dispatched["job_id"].as_str().expect("job id").to_owned();
    let agent_id = dispatched["agent_id"]
        .as_str()
        .expect("agent id")
        .to_owned();
    assert!(!agent_id.is_empty());

    // The job follows its agent to the end, with the agent's output.
    let ended = jobs.job_when_ended(&job_id).await;
    assert_eq!(ended["state"], "COMPLETED", "{ended}");
    let result: Value =
        serde_json::from_str(ended["result_json"].as_str().expect("result")).expect("json");
    assert_eq!(
        result["output_tail"],
        serde_json::json!(["[hello from the cli]"])
    );

    // The same key again: the same job and agent, nothing started, and the
    // text says so.
    let again = bot.run(&args).await;
    assert!(again.status.success(), "{}", stderr(&again));
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(
        text.contains(&job_id)
            && text.contains(&agent_id)
            && text.contains("existing job for this idempotency key"),
        "{text}"
    );

    // For people: the job, its agent and how to follow it.
    let fresh = bot.run(&dispatch_args("true", "")).await;
    let text = String::from_utf8_lossy(&fresh.stdout);
    assert!(fresh.status.success(), "{}", stderr(&fresh));
    assert!(
        text.contains("RUNNING") && text.contains("agent: ") && text.contains("mosaicd job watch"),
        "{text}"
    );

    // Refusals have the table's codes, say what to do and create no job.
    let before = jobs.json(&["job", "list"]).await["jobs"]
        .as_array()
        .expect("jobs")
        .len();
    let unknown_type = bot.fails(&dispatch_args("no-such-type", "x"), 4).await;
    assert!(unknown_type.contains("no-such-type"), "{unknown_type}");
    let wrong_scope = jobs.fails(&dispatch_args("true", "x"), 4).await;
    assert!(
        wrong_scope.contains("`webhook` scope") && wrong_scope.contains("--scope webhook"),
        "{wrong_scope}"
    );
    let mut remote = dispatch_args("true", "x");
    remote.extend(["--peer", "no-such-peer"]);
    let unknown_peer = bot.fails(&remote, 3).await;
    assert!(unknown_peer.contains("mosaicd peer list"), "{unknown_peer}");
    let bad_label = bot
        .run(&[
            "job",
            "dispatch",
            "--type",
            "t",
            "--agent-type",
            "true",
            "--label",
            "novalue",
        ])
        .await;
    assert_eq!(bad_label.status.code(), Some(2), "{}", stderr(&bad_label));
    let after = jobs.json(&["job", "list"]).await["jobs"]
        .as_array()
        .expect("jobs")
        .len();
    assert_eq!(after, before, "refused dispatches made no job");

    daemon.stop().await;
    environment.cleanup().await;
}

async fn job_dispatch_with_peer_runs_the_agent_on_the_peer(backend: Backend) {
    let environments = [
        TestEnvironment::new(backend).await,
        TestEnvironment::new(backend).await,
    ];
    let a = environments[0]
        .start_peer(0, |config| config.instance.name = "alpha".to_owned())
        .await;
    let b = environments[1]
        .start_peer(0, |config| {
            *config = with_agent_types(config.clone());
            config.instance.name = "bravo".to_owned();
        })
        .await;
    let (admin_a, admin_b) = (Admin::of(&a).await, Admin::of(&b).await);
    connect_and_accept(
        &admin_a,
        &admin_b,
        &b,
        "ws",
        &["agent.spawn", "agent.status", "agent.kill"],
    )
    .await;
    let bravo_id = admin_b.instance().await.instance_id;
    let bot = Client::of(&a, &[Scope::Webhook]).await;
    let jobs = Client::of(&a, &[Scope::Coordinator]).await;

    let mut args = dispatch_args("printf", "on bravo");
    args.extend(["--peer", &bravo_id]);
    let dispatched = bot.json(&args).await;
    assert_eq!(dispatched["created"], true, "{dispatched}");
    assert_eq!(dispatched["peer_instance_id"], bravo_id.as_str());
    assert_eq!(dispatched["workspace"], "ws", "the connection's workspace");
    let ended = jobs
        .job_when_ended(dispatched["job_id"].as_str().expect("job id"))
        .await;
    assert_eq!(ended["state"], "COMPLETED", "{ended}");

    // An agent type the peer does not have: refused by the peer (4).
    let mut unknown = dispatch_args("no-such-type", "x");
    unknown.extend(["--peer", &bravo_id]);
    let refused = bot.fails(&unknown, 4).await;
    assert!(refused.contains("no-such-type"), "{refused}");

    let [environment_a, environment_b] = environments;
    a.stop().await;
    b.stop().await;
    environment_a.cleanup().await;
    environment_b.cleanup().await;
}

/// A peer the daemon cannot reach is the peer's fault, not the daemon's: the
/// error says the daemon is up. A daemon that does not answer is named as
/// before.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_peer_is_not_blamed_on_the_daemon() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let daemon = environment.start().await;
    let admin = Client::of(&daemon, &[Scope::Admin]).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let nowhere = format!("https://{}", closed.local_addr().expect("address"));
    drop(closed);
    let stderr = admin
        .fails(&["peer", "connect", &nowhere, "--workspace", "w"], 5)
        .await;
    assert!(
        stderr.contains(&format!("the daemon at {} is up", daemon.url()))
            && !stderr.contains("is `mosaicd serve` running"),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("(os error").count(),
        1,
        "the cause is said once: {stderr}"
    );
    let url = daemon.url();
    daemon.stop().await;
    let gone = Client {
        url: url.clone(),
        ..admin
    };
    let stderr = gone.fails(&["peer", "list"], 5).await;
    assert!(
        stderr.contains(&url) && stderr.contains("is `mosaicd serve` running"),
        "{stderr}"
    );
    environment.cleanup().await;
}

/// A database that cannot be opened is named in the error (without its
/// password), PostgreSQL and SQLite alike.
#[test]
fn a_database_that_cannot_be_opened_is_named_without_its_password() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = closed.local_addr().expect("address");
    drop(closed);
    let url = format!("postgres://mosaic:hunter2@{address}/mosaic");
    let output = mosaicd(data_dir.path())
        .args(["migrate", "--database-url", &url])
        .output()
        .expect("run mosaicd");
    let refused = failure(&output, 5);
    assert!(
        refused.contains(&format!(
            "cannot open the database at postgres://{address}/mosaic"
        )) && !refused.contains("hunter2"),
        "{refused}"
    );
    let missing = data_dir.path().join("no-such-dir").join("mosaic.db");
    let url = format!("sqlite://{}", missing.display());
    let output = mosaicd(data_dir.path())
        .args(["migrate", "--database-url", &url])
        .output()
        .expect("run mosaicd");
    let said = stderr(&output);
    assert!(!output.status.success(), "{said}");
    assert!(
        said.contains(&format!("cannot open the database at {url}")),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn federation_log_of_an_unknown_peer_is_not_found() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let daemon = environment.start().await;
    let admin = Client::of(&daemon, &[Scope::Admin]).await;
    let all = admin.json(&["federation", "log"]).await;
    assert_eq!(all["entries"], serde_json::json!([]));
    let stderr = admin
        .fails(&["federation", "log", "--peer", "ghost"], 3)
        .await;
    assert!(
        stderr.contains("ghost") && stderr.contains("mosaicd peer list"),
        "{stderr}"
    );
    daemon.stop().await;
    environment.cleanup().await;
}

/// `--log-format json`: every line is one JSON object, and the per-call line
/// carries the caller (never the key), the client's address and the
/// duration as a number, not Rust debug text.
#[tokio::test(flavor = "multi_thread")]
async fn json_logs_are_one_object_per_line_with_plain_values() {
    use mosaic_mesh::proto::agent as agent_pb;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    let data_dir = tempfile::tempdir().expect("tempdir");
    let created = stdout_json(
        &mosaicd(data_dir.path())
            .args([
                "apikey", "create", "--name", "bot", "--scope", "agents", "--json",
            ])
            .output()
            .expect("apikey create"),
    );
    let key = created["key"].as_str().expect("key").to_owned();
    let key_id = created["id"].as_str().expect("id").to_owned();
    let mut command = mosaicd(data_dir.path());
    command.args(["--log-format", "json"]);
    let (_daemon, address, mut lines) = crate::support::binary::spawn_serve_with_log(command).await;
    let channel = crate::support::binary::channel_to(&address, data_dir.path()).await;
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .expect("health answers");
    agent_pb::agent_control_client::AgentControlClient::new(channel)
        .list_agents(crate::support::daemon::with_key(
            agent_pb::ListAgentsRequest::default(),
            &key,
        ))
        .await
        .expect("the key lists agents");
    let calls = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        let mut calls = Vec::new();
        while let Some(line) = lines.next_line().await.expect("read log") {
            let event: Value = serde_json::from_str(&line)
                .unwrap_or_else(|error| panic!("not one JSON object ({error}): {line}"));
            assert!(
                !line.contains(&key),
                "the key itself is never logged: {line}"
            );
            if event["target"] == "mosaic_mesh::access" {
                calls.push(event);
                if calls.len() == 2 {
                    return calls;
                }
            }
        }
        panic!("the daemon exited before logging the calls");
    })
    .await
    .expect("the calls are logged within 10 s");
    let call = &calls[0];
    let fields = &call["fields"];
    assert_eq!(fields["rpc.service"], "grpc.health.v1.Health", "{call}");
    assert_eq!(fields["rpc.method"], "Check", "{call}");
    assert_eq!(fields["caller"], "anonymous", "{call}");
    assert!(fields["duration_ms"].is_u64(), "{call}");
    let client = fields["client"].as_str().expect("client address");
    assert!(
        client.starts_with("127.0.0.1:") && client.parse::<std::net::SocketAddr>().is_ok(),
        "{call}"
    );
    assert!(!call.to_string().contains("Some("), "no debug text: {call}");
    let listed = &calls[1]["fields"];
    assert_eq!(listed["rpc.method"], "ListAgents", "{listed}");
    assert_eq!(listed["code"], "OK", "{listed}");
    assert_eq!(listed["caller"], format!("api_key:{key_id}"), "{listed}");
}

#[test]
fn init_on_an_existing_instance_says_it_exists_and_keeps_it() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let first = stdout_json(
        &mosaicd(data_dir.path())
            .args(["init", "--json"])
            .output()
            .expect("run"),
    );
    assert_eq!(first["created"], true);
    let again = stdout_json(
        &mosaicd(data_dir.path())
            .args(["init", "--json"])
            .output()
            .expect("run"),
    );
    assert_eq!(again["created"], false);
    assert_eq!(again["instance_id"], first["instance_id"]);
    assert_eq!(again["fingerprint"], first["fingerprint"]);
    let text = mosaicd(data_dir.path()).arg("init").output().expect("run");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("already exists") && !text.contains("initialised"),
        "{text}"
    );
}

#[test]
fn a_wrong_master_key_is_a_configuration_error_and_changes_nothing() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let created = stdout_json(
        &mosaicd(data_dir.path())
            .args(["init", "--json"])
            .output()
            .expect("run"),
    );
    for args in [
        &["init"][..],
        &["identity", "csr", "--dns", "mesh.example"][..],
    ] {
        let output = mosaicd(data_dir.path())
            .env("MOSAIC_MASTER_KEY", OTHER_MASTER_KEY)
            .args(args)
            .output()
            .expect("run");
        let stderr = failure(&output, 2);
        assert!(
            stderr.contains("master key") && stderr.contains("created with"),
            "{args:?}: {stderr}"
        );
    }
    let malformed = mosaicd(data_dir.path())
        .env("MOSAIC_MASTER_KEY", "not-base64!")
        .arg("init")
        .output()
        .expect("run");
    assert!(failure(&malformed, 2).contains("MOSAIC_MASTER_KEY"));
    let shown = stdout_json(
        &mosaicd(data_dir.path())
            .args(["identity", "show", "--json"])
            .output()
            .expect("run"),
    );
    assert_eq!(
        shown["fingerprint"], created["fingerprint"],
        "the same identity"
    );
}

#[test]
fn config_check_summarises_the_settings_without_a_secret() {
    let directory = tempfile::tempdir().expect("tempdir");
    let data_dir = directory.path().join("not-yet");
    let config = directory.path().join("mosaic.toml");
    std::fs::write(
        &config,
        r#"
database_url = "postgres://mosaic:db-password-secret@127.0.0.1:1/mosaic?sslmode=disable&password=query-secret"
redis_url = "redis://:redis-secret@127.0.0.1:1"
listen = "localhost:7452"
[agents.types.sh]
command = ["/bin/sh", "-c", "{prompt}"]
env = { TOKEN = "agent-env-secret" }
[agents.types.missing]
command = ["no-such-agent-program-here"]
[coordinator.webhooks.github]
secret = "file-webhook-secret"
[coordinator.webhooks.my-bot]
"#,
    )
    .expect("write config");
    let check = |json: bool| {
        let mut command = mosaicd(&data_dir);
        command
            .arg("--config")
            .arg(&config)
            .env("MOSAIC_MASTER_KEY", OTHER_MASTER_KEY)
            .env("MOSAIC_WEBHOOK_SECRET_MY_BOT", "env-webhook-secret")
            .env("MOSAIC_WEBHOOK_SECRET_GITLAB", "stray-webhook-secret")
            .args(["config", "check"]);
        if json {
            command.arg("--json");
        }
        command.output().expect("run")
    };
    let secrets = [
        "db-password-secret",
        "query-secret",
        "redis-secret",
        "agent-env-secret",
        "file-webhook-secret",
        "env-webhook-secret",
        "stray-webhook-secret",
        OTHER_MASTER_KEY,
    ];
    for json in [false, true] {
        let output = check(json);
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            stderr(&output)
        );
        assert!(output.status.success(), "{printed}");
        for secret in secrets {
            assert!(!printed.contains(secret), "{secret} printed: {printed}");
        }
    }
    let text = String::from_utf8_lossy(&check(false).stdout).into_owned();
    assert!(text.starts_with("configuration is valid"), "{text}");
    assert!(text.contains("127.0.0.1:7452"), "{text}");

    let summary = stdout_json(&check(true));
    assert_eq!(summary["valid"], true);
    assert_eq!(summary["listen"], "127.0.0.1:7452");
    assert_eq!(
        summary["database"],
        "postgres://127.0.0.1:1/mosaic (credentials and options not shown)"
    );
    assert_eq!(summary["master_key"]["source"], "MOSAIC_MASTER_KEY");
    assert_eq!(summary["agent_types"], serde_json::json!(["missing", "sh"]));
    assert_eq!(
        summary["webhook_sources"],
        serde_json::json!([
            { "name": "github", "signed": true },
            { "name": "my-bot", "signed": true },
        ])
    );
    let warnings = summary["warnings"].to_string();
    assert!(
        warnings.contains("no-such-agent-program-here")
            && warnings.contains("MOSAIC_WEBHOOK_SECRET_GITLAB"),
        "{warnings}"
    );
    assert!(!data_dir.exists(), "config check creates nothing");
}

#[test]
fn config_check_says_what_is_wrong_with_exit_code_2() {
    let directory = tempfile::tempdir().expect("tempdir");
    let data_dir = directory.path().join("not-yet");
    let config = directory.path().join("mosaic.toml");
    for (text, named) in [
        (
            "[server]\nshutdown_grace_secs = \"soon\"\n",
            "shutdown_grace_secs",
        ),
        (
            "[server]\nmax_message_bytes = 1\n",
            "server.max_message_bytes",
        ),
        ("lisen = \"127.0.0.1:1\"\n", "lisen"),
        ("listen = \"example.org:7443\"\n", "not resolved"),
    ] {
        std::fs::write(&config, text).expect("write config");
        let output = mosaicd(&data_dir)
            .arg("--config")
            .arg(&config)
            .args(["config", "check"])
            .output()
            .expect("run");
        let stderr = failure(&output, 2);
        assert!(stderr.contains(named), "{text}: {stderr}");
    }
    let missing = mosaicd(&data_dir)
        .args(["config", "check", "--config"])
        .arg(directory.path().join("absent.toml"))
        .output()
        .expect("run");
    assert!(failure(&missing, 2).contains("absent.toml"));
    let malformed_key = mosaicd(&data_dir)
        .env("MOSAIC_MASTER_KEY", "short")
        .args(["config", "check"])
        .output()
        .expect("run");
    let stderr = failure(&malformed_key, 2);
    assert!(
        stderr.contains("MOSAIC_MASTER_KEY") && !stderr.contains("short"),
        "{stderr}"
    );
    assert!(!data_dir.exists(), "nothing was created");
}

#[test]
fn listen_takes_localhost_and_a_bad_variable_is_named() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let checked = stdout_json(
        &mosaicd(data_dir.path())
            .args(["config", "check", "--json", "--listen", "localhost:7451"])
            .output()
            .expect("run"),
    );
    assert_eq!(checked["listen"], "127.0.0.1:7451");
    assert_eq!(checked["public_url"], "https://127.0.0.1:7451");
    assert_eq!(checked["warnings"], serde_json::json!([]), "{checked}");
    // Every address: the URL peers would get cannot be dialed, and it says so
    // until a public URL is set.
    let every_address = stdout_json(
        &mosaicd(data_dir.path())
            .args(["config", "check", "--json", "--listen", "0.0.0.0:7451"])
            .output()
            .expect("run"),
    );
    let warnings = every_address["warnings"].to_string();
    assert!(warnings.contains("no peer can dial"), "{every_address}");
    let with_public_url = stdout_json(
        &mosaicd(data_dir.path())
            .args(["config", "check", "--json", "--listen", "0.0.0.0:7451"])
            .args(["--public-url", "https://mesh.example.org:7451"])
            .output()
            .expect("run"),
    );
    assert_eq!(
        with_public_url["warnings"],
        serde_json::json!([]),
        "{with_public_url}"
    );

    let from_variable = mosaicd(data_dir.path())
        .env("MOSAIC_LISTEN", "bogus")
        .arg("init")
        .output()
        .expect("run");
    let stderr = failure(&from_variable, 2);
    assert!(
        stderr.contains("MOSAIC_LISTEN") && stderr.contains("bogus"),
        "{stderr}"
    );
    let from_flag = mosaicd(data_dir.path())
        .args(["--listen", "example.org:7451", "init"])
        .output()
        .expect("run");
    let stderr = failure(&from_flag, 2);
    assert!(
        stderr.contains("--listen") && !stderr.contains("MOSAIC_LISTEN"),
        "{stderr}"
    );
    assert!(
        !data_dir.path().join("mosaic.db").exists(),
        "nothing was created"
    );
}

#[test]
fn unknown_mosaic_variables_are_warned_about_but_test_variables_are_not() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let output = mosaicd(data_dir.path())
        .env("MOSAIC_LISTN", "127.0.0.1:1")
        .env("MOSAIC_TEST_DATABASE_URL", "postgres://elsewhere/test")
        .env("MOSAIC_WEBHOOK_SECRET_GITHUB", "not-printed")
        .args(["init", "--json"])
        .output()
        .expect("run");
    let stderr = stderr(&output);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("MOSAIC_LISTN") && stderr.contains("MOSAIC_LISTEN"),
        "a warning with a suggestion: {stderr}"
    );
    assert!(
        !stderr.contains("MOSAIC_TEST_") && !stderr.contains("MOSAIC_WEBHOOK_SECRET"),
        "{stderr}"
    );
    assert!(!stderr.contains("127.0.0.1:1"), "values are never printed");
}

#[test]
fn version_names_the_build() {
    let output = std::process::Command::new(mosaicd_binary())
        .arg("--version")
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    assert!(
        text.starts_with(&format!("mosaicd {} (", env!("CARGO_PKG_VERSION")))
            && text.contains(std::env::consts::ARCH)
            && text.contains(" build)"),
        "{text}"
    );
}

#[test]
fn bash_completes_scopes_not_file_names() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let output = mosaicd(data_dir.path())
        .args(["completions", "bash"])
        .output()
        .expect("run");
    let script = String::from_utf8_lossy(&output.stdout);
    let scope = script
        .split("--scope)")
        .nth(1)
        .and_then(|rest| rest.lines().nth(1))
        .expect("a --scope case");
    assert!(
        scope.contains("compgen -W \"admin agents coordinator webhook\""),
        "{scope}"
    );
}

#[test]
fn output_to_a_reader_that_went_away_ends_quietly() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    for args in [&["init", "--json"][..], &["identity", "cert"][..]] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let output = mosaicd(data_dir.path())
            .args(args)
            .stdout(writer)
            .output()
            .expect("run");
        let stderr = stderr(&output);
        assert!(output.status.success(), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
