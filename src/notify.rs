//! Start-up and shutdown told to the service manager (systemd's `Type=notify`).
//!
//! `READY=1` is sent when the gRPC server starts serving on its listener
//! (`server::serve`), not when the socket is bound: between the two the
//! daemon migrates the database, loads or creates the identity (waiting up to
//! a minute for a replica doing either), settles the agents of its previous
//! run and registers itself, and `systemctl start` (and every unit ordered
//! after this one) should wait for all of that. `STOPPING=1` is sent when a
//! signal starts the drain.
//!
//! Without `NOTIFY_SOCKET` (not started by a service manager that listens)
//! nothing is sent. A message that cannot be sent is logged;
//! it never stops the daemon.

use std::ffi::{OsStr, OsString};
use std::future::Future;
use std::time::Duration;

/// The datagram socket the service manager reads: a path, or an abstract
/// socket name written with a leading `@`.
pub const ENV_NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// How long one message may wait for room in the service manager's queue.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// The service manager's socket, if it gave one.
fn notify_socket() -> Option<OsString> {
    std::env::var_os(ENV_NOTIFY_SOCKET).filter(|socket| !socket.is_empty())
}

/// Sends `state` (`KEY=VALUE` lines, e.g. `READY=1`) to the service manager,
/// if there is one; a failure is logged, never returned.
pub async fn notify(state: &str) {
    let Some(socket) = notify_socket() else {
        return;
    };
    let message = state.to_owned();
    // A datagram send can block while the manager's queue is full; that wait
    // belongs on a blocking thread, not on a runtime worker.
    let sent = tokio::task::spawn_blocking(move || send(&socket, &message)).await;
    match sent {
        Ok(Ok(())) => tracing::debug!(notify.state = ?state, "told the service manager"),
        Ok(Err(error)) => tracing::warn!(
            %error,
            notify.state = ?state,
            "cannot tell the service manager (NOTIFY_SOCKET); carrying on"
        ),
        Err(error) => tracing::warn!(%error, "the service manager notification did not run"),
    }
}

/// One datagram to `socket`, a path or `@` and an abstract name.
#[cfg(unix)]
fn send(socket: &OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    use std::os::unix::net::UnixDatagram;

    let datagram = UnixDatagram::unbound()?;
    datagram.set_write_timeout(Some(SEND_TIMEOUT))?;
    let sent = match socket.as_bytes().strip_prefix(b"@") {
        Some(name) => send_to_abstract(&datagram, name, state)?,
        None => datagram.send_to(state.as_bytes(), std::path::Path::new(socket))?,
    };
    if sent != state.len() {
        return Err(std::io::Error::other(format!(
            "sent {sent} of {} bytes",
            state.len()
        )));
    }
    Ok(())
}

/// Abstract socket names (Linux): `@` stands for the leading NUL byte.
#[cfg(target_os = "linux")]
fn send_to_abstract(
    datagram: &std::os::unix::net::UnixDatagram,
    name: &[u8],
    state: &str,
) -> std::io::Result<usize> {
    use std::os::linux::net::SocketAddrExt as _;
    let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    datagram.send_to_addr(state.as_bytes(), &address)
}

#[cfg(all(unix, not(target_os = "linux")))]
fn send_to_abstract(
    _datagram: &std::os::unix::net::UnixDatagram,
    _name: &[u8],
    _state: &str,
) -> std::io::Result<usize> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "abstract socket names exist only on Linux",
    ))
}

#[cfg(not(unix))]
fn send(_socket: &OsStr, _state: &str) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "service manager notification needs Unix sockets",
    ))
}

/// `shutdown`, then `STOPPING=1`: the service manager shows the unit as
/// stopping while calls drain and agents stop.
pub async fn stopping_after(shutdown: impl Future<Output = ()>) {
    shutdown.await;
    notify("STOPPING=1\nSTATUS=draining calls and stopping agents").await;
}
