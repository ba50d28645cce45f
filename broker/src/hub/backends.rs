//! The hub's face for backends: connection events reported by gateways and
//! consumed by groups, and clients' calls to the backends serving them. The
//! work is in [`crate::backends`]; this file adds what needs the hub (its
//! readiness, and the other brokers of a cluster).

use herald_proto::v1::{CallAnswer, CallRequest, ConnectionEvent, ServeCallsResponse};
use tokio::sync::mpsc;
use tonic::Status;

use std::time::SystemTime;

use herald_proto::v1::{ConnectionAddress, DisconnectCause, DisconnectEvent, connection_event};

use super::Hub;
use super::directory::Departed;
use crate::backends::Consumer;
use crate::backends::MAX_EVENTS_PER_CALL;
use crate::backends::calls::{CallFailure, Registration};
use crate::backends::log::LogError;
use crate::federation::Interest;

impl Hub {
    /// Stores a gateway's connection events for the consumer groups.
    pub async fn report_events(&self, events: &[ConnectionEvent]) -> Result<(), Status> {
        if self.is_shutting_down() {
            return Err(LogError::Unavailable("broker is shutting down".into()).into());
        }
        Ok(self.shared.backends.report(events).await?)
    }

    /// Attaches an instance of a consumer group, once the group exists.
    pub(crate) async fn consume_events(&self, group: &str, max_unacked: u32) -> Result<Consumer, Status> {
        if self.is_shutting_down() {
            return Err(LogError::Unavailable("broker is shutting down".into()).into());
        }
        Ok(self.shared.backends.consume(group, max_unacked).await?)
    }

    /// Acknowledges deliveries of a group.
    pub async fn ack_events(&self, group: &str, ack_ids: &[String]) -> Result<(), Status> {
        Ok(self.shared.backends.ack(group, ack_ids).await?)
    }

    /// Asks a backend serving the call's method: one on this broker if
    /// there is one, else one on another broker of the cluster.
    pub async fn call(&self, request: CallRequest) -> Result<CallAnswer, CallFailure> {
        let backends = &self.shared.backends;
        let timeout = backends.check_call(&request)?;
        if backends.serves(&request.method) {
            return backends.call_local(request, timeout).await;
        }
        let outcome = match self.federation().forward_call(&request, timeout).await {
            Some(outcome) => outcome,
            None => Err(CallFailure::NoBackend(request.method)),
        };
        backends.count_call(&outcome);
        outcome
    }

    /// Registers a backend serving `methods`, and tells the cluster which
    /// methods this broker now serves.
    pub(crate) fn serve_calls(
        &self,
        methods: Vec<String>,
        tx: mpsc::Sender<Result<ServeCallsResponse, Status>>,
    ) -> Result<Registration, CallFailure> {
        if self.is_shutting_down() {
            return Err(CallFailure::Unavailable("broker is shutting down".into()));
        }
        let (registration, new) = self.shared.backends.serve(methods, tx)?;
        for method in new {
            self.federation().serve_method(Interest::Add(method));
        }
        Ok(registration)
    }

    /// Hands a backend's answer to its caller.
    pub(crate) fn answer_call(&self, registration: &Registration, answer: CallAnswer) {
        self.shared.backends.answer(registration, answer);
    }

    /// Unregisters a backend; its unanswered calls fail at once.
    pub(crate) fn stop_serving(&self, registration: Registration) {
        for method in registration.end() {
            self.federation().serve_method(Interest::Remove(method));
        }
    }

    pub(crate) fn webhook_metrics(&self) -> std::sync::Arc<crate::backends::webhook::WebhookMetrics> {
        self.shared.backends.webhook.clone()
    }

    /// Reports the disconnects of a departed gateway's connections, as
    /// lost, unless its worker id is held again (here or on another broker)
    /// within the grace: then the gateway came back, its connections live.
    pub(super) fn watch_departed(&self, departed: Departed) {
        let hub = self.clone();
        let grace = self.shared.limits.events.gateway_grace;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let worker_id = &departed.worker_id;
            if hub.worker_is_held(worker_id) || hub.federation().held_elsewhere(worker_id) {
                return;
            }
            tracing::info!(
                worker_id,
                connections = departed.connections.len(),
                "a gateway went away without closing its connections: reporting them lost"
            );
            let at = prost_types::Timestamp::from(SystemTime::now());
            let events: Vec<ConnectionEvent> = departed
                .connections
                .iter()
                .map(|(connection_id, user)| ConnectionEvent {
                    id: herald_proto::names::disconnect_event_id(worker_id, &departed.instance_id, connection_id),
                    connection: Some(ConnectionAddress {
                        worker_id: worker_id.clone(),
                        connection_id: connection_id.clone(),
                    }),
                    user_id: user.as_deref().unwrap_or_default().to_owned(),
                    at: Some(at),
                    kind: Some(connection_event::Kind::Disconnect(DisconnectEvent {
                        cause: DisconnectCause::GatewayLost as i32,
                        code: 0,
                        reason: "gateway_lost".into(),
                    })),
                })
                .collect();
            for chunk in events.chunks(MAX_EVENTS_PER_CALL) {
                let mut backoff = herald_common::backoff::Backoff::new(
                    std::time::Duration::from_millis(100),
                    std::time::Duration::from_secs(5),
                );
                for _ in 0..10 {
                    match hub.shared.backends.report(chunk).await {
                        Ok(()) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "reporting lost connections failed; retrying");
                            tokio::time::sleep(backoff.next_delay()).await;
                        }
                    }
                }
            }
        });
    }

    /// Resolves when the broker shuts down: backends' streams end.
    pub(crate) fn backends_closing(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.shared.backends.closing()
    }
}
