//! `mosaicd apikey create | list | revoke`, offline on the database.

use serde_json::json;

use super::exit::{CliError, Output, list_json};
use super::serve::{load_config, open_existing_store};
use crate::auth::Scope;
use crate::config::ConfigArgs;
use crate::store::{ApiKeyRecord, StoreError};

fn key_json(record: &ApiKeyRecord) -> serde_json::Value {
    json!({
        "id": record.id,
        "name": record.name,
        "prefix": record.prefix,
        "scopes": record.scopes,
        "created_at_ms": record.created_at_ms,
        "last_used_at_ms": record.last_used_at_ms,
        "revoked_at_ms": record.revoked_at_ms,
    })
}

/// `apikey create --name N --scope S[,S]`: prints the key once.
pub async fn create(
    args: &ConfigArgs,
    name: &str,
    scopes: &[Scope],
    output: Output,
) -> Result<(), CliError> {
    let config = load_config(args)?;
    let store = open_existing_store_or_init(&config).await?;
    let created = crate::auth::create_api_key(&store, name, scopes)
        .await
        .map_err(|error| match error {
            crate::auth::ApiKeyError::Invalid(message) => CliError::usage(message),
            other => CliError::failure(other.to_string()),
        })?;
    let mut value = key_json(&created.record);
    value["key"] = json!(created.secret.as_str());
    output.print(&value, || {
        format!(
            "{}\n\nThis is the only time the key is shown. id: {}  scopes: {}",
            created.secret.as_str(),
            created.record.id,
            created.record.scopes.join(",")
        )
    });
    Ok(())
}

/// API keys may be made before the first `serve`, so `create` migrates a new
/// database instead of refusing it.
async fn open_existing_store_or_init(
    config: &crate::config::Config,
) -> Result<crate::store::Store, CliError> {
    crate::config::create_data_dir(&config.data_dir).map_err(|error| {
        CliError::failure(format!(
            "cannot create {}: {error}",
            config.data_dir.display()
        ))
    })?;
    let store = crate::store::Store::connect(&config.database_url)
        .await
        .map_err(|error| CliError::from(anyhow::Error::new(error)))?;
    store
        .run_migrations()
        .await
        .map_err(|error| CliError::from(anyhow::Error::new(error)))?;
    Ok(store)
}

/// `apikey list`.
pub async fn list(args: &ConfigArgs, output: Output) -> Result<(), CliError> {
    let config = load_config(args)?;
    let store = open_existing_store(&config).await?;
    let keys = store
        .list_api_keys()
        .await
        .map_err(|error| CliError::from(anyhow::Error::new(error)))?;
    let value = list_json("api_keys", keys.iter().map(key_json).collect(), "");
    output.print(&value, || {
        let mut text = format!(
            "{:<36}  {:<20}  {:<12}  {:<24}  {}",
            "ID", "NAME", "PREFIX", "SCOPES", "STATE"
        );
        for key in &keys {
            let state = if key.revoked_at_ms.is_some() {
                "REVOKED"
            } else {
                "ACTIVE"
            };
            text.push_str(&format!(
                "\n{:<36}  {:<20}  {:<12}  {:<24}  {}",
                key.id,
                key.name,
                key.prefix,
                key.scopes.join(","),
                state
            ));
        }
        text
    });
    Ok(())
}

/// `apikey revoke ID`.
pub async fn revoke(args: &ConfigArgs, id: &str, output: Output) -> Result<(), CliError> {
    let config = load_config(args)?;
    let store = open_existing_store(&config).await?;
    let record = store
        .revoke_api_key(id, crate::clock::now_ms())
        .await
        .map_err(|error| match error {
            StoreError::NotFound => CliError::not_found(format!("no API key with id {id}")),
            other => CliError::from(anyhow::Error::new(other)),
        })?;
    output.print(&key_json(&record), || {
        format!("revoked API key {} ({})", record.id, record.name)
    });
    Ok(())
}
