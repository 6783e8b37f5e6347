//! Following an agent (DESIGN.md section 12): every event numbered, a watch
//! from any sequence that misses nothing and repeats nothing (after the
//! agent ended, after a cut, behind a talkative agent), the whole output read
//! by offset, the CLI's `agent logs`, and what is left once the output is
//! pruned.

use std::time::Duration;

use futures::StreamExt as _;
use mosaic_mesh::proto::agent as pb;
use pb::watch_agent_response::Event;
use tonic::Code;

use crate::support::Backend;
use crate::support::agents::{AGENT_DEADLINE, Agents, BinarySetup, start_agents};
use crate::support::binary::spawn_serve_command;
use crate::support::daemon::{TestEnvironment, with_key};

on_both_backends!(
    a_watch_from_the_start_sees_every_event_once_in_order,
    a_cut_watch_resumes_after_the_last_sequence_it_saw,
    output_is_read_by_offset_and_bad_reads_change_nothing,
);

/// A shell loop printing `line-1` to `line-N`, `pause` seconds apart.
fn printing(lines: usize, pause: &str) -> String {
    format!("i=1; while [ $i -le {lines} ]; do echo line-$i; sleep {pause}; i=$((i+1)); done")
}

async fn watch(
    agents: &mut Agents,
    agent_id: &str,
    include_output: bool,
    from_sequence: Option<u64>,
) -> Result<tonic::Streaming<pb::WatchAgentResponse>, tonic::Status> {
    let request = pb::WatchAgentRequest {
        agent_id: agent_id.to_owned(),
        include_output,
        from_sequence,
    };
    let response = agents
        .client
        .watch_agent(with_key(request, &agents.key))
        .await?;
    Ok(response.into_inner())
}

/// Every message until the stream ends (it must, within the deadline).
async fn drain(stream: tonic::Streaming<pb::WatchAgentResponse>) -> Vec<pb::WatchAgentResponse> {
    let messages = tokio::time::timeout(AGENT_DEADLINE, async {
        stream
            .map(|message| message.expect("a watch message"))
            .collect::<Vec<_>>()
            .await
    })
    .await;
    messages.expect("the watch ends with the agent")
}

fn sequences(messages: &[pb::WatchAgentResponse]) -> Vec<u64> {
    messages.iter().map(|message| message.sequence).collect()
}

fn lines(messages: &[pb::WatchAgentResponse]) -> Vec<String> {
    messages
        .iter()
        .filter_map(|message| match &message.event {
            Some(Event::OutputLine(line)) => Some(line.line.clone()),
            _ => None,
        })
        .collect()
}

fn states(messages: &[pb::WatchAgentResponse]) -> Vec<(i32, i32)> {
    messages
        .iter()
        .filter_map(|message| match &message.event {
            Some(Event::StateChange(change)) => Some((change.from_state, change.to_state)),
            _ => None,
        })
        .collect()
}

fn numbered(count: usize) -> Vec<String> {
    (1..=count).map(|line| format!("line-{line}")).collect()
}

fn state(state: pb::AgentState) -> i32 {
    state as i32
}

