//! The gateway's session with its broker.
//!
//! The link claims the gateway's worker id and subscribes to `broadcast`,
//! then hands every event to the registry. When the session breaks it
//! reconnects with backoff (to the next broker address when several are
//! given) and claims and subscribes again by itself; clients stay connected
//! throughout. Losing the worker id to another live gateway is fatal.

use std::sync::Arc;
use std::time::Duration;

use herald_broker::{BrokerClient, BrokerSession};
use herald_common::backoff::Backoff;
use herald_proto::names::BROADCAST_CHANNEL;
use herald_proto::v1::{
    ClaimWorker, Event, SubscribeChannels, SubscribeRequest, content, subscribe_request, subscribe_response, target,
};
use tokio_stream::StreamExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use crate::Shared;
use crate::registry::SendError;

const CLAIM_REQUEST: u64 = 1;
const SUBSCRIBE_REQUEST: u64 = 2;

/// The link cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("worker id {worker_id:?} is held by another live gateway ({message})")]
    WorkerIdTaken { worker_id: String, message: String },
}

/// Keeps a broker session up until `shutdown`, or fails for good.
pub(crate) async fn run(
    shared: Arc<Shared>,
    broker: BrokerClient,
    shutdown: CancellationToken,
) -> Result<(), LinkError> {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let (status, linked) = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            outcome = session(&shared, &broker) => outcome,
        };
        shared.set_linked(false);
        if status.code() == Code::AlreadyExists {
            return Err(LinkError::WorkerIdTaken {
                worker_id: shared.config.worker_id.clone(),
                message: status.message().to_owned(),
            });
        }
        if linked {
            shared.metrics.broker_disconnects.inc();
            backoff.reset();
        }
        let delay = backoff.next_delay();
        tracing::warn!(code = ?status.code(), reason = status.message(), retry_in = ?delay, "broker session lost");
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Runs one broker session to its end. Returns why it ended and whether it
/// got as far as being linked.
async fn session(shared: &Shared, broker: &BrokerClient) -> (Status, bool) {
    let mut session = match open(shared, broker).await {
        Ok(session) => session,
        Err(status) => return (status, false),
    };
    let mut awaiting_acks = 2;
    while let Some(item) = session.events.next().await {
        let response = match item {
            Ok(response) => response,
            Err(status) => return (status, awaiting_acks == 0),
        };
        match response.kind {
            Some(subscribe_response::Kind::Event(event)) => dispatch(shared, event),
            Some(subscribe_response::Kind::Ack(_)) => {
                awaiting_acks -= 1;
                if awaiting_acks == 0 {
                    shared.set_linked(true);
                    tracing::info!(broker = %session.broker, worker_id = %shared.config.worker_id, "linked to broker");
                }
            }
            None => {}
        }
    }
    (Status::unavailable("broker ended the session"), awaiting_acks == 0)
}

async fn open(shared: &Shared, broker: &BrokerClient) -> Result<BrokerSession, Status> {
    let session = broker.open_session().await?;
    session
        .commands
        .send(SubscribeRequest {
            request_id: CLAIM_REQUEST,
            command: Some(subscribe_request::Command::ClaimWorker(ClaimWorker {
                worker_id: shared.config.worker_id.clone(),
                instance_id: shared.instance_id.clone(),
            })),
        })
        .await?;
    session
        .commands
        .send(SubscribeRequest {
            request_id: SUBSCRIBE_REQUEST,
            command: Some(subscribe_request::Command::Subscribe(SubscribeChannels {
                channels: vec![BROADCAST_CHANNEL.to_owned()],
            })),
        })
        .await?;
    Ok(session)
}

/// Delivers one broker event to the connections it targets.
fn dispatch(shared: &Shared, event: Event) {
    let Some(body) = event.content.and_then(|c| c.body) else {
        return;
    };
    let frame = match body {
        content::Body::Text(text) => Message::Text(text.into()),
        content::Body::Binary(bytes) => Message::Binary(bytes),
    };
    let metrics = &shared.metrics;
    match event.target.and_then(|t| t.kind) {
        Some(target::Kind::Broadcast(_)) => {
            let fanout = shared.registry.broadcast(&frame);
            metrics.frames_queued.add(fanout.delivered);
            metrics.dropped_overflow.add(fanout.overflowed);
        }
        Some(target::Kind::Connection(address)) if address.worker_id == shared.config.worker_id => {
            match shared.registry.send_to(&address.connection_id, frame) {
                Ok(()) => metrics.frames_queued.inc(),
                Err(SendError::UnknownConnection) => {
                    tracing::debug!(connection_id = %address.connection_id, "message for a connection that is not live");
                    metrics.dropped_unknown_connection.inc();
                }
                Err(SendError::Overflow) => metrics.dropped_overflow.inc(),
            }
        }
        other => tracing::debug!(target = ?other, channel = %event.channel, "ignoring an event with no target here"),
    }
}
