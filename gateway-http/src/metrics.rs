//! The HTTP gateway's metrics, rendered on its admin port.

use axum::http::StatusCode;
use herald_common::metrics::{Counter, Exposition};

#[derive(Debug, Default)]
pub struct HttpMetrics {
    ok: Counter,
    client_error: Counter,
    broker_error: Counter,
    /// Messages handed to the broker (one per classic or /v1/publish request, N per batch).
    pub messages_published: Counter,
    /// Requests refused for a missing or wrong API key.
    pub auth_failures: Counter,
}

impl HttpMetrics {
    pub fn record(&self, status: StatusCode) {
        if status.is_success() {
            self.ok.inc();
        } else if status.is_client_error() {
            self.client_error.inc();
        } else {
            self.broker_error.inc();
        }
    }

    pub fn render(&self, out: &mut Exposition) {
        out.counter_family(
            "herald_http_requests_total",
            "Publish requests answered, by outcome.",
            &[
                (&[("outcome", "ok")], &self.ok),
                (&[("outcome", "client_error")], &self.client_error),
                (&[("outcome", "broker_error")], &self.broker_error),
            ],
        );
        out.counter(
            "herald_http_auth_failures_total",
            "Requests refused for a missing or wrong API key.",
            &self.auth_failures,
        );
        out.counter(
            "herald_http_messages_published_total",
            "Messages handed to the broker and accepted.",
            &self.messages_published,
        );
    }
}
