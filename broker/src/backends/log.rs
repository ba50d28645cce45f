//! The event log: where connection events wait for their consumer groups.
//!
//! One trait, two stores: [`super::memory::MemoryLog`] for a broker on its
//! own, and the JetStream log of a NATS cluster (`federation::nats::events`),
//! where events outlive the broker that took them. Both keep each group's
//! place, deliver at least once and redeliver what is not acknowledged in
//! time; the brokers' dispatchers ([`super::dispatch`]) only pull and share
//! out.

use std::time::Duration;

use async_trait::async_trait;
use herald_proto::v1::{ConnectionEvent, ConsumedEvent};

/// The log could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    #[error("event store unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Invalid(String),
}

impl From<LogError> for tonic::Status {
    fn from(error: LogError) -> Self {
        match error {
            LogError::Invalid(reason) => tonic::Status::invalid_argument(reason),
            LogError::Unavailable(_) => tonic::Status::unavailable(error.to_string()),
        }
    }
}

/// Where events are stored for consumer groups.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Stores `events`, in order, once each: an event whose id is already
    /// stored (within the de-duplication window) is not stored again.
    async fn store(&self, events: &[ConnectionEvent]) -> Result<(), LogError>;

    /// Makes `group` if it is new: from now on it sees every event stored.
    async fn open(&self, group: &str) -> Result<(), LogError>;

    /// Takes up to `max` events for `group` (creating the group, which then
    /// sees events stored from now on), waiting up to `wait` for the first
    /// one. Each is the group's until acknowledged or its ack wait ends.
    async fn pull(&self, group: &str, max: usize, wait: Duration) -> Result<Vec<ConsumedEvent>, LogError>;

    /// Acknowledges deliveries of `group` by their ack ids.
    async fn ack(&self, group: &str, ack_ids: &[String]) -> Result<(), LogError>;

    /// Hands deliveries of `group` back for delivery again at once (their
    /// instance went away).
    async fn release(&self, group: &str, ack_ids: &[String]);

    /// Events dropped so far because a group fell behind the retention, by
    /// group.
    fn dropped(&self) -> Vec<(String, u64)>;
}
