//! TLS on the broker's gRPC port, optionally mutual: callers (gateways,
//! publishers, backends) must then present a certificate signed by a
//! configured CA.
//!
//! Handshakes are done here rather than by tonic, each in its own task with a
//! deadline, so that a refused one is logged at `warn` with its peer and
//! reason and counted (`herald_broker_tls_handshake_failures_total`): an
//! operator sees a gateway with the wrong certificate at once.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use herald_common::tls::{Authority, Identity, TlsError};
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::hub::Hub;

/// How long a caller may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes under way at once; more connections wait to be accepted.
const CONCURRENT_HANDSHAKES: usize = 256;
/// Finished handshakes waiting for the gRPC server to take them.
const READY_QUEUE: usize = 64;

/// TLS for the gRPC server: its identity and, for mutual TLS, the CA that
/// callers' certificates must chain to.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: TlsAcceptor,
    mutual: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("mutual", &self.mutual).finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads the certificate, its key and the optional client CA, naming the
    /// file at fault when one is wrong.
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Self, TlsError> {
        let identity = Identity::load(cert, key)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
        let builder = match client_ca {
            Some(path) => {
                let authority = Authority::load(path)?;
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(authority.roots()), provider)
                    .build()
                    .map_err(|e| TlsError::Authority { path: path.to_owned(), reason: e.to_string() })?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let (chain, private) = identity.into_parts();
        let mut config = builder.with_single_cert(chain, private)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(ServerTls { acceptor: TlsAcceptor::from(Arc::new(config)), mutual: client_ca.is_some() })
    }

    /// Whether callers must present a certificate.
    pub fn is_mutual(&self) -> bool {
        self.mutual
    }

    /// The connections of `listener` that completed a handshake. Accepting
    /// stops when the stream is dropped.
    pub(crate) fn incoming(
        &self,
        listener: TcpListener,
        hub: Hub,
    ) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
        let (ready, stream) = mpsc::channel(READY_QUEUE);
        tokio::spawn(accept(listener, self.acceptor.clone(), hub, ready));
        ReceiverStream::new(stream)
    }
}

async fn accept(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    hub: Hub,
    ready: mpsc::Sender<std::io::Result<TlsStream<TcpStream>>>,
) {
    let handshakes = Arc::new(Semaphore::new(CONCURRENT_HANDSHAKES));
    loop {
        let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
        let accepted = tokio::select! {
            () = ready.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, or a connection reset before it was
                // taken: neither ends the server.
                tracing::warn!(error = %e, "gRPC accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, hub, ready) = (acceptor.clone(), hub.clone(), ready.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match handshake(&acceptor, tcp).await {
                Ok(tls) => {
                    let _ = ready.send(Ok(tls)).await;
                }
                Err(reason) => refused(&hub, peer, &reason),
            }
        });
    }
}

async fn handshake(acceptor: &TlsAcceptor, tcp: TcpStream) -> Result<TlsStream<TcpStream>, String> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no handshake within {HANDSHAKE_TIMEOUT:?}")),
    }
}

fn refused(hub: &Hub, peer: SocketAddr, reason: &str) {
    hub.count_tls_handshake_failure();
    tracing::warn!(%peer, reason, "gRPC TLS handshake failed");
}
