//! A remote watch refuses batches that do not verify: daemon A follows an
//! agent on B, and a stand-in with B's own key and certificate on B's port
//! streams batches with one flipped bit, signed by another key, for another
//! command or skipping a sequence; each ends A's watch with INTERNAL after
//! the honest batch before it, passes on nothing of itself, and is logged.

use std::sync::Arc;

use mosaic_mesh::proto::agent as agent_pb;
use mosaic_mesh::proto::federation as pb;
use mosaic_mesh::proto::federation::federation_client::FederationClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::Backend;
use crate::support::admin::PATIENCE;
use crate::support::daemon::{bind_loopback, with_key};
use crate::support::fake_peer::{self, Reply, WATCH_EVENTS};
use crate::support::pair::Pair;
use crate::support::peer::TestPeer;

on_both_backends!(a_tampered_batch_ends_the_watch_after_the_honest_ones_and_is_logged);

/// The agent A asks to follow; the stand-in answers for any id.
const WATCHED_AGENT: &str = "agent-watched-on-b";

/// What a watch passed on before it ended, and how it ended.
struct Watched {
    events: Vec<agent_pb::WatchAgentResponse>,
    end: Result<(), tonic::Status>,
}

impl Watched {
    fn sequences(&self) -> Vec<u64> {
        self.events.iter().map(|event| event.sequence).collect()
    }
}

/// Follows [`WATCHED_AGENT`] on `peer` through A from sequence 1 until the
/// stream ends. A refusal may come as the call's error or inside the
/// stream; both are the watch's end.
async fn watch(client: &mut FederationClient<Channel>, key: &str, peer: &str) -> Watched {
    let request = with_key(
        pb::WatchRemoteAgentRequest {
            peer_instance_id: peer.to_owned(),
            workspace: String::new(),
            agent_id: WATCHED_AGENT.to_owned(),
            include_output: true,
            from_sequence: Some(1),
        },
        key,
    );
    let following = async {
        let mut stream = match client.watch_remote_agent(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                return Watched {
                    events: Vec::new(),
                    end: Err(status),
                };
            }
        };
        let mut events = Vec::new();
        loop {
            match stream.message().await {
                Ok(Some(message)) => events.extend(message.events),
                Ok(None) => {
                    return Watched {
                        events,
                        end: Ok(()),
                    };
                }
                Err(status) => {
                    return Watched {
                        events,
                        end: Err(status),
                    };
                }
            }
        }
    };
    tokio::time::timeout(PATIENCE, following)
        .await
        .expect("the watch ends")
}

async fn a_tampered_batch_ends_the_watch_after_the_honest_ones_and_is_logged(backend: Backend) {
    let mut pair = Pair::start(backend, |_| {}, |_| {}).await;
    pair.connect("ws", &["agent.status"]).await;
    let (mut client_a, key_a) = (pair.admin_a.client.clone(), pair.admin_a.key.clone());
    let b_id = pair.b_id.clone();

    // B stops; a stand-in with B's own key and certificate takes its port.
    let (b_address, b_config) = (pair.b().address, pair.b().config.clone());
    pair.stop_b().await;
    let b_identity = mosaic_mesh::server::prepare(&b_config)
        .await
        .expect("B's identity")
        .identity;
    let stranger = TestPeer::new("stranger").await.current();
    let mode = Arc::new(std::sync::Mutex::new(Reply::Honest));
    let listener = bind_loopback(b_address.port()).await;
    let stand_in = fake_peer::serve(listener, b_identity, stranger, Arc::clone(&mode));

    // The control: honest batches are believed to the agent's end, so the
    // refusals below are about the tampering alone.
    let honest = watch(&mut client_a, &key_a, &b_id).await;
    if let Err(status) = &honest.end {
        panic!("the honest watch ends OK: {status:?}");
    }
    assert_eq!(
        honest.sequences(),
        (1..=WATCH_EVENTS).collect::<Vec<_>>(),
        "{:?}",
        honest.events
    );
    match &honest.events.last().and_then(|event| event.event.as_ref()) {
        Some(agent_pb::watch_agent_response::Event::StateChange(change)) => {
            assert_eq!(change.to_state(), agent_pb::AgentState::Completed);
            assert_eq!(
                change.agent.as_ref().map(|agent| agent.agent_id.as_str()),
                Some(WATCHED_AGENT)
            );
        }
        other => panic!("the last event is the agent's end: {other:?}"),
    }

    // Each tampered second batch: the first batch (sequences 1 and 2) is
    // passed on, then the watch ends with INTERNAL, and nothing of the
    // tampered batch or of the honest one after it arrives.
    let tampered = [
        (Reply::FlippedPayloadBit, "the signature does not verify"),
        (Reply::FlippedSignature, "the signature does not verify"),
        (Reply::SignedByAnotherKey, "not a known key of the sender"),
        (Reply::AnswersAnotherMessage, "answers another command"),
        (Reply::SkipsASequence, "the next expected is 3"),
    ];
    for (reply, _) in tampered {
        *mode.lock().expect("mode") = reply;
        let watched = watch(&mut client_a, &key_a, &b_id).await;
        let Err(status) = &watched.end else {
            panic!("{reply:?}: the watch ended OK with {:?}", watched.events);
        };
        assert_eq!(status.code(), Code::Internal, "{reply:?}: {status:?}");
        assert!(
            !status.message().contains("stand-in"),
            "{reply:?}: nothing of the batch is passed on: {status:?}"
        );
        assert_eq!(
            watched.sequences(),
            [1, 2],
            "{reply:?}: {:?}",
            watched.events
        );
    }

    // A logged one agent.watch per watch, newest first: the control ended
    // with the agent, each refusal as INTERNAL with its reason.
    let log = client_a
        .list_command_log(with_key(
            pb::ListCommandLogRequest {
                direction: pb::CommandDirection::Outbound as i32,
                ..pb::ListCommandLogRequest::default()
            },
            &key_a,
        ))
        .await
        .expect("command log")
        .into_inner()
        .entries;
    assert_eq!(log.len(), tampered.len() + 1, "{log:?}");
    assert!(
        log.iter().all(|entry| entry.command_type == "agent.watch"
            && entry.recipient_instance_id == b_id
            && entry.workspace == "ws"),
        "{log:?}"
    );
    let control = log.last().expect("the control's entry");
    assert_eq!(control.outcome, "ok", "{control:?}");
    assert!(
        control
            .detail
            .contains(&format!("delivered sequences 1 to {WATCH_EVENTS}")),
        "{control:?}"
    );
    for (entry, (reply, reason)) in log.iter().zip(tampered.iter().rev()) {
        assert_eq!(entry.outcome, "INTERNAL", "{reply:?}: {entry:?}");
        for said in ["delivered sequences 1 to 2", "failed verification", reason] {
            assert!(entry.detail.contains(said), "{reply:?}: {entry:?}");
        }
    }

    stand_in.abort();
    pair.finish().await;
}
