//! The WebSocket gateway's metrics, rendered on its admin port.

use std::time::{SystemTime, UNIX_EPOCH};

use herald_common::metrics::{Counter, Exposition, Gauge, Histogram};
use herald_proto::v1::delivery;

use crate::close::CloseReason;
use crate::handshake::TOKEN_REFUSALS;
use crate::outbox::Taken;

#[derive(Debug)]
pub struct GatewayMetrics {
    /// Connections currently open.
    pub connections: Gauge,
    pub connections_opened: Counter,
    closed: [Counter; CloseReason::ALL.len()],
    /// Upgrades refused or failed before the connection was open.
    pub handshakes_failed: Counter,
    /// Frames queued on a connection.
    pub frames_queued: Counter,
    /// Frames dropped because their connection id is not live on this gateway.
    pub dropped_unknown_connection: Counter,
    /// Frames dropped because their connection is closing (overflowed or unresponsive).
    pub dropped_closing: Counter,
    /// Broker events dropped because they lacked a delivery or content.
    pub dropped_malformed: Counter,
    /// Pings sent by the heartbeat.
    pub pings_sent: Counter,
    /// Messages from clients, which herald does not route anywhere.
    pub client_messages_ignored: Counter,
    /// Payload bytes written to clients: greetings, deliveries, replies.
    pub bytes_sent: Counter,
    /// Payload bytes of data messages from clients.
    pub bytes_received: Counter,
    /// From the broker routing a message to its frame being written to a
    /// client, for the oldest frame of each write.
    pub delivery_latency: Histogram,
    /// 1 while the broker session is established.
    pub broker_linked: Gauge,
    /// Broker sessions lost (each is followed by a reconnect).
    pub broker_disconnects: Counter,
    /// Publications of channels with history read back to fill a gap.
    pub history_filled: Counter,
    /// Gaps in channels with history that could not be filled.
    pub history_gaps_unfilled: Counter,
    /// Events received from the broker, by delivery (everyone,
    /// connections, user, group, client channel).
    broker_events: [Counter; 5],
    /// Connection events stored by a broker.
    pub events_reported: Counter,
    /// Connection events dropped: the queue was full, or no broker stored
    /// them before shutdown.
    pub events_dropped: Counter,
    /// Reports of events a broker did not store (each retried).
    pub event_reports_failed: Counter,
    /// Connect hook verdicts: accepted, refused, down.
    pub hook_accepted: Counter,
    pub hook_refused: Counter,
    pub hook_down: Counter,
    /// Client-protocol commands carried out.
    pub commands_done: Counter,
    /// Client-protocol commands refused with an error reply.
    pub commands_refused: Counter,
    /// Controls received from the broker and carried out.
    pub controls: Counter,
    /// Handshakes refused for their token, by reason (as [`TOKEN_REFUSALS`]).
    token_refused: [Counter; TOKEN_REFUSALS.len()],
}

/// The delivery labels of `herald_ws_broker_events_total`, in the order of
/// `broker_events`.
const DELIVERIES: [&str; 5] = ["everyone", "connections", "user", "group", "channel"];

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self {
            connections: Gauge::default(),
            connections_opened: Counter::default(),
            closed: Default::default(),
            handshakes_failed: Counter::default(),
            frames_queued: Counter::default(),
            dropped_unknown_connection: Counter::default(),
            dropped_closing: Counter::default(),
            dropped_malformed: Counter::default(),
            pings_sent: Counter::default(),
            client_messages_ignored: Counter::default(),
            bytes_sent: Counter::default(),
            bytes_received: Counter::default(),
            delivery_latency: Histogram::latency(),
            broker_linked: Gauge::default(),
            broker_disconnects: Counter::default(),
            history_filled: Counter::default(),
            history_gaps_unfilled: Counter::default(),
            broker_events: Default::default(),
            events_reported: Counter::default(),
            events_dropped: Counter::default(),
            event_reports_failed: Counter::default(),
            hook_accepted: Counter::default(),
            hook_refused: Counter::default(),
            hook_down: Counter::default(),
            commands_done: Counter::default(),
            commands_refused: Counter::default(),
            controls: Counter::default(),
            token_refused: Default::default(),
        }
    }
}

impl GatewayMetrics {
    /// Records one batch written to a client.
    pub fn written(&self, taken: Taken) {
        self.bytes_sent.add(taken.bytes as u64);
        if taken.oldest_published_us > 0 {
            let now_us = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
            let latency_us = now_us.saturating_sub(taken.oldest_published_us);
            self.delivery_latency.observe_seconds(latency_us as f64 / 1e6);
        }
    }

    /// Counts one event received from the broker.
    pub fn broker_event(&self, to: &delivery::To) {
        let i = match to {
            delivery::To::Everyone(_) => 0,
            delivery::To::Connections(_) => 1,
            delivery::To::User(_) => 2,
            delivery::To::Group(_) => 3,
        };
        self.broker_events[i].inc();
    }

    /// Counts one event for the subscribers of a client channel.
    pub fn broker_channel_event(&self) {
        self.broker_events[4].inc();
    }

