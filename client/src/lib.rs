//! How gateways and publishers reach a broker, wherever it runs.
//!
//! - [`Broker`]: what a broker does for its clients (publish, publish a
//!   batch, control and query the directory of connections, open a
//!   subscriber session, answer a probe). The broker crate
//!   implements it in-process; [`RemoteBrokers`] implements it over gRPC.
//! - [`remote`]: gRPC to one or more broker addresses, with failover, the API
//!   key added by an interceptor, and single publishes coalesced into batches.
//!
//! The gateways depend on this crate and on `herald-proto` only, never on the
//! broker's internals.

mod api_key;
mod coalesce;
pub mod remote;

use std::pin::Pin;

use async_trait::async_trait;
use herald_proto::v1::{CallAnswer, CallRequest, ConnectionEvent};
use herald_proto::v1::{
    ControlRequest, ControlResponse, ControlResult, HistoryRequest, HistoryResponse, PublishRequest, PublishResponse,
    PublishResult, QueryRequest, QueryResponse, SubscribeRequest, SubscribeResponse,
};
use tokio_stream::Stream;
use tonic::Status;

pub use crate::remote::{AddressError, BrokerTls, RemoteBrokers, RemoteOptions, describe};

/// A broker, in this process or across the network.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Routes one message.
    async fn publish(&self, req: PublishRequest) -> Result<PublishResponse, Status>;

    /// Routes several messages in order, each on its own: one result per
    /// message, in order.
    async fn publish_batch(&self, requests: Vec<PublishRequest>) -> Result<Vec<PublishResult>, Status>;

    /// Changes who is on the gateways' connections (binds, groups, data,
    /// closes), answering once the change is in effect.
    async fn control(&self, req: ControlRequest) -> Result<ControlResponse, Status>;

    /// Carries out several controls, each on its own: one result per
    /// control, in order (see `ControlBatch` in the proto for which run in
    /// order).
    async fn control_batch(&self, requests: Vec<ControlRequest>) -> Result<Vec<ControlResult>, Status>;

    /// Asks who is connected, across the cluster.
    async fn query(&self, req: QueryRequest) -> Result<QueryResponse, Status>;

    /// Reads a client channel's history.
    async fn history(&self, req: HistoryRequest) -> Result<HistoryResponse, Status>;

    /// Stores connection events for the backends' consumer groups,
    /// answering once they are stored.
    /// The caller keeps the events, to report them again after an error.
    async fn report_events(&self, events: &[ConnectionEvent]) -> Result<(), Status>;

    /// Asks a backend serving the call's method, and waits for its answer.
    async fn call(&self, req: CallRequest) -> Result<CallAnswer, Status>;

    /// Opens a subscriber session.
    async fn open_session(&self) -> Result<BrokerSession, Status>;

    /// Whether a broker is there to take publishes right now.
    async fn probe(&self) -> bool;

    /// Told that a session on `broker` (its [`BrokerSession::broker`]) failed,
    /// so that the next session is tried on another broker first.
    fn session_failed(&self, broker: &str) {
        let _ = broker;
    }
}

/// The stream of acks and events of an open session; it ends with the
/// status that ended the session.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<SubscribeResponse, Status>> + Send>>;

/// An open subscriber session, wherever its broker runs.
pub struct BrokerSession {
    /// Where commands go.
    pub commands: Box<dyn SessionCommands>,
    /// Acks and events; ends with the status that ended the session.
    pub events: EventStream,
    /// The broker this session runs on, for logs.
    pub broker: String,
}

/// The command side of a [`BrokerSession`].
#[async_trait]
pub trait SessionCommands: Send + Sync {
    /// Sends one command. A refused command also ends the session's event
    /// stream with the refusal, where callers look for it; an error here
    /// means the command did not get through.
    async fn send(&self, req: SubscribeRequest) -> Result<(), Status>;
}
