//! A Rust client built on the crate's generated types: pins the daemon's key by
//! fingerprint (or its certificate file), reads the instance identity and health.
//!
//! ```sh
//! cargo run --example rust_client -- https://127.0.0.1:7443 ABCD-EFGH-...   # fingerprint
//! cargo run --example rust_client -- https://127.0.0.1:7443 ~/.local/share/mosaicd/tls/cert.pem
//! ```

use std::sync::Arc;

use mosaic_mesh::identity::PublicKey;
use mosaic_mesh::proto::federation::GetInstanceRequest;
use mosaic_mesh::proto::federation::federation_client::FederationClient;
use mosaic_mesh::tls::{ChannelTimeouts, ServerPin};
use rustls_pki_types::pem::PemObject;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(server), Some(pin)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: rust_client URL FINGERPRINT|CERT.pem");
    };
    mosaic_mesh::tls::install_default_provider();
    let pin = if std::path::Path::new(&pin).exists() {
        let certificate = rustls_pki_types::CertificateDer::from_pem_file(&pin)?;
        let spki = mosaic_mesh::identity::certificate::spki_of_certificate(&certificate)
            .ok_or_else(|| anyhow::anyhow!("{pin} is not a certificate"))?;
        ServerPin::PublicKey(PublicKey::from_spki_der(&spki)?)
    } else {
        ServerPin::Fingerprint(pin)
    };
    let tls = Arc::new(mosaic_mesh::tls::pinned_client_config(pin)?);
    let channel =
        mosaic_mesh::tls::connect_channel(&server, Some(tls), ChannelTimeouts::default()).await?;

    let instance = FederationClient::new(channel.clone())
        .get_instance(GetInstanceRequest {})
        .await?
        .into_inner()
        .instance
        .ok_or_else(|| anyhow::anyhow!("the daemon sent no instance"))?;
    println!("instance    {}", instance.instance_id);
    println!("name        {}", instance.name);
    println!("fingerprint {}", instance.fingerprint);

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in mosaic_mesh::proto::SERVICE_NAMES {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.to_owned(),
            })
            .await?
            .into_inner()
            .status();
        println!("{service:<36} {status:?}");
    }
    Ok(())
}
