//! The network checks of `mosaicd doctor`: the listen address (free, or held
//! by this instance's daemon) and the peers' reachability as that daemon sees it.

use std::time::Duration;

use serde_json::{Value, json};

use super::{Check, plural};
use crate::cli::client::ClientArgs;
use crate::config::Config;
use crate::proto::federation as pb;
use crate::store::Store;
use crate::tls::{ChannelTimeouts, ServerPin};

/// How long whatever holds the listen address has to complete a TLS handshake
/// and answer a health check.
const LISTENER_PATIENCE: Duration = Duration::from_secs(3);

/// Whether `serve` could bind the listen address, or else whether what holds
/// it is this instance: a health check over TLS pinned to the instance's key.
/// Returns the daemon's URL when a mosaicd answers there.
pub(super) async fn check_listener(
    config: &Config,
    store: Option<&Store>,
) -> (Check, Option<String>) {
    let listen = config.listen;
    if listen.port() == 0 {
        return (
            Check::skip(
                "listener",
                format!(
                    "{listen}: port 0 picks a free port at start, so there is nothing to check"
                ),
            ),
            None,
        );
    }
    // The daemon binds with tokio's listener; so does this check.
    match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => {
            drop(listener);
            return (
                Check::ok(
                    "listener",
                    format!(
                        "{listen} is free: `mosaicd serve` can listen there (no daemon runs there now)"
                    ),
                ),
                None,
            );
        }
        Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => {}
        Err(error) if error.kind() == std::io::ErrorKind::AddrNotAvailable => {
            return (
                Check::fail(
                    "listener",
                    2,
                    format!("{listen} is not an address of this host: {error}"),
                    Some("listen on an address this host has (or 0.0.0.0:PORT for all) with --listen / MOSAIC_LISTEN".into()),
                ),
                None,
            );
        }
        Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => {
            return (
                Check::fail(
                    "listener",
                    4,
                    format!("cannot listen on {listen}: {error}"),
                    Some("ports below 1024 need privileges: use a higher port, or give the daemon CAP_NET_BIND_SERVICE (AmbientCapabilities= in its systemd unit)".into()),
                ),
                None,
            );
        }
        Err(error) => {
            return (
                Check::fail(
                    "listener",
                    1,
                    format!("cannot listen on {listen}: {error}"),
                    None,
                ),
                None,
            );
        }
    };
    let no_client_flags = ClientArgs {
        server: None,
        api_key: None,
        server_fingerprint: None,
    };
    let url = crate::cli::client::server_url(config, &no_client_flags);
    // `serve` would exit 1 on this address; so does the check.
    let port_in_use = |detail: String| {
        Check::fail(
            "listener",
            1,
            detail,
            Some(format!(
                "stop what holds the port (`ss -ltnp 'sport = :{}'` names it), or give this instance another address with --listen / MOSAIC_LISTEN",
                listen.port()
            )),
        )
    };
    let held_by_something_else = |reason: String| {
        port_in_use(format!(
            "{listen} is in use, but not by this instance's mosaicd: {reason}"
        ))
    };
    let tls = if config.plaintext {
        None
    } else {
        let Some(pin) = instance_pin(config, store).await else {
            return (
                port_in_use(format!(
                    "{listen} is in use; without the instance's key (no identity in the database, no {}) what holds it cannot be told from this instance's mosaicd",
                    config.certificate_path().display()
                )),
                None,
            );
        };
        match crate::tls::pinned_client_config(pin) {
            Ok(tls) => Some(std::sync::Arc::new(tls)),
            Err(error) => return (Check::fail("listener", 1, error.to_string(), None), None),
        }
    };
    let timeouts = ChannelTimeouts {
        connect: LISTENER_PATIENCE,
        request: LISTENER_PATIENCE,
    };
    let channel = match crate::tls::connect_channel(&url, tls, timeouts).await {
        Ok(channel) => channel,
        Err(error) => {
            let reason = handshake_failure(&error, config.plaintext);
            return (held_by_something_else(reason), None);
        }
    };
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let answer = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await;
    match answer.map(|response| response.into_inner().status()) {
        Ok(ServingStatus::Serving) => (
            Check::ok(
                "listener",
                format!("this instance's mosaicd answers at {url} (health: SERVING)"),
            ),
            Some(url),
        ),
        Ok(status) => (
            Check::fail(
                "listener",
                5,
                format!(
                    "this instance's mosaicd answers at {url} but reports {}: its database does not answer it",
                    status.as_str_name()
                ),
                Some("see the database check and the daemon's log".into()),
            ),
            Some(url),
        ),
        Err(status) => (
            held_by_something_else(format!("the health check failed: {}", status.message())),
            None,
        ),
    }
}

