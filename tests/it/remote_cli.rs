//! `mosaicd agent ... --peer` and `mosaicd federation log` as an operator uses
//! them against two real daemons connected over real mutual TLS: the agent runs
//! on the peer, `--json` parses, and every refusal has the exit code of the one
//! table, a message that says what to do, and changed nothing on the peer. Each
//! test runs on SQLite and on PostgreSQL.

use std::ops::{Deref, DerefMut};
use std::process::Output;
use std::time::Duration;

use mosaic_mesh::auth::Scope;
use mosaic_mesh::proto::agent as agent_pb;
use serde_json::Value;

use crate::support::Backend;
use crate::support::agents::{AGENT_DEADLINE, Agents, with_agent_types};
use crate::support::daemon::{TestDaemon, mosaicd_binary};
use crate::support::pair::{ALL, Pair};

on_both_backends!(
    the_cli_spawns_inspects_lists_and_kills_an_agent_on_a_peer,
    remote_cli_errors_say_what_to_do_and_change_nothing,
    a_spawn_retried_by_message_id_starts_one_agent_even_across_a_peer_outage,
    federation_log_shows_commands_in_and_out_with_filters_and_pages,
);

/// Runs the `mosaicd` binary as a client of one daemon with one API key.
struct Operator {
    data_dir: std::path::PathBuf,
    url: String,
    key: String,
}

impl Operator {
    async fn of(daemon: &TestDaemon, scopes: &[Scope]) -> Operator {
        Operator {
            data_dir: daemon.data_dir.clone(),
            url: daemon.url(),
            key: daemon.api_key(scopes).await,
        }
    }

    /// `mosaicd ARGS` with no `MOSAIC_*` variables from the developer's shell.
    async fn run(&self, args: &[&str]) -> Output {
        let mut command = tokio::process::Command::new(mosaicd_binary());
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("MOSAIC_") {
                command.env_remove(name);
            }
        }
        command
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--server")
            .arg(&self.url)
            .arg("--api-key")
            .arg(&self.key)
            .args(args)
            .env("MOSAIC_LOG", "warn");
        command.output().await.expect("run mosaicd")
    }

    /// `mosaicd --json ARGS`, which must succeed; its output parsed.
    async fn json(&self, args: &[&str]) -> Value {
        let mut with_json = vec!["--json"];
        with_json.extend_from_slice(args);
        let output = self.run(&with_json).await;
        assert!(
            output.status.success(),
            "mosaicd {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
            panic!(
                "mosaicd {args:?} printed no JSON ({error}): {}",
                String::from_utf8_lossy(&output.stdout)
            )
        })
    }

    /// `mosaicd ARGS`, which must fail with `code`; its stderr.
    async fn fails(&self, args: &[&str], code: i32) -> String {
        let output = self.run(args).await;
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert_eq!(
            output.status.code(),
            Some(code),
            "mosaicd {args:?}: stdout {} stderr {stderr}",
            String::from_utf8_lossy(&output.stdout)
        );
        assert!(output.stdout.is_empty(), "a failure prints no data");
        stderr
    }
}

/// A [`Pair`] of daemon A (`alpha`, no agent types) and daemon B (`bravo`,
/// the test agent types), not yet connected, with an operator for A and an
/// agents client for B. It reads as the Pair it extends.
struct Cli {
    pair: Pair,
    operator_a: Operator,
    agents_b: Agents,
}

impl Deref for Cli {
    type Target = Pair;
    fn deref(&self) -> &Pair {
        &self.pair
    }
}

impl DerefMut for Cli {
    fn deref_mut(&mut self) -> &mut Pair {
        &mut self.pair
    }
}

impl Cli {
    async fn start(backend: Backend) -> Cli {
        let pair = Pair::start(
            backend,
            |config| config.instance.name = "alpha".to_owned(),
            bravo,
        )
        .await;
        let operator_a = Operator::of(pair.a(), &[Scope::Admin, Scope::Agents]).await;
        let b = pair.b();
        let agents_b = Agents::new(b.channel().await, b.api_key(&[Scope::Agents]).await);
        Cli {
            pair,
            operator_a,
            agents_b,
        }
    }

    async fn finish(self) {
        self.pair.finish().await;
    }
}

/// Every agent on the daemon of `agents`, newest first.
async fn agents_on(agents: &mut Agents) -> Vec<agent_pb::Agent> {
    agents
        .list(agent_pb::ListAgentsRequest::default())
        .await
        .expect("list agents")
        .agents
}