    /// Counts one handshake refused for its token.
    pub fn token_refused(&self, label: &str) {
        if let Some(i) = TOKEN_REFUSALS.iter().position(|l| *l == label) {
            self.token_refused[i].inc();
        }
    }

    pub fn closed(&self, reason: CloseReason) {
        self.closed[reason as usize].inc();
    }

    pub fn render(&self, out: &mut Exposition) {
        out.gauge("herald_ws_connections", "WebSocket connections currently open.", self.connections.get());
        out.counter("herald_ws_connections_opened_total", "WebSocket connections opened.", &self.connections_opened);
        let closed: Vec<_> =
            CloseReason::ALL.iter().map(|r| ([("reason", r.label())], &self.closed[*r as usize])).collect();
        let closed: Vec<(&[(&str, &str)], &Counter)> = closed.iter().map(|(l, c)| (&l[..], *c)).collect();
        out.counter_family("herald_ws_connections_closed_total", "WebSocket connections closed, by reason.", &closed);
        out.counter(
            "herald_ws_handshakes_failed_total",
            "WebSocket upgrades refused or failed before the connection opened.",
            &self.handshakes_failed,
        );
        out.counter(
            "herald_ws_frames_queued_total",
            "Frames queued for delivery to a connection.",
            &self.frames_queued,
        );
        out.counter_family(
            "herald_ws_frames_dropped_total",
            "Frames not delivered, by reason.",
            &[
                (&[("reason", "unknown_connection")], &self.dropped_unknown_connection),
                (&[("reason", "connection_closing")], &self.dropped_closing),
                (&[("reason", "malformed_event")], &self.dropped_malformed),
            ],
        );
        out.counter(
            "herald_ws_client_messages_ignored_total",
            "Data frames sent by classic raw clients while message events are off (herald does not route them).",
            &self.client_messages_ignored,
        );
        out.counter("herald_ws_pings_sent_total", "Heartbeat pings sent to clients.", &self.pings_sent);
        out.counter(
            "herald_ws_sent_bytes_total",
            "Payload bytes written to clients (greetings, deliveries, replies).",
            &self.bytes_sent,
        );
        out.counter(
            "herald_ws_received_bytes_total",
            "Payload bytes of data messages from clients.",
            &self.bytes_received,
        );
        out.histogram(
            "herald_ws_delivery_latency_seconds",
            "From the broker routing a message to its frame being written to the client (oldest frame of each write).",
            &self.delivery_latency,
        );
        out.gauge(
            "herald_ws_broker_linked",
            "1 while the gateway's broker session is established.",
            self.broker_linked.get(),
        );
        out.counter("herald_ws_broker_disconnects_total", "Broker sessions lost.", &self.broker_disconnects);
        out.counter(
            "herald_ws_history_filled_total",
            "Publications of channels with history read back to fill a gap (after a broker failover).",
            &self.history_filled,
        );
        out.counter(
            "herald_ws_history_gaps_unfilled_total",
            "Gaps in channels with history the history no longer covered: their clients were told to resubscribe.",
            &self.history_gaps_unfilled,
        );
        let events: Vec<_> = DELIVERIES.iter().zip(&self.broker_events).map(|(d, c)| ([("delivery", *d)], c)).collect();
        let events: Vec<(&[(&str, &str)], &Counter)> = events.iter().map(|(l, c)| (&l[..], *c)).collect();
        out.counter_family(
            "herald_ws_broker_events_total",
            "Events received from the broker, by delivery: a gateway receives only those with a recipient on it.",
            &events,
        );
        out.counter("herald_ws_events_reported_total", "Connection events stored by a broker.", &self.events_reported);
        out.counter(
            "herald_ws_events_dropped_total",
            "Connection events dropped: the queue to the broker was full, or no broker stored them before shutdown.",
            &self.events_dropped,
        );
        out.counter(
            "herald_ws_event_reports_failed_total",
            "Reports of connection events a broker did not store (each is retried).",
            &self.event_reports_failed,
        );
        out.counter_family(
            "herald_ws_connect_hook_total",
            "Connect hook verdicts: accepted, refused (401/403), or down (the down policy decided).",
            &[
                (&[("verdict", "accepted")], &self.hook_accepted),
                (&[("verdict", "refused")], &self.hook_refused),
                (&[("verdict", "down")], &self.hook_down),
            ],
        );
        out.counter("herald_ws_controls_total", "Controls received from the broker and carried out.", &self.controls);
        out.counter_family(
            "herald_ws_client_commands_total",
            "Client-protocol commands, by outcome (done, or refused with an error reply).",
            &[(&[("outcome", "done")], &self.commands_done), (&[("outcome", "refused")], &self.commands_refused)],
        );
        let refused: Vec<_> =
            TOKEN_REFUSALS.iter().zip(&self.token_refused).map(|(r, c)| ([("reason", *r)], c)).collect();
        let refused: Vec<(&[(&str, &str)], &Counter)> = refused.iter().map(|(l, c)| (&l[..], *c)).collect();
        out.counter_family(
            "herald_ws_tokens_refused_total",
            "WebSocket handshakes refused with 401 for their token, by reason.",
            &refused,
        );
    }
}