async fn a_watch_from_the_start_sees_every_event_once_in_order(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let (_daemon, mut agents) = start_agents(&environment, |_| {}).await;
    let agent = agents
        .spawn("sh", &printing(200, "0"))
        .await
        .expect("spawn");
    // Opened right after Spawn answered, when the agent has printed some
    // lines already: a watch from the start has them all the same.
    let early = watch(&mut agents, &agent.agent_id, true, Some(1))
        .await
        .expect("watch from 1");
    let early = drain(early).await;
    // And once the agent has ended, from its journal alone.
    let late = watch(&mut agents, &agent.agent_id, true, Some(0))
        .await
        .expect("watch from 0 (the start)");
    let late = drain(late).await;

    let all: Vec<u64> = (1..=203).collect();
    for messages in [&early, &late] {
        assert_eq!(sequences(messages), all);
        assert_eq!(lines(messages), numbered(200));
        use pb::AgentState::{Completed, Running, Spawning, Unspecified};
        assert_eq!(
            states(messages),
            [
                (state(Unspecified), state(Spawning)),
                (state(Spawning), state(Running)),
                (state(Running), state(Completed)),
            ]
        );
    }

    // Without output, the lines are left out but keep their numbers.
    let quiet = drain(
        watch(&mut agents, &agent.agent_id, false, Some(1))
            .await
            .expect("watch without output"),
    )
    .await;
    assert_eq!(sequences(&quiet), [1, 2, 203]);
    // From a later sequence: only what follows it.
    let tail = drain(
        watch(&mut agents, &agent.agent_id, true, Some(200))
            .await
            .expect("watch from 200"),
    )
    .await;
    assert_eq!(sequences(&tail), [200, 201, 202, 203]);
    assert_eq!(lines(&tail), ["line-198", "line-199", "line-200"]);
    // Without a start, the current state, numbered with the last event.
    let now = drain(
        watch(&mut agents, &agent.agent_id, true, None)
            .await
            .expect("watch now"),
    )
    .await;
    assert_eq!(sequences(&now), [203]);
    assert_eq!(
        states(&now),
        [(
            state(pb::AgentState::Unspecified),
            state(pb::AgentState::Completed)
        )]
    );
    environment.cleanup().await;
}

async fn a_cut_watch_resumes_after_the_last_sequence_it_saw(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let (_daemon, mut agents) = start_agents(&environment, |_| {}).await;
    let agent = agents
        .spawn("sh", &printing(100, "0.01"))
        .await
        .expect("spawn");
    let mut first = watch(&mut agents, &agent.agent_id, true, Some(1))
        .await
        .expect("watch");
    let mut seen = Vec::new();
    while seen
        .last()
        .is_none_or(|message: &pb::WatchAgentResponse| message.sequence < 30)
    {
        let message = tokio::time::timeout(AGENT_DEADLINE, first.message())
            .await
            .expect("a message in time")
            .expect("a message")
            .expect("the stream goes on");
        seen.push(message);
    }
    // The connection is cut while the agent goes on printing.
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let resume_from = seen.last().expect("seen").sequence + 1;
    let rest = watch(&mut agents, &agent.agent_id, true, Some(resume_from))
        .await
        .expect("resume");
    seen.extend(drain(rest).await);
    assert_eq!(sequences(&seen), (1..=103).collect::<Vec<u64>>());
    assert_eq!(lines(&seen), numbered(100));

    // A start past the agent's end sends nothing and ends with it.
    let short = agents.spawn("sh", "sleep 0.3").await.expect("spawn");
    let past = drain(
        watch(&mut agents, &short.agent_id, true, Some(1_000))
            .await
            .expect("watch from past the end"),
    )
    .await;
    assert!(past.is_empty(), "{past:?}");
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watcher_far_behind_a_talkative_agent_loses_no_line() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let (daemon, mut agents) = start_agents(&environment, |_| {}).await;
    let agent = agents
        .spawn("sh", "while [ ! -f go ]; do sleep 0.02; done; seq 1 30000")
        .await
        .expect("spawn");
    let mut stream = watch(&mut agents, &agent.agent_id, true, None)
        .await
        .expect("watch");
    let current = stream.message().await.expect("first").expect("a message");
    assert_eq!(
        current.sequence, 2,
        "the current state: recorded, then started"
    );
    let go = daemon
        .data_dir
        .join("agents")
        .join(&agent.agent_id)
        .join("work")
        .join("go");
    std::fs::write(go, "").expect("write go");
    // The watcher reads nothing while the agent prints 30 000 lines, far
    // more than the live broadcast keeps.
    agents
        .wait_for_state(&agent.agent_id, pb::AgentState::Completed)
        .await;
    let rest = drain(stream).await;
    let expected: Vec<String> = (1..=30_000).map(|line| line.to_string()).collect();
    assert_eq!(lines(&rest).len(), expected.len(), "lines were lost");
    assert_eq!(lines(&rest), expected);
    assert_eq!(sequences(&rest), (3..=30_003).collect::<Vec<u64>>());
    environment.cleanup().await;
}

