//! `mosaicd config check`: resolves the configuration as `serve` would (file,
//! `MOSAIC_*` environment, flags), checks what can be checked without a
//! database or a listener (the master key's form, the CA-mode files, the
//! agent programs), and prints what is wrong (exit 2) or a short summary.
//!
//! The summary never shows a secret: database and Redis URLs lose their
//! credentials and query, the master key and webhook secrets are named by
//! where they come from, agent environment values are left out.

use std::path::Path;

use serde_json::{Value, json};

use super::environment::unknown_variables_here;
use super::exit::{CliError, Output};
use super::serve::load_config;
pub use crate::config::url_without_credentials;
use crate::config::{Config, ConfigArgs};
use crate::tls::ca::TlsSettings;

/// `mosaicd config ...`
#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Check the configuration file (--config / MOSAIC_CONFIG), the MOSAIC_*
    /// environment and the flags without starting anything or opening the
    /// database; print what is wrong (exit 2) or the resolved settings
    /// (never secrets).
    Check,
}

/// Runs a `config` subcommand.
pub fn run(command: ConfigCommand, args: &ConfigArgs, output: Output) -> Result<(), CliError> {
    let ConfigCommand::Check = command;
    let config = load_config(args)?;
    check_beyond_the_tree(&config)?;
    let warnings = warnings(&config);
    let summary = summary_json(args.config.as_deref(), &config, &warnings);
    output.print(&summary, || summary_text(&summary));
    Ok(())
}

/// What `serve` would refuse at start that `Config::load` leaves for later:
/// a master key (variable or file) that is not base64 of 32 bytes or a key
/// file others can read, and CA-mode files that do not hold what they must.
fn check_beyond_the_tree(config: &Config) -> Result<(), CliError> {
    config.master_key_source().load().map_err(|error| {
        let message = error.to_string();
        CliError::from_identity(&crate::identity::IdentityError::Sealing(error), message)
    })?;
    if let TlsSettings::Ca {
        cert_chain,
        ca_bundle,
    } = &config.tls
    {
        crate::tls::ca::CaTrust::load(cert_chain, ca_bundle)
            .map_err(|error| CliError::usage(error.to_string()))?;
    }
    Ok(())
}

/// Findings that do not stop a start but are likely mistakes.
fn warnings(config: &Config) -> Vec<String> {
    let mut warnings: Vec<String> = config.public_url_warning().into_iter().collect();
    for unknown in unknown_variables_here() {
        warnings.push(match unknown.suggestion {
            Some(suggestion) => format!(
                "{} is not a variable mosaicd reads (did you mean {suggestion}?)",
                unknown.name
            ),
            None => format!("{} is not a variable mosaicd reads", unknown.name),
        });
    }
    let secret_variables: Vec<String> = config
        .coordinator
        .webhooks
        .keys()
        .map(|source| crate::config::webhook_secret_variable(source))
        .collect();
    let mut stray: Vec<String> = std::env::vars_os()
        .map(|(name, _)| name.to_string_lossy().into_owned())
        .filter(|name| name.starts_with(crate::config::ENV_WEBHOOK_SECRET_PREFIX))
        .filter(|name| !secret_variables.contains(name))
        .collect();
    stray.sort();
    for name in stray {
        warnings.push(format!(
            "{name} names no webhook source of the configuration ([coordinator.webhooks.SOURCE])"
        ));
    }
    for (name, agent_type) in &config.agents.types {
        let Some(program) = agent_type.command.first() else {
            continue;
        };
        let path = agent_type
            .env
            .get("PATH")
            .map(std::ffi::OsString::from)
            .or_else(|| std::env::var_os("PATH"))
            .unwrap_or_default();
        if !program_exists(program, &path) {
            warnings.push(format!(
                "agent type {name:?}: {program:?} is not an executable file{} on this host",
                if program.contains('/') {
                    ""
                } else {
                    " in PATH"
                }
            ));
        }
    }
    warnings
}

/// Whether `program` names an executable file, as a path or a name looked up
/// in `path_variable` (how the agent runtime starts it).
fn program_exists(program: &str, path_variable: &std::ffi::OsStr) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    let executable = |candidate: &Path| {
        std::fs::metadata(candidate)
            .is_ok_and(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        return executable(Path::new(program));
    }
    std::env::split_paths(path_variable)
        .filter(|directory| directory.is_absolute())
        .any(|directory| executable(&directory.join(program)))
}

