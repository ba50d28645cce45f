//! herald's WebSocket gateway.
//!
//! - `config`: what a gateway is told at start ([`GatewayConfig`]);
//! - `client_auth`: the JWT a client connects with, checked ([`ClientAuth`]);
//! - `connection`: one client connection, handshake to close;
//! - `handshake`: the WebSocket upgrade, and its refusals as HTTP answers;
//! - `protocol`: the client protocol's commands, replies and pushes (JSON);
//! - `commands`: a client-protocol connection's commands, carried out;
//! - `close`: why a connection closes, and its close frame;
//! - `events`: connection events, queued and reported to the broker for the
//!   backends;
//! - `connect_hook`: the backend endpoint that decides who may connect;
//! - `outbox`: a connection's byte-bounded outbound queue;
//! - `streams`: where a connection stands in each channel stream it follows;
//! - `registry`: live connections, and the delivery the broker decided;
//! - `link`: the session with the broker (claim, subscribe, reconnect);
//! - `gaps`: channels with history kept whole across broker failovers;
//! - `followed`: how far the broker follows the directory, and who waits for it;
//! - `shared`: the state those parts share.
//!
//! ```text
//! broker ──events──▶ link ──▶ registry ──▶ outbox ──▶ connection task ──▶ client
//! broker ◀──ReportEvents── events ◀── connection task (connect, message, close)
//! ```

pub mod client_auth;
mod close;
mod commands;
mod config;
mod connect_hook;
mod connection;
mod events;
mod followed;
mod gaps;
mod handshake;
mod link;
mod metrics;
mod outbox;
pub mod protocol;
mod registry;
mod shared;
mod streams;
mod wire;

/// The WebSocket framing's reading, for the fuzz targets only.
#[doc(hidden)]
pub use wire::fuzzing as wire_fuzzing;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use herald_client::Broker;
use herald_common::metrics::Exposition;
use herald_proto::names::{self, NameError};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::client_auth::{ClientAuth, ClientAuthConfig, ClientAuthError};
use crate::close::CloseReason;
pub use crate::config::*;
pub use crate::link::LinkError;
use crate::metrics::GatewayMetrics;
use crate::registry::Registry;
use crate::shared::Shared;

/// The WebSocket port in the classic layout.
pub const DEFAULT_PORT: u16 = 4236;
/// The gateway's admin port (metrics, health).
pub const DEFAULT_ADMIN_PORT: u16 = 4238;

