//! The service checks of `mosaicd doctor`: the database (and how safely it
//! is reached) and Redis.

use std::time::Duration;

use super::Check;
use super::local::sqlite_path;
use crate::cli::config::url_without_credentials;
use crate::config::Config;
use crate::store::{Store, StoreError};

/// How long the database may take to answer the trivial query.
const DATABASE_PATIENCE: Duration = Duration::from_secs(5);
/// How long Redis may take to accept a connection and answer the first PING
/// (the daemon's own `redis_timeout` is for one check on an open connection).
const REDIS_CONNECT_PATIENCE: Duration = Duration::from_secs(3);

/// Opens the store as the daemon does, but never creates a SQLite file and
/// runs no migration, then asks a trivial query.
pub(super) async fn check_database(config: &Config) -> (Check, Option<Store>) {
    let shown = url_without_credentials(&config.database_url);
    if let Some(path) = sqlite_path(config)
        && !path.exists()
    {
        return (
            Check::fail(
                "database",
                3,
                format!("no database at {}", path.display()),
                Some("run `mosaicd init`, or pass the daemon's --data-dir / --database-url".into()),
            ),
            None,
        );
    }
    let started = tokio::time::Instant::now();
    let store = match Store::open(&config.database_url, &config.storage).await {
        Ok(store) => store,
        // A bad sslmode or sslrootcert: the URL is at fault, not the server.
        Err(StoreError::InvalidUrl(message)) => {
            return (
                Check::fail(
                    "database",
                    2,
                    format!("{shown}: {message}"),
                    Some("fix database_url (MOSAIC_DATABASE_URL); the README's database_url row lists the sslmode values".into()),
                ),
                None,
            );
        }
        // Store errors never carry the URL's password (see store/error.rs).
        Err(error) => {
            let hint = database_hint(config, &error.to_string());
            return (
                Check::fail("database", 5, format!("{shown}: {error}"), Some(hint)),
                None,
            );
        }
    };
    match tokio::time::timeout(DATABASE_PATIENCE, store.ping()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            let hint = database_hint(config, &error.to_string());
            return (
                Check::fail("database", 5, format!("{shown}: {error}"), Some(hint)),
                None,
            );
        }
        Err(_) => {
            return (
                Check::fail(
                    "database",
                    5,
                    format!(
                        "{shown} did not answer within {} s",
                        DATABASE_PATIENCE.as_secs()
                    ),
                    Some(database_hint(config, "")),
                ),
                None,
            );
        }
    }
    let answered = format!(
        "{} at {shown} answers ({} ms)",
        format!("{:?}", store.backend()).to_lowercase(),
        started.elapsed().as_millis()
    );
    let check = match postgres_tls_warning(&config.database_url) {
        Some((finding, hint)) => Check::warn("database", format!("{answered}; {finding}"), hint),
        None => Check::ok("database", answered),
    };
    (check, Some(store))
}

/// What to do about a database that did not open or answer, from the words
/// of its error.
fn database_hint(config: &Config, error: &str) -> String {
    if let Some(path) = sqlite_path(config) {
        return format!(
            "check that {} is a mosaicd database this user can read and write",
            path.display()
        );
    }
    let error = error.to_lowercase();
    if ["tls", "ssl", "certificate", "handshake"]
        .iter()
        .any(|word| error.contains(word))
    {
        "TLS to PostgreSQL failed: check sslmode and sslrootcert in database_url (a server without TLS refuses sslmode=require; verify-ca and verify-full need the CA that signed the server's certificate)".to_owned()
    } else if ["password", "authentication"]
        .iter()
        .any(|word| error.contains(word))
    {
        "check the user and password in database_url (MOSAIC_DATABASE_URL)".to_owned()
    } else if error.contains("does not exist") {
        "create the database, or fix its name in database_url".to_owned()
    } else {
        format!(
            "is PostgreSQL running at {} and reachable from this host? check database_url (MOSAIC_DATABASE_URL)",
            postgres_host(&config.database_url).unwrap_or_else(|| "the URL's host".to_owned())
        )
    }
}

/// The host (and port) of a `postgres://` URL, without its credentials.
fn postgres_host(url: &str) -> Option<String> {
    let (_, rest) = url.split_once("://")?;
    let before_query = rest.split('?').next().unwrap_or(rest);
    let location = before_query
        .rsplit_once('@')
        .map_or(before_query, |(_, location)| location);
    let host = location.split('/').next().unwrap_or(location);
    (!host.is_empty()).then(|| host.to_owned())
}

/// Whether `host` (with or without a port) names this machine.
fn is_local_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        host.split(':').next().unwrap_or(host)
    };
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|address| address.is_loopback())
}

