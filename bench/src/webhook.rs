//! A backend's side of webhooks: an HTTP/1.1 endpoint, over TLS when asked
//! (with a certificate made here for 127.0.0.1, which herald is told to
//! trust), that checks each POST's `Herald-Signature` as a backend must,
//! answers 204, and hands every event in it to a [`Sink`], as the gRPC
//! consumer does. A POST that does not verify is answered 401 and counted
//! as an error.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Context;
use herald_proto::v1::{
    ConnectionAddress, ConnectionEvent, ConsumedEvent, Content, MessageEvent, connection_event, content,
};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::consumer::{Progress, Sink};
use crate::message;

/// Largest POST body taken.
const MAX_BODY: usize = 64 << 20;

/// A running endpoint, which gives its sink back when stopped.
pub struct Receiver<S> {
    pub progress: Arc<Progress>,
    /// What herald is given as `--webhook-url`.
    pub url: String,
    /// What herald is given as `--webhook-ca`, over TLS.
    pub ca_file: Option<PathBuf>,
    shared: Arc<Shared<S>>,
    accepting: JoinHandle<()>,
}

struct Shared<S> {
    secret: String,
    sink: Mutex<Option<S>>,
    progress: Arc<Progress>,
}

impl<S: Sink> Receiver<S> {
    /// Listens on 127.0.0.1, over TLS when `tls`.
    pub async fn start(secret: &str, tls: bool, sink: S) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the webhook endpoint")?;
        let addr = listener.local_addr()?;
        let (acceptor, ca_file) = if tls {
            let (acceptor, ca_file) = self_signed(addr.port())?;
            (Some(acceptor), Some(ca_file))
        } else {
            (None, None)
        };
        let progress = Arc::new(Progress::default());
        let shared =
            Arc::new(Shared { secret: secret.to_owned(), sink: Mutex::new(Some(sink)), progress: progress.clone() });
        let accepting = tokio::spawn(accept(listener, acceptor, shared.clone()));
        let scheme = if tls { "https" } else { "http" };
        Ok(Self { progress, url: format!("{scheme}://{addr}/hook"), ca_file, shared, accepting })
    }

    /// Stops listening and gives the sink back.
    pub fn stop(self) -> anyhow::Result<S> {
        self.accepting.abort();
        if let Some(file) = &self.ca_file {
            let _ = std::fs::remove_file(file);
        }
        self.shared.sink.lock().unwrap_or_else(PoisonError::into_inner).take().context("the sink was taken")
    }
}

/// A certificate for 127.0.0.1, its own CA, written where herald can read it.
fn self_signed(port: u16) -> anyhow::Result<(TlsAcceptor, PathBuf)> {
    let rcgen::CertifiedKey { cert, signing_key } = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()])?;
    let ca_file = std::env::temp_dir().join(format!("herald-bench-webhook-{}-{port}.pem", std::process::id()));
    std::fs::write(&ca_file, cert.pem()).with_context(|| format!("writing {}", ca_file.display()))?;
    let key = rustls_pki_types::PrivateKeyDer::try_from(signing_key.serialize_der()).map_err(anyhow::Error::msg)?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)?;
    Ok((TlsAcceptor::from(Arc::new(config)), ca_file))
}

async fn accept<S: Sink>(listener: TcpListener, tls: Option<TlsAcceptor>, shared: Arc<Shared<S>>) {
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        let (tls, shared) = (tls.clone(), shared.clone());
        tokio::spawn(async move {
            let served = match tls {
                Some(tls) => match tls.accept(stream).await {
                    Ok(stream) => serve(stream, &shared).await,
                    Err(e) => Err(anyhow::anyhow!("TLS handshake: {e}")),
                },
                None => serve(stream, &shared).await,
            };
            if let Err(e) = served {
                shared.progress.error(format!("webhook connection: {e:#}"));
            }
        });
    }
}

/// Answers the POSTs of one keep-alive connection until it closes.
async fn serve<S: Sink, IO: AsyncRead + AsyncWrite + Unpin>(io: IO, shared: &Shared<S>) -> anyhow::Result<()> {
    let mut reader = BufReader::new(io);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let (mut length, mut signature) = (0usize, None);
        loop {
            line.clear();
            reader.read_line(&mut line).await?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                match name.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().context("content-length")?,
                    "herald-signature" => signature = Some(value.trim().to_owned()),
                    _ => {}
                }
            }
        }
        anyhow::ensure!(length <= MAX_BODY, "a body of {length} bytes");
        let mut body = vec![0; length];
        reader.read_exact(&mut body).await?;
        let status = match shared.take(signature.as_deref(), &body) {
            Ok(()) => "204 No Content",
            Err(e) => {
                shared.progress.error(e);
                "401 Unauthorized"
            }
        };
        reader.get_mut().write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes()).await?;
    }
}

impl<S: Sink> Shared<S> {
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
