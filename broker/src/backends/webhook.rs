//! Webhooks: a consumer group whose instance POSTs its events to an HTTP
//! endpoint, for teams without gRPC.
//!
//! Each broker configured with a webhook runs one instance of the webhook's
//! group, so a cluster POSTs each event once (at least once: a batch is
//! POSTed again when it was not acknowledged). A batch is
//! `{"events": [...]}`, signed: `Herald-Signature: t=<unix seconds>,v1=<hex>`,
//! the hex being HMAC-SHA256 with the shared secret over `<t>.<body>`. A 2xx
//! answer acknowledges the batch. Anything else is retried with backoff, a
//! few times; then the batch is left to the group's ack wait, which hands it
//! out again, so the queue is the group's (bounded by the retention, its
//! overflow counted in `herald_events_dropped_total`).

use std::collections::VecDeque;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use herald_common::backoff::Backoff;
use herald_common::http_client::{HttpPoster, PostError, Trust};
use herald_common::metrics::{Counter, Exposition};
use herald_proto::v1::{ConnectionEvent, ConsumedEvent, DisconnectCause, connection_event, content};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::Hub;

/// Events in one POST, by default.
pub const DEFAULT_BATCH: usize = 100;
/// How long one POST may take, by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts at one batch before it is left to the ack wait, by default.
pub const DEFAULT_ATTEMPTS: u32 = 5;
/// The consumer group webhooks consume, by default.
pub const DEFAULT_GROUP: &str = "webhooks";
/// Shortest secret accepted.
const MIN_SECRET_LEN: usize = 16;

/// Where and how events are POSTed.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// `http://` or `https://`.
    pub url: String,
    /// Whom an `https://` endpoint's certificate must chain to.
    pub trust: Trust,
    /// Signs every POST (at least 16 characters).
    pub secret: String,
    pub group: String,
    pub batch: usize,
    pub timeout: Duration,
    pub attempts: u32,
}

