//! The one crypto provider rustls uses here: ring (see STACK-NOTES trap 3).

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The process-wide crypto provider. Only ring is linked (see STACK-NOTES trap 3).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as rustls' default provider. Safe to call more than once.
pub fn install_default_provider() {
    // An error means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
