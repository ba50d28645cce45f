//! A small HTTP/1.1 client for the endpoints herald calls on its own:
//! webhooks and the connect hook. One target URL, `POST` only, keep-alive
//! connections reused from a small pool, a deadline on every request, and
//! a bounded answer. Plain `http://` only: put a TLS-terminating proxy in
//! front of an `https://` endpoint.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Largest answer body read, in bytes.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Idle connections kept for reuse.
const MAX_IDLE: usize = 16;

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum PostError {
    #[error("URL {url:?} is not usable: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    #[error("connecting: {0}")]
    Connect(std::io::Error),
    #[error("HTTP: {0}")]
    Http(String),
}

/// An answer: its status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

/// POSTs to one URL.
pub struct HttpPoster {
    /// `host:port`, to connect to and for the `Host` header.
    authority: String,
    /// The path and query.
    path: String,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

impl std::fmt::Debug for HttpPoster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HttpPoster(http://{}{})", self.authority, self.path)
    }
}

impl HttpPoster {
    /// A client for `url` (`http://host[:port][/path]`).
    pub fn new(url: &str) -> Result<Self, PostError> {
        let bad = |reason: &str| PostError::BadUrl { url: url.to_owned(), reason: reason.to_owned() };
        let uri: hyper::Uri = url.parse().map_err(|e: hyper::http::uri::InvalidUri| bad(&e.to_string()))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => return Err(bad("https is not supported: use http, behind a TLS proxy if needed")),
            _ => return Err(bad("it must start with http://")),
        }
        let host = uri.host().ok_or_else(|| bad("it has no host"))?;
        let port = uri.port_u16().unwrap_or(80);
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        Ok(Self { authority: format!("{host}:{port}"), path, idle: Mutex::default() })
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn only_plain_http_urls_are_taken() {
        assert!(HttpPoster::new("http://127.0.0.1:8080/hook?x=1").is_ok());
        for bad in ["https://example.test/", "ftp://x/", "not a url", "/just/a/path"] {
            assert!(HttpPoster::new(bad).is_err(), "{bad}");
        }
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
        let poster = HttpPoster::new(&url).unwrap();
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
        let poster = HttpPoster::new(&format!("http://{}/", listener.local_addr().unwrap())).unwrap();
        let answer = poster.post(Bytes::new(), &[], Duration::from_millis(100)).await;
        assert!(matches!(answer, Err(PostError::TimedOut(_))), "{answer:?}");
    }
}
