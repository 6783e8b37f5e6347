//! Why a configuration is unusable: the one error every settings module
//! returns, each message naming the key. A leaf: the settings modules import
//! it without importing the configuration tree that holds them.

/// Why the configuration is unusable. Each message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this tree.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong (TOML's message names the key and line).
        message: String,
    },
    /// A value is out of range or contradicts another.
    #[error("invalid configuration value for `{key}`: {message}")]
    Invalid {
        /// The key (file key / flag / variable).
        key: &'static str,
        /// What is wrong and what to do.
        message: String,
    },
}

/// The error of an invalid value of `key`.
pub(crate) fn invalid(key: &'static str, message: String) -> ConfigError {
    ConfigError::Invalid { key, message }
}
