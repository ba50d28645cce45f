//! A backend's side of webhooks: an endpoint ([`Endpoint`], over TLS when
//! asked) that checks each POST's `Herald-Signature` as a backend must,
//! answers 204, and hands every event in it to a [`Sink`], as the gRPC
//! consumer does. A POST that does not verify is answered 401 and counted
//! as an error.

use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Context;
use herald_proto::v1::{
    ConnectionAddress, ConnectionEvent, ConsumedEvent, Content, MessageEvent, connection_event, content,
};
use serde_json::Value;

use crate::consumer::{Progress, Sink};
use crate::endpoint::{Answer, Endpoint, Handler, Request};
use crate::message;

/// A running webhook endpoint, which gives its sink back when stopped.
pub struct Receiver<S> {
    pub progress: Arc<Progress>,
    /// What herald is given as `--webhook-url`.
    pub url: String,
    endpoint: Endpoint,
    handler: Arc<Verifier<S>>,
}

/// Verifies POSTs and feeds their events to the sink.
struct Verifier<S> {
    secret: String,
    sink: Mutex<Option<S>>,
    progress: Arc<Progress>,
}

impl<S: Sink> Receiver<S> {
    /// Listens on 127.0.0.1, over TLS when `tls`.
    pub async fn start(secret: &str, tls: bool, sink: S) -> anyhow::Result<Self> {
        let progress = Arc::new(Progress::default());
        let handler =
            Arc::new(Verifier { secret: secret.to_owned(), sink: Mutex::new(Some(sink)), progress: progress.clone() });
        let endpoint = Endpoint::start(tls, handler.clone()).await?;
        Ok(Self { progress, url: format!("{}/hook", endpoint.base), endpoint, handler })
    }

    /// What herald is given as `--webhook-ca`, over TLS.
    pub fn ca_file(&self) -> Option<&std::path::Path> {
        self.endpoint.ca_file.as_deref()
    }

    /// Stops listening and gives the sink back.
    pub fn stop(self) -> anyhow::Result<S> {
        drop(self.endpoint);
        self.handler.sink.lock().unwrap_or_else(PoisonError::into_inner).take().context("the sink was taken")
    }
}

impl<S: Sink> Handler for Verifier<S> {
    fn answer(&self, request: Request) -> Answer {
        match self.take(request.signature.as_deref(), &request.body) {
            Ok(()) => Answer { status: "204 No Content", body: Vec::new() },
            Err(e) => {
                self.progress.error(e);
                Answer { status: "401 Unauthorized", body: Vec::new() }
            }
        }
    }

    fn failed(&self, error: String) {
        self.progress.error(error);
    }
}

impl<S: Sink> Verifier<S> {
    /// Verifies one POST and hands its events to the sink.
    fn take(&self, signature: Option<&str>, body: &[u8]) -> Result<(), String> {
        verify(&self.secret, signature.ok_or("a POST without Herald-Signature")?, body)?;
        let document: Value = serde_json::from_slice(body).map_err(|e| format!("a body that is not JSON: {e}"))?;
        let events = document["events"].as_array().ok_or("a body without events")?;
        let now = message::now_ns();
        let mut sink = self.sink.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(sink) = sink.as_mut() else { return Ok(()) };
        for event in events {
            sink.take(delivery(event), now);
        }
        self.progress.record(events.len() as u64, now, sink.progress());
        Ok(())
    }
}

/// Checks `t=<timestamp>,v1=<hex>` against HMAC-SHA256 of `<timestamp>.<body>`.
fn verify(secret: &str, signature: &str, body: &[u8]) -> Result<(), String> {
    let fields: Vec<(&str, &str)> = signature.split(',').filter_map(|part| part.split_once('=')).collect();
    let field = |name| fields.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
    let (Some(timestamp), Some(hex)) = (field("t"), field("v1")) else {
        return Err(format!("a malformed signature {signature:?}"));
    };
    let tag: Option<Vec<u8>> =
        (0..hex.len()).step_by(2).map(|i| hex.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok())).collect();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let signed = [timestamp.as_bytes(), b".", body].concat();
    match tag {
        Some(tag) if ring::hmac::verify(&key, &signed, &tag).is_ok() => Ok(()),
        _ => Err("a POST whose signature does not verify".into()),
    }
}

/// One event of a POST as the consumer's sinks take it: a message event's
/// connection and text, and its delivery count.
fn delivery(event: &Value) -> ConsumedEvent {
    let text = event["content"]["text"].as_str();
    let kind = (event["kind"] == "message").then_some(()).and(text).map(|text| {
        connection_event::Kind::Message(MessageEvent {
            content: Some(Content { body: Some(content::Body::Text(text.to_owned())) }),
        })
    });
    let connection = &event["connection"];
    ConsumedEvent {
        event: Some(ConnectionEvent {
            id: event["id"].as_str().unwrap_or_default().to_owned(),
            connection: Some(ConnectionAddress {
                worker_id: connection["worker_id"].as_str().unwrap_or_default().to_owned(),
                connection_id: connection["connection_id"].as_str().unwrap_or_default().to_owned(),
            }),
            kind,
            ..ConnectionEvent::default()
        }),
        ack_id: String::new(),
        delivery: event["delivery"].as_u64().and_then(|d| u32::try_from(d).ok()).unwrap_or(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The broker's own signing, restated: HMAC-SHA256 over `<t>.<body>`.
    fn sign(secret: &str, timestamp: u64, body: &[u8]) -> String {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
        let tag = ring::hmac::sign(&key, &[timestamp.to_string().as_bytes(), b".", body].concat());
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        format!("t={timestamp},v1={hex}")
    }

    #[test]
    fn a_signed_body_verifies_and_a_tampered_or_unsigned_one_does_not() {
        let body = br#"{"events":[]}"#;
        let signature = sign("0123456789abcdef", 1_700_000_000, body);
        assert_eq!(verify("0123456789abcdef", &signature, body), Ok(()));
        assert!(verify("0123456789abcdef", &signature, br#"{"events":[1]}"#).is_err());
        assert!(verify("another secret!!", &signature, body).is_err());
        assert!(verify("0123456789abcdef", "t=1,v1=zz", body).is_err());
        assert!(verify("0123456789abcdef", "nonsense", body).is_err());
    }

    #[test]
    fn a_message_event_becomes_a_delivery_with_its_connection_and_text() {
        let event = serde_json::json!({
            "id": "gw.7.1", "kind": "message", "connection": {"worker_id": "gw", "connection_id": "7"},
            "content": {"text": "0:1::x"}, "delivery": 2
        });
        let delivery = delivery(&event);
        assert_eq!(crate::consumer::address_of(&delivery).as_deref(), Some("gw/7"));
        assert_eq!(delivery.delivery, 2);
        let Some(connection_event::Kind::Message(message)) = delivery.event.and_then(|e| e.kind) else {
            panic!("a message event")
        };
        assert_eq!(message.content.and_then(|c| c.body), Some(content::Body::Text("0:1::x".into())));
        let connect = delivery_kind(&serde_json::json!({"kind": "connect", "connection": {}}));
        assert!(connect.is_none(), "not a message: foreign to the sink");
    }

    fn delivery_kind(event: &Value) -> Option<connection_event::Kind> {
        delivery(event).event.and_then(|e| e.kind)
    }
}
