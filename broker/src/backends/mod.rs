//! The backends' side of the broker: connection events for consumer groups
//! (`ReportEvents`, `ConsumeEvents`, `AckEvents`), calls from clients to the
//! backends serving them (`Call`, `ServeCalls`), and webhooks.
//!
//! - [`log`]: where events wait for their groups (the [`log::EventLog`]
//!   trait), in memory ([`memory`]) or in JetStream (`federation::nats`);
//! - [`dispatch`]: a group's events shared among the instances attached to
//!   this broker;
//! - [`calls`]: the backends serving calls, and a call's way to one of them;
//! - [`webhook`]: a group consumed by HTTP POSTs.

pub mod calls;
mod dispatch;
pub mod log;
pub mod memory;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use herald_common::metrics::{Counter, Exposition};
use herald_proto::names;
use herald_proto::v1::{CallAnswer, CallRequest, ConnectionEvent, ServeCallsResponse, connection_event};
use tokio::sync::mpsc;

use self::calls::{CallFailure, Calls, Registration};
pub(crate) use self::dispatch::Consumer;
use self::dispatch::Dispatcher;
use self::log::{EventLog, LogError};

/// Most events in one report, and most ack ids in one acknowledgement.
pub const MAX_EVENTS_PER_CALL: usize = 10_000;
/// Most events an instance may hold unacknowledged, by default and at most.
pub const DEFAULT_MAX_UNACKED: usize = 1000;
pub const MAX_UNACKED: usize = 100_000;
/// Events kept per group, by default.
pub const DEFAULT_RETENTION: usize = 1_000_000;
/// How long events are kept, by default.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// How long a delivery waits for its acknowledgement, by default.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);
/// How long a gateway's session may be gone before its connections count
/// as lost, by default.
pub const DEFAULT_GATEWAY_GRACE: Duration = Duration::from_secs(10);
/// How long a call waits for its answer, by default and at most.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(5);
pub const MAX_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest group name.
const MAX_GROUP_LEN: usize = 64;
/// Longest event id or ack id.
const MAX_ID_LEN: usize = 256;
/// Most methods one backend serves.
const MAX_METHODS: usize = 1000;

/// How long events are kept and waited on.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Events kept per group (delivered and not): past it, a group's oldest
    /// are dropped.
    pub retention: usize,
    /// How long an event is kept.
    pub max_age: Duration,
    /// How long a delivery waits for its acknowledgement before it is
    /// delivered again.
    pub ack_wait: Duration,
    /// How long a gateway's session may be gone (and not back, here or on
    /// another broker) before its connections' disconnects are reported
    /// for it, as lost.
    pub gateway_grace: Duration,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            retention: DEFAULT_RETENTION,
            max_age: DEFAULT_MAX_AGE,
            ack_wait: DEFAULT_ACK_WAIT,
            gateway_grace: DEFAULT_GATEWAY_GRACE,
        }
    }
}

#[derive(Default)]
struct BackendMetrics {
    events_reported: Counter,
    events_acked: Counter,
    calls_answered: Counter,
    calls_no_backend: Counter,
    calls_timed_out: Counter,
    calls_failed: Counter,
    calls_late_answers: Counter,
}

/// The backends' side of one broker.
pub(crate) struct Backends {
    dispatcher: Arc<Dispatcher>,
    calls: Arc<Calls>,
    metrics: BackendMetrics,
    pub(crate) webhook: Arc<webhook::WebhookMetrics>,
}

impl Backends {
    pub(crate) fn new(log: Arc<dyn EventLog>, config: &LogConfig) -> Self {
        Self {
            dispatcher: Arc::new(Dispatcher::new(log, config.ack_wait)),
            calls: Arc::default(),
            metrics: BackendMetrics::default(),
            webhook: Arc::default(),
        }
    }

    /// Stores a gateway's events.
    pub(crate) async fn report(&self, events: &[ConnectionEvent]) -> Result<(), LogError> {
        if events.len() > MAX_EVENTS_PER_CALL {
            return Err(LogError::Invalid(format!(
                "report has {} events; the limit is {MAX_EVENTS_PER_CALL}",
                events.len()
            )));
        }
        for event in events {
            check_event(event).map_err(LogError::Invalid)?;
        }
        let count = events.len() as u64;
        self.dispatcher.log().store(events).await?;
        self.metrics.events_reported.add(count);
        Ok(())
    }

