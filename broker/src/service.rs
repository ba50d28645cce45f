//! `herald.v1.BrokerService` over gRPC: a thin layer that hands requests to
//! the [`Hub`] and streams session events back.

use herald_proto::v1::broker_service_server::BrokerService;
use herald_proto::v1::{
    AckEventsRequest, AckEventsResponse, CallRequest, CallResponse, ConsumeEventsRequest, ReportEventsRequest,
    ReportEventsResponse, ServeCallsRequest, ServeCallsResponse, serve_calls_request,
};
use herald_proto::v1::{
    ControlBatchRequest, ControlBatchResponse, ControlRequest, ControlResponse, HistoryRequest, HistoryResponse,
    PublishBatchRequest, PublishBatchResponse, PublishRequest, PublishResponse, QueryRequest, QueryResponse,
    SubscribeRequest,
};
use tonic::service::Interceptor;
use tonic::{Request, Response, Status, Streaming};

use herald_common::auth::ApiKeys;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::backends::Consumer;
use crate::backends::calls::BACKEND_QUEUE;
use crate::error::{control_result, publish_result};
use crate::hub::{Hub, SessionEvents};

/// The gRPC face of a [`Hub`].
pub(crate) struct BrokerGrpc {
    hub: Hub,
}

impl BrokerGrpc {
    pub(crate) fn new(hub: Hub) -> Self {
        Self { hub }
    }
}

/// Admits a call only with an accepted API key, when keys are configured:
/// `authorization: Bearer <key>` metadata. One interceptor in front of every
/// method, so that no method can forget the check.
#[derive(Clone)]
pub(crate) struct Authorize {
    keys: ApiKeys,
    hub: Hub,
}

impl Authorize {
    pub(crate) fn new(keys: ApiKeys, hub: Hub) -> Self {
        Self { keys, hub }
    }
}

impl Interceptor for Authorize {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
        if self.keys.authorizes(presented) {
            return Ok(request);
        }
        self.hub.count_auth_failure();
        Err(Status::unauthenticated("missing or invalid API key: send metadata 'authorization: Bearer <key>'"))
    }
}

#[tonic::async_trait]
impl BrokerService for BrokerGrpc {
    async fn publish(&self, request: Request<PublishRequest>) -> Result<Response<PublishResponse>, Status> {
        Ok(Response::new(self.hub.publish(request.into_inner()).await?))
    }

    async fn publish_batch(
        &self,
        request: Request<PublishBatchRequest>,
    ) -> Result<Response<PublishBatchResponse>, Status> {
        let results = self.hub.publish_batch(request.into_inner().requests).await?;
        let results = results.into_iter().map(publish_result).collect();
        Ok(Response::new(PublishBatchResponse { results }))
    }

    async fn control(&self, request: Request<ControlRequest>) -> Result<Response<ControlResponse>, Status> {
        Ok(Response::new(self.hub.control(request.into_inner()).await?))
    }

    async fn control_batch(
        &self,
        request: Request<ControlBatchRequest>,
    ) -> Result<Response<ControlBatchResponse>, Status> {
        let results = self.hub.control_batch(request.into_inner().requests).await?;
        let results = results.into_iter().map(control_result).collect();
        Ok(Response::new(ControlBatchResponse { results }))
    }

    async fn query(&self, request: Request<QueryRequest>) -> Result<Response<QueryResponse>, Status> {
        Ok(Response::new(self.hub.query(request.into_inner()).await?))
    }

    async fn history(&self, request: Request<HistoryRequest>) -> Result<Response<HistoryResponse>, Status> {
        Ok(Response::new(self.hub.history(request.into_inner()).await?))
    }

    type SubscribeStream = SessionEvents;

    async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
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

    async fn report_events(
        &self,
        request: Request<ReportEventsRequest>,
    ) -> Result<Response<ReportEventsResponse>, Status> {
        self.hub.report_events(&request.into_inner().events).await?;
        Ok(Response::new(ReportEventsResponse {}))
    }

    type ConsumeEventsStream = Consumer;

    async fn consume_events(
        &self,
        request: Request<ConsumeEventsRequest>,
    ) -> Result<Response<Self::ConsumeEventsStream>, Status> {
        let request = request.into_inner();
        Ok(Response::new(self.hub.consume_events(&request.group, request.max_unacked).await?))
    }

    async fn ack_events(&self, request: Request<AckEventsRequest>) -> Result<Response<AckEventsResponse>, Status> {
        let request = request.into_inner();
        self.hub.ack_events(&request.group, &request.ack_ids).await?;
        Ok(Response::new(AckEventsResponse {}))
    }

    async fn call(&self, request: Request<CallRequest>) -> Result<Response<CallResponse>, Status> {
        let answer = self.hub.call(request.into_inner()).await?;
        Ok(Response::new(CallResponse { answer: Some(answer) }))
    }

    type ServeCallsStream = ReceiverStream<Result<ServeCallsResponse, Status>>;

    async fn serve_calls(
        &self,
        request: Request<Streaming<ServeCallsRequest>>,
    ) -> Result<Response<Self::ServeCallsStream>, Status> {
        let mut incoming = request.into_inner();
        let methods = match incoming.message().await? {
            Some(ServeCallsRequest { kind: Some(serve_calls_request::Kind::Start(start)) }) => start.methods,
            _ => return Err(Status::invalid_argument("the first message must be start, naming the methods served")),
        };
        let (tx, rx) = mpsc::channel(BACKEND_QUEUE);
        let registration = self.hub.serve_calls(methods, tx.clone())?;
        let hub = self.hub.clone();
        let closing = hub.backends_closing();
        // Answers are read by one task; the backend's stream ends its
        // registration, and its unanswered calls fail at once.
        tokio::spawn(async move {
            tokio::pin!(closing);
            loop {
                tokio::select! {
                    () = &mut closing => break,
                    message = incoming.message() => match message {
                        Ok(Some(ServeCallsRequest { kind: Some(serve_calls_request::Kind::Answer(answer)) })) => {
                            hub.answer_call(&registration, answer);
                        }
                        Ok(Some(_)) => {
                            let status = Status::invalid_argument("only the first message may be start; then answers");
                            let _ = tx.send(Err(status)).await;
                            break;
                        }
                        Ok(None) | Err(_) => break,
                    },
                    () = tx.closed() => break,
                }
            }
            hub.stop_serving(registration);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
