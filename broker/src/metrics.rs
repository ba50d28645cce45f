//! The broker's metrics, rendered on its admin port.

use herald_common::metrics::{Counter, Exposition, Gauge};

use crate::control::CONTROL_LABELS;
use crate::error::PublishError;
use crate::route::TargetKind;

#[derive(Debug, Default)]
pub struct BrokerMetrics {
    published_broadcast: Counter,
    published_connection: Counter,
    published_channel: Counter,
    published_user: Counter,
    published_group: Counter,
    rejected_invalid: Counter,
    rejected_unknown_worker: Counter,
    rejected_unknown_connection: Counter,
    rejected_not_confirmed: Counter,
    rejected_remote: Counter,
    rejected_too_large: Counter,
    rejected_shutting_down: Counter,
    rejected_starting: Counter,
    rejected_key_in_flight: Counter,
    rejected_cluster_unavailable: Counter,
    /// Content bytes of the messages accepted for routing.
    pub published_bytes: Counter,
    /// Events handed to subscriber sessions.
    pub events_delivered: Counter,
    /// Published events handed to the cluster bus for other brokers.
    pub events_forwarded: Counter,
    /// Events received from other brokers over the cluster bus.
    pub events_from_cluster: Counter,
    /// Messages on the cluster bus that were not events.
    pub cluster_undecodable: Counter,
    /// Sessions ended because they stopped reading their events.
    pub sessions_evicted: Counter,
    /// Worker claims refused because another instance holds the id.
    pub claims_refused: Counter,
    /// Calls refused for a missing or wrong API key.
    pub auth_failures: Counter,
    /// TLS handshakes on the gRPC port that failed (no or a wrong client
    /// certificate, plaintext, a timeout).
    pub tls_handshake_failures: Counter,
    /// Publishes whose idempotency key was already accepted (not routed again).
    pub duplicates: Counter,
    /// Idempotency keys forgotten before their window ended, for room.
    pub dedup_evicted: Counter,
    /// Controls carried out, by operation (as [`CONTROL_LABELS`]).
    pub controls: [Counter; CONTROL_LABELS.len()],
    /// Queries answered.
    pub queries: Counter,
    /// Publications stored in a channel's history.
    pub history_appends: Counter,
    /// Reads of a channel's history answered.
    pub history_reads: Counter,
    /// Questions and controls answered for other brokers.
    pub cluster_asks_answered: Counter,
    /// Gateways left out of an answer because they did not answer in time.
    pub answers_incomplete: Counter,
    /// Live subscriber sessions.
    pub sessions: Gauge,
    /// Channels with at least one listener.
    pub channels: Gauge,
    /// Worker ids held by live sessions.
    pub workers: Gauge,
}

impl BrokerMetrics {
    pub fn publish_accepted(&self, kind: TargetKind) {
        self.published(kind).inc();
    }

    pub fn published(&self, kind: TargetKind) -> &Counter {
        match kind {
            TargetKind::Broadcast => &self.published_broadcast,
            TargetKind::Connection => &self.published_connection,
            TargetKind::Channel => &self.published_channel,
            TargetKind::User => &self.published_user,
            TargetKind::Group => &self.published_group,
        }
    }

    pub fn publish_rejected(&self, e: &PublishError) {
        match e {
            PublishError::Invalid(_) | PublishError::BadName(_) | PublishError::NoHistory(_) => &self.rejected_invalid,
            PublishError::UnknownWorker(_) => &self.rejected_unknown_worker,
            PublishError::UnknownConnection { .. } => &self.rejected_unknown_connection,
            PublishError::NotConfirmed { .. } => &self.rejected_not_confirmed,
            PublishError::Remote { .. } => &self.rejected_remote,
            PublishError::TooLarge { .. } | PublishError::BatchTooLarge { .. } => &self.rejected_too_large,
            PublishError::ShuttingDown => &self.rejected_shutting_down,
            PublishError::Starting { .. } => &self.rejected_starting,
            PublishError::KeyInFlight => &self.rejected_key_in_flight,
            PublishError::ClusterUnavailable(_)
            | PublishError::GatewayReconnecting(_)
            | PublishError::HistoryUnavailable(_) => &self.rejected_cluster_unavailable,
        }
        .inc();
    }

