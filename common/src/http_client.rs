//! A small HTTP/1.1 client for the endpoints herald calls on its own:
//! webhooks and the connect hook. One target URL, `POST` only, keep-alive
//! connections reused from a small pool, a deadline on every request, and
//! a bounded answer. `https://` endpoints are verified against the system's
//! CA certificates, or against a CA of the operator's ([`Trust`]).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Largest answer body read, in bytes.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Idle connections kept for reuse. A connect hook is asked once per
/// handshake, many at once in a burst: with 16, a burst past them opened
/// new connections (and TLS handshakes) all the time, 350–1,460 per 25,000
/// asks at 5,000 connects/s, against about 100 with 128 (BENCHMARKS, "The
/// connect hook").
const MAX_IDLE: usize = 128;

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum PostError {
    #[error("URL {url:?} is not usable: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    #[error("connecting: {0}")]
    Connect(std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Http(String),
}

/// An answer: its status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

/// Whom the certificate of an `https://` endpoint must chain to.
#[derive(Debug, Clone, Default)]
pub enum Trust {
    /// The CA certificates of the operating system.
    #[default]
    System,
    /// These CA certificates only (an operator's own CA).
    Only(RootCertStore),
}

impl Trust {
    fn roots(&self) -> Result<RootCertStore, String> {
        match self {
            Trust::Only(roots) => Ok(roots.clone()),
            Trust::System => {
                let found = rustls_native_certs::load_native_certs();
                for error in &found.errors {
                    tracing::debug!(%error, "a system CA certificate could not be read");
                }
                let mut roots = RootCertStore::empty();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err("this system has no CA certificates to verify it with: give the CA to trust".into());
                }
                Ok(roots)
            }
        }
    }
}

/// How an `https://` endpoint is reached.
struct Tls {
    connector: TlsConnector,
    name: ServerName<'static>,
}

/// POSTs to one URL.
pub struct HttpPoster {
    /// `host:port`, to connect to and for the `Host` header.
    authority: String,
    /// The path and query.
    path: String,
    /// `None` for `http://`.
    tls: Option<Tls>,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

impl std::fmt::Debug for HttpPoster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        write!(f, "HttpPoster({scheme}://{}{})", self.authority, self.path)
    }
}

