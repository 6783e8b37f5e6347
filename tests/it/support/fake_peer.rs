//! A stand-in for a peer daemon's server that answers ExecuteCommand with a
//! reply it tampered with, on the peer's own port, with the peer's own key
//! and certificate: what a sender must refuse to believe.

use std::sync::Arc;

use mosaic_mesh::federation::envelope::{self, Routing};
use mosaic_mesh::identity::{Identity, IdentityManager};
use mosaic_mesh::proto::agent as agent_pb;
use mosaic_mesh::proto::federation as pb;
use prost::Message as _;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tonic::{Request, Response, Status};

/// How the stand-in answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// A well-formed result signed by the peer's key (the control case).
    Honest,
    /// The same with one bit of the signature flipped.
    FlippedSignature,
    /// The same signed by a key the sender does not trust.
    SignedByAnotherKey,
    /// Correctly signed, but answering another message id.
    AnswersAnotherMessage,
}

/// The stand-in's result agent id.
pub const FORGED_AGENT_ID: &str = "agent-from-the-stand-in";

struct Tampering {
    identity: Arc<IdentityManager>,
    stranger: Arc<Identity>,
    reply: Arc<std::sync::Mutex<Reply>>,
}

impl Tampering {
    async fn execute_command(
        &self,
        request: Request<pb::ExecuteCommandRequest>,
    ) -> Result<Response<pb::ExecuteCommandResponse>, Status> {
        let sealed = request
            .into_inner()
            .envelope
            .ok_or_else(|| Status::invalid_argument("no envelope"))?;
        let command = pb::CommandPayload::decode(sealed.payload.as_slice())
            .map_err(|_| Status::invalid_argument("not a command"))?;
        let header = command.header.unwrap_or_default();
        let identity = self.identity.current();
        let mode = *self.reply.lock().expect("reply mode");
        let signer: &Identity = match mode {
            Reply::SignedByAnotherKey => self.stranger.as_ref(),
            _ => identity.as_ref(),
        };
        let routing = Routing {
            sender_instance_id: &identity.instance_id,
            recipient_instance_id: &header.sender_instance_id,
            workspace: &header.workspace,
            now_ms: mosaic_mesh::clock::now_ms(),
            lifetime_ms: 60_000,
        };
        let result = pb::CommandResultPayload {
            header: Some(envelope::new_header(&routing, signer.public_key().key_id())),
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
        let mut reply = envelope::seal(&result, signer).map_err(|_| Status::internal("seal"))?;
        if mode == Reply::FlippedSignature
            && let Some(byte) = reply.signature.get_mut(9)
        {
            *byte ^= 0x01;
        }
        Ok(Response::new(pb::ExecuteCommandResponse {
            envelope: Some(reply),
        }))
    }
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

/// The Federation service with ExecuteCommand only (every other method is
/// UNIMPLEMENTED), routed by path as tonic's generated servers do.
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
            if request.uri().path() != "/mosaic.federation.v1.Federation/ExecuteCommand" {
                return Ok(
                    Status::unimplemented("the stand-in answers ExecuteCommand only").into_http(),
                );
            }
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.unary(Execute(tampering), request).await)
        })
    }
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

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
