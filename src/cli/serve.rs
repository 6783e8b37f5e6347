//! `mosaicd serve`, `init` and `migrate`.

use anyhow::Context as _;
use serde_json::json;

use super::exit::{CliError, Output};
use crate::config::{Config, ConfigArgs};
use crate::store::Store;

/// Loads the configuration, turning its errors into a usage error.
pub fn load_config(args: &ConfigArgs) -> Result<Config, CliError> {
    Config::load(args).map_err(|error| CliError::usage(error.to_string()))
}

/// `mosaicd serve`: binds the listener and runs until SIGINT or SIGTERM.
pub async fn serve(args: &ConfigArgs) -> Result<(), CliError> {
    let config = load_config(args)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (is another mosaicd running? use --listen)",
                config.listen
            )
        })?;
    crate::server::run(listener, config, shutdown_signal()).await?;
    Ok(())
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!("received SIGINT"),
        () = terminate => tracing::info!("received SIGTERM"),
    }
}

/// `mosaicd init`: creates the data dir, database and identity.
pub async fn init(args: &ConfigArgs, output: Output) -> Result<(), CliError> {
    let config = load_config(args)?;
    let shared = crate::server::prepare(&config).await?;
    let identity = shared.identity.current();
    let public_key = identity.public_key();
    output.print(
        &json!({
            "instance_id": identity.instance_id,
            "name": identity.profile.name,
            "url": identity.profile.public_url,
            "key_id": public_key.key_id(),
            "fingerprint": public_key.fingerprint(),
            "data_dir": config.data_dir,
            "certificate": config.certificate_path(),
        }),
        || {
            format!(
                "initialised instance {} ({})\nfingerprint: {}\ndata dir:    {}",
                identity.instance_id,
                identity.profile.name,
                public_key.fingerprint(),
                config.data_dir.display()
            )
        },
    );
    Ok(())
}

/// `mosaicd migrate`: runs the embedded migrations alone.
pub async fn migrate(args: &ConfigArgs, output: Output) -> Result<(), CliError> {
    let config = load_config(args)?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
    let store = Store::connect(&config.database_url)
        .await
        .context("cannot open the database")?;
    store
        .run_migrations()
        .await
        .context("cannot run database migrations")?;
    output.print(&json!({ "migrated": true }), || {
        "database migrations are up to date".to_owned()
    });
    Ok(())
}

/// Opens the configured database for an offline command, refusing to create a new
/// SQLite file where none exists (a mistyped --data-dir should not look empty).
pub async fn open_existing_store(config: &Config) -> Result<Store, CliError> {
    if let Some(path) = config.database_url.strip_prefix("sqlite://")
        && !std::path::Path::new(path).exists()
    {
        return Err(CliError::not_found(format!(
            "no database at {path}; run `mosaicd init` (or pass the daemon's --data-dir)"
        )));
    }
    let store = Store::connect(&config.database_url)
        .await
        .context("cannot open the database")?;
    store
        .run_migrations()
        .await
        .context("cannot run database migrations")?;
    Ok(store)
}
