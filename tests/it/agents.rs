//! The agent runtime as a caller meets it through AgentControl: real processes,
//! their output, kills, timeouts, the concurrency cap, watches, listing, bad
//! input, and a daemon restarted after SIGKILL or after dying between an agent's
//! start and its record — on SQLite and on PostgreSQL.

use std::collections::HashMap;
use std::time::Duration;

use mosaic_mesh::auth::Scope;
use mosaic_mesh::proto::agent as pb;

use crate::support::Backend;
use crate::support::agents::{
    AGENT_DEADLINE, Agents, BinarySetup, number_in_tail, process_is_alive, start_agents,
    wait_until_dead,
};
use crate::support::binary::{channel_to, mosaicd, spawn_serve_command};
use crate::support::daemon::{TestEnvironment, with_key};

on_both_backends!(
    a_shell_agent_completes_with_its_output,
    killing_an_agent_stops_its_whole_process_group,
    timeouts_and_failures_are_recorded,
    a_prompt_is_one_argument_and_runs_nothing_else,
    watching_streams_state_changes_and_output_in_order,
    the_concurrency_cap_refuses_instead_of_queueing,
    bad_requests_are_refused_and_change_nothing,
    listing_filters_and_pages,
    a_restart_after_sigkill_leaves_no_agent_falsely_running,
    a_restart_stops_processes_whose_start_was_never_recorded,
    the_agent_commands_drive_the_daemon,
    stopping_the_daemon_stops_its_agents,
    client_commands_find_the_daemon_at_the_configured_listen_address,
);

fn is(state: pb::AgentState) -> i32 {
    state as i32
}

async fn a_shell_agent_completes_with_its_output(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let (daemon, mut agents) = start_agents(&environment, |_| {}).await;

    let spawned = agents
        .spawn_request(pb::SpawnRequest {
            agent_type: "sh".to_owned(),
            prompt: "echo hi; echo oops >&2".to_owned(),
            task_id: "job-1".to_owned(),
            labels: HashMap::from([("team".to_owned(), "blue".to_owned())]),
            timeout_seconds: Some(30),
        })
        .await
        .expect("spawn");
    assert_eq!(spawned.state, is(pb::AgentState::Running), "{spawned:?}");
    assert!(spawned.pid.is_some() && spawned.started_at.is_some());
    assert_eq!(spawned.timeout_seconds, 30);
    assert_eq!(
        spawned.origin.as_ref().map(|origin| origin.kind),
        Some(pb::AgentOriginKind::Local as i32)
    );

    let ended = agents
        .wait_until(&spawned.agent_id, "ended", |agent| agent.ended_at.is_some())
        .await;
    assert_eq!(ended.state, is(pb::AgentState::Completed), "{ended:?}");
    assert_eq!(ended.exit_code, Some(0));
    assert_eq!(ended.signal, None);
    assert!(ended.output_tail.contains(&"hi".to_owned()), "{ended:?}");
    assert!(ended.output_tail.contains(&"oops".to_owned()), "{ended:?}");
    assert_eq!(ended.output_bytes, 8);
    assert_eq!(ended.task_id, "job-1");
    assert_eq!(ended.labels["team"], "blue");

    // The output is on disk in the agent's directory.
    let output = std::fs::read_to_string(
        daemon
            .data_dir
            .join("agents")
            .join(&spawned.agent_id)
            .join("output.log"),
    )
    .expect("output file");
    assert!(
        output.contains("hi\n") && output.contains("oops\n"),
        "{output}"
    );

    // Every transition is persisted with its time and reason.
    let store = environment.store().await;
    let transitions = store
        .list_agent_transitions(&spawned.agent_id)
        .await
        .expect("transitions");
    let states: Vec<_> = transitions
        .iter()
        .map(|transition| transition.to.as_str())
        .collect();
    assert_eq!(states, ["SPAWNING", "RUNNING", "COMPLETED"]);
    assert_eq!(transitions[2].reason, "exited with code 0");

    daemon.stop().await;
    environment.cleanup().await;
}

