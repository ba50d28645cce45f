//! Connection events for the backends: what happens on this gateway's
//! connections (connect, disconnect, subscribe, unsubscribe, a client's
//! message), reported to the broker, which keeps them for consumer groups.
//!
//! Connection tasks [`Events::emit`] into one bounded queue without waiting;
//! when it is full (the broker has been unreachable for that long) the event
//! is dropped and counted, so a connection never stalls on the backends. One
//! reporter task ([`report`]) sends the queue in batches, in order, and
//! retries a batch until a broker has stored it; each event's id is unique
//! in the cluster, so a retried batch is stored once. At shutdown the
//! reporter goes last, after the connections' disconnects.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use herald_client::Broker;
use herald_common::backoff::Backoff;
use herald_proto::names;
use herald_proto::v1::{
    ChannelEvent, ConnectEvent, ConnectionAddress, ConnectionEvent, Content, DisconnectCause, DisconnectEvent,
    MessageEvent, connection_event,
};
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::close::CloseReason;
use crate::config::EventKinds;
use crate::protocol::Protocol;
use crate::shared::Shared;

/// Most events in one report.
const MAX_BATCH: usize = 1000;
/// Most encoded bytes in one report (past one event): client messages may
/// be large, and a broker decodes 16 MiB at least.
const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// The event queue of one gateway.
pub(crate) struct Events {
    kinds: EventKinds,
    worker_id: String,
    instance_id: String,
    /// `<worker_id>.<instance_id>.`: with a sequence number, an id no other
    /// gateway process ever gives.
    id_prefix: String,
    next: AtomicU64,
    tx: mpsc::Sender<ConnectionEvent>,
    rx: Mutex<Option<mpsc::Receiver<ConnectionEvent>>>,
}

impl Events {
    pub(crate) fn new(kinds: EventKinds, worker_id: &str, instance_id: &str, queue: usize) -> Self {
        let (tx, rx) = mpsc::channel(queue.max(1));
        Self {
            kinds,
            worker_id: worker_id.to_owned(),
            instance_id: instance_id.to_owned(),
            id_prefix: format!("{worker_id}.{instance_id}."),
            next: AtomicU64::new(1),
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }

    pub(crate) fn kinds(&self) -> EventKinds {
        self.kinds
    }

    /// Queues an event about connection `connection_id` of `user_id`;
    /// false when the queue was full and it was dropped.
    fn emit(&self, connection_id: u64, user_id: Option<&str>, kind: connection_event::Kind) -> bool {
        let id = match kind {
            // Known to the broker too, which reports it if this gateway
            // goes away first.
            connection_event::Kind::Disconnect(_) => {
                names::disconnect_event_id(&self.worker_id, &self.instance_id, &connection_id.to_string())
            }
            _ => format!("{}{}", self.id_prefix, self.next.fetch_add(1, Ordering::Relaxed)),
        };
        let event = ConnectionEvent {
            id,
            connection: Some(ConnectionAddress {
                worker_id: self.worker_id.clone(),
                connection_id: connection_id.to_string(),
            }),
            user_id: user_id.unwrap_or_default().to_owned(),
            at: Some(prost_types::Timestamp::from(SystemTime::now())),
            kind: Some(kind),
        };
        self.tx.try_send(event).is_ok()
    }
}

impl Shared {
    /// Queues an event about live connection `id` (its user as the
    /// registry knows it); false (and counted) when the queue was full.
    fn emit(&self, id: u64, kind: connection_event::Kind) -> bool {
        let user = self.registry.user_of(id);
        let taken = self.events.emit(id, user.as_deref(), kind);
        if !taken {
            self.metrics.events_dropped.inc();
        }
        taken
    }

    /// A connection opened (its handshake done, its address known).
    pub(crate) fn connect_event(
        &self,
        id: u64,
        peer: SocketAddr,
        headers: Vec<(String, String)>,
        protocol: Protocol,
        groups: Vec<String>,
    ) {
        if self.events.kinds.connect {
            let event = ConnectEvent {
                remote_address: peer.to_string(),
                headers: headers.into_iter().collect(),
                client_protocol: match protocol {
                    Protocol::Raw => String::new(),
                    Protocol::Json => crate::protocol::SUBPROTOCOL.to_owned(),
                },
                groups,
            };
            self.emit(id, connection_event::Kind::Connect(event));
        }
    }

    /// A connection ended; `client_code` is the code of the client's close
    /// frame, when it sent one.
    pub(crate) fn disconnect_event(&self, id: u64, reason: CloseReason, client_code: Option<u16>) {
        if self.events.kinds.disconnect {
            let code = match reason {
                CloseReason::ClientClosed => client_code.unwrap_or(0),
                _ => reason.frame().map_or(0, |frame| u16::from(frame.code)),
            };
            let event = DisconnectEvent {
                cause: cause(reason) as i32,
                code: u32::from(code),
                reason: reason.label().to_owned(),
            };
            self.emit(id, connection_event::Kind::Disconnect(event));
        }
    }

