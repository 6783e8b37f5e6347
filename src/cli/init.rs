//! `mosaicd init`: creates the data dir, database and identity, or says that
//! they already exist (and changes nothing an operator made).

use serde_json::json;

use super::exit::{CliError, Output};
use super::serve::{load_config, open_existing_store};
use crate::config::{Config, ConfigArgs};

/// `mosaicd init`. Run again on an instance, it loads the identity instead of
/// making one (as `serve` does) and says so: `"created": false` in JSON.
///
/// CA mode is not applied: the key must exist before a CA can certify it
/// (`mosaicd identity csr`), so init never needs the CA-mode files.
pub async fn init(args: &ConfigArgs, output: Output) -> Result<(), CliError> {
    let mut config = load_config(args)?;
    config.tls = crate::tls::ca::TlsSettings::Pinned;
    let existed = identity_exists(&config).await?;
    let shared = crate::server::prepare(&config).await?;
    let identity = shared.identity.current();
    let public_key = identity.public_key();
    output.print(
        &json!({
            "created": !existed,
            "instance_id": identity.instance_id,
            "name": identity.profile.name,
            "url": identity.profile.public_url,
            "key_id": public_key.key_id(),
            "fingerprint": public_key.fingerprint(),
            "data_dir": config.data_dir,
            "certificate": config.certificate_path(),
        }),
        || {
            let what = if existed {
                "instance already exists (nothing created):"
            } else {
                "initialised instance"
            };
            format!(
                "{what} {} ({})\nfingerprint: {}\ndata dir:    {}",
                identity.instance_id,
                identity.profile.name,
                public_key.fingerprint(),
                config.data_dir.display()
            )
        },
    );
    Ok(())
}

/// Whether the configured database already holds an identity. A SQLite file
/// that does not exist yet holds none (and is not created here).
async fn identity_exists(config: &Config) -> Result<bool, CliError> {
    if let Some(path) = config.database_url.strip_prefix("sqlite://")
        && !std::path::Path::new(path).exists()
    {
        return Ok(false);
    }
    let store = open_existing_store(config).await?;
    let identity = crate::identity::load_public(&store)
        .await
        .map_err(|error| CliError::from_identity(&error, error.to_string()))?;
    Ok(identity.is_some())
}
