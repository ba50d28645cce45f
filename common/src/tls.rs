//! TLS with rustls and the `ring` provider, from PEM files: acceptors for
//! the public listeners (`wss://` and HTTPS), and the files of the links
//! between roles (gRPC to a broker, NATS), read and checked here at start-up
//! so that a wrong file is named in one clear line, never found out at the
//! first connection.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WantsClientCert;
use rustls::{ClientConfig, ConfigBuilder, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// Why TLS could not be set up. Each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS certificate {path}: {reason}")]
    Certificate { path: PathBuf, reason: String },
    #[error("TLS private key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("TLS CA certificate {path}: {reason}")]
    Authority { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// ALPN protocols of an HTTP listener.
pub const ALPN_HTTP: &[&[u8]] = &[b"h2", b"http/1.1"];
/// ALPN protocols of a WebSocket listener (the upgrade is HTTP/1.1 only).
pub const ALPN_WEBSOCKET: &[&[u8]] = &[b"http/1.1"];

/// Builds an acceptor from PEM files, offering `alpn`.
pub fn acceptor(cert: &Path, key: &Path, alpn: &[&[u8]]) -> Result<TlsAcceptor, TlsError> {
    let (chain, key) = Identity::load(cert, key)?.into_parts();
    acceptor_for(chain, key, alpn)
}

/// Builds an acceptor presenting `chain` and its `key`, offering `alpn`.
pub fn acceptor_for(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[&[u8]],
) -> Result<TlsAcceptor, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its private key, read from PEM files.
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// The files as read, for libraries that take PEM.
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl Identity {
    /// Reads both files and checks that the key is the certificate's.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let bad_cert = |reason: String| TlsError::Certificate { path: cert.to_owned(), reason };
        let cert_pem = std::fs::read(cert).map_err(|e| bad_cert(e.to_string()))?;
        let chain = certificates(&cert_pem).map_err(bad_cert)?;
        let bad_key = |reason: String| TlsError::Key { path: key.to_owned(), reason };
        let key_pem = std::fs::read(key).map_err(|e| bad_key(e.to_string()))?;
        let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| bad_key(e.to_string()))?;
        let signing =
            provider().key_provider.load_private_key(private.clone_key()).map_err(|e| bad_key(e.to_string()))?;
        // A provider that cannot tell a key's public half says Unknown:
        // only a proven mismatch is refused.
        if let Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) =
            rustls::sign::CertifiedKey::new(chain.clone(), signing).keys_match()
        {
            return Err(bad_key(format!("is not the key of the certificate in {}", cert.display())));
        }
        Ok(Identity { chain, key: private, cert_pem, key_pem })
    }

    /// The certificate chain and the key, for a rustls configuration.
    pub fn into_parts(self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (self.chain, self.key)
    }
}

/// CA certificates that peers' certificates must chain to, read from a PEM file.
pub struct Authority {
    roots: RootCertStore,
    /// The file as read, for libraries that take PEM.
    pub pem: Vec<u8>,
}

impl Authority {
    pub fn load(path: &Path) -> Result<Self, TlsError> {
        let bad = |reason: String| TlsError::Authority { path: path.to_owned(), reason };
        let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let mut roots = RootCertStore::empty();
        for cert in certificates(&pem).map_err(bad)? {
            roots.add(cert).map_err(|e| bad(e.to_string()))?;
        }
        Ok(Authority { roots, pem })
    }

    /// The trusted certificates.
    pub fn roots(&self) -> RootCertStore {
        self.roots.clone()
    }
}

/// How a role reaches a TLS server it depends on (a broker, NATS): the CA
/// it trusts, and the certificate it presents when the server asks for one.
pub struct ClientTls {
    pub authority: Authority,
    pub identity: Option<Identity>,
}

impl ClientTls {
    pub fn load(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Self, TlsError> {
        Ok(ClientTls {
            authority: Authority::load(ca)?,
            identity: identity.map(|(cert, key)| Identity::load(cert, key)).transpose()?,
        })
    }

    /// A rustls client configuration trusting only the authority.
    pub fn client_config(&self) -> Result<ClientConfig, TlsError> {
        let builder = client_builder(self.authority.roots.clone())?;
        Ok(match &self.identity {
            Some(identity) => builder.with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())?,
            None => builder.with_no_client_auth(),
        })
    }
}

/// A client configuration trusting `roots`, still to be told which
/// certificate (if any) it presents.
pub fn client_builder(roots: RootCertStore) -> Result<ConfigBuilder<ClientConfig, WantsClientCert>, TlsError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots))
}

fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
    if chain.is_empty() {
        return Err("no certificate in the file".into());
    }
    Ok(chain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_empty_files_are_named_in_the_error() {
        let missing = Path::new("/nonexistent/herald-cert.pem");
        let err = acceptor(missing, missing, ALPN_HTTP).err().expect("no such file");
        assert!(err.to_string().contains("/nonexistent/herald-cert.pem"), "{err}");
        let empty = std::env::temp_dir().join(format!("herald-empty-{}.pem", std::process::id()));
        std::fs::write(&empty, "").unwrap();
        let err = acceptor(&empty, &empty, ALPN_HTTP).err().expect("empty file");
        assert!(err.to_string().contains("no certificate"), "{err}");
        let _ = std::fs::remove_file(empty);
    }
}