    pub(crate) fn subscribe_event(&self, id: u64, channel: &str) {
        if self.events.kinds.subscribe {
            let event = ChannelEvent { channel: channel.to_owned() };
            self.emit(id, connection_event::Kind::Subscribe(event));
        }
    }

    pub(crate) fn unsubscribe_event(&self, id: u64, channel: &str) {
        if self.events.kinds.unsubscribe {
            let event = ChannelEvent { channel: channel.to_owned() };
            self.emit(id, connection_event::Kind::Unsubscribe(event));
        }
    }

    /// A client's message; false when it was not taken (message events are
    /// off, or the queue is full).
    pub(crate) fn message_event(&self, id: u64, content: Content) -> bool {
        self.events.kinds.message
            && self.emit(id, connection_event::Kind::Message(MessageEvent { content: Some(content) }))
    }
}

fn cause(reason: CloseReason) -> DisconnectCause {
    match reason {
        CloseReason::ClientClosed | CloseReason::ClientGone => DisconnectCause::Client,
        CloseReason::MessageTooBig
        | CloseReason::ProtocolError
        | CloseReason::InvalidPayload
        | CloseReason::BadCommand => DisconnectCause::ProtocolError,
        CloseReason::SlowConsumer | CloseReason::WriteTimeout => DisconnectCause::SlowConsumer,
        CloseReason::Unresponsive => DisconnectCause::Unresponsive,
        CloseReason::Shutdown => DisconnectCause::GatewayShutdown,
        CloseReason::WorkerIdLost => DisconnectCause::GatewayLost,
        CloseReason::Kicked => DisconnectCause::Kicked,
        CloseReason::TokenExpired => DisconnectCause::TokenExpired,
        CloseReason::TooManyMessages => DisconnectCause::RateLimited,
    }
}

/// Sends the queued events to the broker, in order, until `stop`; then
/// sends what is left, giving up on a batch no broker stores within the
/// drain timeout.
pub(crate) async fn report(shared: Arc<Shared>, broker: Arc<dyn Broker>, stop: CancellationToken) {
    let Some(mut rx) = shared.events.rx.lock().unwrap_or_else(PoisonError::into_inner).take() else {
        return;
    };
    let metrics = &shared.metrics;
    let mut received = Vec::with_capacity(MAX_BATCH);
    loop {
        if received.is_empty() {
            tokio::select! {
                count = rx.recv_many(&mut received, MAX_BATCH) => if count == 0 { return },
                () = stop.cancelled() => {
                    while received.len() < MAX_BATCH && let Ok(event) = rx.try_recv() {
                        received.push(event);
                    }
                    if received.is_empty() {
                        return;
                    }
                }
            }
        }
        let batch: Vec<ConnectionEvent> = received.drain(..batch_len(&received)).collect();
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        let mut gave_up_at = None;
        loop {
            match broker.report_events(&batch).await {
                Ok(()) => {
                    metrics.events_reported.add(batch.len() as u64);
                    break;
                }
                Err(status) => {
                    metrics.event_reports_failed.inc();
                    tracing::debug!(%status, events = batch.len(), "reporting events failed; retrying");
                    if stop.is_cancelled() {
                        let deadline = *gave_up_at
                            .get_or_insert_with(|| tokio::time::Instant::now() + shared.config.drain_timeout);
                        if tokio::time::Instant::now() >= deadline {
                            tracing::warn!(events = batch.len(), "shutting down with events no broker stored");
                            metrics.events_dropped.add(batch.len() as u64);
                            break;
                        }
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }
}

/// How many of `events`, from the first, make one report: at least one,
/// and no more than [`MAX_BATCH_BYTES`] encoded.
fn batch_len(events: &[ConnectionEvent]) -> usize {
    let mut bytes = 0;
    events
        .iter()
        .position(|event| {
            bytes += event.encoded_len();
            bytes > MAX_BATCH_BYTES
        })
        .map_or(events.len(), |i| i.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(bytes: usize) -> ConnectionEvent {
        let content = Content { body: Some(herald_proto::v1::content::Body::Binary(vec![0u8; bytes].into())) };
        ConnectionEvent {
            id: "w.i.1".into(),
            kind: Some(connection_event::Kind::Message(MessageEvent { content: Some(content) })),
            ..ConnectionEvent::default()
        }
    }

    #[test]
    fn a_report_is_bounded_in_bytes_but_always_carries_one_event() {
        let small: Vec<_> = (0..10).map(|_| message(100)).collect();
        assert_eq!(batch_len(&small), 10);
        let large: Vec<_> = (0..4).map(|_| message(3 * 1024 * 1024)).collect();
        assert_eq!(batch_len(&large), 2);
        let huge = vec![message(16 * 1024 * 1024), message(10)];
        assert_eq!(batch_len(&huge), 1);
    }
}
