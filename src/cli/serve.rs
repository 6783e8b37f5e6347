//! `mosaicd serve` and `migrate`, and the store and configuration helpers
//! the offline commands share.

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
    // The signal handlers go in before the slow part of the start; the
    // service manager hears STOPPING=1 when one starts the drain.
    let shutdown = crate::notify::stopping_after(shutdown_signal());
    crate::server::run(listener, config, shutdown).await?;
    Ok(())
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
///
/// The handlers are installed when this is called, not when the future is
/// first polled: a signal that arrives while the daemon is still starting
/// (after it logged that it serves, before the server loop polls this) must
/// start a drain, not kill the process with the default action.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let handlers = {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        )
    };
    async move {
        #[cfg(unix)]
        {
            let wait = |handler: std::io::Result<tokio::signal::unix::Signal>,
                        name: &'static str| async move {
                match handler {
                    Ok(mut handler) => {
                        handler.recv().await;
                    }
                    Err(error) => {
                        tracing::error!(%error, signal = name, "cannot listen for the signal");
                        std::future::pending::<()>().await;
                    }
                }
            };
            let (interrupt, terminate) = handlers;
            tokio::select! {
                () = wait(interrupt, "SIGINT") => tracing::info!("received SIGINT"),
                () = wait(terminate, "SIGTERM") => tracing::info!("received SIGTERM"),
            }
        }
        #[cfg(not(unix))]
        {
            if let Err(error) = tokio::signal::ctrl_c().await {
                tracing::error!(%error, "cannot listen for ctrl-c");
                std::future::pending::<()>().await;
            }
            tracing::info!("received SIGINT");
        }
    }
}

/// `mosaicd migrate`: runs the embedded migrations alone.
pub async fn migrate(args: &ConfigArgs, output: Output) -> Result<(), CliError> {
    let config = load_config(args)?;
    crate::config::create_data_dir(&config.data_dir)
        .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
    let store = Store::open(&config.database_url, &config.storage)
        .await
        .with_context(|| {
            format!(
                "cannot open the database at {}",
                crate::config::url_without_credentials(&config.database_url)
            )
        })?;
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
    let store = Store::open(&config.database_url, &config.storage)
        .await
        .with_context(|| {
            format!(
                "cannot open the database at {}",
                crate::config::url_without_credentials(&config.database_url)
            )
        })?;
    store
        .run_migrations()
        .await
        .context("cannot run database migrations")?;
    Ok(store)
}
