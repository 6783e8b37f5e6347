//! A small TCP fault proxy for fault tests: it sits between the daemon and a
//! dependency (PostgreSQL, Redis, a peer) and can pass traffic, delay it, cut every
//! open connection, refuse new ones, or swallow everything, on command.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with traffic right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward bytes as they come.
    Pass,
    /// Forward bytes, each chunk held back this long first.
    Delay(Duration),
    /// Close every open connection and accept-then-close new ones.
    Cut,
    /// Stop listening: new connections are refused by the kernel.
    Refuse,
    /// Keep every connection open and accept new ones, but forward nothing:
    /// what a client sees of a server whose packets are dropped (no reset,
    /// no answer). Bytes swallowed now are lost for good, so connections
    /// open during it stay broken after it ends; new ones work.
    Blackhole,
}

/// A running proxy. Dropping it stops it.
pub struct FaultProxy {
    /// The address clients should dial instead of the target.
    pub address: SocketAddr,
    mode: watch::Sender<(Fault, u64)>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port forwarding to `target`.
    pub async fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let address = listener.local_addr().expect("proxy address");
        let (mode, modes) = watch::channel((Fault::Pass, 0u64));
        let task = tokio::spawn(accept_loop(Some(listener), address, target, modes));
        FaultProxy {
            address,
            mode,
            task,
        }
    }

    /// Switches the fault. `Cut` also closes the connections open now.
    pub fn set(&self, fault: Fault) {
        self.mode.send_modify(|(current, generation)| {
            *current = fault;
            *generation += 1;
        });
    }

    /// The fault in force.
    pub fn fault(&self) -> Fault {
        self.mode.borrow().0
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(
    mut listener: Option<TcpListener>,
    address: SocketAddr,
    target: SocketAddr,
    mut modes: watch::Receiver<(Fault, u64)>,
) {
    loop {
        let fault = modes.borrow().0;
        match (fault, listener.is_some()) {
            (Fault::Refuse, true) => listener = None,
            (Fault::Refuse, false) => {}
            (_, false) => {
                // Re-listen on the same port once refusing ends.
                match TcpListener::bind(address).await {
                    Ok(bound) => listener = Some(bound),
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                }
            }
            (_, true) => {}
        }
        let Some(active) = listener.as_ref() else {
            if modes.changed().await.is_err() {
                return;
            }
            continue;
        };
        tokio::select! {
            changed = modes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            accepted = active.accept() => {
                let Ok((client, _)) = accepted else { continue };
                let modes = modes.clone();
                tokio::spawn(async move {
                    if modes.borrow().0 == Fault::Cut {
                        return;
                    }
                    if let Ok(upstream) = TcpStream::connect(target).await {
                        relay(client, upstream, modes).await;
                    }
                });
            }
        }
    }
}

/// Copies both ways until either side closes or a cut arrives.
async fn relay(client: TcpStream, upstream: TcpStream, modes: watch::Receiver<(Fault, u64)>) {
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let modes = Arc::new(modes);
    let forward = pump(client_read, upstream_write, Arc::clone(&modes));
    let backward = pump(upstream_read, client_write, Arc::clone(&modes));
    let mut cut_watch = (*modes).clone();
    tokio::select! {
        _ = async { tokio::join!(forward, backward) } => {}
        _ = async {
            loop {
                if cut_watch.borrow().0 == Fault::Cut || cut_watch.changed().await.is_err() {
                    return;
                }
            }
        } => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    modes: Arc<watch::Receiver<(Fault, u64)>>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        let fault = modes.borrow().0;
        match fault {
            Fault::Cut => break,
            Fault::Delay(delay) => tokio::time::sleep(delay).await,
            Fault::Blackhole => continue,
            Fault::Pass | Fault::Refuse => {}
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = socket.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        address
    }

    async fn round_trip(address: SocketAddr) -> std::io::Result<Vec<u8>> {
        let mut stream = TcpStream::connect(address).await?;
        stream.write_all(b"ping").await?;
        let mut reply = vec![0u8; 4];
        tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut reply))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        Ok(reply)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn fault_proxy_passes_delays_cuts_and_refuses() {
        let proxy = FaultProxy::start(echo_server().await).await;
        assert_eq!(round_trip(proxy.address).await.expect("pass"), b"ping");

        proxy.set(Fault::Delay(Duration::from_millis(150)));
        let started = tokio::time::Instant::now();
        assert_eq!(round_trip(proxy.address).await.expect("delay"), b"ping");
        assert!(started.elapsed() >= Duration::from_millis(150));

        // An open connection is closed by a cut.
        proxy.set(Fault::Pass);
        let mut open = TcpStream::connect(proxy.address).await.expect("connect");
        open.write_all(b"ping").await.expect("write");
        let mut reply = [0u8; 4];
        open.read_exact(&mut reply).await.expect("first reply");
        proxy.set(Fault::Cut);
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(2), open.read_to_end(&mut rest)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "connection closed by the cut"
        );
        assert!(
            round_trip(proxy.address).await.is_err(),
            "new connections are cut too"
        );

        proxy.set(Fault::Refuse);
        assert_eq!(proxy.fault(), Fault::Refuse);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let refused = TcpStream::connect(proxy.address).await;
        assert!(refused.is_err(), "refused while refusing");

        proxy.set(Fault::Pass);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(reply) = round_trip(proxy.address).await {
                assert_eq!(reply, b"ping");
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "proxy passes again");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