/// Why the handshake with whatever holds the listen address failed, in an
/// operator's words where the cause is a common one.
fn handshake_failure(error: &crate::tls::TlsError, plaintext: bool) -> String {
    let chain = crate::text::error_chain(error);
    if chain.contains("invalid peer certificate") {
        "it answers TLS with a key that is not this instance's (another mosaicd instance, or another TLS server)".to_owned()
    } else if chain.contains("deadline has elapsed") || chain.contains("timed out") {
        format!(
            "it did not complete a{} handshake within {} s (not a mosaicd, or not answering)",
            if plaintext { "n HTTP/2" } else { " TLS" },
            LISTENER_PATIENCE.as_secs()
        )
    } else {
        format!("the handshake failed: {chain}")
    }
}

/// The keys this instance serves with: its current and still-valid previous
/// keys from the database, else the key of the certificate it wrote for
/// local clients.
async fn instance_pin(config: &Config, store: Option<&Store>) -> Option<ServerPin> {
    if let Some(store) = store
        && let Ok(Some((_, current, previous))) = crate::identity::load_public(store).await
    {
        let mut keys = vec![current];
        keys.extend(previous.into_iter().map(|key| key.public_key));
        return Some(ServerPin::AnyOf(keys));
    }
    use rustls_pki_types::pem::PemObject as _;
    let certificate =
        rustls_pki_types::CertificateDer::from_pem_file(config.certificate_path()).ok()?;
    let spki = crate::identity::certificate::spki_of_certificate(&certificate)?;
    crate::identity::PublicKey::from_spki_der(&spki)
        .ok()
        .map(ServerPin::PublicKey)
}

/// The ACTIVE connections as the running daemon sees them (reachable, last
/// contact), through its admin API: only when a daemon answers and an API
/// key was given.
pub(super) async fn check_peers(
    config: &Config,
    client_args: &ClientArgs,
    daemon_url: Option<String>,
) -> Check {
    let Some(url) = daemon_url else {
        return Check::skip(
            "peers",
            format!(
                "no mosaicd of this instance answers at {}: reachability is what the running daemon sees",
                config.listen
            ),
        );
    };
    if client_args.api_key.is_none() {
        return Check::skip(
            "peers",
            "needs an admin API key to ask the daemon: pass --api-key or set MOSAIC_API_KEY (`mosaicd apikey create --name doctor --scope admin` makes one)",
        );
    }
    let args = ClientArgs {
        server: Some(url),
        ..client_args.clone()
    };
    let listed = async {
        let connection = crate::cli::client::connect(config, &args).await?;
        let mut client = pb::federation_client::FederationClient::new(connection.channel.clone());
        crate::cli::peer::list_all(&mut client, &connection, None, pb::ConnectionState::Active)
            .await
    }
    .await;
    let connections = match listed {
        Ok(connections) => connections,
        Err(error) => {
            let hint = (error.code == 4)
                .then(|| "listing connections needs an API key with the admin scope".to_owned());
            return Check::fail("peers", error.code, error.message, hint);
        }
    };
    let now = crate::clock::now_ms();
    let unreachable: Vec<String> = connections
        .iter()
        .filter(|connection| !connection.reachable)
        .map(|connection| {
            format!(
                "{} ({})",
                connection.remote_name, connection.remote_instance_id
            )
        })
        .collect();
    let listed: Vec<Value> = connections
        .iter()
        .map(|connection| {
            json!({
                "connection_id": connection.connection_id,
                "workspace": connection.workspace,
                "remote_name": connection.remote_name,
                "remote_instance_id": connection.remote_instance_id,
                "remote_url": connection.remote_url,
                "reachable": connection.reachable,
                "last_contact_at_ms": connection
                    .last_contact_at
                    .as_ref()
                    .map(crate::clock::ms_from_timestamp),
                "last_contact_seconds_ago": connection
                    .last_contact_at
                    .as_ref()
                    .map(|at| (now - crate::clock::ms_from_timestamp(at)).max(0) / 1000),
            })
        })
        .collect();
    let mut check = if connections.is_empty() {
        Check::ok("peers", "no ACTIVE connections")
    } else if unreachable.is_empty() {
        Check::ok(
            "peers",
            format!(
                "{}, all reachable",
                plural(connections.len(), "ACTIVE connection")
            ),
        )
    } else {
        Check::warn(
            "peers",
            format!(
                "{} of {} unreachable as the daemon sees them: {}",
                unreachable.len(),
                plural(connections.len(), "ACTIVE connection"),
                unreachable.join(", ")
            ),
            "check that those peers run and that this host reaches their URLs; `mosaicd peer show ID` has a connection's history",
        )
    };
    check.connections = Some(listed);
    check
}
