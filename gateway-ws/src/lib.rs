//! herald's WebSocket gateway.
//!
//! - [`connection`]: one client connection, handshake to close;
//! - [`outbox`]: a connection's byte-bounded outbound queue;
//! - [`registry`]: live connections and delivery into their outboxes;
//! - [`link`]: the session with the broker (claim, subscribe, reconnect).
//!
//! ```text
//! broker ──events──▶ link ──▶ registry ──▶ outbox ──▶ connection task ──▶ client
//! ```

pub mod connection;
pub mod link;
pub mod metrics;
pub mod outbox;
pub mod registry;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use herald_broker::BrokerClient;
use herald_common::metrics::Exposition;
use herald_proto::names::{self, NameError};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::connection::CloseReason;
pub use crate::link::LinkError;
use crate::metrics::GatewayMetrics;
use crate::outbox::Closure;
use crate::registry::Registry;

/// How a connection is told its address when it opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Greeting {
    /// `Worker ID:{worker_id} Connection ID:{connection_id} connected`
    #[default]
    Text,
    /// `{"type":"connected","worker_id":"…","connection_id":"…"}`
    Json,
}

impl Greeting {
    /// The greeting for one connection. Ids are URL-safe tokens, so neither
    /// form needs escaping.
    pub fn render(self, worker_id: &str, connection_id: u64) -> String {
        match self {
            Self::Text => format!("Worker ID:{worker_id} Connection ID:{connection_id} connected"),
            Self::Json => {
                format!(r#"{{"type":"connected","worker_id":"{worker_id}","connection_id":"{connection_id}"}}"#)
            }
        }
    }
}

/// Everything a gateway needs to know.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// This gateway's cluster-unique worker id.
    pub worker_id: String,
    pub greeting: Greeting,
    /// Most connections held at once; more are refused with HTTP 503.
    pub max_connections: usize,
    /// Largest message a client may send, in bytes.
    pub max_message_bytes: usize,
    /// Bytes queued for one connection before it is disconnected as too slow.
    pub outbox_limit_bytes: usize,
    /// Longest time one batch of frames may take to write.
    pub write_timeout: Duration,
    /// Longest time a WebSocket handshake may take.
    pub handshake_timeout: Duration,
    /// Per-connection read buffer, allocated up front.
    pub read_buffer_bytes: usize,
    /// Bytes gathered before a write to the socket (grown on demand).
    pub write_buffer_bytes: usize,
    /// How long each shutdown step (broker drain, client close) may take.
    pub drain_timeout: Duration,
    /// Origins allowed to open connections (exact `scheme://host[:port]`);
    /// empty allows any. Requests without an `Origin` header (non-browser
    /// clients) are allowed either way.
    pub allowed_origins: Vec<String>,
    /// How often every connection is pinged; zero turns heartbeats off.
    pub ping_interval: Duration,
    /// How long past a ping a silent client is kept before it is closed.
    pub pong_timeout: Duration,
}

impl GatewayConfig {
    pub fn new(worker_id: String) -> Self {
        Self {
            worker_id,
            greeting: Greeting::Text,
            max_connections: 100_000,
            max_message_bytes: 64 * 1024,
            outbox_limit_bytes: 1024 * 1024,
            write_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            read_buffer_bytes: 4096,
            write_buffer_bytes: 16 * 1024,
            drain_timeout: Duration::from_secs(5),
            allowed_origins: Vec::new(),
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(10),
        }
    }

    /// Whether a browser page from `origin` may connect.
    fn origin_allowed(&self, origin: Option<&str>) -> bool {
        match origin {
            Some(origin) if !self.allowed_origins.is_empty() => {
                self.allowed_origins.iter().any(|allowed| allowed.eq_ignore_ascii_case(origin))
            }
            _ => true,
        }
    }

    fn websocket(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(self.read_buffer_bytes)
            .write_buffer_size(self.write_buffer_bytes)
            .max_message_size(Some(self.max_message_bytes))
            .max_frame_size(Some(self.max_message_bytes))
    }
}

