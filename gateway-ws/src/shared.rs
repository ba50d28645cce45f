//! The state every part of a running gateway shares: its configuration,
//! identity, connections and metrics. Owned by [`crate::Gateway`]; the
//! connection tasks, the broker link and the heartbeat hold an `Arc` of it.

use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;

use herald_client::Broker;
use tokio::sync::watch;

use herald_common::http_client::HttpPoster;

use crate::close::CloseReason;
use crate::config::GatewayConfig;
use crate::events::Events;
use crate::followed::Followed;
use crate::gaps::Gaps;
use crate::metrics::GatewayMetrics;
use crate::registry::Registry;

pub(crate) struct Shared {
    /// This state itself, for tasks a connection starts that outlive the
    /// command that started them (an rpc waiting for its answer).
    pub(crate) this: Weak<Shared>,
    pub(crate) config: GatewayConfig,
    /// Random per process: lets this process reclaim its worker id after a reconnect.
    pub(crate) instance_id: String,
    pub(crate) registry: Registry,
    pub(crate) metrics: GatewayMetrics,
    /// Set when connections must close for a reason other than shutdown.
    pub(crate) close_reason: OnceLock<CloseReason>,
    /// Origin of the coarse clock used for heartbeats.
    pub(crate) epoch: Instant,
    /// Set once the first claim of the worker id is settled: granted, or
    /// not answered because no broker could be reached.
    pub(crate) claim_settled: watch::Sender<bool>,
    /// How far the broker has followed the directory journal: a connection
    /// whose opening is at or below it can be addressed through the broker.
    pub(crate) followed: Followed,
    /// The broker that client-protocol publications go to; set when the
    /// gateway starts running.
    pub(crate) broker: OnceLock<Arc<dyn Broker>>,
    /// The last position dispatched on each channel with history.
    pub(crate) gaps: Gaps,
    /// Connection events on their way to the backends.
    pub(crate) events: Events,
    /// The connect hook's endpoint, when there is one.
    pub(crate) connect_hook: Option<HttpPoster>,
}

impl Shared {
    /// Milliseconds since the gateway started.
    pub(crate) fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn set_linked(&self, linked: bool) {
        self.metrics.broker_linked.set(i64::from(linked));
        if linked {
            self.settle_claim();
        }
    }

    pub(crate) fn settle_claim(&self) {
        self.claim_settled.send_replace(true);
    }

    pub(crate) fn close_reason(&self) -> CloseReason {
        self.close_reason.get().copied().unwrap_or(CloseReason::Shutdown)
    }
}