    pub fn render(&self, out: &mut Exposition) {
        let published: Vec<_> = TargetKind::ALL.iter().map(|k| ([("target", k.label())], self.published(*k))).collect();
        let published: Vec<(&[(&str, &str)], &Counter)> = published.iter().map(|(l, c)| (&l[..], *c)).collect();
        out.counter_family(
            "herald_broker_published_total",
            "Messages accepted for routing, by target kind.",
            &published,
        );
        out.counter_family(
            "herald_broker_publish_rejected_total",
            "Publishes, controls and queries refused, by reason.",
            &[
                (&[("reason", "invalid")], &self.rejected_invalid),
                (&[("reason", "unknown_worker")], &self.rejected_unknown_worker),
                (&[("reason", "unknown_connection")], &self.rejected_unknown_connection),
                (&[("reason", "not_confirmed")], &self.rejected_not_confirmed),
                (&[("reason", "refused_by_other_broker")], &self.rejected_remote),
                (&[("reason", "too_large")], &self.rejected_too_large),
                (&[("reason", "shutting_down")], &self.rejected_shutting_down),
                (&[("reason", "starting")], &self.rejected_starting),
                (&[("reason", "key_in_flight")], &self.rejected_key_in_flight),
                (&[("reason", "cluster_unavailable")], &self.rejected_cluster_unavailable),
            ],
        );
        out.counter(
            "herald_broker_published_bytes_total",
            "Content bytes of the messages accepted for routing.",
            &self.published_bytes,
        );
        out.counter(
            "herald_broker_events_delivered_total",
            "Events handed to subscriber sessions.",
            &self.events_delivered,
        );
        out.counter(
            "herald_broker_cluster_events_forwarded_total",
            "Published events handed to the cluster bus for other brokers.",
            &self.events_forwarded,
        );
        out.counter(
            "herald_broker_cluster_events_received_total",
            "Events received from other brokers over the cluster bus.",
            &self.events_from_cluster,
        );
        out.counter(
            "herald_broker_cluster_undecodable_total",
            "Messages on the cluster bus that were not events.",
            &self.cluster_undecodable,
        );
        out.counter(
            "herald_broker_sessions_evicted_total",
            "Subscriber sessions ended because they stopped reading their events.",
            &self.sessions_evicted,
        );
        out.counter(
            "herald_broker_worker_claims_refused_total",
            "Worker id claims refused because another live gateway holds the id.",
            &self.claims_refused,
        );
        out.counter(
            "herald_broker_auth_failures_total",
            "Calls refused for a missing or wrong API key.",
            &self.auth_failures,
        );
        out.counter(
            "herald_broker_tls_handshake_failures_total",
            "TLS handshakes on the gRPC port that failed: no or an untrusted client certificate, plaintext, a timeout.",
            &self.tls_handshake_failures,
        );
        out.counter(
            "herald_broker_publish_duplicates_total",
            "Publishes whose idempotency key was already accepted within the window: not routed again.",
            &self.duplicates,
        );
        out.counter(
            "herald_broker_idempotency_keys_evicted_total",
            "Idempotency keys forgotten before the end of their window, to stay within capacity.",
            &self.dedup_evicted,
        );
        let controls: Vec<_> = CONTROL_LABELS.iter().zip(&self.controls).map(|(op, c)| ([("op", *op)], c)).collect();
        let controls: Vec<(&[(&str, &str)], &Counter)> = controls.iter().map(|(l, c)| (&l[..], *c)).collect();
        out.counter_family("herald_broker_controls_total", "Controls carried out, by operation.", &controls);
        out.counter("herald_broker_queries_total", "Queries answered.", &self.queries);
        out.counter(
            "herald_broker_history_appends_total",
            "Publications stored in a client channel's history.",
            &self.history_appends,
        );
        out.counter("herald_broker_history_reads_total", "Reads of a client channel's history.", &self.history_reads);
        out.counter(
            "herald_broker_cluster_asks_answered_total",
            "Controls and queries this broker answered for other brokers.",
            &self.cluster_asks_answered,
        );
        out.counter(
            "herald_broker_answers_incomplete_total",
            "Controls and queries answered without some gateway's part, which did not arrive in time.",
            &self.answers_incomplete,
        );
        out.gauge("herald_broker_sessions", "Live subscriber sessions.", self.sessions.get());
        out.gauge("herald_broker_channels", "Channels with at least one listener.", self.channels.get());
        out.gauge("herald_broker_workers", "Worker ids held by live gateways.", self.workers.get());
    }
}