async fn killing_an_agent_stops_its_whole_process_group(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let (daemon, mut agents) = start_agents(&environment, |_| {}).await;

    // The shell and its child ignore SIGTERM, so only the SIGKILL after the
    // grace period stops them.
    let spawned = agents
        .spawn("sh", "trap '' TERM; sleep 300 & echo child=$!; wait")
        .await
        .expect("spawn");
    let pid = spawned.pid.expect("pid");
    let running = agents
        .wait_until(&spawned.agent_id, "showing its child", |agent| {
            number_in_tail(agent, "child").is_some()
        })
        .await;
    let child = number_in_tail(&running, "child").expect("child pid");
    assert_eq!(running.state, is(pb::AgentState::Running));
    assert!(process_is_alive(pid) && process_is_alive(child));

    let asked = tokio::time::Instant::now();
    let killing = agents
        .kill(&spawned.agent_id, "test is over")
        .await
        .expect("kill");
    assert!(
        [is(pb::AgentState::Running), is(pb::AgentState::Killed)].contains(&killing.state),
        "{killing:?}"
    );
    let killed = agents
        .wait_until(&spawned.agent_id, "ended", |agent| agent.ended_at.is_some())
        .await;
    assert_eq!(killed.state, is(pb::AgentState::Killed), "{killed:?}");
    assert_eq!(killed.state_reason, "test is over");
    assert_eq!(
        killed.signal,
        Some(9),
        "SIGTERM was ignored, SIGKILL ended it"
    );
    assert!(
        asked.elapsed() >= Duration::from_secs(1),
        "the grace period was given"
    );
    // KILLED is recorded only once the whole group is gone.
    assert!(!process_is_alive(pid), "the agent survived");
    assert!(!process_is_alive(child), "the agent's child survived");

    // Killing it again returns it unchanged.
    let again = agents
        .kill(&spawned.agent_id, "again")
        .await
        .expect("kill again");
    assert_eq!(again, killed);

    // A well-behaved agent ends on SIGTERM, within the grace period.
    let polite = agents.spawn("sh", "sleep 300").await.expect("spawn");
    agents.kill(&polite.agent_id, "").await.expect("kill");
    let ended = agents
        .wait_until(&polite.agent_id, "ended", |agent| agent.ended_at.is_some())
        .await;
    assert_eq!(ended.state, is(pb::AgentState::Killed));
    assert_eq!(ended.state_reason, "killed on request");
    assert!(!process_is_alive(polite.pid.expect("pid")));

    daemon.stop().await;
    environment.cleanup().await;
}

async fn timeouts_and_failures_are_recorded(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let (daemon, mut agents) = start_agents(&environment, |_| {}).await;

    let slow = agents
        .spawn_request(pb::SpawnRequest {
            agent_type: "sh".to_owned(),
            prompt: "sleep 300".to_owned(),
            timeout_seconds: Some(1),
            ..pb::SpawnRequest::default()
        })
        .await
        .expect("spawn");
    let failing = agents
        .spawn("sh", "echo bad >&2; exit 3")
        .await
        .expect("spawn");
    let missing = agents
        .spawn("sh", "exec /no/such/program")
        .await
        .expect("spawn");
    // The main process ends at once and leaves a child behind in its group.
    let leaving = agents
        .spawn("sh", "sleep 300 & echo child=$!")
        .await
        .expect("spawn");

    let timed_out = agents
        .wait_until(&slow.agent_id, "ended", |agent| agent.ended_at.is_some())
        .await;
    assert_eq!(
        timed_out.state,
        is(pb::AgentState::TimedOut),
        "{timed_out:?}"
    );
    assert!(
        timed_out.state_reason.contains("timeout of 1 s"),
        "{timed_out:?}"
    );
    assert!(!process_is_alive(slow.pid.expect("pid")));

    let failed = agents
        .wait_until(&failing.agent_id, "ended", |agent| agent.ended_at.is_some())
        .await;
    assert_eq!(failed.state, is(pb::AgentState::Failed));
    assert_eq!(failed.exit_code, Some(3));
    assert_eq!(failed.state_reason, "exited with code 3");
    assert_eq!(failed.output_tail, ["bad"]);

    let failed = agents
        .wait_until(&missing.agent_id, "ended", |agent| agent.ended_at.is_some())
        .await;
    assert_eq!(failed.state, is(pb::AgentState::Failed));
    assert_eq!(failed.exit_code, Some(127));

    // Its exit decides the state; what it left in its group is stopped before
    // the end is recorded.
    let completed = agents
        .wait_until(&leaving.agent_id, "ended", |agent| agent.ended_at.is_some())
        .await;
    assert_eq!(
        completed.state,
        is(pb::AgentState::Completed),
        "{completed:?}"
    );
    let child = number_in_tail(&completed, "child").expect("child pid");
    assert!(!process_is_alive(child), "the agent's child survived");

    daemon.stop().await;
    environment.cleanup().await;
}

