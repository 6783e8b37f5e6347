//! How client commands reach a running daemon: the URL, the API key, and which
//! server key to trust (the daemon's certificate in the shared data dir, or a
//! fingerprint given on the command line).

use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::exit::CliError;
use crate::config::Config;
use crate::identity::PublicKey;
use crate::tls::{ChannelTimeouts, ServerPin};

/// The daemon's URL.
pub const ENV_SERVER: &str = "MOSAIC_SERVER";
/// The API key client commands send.
pub const ENV_API_KEY: &str = "MOSAIC_API_KEY";
/// The fingerprint to pin when the data dir is not shared.
pub const ENV_SERVER_FINGERPRINT: &str = "MOSAIC_SERVER_FINGERPRINT";

/// Flags of client commands.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// URL of the daemon client commands talk to [default: the `listen`
    /// address of the configuration, `https://127.0.0.1:7443` by default].
    #[arg(long, env = ENV_SERVER, global = true, value_name = "URL")]
    pub server: Option<String>,
    /// API key for client commands.
    #[arg(long, env = ENV_API_KEY, global = true, hide_env_values = true, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Fingerprint of the daemon's key, when its data dir is not shared
    /// (`mosaicd identity show` on the daemon's host prints it).
    #[arg(long, env = ENV_SERVER_FINGERPRINT, global = true, value_name = "FINGERPRINT")]
    pub server_fingerprint: Option<String>,
}

/// An open channel to the daemon plus what every call needs.
pub struct Connection {
    /// The gRPC channel.
    pub channel: tonic::transport::Channel,
    server: String,
    api_key: Option<String>,
}

impl Connection {
    /// Wraps `message` in a request carrying the API key.
    pub fn request<T>(&self, message: T) -> Result<tonic::Request<T>, CliError> {
        let mut request = tonic::Request::new(message);
        if let Some(key) = &self.api_key {
            let value = format!("Bearer {key}").parse().map_err(|_| {
                CliError::usage("the API key contains characters a header cannot carry")
            })?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }

    /// Turns a status from the daemon into a CLI error.
    pub fn error(&self, status: &tonic::Status) -> CliError {
        CliError::from_status(status, &self.server)
    }

    /// Turns a status of a command sent through the daemon to a peer (`peer`
    /// for people, `peer_instance_id` for commands) into a CLI error.
    pub fn remote_error(
        &self,
        status: &tonic::Status,
        peer: &str,
        peer_instance_id: &str,
    ) -> CliError {
        CliError::from_remote_status(status, &self.server, peer, peer_instance_id)
    }
}

/// The daemon's URL: `--server`, else the configuration's own `listen`
/// (a wildcard address read as loopback), over TLS unless it is plaintext.
pub fn server_url(config: &Config, args: &ClientArgs) -> String {
    if let Some(server) = &args.server {
        return server.clone();
    }
    let mut address = config.listen;
    if address.ip().is_unspecified() {
        address.set_ip(match address {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let scheme = if config.plaintext { "http" } else { "https" };
    format!("{scheme}://{address}")
}

/// Connects to the daemon named by [`server_url`].
pub async fn connect(config: &Config, args: &ClientArgs) -> Result<Connection, CliError> {
    let server = server_url(config, args);
    let tls = if server.starts_with("https://") {
        Some(Arc::new(
            crate::tls::pinned_client_config(server_pin(config, args)?)
                .map_err(|error| CliError::failure(error.to_string()))?,
        ))
    } else {
        None
    };
    let channel = crate::tls::connect_channel(&server, tls, ChannelTimeouts::default())
        .await
        .map_err(|error| match error {
            crate::tls::TlsError::InvalidUrl { .. } => CliError::usage(error.to_string()),
            other => CliError::unavailable(format!(
                "{other} — is `mosaicd serve` running at {server}? (TLS failures also show here: check --server-fingerprint)"
            )),
        })?;
    Ok(Connection {
        channel,
        server,
        api_key: args.api_key.clone(),
    })
}

fn server_pin(config: &Config, args: &ClientArgs) -> Result<ServerPin, CliError> {
    if let Some(fingerprint) = &args.server_fingerprint {
        if crate::identity::fingerprint::normalize(fingerprint).is_none() {
            return Err(CliError::usage(format!(
                "--server-fingerprint {fingerprint:?} is not a fingerprint (expected eight groups of four like ABCD-EFGH-...)"
            )));
        }
        return Ok(ServerPin::Fingerprint(fingerprint.clone()));
    }
    let path = config.certificate_path();
    let certificate = CertificateDer::from_pem_file(&path).map_err(|_| {
        CliError::usage(format!(
            "no daemon certificate at {} to pin; pass --server-fingerprint (see `mosaicd identity show` on the daemon's host) or the daemon's --data-dir",
            path.display()
        ))
    })?;
    let spki = crate::identity::certificate::spki_of_certificate(&certificate)
        .ok_or_else(|| CliError::failure(format!("{} is not a certificate", path.display())))?;
    let key = PublicKey::from_spki_der(&spki)
        .map_err(|error| CliError::failure(format!("{}: {error}", path.display())))?;
    Ok(ServerPin::PublicKey(key))
}
