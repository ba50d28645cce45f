//! The gateway's session with its broker.
//!
//! The link claims the gateway's worker id and subscribes to `broadcast`,
//! then reports the gateway's directory (every live connection, then every
//! change as it happens) and hands every event to the registry, and every
//! control to the registry to carry out. When the session breaks it
//! reconnects with backoff (to the next broker address when several are
//! given) and claims and subscribes again by itself; clients stay connected
//! throughout. Losing the worker id to another live gateway is fatal.
//! When the gateway shuts down, the link drains (see [`run`]).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use herald_client::{Broker, BrokerSession, SessionCommands};
use herald_common::backoff::Backoff;
use herald_proto::names::{self, BROADCAST_CHANNEL};
use herald_proto::v1::{
    ClaimWorker, ControlDone, DirectoryChange, DirectoryReport, Event, SubscribeChannels, SubscribeRequest,
    UnsubscribeChannels, content, subscribe_request, subscribe_response,
};
use tokio_stream::StreamExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use crate::shared::Shared;
use crate::{gaps, protocol};

const CLAIM_REQUEST: u64 = 1;
const SUBSCRIBE_REQUEST: u64 = 2;
const DRAIN_REQUEST: u64 = 3;
/// Directory reports carry this plus the journal position they reach, so
/// that their acks say how far the broker has followed.
const REPORT_REQUEST_BASE: u64 = 1 << 32;

/// The link cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the broker refused worker id {worker_id:?}: {message}")]
    WorkerIdTaken { worker_id: String, message: String },
}

/// How a broker session ended.
enum SessionEnd {
    /// Asked to stop: everything the broker queued before the stop was dispatched.
    Stopped,
    /// The session broke; `linked` says whether it had got as far as being linked.
    Lost { status: Status, linked: bool },
}

