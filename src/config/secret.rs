//! A secret string in the configuration (a webhook secret, the master key's
//! value): zeroised on drop, never printed.

/// A secret string: zeroised on drop, never printed by `Debug`.
#[derive(Clone)]
pub struct Secret(pub zeroize::Zeroizing<String>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("<redacted>")
    }
}