async fn a_prompt_is_one_argument_and_runs_nothing_else(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let (daemon, mut agents) = start_agents(&environment, |_| {}).await;

    let prompt = "hi; touch pwned1; rm -rf ./keep && $(touch pwned2) `touch pwned3` | touch pwned4\ntouch pwned5";
    let spawned = agents.spawn("printf", prompt).await.expect("spawn");
    let workdir = daemon
        .data_dir
        .join("agents")
        .join(&spawned.agent_id)
        .join("work");
    std::fs::create_dir_all(workdir.join("keep")).expect("a directory the prompt names");
    let ended = agents
        .wait_until(&spawned.agent_id, "ended", |agent| agent.ended_at.is_some())
        .await;
    assert_eq!(ended.state, is(pb::AgentState::Completed), "{ended:?}");
    // printf received the prompt as its one argument, newline included.
    let expected: Vec<String> = format!("[{prompt}]").lines().map(str::to_owned).collect();
    assert_eq!(ended.output_tail, expected);
    let created: Vec<_> = std::fs::read_dir(&workdir)
        .expect("workdir")
        .map(|entry| entry.expect("entry").file_name())
        .collect();
    assert_eq!(created, ["keep"], "nothing in the prompt ran");

    daemon.stop().await;
    environment.cleanup().await;
}

async fn watching_streams_state_changes_and_output_in_order(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let (daemon, mut agents) = start_agents(&environment, |_| {}).await;

    // The agent waits for a file, so the watch is open before it prints.
    let spawned = agents
        .spawn(
            "sh",
            "while [ ! -f go ]; do sleep 0.02; done; echo one; echo two >&2; echo three",
        )
        .await
        .expect("spawn");
    let request = pb::WatchAgentRequest {
        agent_id: spawned.agent_id.clone(),
        include_output: true,
        from_sequence: None,
    };
    let mut stream = agents
        .client
        .watch_agent(with_key(request, &agents.key))
        .await
        .expect("watch")
        .into_inner();
    let first = stream.message().await.expect("first").expect("a message");
    // The agent's events so far: 1 recorded (SPAWNING), 2 started (RUNNING).
    assert_eq!(first.sequence, 2);
    let Some(pb::watch_agent_response::Event::StateChange(change)) = first.event else {
        panic!("first message is the current state: {first:?}");
    };
    assert_eq!(change.from_state, is(pb::AgentState::Unspecified));
    assert_eq!(change.to_state, is(pb::AgentState::Running));

    std::fs::write(
        daemon
            .data_dir
            .join("agents")
            .join(&spawned.agent_id)
            .join("work")
            .join("go"),
        "",
    )
    .expect("write go");

    let mut stdout_lines = Vec::new();
    let mut stderr_lines = Vec::new();
    let mut changes = Vec::new();
    let mut sequence = first.sequence;
    let collected = tokio::time::timeout(AGENT_DEADLINE, async {
        while let Some(message) = stream.message().await.expect("message") {
            sequence += 1;
            assert_eq!(message.sequence, sequence);
            match message.event.expect("event") {
                pb::watch_agent_response::Event::OutputLine(line) => {
                    assert!(changes.is_empty(), "output after the final state");
                    if line.stream == pb::AgentOutputStream::Stderr as i32 {
                        stderr_lines.push(line.line);
                    } else {
                        stdout_lines.push(line.line);
                    }
                }
                pb::watch_agent_response::Event::StateChange(change) => {
                    changes.push((change.from_state, change.to_state, change.reason));
                }
            }
        }
    })
    .await;
    assert!(collected.is_ok(), "the stream ends when the agent ends");
    assert_eq!(stdout_lines, ["one", "three"]);
    assert_eq!(stderr_lines, ["two"]);
    assert_eq!(
        changes,
        [(
            is(pb::AgentState::Running),
            is(pb::AgentState::Completed),
            "exited with code 0".to_owned()
        )]
    );

    // Watching an agent that has ended gives its state and ends at once.
    let request = pb::WatchAgentRequest {
        agent_id: spawned.agent_id.clone(),
        include_output: true,
        from_sequence: None,
    };
    let mut stream = agents
        .client
        .watch_agent(with_key(request, &agents.key))
        .await
        .expect("watch")
        .into_inner();
    let only = stream.message().await.expect("first").expect("a message");
    let Some(pb::watch_agent_response::Event::StateChange(change)) = only.event else {
        panic!("a state change: {only:?}");
    };
    assert_eq!(change.to_state, is(pb::AgentState::Completed));
    assert!(stream.message().await.expect("end").is_none());

    daemon.stop().await;
    environment.cleanup().await;
}