/// A webhook that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook URL: {0}")]
    Url(#[from] PostError),
    #[error("--webhook-ca: {0}")]
    Ca(#[from] herald_common::tls::TlsError),
    #[error("the webhook secret must be at least {MIN_SECRET_LEN} characters")]
    ShortSecret,
    #[error("webhook group: {0}")]
    Group(String),
}

/// What webhooks did, for the broker's metrics.
#[derive(Debug, Default)]
pub(crate) struct WebhookMetrics {
    posted: Counter,
    events: Counter,
    refused: Counter,
    failed: Counter,
    abandoned: Counter,
}

impl WebhookMetrics {
    pub(crate) fn render(&self, out: &mut Exposition) {
        out.counter_family(
            "herald_webhook_requests_total",
            "Webhook POSTs, by outcome: ok (2xx), refused (another status), failed (no answer in time, or none).",
            &[
                (&[("outcome", "ok")], &self.posted),
                (&[("outcome", "refused")], &self.refused),
                (&[("outcome", "failed")], &self.failed),
            ],
        );
        out.counter("herald_webhook_events_total", "Events delivered by webhook (2xx).", &self.events);
        out.counter(
            "herald_webhook_batches_deferred_total",
            "Webhook batches that failed every attempt and were left to be delivered again after the ack wait.",
            &self.abandoned,
        );
    }
}

/// Checks a webhook's configuration, ready to run.
pub struct Webhook {
    config: WebhookConfig,
    poster: HttpPoster,
}

impl Webhook {
    pub fn new(config: WebhookConfig) -> Result<Self, WebhookError> {
        if config.secret.len() < MIN_SECRET_LEN {
            return Err(WebhookError::ShortSecret);
        }
        super::check_group(&config.group).map_err(WebhookError::Group)?;
        let poster = HttpPoster::new(&config.url, &config.trust)?;
        Ok(Self { config, poster })
    }

    /// POSTs the group's events until `shutdown`.
    ///
    /// The group hands events over as they come, often a few at a time. A
    /// POST takes every event already here, up to a batch, and the instance
    /// may hold two batches: the next one gathers while one is POSTed.
    /// (POSTing each handover as it came made batches of a few events, and
    /// the webhook fell behind at 20,000 events/s: BENCHMARKS, "Webhooks".)
    pub async fn run(self, hub: Hub, shutdown: CancellationToken) {
        let Self { config, poster } = self;
        let batch = config.batch.clamp(1, super::MAX_UNACKED / 2);
        let held = u32::try_from(2 * batch).unwrap_or(u32::MAX);
        let mut attempts = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let mut consumer = loop {
            match hub.consume_events(&config.group, held).await {
                Ok(consumer) => break consumer,
                Err(status) => {
                    tracing::warn!(%status, "the webhook cannot consume its group yet; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(attempts.next_delay()) => {}
                    }
                }
            }
        };
        let metrics = hub.webhook_metrics();
        let mut waiting: VecDeque<ConsumedEvent> = VecDeque::new();
        loop {
            if waiting.is_empty() {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    events = consumer.next_batch() => match events {
                        Some(events) => waiting.extend(events),
                        None => return,
                    },
                }
            }
            while waiting.len() < batch
                && let Some(more) = consumer.ready_batch()
            {
                waiting.extend(more);
            }
            let events: Vec<ConsumedEvent> = waiting.drain(..waiting.len().min(batch)).collect();
            let body = Bytes::from(batch_json(&events).to_string());
            let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
            let mut delivered = false;
            for attempt in 1..=config.attempts.max(1) {
                let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
                let signature = signature(&config.secret, timestamp, &body);
                let headers = [("herald-signature", signature.as_str())];
                match poster.post(body.clone(), &headers, config.timeout).await {
                    Ok(answer) if (200..300).contains(&answer.status) => {
                        metrics.posted.inc();
                        delivered = true;
                        break;
                    }
                    Ok(answer) => {
                        metrics.refused.inc();
                        tracing::warn!(status = answer.status, attempt, "webhook endpoint refused a batch");
                    }
                    Err(e) => {
                        metrics.failed.inc();
                        tracing::warn!(error = %e, attempt, "webhook POST failed");
                    }
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
            if !delivered {
                metrics.abandoned.inc();
                continue;
            }
            metrics.events.add(events.len() as u64);
            let ack_ids: Vec<String> = events.into_iter().map(|e| e.ack_id).collect();
            if let Err(status) = hub.ack_events(&config.group, &ack_ids).await {
                tracing::warn!(%status, "acknowledging webhook events failed: they will be POSTed again");
            }
        }
    }
}

/// `t=<timestamp>,v1=<hex HMAC-SHA256 of "<timestamp>.<body>">`.
pub fn signature(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut context = ring::hmac::Context::with_key(&key);
    context.update(timestamp.to_string().as_bytes());
    context.update(b".");
    context.update(body);
    let tag = context.sign();
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={timestamp},v1={hex}")
}

fn batch_json(events: &[ConsumedEvent]) -> Value {
    let events: Vec<Value> = events
        .iter()
        .filter_map(|consumed| {
            let mut value = event_json(consumed.event.as_ref()?);
            if let Value::Object(fields) = &mut value {
                fields.insert("delivery".into(), consumed.delivery.into());
            }
            Some(value)
        })
        .collect();
    json!({ "events": events })
}

/// One event as JSON: its id, kind, connection, user, time, and the
/// fields of its kind.
pub fn event_json(event: &ConnectionEvent) -> Value {
    let address = event.connection.clone().unwrap_or_default();
    let at_ms = event.at.as_ref().map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos / 1_000_000));
    let details = match &event.kind {
        Some(connection_event::Kind::Connect(c)) => json!({
            "remote_address": c.remote_address,
            "headers": c.headers,
            "client_protocol": c.client_protocol,
            "groups": c.groups,
        }),
        Some(connection_event::Kind::Disconnect(d)) => {
            json!({ "cause": cause_name(d.cause), "code": d.code, "reason": d.reason })
        }
        Some(connection_event::Kind::Subscribe(c) | connection_event::Kind::Unsubscribe(c)) => {
            json!({ "channel": c.channel })
        }
        Some(connection_event::Kind::Message(m)) => {
            let content = match m.content.as_ref().and_then(|c| c.body.as_ref()) {
                Some(content::Body::Text(text)) => json!({ "text": text }),
                Some(content::Body::Binary(bytes)) => json!({ "binary": STANDARD.encode(bytes) }),
                None => Value::Null,
            };
            json!({ "content": content })
        }
        None => json!({}),
    };
    let mut value = json!({
        "id": event.id,
        "kind": super::kind_name(event),
        "connection": { "worker_id": address.worker_id, "connection_id": address.connection_id },
        "user_id": event.user_id,
        "at_ms": at_ms,
    });
    if let (Value::Object(fields), Value::Object(extra)) = (&mut value, details) {
        fields.extend(extra);
    }
    value
}

