//! The serving threads: calls are served on a few threads of their own
//! (`server.serving_threads`), each a tokio current-thread runtime that owns
//! its connections from the TLS handshake to the close, so that a call's
//! tasks (its connection's, its own, the shared read connection's) wake
//! each other on one thread instead of handing each other across the
//! workers of a work-stealing runtime, a system call and often a context
//! switch each time (BENCHMARKS.md, issue 23, session 24).
//!
//! The main runtime accepts. Each accepted socket goes, before its TLS
//! handshake, to the serving thread with the fewest open connections, and is
//! registered there with that thread's reactor. The rest of the daemon
//! (start-up, background work, shutdown) stays on the main runtime. Work a
//! call spawns (an agent's supervision, a follow-up) runs on the call's
//! thread; that runtime keeps running it after its server stops accepting,
//! until [`ServingThreads::exit`] (or a drop) at the very end of shutdown.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::thread::ThreadId;
use std::time::Duration;

use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

/// Sockets waiting for their serving thread, and connections waiting for
/// the server after their handshake: a full queue slows `accept`, which is
/// the backpressure we want.
const QUEUE: usize = 128;
/// How long a serving thread that is told to exit waits for blocking work
/// its calls started (a SQLite statement) before it lets it go.
const EXIT_PATIENCE: Duration = Duration::from_secs(1);

thread_local! {
    /// The thread's own id on the serving threads, `None` elsewhere.
    static SERVING: Cell<Option<ThreadId>> = const { Cell::new(None) };
}

/// The serving thread the caller runs on (where a task never moves to
/// another thread), if it runs on one.
pub(crate) fn serving_thread() -> Option<ThreadId> {
    SERVING.with(Cell::get)
}

/// What a serving thread's server stopped with.
type Finished = Result<(), tonic::transport::Error>;

/// The running serving threads.
pub(crate) struct ServingThreads {
    /// Each thread's server's outcome, once it stopped accepting and its
    /// connections closed.
    finished: Vec<oneshot::Receiver<Finished>>,
    /// Dropped to tell the threads to exit (their runtimes, and what still
    /// runs there, are dropped).
    exit: watch::Sender<()>,
    /// Sent by each thread once its runtime is gone.
    exited: Vec<oneshot::Receiver<()>>,
    /// The accepting task, on the main runtime; dropping the handle stops
    /// accepting (and the threads, told by the dropped `exit`, end).
    _accepting: AbortOnDrop,
}

/// One accepted socket on its way to a serving thread, counted in that
/// thread's open connections until it closes.
struct Handoff {
    socket: std::net::TcpStream,
    remote: SocketAddr,
    open: OpenConnection,
}

/// One open connection in its serving thread's gauge; dropped when the
/// connection closes (or its handshake fails).
struct OpenConnection(IntGauge);