async fn the_concurrency_cap_refuses_instead_of_queueing(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let (daemon, mut agents) = start_agents(&environment, |config| {
        config.agents.max_concurrent = 2;
    })
    .await;

    let first = agents.spawn("sh", "sleep 300").await.expect("first");
    let second = agents.spawn("sh", "sleep 300").await.expect("second");
    let status = agents
        .spawn("sh", "sleep 300")
        .await
        .expect_err("over the cap");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(
        status.message().contains("agents.max_concurrent = 2"),
        "{}",
        status.message()
    );
    let listed = agents
        .list(pb::ListAgentsRequest::default())
        .await
        .expect("list");
    assert_eq!(listed.agents.len(), 2, "the refused spawn recorded nothing");

    // Room again once one has ended.
    agents.kill(&first.agent_id, "").await.expect("kill");
    agents
        .wait_for_state(&first.agent_id, pb::AgentState::Killed)
        .await;
    let third = agents.spawn("sh", "sleep 300").await.expect("third");
    assert_eq!(third.state, is(pb::AgentState::Running));

    for agent in [&second, &third] {
        agents.kill(&agent.agent_id, "").await.expect("kill");
    }
    daemon.stop().await;
    environment.cleanup().await;
}

async fn bad_requests_are_refused_and_change_nothing(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let (daemon, mut agents) = start_agents(&environment, |_| {}).await;

    let spawn = |agent_type: &str, prompt: String| pb::SpawnRequest {
        agent_type: agent_type.to_owned(),
        prompt,
        ..pb::SpawnRequest::default()
    };
    let refused = [
        (spawn("", "x".into()), "agent_type is required"),
        (spawn("claude", "x".into()), "unknown agent type"),
        (spawn("sh", "x".repeat(4097)), "agents.max_prompt_bytes"),
        (spawn("sh", "a\0b".into()), "NUL"),
        (
            pb::SpawnRequest {
                labels: HashMap::from([("bad key".to_owned(), "v".to_owned())]),
                ..spawn("sh", "true".into())
            },
            "label keys",
        ),
        (
            pb::SpawnRequest {
                timeout_seconds: Some(601),
                ..spawn("sh", "true".into())
            },
            "above the maximum of 600",
        ),
        (
            pb::SpawnRequest {
                timeout_seconds: Some(0),
                ..spawn("sh", "true".into())
            },
            "at least 1",
        ),
    ];
    for (request, message) in refused {
        let status = agents
            .spawn_request(request.clone())
            .await
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{request:?}");
        assert!(status.message().contains(message), "{}", status.message());
    }

    let status = agents.get("").await.expect_err("empty id");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let status = agents.get("no-such-agent").await.expect_err("unknown");
    assert_eq!(status.code(), tonic::Code::NotFound);
    let status = agents.kill("no-such-agent", "").await.expect_err("unknown");
    assert_eq!(status.code(), tonic::Code::NotFound);
    let status = agents
        .kill("no-such-agent", &"r".repeat(1025))
        .await
        .expect_err("oversized reason");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let status = agents
        .list(pb::ListAgentsRequest {
            page_token: "not-a-token".to_owned(),
            ..pb::ListAgentsRequest::default()
        })
        .await
        .expect_err("bad token");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // Nothing was recorded and no agent directory was made: the only ones
    // there are spares made ahead, each still with its marker.
    let listed = agents
        .list(pb::ListAgentsRequest::default())
        .await
        .expect("list");
    assert!(listed.agents.is_empty(), "{listed:?}");
    let agents_dir = daemon.data_dir.join("agents");
    let taken: Vec<_> = std::fs::read_dir(&agents_dir)
        .expect("agents dir")
        .map(|entry| entry.expect("entry"))
        .filter(|entry| entry.path().is_dir())
        .filter(|entry| {
            let marker = format!("{}.spare", entry.file_name().to_string_lossy());
            !agents_dir.join(marker).is_file()
        })
        .collect();
    assert!(taken.is_empty(), "{taken:?}");

    // Without the agents scope, nothing is served.
    let coordinator_key = daemon.api_key(&[Scope::Coordinator]).await;
    let status = agents
        .client
        .spawn(with_key(spawn("sh", "true".into()), &coordinator_key))
        .await
        .expect_err("wrong scope");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);

    daemon.stop().await;
    environment.cleanup().await;
}

