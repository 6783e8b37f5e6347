//! The offline checks of `mosaicd doctor`: the configuration and the data
//! dir's permissions.

use std::path::{Path, PathBuf};

use super::Check;
use crate::cli::config::url_without_credentials;
use crate::config::Config;
use crate::tls::ca::TlsSettings;

/// The configuration resolved (that it loaded at all is the main finding),
/// and the CA-mode files, which `serve` reads at start.
pub(super) fn check_config(config: &Config, file: Option<&Path>) -> Check {
    if let TlsSettings::Ca {
        cert_chain,
        ca_bundle,
    } = &config.tls
        && let Err(error) = crate::tls::ca::CaTrust::load(cert_chain, ca_bundle)
    {
        return Check::fail(
            "config",
            2,
            error.to_string(),
            Some("fix tls.cert_chain / tls.ca_bundle; `mosaicd config check` says the same".into()),
        );
    }
    let source = file.map_or_else(
        || "no file (defaults, environment, flags)".to_owned(),
        |path| path.display().to_string(),
    );
    let transport = match (&config.tls, config.plaintext) {
        (_, true) => "plaintext",
        (TlsSettings::Ca { .. }, false) => "TLS, CA mode",
        (TlsSettings::Pinned, false) => "TLS, pinned keys",
    };
    Check::ok(
        "config",
        format!(
            "{source}; listen {} ({transport}), database {}",
            config.listen,
            url_without_credentials(&config.database_url)
        ),
    )
}

/// The SQLite file of `config`, if the database is SQLite.
pub(super) fn sqlite_path(config: &Config) -> Option<&Path> {
    config.database_url.strip_prefix("sqlite://").map(Path::new)
}

/// The data dir must exist as a directory this user can read; it should be
/// 0700 (as `create_data_dir` makes it) and the database and master key file
/// 0600 (as the store and the sealing module create them). Looser modes are
/// warnings with the `chmod` that fixes them; the daemon itself refuses only
/// a master key file others can read (the identity check says so).
pub(super) fn check_data_dir(config: &Config) -> Check {
    use std::os::unix::fs::PermissionsExt as _;
    let directory = &config.data_dir;
    let shown = directory.display();
    match std::fs::metadata(directory) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Check::warn(
                "data_dir",
                format!("{shown} does not exist yet"),
                "`mosaicd init` (or the first `mosaicd serve`) creates it with mode 0700; or pass the daemon's --data-dir / MOSAIC_DATA_DIR",
            );
        }
        Err(error) => {
            return Check::fail(
                "data_dir",
                4,
                format!("cannot read {shown}: {error}"),
                Some("run doctor as the user the daemon runs as (e.g. `sudo -u mosaicd mosaicd doctor`)".into()),
            );
        }
        Ok(metadata) if !metadata.is_dir() => {
            return Check::fail(
                "data_dir",
                2,
                format!("{shown} is not a directory"),
                Some("point --data-dir / MOSAIC_DATA_DIR at the daemon's data directory".into()),
            );
        }
        Ok(_) => {}
    }
    if let Err(error) = std::fs::read_dir(directory) {
        return Check::fail(
            "data_dir",
            4,
            format!("cannot list {shown}: {error}"),
            Some(
                "run doctor as the user the daemon runs as (e.g. `sudo -u mosaicd mosaicd doctor`)"
                    .into(),
            ),
        );
    }
    let mut private_files: Vec<PathBuf> = Vec::new();
    if let Some(database) = sqlite_path(config) {
        private_files.push(database.to_path_buf());
        for suffix in ["-wal", "-shm"] {
            let mut name = database.as_os_str().to_owned();
            name.push(suffix);
            private_files.push(PathBuf::from(name));
        }
    }
    private_files.push(directory.join(crate::identity::sealing::MASTER_KEY_FILE));

    let mode_of = |path: &Path| {
        std::fs::metadata(path)
            .ok()
            .map(|metadata| metadata.permissions().mode() & 0o777)
    };
    let mut findings = Vec::new();
    let mut fixes = Vec::new();
    if let Some(mode) = mode_of(directory)
        && mode & 0o077 != 0
    {
        findings.push(format!(
            "{shown} is open to other users (mode {mode:04o}, want 0700)"
        ));
        fixes.push(format!("chmod 700 {}", shell_word(directory)));
    }
    let mut checked = Vec::new();
    for path in &private_files {
        let Some(mode) = mode_of(path) else {
            continue;
        };
        checked.push(path.file_name().map_or_else(
            || path.display().to_string(),
            |name| name.to_string_lossy().into_owned(),
        ));
        if mode & 0o077 != 0 {
            findings.push(format!(
                "{} is readable by other users (mode {mode:04o}, want 0600)",
                path.display()
            ));
            fixes.push(format!("chmod 600 {}", shell_word(path)));
        }
    }
    if !findings.is_empty() {
        return Check::warn("data_dir", findings.join("; "), fixes.join(" && "));
    }
    let mut private = vec![format!("{shown} 0700")];
    private.extend(checked.iter().map(|name| format!("{name} 0600")));
    Check::ok("data_dir", format!("private: {}", private.join(", ")))
}

/// `path` as one shell word, quoted when it needs to be.
pub(super) fn shell_word(path: &Path) -> String {
    let text = path.display().to_string();
    if text
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+:@%,".contains(c))
    {
        text
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_quoted_for_the_shell_when_they_need_it() {
        assert_eq!(
            shell_word(Path::new("/var/lib/mosaicd/mosaic.db")),
            "/var/lib/mosaicd/mosaic.db"
        );
        assert_eq!(
            shell_word(Path::new("/tmp/it's here/mosaic.db")),
            r"'/tmp/it'\''s here/mosaic.db'"
        );
    }
}