/// Why the gateway stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("invalid worker id: {0}")]
    BadWorkerId(#[from] NameError),
    #[error(transparent)]
    Link(#[from] LinkError),
}

/// A WebSocket gateway. Clone it to watch its metrics while it runs.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

pub(crate) struct Shared {
    config: GatewayConfig,
    /// Random per process: lets this process reclaim its worker id after a reconnect.
    instance_id: String,
    registry: Registry,
    metrics: GatewayMetrics,
    /// Set when connections must close for a reason other than shutdown.
    close_reason: OnceLock<CloseReason>,
    /// Origin of the coarse clock used for heartbeats.
    epoch: Instant,
}

impl Shared {
    /// Milliseconds since the gateway started.
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn set_linked(&self, linked: bool) {
        self.metrics.broker_linked.set(i64::from(linked));
    }

    fn close_reason(&self) -> CloseReason {
        self.close_reason.get().copied().unwrap_or(CloseReason::Shutdown)
    }
}

impl Gateway {
    pub fn new(config: GatewayConfig) -> Result<Self, GatewayError> {
        names::validate_worker_id(&config.worker_id)?;
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                instance_id: herald_common::token::random_token(16),
                registry: Registry::default(),
                metrics: GatewayMetrics::default(),
                close_reason: OnceLock::new(),
                epoch: Instant::now(),
            }),
        })
    }

    pub fn worker_id(&self) -> &str {
        &self.shared.config.worker_id
    }

    /// Whether the broker session is established.
    pub fn is_linked(&self) -> bool {
        self.shared.metrics.broker_linked.get() == 1
    }

    pub fn connections(&self) -> usize {
        self.shared.registry.len()
    }

    pub fn render_metrics(&self, out: &mut Exposition) {
        out.info("herald_ws_worker_info", "This gateway's worker id.", &[("worker_id", &self.shared.config.worker_id)]);
        self.shared.metrics.render(out);
        out.gauge(
            "herald_ws_outbox_bytes",
            "Bytes queued for clients, summed over connections.",
            self.shared.registry.queued_bytes() as i64,
        );
    }

    /// Accepts clients on `listener` (`wss://` when `tls` is given) and
    /// keeps a broker session through `broker` until `shutdown`. Then: stop
    /// accepting, drain the broker link (every message published before now
    /// reaches its outbox), deliver what is queued and close every client
    /// with 1001.
    pub async fn run(
        self,
        listener: TcpListener,
        tls: Option<TlsAcceptor>,
        broker: BrokerClient,
        shutdown: CancellationToken,
    ) -> Result<(), GatewayError> {
        let shared = self.shared;
        let connections = TaskTracker::new();
        let closing = CancellationToken::new();
        let link_stop = CancellationToken::new();
        let mut link = tokio::spawn(link::run(shared.clone(), broker, link_stop.clone()));
        let heartbeat = tokio::spawn(heartbeat(shared.clone()));
        let result = loop {
            tokio::select! {
                () = shutdown.cancelled() => break Ok(()),
                ended = &mut link => {
                    let _ = shared.close_reason.set(CloseReason::WorkerIdLost);
                    break match ended {
                        Ok(Err(e)) => Err(GatewayError::Link(e)),
                        Ok(Ok(())) | Err(_) => Ok(()),
                    };
                }
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        connections.spawn(connection::serve(stream, peer, tls.clone(), shared.clone(), closing.clone()));
                    }
                    Err(e) => {
                        // Typically out of file descriptors: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        };
        drop(listener);
        heartbeat.abort();
        if !link.is_finished() {
            link_stop.cancel();
            if tokio::time::timeout(shared.config.drain_timeout, &mut link).await.is_err() {
                tracing::warn!("the broker link did not drain in time");
            }
        }
        link.abort();
        closing.cancel();
        shared.registry.close_all(Closure::Shutdown);
        connections.close();
        if tokio::time::timeout(shared.config.drain_timeout, connections.wait()).await.is_err() {
            tracing::warn!(left = shared.registry.len(), "connections still open after the drain timeout");
        }
        result
    }
}

/// Pings every connection each `ping_interval` and closes those not heard
/// from for `ping_interval + pong_timeout`. One task for the whole gateway,
/// so idle connections cost no timer each.
async fn heartbeat(shared: Arc<Shared>) {
    let interval = shared.config.ping_interval;
    if interval.is_zero() {
        return;
    }
    let grace = u64::try_from((interval + shared.config.pong_timeout).as_millis()).unwrap_or(u64::MAX);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let sweep = shared.registry.heartbeat(shared.now_ms().saturating_sub(grace));
        shared.metrics.pings_sent.add(sweep.pinged);
        if sweep.unresponsive > 0 {
            tracing::debug!(count = sweep.unresponsive, "closing connections that stopped answering pings");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greetings_carry_the_address_in_the_classic_text_or_json() {
        assert_eq!(Greeting::Text.render("w1", 7), "Worker ID:w1 Connection ID:7 connected");
        assert_eq!(Greeting::Json.render("w1", 7), r#"{"type":"connected","worker_id":"w1","connection_id":"7"}"#);
    }

    #[test]
    fn origins_are_checked_only_when_an_allow_list_is_set() {
        let mut config = GatewayConfig::new("w".into());
        assert!(config.origin_allowed(Some("https://evil.example")));
        config.allowed_origins = vec!["https://app.example".into()];
        assert!(config.origin_allowed(Some("https://APP.example")));
        assert!(!config.origin_allowed(Some("https://evil.example")));
        assert!(config.origin_allowed(None));
    }

    #[test]
    fn a_malformed_worker_id_is_refused_at_construction() {
        assert!(matches!(Gateway::new(GatewayConfig::new("a..b".into())), Err(GatewayError::BadWorkerId(_))));
    }
}
