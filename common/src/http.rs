//! The HTTP/1.1 and HTTP/2 server loop shared by the HTTP gateway and the
//! admin endpoints: per-connection header-read timeouts (which also bound
//! idle keep-alive connections and defeat slowloris clients) and graceful
//! shutdown that lets in-flight requests finish.

use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Timeouts of an HTTP server.
#[derive(Debug, Clone)]
pub struct HttpServerOptions {
    /// Longest time a client may take to send a request's headers, counted
    /// from when the connection is ready for the next request (so it is also
    /// the idle keep-alive timeout).
    pub header_read_timeout: Duration,
    /// How long shutdown waits for in-flight requests.
    pub drain_timeout: Duration,
}

impl Default for HttpServerOptions {
    fn default() -> Self {
        Self { header_read_timeout: Duration::from_secs(30), drain_timeout: Duration::from_secs(10) }
    }
}

/// Serves `app` on `listener` until `shutdown`, then stops accepting and
/// waits (up to the drain timeout) for in-flight requests.
pub async fn serve(listener: TcpListener, app: Router, options: HttpServerOptions, shutdown: CancellationToken) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(options.header_read_timeout).keep_alive(true);
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(Some(Duration::from_secs(20)));
    let graceful = GracefulShutdown::new();
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
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(options.drain_timeout, graceful.shutdown()).await.is_err() {
        tracing::warn!("HTTP requests still in flight after the drain timeout");
    }
}
