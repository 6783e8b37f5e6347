//! The identity check of `mosaicd doctor`: the instance identity opens with
//! the master key, and in CA mode the operator's chain certifies it.

use std::path::Path;

use super::Check;
use super::local::shell_word;
use crate::cli::exit::CliError;
use crate::config::Config;
use crate::identity::IdentityError;
use crate::identity::sealing::SealingError;
use crate::store::Store;
use crate::tls::ca::TlsSettings;

/// Opens the identity with the master key as the daemon does (and, in CA
/// mode, checks that the operator's chain certifies its key).
pub(super) async fn check_identity(config: &Config, store: Option<&Store>) -> Check {
    let Some(store) = store else {
        return Check::skip("identity", "needs the database");
    };
    let source = config.master_key_source();
    let mut manager =
        match crate::identity::IdentityManager::load_existing(store.clone(), &source).await {
            Ok(Some(manager)) => manager,
            Ok(None) => {
                return Check::warn(
                    "identity",
                    "this database has no identity yet",
                    "`mosaicd init` creates it (so does the first `mosaicd serve`)",
                );
            }
            Err(error) => {
                let code = CliError::from_identity(&error, String::new()).code;
                return Check::fail(
                    "identity",
                    code,
                    error.to_string(),
                    identity_hint(&error, config),
                );
            }
        };
    if let Err(error) = manager.enable_ca_mode_if_configured(&config.tls, &config.instance) {
        return Check::fail(
            "identity",
            2,
            format!("{error:#}"),
            Some("tls.cert_chain must certify the instance key: have the CA sign `mosaicd identity csr`".into()),
        );
    }
    let identity = manager.current();
    let key_source = if config.master_key.is_some() {
        crate::identity::sealing::MASTER_KEY_ENV.to_owned()
    } else {
        source.key_file.display().to_string()
    };
    Check::ok(
        "identity",
        format!(
            "{} ({}), key {}, opened with the master key from {key_source}{}",
            identity.profile.name,
            identity.instance_id,
            identity.public_key().fingerprint(),
            if matches!(config.tls, TlsSettings::Ca { .. }) {
                "; tls.cert_chain certifies it"
            } else {
                ""
            }
        ),
    )
}

/// What to do about an identity that did not open.
fn identity_hint(error: &IdentityError, config: &Config) -> Option<String> {
    let key_file = config
        .data_dir
        .join(crate::identity::sealing::MASTER_KEY_FILE);
    match error {
        IdentityError::Sealing(SealingError::WrongKey) if config.master_key.is_some() => Some(format!(
            "MOSAIC_MASTER_KEY is set and wins over {}: it must be the key this database's identity was created with (unset it to use the key file, or set the right key); a new key cannot open this identity",
            key_file.display()
        )),
        IdentityError::Sealing(SealingError::WrongKey) => Some(format!(
            "{} must hold the key this database's identity was created with (restore it, or set MOSAIC_MASTER_KEY); a new key cannot open this identity",
            key_file.display()
        )),
        IdentityError::Sealing(SealingError::KeyFileTooOpen { path }) => {
            Some(format!("chmod 600 {}", shell_word(Path::new(path))))
        }
        IdentityError::Sealing(SealingError::Missing { path }) => Some(format!(
            "set MOSAIC_MASTER_KEY to the key the identity was created with, or restore {path}"
        )),
        IdentityError::Sealing(SealingError::MalformedMasterKey { .. }) => Some(
            "the master key is the base64 of 32 bytes; fix the value (it must be the key the identity was created with)".to_owned(),
        ),
        IdentityError::Store(_) => {
            Some("see the database check; is the schema up to date (`mosaicd migrate`)?".to_owned())
        }
        _ => None,
    }
}