fn cause_name(cause: i32) -> &'static str {
    match DisconnectCause::try_from(cause).unwrap_or(DisconnectCause::Unspecified) {
        DisconnectCause::Unspecified => "unspecified",
        DisconnectCause::Client => "client",
        DisconnectCause::SlowConsumer => "slow_consumer",
        DisconnectCause::Kicked => "kicked",
        DisconnectCause::GatewayShutdown => "gateway_shutdown",
        DisconnectCause::GatewayLost => "gateway_lost",
        DisconnectCause::ProtocolError => "protocol_error",
        DisconnectCause::Unresponsive => "unresponsive",
        DisconnectCause::TokenExpired => "token_expired",
        DisconnectCause::RateLimited => "rate_limited",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_proto::v1::{ConnectionAddress, DisconnectEvent};

    #[test]
    fn the_signature_is_hmac_sha256_over_the_timestamp_and_body() {
        // RFC 4231-style check against ring's own verification.
        let signed = signature("0123456789abcdef", 1_700_000_000, b"{\"events\":[]}");
        let hex = signed.strip_prefix("t=1700000000,v1=").unwrap();
        let tag: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"0123456789abcdef");
        assert!(ring::hmac::verify(&key, b"1700000000.{\"events\":[]}", &tag).is_ok());
    }

    #[test]
    fn an_event_is_rendered_with_its_kind_and_fields() {
        let event = ConnectionEvent {
            id: "w1.x.9".into(),
            connection: Some(ConnectionAddress { worker_id: "w1".into(), connection_id: "4".into() }),
            user_id: "ana".into(),
            at: Some(prost_types::Timestamp { seconds: 2, nanos: 5_000_000 }),
            kind: Some(connection_event::Kind::Disconnect(DisconnectEvent {
                cause: DisconnectCause::SlowConsumer as i32,
                code: 1008,
                reason: "slow_consumer".into(),
            })),
        };
        let value = event_json(&event);
        assert_eq!(value["kind"], "disconnect");
        assert_eq!(value["cause"], "slow_consumer");
        assert_eq!(value["code"], 1008);
        assert_eq!(value["connection"]["connection_id"], "4");
        assert_eq!(value["at_ms"], 2005);
    }

    #[test]
    fn a_webhook_needs_a_real_secret_and_an_http_or_https_url() {
        let config = WebhookConfig {
            url: "http://127.0.0.1:9/hook".into(),
            trust: Trust::Only(rustls::RootCertStore::empty()),
            secret: "0123456789abcdef".into(),
            group: DEFAULT_GROUP.into(),
            batch: DEFAULT_BATCH,
            timeout: DEFAULT_TIMEOUT,
            attempts: DEFAULT_ATTEMPTS,
        };
        assert!(Webhook::new(config.clone()).is_ok());
        assert!(matches!(
            Webhook::new(WebhookConfig { secret: "short".into(), ..config.clone() }),
            Err(WebhookError::ShortSecret)
        ));
        assert!(Webhook::new(WebhookConfig { url: "https://hooks.example.test/".into(), ..config.clone() }).is_ok());
        assert!(matches!(Webhook::new(WebhookConfig { url: "ftp://x/".into(), ..config }), Err(WebhookError::Url(_))));
    }
}