    /// Attaches an instance of `group`, once the group exists.
    pub(crate) async fn consume(&self, group: &str, max_unacked: u32) -> Result<Consumer, LogError> {
        check_group(group).map_err(LogError::Invalid)?;
        let max_unacked = match max_unacked as usize {
            0 => DEFAULT_MAX_UNACKED,
            n if n > MAX_UNACKED => {
                return Err(LogError::Invalid(format!("max_unacked is {n}; the limit is {MAX_UNACKED}")));
            }
            n => n,
        };
        self.dispatcher.attach(group, max_unacked).await
    }

    /// Acknowledges deliveries of `group`.
    pub(crate) async fn ack(&self, group: &str, ack_ids: &[String]) -> Result<(), LogError> {
        check_group(group).map_err(LogError::Invalid)?;
        if ack_ids.len() > MAX_EVENTS_PER_CALL {
            return Err(LogError::Invalid(format!("{} ack ids; the limit is {MAX_EVENTS_PER_CALL}", ack_ids.len())));
        }
        if let Some(bad) = ack_ids.iter().find(|id| !is_token(id)) {
            return Err(LogError::Invalid(format!("ack id {bad:?} is malformed")));
        }
        self.dispatcher.ack(group, ack_ids).await?;
        self.metrics.events_acked.add(ack_ids.len() as u64);
        Ok(())
    }

    /// Checks a call and its timeout.
    pub(crate) fn check_call(&self, request: &CallRequest) -> Result<Duration, CallFailure> {
        names::validate_channel(&request.method)
            .map_err(|e| CallFailure::Invalid(format!("method {:?}: {e}", request.method)))?;
        if request.data.as_ref().and_then(|d| d.body.as_ref()).is_none() {
            return Err(CallFailure::Invalid("data is required: text or binary".into()));
        }
        match Duration::from_millis(u64::from(request.timeout_ms)) {
            Duration::ZERO => Ok(DEFAULT_CALL_TIMEOUT),
            t if t > MAX_CALL_TIMEOUT => {
                Err(CallFailure::Invalid(format!("timeout_ms is {}; the limit is 60000", request.timeout_ms)))
            }
            t => Ok(t),
        }
    }

    /// Asks a backend on this broker.
    pub(crate) async fn call_local(&self, request: CallRequest, timeout: Duration) -> Result<CallAnswer, CallFailure> {
        let outcome = self.calls.call(request, timeout).await;
        self.count_call(&outcome);
        outcome
    }

    pub(crate) fn count_call(&self, outcome: &Result<CallAnswer, CallFailure>) {
        match outcome {
            Ok(_) => self.metrics.calls_answered.inc(),
            Err(CallFailure::NoBackend(_)) => self.metrics.calls_no_backend.inc(),
            Err(CallFailure::TimedOut { .. }) => self.metrics.calls_timed_out.inc(),
            Err(_) => self.metrics.calls_failed.inc(),
        }
    }

    /// Whether a backend on this broker serves `method`.
    pub(crate) fn serves(&self, method: &str) -> bool {
        self.calls.serves(method)
    }

    /// Registers a backend serving `methods`.
    pub(crate) fn serve(
        &self,
        methods: Vec<String>,
        tx: mpsc::Sender<Result<ServeCallsResponse, tonic::Status>>,
    ) -> Result<(Registration, Vec<String>), CallFailure> {
        if methods.is_empty() || methods.len() > MAX_METHODS {
            return Err(CallFailure::Invalid(format!("start names {} methods: 1 to {MAX_METHODS}", methods.len())));
        }
        for method in &methods {
            names::validate_channel(method).map_err(|e| CallFailure::Invalid(format!("method {method:?}: {e}")))?;
        }
        Ok(self.calls.register(methods, tx))
    }

    /// Hands a backend's answer to its caller.
    pub(crate) fn answer(&self, registration: &Registration, answer: CallAnswer) {
        if !self.calls.answer(registration, answer) {
            self.metrics.calls_late_answers.inc();
        }
    }

    /// Ends the streams of the instances and backends attached here: the
    /// broker is shutting down, and they move to another broker.
    pub(crate) fn shut_down(&self) {
        self.dispatcher.close_all();
        self.calls.close_all();
    }

    /// Resolves when the broker shuts down.
    pub(crate) fn closing(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.calls.closing()
    }