async fn listing_filters_and_pages(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let (daemon, mut agents) = start_agents(&environment, |_| {}).await;

    let mut ids = Vec::new();
    for (index, color) in ["red", "blue", "red"].into_iter().enumerate() {
        let agent = agents
            .spawn_request(pb::SpawnRequest {
                agent_type: "true".to_owned(),
                labels: HashMap::from([("color".to_owned(), color.to_owned())]),
                task_id: format!("task-{index}"),
                ..pb::SpawnRequest::default()
            })
            .await
            .expect("spawn");
        agents
            .wait_for_state(&agent.agent_id, pb::AgentState::Completed)
            .await;
        ids.push(agent.agent_id);
    }
    let sleeper = agents.spawn("sh", "sleep 300").await.expect("spawn");

    let listed_ids = |response: &pb::ListAgentsResponse| -> Vec<String> {
        response
            .agents
            .iter()
            .map(|agent| agent.agent_id.clone())
            .collect()
    };
    let completed = pb::ListAgentsRequest {
        state: is(pb::AgentState::Completed),
        page_size: 2,
        ..pb::ListAgentsRequest::default()
    };
    let first = agents.list(completed.clone()).await.expect("page 1");
    assert_eq!(listed_ids(&first), [ids[2].clone(), ids[1].clone()]);
    assert!(!first.next_page_token.is_empty());
    let second = agents
        .list(pb::ListAgentsRequest {
            page_token: first.next_page_token.clone(),
            ..completed.clone()
        })
        .await
        .expect("page 2");
    assert_eq!(listed_ids(&second), [ids[0].clone()]);
    assert!(second.next_page_token.is_empty());

    // The token belongs to its filters.
    let status = agents
        .list(pb::ListAgentsRequest {
            page_token: first.next_page_token,
            agent_type: "sh".to_owned(),
            ..completed
        })
        .await
        .expect_err("token for other filters");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    let red = agents
        .list(pb::ListAgentsRequest {
            labels: HashMap::from([("color".to_owned(), "red".to_owned())]),
            ..pb::ListAgentsRequest::default()
        })
        .await
        .expect("labels");
    assert_eq!(listed_ids(&red), [ids[2].clone(), ids[0].clone()]);
    let running_sh = agents
        .list(pb::ListAgentsRequest {
            state: is(pb::AgentState::Running),
            agent_type: "sh".to_owned(),
            origin_kind: pb::AgentOriginKind::Local as i32,
            ..pb::ListAgentsRequest::default()
        })
        .await
        .expect("running");
    assert_eq!(listed_ids(&running_sh), [sleeper.agent_id.as_str()]);
    let from_peers = agents
        .list(pb::ListAgentsRequest {
            origin_kind: pb::AgentOriginKind::Peer as i32,
            ..pb::ListAgentsRequest::default()
        })
        .await
        .expect("peer");
    assert!(from_peers.agents.is_empty());

    agents.kill(&sleeper.agent_id, "").await.expect("kill");
    daemon.stop().await;
    environment.cleanup().await;
}

