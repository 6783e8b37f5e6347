//! A stand-in for a peer daemon's server that answers ExecuteCommand with a
//! reply, and WatchCommand with a stream of event batches, it tampered with,
//! on the peer's own port, with the peer's own key and certificate: what a
//! sender must refuse to believe.

use std::sync::Arc;

use mosaic_mesh::federation::envelope::{self, Routing};
use mosaic_mesh::identity::{Identity, IdentityManager};
use mosaic_mesh::proto::agent as agent_pb;
use mosaic_mesh::proto::federation as pb;
use prost::Message as _;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tonic::{Request, Response, Status};

/// How the stand-in answers. A watch is answered with three batches (see
/// [`WATCH_EVENTS`]); the tampering, if any, is in the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// A well-formed result signed by the peer's key (the control case).
    Honest,
    /// The same with one bit of the signature flipped.
    FlippedSignature,
    /// The same with one bit of the signed payload flipped.
    FlippedPayloadBit,
    /// The same signed by a key the sender does not trust.
    SignedByAnotherKey,
    /// Correctly signed, but answering another message id.
    AnswersAnotherMessage,
    /// Correctly signed, but the second batch of a watch starts one sequence
    /// past the one expected. ExecuteCommand answers as [`Reply::Honest`].
    SkipsASequence,
}

/// The stand-in's result agent id.
pub const FORGED_AGENT_ID: &str = "agent-from-the-stand-in";

/// How many events a watch from sequence 1 gets when nothing is tampered
/// with: two output lines in the first batch (1 and 2), two in the second
/// (3 and 4), and the agent's change to COMPLETED in the third (5). The
/// stand-in sends them whatever the command's include_output.
pub const WATCH_EVENTS: u64 = 5;

struct Tampering {
    identity: Arc<IdentityManager>,
    stranger: Arc<Identity>,
    reply: Arc<std::sync::Mutex<Reply>>,
}

impl Tampering {
    fn mode(&self) -> Reply {
        *self.reply.lock().expect("reply mode")
    }

    async fn execute_command(
        &self,
        request: Request<pb::ExecuteCommandRequest>,
    ) -> Result<Response<pb::ExecuteCommandResponse>, Status> {
        let command = decode_command(request.into_inner().envelope)?;
        let header = command.header.unwrap_or_default();
        let identity = self.identity.current();
        let mode = self.mode();
        let signer = self.signer(&identity, mode);
        let result = pb::CommandResultPayload {
            header: Some(reply_header(&identity, &header, signer)),
            command_message_id: match mode {
                Reply::AnswersAnotherMessage => "another-message".to_owned(),
                _ => header.message_id,
            },
            outcome: Some(pb::command_result_payload::Outcome::Agent(
                agent_pb::Agent {
                    agent_id: FORGED_AGENT_ID.to_owned(),
                    state: agent_pb::AgentState::Running as i32,
                    ..agent_pb::Agent::default()
                },
            )),
        };
        let reply = envelope::seal(&result, signer).map_err(|_| Status::internal("seal"))?;
        Ok(Response::new(pb::ExecuteCommandResponse {
            envelope: Some(flip_a_bit(reply, mode)),
        }))
    }

    /// The batches answering an `agent.watch`, all built before the first is
    /// sent: an honest one, one tampered with as the mode says, and one
    /// that follows the tampered one and ends the agent, so that a watcher
    /// that believed the tampered batch would end OK.
    fn watch_command(
        &self,
        request: Request<pb::WatchCommandRequest>,
    ) -> Result<Vec<pb::WatchCommandResponse>, Status> {
        let command = decode_command(request.into_inner().envelope)?;
        let Some(pb::command_payload::Command::AgentWatch(watch)) = command.command else {
            return Err(Status::invalid_argument("not an agent.watch"));
        };
        let header = command.header.unwrap_or_default();
        let identity = self.identity.current();
        let mode = self.mode();
        let first = watch.from_sequence.unwrap_or(1).max(1);
        let line = |sequence: u64| agent_pb::WatchAgentResponse {
            sequence,
            event: Some(agent_pb::watch_agent_response::Event::OutputLine(
                agent_pb::AgentOutputLine {
                    stream: agent_pb::AgentOutputStream::Stdout as i32,
                    line: format!("line {sequence} from the stand-in"),
                    at: None,
                },
            )),
        };
        let end = first + WATCH_EVENTS - 1;
        let completed = agent_pb::WatchAgentResponse {
            sequence: end,
            event: Some(agent_pb::watch_agent_response::Event::StateChange(
                agent_pb::AgentStateChange {
                    from_state: agent_pb::AgentState::Running as i32,
                    to_state: agent_pb::AgentState::Completed as i32,
                    agent: Some(agent_pb::Agent {
                        agent_id: watch.agent_id.clone(),
                        state: agent_pb::AgentState::Completed as i32,
                        ..agent_pb::Agent::default()
                    }),
                    ..agent_pb::AgentStateChange::default()
                },
            )),
        };
        let second_first = match mode {
            Reply::SkipsASequence => first + 3,
            _ => first + 2,
        };
        let batches = [
            (
                Reply::Honest,
                first,
                first + 1,
                vec![line(first), line(first + 1)],
            ),
            (
                mode,
                second_first,
                first + 3,
                (second_first..=first + 3).map(line).collect(),
            ),
            (Reply::Honest, end, end, vec![completed]),
        ];
        batches
            .into_iter()
            .map(|(mode, first_sequence, last_sequence, events)| {
                let signer = self.signer(&identity, mode);
                let batch = pb::AgentEventsPayload {
                    header: Some(reply_header(&identity, &header, signer)),
                    command_message_id: match mode {
                        Reply::AnswersAnotherMessage => "another-message".to_owned(),
                        _ => header.message_id.clone(),
                    },
                    first_sequence,
                    last_sequence,
                    events,
                };
                let sealed =
                    envelope::seal(&batch, signer).map_err(|_| Status::internal("seal"))?;
                Ok(pb::WatchCommandResponse {
                    envelope: Some(flip_a_bit(sealed, mode)),
                })
            })
            .collect()
    }

