//! `mosaicd doctor`: checks, in order, the configuration, the data dir's
//! permissions, the database, Redis, the identity, the listen address and the
//! peers' reachability, and prints for each what is wrong and what to do.
//!
//! Every check reuses what the daemon itself does (the configuration loader,
//! `Store::open`, the rate limiter's Redis pool, `IdentityManager`, the pinned
//! TLS client) and changes nothing: no migration, no new SQLite file, no
//! identity. A later check that needs an earlier one's result (the identity
//! needs the database) is skipped when that failed. The exit code is the
//! `exit.rs` code of the first failing check. Nothing secret is printed:
//! URLs lose their credentials, the master key and API key are never shown.
//!
//! The checks live beside this file, one group each: `local` (the
//! configuration and the data dir), `services` (the database and Redis),
//! `identity`, and `network` (the listen address and the peers). This file
//! holds the report types, the order the checks run in, printing and the exit
//! code.

mod identity;
mod local;
mod network;
mod services;

use serde_json::{Value, json};

use self::identity::check_identity;
use self::local::{check_config, check_data_dir};
use self::network::{check_listener, check_peers};
use self::services::{check_database, check_redis};
use super::client::ClientArgs;
use super::exit::{CliError, Output};
use super::serve::load_config;
use crate::config::ConfigArgs;

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    Warn,
    Fail,
    /// Not run: not configured, or an earlier check it needs failed.
    Skip,
}

impl Status {
    /// The word in JSON: upper case, as every state the CLI prints.
    fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Skip => "SKIP",
        }
    }

    /// The word at the start of a text line, failures in capitals.
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        }
    }
}

/// One check's outcome: what was found and what to do about it.
#[derive(Debug)]
struct Check {
    /// Its name in JSON (`data_dir`).
    name: &'static str,
    status: Status,
    /// What was found (or why it was skipped).
    detail: String,
    /// What to do, when there is something to do.
    hint: Option<String>,
    /// The exit code of `exit.rs` for a failure (unused otherwise).
    code: u8,
    /// The peers check lists the connections it looked at.
    connections: Option<Vec<Value>>,
}

impl Check {
    fn new(name: &'static str, status: Status, detail: String, hint: Option<String>) -> Check {
        Check {
            name,
            status,
            detail,
            hint,
            code: 0,
            connections: None,
        }
    }

    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check::new(name, Status::Ok, detail.into(), None)
    }

    fn warn(name: &'static str, detail: impl Into<String>, hint: impl Into<String>) -> Check {
        Check::new(name, Status::Warn, detail.into(), Some(hint.into()))
    }

    fn skip(name: &'static str, detail: impl Into<String>) -> Check {
        Check::new(name, Status::Skip, detail.into(), None)
    }

    /// A failure with the exit code of its class (`exit.rs`).
    fn fail(
        name: &'static str,
        code: u8,
        detail: impl Into<String>,
        hint: Option<String>,
    ) -> Check {
        Check {
            code,
            ..Check::new(name, Status::Fail, detail.into(), hint)
        }
    }

    fn to_json(&self) -> Value {
        let mut value = json!({
            "name": self.name,
            "status": self.status.as_str(),
            "detail": self.detail,
            "hint": self.hint,
        });
        if let (Some(connections), Some(object)) = (&self.connections, value.as_object_mut()) {
            object.insert("connections".to_owned(), Value::Array(connections.clone()));
        }
        value
    }
}

/// The checks' names, in the order they run (people read `data dir`).
const CHECKS: [&str; 7] = [
    "config", "data_dir", "database", "redis", "identity", "listener", "peers",
];

/// `mosaicd doctor`: runs every check, prints them, and fails with the first
/// failure's exit code.
pub async fn run(
    args: &ConfigArgs,
    client_args: &ClientArgs,
    output: Output,
) -> Result<(), CliError> {
    let config = match load_config(args) {
        Ok(config) => config,
        Err(error) => {
            let mut checks = vec![Check::fail(
                "config",
                error.code,
                error.message,
                Some(
                    "fix the file key, variable or flag the message names; `mosaicd config check` shows the resolved settings"
                        .to_owned(),
                ),
            )];
            checks.extend(
                CHECKS[1..]
                    .iter()
                    .map(|name| Check::skip(name, "needs a valid configuration")),
            );
            return report(&checks, output);
        }
    };
    let mut checks = vec![check_config(&config, args.config.as_deref())];
    checks.push(check_data_dir(&config));
    let (database, store) = check_database(&config).await;
    checks.push(database);
    checks.push(check_redis(&config).await);
    checks.push(check_identity(&config, store.as_ref()).await);
    let (listener, daemon_url) = check_listener(&config, store.as_ref()).await;
    checks.push(listener);
    checks.push(check_peers(&config, client_args, daemon_url).await);
    report(&checks, output)
}

/// Prints the checks; `Err` with the first failure's code if any failed.
fn report(checks: &[Check], output: Output) -> Result<(), CliError> {
    let failed: Vec<&Check> = checks
        .iter()
        .filter(|check| check.status == Status::Fail)
        .collect();
    let warnings = checks
        .iter()
        .filter(|check| check.status == Status::Warn)
        .count();
    output.print(
        &json!({
            "healthy": failed.is_empty(),
            "checks": checks.iter().map(Check::to_json).collect::<Vec<_>>(),
        }),
        || report_text(checks, failed.len(), warnings),
    );
    match failed.first() {
        None => Ok(()),
        Some(first) => Err(CliError {
            code: first.code,
            message: format!(
                "{} failed: {} (the exit code is the first one's)",
                plural(failed.len(), "check"),
                failed
                    .iter()
                    .map(|check| check.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

fn report_text(checks: &[Check], failures: usize, warnings: usize) -> String {
    const INDENT: &str = "                  ";
    let mut lines = Vec::new();
    for check in checks {
        lines.push(format!(
            "{:<4}  {:<10}  {}",
            check.status.label(),
            check.name.replace('_', " "),
            check.detail
        ));
        for connection in check.connections.iter().flatten() {
            lines.push(format!("{INDENT}{}", connection_text(connection)));
        }
        if let Some(hint) = &check.hint {
            lines.push(format!("{INDENT}hint: {hint}"));
        }
    }
    lines.push(match (failures, warnings) {
        (0, 0) => "no problems found".to_owned(),
        (0, warnings) => format!("{}, no failures", plural(warnings, "warning")),
        (failures, warnings) => format!(
            "{}, {}",
            plural(failures, "failure"),
            plural(warnings, "warning")
        ),
    });
    lines.join("\n")
}

fn plural(count: usize, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// One connection of the peers check, for people.
fn connection_text(connection: &Value) -> String {
    let text = |key: &str| connection[key].as_str().unwrap_or("-").to_owned();
    format!(
        "{} ({}) at {}: {}, last contact {}",
        text("remote_name"),
        text("remote_instance_id"),
        text("remote_url"),
        if connection["reachable"] == true {
            "reachable"
        } else {
            "unreachable"
        },
        connection["last_contact_seconds_ago"]
            .as_i64()
            .map_or_else(|| "never".to_owned(), |seconds| format!("{seconds}s ago"))
    )
}
