//! The HTTP/1.1 and HTTP/2 server loop shared by the HTTP gateway and the
//! admin endpoints, in clear or over TLS: per-connection header-read timeouts (which also bound
//! idle keep-alive connections and defeat slowloris clients), a cap on
//! connections with a clear refusal past it, and graceful shutdown that lets
//! in-flight requests finish.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::refusals::WithReasons;

/// Timeouts of an HTTP server.
#[derive(Debug, Clone)]
pub struct HttpServerOptions {
    /// Longest time a client may take to send a request's headers, counted
    /// from when the connection is ready for the next request (so it is also
    /// the idle keep-alive timeout).
    pub header_read_timeout: Duration,
    /// How long shutdown waits for in-flight requests.
    pub drain_timeout: Duration,
    /// Most connections at once; past it a connection is answered 503 and
    /// closed.
    pub max_connections: usize,
    /// Whether connections also count against the process's budget of
    /// client connections ([`crate::net::connection_slot`]). The admin
    /// endpoints do not: they live on the descriptors that budget keeps free.
    pub client_facing: bool,
}

/// How long a client may take to send request headers, by default.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown waits for in-flight requests, by default.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections of a client-facing HTTP listener, by default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;

impl Default for HttpServerOptions {
    fn default() -> Self {
        Self {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            client_facing: true,
        }
    }
}

/// A connection's places: in the listener's cap, and in the process's
/// budget for client-facing listeners.
struct Admission {
    _listener: OwnedSemaphorePermit,
    _process: Option<crate::net::ConnectionSlot>,
}

/// Admits one more connection, or says why not.
fn admit(listener: &Arc<Semaphore>, options: &HttpServerOptions) -> Result<Admission, String> {
    let permit = listener
        .clone()
        .try_acquire_owned()
        .map_err(|_| format!("too many connections: this listener serves at most {}", options.max_connections))?;
    let slot =
        if options.client_facing { Some(crate::net::connection_slot().ok_or(crate::net::NO_SLOT_LEFT)?) } else { None };
    Ok(Admission { _listener: permit, _process: slot })
}

/// Answers a connection that cannot be served with 503 and `reason`, and
/// closes it at once: in the accept loop, without waiting, so that refusals
/// never hold descriptors. Over TLS there is no plain answer to give. Both
/// the HTTP and the WebSocket listeners refuse this way.
pub fn refuse(stream: TcpStream, reason: &str, tls: bool) {
    if !tls {
        let _ = stream.try_write(plain_answer(503, reason, &["retry-after: 1"]).as_bytes());
    }
}

/// A whole HTTP/1.1 answer for a connection about to close: `status`, the
/// header lines `headers` (`Name: value`), and `reason` on one line as the
/// body. Every refusal herald writes by hand is shaped by this.
pub fn plain_answer(status: u16, reason: &str, headers: &[&str]) -> String {
    let phrase = axum::http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
    let body = format!("{}\n", reason.replace(['\r', '\n'], " "));
    let mut answer = format!(
        "HTTP/1.1 {status} {phrase}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n\
         connection: close\r\n",
        body.len()
    );
    for header in headers {
        answer.push_str(header);
        answer.push_str("\r\n");
    }
    answer + "\r\n" + &body
}

/// Serves `app` on `listener` (over TLS when `tls` is given) until
/// `shutdown`, then stops accepting and waits (up to the drain timeout) for
/// in-flight requests.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    options: HttpServerOptions,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(options.header_read_timeout).keep_alive(true);
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(Some(Duration::from_secs(20)));
    let graceful = GracefulShutdown::new();
    let capacity = Arc::new(Semaphore::new(options.max_connections.max(1)));
    loop {
        let (stream, _peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let admission = match admit(&capacity, &options) {
            Ok(admission) => admission,
            Err(reason) => {
                tracing::debug!(reason, "refusing an HTTP connection");
                refuse(stream, &reason, tls.is_some());
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let builder = builder.clone();
        let app = app.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let handshake_timeout = options.header_read_timeout;
        tokio::spawn(async move {
            let result = match tls {
                None => serve_connection(&builder, watcher, WithReasons::new(stream), app).await,
                Some(acceptor) => match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => serve_connection(&builder, watcher, WithReasons::new(tls), app).await,
                    Ok(Err(e)) => Err(e.into()),
                    Err(_) => Err("TLS handshake timed out".into()),
                },
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
            drop(admission);
        });
    }
    drop(listener);
    if tokio::time::timeout(options.drain_timeout, graceful.shutdown()).await.is_err() {
        tracing::warn!("HTTP requests still in flight after the drain timeout");
    }
}

async fn serve_connection<I>(
    builder: &Builder<TokioExecutor>,
    watcher: Watcher,
    io: I,
    app: Router,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(app);
    watcher.watch(builder.serve_connection_with_upgrades(TokioIo::new(io), service)).await
}
