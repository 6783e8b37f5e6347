//! Parsing the database URL into a backend and a target, and keeping its
//! password out of messages.

use super::StoreError;

/// Where the store keeps its data, as named by the database URL.
#[derive(Clone, PartialEq, Eq)]
pub(super) enum DatabaseTarget {
    /// A SQLite database file at this path.
    Sqlite { path: String },
    /// A PostgreSQL server; the URL is passed to the driver unchanged.
    Postgres { url: String },
}

impl DatabaseTarget {
    /// Reads `sqlite://<path>`, a bare path ending in `.db`,
    /// `postgres://...` or `postgresql://...`.
    pub(super) fn parse(database_url: &str) -> Result<DatabaseTarget, StoreError> {
        let database_url = database_url.trim();
        if database_url.starts_with("postgres://") || database_url.starts_with("postgresql://") {
            // A bad sslmode or sslrootcert is said at start, not at the
            // first connection.
            super::postgres_tls::prepare(database_url).map_err(StoreError::InvalidUrl)?;
            return Ok(DatabaseTarget::Postgres {
                url: database_url.to_owned(),
            });
        }
        let path = match database_url.strip_prefix("sqlite://") {
            Some(path) => path,
            None if database_url.ends_with(".db") && !database_url.contains("://") => database_url,
            None => return Err(StoreError::InvalidUrl(describe_unsupported(database_url))),
        };
        if path.is_empty() {
            return Err(StoreError::InvalidUrl(
                "a sqlite:// url needs a file path".to_owned(),
            ));
        }
        // Every pooled connection would open its own, empty, in-memory
        // database, so writes through one would be invisible to the others.
        if path == ":memory:" || path.contains("mode=memory") {
            return Err(StoreError::InvalidUrl(
                "in-memory SQLite databases are not supported; give a file path".to_owned(),
            ));
        }
        Ok(DatabaseTarget::Sqlite {
            path: path.to_owned(),
        })
    }
}

/// Names what was wrong with an unsupported URL without repeating the URL,
/// which may hold a password.
fn describe_unsupported(database_url: &str) -> String {
    match database_url.split_once("://") {
        Some((scheme, _)) => format!(
            "unsupported scheme `{scheme}`; expected sqlite://, postgres:// or postgresql://"
        ),
        None => "expected sqlite://<path>, a path ending in .db, or postgres://...".to_owned(),
    }
}

/// Replaces the password of `database_url`, as written and percent-decoded,
/// wherever it appears in `message`.
///
/// Drivers do not normally repeat the password, but a connection error is
/// logged and returned to callers, so this makes sure of it.
pub(super) fn redact_password(message: &str, database_url: &str) -> String {
    let Some(password) = password_of(database_url) else {
        return message.to_owned();
    };
    let mut redacted = message.replace(password, "***");
    let decoded = percent_decode(password);
    if !decoded.is_empty() && decoded != password {
        redacted = redacted.replace(&decoded, "***");
    }
    redacted
}

/// The password in `scheme://user:password@host/...` or in a
/// `?password=...` parameter, if there is one.
fn password_of(database_url: &str) -> Option<&str> {
    let (_, rest) = database_url.split_once("://")?;
    if let Some((_, query)) = rest.split_once('?') {
        let parameter = query
            .split('&')
            .find_map(|pair| pair.strip_prefix("password="))
            .filter(|password| !password.is_empty());
        if parameter.is_some() {
            return parameter;
        }
    }
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    // The host follows the last `@`; an unescaped `@` in a password would
    // otherwise cut it short.
    let (user_info, _) = authority.rsplit_once('@')?;
    let (_, password) = user_info.split_once(':')?;
    (!password.is_empty()).then_some(password)
}

/// Decodes `%XX` escapes; anything malformed is kept as written.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escaped = (bytes[index] == b'%')
            .then(|| text.get(index + 1..index + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                index += 3;
            }
            None => {
                decoded.push(bytes[index]);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqlite(path: &str) -> DatabaseTarget {
        DatabaseTarget::Sqlite {
            path: path.to_owned(),
        }
    }

    #[test]
    fn accepts_the_documented_forms() {
        assert!(
            sqlite("/var/lib/mosaic/mosaic.db")
                == DatabaseTarget::parse("sqlite:///var/lib/mosaic/mosaic.db").unwrap()
        );
        assert!(
            sqlite("data/mosaic.sqlite")
                == DatabaseTarget::parse("sqlite://data/mosaic.sqlite").unwrap()
        );
        assert!(sqlite("data/mosaic.db") == DatabaseTarget::parse("data/mosaic.db").unwrap());
        for url in [
            "postgres://u:p@db:5432/mosaic",
            "postgresql://db/mosaic?sslmode=disable",
        ] {
            assert!(
                DatabaseTarget::Postgres {
                    url: url.to_owned()
                } == DatabaseTarget::parse(url).unwrap()
            );
        }
    }

    #[test]
    fn rejects_other_urls_without_repeating_them() {
        for url in [
            "mysql://root:hunter2@db/mosaic",
            "data/mosaic.txt",
            "sqlite://",
            "sqlite://:memory:",
        ] {
            match DatabaseTarget::parse(url) {
                Err(StoreError::InvalidUrl(message)) => {
                    assert!(!message.contains("hunter2"), "{message}")
                }
                Err(other) => panic!("{url}: expected InvalidUrl, got {other:?}"),
                Ok(_) => panic!("{url}: expected InvalidUrl, got a target"),
            }
        }
    }

    #[test]
    fn redacts_the_password_as_written_and_decoded() {
        let url = "postgres://mosaic:s3cr%40t@db:5432/mosaic";
        let message = "password s3cr@t (s3cr%40t) rejected for user mosaic";
        assert_eq!(
            redact_password(message, url),
            "password *** (***) rejected for user mosaic"
        );
        assert_eq!(
            redact_password("refused", "postgres://mosaic@db/x"),
            "refused"
        );
        assert_eq!(redact_password("a:b@c", "postgres://db/x?user=a"), "a:b@c");
        assert_eq!(
            redact_password("bad pw hunter2", "postgres://db/x?user=a&password=hunter2"),
            "bad pw ***"
        );
    }
}
