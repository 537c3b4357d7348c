//! TLS for the registry's API: one place for the cryptography provider
//! (rustls on aws-lc-rs, as reqwest uses it), the protocol versions, and reading certificates and
//! keys from PEM files, used by the registry's server and by every registry
//! client.
//!
//! A client trusts either the system's roots (the platform verifier, which
//! also honours `SSL_CERT_FILE`) or, when it is given a CA file, only the
//! certificates in that file: a private registry's own CA is pinned rather
//! than added to the hundred-odd public ones.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

pub use rustls;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// How often a server looks at its certificate files for a renewal.
pub const CERTIFICATE_CHECK_INTERVAL: Duration = Duration::from_secs(60);

/// The most certificates read from one PEM file: a chain is a handful, a CA
/// bundle a few hundred.
pub const MAX_PEM_CERTIFICATES: usize = 1_000;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("cannot read {path}: {reason}")]
    Pem {
        /// The file.
        path: String,
        /// What was wrong.
        reason: String,
    },
    /// A certificate file holds no certificate.
    #[error("{0} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate(String),
    /// A certificate file holds more certificates than are read.
    #[error("{path} holds more than {MAX_PEM_CERTIFICATES} certificates")]
    TooManyCertificates {
        /// The file.
        path: String,
    },
    /// rustls refused the certificates or the key (a key that does not
    /// match the certificate, say).
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

/// The cryptography every ferry TLS connection uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn pem_error(path: &Path, error: impl std::fmt::Display) -> TlsError {
    TlsError::Pem { path: path.display().to_string(), reason: error.to_string() }
}

/// The certificates in the PEM file at `path`, in order (a leaf first, then
/// its chain); at least one, at most [`MAX_PEM_CERTIFICATES`].
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let mut certificates = Vec::new();
    for certificate in CertificateDer::pem_file_iter(path).map_err(|e| pem_error(path, e))? {
        if certificates.len() == MAX_PEM_CERTIFICATES {
            return Err(TlsError::TooManyCertificates { path: path.display().to_string() });
        }
        certificates.push(certificate.map_err(|e| pem_error(path, e))?);
    }
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate(path.display().to_string()));
    }
    Ok(certificates)
}

/// A server configuration presenting the chain in `certificate_path` with
/// the private key in `key_path` (PKCS#8, PKCS#1 or SEC1 PEM), and following
/// the files when they are renewed (see [`RenewableCertificate`]). HTTP/1.1
/// only, as the servers are.
pub fn server_config(
    certificate_path: &Path,
    key_path: &Path,
) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_for(RenewableCertificate::load(
        certificate_path,
        key_path,
        CERTIFICATE_CHECK_INTERVAL,
    )?)
}

/// A server configuration presenting `certificate`.
pub fn server_config_for(certificate: RenewableCertificate) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(certificate));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A server certificate that follows its files, so that a renewal (by
/// certbot, say) needs no restart: at most once per check interval, at a
/// handshake, the files' modification times are compared with the loaded
/// ones, and changed files are read again. Files that do not load (half
/// written, a key that does not match) leave the current certificate in
/// use, with a warning, and are tried again at the next check.
pub struct RenewableCertificate {
    certificate_path: PathBuf,
    key_path: PathBuf,
    check_interval: Duration,
    state: Mutex<Loaded>,
}

struct Loaded {
    certified: Arc<CertifiedKey>,
    modified: (Option<SystemTime>, Option<SystemTime>),
    checked: Instant,
}

impl std::fmt::Debug for RenewableCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RenewableCertificate")
            .field("certificate_path", &self.certificate_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl RenewableCertificate {
    /// Loads the files, which must be usable now; checks them for a
    /// renewal every `check_interval`.
    pub fn load(
        certificate_path: &Path,
        key_path: &Path,
        check_interval: Duration,
    ) -> Result<RenewableCertificate, TlsError> {
        let modified = modified(certificate_path, key_path);
        let certified = Arc::new(certified_key(certificate_path, key_path)?);
        Ok(RenewableCertificate {
            certificate_path: certificate_path.to_owned(),
            key_path: key_path.to_owned(),
            check_interval,
            state: Mutex::new(Loaded { certified, modified, checked: Instant::now() }),
        })
    }

    /// The certificate to present now, renewed first if its files changed.
    pub fn current(&self) -> Arc<CertifiedKey> {
        // Held only for a stat and, on a renewal, a read of two small files.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.checked.elapsed() >= self.check_interval {
            state.checked = Instant::now();
            let modified = modified(&self.certificate_path, &self.key_path);
            if modified != state.modified {
                match certified_key(&self.certificate_path, &self.key_path) {
                    Ok(renewed) => {
                        state.certified = Arc::new(renewed);
                        state.modified = modified;
                    }
                    Err(error) => tracing::warn!(
                        %error,
                        "the renewed TLS certificate does not load; the previous one stays in use"
                    ),
                }
            }
        }
        Arc::clone(&state.certified)
    }
}

impl ResolvesServerCert for RenewableCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn modified(certificate_path: &Path, key_path: &Path) -> (Option<SystemTime>, Option<SystemTime>) {
    let of = |path: &Path| std::fs::metadata(path).and_then(|meta| meta.modified()).ok();
    (of(certificate_path), of(key_path))
}

/// The chain and key in these files, checked to belong together.
fn certified_key(certificate_path: &Path, key_path: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = read_certificates(certificate_path)?;
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| pem_error(key_path, e))?;
    Ok(CertifiedKey::from_der(chain, key, &provider())?)
}

/// A client configuration that trusts the system's roots or, given
/// `pinned_roots`, only those.
pub fn client_config(
    pinned_roots: Option<Vec<CertificateDer<'static>>>,
) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let config = match pinned_roots {
        Some(roots) => {
            let mut store = RootCertStore::empty();
            for root in roots {
                store.add(root)?;
            }
            builder.with_root_certificates(store).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(rustls_platform_verifier::Verifier::new(
                provider,
            )?))
            .with_no_client_auth(),
    };
    Ok(config)
}

#[cfg(feature = "test-certificates")]
pub mod testing;