    pub(crate) fn render(&self, out: &mut Exposition) {
        let m = &self.metrics;
        out.counter(
            "herald_events_reported_total",
            "Connection events stored for consumer groups.",
            &m.events_reported,
        );
        out.counter("herald_events_acked_total", "Event deliveries acknowledged through this broker.", &m.events_acked);
        let dropped: Vec<(String, Counter)> = self
            .dispatcher
            .log()
            .dropped()
            .into_iter()
            .map(|(group, n)| {
                let counter = Counter::default();
                counter.add(n);
                (group, counter)
            })
            .collect();
        let samples: Vec<([(&str, &str); 1], &Counter)> =
            dropped.iter().map(|(group, n)| ([("group", group.as_str())], n)).collect();
        let samples: Vec<(&[(&str, &str)], &Counter)> = samples.iter().map(|(l, n)| (&l[..], *n)).collect();
        out.counter_family(
            "herald_events_dropped_total",
            "Events a consumer group lost because it fell behind the retention (oldest first).",
            &samples,
        );
        out.counter_family(
            "herald_calls_total",
            "Client calls to backends, by outcome.",
            &[
                (&[("outcome", "answered")], &m.calls_answered),
                (&[("outcome", "no_backend")], &m.calls_no_backend),
                (&[("outcome", "timed_out")], &m.calls_timed_out),
                (&[("outcome", "failed")], &m.calls_failed),
            ],
        );
        self.webhook.render(out);
        out.counter(
            "herald_calls_late_answers_total",
            "Backend answers that arrived after their call timed out.",
            &m.calls_late_answers,
        );
    }
}

/// An event's kind as subjects and webhooks name it: `connect`,
/// `disconnect`, `subscribe`, `unsubscribe` or `message` (`unknown` for an
/// event without one, which is never stored).
pub(crate) fn kind_name(event: &ConnectionEvent) -> &'static str {
    match event.kind {
        Some(connection_event::Kind::Connect(_)) => "connect",
        Some(connection_event::Kind::Disconnect(_)) => "disconnect",
        Some(connection_event::Kind::Subscribe(_)) => "subscribe",
        Some(connection_event::Kind::Unsubscribe(_)) => "unsubscribe",
        Some(connection_event::Kind::Message(_)) => "message",
        None => "unknown",
    }
}

/// Whether `value` is 1 to 256 visible ASCII characters.
fn is_token(value: &str) -> bool {
    !value.is_empty() && value.len() <= MAX_ID_LEN && value.bytes().all(|b| b.is_ascii_graphic())
}

fn check_group(group: &str) -> Result<(), String> {
    let ok = !group.is_empty()
        && group.len() <= MAX_GROUP_LEN
        && group.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok { Ok(()) } else { Err(format!("group {group:?} must be 1 to 64 characters of [A-Za-z0-9_-]")) }
}

fn check_event(event: &ConnectionEvent) -> Result<(), String> {
    if !is_token(&event.id) {
        return Err(format!("event id {:?} must be 1 to 256 visible ASCII characters", event.id));
    }
    let Some(address) = &event.connection else {
        return Err(format!("event {:?} has no connection", event.id));
    };
    names::validate_worker_id(&address.worker_id).map_err(|e| format!("event {:?}: {e}", event.id))?;
    names::validate_connection_id(&address.connection_id).map_err(|e| format!("event {:?}: {e}", event.id))?;
    match &event.kind {
        None => Err(format!("event {:?} has no kind", event.id)),
        Some(connection_event::Kind::Message(message))
            if message.content.as_ref().and_then(|c| c.body.as_ref()).is_none() =>
        {
            Err(format!("message event {:?} has no content", event.id))
        }
        Some(_) => Ok(()),
    }
}

/// Ack ids of the in-memory log: `m<delivery number>`.
mod ack_ids {
    pub(super) fn memory(delivery: u64) -> String {
        format!("m{delivery}")
    }

    pub(super) fn parse_memory(ack_id: &str) -> Option<u64> {
        ack_id.strip_prefix('m')?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_are_short_tokens() {
        assert!(check_group("billing-workers_2").is_ok());
        for bad in ["", "a.b", "a b", &"x".repeat(65)] {
            assert!(check_group(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_event_needs_an_id_an_address_and_a_kind() {
        use herald_proto::v1::{ConnectEvent, ConnectionAddress};
        let address = Some(ConnectionAddress { worker_id: "w1".into(), connection_id: "7".into() });
        let good = ConnectionEvent {
            id: "w1.x.1".into(),
            connection: address.clone(),
            kind: Some(connection_event::Kind::Connect(ConnectEvent::default())),
            ..Default::default()
        };
        assert!(check_event(&good).is_ok());
        assert!(check_event(&ConnectionEvent { id: String::new(), ..good.clone() }).is_err());
        assert!(check_event(&ConnectionEvent { connection: None, ..good.clone() }).is_err());
        assert!(check_event(&ConnectionEvent { kind: None, ..good.clone() }).is_err());
    }
}