async fn a_restart_after_sigkill_leaves_no_agent_falsely_running(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let setup = BinarySetup::new(&environment);
    let data_dir = setup.data_dir.clone();
    let key = setup.key.clone();
    let daemon_command = || setup.command();
    let (mut first_run, address) = spawn_serve_command(daemon_command()).await;
    let mut agents = Agents::new(channel_to(&address, &data_dir).await, key.clone());
    let done = agents.spawn("true", "").await.expect("spawn");
    agents
        .wait_for_state(&done.agent_id, pb::AgentState::Completed)
        .await;
    let orphan = agents
        .spawn("sh", "sleep 300 & echo child=$!; wait")
        .await
        .expect("spawn");
    let running = agents
        .wait_until(&orphan.agent_id, "showing its child", |agent| {
            number_in_tail(agent, "child").is_some()
        })
        .await;
    let pid = orphan.pid.expect("pid");
    let child = number_in_tail(&running, "child").expect("child pid");

    first_run.kill().await.expect("SIGKILL the daemon");
    // The daemon died without a word to its agents: they still run.
    assert!(process_is_alive(pid) && process_is_alive(child));

    let (mut second_run, address) = spawn_serve_command(daemon_command()).await;
    let mut agents = Agents::new(channel_to(&address, &data_dir).await, key);
    let settled = agents.get(&orphan.agent_id).await.expect("get");
    assert_eq!(settled.state, is(pb::AgentState::Failed), "{settled:?}");
    assert!(
        settled.state_reason.contains("daemon restarted"),
        "{settled:?}"
    );
    assert!(settled.ended_at.is_some());
    // Orphans are stopped, not re-adopted: the whole group goes.
    wait_until_dead(pid).await;
    wait_until_dead(child).await;
    let still_done = agents.get(&done.agent_id).await.expect("get");
    assert_eq!(still_done.state, is(pb::AgentState::Completed));
    let running = agents
        .list(pb::ListAgentsRequest {
            state: is(pb::AgentState::Running),
            ..pb::ListAgentsRequest::default()
        })
        .await
        .expect("list");
    assert!(running.agents.is_empty(), "{running:?}");

    second_run.kill().await.expect("stop the daemon");
    environment.cleanup().await;
}

/// Starts `sh -c 'sleep 300 & echo $!; wait'` in its own process group with
/// `MOSAIC_RUNNER_ID=runner_id` and an agent id no record has: what a daemon
/// leaves behind when it dies after starting an agent's process and before
/// committing its record. Returns the shell and the pid of its `sleep`.
async fn start_unrecorded_agent_process(runner_id: &str) -> (tokio::process::Child, u32) {
    use tokio::io::AsyncBufReadExt as _;
    let mut shell = tokio::process::Command::new("/bin/sh")
        .args(["-c", "sleep 300 & echo $!; wait"])
        .env("MOSAIC_RUNNER_ID", runner_id)
        .env("MOSAIC_AGENT_ID", uuid::Uuid::now_v7().to_string())
        .stdout(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("start an unrecorded agent process");
    let stdout = shell.stdout.take().expect("stdout");
    let mut line = String::new();
    tokio::io::BufReader::new(stdout)
        .read_line(&mut line)
        .await
        .expect("read the child's pid");
    let child = line.trim().parse().expect("child pid");
    (shell, child)
}

async fn a_restart_stops_processes_whose_start_was_never_recorded(backend: Backend) {
    use mosaic_mesh::agents::process::{GroupGuard, GroupSignal, signal_group};
    use std::os::unix::process::ExitStatusExt as _;

    let environment = TestEnvironment::new(backend).await;
    let (daemon, mut agents) = start_agents(&environment, |_| {}).await;
    // An agent learns the runner id of its daemon from its environment.
    let recorded = agents
        .spawn("sh", "echo \"runner=$MOSAIC_RUNNER_ID\"")
        .await
        .expect("spawn");
    let recorded = agents
        .wait_for_state(&recorded.agent_id, pb::AgentState::Completed)
        .await;
    let runner_id = recorded
        .output_tail
        .iter()
        .find_map(|line| line.strip_prefix("runner="))
        .filter(|runner_id| !runner_id.is_empty())
        .expect("the agent saw MOSAIC_RUNNER_ID")
        .to_owned();
    daemon.stop().await;

    // The daemon died between the start of a process and its record; another
    // daemon's (another runner's) agent runs beside it.
    let (mut unrecorded, unrecorded_child) = start_unrecorded_agent_process(&runner_id).await;
    let _unrecorded_guard = GroupGuard::new(unrecorded.id().expect("pid"));
    let (stranger, stranger_child) = start_unrecorded_agent_process("another-runner").await;
    let stranger_group = stranger.id().expect("pid");
    let _stranger_guard = GroupGuard::new(stranger_group);

    let (daemon, mut agents) = start_agents(&environment, |_| {}).await;
    // No record names it, yet the restarted daemon stops its whole group.
    let status = tokio::time::timeout(AGENT_DEADLINE, unrecorded.wait())
        .await
        .expect("the unrecorded process was stopped")
        .expect("wait");
    assert_eq!(status.signal(), Some(15), "SIGTERM: {status:?}");
    wait_until_dead(unrecorded_child).await;
    // Another runner's processes are not this daemon's to stop.
    assert!(process_is_alive(stranger_group) && process_is_alive(stranger_child));
    assert!(matches!(
        signal_group(stranger_group, GroupSignal::Kill),
        Ok(true)
    ));

    // Nothing was recorded for it, and nothing is shown running.
    let listed = agents
        .list(pb::ListAgentsRequest::default())
        .await
        .expect("list");
    let states: Vec<_> = listed
        .agents
        .iter()
        .map(|agent| (agent.agent_id.as_str(), agent.state))
        .collect();
    assert_eq!(
        states,
        [(recorded.agent_id.as_str(), is(pb::AgentState::Completed))]
    );

    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_configured_types_nothing_can_be_spawned() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let daemon = environment.start().await;
    let key = daemon.api_key(&[Scope::Agents]).await;
    let mut agents = Agents::new(daemon.channel().await, key);
    let status = agents
        .spawn("sh", "echo hi")
        .await
        .expect_err("no implicit types");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("configured types: none"),
        "{}",
        status.message()
    );
    daemon.stop().await;
}

