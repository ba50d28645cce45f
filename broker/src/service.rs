//! `herald.v1.BrokerService` over gRPC: a thin layer that hands requests to
//! the [`Hub`] and streams session events back.

use herald_proto::v1::broker_service_server::BrokerService;
use herald_proto::v1::{
    PublishBatchRequest, PublishBatchResponse, PublishError as PublishErrorMessage, PublishRequest, PublishResponse,
    PublishResult, SubscribeRequest, publish_result,
};
use tonic::{Request, Response, Status, Streaming};

use herald_common::auth::ApiKeys;

use crate::error::PublishError;
use crate::hub::{Hub, SessionEvents};

/// The wire form of one batch item's outcome.
pub fn publish_result(r: Result<PublishResponse, PublishError>) -> PublishResult {
    PublishResult {
        outcome: Some(match r {
            Ok(published) => publish_result::Outcome::Published(published),
            Err(e) => {
                publish_result::Outcome::Error(PublishErrorMessage { code: e.code() as u32, message: e.to_string() })
            }
        }),
    }
}

/// The gRPC face of a [`Hub`]. When API keys are configured, every call
/// must carry `authorization: Bearer <key>` metadata.
pub struct BrokerGrpc {
    hub: Hub,
    keys: ApiKeys,
}

impl BrokerGrpc {
    pub fn new(hub: Hub, keys: ApiKeys) -> Self {
        Self { hub, keys }
    }

    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let presented = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
        if self.keys.authorizes(presented) {
            return Ok(());
        }
        self.hub.metrics().auth_failures.inc();
        Err(Status::unauthenticated("missing or invalid API key: send metadata 'authorization: Bearer <key>'"))
    }
}

#[tonic::async_trait]
impl BrokerService for BrokerGrpc {
    async fn publish(&self, request: Request<PublishRequest>) -> Result<Response<PublishResponse>, Status> {
        self.authorize(&request)?;
        Ok(Response::new(self.hub.publish(request.into_inner()).await?))
    }

    async fn publish_batch(
        &self,
        request: Request<PublishBatchRequest>,
    ) -> Result<Response<PublishBatchResponse>, Status> {
        self.authorize(&request)?;
        let results = self.hub.publish_batch(request.into_inner().requests).await?;
        let results = results.into_iter().map(publish_result).collect();
        Ok(Response::new(PublishBatchResponse { results }))
    }

    type SubscribeStream = SessionEvents;

    async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        self.authorize(&request)?;
        let (session, events) = self.hub.open_session();
        let mut commands = request.into_inner();
        // Commands are applied in arrival order by one task. When the caller
        // half-closes its side the session lives on (the event stream holds
        // it) until the caller cancels the call.
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    command = commands.message() => match command {
                        Ok(Some(command)) => {
                            if session.apply(command).await.is_err() {
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(%status, "subscriber command stream failed");
                            session.end(status);
                            break;
                        }
                    },
                    () = session.closed() => break,
                }
            }
        });
        Ok(Response::new(events))
    }
}
