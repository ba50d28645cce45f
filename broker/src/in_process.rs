//! The hub as a [`Broker`] for gateways in the same process (the
//! `standalone` role): the same contract as a broker across the network, with
//! no network in between.

use std::sync::Arc;

use async_trait::async_trait;
use herald_client::{Broker, BrokerSession, SessionCommands};
use herald_proto::v1::{CallAnswer, CallRequest, ConnectionEvent};
use herald_proto::v1::{
    ControlRequest, ControlResponse, ControlResult, HistoryRequest, HistoryResponse, PublishRequest, PublishResponse,
    PublishResult, QueryRequest, QueryResponse, SubscribeRequest,
};
use tonic::Status;

use crate::error::{control_result, publish_result};
use crate::hub::{Hub, Session};

#[async_trait]
impl Broker for Hub {
    async fn publish(&self, req: PublishRequest) -> Result<PublishResponse, Status> {
        Hub::publish(self, req).await.map_err(Status::from)
    }

    async fn publish_batch(&self, requests: Vec<PublishRequest>) -> Result<Vec<PublishResult>, Status> {
        Ok(Hub::publish_batch(self, requests).await?.into_iter().map(publish_result).collect())
    }

    async fn control(&self, req: ControlRequest) -> Result<ControlResponse, Status> {
        Hub::control(self, req).await.map_err(Status::from)
    }

    async fn control_batch(&self, requests: Vec<ControlRequest>) -> Result<Vec<ControlResult>, Status> {
        Ok(Hub::control_batch(self, requests).await?.into_iter().map(control_result).collect())
    }

    async fn query(&self, req: QueryRequest) -> Result<QueryResponse, Status> {
        Hub::query(self, req).await.map_err(Status::from)
    }

    async fn history(&self, req: HistoryRequest) -> Result<HistoryResponse, Status> {
        Hub::history(self, req).await.map_err(Status::from)
    }

    async fn report_events(&self, events: &[ConnectionEvent]) -> Result<(), Status> {
        Hub::report_events(self, events).await
    }

    async fn call(&self, req: CallRequest) -> Result<CallAnswer, Status> {
        Hub::call(self, req).await.map_err(Status::from)
    }

    async fn open_session(&self) -> Result<BrokerSession, Status> {
        let (session, events) = Hub::open_session(self);
        Ok(BrokerSession {
            commands: Box::new(LocalCommands(session)),
            events: Box::pin(events),
            broker: "in-process".to_owned(),
        })
    }

    async fn probe(&self) -> bool {
        self.unready_reason().is_none()
    }
}

/// Commands of a session on the hub in this process: applied at once.
struct LocalCommands(Arc<Session>);

#[async_trait]
impl SessionCommands for LocalCommands {
    async fn send(&self, req: SubscribeRequest) -> Result<(), Status> {
        self.0.apply(req).await.map_err(Status::from)
    }
}