    /// The stranger's key when the mode says so, else the peer's own.
    fn signer<'a>(&'a self, identity: &'a Identity, mode: Reply) -> &'a Identity {
        match mode {
            Reply::SignedByAnotherKey => self.stranger.as_ref(),
            _ => identity,
        }
    }
}

fn decode_command(sealed: Option<pb::SignedEnvelope>) -> Result<pb::CommandPayload, Status> {
    let sealed = sealed.ok_or_else(|| Status::invalid_argument("no envelope"))?;
    pb::CommandPayload::decode(sealed.payload.as_slice())
        .map_err(|_| Status::invalid_argument("not a command"))
}

/// The header of an answer to the command headed `command`: sender and
/// recipient swapped, the same workspace, the signer's key id.
fn reply_header(
    identity: &Identity,
    command: &pb::EnvelopeHeader,
    signer: &Identity,
) -> pb::EnvelopeHeader {
    let routing = Routing {
        sender_instance_id: &identity.instance_id,
        recipient_instance_id: &command.sender_instance_id,
        workspace: &command.workspace,
        now_ms: mosaic_mesh::clock::now_ms(),
        lifetime_ms: 60_000,
    };
    envelope::new_header(&routing, signer.public_key().key_id())
}

/// Flips one bit of the signature, or of the payload's last byte (a field
/// value, so that the payload still decodes), when the mode says so.
fn flip_a_bit(mut sealed: pb::SignedEnvelope, mode: Reply) -> pb::SignedEnvelope {
    let byte = match mode {
        Reply::FlippedSignature => sealed.signature.get_mut(9),
        Reply::FlippedPayloadBit => sealed.payload.last_mut(),
        _ => None,
    };
    if let Some(byte) = byte {
        *byte ^= 0x01;
    }
    sealed
}

/// Serves the stand-in on `listener` with `identity`'s key and certificate
/// until the returned task is aborted; `reply` says how it answers and may be
/// changed while it runs (a client keeps its connection across changes).
pub fn serve(
    listener: TcpListener,
    identity: Arc<IdentityManager>,
    stranger: Arc<Identity>,
    reply: Arc<std::sync::Mutex<Reply>>,
) -> tokio::task::JoinHandle<()> {
    let tls = mosaic_mesh::tls::server_config(Arc::clone(&identity)).expect("server TLS");
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let (sender, receiver) = tokio::sync::mpsc::channel(16);
    let accepting = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let sender = sender.clone();
            tokio::spawn(async move {
                if let Ok(stream) = acceptor.accept(tcp).await {
                    let _ = sender.send(Ok::<_, std::io::Error>(stream)).await;
                }
            });
        }
    });
    let service = StandIn(Arc::new(Tampering {
        identity,
        stranger,
        reply,
    }));
    tokio::spawn(async move {
        let _accepting = AbortOnDrop(accepting);
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await;
    })
}

type BoxFuture<T> = std::pin::Pin<Box<dyn Future<Output = T> + Send>>;

/// The Federation service with ExecuteCommand and WatchCommand only (every
/// other method is UNIMPLEMENTED), routed by path as tonic's generated
/// servers do.
#[derive(Clone)]
struct StandIn(Arc<Tampering>);

impl tonic::server::NamedService for StandIn {
    const NAME: &'static str = "mosaic.federation.v1.Federation";
}

impl tower::Service<http::Request<tonic::body::Body>> for StandIn {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let tampering = Arc::clone(&self.0);
        Box::pin(async move {
            Ok(match request.uri().path() {
                "/mosaic.federation.v1.Federation/ExecuteCommand" => {
                    grpc().unary(Execute(tampering), request).await
                }
                "/mosaic.federation.v1.Federation/WatchCommand" => {
                    grpc().server_streaming(Watch(tampering), request).await
                }
                _ => Status::unimplemented(
                    "the stand-in answers ExecuteCommand and WatchCommand only",
                )
                .into_http(),
            })
        })
    }
}

/// A gRPC server for one method: its codec is typed by that method's
/// messages.
fn grpc<Encode, Decode>() -> tonic::server::Grpc<tonic_prost::ProstCodec<Encode, Decode>>
where
    Encode: prost::Message + 'static,
    Decode: prost::Message + Default + 'static,
{
    tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
}

struct Execute(Arc<Tampering>);

impl tonic::server::UnaryService<pb::ExecuteCommandRequest> for Execute {
    type Response = pb::ExecuteCommandResponse;
    type Future = BoxFuture<Result<Response<Self::Response>, Status>>;

    fn call(&mut self, request: Request<pb::ExecuteCommandRequest>) -> Self::Future {
        let tampering = Arc::clone(&self.0);
        Box::pin(async move { tampering.execute_command(request).await })
    }
}

struct Watch(Arc<Tampering>);

impl tonic::server::ServerStreamingService<pb::WatchCommandRequest> for Watch {
    type Response = pb::WatchCommandResponse;
    type ResponseStream =
        tokio_stream::Iter<std::vec::IntoIter<Result<pb::WatchCommandResponse, Status>>>;
    type Future = BoxFuture<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<pb::WatchCommandRequest>) -> Self::Future {
        let batches = self.0.watch_command(request);
        Box::pin(async move {
            let batches = batches?.into_iter().map(Ok).collect::<Vec<_>>();
            Ok(Response::new(tokio_stream::iter(batches)))
        })
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
