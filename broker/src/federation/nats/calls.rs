//! Client calls across the cluster: a call no backend of the gateway's
//! broker serves goes to a broker whose backends do.
//!
//! A broker whose backends serve a method listens on `<prefix>_rpc.<method>`
//! in the queue group `herald`, so NATS hands each call to one such broker;
//! it asks its backend (through the hub, [`Notice::Call`]) and replies. A
//! reply carries the encoded `CallResponse`, or a `Herald-Call-Error` header
//! naming the failure with its message as the payload. No broker listening
//! is NATS's "no responders": no backend serves the method.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_nats::HeaderMap;
use herald_proto::v1::{CallAnswer, CallRequest, CallResponse};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::backends::DEFAULT_CALL_TIMEOUT;
use crate::backends::calls::CallFailure;
use crate::federation::{Interest, Notice};

const ERROR_HEADER: &str = "Herald-Call-Error";
const QUEUE_GROUP: &str = "herald";
/// Extra time a forwarded call waits for the serving broker's reply.
const REPLY_MARGIN: Duration = Duration::from_millis(500);

pub(super) struct CallRouter {
    client: async_nats::Client,
    subject_prefix: String,
    notices: mpsc::Sender<Notice>,
    /// The methods this broker's backends serve, each with its listener.
    served: Mutex<HashMap<String, CancellationToken>>,
    stop: CancellationToken,
}

impl CallRouter {
    pub(super) fn new(
        client: async_nats::Client,
        subject_prefix: String,
        notices: mpsc::Sender<Notice>,
        stop: CancellationToken,
    ) -> Self {
        Self { client, subject_prefix, notices, served: Mutex::default(), stop }
    }

    fn subject(&self, method: &str) -> String {
        format!("{}_rpc.{method}", self.subject_prefix)
    }

    /// Starts or stops listening for calls of a method.
    pub(super) fn serve(&self, change: Interest) {
        let mut served = self.served.lock().unwrap_or_else(PoisonError::into_inner);
        match change {
            Interest::Add(method) => {
                let token = self.stop.child_token();
                if let Some(old) = served.insert(method.clone(), token.clone()) {
                    old.cancel();
                }
                let subject = self.subject(&method);
                tokio::spawn(listen(self.client.clone(), subject, self.notices.clone(), token));
            }
            Interest::Remove(method) => {
                if let Some(token) = served.remove(&method) {
                    token.cancel();
                }
            }
        }
    }

    /// Hands a call to a broker whose backends serve its method.
    pub(super) async fn forward(&self, request: &CallRequest, timeout: Duration) -> Result<CallAnswer, CallFailure> {
        let method = request.method.clone();
        let asked = self.client.request(self.subject(&method), request.encode_to_vec().into());
        let reply = match tokio::time::timeout(timeout + REPLY_MARGIN, asked).await {
            Err(_) => return Err(CallFailure::TimedOut { method, timeout }),
            Ok(Err(e)) => {
                return Err(match e.kind() {
                    async_nats::RequestErrorKind::NoResponders => CallFailure::NoBackend(method),
                    async_nats::RequestErrorKind::TimedOut => CallFailure::TimedOut { method, timeout },
                    _ => CallFailure::Unavailable(format!("the cluster could not be asked: {e}")),
                });
            }
            Ok(Ok(reply)) => reply,
        };
        if let Some(kind) = reply.headers.as_ref().and_then(|h| h.get(ERROR_HEADER)) {
            let message = String::from_utf8_lossy(&reply.payload).into_owned();
            return Err(match kind.as_str() {
                "no_backend" => CallFailure::NoBackend(method),
                "timed_out" => CallFailure::TimedOut { method, timeout },
                "backend_gone" => CallFailure::BackendGone(method),
                "invalid" => CallFailure::Invalid(message),
                _ => CallFailure::Unavailable(message),
            });
        }
        let response = CallResponse::decode(reply.payload)
            .map_err(|e| CallFailure::Unavailable(format!("undecodable answer from another broker: {e}")))?;
        response.answer.ok_or_else(|| CallFailure::Unavailable("another broker answered without an answer".into()))
    }
}

/// Answers the calls of one method for the cluster until `stop`.
async fn listen(client: async_nats::Client, subject: String, notices: mpsc::Sender<Notice>, stop: CancellationToken) {
    let mut calls = match client.queue_subscribe(subject.clone(), QUEUE_GROUP.to_owned()).await {
        Ok(calls) => calls,
        Err(e) => {
            tracing::warn!(%subject, error = %e, "cannot take calls from the cluster");
            return;
        }
    };
    loop {
        let call = tokio::select! {
            () = stop.cancelled() => break,
            call = calls.next() => match call {
                Some(call) => call,
                None => break,
            },
        };
        let Some(reply) = call.reply.clone() else { continue };
        let (client, notices) = (client.clone(), notices.clone());
        tokio::spawn(async move {
            let outcome = match CallRequest::decode(call.payload) {
                Ok(request) => ask_here(&notices, request).await,
                Err(e) => Err(CallFailure::Invalid(format!("undecodable call: {e}"))),
            };
            let (headers, payload) = match outcome {
                Ok(answer) => (HeaderMap::new(), CallResponse { answer: Some(answer) }.encode_to_vec()),
                Err(failure) => {
                    let mut headers = HeaderMap::new();
                    headers.insert(ERROR_HEADER, failure_kind(&failure));
                    (headers, failure.to_string().into_bytes())
                }
            };
            if let Err(e) = client.publish_with_headers(reply, headers, payload.into()).await {
                tracing::debug!(error = %e, "replying to a cluster call failed");
            }
        });
    }
    let _ = calls.unsubscribe().await;
}

/// Asks a backend of this broker, through the hub.
async fn ask_here(notices: &mpsc::Sender<Notice>, request: CallRequest) -> Result<CallAnswer, CallFailure> {
    let timeout = match request.timeout_ms {
        0 => DEFAULT_CALL_TIMEOUT,
        ms => Duration::from_millis(u64::from(ms)),
    };
    let (reply, answer) = oneshot::channel();
    notices
        .send(Notice::Call { request, timeout, reply })
        .await
        .map_err(|_| CallFailure::Unavailable("broker shutting down".into()))?;
    answer.await.map_err(|_| CallFailure::Unavailable("broker shutting down".into()))?
}

fn failure_kind(failure: &CallFailure) -> &'static str {
    match failure {
        CallFailure::Invalid(_) => "invalid",
        CallFailure::NoBackend(_) => "no_backend",
        CallFailure::TimedOut { .. } => "timed_out",
        CallFailure::BackendGone(_) => "backend_gone",
        CallFailure::Unavailable(_) => "unavailable",
    }
}
