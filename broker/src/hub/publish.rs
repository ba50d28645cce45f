//! Routing a publish: validate it and decide its delivery once ([`route`]),
//! hand it to the other brokers when they may need it, and deliver it into
//! the queues of the local sessions listening on its channel.
//!
//! A session's queue is bounded. When it is full the publisher waits up to a
//! grace period; a session that still does not drain is evicted with
//! `RESOURCE_EXHAUSTED` (its gateway reconnects), never silently skipped.
//!
//! [`route`]: crate::route

use std::sync::{Arc, PoisonError};
use std::time::SystemTime;

use herald_proto::v1::{Event, PublishRequest, PublishResponse, SubscribeResponse, subscribe_response};
use tokio::sync::mpsc;
use tonic::Status;

use super::Hub;
use super::index::Listeners;
use super::recent::Seen;
use super::session::Sink;
use crate::error::PublishError;
use crate::federation::Notice;
use crate::route::{self, Route};

/// A publish that passed the checks.
struct Routed {
    route: Route,
    /// The sessions of this broker listening on its channel.
    listeners: Option<Listeners<Arc<Sink>>>,
    /// Whether its worker (for a connection target) is held by a session of
    /// this broker, so that no other broker needs it.
    held_here: bool,
}

impl Hub {
    /// Routes one message. Returns how many sessions it was handed to.
    pub async fn publish(&self, mut req: PublishRequest) -> Result<PublishResponse, PublishError> {
        let metrics = &self.shared.metrics;
        let Routed { route, listeners, held_here } = self.route(&req).inspect_err(|e| metrics.publish_rejected(e))?;
        let key = std::mem::take(&mut req.idempotency_key);
        if !key.is_empty() {
            match self.first_use(&key).await.inspect_err(|e| metrics.publish_rejected(e))? {
                Seen::New => {}
                Seen::Routed => {
                    metrics.duplicates.inc();
                    return Ok(PublishResponse { subscribers: 0, forwarded: false, duplicate: true });
                }
                Seen::InFlight => {
                    let e = PublishError::KeyInFlight;
                    metrics.publish_rejected(&e);
                    return Err(e);
                }
            }
        }
        metrics.publish_accepted(route.kind);
        metrics.published_bytes.add(route.content_bytes as u64);
        let event = Event {
            channel: route.channel,
            target: req.target,
            content: req.content,
            published_at: Some(prost_types::Timestamp::from(SystemTime::now())),
            delivery: route.delivery,
        };
        // A connection on a gateway of this broker needs no other broker.
        let forwarded = match if held_here { None } else { self.federation().forward(&event) } {
            Some(forwarding) => {
                if let Err(e) = forwarding.await {
                    let e = PublishError::ClusterUnavailable(e.0);
                    metrics.publish_rejected(&e);
                    self.forget(&key);
                    return Err(e);
                }
                metrics.events_forwarded.inc();
                true
            }
            None => false,
        };
        let delivered = self.deliver(listeners, event).await;
        if !key.is_empty() {
            self.shared.recent.lock().unwrap_or_else(PoisonError::into_inner).settle(&key);
        }
        Ok(PublishResponse { subscribers: delivered, forwarded, duplicate: false })
    }