impl HttpPoster {
    /// A client for `url` (`http[s]://host[:port][/path]`), verifying an
    /// `https://` endpoint's certificate against `trust`.
    pub fn new(url: &str, trust: &Trust) -> Result<Self, PostError> {
        let bad = |reason: &str| PostError::BadUrl { url: url.to_owned(), reason: reason.to_owned() };
        let uri: hyper::Uri = url.parse().map_err(|e: hyper::http::uri::InvalidUri| bad(&e.to_string()))?;
        let secure = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(bad("it must start with http:// or https://")),
        };
        let host = uri.host().ok_or_else(|| bad("it has no host"))?;
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let tls = if secure {
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            let name = ServerName::try_from(bare.to_owned()).map_err(|e| bad(&e.to_string()))?;
            let roots = trust.roots().map_err(|reason| bad(&reason))?;
            let mut config = crate::tls::client_builder(roots).map_err(|e| bad(&e.to_string()))?.with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some(Tls { connector: TlsConnector::from(Arc::new(config)), name })
        } else {
            if !crate::net::is_loopback_host(host) {
                tracing::warn!(url, "what herald POSTs there travels in clear, off this machine: use https://");
            }
            None
        };
        Ok(Self { authority: format!("{host}:{port}"), path, tls, idle: Mutex::default() })
    }

    /// POSTs `body` with `headers`, and reads the answer, all within `timeout`.
    pub async fn post(&self, body: Bytes, headers: &[(&str, &str)], timeout: Duration) -> Result<Answer, PostError> {
        tokio::time::timeout(timeout, self.exchange(body, headers)).await.map_err(|_| PostError::TimedOut(timeout))?
    }

    async fn exchange(&self, body: Bytes, headers: &[(&str, &str)]) -> Result<Answer, PostError> {
        let mut sender = match self.take_idle() {
            Some(sender) => sender,
            None => self.connect().await?,
        };
        let mut request = hyper::Request::post(self.path.as_str())
            .header(hyper::header::HOST, self.authority.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(body)).map_err(|e| PostError::Http(e.to_string()))?;
        let response = sender.send_request(request).await.map_err(|e| PostError::Http(e.to_string()))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| PostError::Http(format!("reading the answer: {e}")))?
            .to_bytes();
        self.put_idle(sender);
        Ok(Answer { status, body })
    }

    fn take_idle(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(sender) = idle.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    fn put_idle(&self, sender: SendRequest<Full<Bytes>>) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE && !sender.is_closed() {
            idle.push(sender);
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, PostError> {
        let stream = TcpStream::connect(self.authority.as_str()).await.map_err(PostError::Connect)?;
        let _ = stream.set_nodelay(true);
        match &self.tls {
            None => handshake(stream).await,
            Some(tls) => {
                let stream =
                    tls.connector.connect(tls.name.clone(), stream).await.map_err(|e| PostError::Tls(e.to_string()))?;
                handshake(stream).await
            }
        }
    }
}

/// Starts HTTP/1.1 on `stream`; its connection runs in a task of its own.
async fn handshake<S>(stream: S) -> Result<SendRequest<Full<Bytes>>, PostError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| PostError::Http(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "HTTP client connection ended");
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A CA named `ca`, and an acceptor presenting a certificate for
    /// 127.0.0.1 it signed.
    fn signed_for_loopback(ca: &str) -> (RootCertStore, tokio_rustls::TlsAcceptor) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, ca);
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap().signed_by(&key, &ca).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let private = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        (roots, crate::tls::acceptor_for(vec![cert.der().clone()], private, &[]).unwrap())
    }

    /// Answers one request on each TLS connection with 200 `ok`; returns
    /// the URL and what each handshake came to.
    async fn https_endpoint(
        acceptor: tokio_rustls::TlsAcceptor,
    ) -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}/hook", listener.local_addr().unwrap());
        let (seen, handshakes) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                match acceptor.accept(socket).await {
                    Ok(mut tls) => {
                        let mut buf = vec![0u8; 4096];
                        let n = tls.read(&mut buf).await.unwrap();
                        let _ = seen.send(String::from_utf8_lossy(&buf[..n]).into_owned());
                        tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.unwrap();
                    }
                    Err(e) => {
                        let _ = seen.send(format!("refused: {e}"));
                    }
                }
            }
        });
        (url, handshakes)
    }

    #[test]
    fn http_and_https_urls_are_taken_and_nothing_else() {
        let poster = HttpPoster::new("http://127.0.0.1:8080/hook?x=1", &Trust::default()).unwrap();
        assert_eq!(format!("{poster:?}"), "HttpPoster(http://127.0.0.1:8080/hook?x=1)");
        let only = Trust::Only(signed_for_loopback("test CA").0);
        let poster = HttpPoster::new("https://hooks.example.test/in", &only).unwrap();
        assert_eq!(format!("{poster:?}"), "HttpPoster(https://hooks.example.test:443/in)");
        for bad in ["ftp://x/", "not a url", "/just/a/path", "https:///nohost"] {
            assert!(HttpPoster::new(bad, &only).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn an_https_endpoint_signed_by_the_trusted_ca_is_posted_to() {
        let (roots, server) = signed_for_loopback("test CA");
        let (url, mut seen) = https_endpoint(server).await;
        let poster = HttpPoster::new(&url, &Trust::Only(roots)).unwrap();
        let answer = poster.post(Bytes::from_static(b"{}"), &[("x-test", "1")], Duration::from_secs(5)).await;
        assert_eq!(answer.unwrap(), Answer { status: 200, body: Bytes::from_static(b"ok") });
        let request = seen.recv().await.unwrap();
        assert!(request.starts_with("POST /hook HTTP/1.1") && request.contains("x-test: 1"), "{request}");
    }

    #[tokio::test]
    async fn an_https_endpoint_the_ca_did_not_sign_is_refused_and_sent_nothing() {
        let (_, server) = signed_for_loopback("test CA");
        let (url, mut seen) = https_endpoint(server).await;
        let stranger = signed_for_loopback("stranger CA").0;
        let poster = HttpPoster::new(&url, &Trust::Only(stranger)).unwrap();
        let answer = poster.post(Bytes::from_static(b"secret"), &[], Duration::from_secs(5)).await;
        let Err(PostError::Tls(why)) = answer else { panic!("refused by TLS: {answer:?}") };
        assert!(why.contains("UnknownIssuer"), "{why}");
        assert!(seen.recv().await.unwrap().starts_with("refused"), "the endpoint got no request");
    }

    #[tokio::test]
    async fn a_post_reads_the_answer_and_reuses_its_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            for _ in 0..2 {
                let mut buf = vec![0u8; 4096];
                let n = socket.read(&mut buf).await.unwrap();
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                socket.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.unwrap();
            }
            seen
        });
        let poster = HttpPoster::new(&url, &Trust::default()).unwrap();
        for _ in 0..2 {
            let answer = poster.post(Bytes::from_static(b"{}"), &[("x-test", "1")], Duration::from_secs(5)).await;
            assert_eq!(answer.unwrap(), Answer { status: 200, body: Bytes::from_static(b"ok") });
        }
        let seen = server.await.unwrap();
        assert!(seen[0].starts_with("POST /hook HTTP/1.1") && seen[0].contains("x-test: 1"), "{}", seen[0]);
    }

    #[tokio::test]
    async fn an_endpoint_that_does_not_answer_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let poster =
            HttpPoster::new(&format!("http://{}/", listener.local_addr().unwrap()), &Trust::default()).unwrap();
        let answer = poster.post(Bytes::new(), &[], Duration::from_millis(100)).await;
        assert!(matches!(answer, Err(PostError::TimedOut(_))), "{answer:?}");
    }
}