async fn read(
    agents: &mut Agents,
    agent_id: &str,
    offset: u64,
    max_bytes: u32,
) -> Result<pb::ReadAgentOutputResponse, tonic::Status> {
    let request = pb::ReadAgentOutputRequest {
        agent_id: agent_id.to_owned(),
        offset,
        max_bytes,
    };
    let response = agents
        .client
        .read_agent_output(with_key(request, &agents.key))
        .await?;
    Ok(response.into_inner())
}

async fn output_is_read_by_offset_and_bad_reads_change_nothing(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let (_daemon, mut agents) = start_agents(&environment, |_| {}).await;
    let agent = agents
        .spawn(
            "sh",
            "printf 'first\\n'; head -c 150000 /dev/zero | tr '\\0' x; printf '\\nlast\\n'; sleep 0.3",
        )
        .await
        .expect("spawn");
    // While it runs: what is there so far, and not the end.
    let running = read(&mut agents, &agent.agent_id, 0, 0)
        .await
        .expect("read");
    assert!(!running.end);
    agents
        .wait_for_state(&agent.agent_id, pb::AgentState::Completed)
        .await;

    let mut expected = b"first\n".to_vec();
    expected.extend(std::iter::repeat_n(b'x', 150_000));
    expected.extend(b"\nlast\n");
    let mut whole: Vec<u8> = Vec::new();
    let mut offset = 0;
    let mut reads = 0;
    loop {
        let part = read(&mut agents, &agent.agent_id, offset, 40_000)
            .await
            .expect("read");
        assert_eq!(part.offset, offset);
        assert!(part.data.len() <= 40_000);
        assert_eq!(part.next_offset, offset + part.data.len() as u64);
        assert_eq!(part.kept_bytes, expected.len() as u64);
        whole.extend(&part.data);
        offset = part.next_offset;
        reads += 1;
        if part.end {
            break;
        }
        assert!(reads < 10, "no end after {reads} reads");
    }
    assert_eq!(whole, expected);
    assert_eq!(reads, 4);
    // 0 bytes asked: the default, 64 KiB; more than the cap: 1 MiB at most.
    let first = read(&mut agents, &agent.agent_id, 0, 0)
        .await
        .expect("read");
    assert_eq!(first.data.len(), 64 * 1024);
    let all = read(&mut agents, &agent.agent_id, 0, u32::MAX)
        .await
        .expect("read");
    assert_eq!(all.data, expected);
    assert!(all.end);
    // At the end: nothing, and the end; past it: OUT_OF_RANGE.
    let at_end = read(&mut agents, &agent.agent_id, expected.len() as u64, 0)
        .await
        .expect("read at the end");
    assert!(at_end.data.is_empty() && at_end.end);
    let past = read(&mut agents, &agent.agent_id, expected.len() as u64 + 1, 0)
        .await
        .expect_err("past the end");
    assert_eq!(past.code(), Code::OutOfRange, "{past:?}");
    assert!(
        past.message().contains(&expected.len().to_string()),
        "{past:?}"
    );
    let empty = read(&mut agents, "", 0, 0).await.expect_err("no id");
    assert_eq!(empty.code(), Code::InvalidArgument);
    let unknown = read(&mut agents, "no-such-agent", 0, 0)
        .await
        .expect_err("unknown");
    assert_eq!(unknown.code(), Code::NotFound);
    let unknown = watch(&mut agents, "no-such-agent", true, Some(1))
        .await
        .expect_err("unknown");
    assert_eq!(unknown.code(), Code::NotFound);
    // Nothing of that changed the output.
    let again = read(&mut agents, &agent.agent_id, 0, u32::MAX)
        .await
        .expect("read");
    assert_eq!(again.data, expected);
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pruned_output_is_not_found_while_the_record_stays() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let (daemon, mut agents) = start_agents(&environment, |config| {
        config.storage.agent_output_retention = Some(Duration::from_secs(1));
        config.storage.prune_interval = Duration::from_secs(1);
    })
    .await;
    let agent = agents
        .spawn("sh", "echo kept-a-while")
        .await
        .expect("spawn");
    agents
        .wait_for_state(&agent.agent_id, pb::AgentState::Completed)
        .await;
    let agent_dir = daemon.data_dir.join("agents").join(&agent.agent_id);
    let deadline = tokio::time::Instant::now() + AGENT_DEADLINE;
    while agent_dir.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ended agent's directory was never pruned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ended = agents.get(&agent.agent_id).await.expect("the record stays");
    assert_eq!(ended.output_tail, ["kept-a-while"]);
    let gone = read(&mut agents, &agent.agent_id, 0, 0)
        .await
        .expect_err("pruned output");
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    assert!(gone.message().contains("no longer kept"), "{gone:?}");
    let stream = watch(&mut agents, &agent.agent_id, true, Some(1))
        .await
        .expect("a watch answers with its stream");
    let mut stream = stream;
    let gone = stream.message().await.expect_err("pruned events");
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    // Without a start: the record, numbered 0 (its events are not kept).
    let now = drain(
        watch(&mut agents, &agent.agent_id, true, None)
            .await
            .expect("watch now"),
    )
    .await;
    assert_eq!(sequences(&now), [0]);
    assert_eq!(
        states(&now),
        [(
            state(pb::AgentState::Unspecified),
            state(pb::AgentState::Completed)
        )]
    );
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_logs_prints_the_output_and_follows_from_a_sequence() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let setup = BinarySetup::new(&environment);
    let (mut daemon, address) = spawn_serve_command(setup.command()).await;
    let spawned = setup
        .client(&address)
        .args(["agent", "spawn", "--type", "sh", "--json", "--prompt"])
        .arg("echo one; echo two >&2; echo three")
        .output()
        .expect("agent spawn");
    assert!(spawned.status.success(), "{spawned:?}");
    let spawned: serde_json::Value = serde_json::from_slice(&spawned.stdout).expect("json");
    let agent_id = spawned["agent_id"].as_str().expect("id").to_owned();
    let mut agents = Agents::new(
        crate::support::binary::channel_to(&address, &setup.data_dir).await,
        setup.key.clone(),
    );
    agents
        .wait_for_state(&agent_id, pb::AgentState::Completed)
        .await;

    let logs = setup
        .client(&address)
        .args(["agent", "logs", &agent_id])
        .output()
        .expect("agent logs");
    assert!(logs.status.success(), "{logs:?}");
    let printed = String::from_utf8_lossy(&logs.stdout);
    assert_eq!(printed.lines().count(), 3, "{printed}");
    for line in ["one", "two", "three"] {
        assert!(printed.lines().any(|printed| printed == line), "{printed}");
    }

    let followed = setup
        .client(&address)
        .args(["agent", "logs", &agent_id, "--follow"])
        .output()
        .expect("agent logs --follow");
    assert!(followed.status.success(), "{followed:?}");
    let stdout = String::from_utf8_lossy(&followed.stdout);
    assert_eq!(stdout, "one\nthree\n");
    assert!(String::from_utf8_lossy(&followed.stderr).contains("two"));
    // A reader that went away (`| head -1` done) ends the follow quietly.
    for json in [false, true] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let mut client = setup.client(&address);
        if json {
            client.arg("--json");
        }
        let gone = client
            .args(["agent", "logs", &agent_id, "--follow"])
            .stdout(writer)
            .output()
            .expect("agent logs --follow");
        let stderr = String::from_utf8_lossy(&gone.stderr);
        assert!(gone.status.success(), "json {json}: {stderr}");
        assert!(!stderr.contains("panicked"), "json {json}: {stderr}");
    }

    // Events: 1 recorded, 2 started, 3-5 the lines, 6 the end.
    let from = setup
        .client(&address)
        .args(["agent", "watch", &agent_id, "--from", "5", "--json"])
        .output()
        .expect("agent watch --from");
    assert!(from.status.success(), "{from:?}");
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&from.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON event"))
        .collect();
    let sequences: Vec<u64> = events
        .iter()
        .map(|event| event["sequence"].as_u64().expect("sequence"))
        .collect();
    assert_eq!(sequences, [5, 6]);
    assert_eq!(events[1]["state_change"]["to_state"], "COMPLETED");

    let unknown = setup
        .client(&address)
        .args(["agent", "logs", "no-such-agent"])
        .output()
        .expect("agent logs");
    assert_eq!(unknown.status.code(), Some(3), "{unknown:?}");
    daemon.kill().await.expect("stop the daemon");
    environment.cleanup().await;
}
