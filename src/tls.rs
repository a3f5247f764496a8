//! TLS on the listener (rustls): a certificate chain and a key read from PEM files. The
//! files are looked at again at most once a second, at a handshake: a renewed certificate
//! (certbot, cert-manager, a mounted Secret) is served from the next connection on, without a
//! restart. A renewal that cannot be read is logged and the certificate in use stays.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio_rustls::rustls;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

/// How often the files are looked at, at most.
const RECHECK: Duration = Duration::from_secs(1);

/// The certificate and key files, and what was last read from them.
#[derive(Debug)]
pub struct CertFiles {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<rustls::crypto::CryptoProvider>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    current: Arc<CertifiedKey>,
    stamps: (Option<SystemTime>, Option<SystemTime>),
    checked: Instant,
    failing: bool,
}

fn stamp(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Reads a chain and its key; the error says which file and why.
pub fn load(
    cert: &Path,
    key: &Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in it", cert.display()));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(|e| {
        format!(
            "{} does not belong to {}: {e}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(ck)
}

impl CertFiles {
    /// Reads the files once; fails if they cannot be used.
    pub fn open(cert: &Path, key: &Path) -> Result<Arc<CertFiles>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let current = Arc::new(load(cert, key, &provider)?);
        Ok(Arc::new(CertFiles {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            provider,
            state: Mutex::new(State {
                current,
                stamps: (stamp(cert), stamp(key)),
                checked: Instant::now(),
                failing: false,
            }),
        }))
    }

    /// The server's TLS config: HTTP/1.1, the certificate from these files.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, String> {
        let mut c = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(c))
    }

    /// The certificate to present, read again if the files changed.
    fn current(&self) -> Arc<CertifiedKey> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.checked.elapsed() >= RECHECK {
            s.checked = Instant::now();
            let stamps = (stamp(&self.cert), stamp(&self.key));
            if stamps != s.stamps {
                match load(&self.cert, &self.key, &self.provider) {
                    Ok(ck) => {
                        s.current = Arc::new(ck);
                        s.stamps = stamps;
                        s.failing = false;
                        tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                    }
                    Err(e) => {
                        // A renewal written in two steps may be half there: try again at
                        // the next check, and say so once.
                        if !s.failing {
                            tracing::warn!(error = %e, "cannot read the renewed TLS certificate; the current one stays");
                        }
                        s.failing = true;
                    }
                }
            }
        }
        s.current.clone()
    }
}

impl ResolvesServerCert for CertFiles {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}