/// Keeps a broker session up until `stop`, or fails for good.
///
/// On `stop` the link drains: it unsubscribes from `broadcast` and keeps
/// dispatching until the broker acknowledges. The broker queues that ack
/// behind every event it queued for this session before, so every message
/// published before the drain began has then reached a connection's outbox.
pub(crate) async fn run(
    shared: Arc<Shared>,
    broker: Arc<dyn Broker>,
    stop: CancellationToken,
) -> Result<(), LinkError> {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    // Failed attempts since the link was last up: the first is a warning,
    // the retries that follow are debug lines.
    let mut failures = 0u64;
    loop {
        let (status, linked) = match session(&shared, broker.as_ref(), &stop).await {
            SessionEnd::Stopped => {
                shared.set_linked(false);
                return Ok(());
            }
            SessionEnd::Lost { status, linked } => (status, linked),
        };
        shared.set_linked(false);
        if status.code() == Code::AlreadyExists {
            return Err(LinkError::WorkerIdTaken {
                worker_id: shared.config.worker_id.clone(),
                message: status.message().to_owned(),
            });
        }
        shared.settle_claim();
        if linked {
            shared.metrics.broker_disconnects.inc();
            backoff.reset();
            failures = 0;
        }
        let delay = backoff.next_delay();
        if failures == 0 {
            tracing::warn!(code = ?status.code(), reason = herald_client::describe(&status), "no broker session; retrying with backoff");
        } else {
            tracing::debug!(code = ?status.code(), reason = herald_client::describe(&status), retry_in = ?delay, failures, "still no broker session");
        }
        failures += 1;
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Runs one broker session to its end.
async fn session(shared: &Shared, broker: &dyn Broker, stop: &CancellationToken) -> SessionEnd {
    let opened = tokio::select! {
        () = stop.cancelled() => return SessionEnd::Stopped,
        opened = broker.open_session() => opened,
    };
    let session = match opened {
        Ok(session) => session,
        Err(status) => return SessionEnd::Lost { status, linked: false },
    };
    let address = session.broker.clone();
    let end = run_session(shared, session, stop).await;
    if let SessionEnd::Lost { status, .. } = &end
        && status.code() != Code::AlreadyExists
    {
        broker.session_failed(&address);
    }
    end
}

async fn run_session(shared: &Shared, mut session: BrokerSession, stop: &CancellationToken) -> SessionEnd {
    if let Err(status) = claim_and_subscribe(shared, session.commands.as_ref()).await {
        return SessionEnd::Lost { status, linked: false };
    }
    let end = follow(shared, &mut session, stop).await;
    shared.registry.unfollow();
    end
}

async fn follow(shared: &Shared, session: &mut BrokerSession, stop: &CancellationToken) -> SessionEnd {
    let mut awaiting_acks = 2;
    let mut draining = false;
    let mut catching_up = true;
    // One directory report in flight at a time: what is journaled meanwhile
    // goes in the next one, sent when this one is acknowledged, so that a
    // burst of changes (subscriptions, connections) makes a few large
    // reports rather than many small ones.
    let mut report_in_flight = false;
    // One wait for the journal, kept across events: a fresh one per event
    // would register and unregister a waiter for every event received.
    let mut changed = std::pin::pin!(shared.registry.changed());
    loop {
        let item = tokio::select! {
            () = stop.cancelled(), if !draining => {
                if awaiting_acks > 0 || session.commands.send(drain_request()).await.is_err() {
                    return SessionEnd::Stopped;
                }
                draining = true;
                continue;
            }
            () = &mut changed, if awaiting_acks == 0 && !report_in_flight => {
                changed.set(shared.registry.changed());
                match report_changes(shared, session.commands.as_ref()).await {
                    Ok(sent) => report_in_flight = sent,
                    Err(status) => return SessionEnd::Lost { status, linked: true },
                }
                continue;
            }
            item = session.events.next() => item,
        };
        let response = match item {
            Some(Ok(response)) => response,
            Some(Err(_)) | None if draining => return SessionEnd::Stopped,
            Some(Err(status)) => return SessionEnd::Lost { status, linked: awaiting_acks == 0 },
            None => {
                let status = Status::unavailable("broker ended the session");
                return SessionEnd::Lost { status, linked: awaiting_acks == 0 };
            }
        };
        match response.kind {
            Some(subscribe_response::Kind::Event(event)) => gaps::dispatch(shared, event).await,
            Some(subscribe_response::Kind::Control(control)) => {
                let request = control.request.unwrap_or_default();
                shared.metrics.controls.inc();
                // Confirmed in the next report, which gathers the controls
                // and changes of a burst into one command.
                shared.registry.apply_control(&shared.config.worker_id, control.control_id, request);
            }
            Some(subscribe_response::Kind::Ack(ack)) if ack.request_id == DRAIN_REQUEST => return SessionEnd::Stopped,
            Some(subscribe_response::Kind::Ack(ack)) if ack.request_id >= REPORT_REQUEST_BASE => {
                shared.followed.advance(ack.request_id - REPORT_REQUEST_BASE);
                match report_changes(shared, session.commands.as_ref()).await {
                    Ok(sent) => report_in_flight = sent,
                    Err(status) => return SessionEnd::Lost { status, linked: true },
                }
                // The broker follows this session's channels from here on:
                // what was published on them meanwhile can be read back.
                if std::mem::take(&mut catching_up) {
                    gaps::catch_up(shared).await;
                }
            }
            Some(subscribe_response::Kind::Ack(_)) => {
                awaiting_acks -= 1;
                if awaiting_acks == 0 {
                    // The broker follows the directory from this snapshot on.
                    let (changes, upto) = shared.registry.snapshot();
                    let count = changes.len();
                    if let Err(status) = session.commands.send(report(changes, Vec::new(), upto)).await {
                        return SessionEnd::Lost { status, linked: false };
                    }
                    report_in_flight = true;
                    shared.set_linked(true);
                    tracing::info!(broker = %session.broker, worker_id = %shared.config.worker_id, connections = count, "linked to broker");
                }
            }
            None => {}
        }
    }
}

/// Sends what the directory journaled since the last report, if anything;
/// says whether it sent a report.
async fn report_changes(shared: &Shared, commands: &dyn SessionCommands) -> Result<bool, Status> {
    match shared.registry.take_journal() {
        Some((changes, done, upto)) => commands.send(report(changes, done, upto)).await.map(|()| true),
        None => Ok(false),
    }
}

fn report(changes: Vec<DirectoryChange>, done: Vec<ControlDone>, upto: u64) -> SubscribeRequest {
    SubscribeRequest {
        request_id: REPORT_REQUEST_BASE + upto,
        command: Some(subscribe_request::Command::Report(DirectoryReport { changes, done })),
    }
}

fn drain_request() -> SubscribeRequest {
    SubscribeRequest {
        request_id: DRAIN_REQUEST,
        command: Some(subscribe_request::Command::Unsubscribe(UnsubscribeChannels {
            channels: vec![BROADCAST_CHANNEL.to_owned()],
        })),
    }
}

async fn claim_and_subscribe(shared: &Shared, commands: &dyn SessionCommands) -> Result<(), Status> {
    commands
        .send(SubscribeRequest {
            request_id: CLAIM_REQUEST,
            command: Some(subscribe_request::Command::ClaimWorker(ClaimWorker {
                worker_id: shared.config.worker_id.clone(),
                instance_id: shared.instance_id.clone(),
                reports_disconnects: shared.events.kinds().disconnect,
            })),
        })
        .await?;
    commands
        .send(SubscribeRequest {
            request_id: SUBSCRIBE_REQUEST,
            command: Some(subscribe_request::Command::Subscribe(SubscribeChannels {
                channels: vec![BROADCAST_CHANNEL.to_owned()],
            })),
        })
        .await
}

/// Carries out one broker event's delivery: the broker decided which
/// connections get it; the gateway only queues the frame on them. An event
/// on a client channel carries no delivery: it is for the channel's
/// subscribers here.
pub(crate) fn dispatch(shared: &Shared, event: Event) {
    let metrics = &shared.metrics;
    let Some(body) = event.content.and_then(|c| c.body) else {
        tracing::warn!(channel = %event.channel, "dropping a broker event without content");
        metrics.dropped_malformed.inc();
        return;
    };
    let published_us = event
        .published_at
        .map_or(0, |t| u64::try_from(t.seconds).unwrap_or(0) * 1_000_000 + u64::try_from(t.nanos / 1000).unwrap_or(0));
    let outcome = match event.delivery.and_then(|d| Some((d.to?, d.except))) {
        Some((to, except)) => {
            metrics.broker_event(&to);
            let worker_id = &shared.config.worker_id;
            let except: HashSet<u64> = except
                .iter()
                .filter(|a| a.worker_id == *worker_id)
                .filter_map(|a| a.connection_id.parse().ok())
                .collect();
            let frame = match body {
                content::Body::Text(text) => Message::Text(text.into()),
                content::Body::Binary(bytes) => Message::Binary(bytes),
            };
            shared.registry.deliver(&to, &except, frame, published_us)
        }
        None if names::client_channel(&event.channel).is_some() => {
            metrics.broker_channel_event();
            let worker_id = &shared.config.worker_id;
            let except: HashSet<u64> = event
                .target
                .iter()
                .flat_map(|t| &t.except)
                .filter(|a| a.worker_id == *worker_id)
                .filter_map(|a| a.connection_id.parse().ok())
                .collect();
            let (frame, position) = match &event.presence_change {
                Some(change) => (protocol::presence_change(&event.channel, change), None),
                None => {
                    (protocol::publication(&event.channel, &body, event.position.as_ref()), event.position.as_ref())
                }
            };
            shared.registry.deliver_to_channel(&event.channel, &except, position, frame, published_us)
        }
        None => {
            tracing::warn!(channel = %event.channel, "dropping a broker event that says nothing of its delivery");
            metrics.dropped_malformed.inc();
            return;
        }
    };
    metrics.frames_queued.add(outcome.queued);
    metrics.dropped_closing.add(outcome.closing);
    if outcome.unknown > 0 {
        tracing::debug!(count = outcome.unknown, "message for a connection that is not live");
        metrics.dropped_unknown_connection.add(outcome.unknown);
    }
}