    /// Records an idempotency key, here and with the federation. A key that
    /// another broker recorded counts as routed: only this broker knows
    /// whether its own publishes are still on their way.
    async fn first_use(&self, key: &str) -> Result<Seen, PublishError> {
        let (seen, evicted) = self
            .shared
            .recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, tokio::time::Instant::now().into_std());
        self.shared.metrics.dedup_evicted.add(evicted);
        if seen != Seen::New {
            return Ok(seen);
        }
        match self.federation().first_use(key).await {
            Ok(true) => Ok(Seen::New),
            Ok(false) => {
                self.shared.recent.lock().unwrap_or_else(PoisonError::into_inner).settle(key);
                Ok(Seen::Routed)
            }
            Err(e) => {
                self.shared.recent.lock().unwrap_or_else(PoisonError::into_inner).remove(key);
                Err(PublishError::ClusterUnavailable(e.0))
            }
        }
    }

    /// Forgets an idempotency key whose publish was not routed after all.
    fn forget(&self, key: &str) {
        if !key.is_empty() {
            self.shared.recent.lock().unwrap_or_else(PoisonError::into_inner).remove(key);
            self.federation().forget(key);
        }
    }

    /// Routes several messages in order, each on its own.
    pub async fn publish_batch(
        &self,
        requests: Vec<PublishRequest>,
    ) -> Result<Vec<Result<PublishResponse, PublishError>>, PublishError> {
        let max = self.shared.limits.max_batch;
        if requests.len() > max {
            return Err(PublishError::BatchTooLarge { len: requests.len(), max });
        }
        let mut results = Vec::with_capacity(requests.len());
        for req in requests {
            results.push(self.publish(req).await);
        }
        Ok(results)
    }

    /// Checks a publish against the limits, the broker's state and the
    /// worker ids held.
    fn route(&self, req: &PublishRequest) -> Result<Routed, PublishError> {
        let route = route::resolve(req, self.shared.limits.max_content_bytes)?;
        let state = self.read();
        if state.shutting_down {
            return Err(PublishError::ShuttingDown);
        }
        if self.is_starting() {
            return Err(PublishError::Starting { grace: self.shared.limits.startup_grace });
        }
        if let Some(reason) = self.federation().unready_reason() {
            return Err(PublishError::ClusterUnavailable(reason.to_owned()));
        }
        let held_here = route.worker_id.as_ref().is_some_and(|w| state.index.holds(w));
        if let Some(worker_id) = &route.worker_id
            && !held_here
            && !self.federation().held_elsewhere(worker_id)
        {
            return Err(PublishError::UnknownWorker(worker_id.clone()));
        }
        let listeners = state.index.listeners(&route.channel);
        Ok(Routed { route, listeners, held_here })
    }

    /// Handles what the federation sends: events published on other brokers,
    /// and worker ids taken over elsewhere.
    pub(super) async fn on_notice(&self, notice: Notice) {
        let metrics = &self.shared.metrics;
        match notice {
            Notice::Event(event) => {
                metrics.events_from_cluster.inc();
                let listeners = self.read().index.listeners(&event.channel);
                self.deliver(listeners, event).await;
            }
            Notice::Undecodable => metrics.cluster_undecodable.inc(),
            Notice::WorkerLost { worker_id, same_instance } => {
                let holder = self.read().index.holder(&worker_id).cloned();
                if let Some(sink) = holder {
                    let status = if same_instance {
                        Status::aborted(format!("worker id {worker_id:?} moved to another session of the same gateway"))
                    } else {
                        Status::already_exists(format!("worker id {worker_id:?} was taken over by another gateway"))
                    };
                    self.end_session(&sink, status);
                }
            }
        }
    }

    /// Queues `event` for each of `listeners`; returns how many took it.
    async fn deliver(&self, listeners: Option<Listeners<Arc<Sink>>>, event: Event) -> u32 {
        let Some(listeners) = listeners else {
            return 0;
        };
        let Some(last) = listeners.len().checked_sub(1) else {
            return 0;
        };
        let mut event = Some(event);
        let mut delivered = 0;
        for (i, sink) in listeners.iter().enumerate() {
            let ev = if i == last { event.take() } else { event.clone() };
            let Some(ev) = ev else { break };
            let msg = SubscribeResponse { kind: Some(subscribe_response::Kind::Event(ev)) };
            let sent = match sink.tx.try_send(msg) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Closed(_)) => false,
                Err(mpsc::error::TrySendError::Full(msg)) => {
                    match sink.tx.send_timeout(msg, self.shared.limits.slow_session_grace).await {
                        Ok(()) => true,
                        Err(mpsc::error::SendTimeoutError::Closed(_)) => false,
                        Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                            self.evict(sink);
                            false
                        }
                    }
                }
            };
            if sent {
                delivered += 1;
            }
        }
        self.shared.metrics.events_delivered.add(u64::from(delivered));
        delivered
    }

    fn evict(&self, sink: &Sink) {
        let queued = self.shared.limits.session_queue;
        let grace = self.shared.limits.slow_session_grace;
        tracing::warn!(session = sink.session_id, queued, ?grace, "evicting a subscriber session that stopped reading");
        self.shared.metrics.sessions_evicted.inc();
        self.end_session(
            sink,
            Status::resource_exhausted(format!(
                "session evicted: its {queued} queued events were not read within {grace:?}"
            )),
        );
    }
}