async fn the_agent_commands_drive_the_daemon(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let setup = BinarySetup::new(&environment);
    let (mut daemon, address) = spawn_serve_command(setup.command()).await;
    let json = |output: std::process::Output| -> serde_json::Value {
        assert!(output.status.success(), "{output:?}");
        serde_json::from_slice(&output.stdout).expect("json output")
    };

    // spawn: the agent waits for a file, so `watch` sees its output live.
    let spawned = json(
        setup
            .client(&address)
            .args([
                "agent",
                "spawn",
                "--type",
                "sh",
                "--json",
                "--label",
                "team=blue",
            ])
            .args(["--timeout", "60", "--prompt"])
            .arg("while [ ! -f go ]; do sleep 0.02; done; echo hello-cli")
            .output()
            .expect("agent spawn"),
    );
    assert_eq!(spawned["state"], "RUNNING", "{spawned}");
    assert_eq!(spawned["labels"]["team"], "blue");
    assert_eq!(spawned["timeout_seconds"], 60);
    let agent_id = spawned["agent_id"].as_str().expect("id").to_owned();

    let mut watch = tokio::process::Command::from(setup.client(&address));
    watch
        .args(["agent", "watch", &agent_id])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut watch = watch.spawn().expect("agent watch");
    let mut states = tokio::io::BufReader::new(watch.stderr.take().expect("stderr"));
    let mut first_state = String::new();
    tokio::time::timeout(
        AGENT_DEADLINE,
        tokio::io::AsyncBufReadExt::read_line(&mut states, &mut first_state),
    )
    .await
    .expect("watch prints the current state")
    .expect("read");
    assert!(first_state.contains("is RUNNING"), "{first_state}");
    std::fs::write(
        setup
            .data_dir
            .join("agents")
            .join(&agent_id)
            .join("work")
            .join("go"),
        "",
    )
    .expect("write go");
    let watched = tokio::time::timeout(AGENT_DEADLINE, watch.wait_with_output())
        .await
        .expect("watch ends with the agent")
        .expect("watch output");
    assert!(watched.status.success(), "{watched:?}");
    assert_eq!(String::from_utf8_lossy(&watched.stdout), "hello-cli\n");
    let mut rest = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut states, &mut rest)
        .await
        .expect("read states");
    assert!(rest.contains("is COMPLETED (exited with code 0)"), "{rest}");

    let status = json(
        setup
            .client(&address)
            .args(["agent", "status", &agent_id, "--json"])
            .output()
            .expect("agent status"),
    );
    assert_eq!(status["state"], "COMPLETED");
    assert_eq!(status["exit_code"], 0);
    assert_eq!(status["output_tail"], serde_json::json!(["hello-cli"]));

    // kill on an ended agent shows it unchanged; on a running one, stops it.
    let unchanged = json(
        setup
            .client(&address)
            .args(["agent", "kill", &agent_id, "--json"])
            .output()
            .expect("agent kill"),
    );
    assert_eq!(unchanged, status);
    let sleeper = json(
        setup
            .client(&address)
            .args([
                "agent",
                "spawn",
                "--type",
                "sh",
                "--prompt",
                "sleep 300",
                "--json",
            ])
            .output()
            .expect("agent spawn"),
    );
    let sleeper_id = sleeper["agent_id"].as_str().expect("id").to_owned();
    let killing = setup
        .client(&address)
        .args(["agent", "kill", &sleeper_id, "--reason", "from the cli"])
        .output()
        .expect("agent kill");
    assert!(killing.status.success(), "{killing:?}");
    let mut agents = Agents::new(
        channel_to(&address, &setup.data_dir).await,
        setup.key.clone(),
    );
    let killed = agents
        .wait_for_state(&sleeper_id, pb::AgentState::Killed)
        .await;
    assert_eq!(killed.state_reason, "from the cli");

    let listed = json(
        setup
            .client(&address)
            .args(["agent", "list", "--label", "team=blue", "--json"])
            .output()
            .expect("agent list"),
    );
    assert_eq!(listed["agents"].as_array().map(Vec::len), Some(1));
    assert_eq!(listed["agents"][0]["agent_id"], agent_id.as_str());
    let text = setup
        .client(&address)
        .args(["agent", "list", "--state", "killed"])
        .output()
        .expect("agent list");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&sleeper_id) && !text.contains(&agent_id),
        "{text}"
    );

    // Errors keep their meaning in the exit code.
    let unknown = setup
        .client(&address)
        .args(["agent", "status", "no-such-agent"])
        .output()
        .expect("agent status");
    assert_eq!(unknown.status.code(), Some(3));
    let refused = setup
        .client(&address)
        .args(["agent", "spawn", "--type", "nope", "--prompt", "x"])
        .output()
        .expect("agent spawn");
    assert_eq!(refused.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("unknown agent type"));

    daemon.kill().await.expect("stop the daemon");
    environment.cleanup().await;
}

