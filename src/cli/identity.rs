//! `mosaicd identity show | cert | csr | rotate`.

use std::time::Duration;

use serde_json::json;

use super::client::ClientArgs;
use super::exit::{CliError, Output};
use super::serve::{load_config, open_existing_store};
use crate::clock::ms_from_timestamp;
use crate::config::ConfigArgs;
use crate::proto::federation as pb;

/// `identity show`: reads the public identity from the database (no master key
/// needed, nothing written).
pub async fn show(args: &ConfigArgs, output: Output) -> Result<(), CliError> {
    let config = load_config(args)?;
    let store = open_existing_store(&config).await?;
    let Some((instance, public_key, previous_keys)) = crate::identity::load_public(&store)
        .await
        .map_err(|error| CliError::from_identity(&error, error.to_string()))?
    else {
        return Err(CliError::not_found(
            "this database has no identity yet; run `mosaicd init`",
        ));
    };
    let previous: Vec<_> = previous_keys
        .iter()
        .map(|key| {
            json!({
                "key_id": key.public_key.key_id(),
                "fingerprint": key.public_key.fingerprint(),
                "valid_until_ms": key.valid_until_ms,
            })
        })
        .collect();
    output.print(
        &json!({
            "instance_id": instance.instance_id,
            "name": instance.name,
            "url": instance.public_url,
            "key_id": public_key.key_id(),
            "fingerprint": public_key.fingerprint(),
            "capabilities": instance.capabilities,
            "metadata": instance.metadata,
            "previous_keys": previous,
        }),
        || {
            let mut text = format!(
                "instance:     {}\nname:         {}\nurl:          {}\nkey id:       {}\nfingerprint:  {}\ncapabilities: {}",
                instance.instance_id,
                instance.name,
                instance.public_url,
                public_key.key_id(),
                public_key.fingerprint(),
                instance.capabilities.join(", ")
            );
            for key in &previous_keys {
                text.push_str(&format!(
                    "\nprevious key: {} (valid until {})",
                    key.public_key.fingerprint(),
                    super::times::ms_text(key.valid_until_ms)
                ));
            }
            text
        },
    );
    Ok(())
}

/// `identity cert`: prints the certificate the daemon wrote into its data dir.
pub fn cert(args: &ConfigArgs) -> Result<(), CliError> {
    let config = load_config(args)?;
    let path = config.certificate_path();
    let pem = std::fs::read_to_string(&path).map_err(|_| {
        CliError::not_found(format!(
            "no certificate at {}; run `mosaicd init` or `mosaicd serve` with this --data-dir",
            path.display()
        ))
    })?;
    super::exit::print_line(pem.strip_suffix('\n').unwrap_or(&pem));
    Ok(())
}

/// `identity csr`: a certificate signing request for the instance key, for CA
/// mode. Opens the key with the master key; writes nothing.
pub async fn csr(
    args: &ConfigArgs,
    dns: &[String],
    ip: &[std::net::IpAddr],
    output: Output,
) -> Result<(), CliError> {
    let config = load_config(args)?;
    let mut names: Vec<String> = dns.to_vec();
    names.extend(ip.iter().map(ToString::to_string));
    if names.is_empty() {
        let host = config.instance.public_host().ok_or_else(|| {
            CliError::usage("the public URL has no host; pass --dns NAME or --ip ADDR")
        })?;
        names.push(host);
    }
    if let Some(bad) = names.iter().find(|name| {
        name.is_empty()
            || name.len() > 253
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '*' | ':' | '_'))
    }) {
        return Err(CliError::usage(format!(
            "{bad:?} is not a DNS name or IP address"
        )));
    }
    let store = open_existing_store(&config).await?;
    let manager =
        crate::identity::IdentityManager::load_existing(store, &config.master_key_source())
            .await
            .map_err(|error| CliError::from_identity(&error, error.to_string()))?
            .ok_or_else(|| {
                CliError::not_found("this database has no identity yet; run `mosaicd init`")
            })?;
    let identity = manager.current();
    let pem = identity
        .certificate_request(&names)
        .map_err(|error| CliError::usage(error.to_string()))?;
    output.print(
        &json!({
            "csr": pem,
            "names": names,
            "key_id": identity.public_key().key_id(),
            "fingerprint": identity.public_key().fingerprint(),
        }),
        || pem.trim_end().to_owned(),
    );
    Ok(())
}

/// `identity rotate`: asks the running daemon to rotate its key.
pub async fn rotate(
    args: &ConfigArgs,
    client_args: &ClientArgs,
    grace: Option<Duration>,
    output: Output,
) -> Result<(), CliError> {
    let config = load_config(args)?;
    let connection = super::client::connect(&config, client_args).await?;
    let grace_period_seconds = grace
        .map(|grace| u32::try_from(grace.as_secs()))
        .transpose()
        .map_err(|_| CliError::usage("--grace is too long"))?;
    let mut client = pb::federation_client::FederationClient::new(connection.channel.clone());
    let response = client
        .rotate_keys(connection.request(pb::RotateKeysRequest {
            grace_period_seconds,
        })?)
        .await
        .map_err(|status| connection.error(&status))?
        .into_inner();
    let current = response.current_key.unwrap_or_default();
    let previous = response.previous_key.unwrap_or_default();
    let valid_until_ms = previous.valid_until.as_ref().map(ms_from_timestamp);
    output.print(
        &json!({
            "current_key": { "key_id": current.key_id, "fingerprint": current.fingerprint },
            "previous_key": {
                "key_id": previous.key_id,
                "fingerprint": previous.fingerprint,
                "valid_until_ms": valid_until_ms,
            },
        }),
        || {
            format!(
                "new key:      {} ({})\nprevious key: {} valid until {}",
                current.fingerprint,
                current.key_id,
                previous.fingerprint,
                valid_until_ms.map_or_else(|| "-".to_owned(), super::times::ms_text)
            )
        },
    );
    Ok(())
}
