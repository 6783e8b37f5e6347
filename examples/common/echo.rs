//! A bare gRPC unary echo over the daemon's own TLS stack, the baseline for the
//! signed-command path: a P-256 identity, `mosaic_mesh::tls::server_config`
//! (which asks for a client certificate) on the server, a pinned mutual-TLS
//! channel on the client, tonic + prost on both. No auth, no database, no
//! signatures. An echo server can forward every call to another echo server
//! over its own mutual-TLS channel, for the two-hop baseline (client → A → B).
//!
//! For the floor of a call that reads the database, an echo server can also
//! read one row from PostgreSQL before each answer (`EchoProcess::reading`):
//! with tokio-postgres directly (a statement prepared once, on one connection
//! that pipelines concurrent queries: the cheapest read a Rust server can
//! make), or through the daemon's own `Store` (`Store::find_job`, the read
//! `GetJob` makes).
//!
//! The service is written by hand (what tonic's codegen would emit) so that the
//! examples need no proto file of their own. Each echo server runs as a child
//! process of the benchmark (the example re-executes itself with
//! `--echo-server`), like the daemons it is compared with.

use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::Context as _;
use base64::Engine as _;
use mosaic_mesh::identity::PublicKey;
use tokio::io::AsyncBufReadExt;
use tonic::transport::Channel;

use super::daemon::{ClientIdentity, Launcher};

/// The method path.
const ECHO_PATH: &str = "/bench.Echo/Echo";

/// Request and response of the echo: `payload` carries the bytes; the server
/// answers with `reply_bytes` bytes, so the echo can mimic a call whose
/// response is larger than its request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoMessage {
    /// Opaque bytes.
    #[prost(bytes = "vec", tag = "1")]
    pub payload: Vec<u8>,
    /// Size of the reply's payload.
    #[prost(uint32, tag = "2")]
    pub reply_bytes: u32,
}

/// The server side: answers locally, or forwards to `upstream`.
#[derive(Clone)]
struct EchoServer {
    upstream: Option<tonic::client::Grpc<Channel>>,
    read: Read,
}

/// What an echo call reads before it answers.
#[derive(Clone)]
enum Read {
    /// Nothing.
    Nothing,
    /// One job row, by a statement prepared on one tokio-postgres connection.
    Raw {
        client: Arc<tokio_postgres::Client>,
        statement: tokio_postgres::Statement,
        job_id: String,
    },
    /// One job row through the daemon's store.
    Store {
        store: mosaic_mesh::store::Store,
        job_id: String,
    },
}

/// How an echo server reads the row: `raw` or `store`.
pub const READ_MODES: [&str; 2] = ["raw", "store"];

impl Read {
    async fn open(mode: &str, url: &str, job_id: &str) -> anyhow::Result<Read> {
        let job_id = job_id.to_owned();
        match mode {
            "raw" => {
                let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                    .await
                    .context("cannot connect to PostgreSQL")?;
                tokio::spawn(connection);
                let statement = client.prepare("SELECT * FROM jobs WHERE id = $1").await?;
                Ok(Read::Raw {
                    client: Arc::new(client),
                    statement,
                    job_id,
                })
            }
            "store" => Ok(Read::Store {
                store: mosaic_mesh::store::Store::connect(url).await?,
                job_id,
            }),
            other => anyhow::bail!("unknown read mode {other:?}"),
        }
    }

    /// Reads the row; an error or a missing row fails the call.
    async fn read(&self) -> Result<(), tonic::Status> {
        let failed = |error: String| tonic::Status::internal(error);
        match self {
            Read::Nothing => Ok(()),
            Read::Raw {
                client,
                statement,
                job_id,
            } => client
                .query_one(statement, &[job_id])
                .await
                .map(drop)
                .map_err(|error| failed(error.to_string())),
            Read::Store { store, job_id } => match store.find_job(job_id).await {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err(failed(format!("no job {job_id}"))),
                Err(error) => Err(failed(error.to_string())),
            },
        }
    }
}

impl tonic::server::NamedService for EchoServer {
    const NAME: &'static str = "bench.Echo";
}

/// One call, as a tonic unary service.
struct EchoCall(Option<tonic::client::Grpc<Channel>>, Read);

impl tonic::server::UnaryService<EchoMessage> for EchoCall {
    type Response = EchoMessage;
    type Future =
        futures::future::BoxFuture<'static, Result<tonic::Response<EchoMessage>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<EchoMessage>) -> Self::Future {
        let (upstream, read) = (self.0.clone(), self.1.clone());
        Box::pin(async move {
            let message = request.into_inner();
            read.read().await?;
            match upstream {
                Some(mut upstream) => call(&mut upstream, message).await.map(tonic::Response::new),
                None => Ok(tonic::Response::new(EchoMessage {
                    payload: vec![0x5a; message.reply_bytes as usize],
                    reply_bytes: 0,
                })),
            }
        })
    }
}

impl<B> tower::Service<http::Request<B>> for EchoServer
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (upstream, read) = (self.upstream.clone(), self.read.clone());
        if request.uri().path() != ECHO_PATH {
            return Box::pin(async {
                Ok(tonic::Status::unimplemented("only bench.Echo/Echo").into_http())
            });
        }
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<EchoMessage, EchoMessage>::default();
            let mut grpc = tonic::server::Grpc::new(codec);
            Ok(grpc.unary(EchoCall(upstream, read), request).await)
        })
    }
}

