//! The one rustls crypto provider of the proxy, used by every TLS config
//! and every private-key load (a key loaded by one provider signs for
//! configs built with the same one).

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

/// The crypto provider for all of the proxy's TLS: ring, restricted to the
/// TLS 1.3 AES-GCM suites (the FIPS-friendly set ztunnel uses).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            Arc::new(CryptoProvider {
                cipher_suites: vec![
                    rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
                    rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
                ],
                ..rustls::crypto::ring::default_provider()
            })
        })
        .clone()
}