impl OpenConnection {
    fn new(gauge: &IntGauge) -> OpenConnection {
        gauge.inc();
        OpenConnection(gauge.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl ServingThreads {
    /// Starts one serving thread per gauge in `open_connections` (the gauge
    /// counts the thread's open connections), and the accepting task on the
    /// current runtime. Each accepted socket is set up by `handshake` on its
    /// thread (a TLS handshake, or nothing), then served by the server
    /// `serve` makes on that thread from the connections and a stop signal.
    /// The threads stop accepting when `stop` resolves.
    pub(crate) fn start<IO, H, HF, S, SF>(
        listener: TcpListener,
        open_connections: Vec<IntGauge>,
        handshake: H,
        serve: S,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> io::Result<ServingThreads>
    where
        IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
        H: Fn(TcpStream, SocketAddr) -> HF + Clone + Send + 'static,
        HF: Future<Output = Option<IO>> + Send + 'static,
        S: FnOnce(ReceiverStream<Result<Counted<IO>, io::Error>>, StopSignal) -> SF
            + Clone
            + Send
            + 'static,
        SF: Future<Output = Finished>,
    {
        // Dropped on an early return, these stop and end the threads
        // already started.
        let (stop_serving, stop_signal) = watch::channel(false);
        let (exit, exit_signal) = watch::channel(());
        let mut finished = Vec::new();
        let mut exited = Vec::new();
        let mut targets = Vec::new();
        for (index, gauge) in open_connections.into_iter().enumerate() {
            let (sockets, incoming) = mpsc::channel::<Handoff>(QUEUE);
            let (finishes, finished_signal) = oneshot::channel();
            let (exits, exited_signal) = oneshot::channel();
            let runtime = ThreadRuntime(Some(
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?,
            ));
            let thread = Thread {
                incoming,
                handshake: handshake.clone(),
                serve: serve.clone(),
                stop: stop_signal.clone(),
                exit: exit_signal.clone(),
            };
            std::thread::Builder::new()
                .name(format!("mosaicd-serve-{index}"))
                .spawn(move || {
                    let mut runtime = runtime;
                    let Some(runtime) = runtime.0.take() else {
                        return;
                    };
                    SERVING.with(|serving| serving.set(Some(std::thread::current().id())));
                    runtime.block_on(thread.run(finishes));
                    runtime.shutdown_timeout(EXIT_PATIENCE);
                    let _ = exits.send(());
                })?;
            finished.push(finished_signal);
            exited.push(exited_signal);
            targets.push((sockets, gauge));
        }
        Ok(ServingThreads {
            finished,
            exit,
            exited,
            _accepting: AbortOnDrop(tokio::spawn(accept(listener, targets, stop, stop_serving))),
        })
    }

    /// Resolves when every thread's server has stopped: after `stop`, once
    /// their connections are closed. The first error, if any.
    pub(crate) fn finished(&mut self) -> impl Future<Output = Finished> + Send + 'static {
        let finished = std::mem::take(&mut self.finished);
        async move {
            for outcome in finished {
                // A thread gone without a word stopped with its runtime.
                if let Ok(Err(error)) = outcome.await {
                    return Err(error);
                }
            }
            Ok(())
        }
    }

    /// Tells the threads to exit and waits until they have: what calls
    /// spawned there is dropped, and every connection is closed.
    pub(crate) async fn exit(self) {
        let ServingThreads { exit, exited, .. } = self;
        drop(exit);
        for exited in exited {
            let _ = exited.await;
        }
    }
}

/// A serving thread's runtime on its way to the thread. Should the thread
/// not start, it is dropped where `start` runs, inside the main runtime,
/// where dropping a runtime the usual way (waiting for its tasks) panics:
/// it has none yet, so it is let go without waiting.
struct ThreadRuntime(Option<tokio::runtime::Runtime>);

impl Drop for ThreadRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Resolves when the servers are told to stop accepting.
pub(crate) type StopSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What one serving thread runs.
struct Thread<H, S> {
    incoming: mpsc::Receiver<Handoff>,
    handshake: H,
    serve: S,
    stop: watch::Receiver<bool>,
    exit: watch::Receiver<()>,
}

impl<H, S> Thread<H, S> {
    /// Serves until told to stop, says how the server ended, then keeps the
    /// work calls spawned running until told to exit.
    async fn run<IO, HF, SF>(self, finished: oneshot::Sender<Finished>)
    where
        IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
        H: Fn(TcpStream, SocketAddr) -> HF + Send + 'static,
        HF: Future<Output = Option<IO>> + Send + 'static,
        S: FnOnce(ReceiverStream<Result<Counted<IO>, io::Error>>, StopSignal) -> SF,
        SF: Future<Output = Finished>,
    {
        let Thread {
            incoming,
            handshake,
            serve,
            mut stop,
            mut exit,
        } = self;
        let (ready, connections) = mpsc::channel(QUEUE);
        let taking = AbortOnDrop(tokio::spawn(take(incoming, handshake, ready)));
        let stop_signal: StopSignal = Box::pin(async move {
            // A dropped sender (the accepting task is gone) stops too.
            let _ = stop.wait_for(|stop| *stop).await;
        });
        let outcome = serve(ReceiverStream::new(connections), stop_signal).await;
        drop(taking);
        let _ = finished.send(outcome);
        // Resolves with an error once the sender is dropped: exit.
        let _ = exit.changed().await;
    }
}

/// Registers each socket handed to this thread with its reactor and runs its
/// handshake beside the others (a slow client holds up no one), passing the
/// connections that complete it to the server.
async fn take<IO, H, HF>(
    mut incoming: mpsc::Receiver<Handoff>,
    handshake: H,
    ready: mpsc::Sender<Result<Counted<IO>, io::Error>>,
) where
    IO: Send + 'static,
    H: Fn(TcpStream, SocketAddr) -> HF,
    HF: Future<Output = Option<IO>> + Send + 'static,
{
    while let Some(Handoff {
        socket,
        remote,
        open,
    }) = incoming.recv().await
    {
        let tcp = match TcpStream::from_std(socket) {
            Ok(tcp) => tcp,
            Err(error) => {
                tracing::debug!(client.address = %remote, %error, "cannot take the connection");
                continue;
            }
        };
        let handshake = handshake(tcp, remote);
        let ready = ready.clone();
        tokio::spawn(async move {
            if let Some(io) = handshake.await {
                let _ = ready.send(Ok(Counted { io, _open: open })).await;
            }
        });
    }
}

/// Accepts until `stop`, handing each socket to the serving thread with the
/// fewest open connections; then tells the servers to stop accepting.
async fn accept(
    listener: TcpListener,
    targets: Vec<(mpsc::Sender<Handoff>, IntGauge)>,
    stop: impl Future<Output = ()>,
    stop_serving: watch::Sender<bool>,
) {
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => break,
        };
        let (tcp, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Usually EMFILE; back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
        // Out of this runtime's reactor, to be registered with the thread's.
        let socket = match tcp.into_std() {
            Ok(socket) => socket,
            Err(error) => {
                tracing::debug!(client.address = %remote, %error, "cannot hand the connection over");
                continue;
            }
        };
        let Some((sender, gauge)) = targets
            .iter()
            .filter(|(sender, _)| !sender.is_closed())
            .min_by_key(|(_, gauge)| gauge.get())
        else {
            tracing::error!("no serving thread is left; stopping");
            break;
        };
        let open = OpenConnection::new(gauge);
        // Awaited: a full queue slows accepting. A thread gone meanwhile
        // drops the socket (and its count).
        let _ = sender
            .send(Handoff {
                socket,
                remote,
                open,
            })
            .await;
    }
    drop(listener);
    let _ = stop_serving.send(true);
}

/// A served connection, counted in its thread's open connections until it
/// is dropped.
pub(crate) struct Counted<IO> {
    io: IO,
    _open: OpenConnection,
}

impl<IO: Connected> Connected for Counted<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(context, buffer)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(context, buffer)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(context, buffers)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(context)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(context)
    }
}

/// Aborts a task when dropped: here the accepting task and a thread's
/// handshakes; in `server.rs` the background tasks that stop with serving.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::ThreadRuntime;

    #[tokio::test]
    async fn a_runtime_whose_thread_did_not_start_is_dropped_without_a_panic() {
        // As when `std::thread::Builder::spawn` fails inside `start`: the
        // runtime meant for the thread is dropped on the main runtime.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        drop(ThreadRuntime(Some(runtime)));
    }
}
