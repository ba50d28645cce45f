//! The WebSocket gateway's metrics, rendered on its admin port.

use herald_common::metrics::{Counter, Exposition, Gauge};

use crate::connection::CloseReason;

#[derive(Debug, Default)]
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
    /// Pings sent by the heartbeat.
    pub pings_sent: Counter,
    /// Messages from clients, which herald does not route anywhere.
    pub client_messages_ignored: Counter,
    /// 1 while the broker session is established.
    pub broker_linked: Gauge,
    /// Broker sessions lost (each is followed by a reconnect).
    pub broker_disconnects: Counter,
}

impl GatewayMetrics {
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
            ],
        );
        out.counter(
            "herald_ws_client_messages_ignored_total",
            "Data frames sent by clients (herald does not route them).",
            &self.client_messages_ignored,
        );
        out.counter("herald_ws_pings_sent_total", "Heartbeat pings sent to clients.", &self.pings_sent);
        out.gauge(
            "herald_ws_broker_linked",
            "1 while the gateway's broker session is established.",
            self.broker_linked.get(),
        );
        out.counter("herald_ws_broker_disconnects_total", "Broker sessions lost.", &self.broker_disconnects);
    }
}