/// Polls `agent status ID --peer` until `done` holds for the printed agent.
async fn wait_for_remote(
    operator: &Operator,
    agent_id: &str,
    peer: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + AGENT_DEADLINE;
    loop {
        let agent = operator
            .json(&["agent", "status", agent_id, "--peer", peer])
            .await;
        if done(&agent) {
            return agent;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the remote agent never {what}: {agent}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn the_cli_spawns_inspects_lists_and_kills_an_agent_on_a_peer(backend: Backend) {
    let mut pair = Cli::start(backend).await;
    pair.connect("ws", ALL).await;
    let operator = &pair.operator_a;

    // Spawn by the peer's name; the agent runs on B, started by A in ws.
    let spawned = operator
        .json(&[
            "agent",
            "spawn",
            "--peer",
            "bravo",
            "--type",
            "sh",
            "--prompt",
            "echo hello from bravo; sleep 30",
            "--task-id",
            "task-7",
        ])
        .await;
    let agent_id = spawned["agent_id"].as_str().expect("agent id").to_owned();
    assert_eq!(spawned["state"], "RUNNING", "{spawned}");
    assert_eq!(spawned["task_id"], "task-7");
    assert_eq!(spawned["origin"]["kind"], "PEER");
    assert_eq!(spawned["origin"]["instance_id"], pair.a_id.as_str());
    assert_eq!(spawned["origin"]["workspace"], "ws");
    assert!(
        !spawned["message_id"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "a remote spawn prints its message id: {spawned}"
    );
    let on_b = agents_on(&mut pair.agents_b).await;
    assert_eq!(on_b.len(), 1, "one agent on B");
    assert_eq!(on_b[0].agent_id, agent_id);

    // Status by instance id, until the output arrives.
    let shown = wait_for_remote(operator, &agent_id, &pair.b_id, "printed", |agent| {
        agent["output_tail"]
            .as_array()
            .is_some_and(|lines| lines.iter().any(|line| line == "hello from bravo"))
    })
    .await;
    assert_eq!(shown["state"], "RUNNING");

    // The same agent for people: the local printer plus the peer.
    let text = operator
        .run(&["agent", "status", &agent_id, "--peer", "bravo"])
        .await;
    assert!(text.status.success(), "{text:?}");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&format!("agent:   {agent_id}")), "{text}");
    assert!(text.contains("state:   RUNNING"), "{text}");
    assert!(text.contains("  hello from bravo"), "{text}");
    assert!(text.contains("peer:    bravo"), "{text}");

    // Its output, read from B by signed `agent.output` commands.
    let logs = operator
        .run(&["agent", "logs", &agent_id, "--peer", "bravo"])
        .await;
    assert!(logs.status.success(), "{logs:?}");
    assert_eq!(String::from_utf8_lossy(&logs.stdout), "hello from bravo\n");
    let logs = operator
        .run(&["agent", "logs", &agent_id, "--peer", "bravo", "--json"])
        .await;
    let part: serde_json::Value =
        serde_json::from_slice(&logs.stdout).expect("one JSON object per part");
    assert_eq!(part["offset"], 0, "{part}");
    assert_eq!(part["end"], false, "the agent still runs: {part}");
    // An agent A did not start on B is no agent of A's there.
    let unknown = operator
        .run(&["agent", "logs", "no-such-agent", "--peer", "bravo"])
        .await;
    assert_eq!(unknown.status.code(), Some(3), "{unknown:?}");
    let unknown = operator
        .run(&["agent", "watch", "no-such-agent", "--peer", "bravo"])
        .await;
    assert_eq!(unknown.status.code(), Some(3), "{unknown:?}");

    // List: JSON with the agent, and a table for people.
    let listed = operator.json(&["agent", "list", "--peer", "bravo"]).await;
    let agents = listed["agents"].as_array().expect("agents");
    assert_eq!(agents.len(), 1, "{listed}");
    assert_eq!(agents[0]["agent_id"], agent_id.as_str());
    let table = operator
        .run(&["agent", "list", "--peer", "bravo", "--workspace", "ws"])
        .await;
    assert!(table.status.success(), "{table:?}");
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.starts_with("ID "), "{table}");
    assert!(table.contains(&agent_id), "{table}");

    // Kill, then status shows KILLED with the reason.
    let killed = operator
        .json(&[
            "agent",
            "kill",
            &agent_id,
            "--peer",
            "bravo",
            "--reason",
            "done with it",
        ])
        .await;
    assert_eq!(killed["agent_id"], agent_id.as_str());
    let ended = wait_for_remote(operator, &agent_id, "bravo", "ended", |agent| {
        agent["state"] == "KILLED"
    })
    .await;
    assert_eq!(ended["state_reason"], "done with it", "{ended}");
    let on_b = agents_on(&mut pair.agents_b).await;
    assert_eq!(on_b[0].state, agent_pb::AgentState::Killed as i32);

    // Followed from its start through signed `agent.watch` batches: every
    // event once, in order, ending with its end.
    let follow = operator
        .run(&["agent", "logs", &agent_id, "--peer", "bravo", "--follow"])
        .await;
    assert!(follow.status.success(), "{follow:?}");
    assert_eq!(
        String::from_utf8_lossy(&follow.stdout),
        "hello from bravo\n"
    );
    let stderr = String::from_utf8_lossy(&follow.stderr);
    assert!(stderr.contains("is KILLED (done with it)"), "{stderr}");
    let watched = operator
        .run(&[
            "agent", "watch", &agent_id, "--peer", "bravo", "--from", "2", "--json",
        ])
        .await;
    assert!(watched.status.success(), "{watched:?}");
    let events: Vec<Value> = String::from_utf8_lossy(&watched.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per event"))
        .collect();
    let sequences: Vec<u64> = events
        .iter()
        .map(|event| event["sequence"].as_u64().expect("sequence"))
        .collect();
    assert_eq!(sequences, (2..2 + events.len() as u64).collect::<Vec<_>>());
    assert_eq!(
        events[0]["state_change"]["to_state"], "RUNNING",
        "{events:?}"
    );
    assert_eq!(events[1]["output_line"]["line"], "hello from bravo");
    let last = events.last().expect("events");
    assert_eq!(last["state_change"]["to_state"], "KILLED", "{events:?}");

    // Without --peer the commands stay local: A itself runs no agents.
    let local = operator.json(&["agent", "list"]).await;
    assert_eq!(local["agents"], serde_json::json!([]), "{local}");

    pair.finish().await;
}

async fn remote_cli_errors_say_what_to_do_and_change_nothing(backend: Backend) {
    let mut pair = Cli::start(backend).await;
    // ws-1 grants only agent.spawn; ws-2 grants everything.
    let (on_a_1, _) = pair.connect("ws-1", &ALL[..1]).await;
    pair.connect("ws-2", ALL).await;
    let operator = &pair.operator_a;
    let spawn = |peer: &'static str, extra: &'static [&'static str]| {
        let mut args = vec![
            "agent", "spawn", "--peer", peer, "--type", "sh", "--prompt", "sleep 30",
        ];
        args.extend_from_slice(extra);
        args
    };

    // An unknown peer: not found (3), and how to see the peers.
    let stderr = operator.fails(&spawn("nobody", &[]), 3).await;
    assert!(stderr.contains("mosaicd peer list"), "{stderr}");
    // Connected in two workspaces without --workspace: usage (2), naming them.
    let stderr = operator.fails(&spawn("bravo", &[]), 2).await;
    assert!(stderr.contains("--workspace"), "{stderr}");
    assert!(stderr.contains("ws-1, ws-2"), "{stderr}");
    // A workspace the peer is not connected in: not found (3).
    let stderr = operator
        .fails(&spawn("bravo", &["--workspace", "ws-9"]), 3)
        .await;
    assert!(stderr.contains("ws-1, ws-2"), "{stderr}");
    // Flags that only apply locally, or only remotely: usage (2).
    operator
        .fails(
            &["agent", "list", "--peer", "bravo", "--state", "running"],
            2,
        )
        .await;
    operator
        .fails(&["agent", "status", "some-id", "--workspace", "ws-1"], 2)
        .await;
    // The peer refuses bad input: an unknown agent type, an oversized prompt (4).
    let stderr = operator
        .fails(
            &[
                "agent",
                "spawn",
                "--peer",
                "bravo",
                "--workspace",
                "ws-2",
                "--type",
                "no-such-type",
                "--prompt",
                "x",
            ],
            4,
        )
        .await;
    assert!(stderr.contains("no-such-type"), "{stderr}");
    let huge = "x".repeat(8192);
    operator
        .fails(
            &[
                "agent",
                "spawn",
                "--peer",
                "bravo",
                "--workspace",
                "ws-2",
                "--type",
                "sh",
                "--prompt",
                &huge,
            ],
            4,
        )
        .await;
    // An agent the peer does not have for us: not found (3), and where to look.
    let stderr = operator
        .fails(
            &[
                "agent",
                "status",
                "no-such-agent",
                "--peer",
                "bravo",
                "--workspace",
                "ws-2",
            ],
            3,
        )
        .await;
    assert!(
        stderr.contains(&format!("`mosaicd agent list --peer {}`", pair.b_id)),
        "{stderr}"
    );
    // A capability the peer did not grant (agent.status in ws-1): refused (4).
    let stderr = operator
        .fails(
            &["agent", "list", "--peer", "bravo", "--workspace", "ws-1"],
            4,
        )
        .await;
    assert!(stderr.contains("agent.status"), "{stderr}");
    assert!(stderr.contains("--grant"), "{stderr}");
    // An API key without the admin scope: refused (4), naming the scope.
    let agents_only = Operator::of(pair.a(), &[Scope::Agents]).await;
    let stderr = agents_only
        .fails(&spawn("bravo", &["--workspace", "ws-2"]), 4)
        .await;
    assert!(stderr.contains("admin"), "{stderr}");
    // A suspended connection: refused (4), and how to resume it.
    pair.admin_a.suspend(&on_a_1).await.expect("suspend");
    let stderr = operator
        .fails(&spawn("bravo", &["--workspace", "ws-1"]), 4)
        .await;
    assert!(stderr.contains("suspended"), "{stderr}");
    assert!(
        stderr.contains(&format!("mosaicd peer resume {on_a_1}")),
        "{stderr}"
    );
    assert!(
        agents_on(&mut pair.agents_b).await.is_empty(),
        "no refusal started an agent on B"
    );

    // A malformed message id, or one already used for another spawn: refused (4).
    operator
        .fails(
            &spawn(
                "bravo",
                &["--workspace", "ws-2", "--message-id", "not an id!"],
            ),
            4,
        )
        .await;
    assert!(
        agents_on(&mut pair.agents_b).await.is_empty(),
        "no refusal started an agent on B"
    );
    pair.finish().await;
}

/// B's configuration: the test agent types, and the name `bravo`.
fn bravo(config: &mut mosaic_mesh::config::Config) {
    *config = with_agent_types(config.clone());
    config.instance.name = "bravo".to_owned();
}

async fn a_spawn_retried_by_message_id_starts_one_agent_even_across_a_peer_outage(
    backend: Backend,
) {
    let mut pair = Cli::start(backend).await;
    pair.connect("ws", ALL).await;
    let spawn = |prompt: &'static str, message_id: &'static str| {
        vec![
            "agent",
            "spawn",
            "--peer",
            "bravo",
            "--type",
            "sh",
            "--prompt",
            prompt,
            "--message-id",
            message_id,
        ]
    };

    // Retried with the same id and request: the same agent, once.
    let first = pair.operator_a.json(&spawn("sleep 30", "retry-1")).await;
    let again = pair.operator_a.json(&spawn("sleep 30", "retry-1")).await;
    assert_eq!(first["message_id"], "retry-1");
    assert_eq!(again["agent_id"], first["agent_id"], "{again}");
    assert_eq!(agents_on(&mut pair.agents_b).await.len(), 1);
    // The same id for another request: refused (4), nothing started.
    let stderr = pair
        .operator_a
        .fails(&spawn("sleep 31", "retry-1"), 4)
        .await;
    assert!(
        stderr.contains("retry-1") || stderr.contains("message"),
        "{stderr}"
    );
    assert_eq!(agents_on(&mut pair.agents_b).await.len(), 1);

    // B is down: unavailable (5) within the call deadline, naming the peer and
    // the message id to retry with.
    let b_id = pair.b_id.clone();
    pair.stop_b().await;
    let started = tokio::time::Instant::now();
    let stderr = pair
        .operator_a
        .fails(
            &[
                "agent", "spawn", "--peer", "bravo", "--type", "sh", "--prompt", "sleep 30",
            ],
            5,
        )
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    assert!(stderr.contains("no answer from peer bravo"), "{stderr}");
    assert!(stderr.contains(&b_id), "{stderr}");
    let message_id = stderr
        .split("--message-id ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("the error names the message id to retry with: {stderr}"))
        .to_owned();

    // B is back: the retry the error suggested starts the agent, and only once.
    pair.start_b().await;
    let b = pair.b();
    let mut agents_b = Agents::new(b.channel().await, b.api_key(&[Scope::Agents]).await);
    let retry = [
        "agent",
        "spawn",
        "--peer",
        "bravo",
        "--type",
        "sh",
        "--prompt",
        "sleep 30",
        "--message-id",
        &message_id,
    ];
    let retried = pair.operator_a.json(&retry).await;
    assert_eq!(retried["message_id"], message_id.as_str());
    let once_more = pair.operator_a.json(&retry).await;
    assert_eq!(once_more["agent_id"], retried["agent_id"]);
    assert_eq!(
        agents_on(&mut agents_b).await.len(),
        2,
        "retry-1 and this one"
    );

    pair.finish().await;
}

async fn federation_log_shows_commands_in_and_out_with_filters_and_pages(backend: Backend) {
    let pair = Cli::start(backend).await;
    pair.connect("ws", ALL).await;
    let operator_b = Operator::of(pair.b(), &[Scope::Admin]).await;
    let operator = &pair.operator_a;
    let spawned = operator
        .json(&[
            "agent", "spawn", "--peer", "bravo", "--type", "sh", "--prompt", "sleep 30",
        ])
        .await;
    let agent_id = spawned["agent_id"].as_str().expect("agent id").to_owned();
    operator
        .fails(&["agent", "status", "no-such-agent", "--peer", "bravo"], 3)
        .await;
    operator
        .json(&["agent", "kill", &agent_id, "--peer", "bravo"])
        .await;

    // A sent three commands, newest first, with their outcomes.
    let log = operator.json(&["federation", "log"]).await;
    let entries = log["entries"].as_array().expect("entries");
    let summary: Vec<(String, String, String)> = entries
        .iter()
        .map(|entry| {
            (
                entry["direction"].as_str().unwrap_or_default().to_owned(),
                entry["command_type"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                entry["outcome"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String, String)> = [
        ("out", "agent.kill", "ok"),
        ("out", "agent.status", "NOT_FOUND"),
        ("out", "agent.spawn", "ok"),
    ]
    .iter()
    .map(|(a, b, c)| ((*a).to_owned(), (*b).to_owned(), (*c).to_owned()))
    .collect();
    assert_eq!(summary, expected, "{log}");
    let spawn = &entries[2];
    assert_eq!(spawn["message_id"], spawned["message_id"]);
    assert_eq!(spawn["peer_instance_id"], pair.b_id.as_str());
    assert_eq!(spawn["sender_instance_id"], pair.a_id.as_str());
    assert_eq!(spawn["workspace"], "ws");
    assert!(spawn["recorded_at_ms"].is_i64(), "{spawn}");

    // B received the same three.
    let received = operator_b
        .json(&["federation", "log", "--direction", "in", "--peer", "alpha"])
        .await;
    let received = received["entries"].as_array().expect("entries");
    assert_eq!(received.len(), 3, "{received:?}");
    assert!(
        received
            .iter()
            .all(|entry| entry["direction"] == "in"
                && entry["peer_instance_id"] == pair.a_id.as_str())
    );
    assert_eq!(received[2]["message_id"], spawned["message_id"]);

    // Filters: nothing came in to A, nothing in another workspace; a peer A
    // never knew is NOT_FOUND; the peer by name or by id is the same.
    for filter in [
        &["--direction", "in"][..],
        &["--workspace", "elsewhere"][..],
    ] {
        let mut args = vec!["federation", "log"];
        args.extend_from_slice(filter);
        let log = operator.json(&args).await;
        assert_eq!(log["entries"], serde_json::json!([]), "{filter:?}: {log}");
    }
    operator
        .fails(&["federation", "log", "--peer", "some-other-instance"], 3)
        .await;
    let by_id = operator
        .json(&[
            "federation",
            "log",
            "--peer",
            &pair.b_id,
            "--direction",
            "out",
        ])
        .await;
    assert_eq!(by_id["entries"], log["entries"]);

    // Pages: one entry at a time, following the token.
    let first = operator.json(&["federation", "log", "--limit", "2"]).await;
    assert_eq!(first["entries"].as_array().map(Vec::len), Some(2));
    let token = first["next_page_token"].as_str().expect("token").to_owned();
    assert!(!token.is_empty(), "{first}");
    let rest = operator
        .json(&["federation", "log", "--limit", "2", "--page-token", &token])
        .await;
    assert_eq!(rest["entries"], serde_json::json!([entries[2].clone()]));
    // A token of other filters, an unknown direction: refused (4) and usage (2).
    operator
        .fails(
            &[
                "federation",
                "log",
                "--direction",
                "in",
                "--page-token",
                &token,
            ],
            4,
        )
        .await;
    operator
        .fails(&["federation", "log", "--direction", "sideways"], 2)
        .await;

    // The table for people names the peer and the outcome.
    let table = operator.run(&["federation", "log"]).await;
    assert!(table.status.success(), "{table:?}");
    let table = String::from_utf8_lossy(&table.stdout);
    let mut lines = table.lines();
    assert!(
        lines.next().is_some_and(|header| header.starts_with("TIME")
            && header.contains("OUTCOME")
            && header.contains("DETAIL")),
        "{table}"
    );
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 3, "{table}");
    assert!(
        rows[1].contains("  out  bravo") && rows[1].contains("NOT_FOUND"),
        "{table}"
    );

    pair.finish().await;
}