/// One echo call on `client`.
pub async fn call(
    client: &mut tonic::client::Grpc<Channel>,
    message: EchoMessage,
) -> Result<EchoMessage, tonic::Status> {
    client
        .ready()
        .await
        .map_err(|error| tonic::Status::unavailable(error.to_string()))?;
    let codec = tonic_prost::ProstCodec::<EchoMessage, EchoMessage>::default();
    let path = http::uri::PathAndQuery::from_static(ECHO_PATH);
    Ok(client
        .unary(tonic::Request::new(message), path, codec)
        .await?
        .into_inner())
}

/// The child-process side: if this process was started with
/// `--echo-server [UPSTREAM_URL UPSTREAM_KEY]` or
/// `--echo-server --read MODE DATABASE_URL JOB_ID`, serve the echo until
/// killed and never return; otherwise return at once.
pub async fn run_if_echo_server() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some("--echo-server") {
        return Ok(());
    }
    let identity = ClientIdentity::new().await?;
    if args.get(2).map(String::as_str) == Some("--read") {
        let (Some(mode), Some(url), Some(job_id)) = (args.get(3), args.get(4), args.get(5)) else {
            anyhow::bail!("--read needs MODE DATABASE_URL JOB_ID");
        };
        let read = Read::open(mode, url, job_id).await?;
        return serve_echo(identity, None, read).await;
    }
    let upstream = match (args.get(2), args.get(3)) {
        (Some(url), Some(key)) => {
            let key =
                PublicKey::from_spki_der(&base64::engine::general_purpose::STANDARD.decode(key)?)?;
            Some(tonic::client::Grpc::new(identity.channel(url, key).await?))
        }
        _ => None,
    };
    serve_echo(identity, upstream, Read::Nothing).await
}

async fn serve_echo(
    identity: ClientIdentity,
    upstream: Option<tonic::client::Grpc<Channel>>,
    read: Read,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let tls = mosaic_mesh::tls::server_config(Arc::clone(&identity.identity))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let spki = identity.identity.current().public_key().spki_der().to_vec();
    // The parent reads this line to learn where to connect and which key to pin.
    println!(
        "ECHO {address} {}",
        base64::engine::general_purpose::STANDARD.encode(spki)
    );
    let (sender, receiver) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let sender = sender.clone();
            tokio::spawn(async move {
                if let Ok(stream) = acceptor.accept(tcp).await {
                    let _ = sender.send(Ok::<_, std::io::Error>(stream)).await;
                }
            });
        }
    });
    tonic::transport::Server::builder()
        .add_service(EchoServer { upstream, read })
        .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await?;
    std::process::exit(0);
}

/// An echo server child process, killed when dropped.
pub struct EchoProcess {
    /// `https://ADDRESS`.
    pub url: String,
    /// Its key, to pin.
    pub key: PublicKey,
    key_base64: String,
    /// The process id (for its CPU time).
    pub pid: u32,
    _child: tokio::process::Child,
}

impl EchoProcess {
    /// Starts this executable as an echo server under `launcher`;
    /// forwarding to `upstream` if given.
    pub async fn start(
        launcher: &Launcher,
        upstream: Option<&EchoProcess>,
    ) -> anyhow::Result<EchoProcess> {
        let mut command = std::process::Command::new(std::env::current_exe()?);
        command.arg("--echo-server");
        if let Some(upstream) = upstream {
            command.arg(&upstream.url).arg(&upstream.key_base64);
        }
        EchoProcess::spawn(command, launcher).await
    }

    /// Starts an echo server that reads job `job_id` from the PostgreSQL
    /// database at `database_url` before each answer, `mode` being one of
    /// [`READ_MODES`], under `launcher`.
    pub async fn reading(
        launcher: &Launcher,
        mode: &str,
        database_url: &str,
        job_id: &str,
    ) -> anyhow::Result<EchoProcess> {
        let mut command = std::process::Command::new(std::env::current_exe()?);
        command
            .args(["--echo-server", "--read", mode])
            .arg(database_url)
            .arg(job_id);
        EchoProcess::spawn(command, launcher).await
    }

    async fn spawn(
        command: std::process::Command,
        launcher: &Launcher,
    ) -> anyhow::Result<EchoProcess> {
        let mut command = tokio::process::Command::from(launcher.wrap(command));
        let mut child = command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().context("the echo server exited at once")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(launcher.startup, lines.next_line())
            .await
            .with_context(|| {
                format!(
                    "echo server did not start within {} s",
                    launcher.startup.as_secs()
                )
            })??
            .context("echo server exited")?;
        let mut words = line.split_whitespace().skip(1);
        let (Some(address), Some(key_base64)) = (words.next(), words.next()) else {
            anyhow::bail!("unexpected echo server line {line:?}");
        };
        let key = PublicKey::from_spki_der(
            &base64::engine::general_purpose::STANDARD.decode(key_base64)?,
        )?;
        Ok(EchoProcess {
            url: format!("https://{address}"),
            key,
            key_base64: key_base64.to_owned(),
            pid,
            _child: child,
        })
    }

    /// A mutual-TLS echo client for this server.
    pub async fn client(
        &self,
        identity: &ClientIdentity,
    ) -> anyhow::Result<tonic::client::Grpc<Channel>> {
        Ok(tonic::client::Grpc::new(
            identity.channel(&self.url, self.key.clone()).await?,
        ))
    }
}
