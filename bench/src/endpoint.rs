//! An HTTP/1.1 endpoint in the bench for what herald calls: its webhook and
//! its connect hook. Over TLS when asked, with a certificate made here for
//! 127.0.0.1 that is its own CA, written to a file herald is told to trust.
//! Keep-alive, one request at a time per connection, bodies framed by
//! `Content-Length`: what herald's client sends.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

/// Largest request body taken.
const MAX_BODY: usize = 64 << 20;

/// One request: its `Herald-Signature` header, if any, and its body.
pub struct Request {
    pub signature: Option<String>,
    pub body: Vec<u8>,
}

/// What a request is answered: a status line's code and reason, and a body.
pub struct Answer {
    pub status: &'static str,
    pub body: Vec<u8>,
}

/// What the endpoint does with requests.
pub trait Handler: Send + Sync + 'static {
    fn answer(&self, request: Request) -> Answer;
    /// A connection failed (a bad request, a TLS handshake herald gave up on).
    fn failed(&self, error: String);
}

/// A listening endpoint; it stops when dropped.
pub struct Endpoint {
    /// `http[s]://127.0.0.1:port`, to which a path is appended.
    pub base: String,
    /// What herald must trust, over TLS.
    pub ca_file: Option<PathBuf>,
    /// Connections herald opened to it so far.
    connections: Arc<AtomicU64>,
    accepting: JoinHandle<()>,
}

impl Endpoint {
    /// Listens on 127.0.0.1, over TLS when `tls`.
    pub async fn start(tls: bool, handler: Arc<dyn Handler>) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("binding an endpoint for herald")?;
        let addr = listener.local_addr()?;
        let (acceptor, ca_file) = match tls {
            true => {
                let (acceptor, ca_file) = self_signed(addr.port())?;
                (Some(acceptor), Some(ca_file))
            }
            false => (None, None),
        };
        let connections = Arc::new(AtomicU64::new(0));
        let accepting = tokio::spawn(accept(listener, acceptor, handler, connections.clone()));
        let scheme = if tls { "https" } else { "http" };
        Ok(Self { base: format!("{scheme}://{addr}"), ca_file, connections, accepting })
    }

    /// Connections herald opened to it so far (each a TLS handshake, over TLS).
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.accepting.abort();
        if let Some(file) = &self.ca_file {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// A certificate for 127.0.0.1, its own CA, written where herald can read it.
fn self_signed(port: u16) -> anyhow::Result<(TlsAcceptor, PathBuf)> {
    let rcgen::CertifiedKey { cert, signing_key } = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()])?;
    let ca_file = std::env::temp_dir().join(format!("herald-bench-endpoint-{}-{port}.pem", std::process::id()));
    std::fs::write(&ca_file, cert.pem()).with_context(|| format!("writing {}", ca_file.display()))?;
    let key = rustls_pki_types::PrivateKeyDer::try_from(signing_key.serialize_der()).map_err(anyhow::Error::msg)?;
    Ok((herald_common::tls::acceptor_for(vec![cert.der().clone()], key, &[])?, ca_file))
}

async fn accept(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: Arc<dyn Handler>,
    connections: Arc<AtomicU64>,
) {
    while let Ok((stream, _)) = listener.accept().await {
        connections.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let (tls, handler) = (tls.clone(), handler.clone());
        tokio::spawn(async move {
            let served = match tls {
                Some(tls) => match tls.accept(stream).await {
                    Ok(stream) => serve(stream, handler.as_ref()).await,
                    Err(e) => Err(anyhow::anyhow!("TLS handshake: {e}")),
                },
                None => serve(stream, handler.as_ref()).await,
            };
            if let Err(e) = served {
                handler.failed(format!("a connection from herald: {e:#}"));
            }
        });
    }
}

/// Answers the requests of one keep-alive connection until it closes.
async fn serve<IO: AsyncRead + AsyncWrite + Unpin>(io: IO, handler: &dyn Handler) -> anyhow::Result<()> {
    let mut reader = BufReader::new(io);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let (mut length, mut signature) = (0usize, None);
        loop {
            line.clear();
            reader.read_line(&mut line).await?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                match name.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().context("content-length")?,
                    "herald-signature" => signature = Some(value.trim().to_owned()),
                    _ => {}
                }
            }
        }
        anyhow::ensure!(length <= MAX_BODY, "a body of {length} bytes");
        let mut body = vec![0; length];
        reader.read_exact(&mut body).await?;
        let answer = handler.answer(Request { signature, body });
        let mut response =
            format!("HTTP/1.1 {}\r\ncontent-length: {}\r\n\r\n", answer.status, answer.body.len()).into_bytes();
        response.extend_from_slice(&answer.body);
        reader.get_mut().write_all(&response).await?;
    }
}
