//! Fuzz target: configuration as the daemon reads it at start — TOML file text,
//! `MOSAIC_*` environment variables (read by clap, exactly as `mosaicd serve`
//! reads them) and the webhook secret overrides — through `config::parse_file`,
//! `Config::resolve` and `apply_secret_overrides`. Bad input must be an error
//! naming the key, never a panic.
#![no_main]
#![forbid(unsafe_code)]

use arbitrary::Arbitrary;
use clap::Parser;
use libfuzzer_sys::fuzz_target;
use mosaic_mesh::config::{self, Config, ConfigArgs};
use mosaic_mesh::ratelimit::settings as rate;

/// The variables clap reads into `ConfigArgs` (`MOSAIC_CONFIG` is left out: it
/// names a file to read, and the file's text is fuzzed directly).
const VARIABLES: [&str; 20] = [
    config::ENV_DATA_DIR,
    config::ENV_LISTEN,
    config::ENV_DATABASE_URL,
    config::ENV_REDIS_URL,
    config::ENV_PLAINTEXT,
    config::ENV_INSTANCE_NAME,
    config::ENV_PUBLIC_URL,
    config::ENV_METRICS_LISTEN,
    rate::ENV_TTL,
    rate::ENV_GLOBAL_LIMIT,
    rate::ENV_WEBHOOK_LIMIT,
    rate::ENV_COORDINATOR_LIMIT,
    rate::ENV_HEALTH_LIMIT,
    rate::ENV_FEDERATION_LIMIT,
    rate::ENV_STORAGE,
    rate::ENV_SHADOW,
    rate::ENV_REPLICAS,
    rate::ENV_TRUSTED_PROXIES,
    rate::ENV_REDIS_TIMEOUT_MS,
    rate::ENV_REDIS_PREFIX,
];

/// `mosaicd`'s global flags alone, as `serve` flattens them.
#[derive(Parser, Debug)]
struct Flags {
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Arbitrary, Debug)]
struct Input {
    toml: String,
    /// (index into VARIABLES, value).
    environment: Vec<(u8, String)>,
    /// Webhook secret variables by source name.
    secrets: Vec<(String, String)>,
}

/// Sets a variable. `std::env::set_var` is a safe function in edition 2021,
/// which this crate uses for that reason: libFuzzer runs one input at a time on
/// one thread, so nothing reads the environment while it changes.
fn set(name: &str, value: &str) {
    std::env::set_var(name, value);
}

/// Removes a variable (see [`set`]).
fn remove(name: &str) {
    std::env::remove_var(name);
}

fuzz_target!(|input: Input| {
    // The environment is the process's own: set only our variables, and clear
    // them again, so each run sees only its input (libFuzzer runs one input at a
    // time on one thread).
    for name in VARIABLES {
        remove(name);
    }
    for (index, value) in &input.environment {
        if value.contains('\0') || value.is_empty() {
            continue;
        }
        set(VARIABLES[usize::from(*index) % VARIABLES.len()], value);
    }
    let parsed = Flags::try_parse_from(["mosaicd"]);
    for name in VARIABLES {
        remove(name);
    }
    let Ok(flags) = parsed else {
        return;
    };
    let file = match config::parse_file(&input.toml) {
        Ok(file) => file,
        Err(message) => {
            assert!(!message.is_empty());
            return;
        }
    };
    let Ok(mut resolved) = Config::resolve(file, &flags.config) else {
        return;
    };
    let secrets: std::collections::BTreeMap<String, String> = input.secrets.into_iter().collect();
    resolved
        .coordinator
        .apply_secret_overrides(|name| secrets.get(name).cloned());
    // What the daemon derives from a resolved config next.
    let _ = resolved.master_key_source();
    let _ = resolved.certificate_path();
    assert!(resolved.agents.max_concurrent >= 1);
    if resolved.plaintext {
        assert!(resolved.listen.ip().is_loopback());
    }
});