async fn stopping_the_daemon_stops_its_agents(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let (daemon, mut agents) = start_agents(&environment, |_| {}).await;
    let spawned = agents
        .spawn("sh", "sleep 300 & echo child=$!; wait")
        .await
        .expect("spawn");
    let running = agents
        .wait_until(&spawned.agent_id, "showing its child", |agent| {
            number_in_tail(agent, "child").is_some()
        })
        .await;
    let child = number_in_tail(&running, "child").expect("child pid");

    daemon.stop().await;
    let stored = environment
        .store()
        .await
        .get_agent(&spawned.agent_id)
        .await
        .expect("get")
        .expect("recorded");
    assert_eq!(stored.state.as_str(), "FAILED", "{stored:?}");
    assert!(stored.state_reason.contains("shut down"), "{stored:?}");
    assert!(!process_is_alive(spawned.pid.expect("pid")));
    assert!(!process_is_alive(child));
    environment.cleanup().await;
}

async fn client_commands_find_the_daemon_at_the_configured_listen_address(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let setup = BinarySetup::new(&environment);
    let (mut daemon, address) = spawn_serve_command(setup.command()).await;
    // The operator's config names where the daemon listens (here the port it
    // got); no --server: client commands go there, not to 7443.
    let config_file = setup.data_dir.join("client.toml");
    std::fs::write(&config_file, format!("listen = \"{address}\"\n")).expect("write config");
    let listed = mosaicd(&setup.data_dir)
        .arg("--config")
        .arg(&config_file)
        .arg("--database-url")
        .arg(&setup.database_url)
        .args(["agent", "list", "--json"])
        .env("MOSAIC_API_KEY", &setup.key)
        .env_remove("MOSAIC_SERVER")
        .output()
        .expect("agent list");
    assert!(listed.status.success(), "{listed:?}");
    daemon.kill().await.expect("stop the daemon");
    environment.cleanup().await;
}