/// A PostgreSQL URL whose traffic to another host is not encrypted, or is
/// encrypted without checking whom it talks to: what, and what to do.
fn postgres_tls_warning(url: &str) -> Option<(String, String)> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return None;
    }
    let host = postgres_host(url)?;
    // Several hosts, or a socket directory given as a parameter, are left alone.
    if host.contains(',') || is_local_host(&host) {
        return None;
    }
    let query = url.split_once('?').map_or("", |(_, query)| query);
    let parameter = |wanted: &str| {
        query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(name, _)| *name == wanted)
            .map(|(_, value)| value.to_owned())
    };
    if parameter("host").is_some() {
        return None;
    }
    let verify = "use ?sslmode=verify-full&sslrootcert=/path/to/ca.pem in database_url (your provider publishes the CA)";
    match parameter("sslmode").as_deref() {
        None | Some("disable") => Some((
            format!("traffic to {host} is not encrypted (no sslmode)"),
            verify.to_owned(),
        )),
        Some(mode @ ("prefer" | "require")) if parameter("sslrootcert").is_none() => Some((
            format!("TLS to {host} does not check the server's certificate (sslmode={mode})"),
            verify.to_owned(),
        )),
        _ => None,
    }
}

/// PINGs the configured Redis through the rate limiter's own pool (URL, CA
/// file), as the daemon would. Only when Redis is configured.
pub(super) async fn check_redis(config: &Config) -> Check {
    use crate::ratelimit::Storage;
    use crate::ratelimit::redis::RedisLimiter;
    let Some(url) = &config.redis_url else {
        return Check::skip(
            "redis",
            "not configured: rate limits are kept in memory, per daemon",
        );
    };
    let shown = url_without_credentials(url);
    let settings = &config.rate_limit;
    if settings.storage == Storage::Memory {
        return Check::warn(
            "redis",
            format!(
                "{shown} is set, but rate_limit.storage is \"memory\": the daemon does not use it"
            ),
            "set rate_limit.storage = \"redis\" (MOSAIC_RATE_LIMIT_STORAGE=redis) to share limits, or remove redis_url",
        );
    }
    let limiter = match RedisLimiter::new(
        url,
        settings.redis_ca_file.as_deref(),
        &settings.redis_prefix,
        settings.redis_timeout.max(REDIS_CONNECT_PATIENCE),
    ) {
        Ok(limiter) => limiter,
        Err(error) => {
            return Check::fail(
                "redis",
                2,
                format!("{shown}: {error}"),
                Some("fix redis_url (MOSAIC_REDIS_URL) or rate_limit.redis_ca_file".into()),
            );
        }
    };
    if let Err(error) = limiter.ping().await {
        let text = error.to_string().to_lowercase();
        let hint = if ["tls", "certificate", "handshake"]
            .iter()
            .any(|word| text.contains(word))
        {
            "TLS to Redis failed: a rediss:// server's certificate must be signed by the system's roots or by rate_limit.redis_ca_file".to_owned()
        } else if text.contains("auth") || text.contains("password") {
            "check the user and password in redis_url (MOSAIC_REDIS_URL)".to_owned()
        } else {
            "is Redis running and reachable from this host? check redis_url (MOSAIC_REDIS_URL)"
                .to_owned()
        };
        return Check::fail(
            "redis",
            5,
            format!(
                "{shown}: {error} (the daemon falls back to in-memory limits, per daemon, while Redis does not answer)"
            ),
            Some(hint),
        );
    }
    // The first PING opened the connection; this one is what a check costs.
    let started = tokio::time::Instant::now();
    let second = limiter.ping().await;
    let took = started.elapsed();
    if second.is_ok() && took > settings.redis_timeout {
        return Check::warn(
            "redis",
            format!(
                "{shown} answers PING in {} ms, more than rate_limit.redis_timeout_ms ({} ms): checks would time out and fall back to memory",
                took.as_millis(),
                settings.redis_timeout.as_millis()
            ),
            "raise rate_limit.redis_timeout_ms (MOSAIC_RATE_LIMIT_REDIS_TIMEOUT_MS), or run Redis closer to the daemon",
        );
    }
    Check::ok(
        "redis",
        format!("{shown} answers PING ({} ms)", took.as_millis()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_on_another_host_without_verified_tls_is_named() {
        let plain =
            postgres_tls_warning("postgres://u:secret@db.example:5432/mosaic").expect("a warning");
        assert!(plain.0.contains("db.example:5432") && plain.0.contains("not encrypted"));
        assert!(!plain.0.contains("secret"));
        assert!(plain.1.contains("sslmode=verify-full"));
        let unchecked = postgres_tls_warning("postgres://db.example/mosaic?sslmode=require")
            .expect("a warning");
        assert!(unchecked.0.contains("sslmode=require"), "{unchecked:?}");
        for fine in [
            "postgres://db.example/mosaic?sslmode=verify-full&sslrootcert=/ca.pem",
            "postgres://db.example/mosaic?sslmode=require&sslrootcert=/ca.pem",
            "postgres://u:p@127.0.0.1:5432/mosaic",
            "postgresql://localhost/mosaic",
            "postgres://[::1]:5432/mosaic",
            "sqlite:///var/lib/mosaicd/mosaic.db",
        ] {
            assert_eq!(postgres_tls_warning(fine), None, "{fine}");
        }
    }
}
