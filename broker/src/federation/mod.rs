//! The seam between one broker and the others: a [`Federation`] carries
//! publishes to the brokers that need them, follows this broker's interest in
//! channels, and leases worker ids across all brokers.
//!
//! The hub always holds one federation, never an `Option`: [`Local`] is the
//! broker on its own (nothing to forward, every lease granted here), and
//! [`nats`] bridges brokers through NATS. Other engines (Redis, or a
//! JetStream-backed history) go in beside them.

mod ask;
pub mod nats;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use herald_common::metrics::Exposition;
use herald_proto::v1::Event;
use tokio::sync::oneshot;

pub use self::ask::{Answer, Ask, Gathered, user_hash};

/// A change of this broker's interest in a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interest {
    /// The channel has its first local listener.
    Add(String),
    /// The channel lost its last local listener.
    Remove(String),
}

/// What a federation tells its hub.
#[derive(Debug)]
pub enum Notice {
    /// An event published on another broker, for local listeners.
    Event(Event),
    /// Something arrived that is not an event (counted, then dropped).
    Undecodable,
    /// A lease this broker held was taken over: end the session holding it.
    WorkerLost { worker_id: String, same_instance: bool },
    /// A lease this broker holds could not be renewed, and is about to
    /// lapse: end the session holding it, so that its gateway claims the id
    /// again (through a broker that reaches the cluster).
    LeaseLapsing { worker_id: String },
    /// Another broker asks something of this one's gateways.
    Ask { ask: Ask, reply: oneshot::Sender<Answer> },
    /// Another broker hands over a call that a backend of this one serves.
    Call {
        request: herald_proto::v1::CallRequest,
        timeout: Duration,
        reply: oneshot::Sender<Result<herald_proto::v1::CallAnswer, crate::backends::calls::CallFailure>>,
    },
}

/// The other brokers could not be reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FederationError(pub String);

/// Why a question to other brokers got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AskError {
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    #[error("{0}")]
    Unavailable(String),
}

/// Why a worker-id claim failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    #[error("worker id is held by another live gateway")]
    Taken,
    #[error("cluster lease store unreachable: {0}")]
    Unavailable(String),
}

/// A publish on its way to the other brokers.
pub type Forwarding<'a> = Pin<Box<dyn Future<Output = Result<(), FederationError>> + Send + 'a>>;

/// How one broker works with the others.
#[async_trait]
pub trait Federation: Send + Sync + 'static {
    /// Why the federation keeps this broker from serving right now, if it does.
    fn unready_reason(&self) -> Option<&'static str>;

    /// Hands `event` to the brokers that may have listeners for it; `None`
    /// when there is no other broker.
    fn forward<'a>(&'a self, event: &'a Event) -> Option<Forwarding<'a>>;

    /// Records a change of this broker's interest. The hub calls it under its
    /// lock, so changes arrive in the order they were made.
    fn interest(&self, change: Interest);

    /// The history the cluster keeps for client channels, if it keeps one:
    /// publications to those channels are stored there, and reach every
    /// broker's listeners from there.
    fn history(&self) -> Option<&nats::history::JetStreamHistory> {
        None
    }

    /// The event log the cluster keeps for consumer groups, if it keeps
    /// one; a broker on its own keeps events in memory.
    fn event_log(&self) -> Option<std::sync::Arc<dyn crate::backends::log::EventLog>> {
        None
    }

    /// Records that this broker's backends started (`Add`) or stopped
    /// (`Remove`) serving a method, so that calls from other brokers reach
    /// them.
    fn serve_method(&self, change: Interest) {
        let _ = change;
    }

    /// Hands a call no backend of this broker serves to the brokers whose
    /// backends serve it; `None` when there is no other broker.
    async fn forward_call(
        &self,
        request: &herald_proto::v1::CallRequest,
        timeout: Duration,
    ) -> Option<Result<herald_proto::v1::CallAnswer, crate::backends::calls::CallFailure>> {
        let _ = (request, timeout);
        None
    }

    /// Waits until every interest change so far has taken effect, so that
    /// events published on any broker from then on arrive here.
    async fn sync(&self) -> Result<(), FederationError>;

    /// Leases `worker_id` to the gateway instance `instance_id`, across all
    /// brokers.
    async fn claim(&self, worker_id: &str, instance_id: &str) -> Result<(), ClaimError>;

    /// Gives the lease on `worker_id` back.
    fn release(&self, worker_id: String);

    /// Whether a gateway on another broker holds `worker_id`.
    fn held_elsewhere(&self, worker_id: &str) -> bool;

    /// Asks the broker serving `worker_id` (held elsewhere) and waits up to
    /// `timeout` for its answer.
    async fn ask_worker(&self, worker_id: &str, ask: &Ask, timeout: Duration) -> Result<Answer, AskError>;

    /// Asks every other broker and gathers the answers that arrive within
    /// `timeout` (fewer when some broker is gone or slow: the caller sees
    /// which workers are not covered).
    async fn ask_all(&self, ask: &Ask, timeout: Duration) -> Result<Gathered, FederationError>;

    /// Records an idempotency key for all brokers: true when no other broker
    /// accepted it within the de-duplication window.
    async fn first_use(&self, key: &str) -> Result<bool, FederationError>;

    /// Forgets a key recorded by [`Federation::first_use`] whose publish was
    /// not routed after all, so that a retry is routed.
    fn forget(&self, key: &str);

    /// Stops taking part: the broker is shutting down.
    fn leave(&self);

    /// Renders the federation's own metrics.
    fn render_metrics(&self, out: &mut Exposition);
}

/// A broker on its own: nothing to forward, and its own worker ids are all
/// there is.
#[derive(Debug, Default)]
pub struct Local;

#[async_trait]
impl Federation for Local {
    fn unready_reason(&self) -> Option<&'static str> {
        None
    }

    fn forward<'a>(&'a self, _event: &'a Event) -> Option<Forwarding<'a>> {
        None
    }

    fn interest(&self, _change: Interest) {}

    async fn sync(&self) -> Result<(), FederationError> {
        Ok(())
    }

    async fn claim(&self, _worker_id: &str, _instance_id: &str) -> Result<(), ClaimError> {
        Ok(())
    }

    fn release(&self, _worker_id: String) {}

    fn held_elsewhere(&self, _worker_id: &str) -> bool {
        false
    }

    async fn ask_worker(&self, worker_id: &str, _ask: &Ask, _timeout: Duration) -> Result<Answer, AskError> {
        Err(AskError::Unavailable(format!("no other broker serves worker id {worker_id:?}")))
    }

    async fn ask_all(&self, _ask: &Ask, _timeout: Duration) -> Result<Gathered, FederationError> {
        Ok(Gathered::default())
    }

    async fn first_use(&self, _key: &str) -> Result<bool, FederationError> {
        Ok(true)
    }

    fn forget(&self, _key: &str) {}

    fn leave(&self) {}

    fn render_metrics(&self, _out: &mut Exposition) {}
}
