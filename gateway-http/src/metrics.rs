//! The HTTP gateway's metrics, rendered on its admin port.

use std::time::Instant;

use axum::http::StatusCode;
use herald_common::metrics::{Counter, Exposition, Histogram};

#[derive(Debug)]
pub struct HttpMetrics {
    ok: Counter,
    client_error: Counter,
    broker_error: Counter,
    /// Messages handed to the broker (one per classic or /v1/publish request, N per batch).
    pub messages_published: Counter,
    /// Controls the broker carried out (`/v1/control`).
    pub controls: Counter,
    /// Queries the broker answered (`/v1/query` and the `GET /v1/…` views).
    pub queries: Counter,
    /// Requests refused for a missing or wrong API key.
    pub auth_failures: Counter,
    /// Requests answered 408 because their body did not arrive in time.
    pub body_timeouts: Counter,
    /// Time to answer a request (the broker's part included).
    request_duration: Histogram,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        Self {
            ok: Counter::default(),
            client_error: Counter::default(),
            broker_error: Counter::default(),
            messages_published: Counter::default(),
            controls: Counter::default(),
            queries: Counter::default(),
            auth_failures: Counter::default(),
            body_timeouts: Counter::default(),
            request_duration: Histogram::latency(),
        }
    }
}

impl HttpMetrics {
    /// Records one answered request that started at `started`.
    pub fn record(&self, status: StatusCode, started: Instant) {
        self.request_duration.observe_seconds(started.elapsed().as_secs_f64());
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
            "Requests answered (publishes, controls and queries), by outcome.",
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
            "herald_http_body_timeouts_total",
            "Requests answered 408 because their body did not arrive within the request timeout.",
            &self.body_timeouts,
        );
        out.histogram(
            "herald_http_request_duration_seconds",
            "Time to answer a request, the broker's part included.",
            &self.request_duration,
        );
        out.counter(
            "herald_http_messages_published_total",
            "Messages handed to the broker and accepted.",
            &self.messages_published,
        );
        out.counter(
            "herald_http_controls_total",
            "Controls (binds, groups, data, closes) the broker carried out.",
            &self.controls,
        );
        out.counter("herald_http_queries_total", "Queries the broker answered.", &self.queries);
    }
}