/// Why the gateway stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("invalid worker id: {0}")]
    BadWorkerId(#[from] NameError),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("namespace {0:?} checks tokens: it needs --client-auth jwt")]
    NamespaceNeedsClientAuth(String),
    #[error("connect hook: {0}")]
    BadConnectHook(#[from] herald_common::http_client::PostError),
    #[error("a connect hook and --client-auth jwt both decide who connects: choose one")]
    HookAndClientAuth,
}

/// A WebSocket gateway. Clone it to watch its metrics while it runs.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

impl Gateway {
    pub fn new(config: GatewayConfig) -> Result<Self, GatewayError> {
        names::validate_worker_id(&config.worker_id)?;
        if config.client_auth.is_none()
            && let Some(namespace) = config.namespaces.iter().find(|n| n.needs_client_auth())
        {
            return Err(GatewayError::NamespaceNeedsClientAuth(namespace.name.clone()));
        }
        let config = config.normalized();
        let connect_hook = match &config.connect_hook {
            Some(_) if config.client_auth.is_some() => return Err(GatewayError::HookAndClientAuth),
            Some(hook) => Some(herald_common::http_client::HttpPoster::new(&hook.url, &hook.trust)?),
            None => None,
        };
        let instance_id = herald_common::token::random_token(16);
        let events = events::Events::new(config.events, &config.worker_id, &instance_id, config.event_queue);
        Ok(Self {
            shared: Arc::new_cyclic(|this| Shared {
                this: this.clone(),
                config,
                instance_id,
                registry: Registry::default(),
                metrics: GatewayMetrics::default(),
                close_reason: OnceLock::new(),
                epoch: Instant::now(),
                claim_settled: tokio::sync::watch::Sender::new(false),
                followed: followed::Followed::default(),
                broker: OnceLock::new(),
                gaps: gaps::Gaps::default(),
                events,
                connect_hook,
            }),
        })
    }

    pub fn worker_id(&self) -> &str {
        &self.shared.config.worker_id
    }

    /// Resolves once the first claim of the worker id is settled: granted,
    /// or not answered because no broker could be reached yet (the gateway
    /// then serves its clients and keeps trying). A refused claim never
    /// settles: [`Gateway::run`] ends with the refusal instead.
    pub async fn claim_settled(&self) {
        let mut settled = self.shared.claim_settled.subscribe();
        let _ = settled.wait_for(|s| *s).await;
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
        let (users, groups, channels) = self.shared.registry.census();
        out.gauge("herald_ws_users", "Distinct user ids bound to this gateway's connections.", users as i64);
        out.gauge("herald_ws_groups", "Groups with a member on this gateway.", groups as i64);
        out.gauge("herald_ws_channels", "Client channels with a subscriber on this gateway.", channels as i64);
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
        broker: Arc<dyn Broker>,
        shutdown: CancellationToken,
    ) -> Result<(), GatewayError> {
        let shared = self.shared;
        // Client publications go through the same broker as the link.
        let _ = shared.broker.set(broker.clone());
        let connections = TaskTracker::new();
        let closing = CancellationToken::new();
        let link_stop = CancellationToken::new();
        let events_stop = CancellationToken::new();
        let reporter = tokio::spawn(events::report(shared.clone(), broker.clone(), events_stop.clone()));
        let mut link = tokio::spawn(link::run(shared.clone(), broker, link_stop.clone()));
        let heartbeat = tokio::spawn(heartbeat(shared.clone()));
        let expiry = tokio::spawn(expire_tokens(shared.clone()));
        // Clients are taken once the claim of the worker id is settled, so
        // that a gateway whose claim is refused never greets one with an id
        // that another gateway holds.
        let mut settled = shared.claim_settled.subscribe();
        let mut claimed = false;
        let result = loop {
            tokio::select! {
                () = shutdown.cancelled() => break Ok(()),
                () = async { drop(settled.wait_for(|s| *s).await) }, if !claimed => claimed = true,
                ended = &mut link => {
                    let _ = shared.close_reason.set(CloseReason::WorkerIdLost);
                    break match ended {
                        Ok(Err(e)) => Err(GatewayError::Link(e)),
                        Ok(Ok(())) | Err(_) => Ok(()),
                    };
                }
                accepted = listener.accept(), if claimed => match accepted {
                    Ok((stream, peer)) => match herald_common::net::connection_slot() {
                        Some(slot) => {
                            connections.spawn(connection::serve(stream, peer, tls.clone(), shared.clone(), closing.clone(), slot));
                        }
                        None => {
                            shared.metrics.handshakes_failed.inc();
                            herald_common::http::refuse(stream, herald_common::net::NO_SLOT_LEFT, tls.is_some());
                        }
                    },
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
        expiry.abort();
        if !link.is_finished() {
            link_stop.cancel();
            if tokio::time::timeout(shared.config.drain_timeout, &mut link).await.is_err() {
                tracing::warn!("the broker link did not drain in time");
            }
        }
        link.abort();
        closing.cancel();
        shared.registry.close_all(shared.close_reason());
        connections.close();
        if tokio::time::timeout(shared.config.drain_timeout, connections.wait()).await.is_err() {
            tracing::warn!(left = shared.registry.len(), "connections still open after the drain timeout");
        }
        // Last: the events of the connections just closed go too.
        events_stop.cancel();
        if tokio::time::timeout(shared.config.drain_timeout * 2, reporter).await.is_err() {
            tracing::warn!("connection events still unreported after the drain timeout");
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

/// Closes connections whose token expired (close code 4001), checked every
/// second. Only runs with client auth: anonymous connections never expire.
async fn expire_tokens(shared: Arc<Shared>) {
    if shared.config.client_auth.is_none() {
        return;
    }
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let expired = shared.registry.expire(client_auth::unix_now());
        if expired > 0 {
            tracing::debug!(count = expired, "closing connections whose token expired");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_worker_id_is_refused_at_construction() {
        assert!(matches!(Gateway::new(GatewayConfig::new("a..b".into())), Err(GatewayError::BadWorkerId(_))));
    }
}