fn summary_json(file: Option<&Path>, config: &Config, warnings: &[String]) -> Value {
    let master_key = if config.master_key.is_some() {
        json!({ "source": crate::identity::sealing::MASTER_KEY_ENV })
    } else {
        let key_file = config
            .data_dir
            .join(crate::identity::sealing::MASTER_KEY_FILE);
        json!({ "source": "key_file", "key_file": key_file, "exists": key_file.exists() })
    };
    let tls = match &config.tls {
        TlsSettings::Pinned => json!({ "mode": "pinned" }),
        TlsSettings::Ca {
            cert_chain,
            ca_bundle,
        } => json!({ "mode": "ca", "cert_chain": cert_chain, "ca_bundle": ca_bundle }),
    };
    json!({
        "valid": true,
        "config_file": file,
        "data_dir": config.data_dir,
        "data_dir_exists": config.data_dir.is_dir(),
        "listen": config.listen.to_string(),
        "plaintext": config.plaintext,
        "tls": tls,
        "public_url": config.instance.public_url,
        "instance_name": config.instance.name,
        "database": url_without_credentials(&config.database_url),
        "redis": config.redis_url.as_deref().map(url_without_credentials),
        "rate_limit_storage": match config.rate_limit.storage {
            crate::ratelimit::Storage::Memory => "memory",
            crate::ratelimit::Storage::Redis => "redis",
        },
        "metrics_listen": config.metrics_listen.map(|address| address.to_string()),
        "master_key": master_key,
        "agent_types": config.agents.types.keys().collect::<Vec<_>>(),
        "webhook_sources": config.coordinator.webhooks.iter().map(|(name, source)| json!({
            "name": name,
            "signed": source.secret.is_some(),
        })).collect::<Vec<_>>(),
        "warnings": warnings,
    })
}

/// The summary for people, from the same values as the JSON.
fn summary_text(summary: &Value) -> String {
    let text = |key: &str| summary[key].as_str().unwrap_or("-").to_owned();
    let list = |key: &str, item: &dyn Fn(&Value) -> String| {
        let items: Vec<String> = summary[key]
            .as_array()
            .map(|values| values.iter().map(item).collect())
            .unwrap_or_default();
        if items.is_empty() {
            "none".to_owned()
        } else {
            items.join(", ")
        }
    };
    let file = summary["config_file"].as_str().map_or(
        "none: defaults, environment and flags".to_owned(),
        str::to_owned,
    );
    let data_dir = format!(
        "{} ({})",
        text("data_dir"),
        if summary["data_dir_exists"] == true {
            "exists"
        } else {
            "made by init or serve"
        }
    );
    let transport = if summary["plaintext"] == true {
        "plaintext".to_owned()
    } else if summary["tls"]["mode"] == "ca" {
        "TLS, CA mode".to_owned()
    } else {
        "TLS, pinned keys".to_owned()
    };
    let master_key = if summary["master_key"]["source"] == "key_file" {
        format!(
            "key file {} ({})",
            summary["master_key"]["key_file"].as_str().unwrap_or("-"),
            if summary["master_key"]["exists"] == true {
                "exists"
            } else {
                "made with a new identity"
            }
        )
    } else {
        crate::identity::sealing::MASTER_KEY_ENV.to_owned()
    };
    let mut lines = vec![
        format!("configuration is valid (file: {file})"),
        format!("data dir:     {data_dir}"),
        format!("listen:       {} ({transport})", text("listen")),
        format!("public URL:   {}", text("public_url")),
        format!("name:         {}", text("instance_name")),
        format!("database:     {}", text("database")),
        format!(
            "redis:        {} (rate limits: {})",
            summary["redis"].as_str().unwrap_or("none"),
            text("rate_limit_storage")
        ),
        format!(
            "metrics:      {}",
            summary["metrics_listen"].as_str().unwrap_or("off")
        ),
        format!("master key:   {master_key}"),
        format!(
            "agent types:  {}",
            list("agent_types", &|name| name
                .as_str()
                .unwrap_or("-")
                .to_owned())
        ),
        format!(
            "webhooks:     {}",
            list("webhook_sources", &|source| format!(
                "{} ({})",
                source["name"].as_str().unwrap_or("-"),
                if source["signed"] == true {
                    "signed"
                } else {
                    "unsigned"
                }
            ))
        ),
    ];
    if let Some(warnings) = summary["warnings"].as_array() {
        lines.extend(
            warnings
                .iter()
                .map(|warning| format!("warning: {}", warning.as_str().unwrap_or("-"))),
        );
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_credentials_and_options() {
        assert_eq!(
            url_without_credentials("postgres://mosaic:hunter2@db.example:5432/mosaic"),
            "postgres://db.example:5432/mosaic (credentials not shown)"
        );
        assert_eq!(
            url_without_credentials("postgres://u:pa/ss@db/x?sslmode=require&password=p2"),
            "postgres://db/x (credentials and options not shown)"
        );
        assert_eq!(
            url_without_credentials("postgres://db/x?password=p2"),
            "postgres://db/x (options not shown)"
        );
        assert_eq!(
            url_without_credentials("sqlite:///var/lib/mosaicd/mosaic.db"),
            "sqlite:///var/lib/mosaicd/mosaic.db"
        );
        assert_eq!(
            url_without_credentials("redis://:s3cret@cache:6379/0"),
            "redis://cache:6379/0 (credentials not shown)"
        );
        assert_eq!(url_without_credentials("hunter2"), "(not a URL)");
    }

    #[test]
    fn programs_are_found_by_path_or_in_path() {
        let path = std::ffi::OsString::from("/usr/bin:/bin");
        assert!(program_exists("/bin/sh", &path));
        assert!(program_exists("sh", &path));
        assert!(!program_exists("no-such-program-here", &path));
        assert!(!program_exists("/no/such/program", &path));
        assert!(!program_exists("sh", std::ffi::OsStr::new("relative/dir")));
    }
}
