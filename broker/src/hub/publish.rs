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

use herald_proto::v1::{
    ConnectionAddress, Event, PublishRequest, PublishResponse, SubscribeResponse, subscribe_response, target,
};
use tokio::sync::mpsc;
use tonic::Status;

use super::index::Listeners;
use super::recent::Seen;
use super::session::Sink;
use super::{Hub, State};
use crate::error::PublishError;
use crate::federation::{Ask, Notice};
use crate::route::{self, Route, TargetKind};

/// A publish that passed the checks.
struct Routed {
    route: Route,
    /// The sessions of this broker listening on its channel.
    listeners: Option<Listeners<Arc<Sink>>>,
    /// Where it goes beyond this broker.
    beyond: Beyond,
}

/// Which other brokers a publish goes to.
enum Beyond {
    /// Whichever listen on its channel.
    Listeners,
    /// None: its connection is on a gateway of this broker.
    Nowhere,
    /// The one serving the worker of its connection, which says whether the
    /// connection is live.
    Worker(String),
}

impl Hub {
    /// Routes one message. Returns how many sessions it was handed to.
    pub async fn publish(&self, mut req: PublishRequest) -> Result<PublishResponse, PublishError> {
        let metrics = &self.shared.metrics;
        let Routed { route, listeners, beyond } = self.route(&req).inspect_err(|e| metrics.publish_rejected(e))?;
        let history = match route.kind {
            TargetKind::Channel if req.presence_change.is_none() => self.history_rule(&route.channel),
            _ => None,
        };
        let key = std::mem::take(&mut req.idempotency_key);
        if !key.is_empty() {
            // A publication stored in the cluster's history carries its key
            // as its JetStream message id, and the stream stores it once: it
            // is a duplicate only if it was stored. A key recorded apart,
            // before the store, could outlive a store that failed (say, as
            // NATS restarted) and turn every retry away as a duplicate.
            let cluster_wide = history.is_none() || self.federation().history().is_none();
            match self.first_use(&key, cluster_wide).await.inspect_err(|e| metrics.publish_rejected(e))? {
                Seen::New => {}
                Seen::Routed => {
                    metrics.duplicates.inc();
                    return Ok(PublishResponse { subscribers: 0, forwarded: false, duplicate: true, position: None });
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
            position: None,
            presence_change: req.presence_change,
        };
        if let Some(rule) = history {
            let published = self.publish_to_history(event, &rule, &key).await;
            match &published {
                Ok(_) => self.settle(&key),
                Err(e) => {
                    metrics.publish_rejected(e);
                    self.forget(&key);
                }
            }
            return published;
        }
        if let Beyond::Worker(worker_id) = &beyond {
            return self.publish_beyond(worker_id, event, &key).await;
        }
        let forwarded = match matches!(beyond, Beyond::Listeners).then(|| self.federation().forward(&event)).flatten() {
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
        self.settle(&key);
        Ok(PublishResponse { subscribers: delivered, forwarded, duplicate: false, position: None })
    }

    /// Hands a publish for a connection to the broker serving its worker,
    /// which delivers it if the connection is live.
    async fn publish_beyond(&self, worker_id: &str, event: Event, key: &str) -> Result<PublishResponse, PublishError> {
        let ask = Ask { event: Some(event), ..Ask::default() };
        match self.ask_worker(worker_id, &ask).await {
            Ok(_) => {
                self.shared.metrics.events_forwarded.inc();
                self.settle(key);
                Ok(PublishResponse { subscribers: 0, forwarded: true, duplicate: false, position: None })
            }
            Err(e) => {
                self.shared.metrics.publish_rejected(&e);
                // A publish whose outcome is unknown keeps its key: a retry
                // with it must not be routed twice.
                if matches!(e, PublishError::NotConfirmed { .. }) {
                    self.settle(key);
                } else {
                    self.forget(key);
                }
                Err(e)
            }
        }
    }

    /// Marks an idempotency key's publish as routed.
    fn settle(&self, key: &str) {
        if !key.is_empty() {
            self.shared.recent.lock().unwrap_or_else(PoisonError::into_inner).settle(key);
        }
    }

    /// Delivers an event for one connection of a gateway of this broker,
    /// asked by the broker that took the publish: refused when the
    /// connection is not live.
    pub(super) async fn deliver_to_connection_here(&self, event: Event) -> Result<u32, PublishError> {
        let listeners = {
            let state = self.read();
            let address = event.target.as_ref().and_then(|t| t.kind.as_ref()).and_then(|kind| match kind {
                target::Kind::Connection(address) => Some(address),
                _ => None,
            });
            let Some(address) = address else {
                return Err(PublishError::Invalid("a publish asked of another broker must name a connection".into()));
            };
            check_live(&state, address)?;
            state.index.listeners(&event.channel)
        };
        self.shared.metrics.events_from_cluster.inc();
        Ok(self.deliver(listeners, event).await)
    }

    /// Records an idempotency key here and, when `cluster_wide`, with the
    /// federation. A key that another broker recorded counts as routed: only
    /// this broker knows whether its own publishes are still on their way.
    async fn first_use(&self, key: &str, cluster_wide: bool) -> Result<Seen, PublishError> {
        let (seen, evicted) = self
            .shared
            .recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, tokio::time::Instant::now().into_std());
        self.shared.metrics.dedup_evicted.add(evicted);
        if seen != Seen::New || !cluster_wide {
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
        self.check_batch(requests.len())?;
        let mut results = Vec::with_capacity(requests.len());
        for req in requests {
            results.push(self.publish(req).await);
        }
        Ok(results)
    }

    /// Refuses a batch (of publishes or controls) of more than `--max-batch`.
    pub(super) fn check_batch(&self, len: usize) -> Result<(), PublishError> {
        let max = self.shared.limits.max_batch;
        if len > max {
            return Err(PublishError::BatchTooLarge { len, max });
        }
        Ok(())
    }

    /// Checks a publish against the limits, the broker's state and the
    /// worker ids held.
    fn route(&self, req: &PublishRequest) -> Result<Routed, PublishError> {
        let route = route::resolve(req, self.shared.limits.max_content_bytes)?;
        let state = self.read();
        self.check_serving(&state)?;
        let beyond = match route::target_connection(req) {
            None => Beyond::Listeners,
            Some(address) if state.index.holds(&address.worker_id) => {
                check_live(&state, address)?;
                Beyond::Nowhere
            }
            Some(address) if self.federation().held_elsewhere(&address.worker_id) => {
                Beyond::Worker(address.worker_id.clone())
            }
            Some(address) => return Err(PublishError::UnknownWorker(address.worker_id.clone())),
        };
        let listeners = match beyond {
            Beyond::Worker(_) => None,
            Beyond::Listeners | Beyond::Nowhere => state.index.listeners(&route.channel),
        };
        Ok(Routed { route, listeners, beyond })
    }

    /// Refuses publishes, controls and queries while the broker cannot
    /// serve them: shutting down, starting, or cut off from its cluster.
    pub(super) fn check_serving(&self, state: &State) -> Result<(), PublishError> {
        if state.shutting_down {
            return Err(PublishError::ShuttingDown);
        }
        if self.is_starting() {
            return Err(PublishError::Starting { grace: self.shared.limits.startup_grace });
        }
        if let Some(reason) = self.federation().unready_reason() {
            return Err(PublishError::ClusterUnavailable(reason.to_owned()));
        }
        Ok(())
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
            // A publish to a connection is answered in order, so that the
            // messages of one publisher keep their order; controls wait for
            // gateways and must not hold up the events behind them.
            Notice::Ask { ask, reply } if ask.event.is_some() => {
                let _ = reply.send(self.answer(ask).await);
            }
            Notice::Ask { ask, reply } => {
                let hub = self.clone();
                tokio::spawn(async move {
                    let _ = reply.send(hub.answer(ask).await);
                });
            }
            Notice::Call { request, timeout, reply } => {
                let hub = self.clone();
                tokio::spawn(async move {
                    let _ = reply.send(hub.shared.backends.call_local(request, timeout).await);
                });
            }
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
            Notice::LeaseLapsing { worker_id } => {
                let holder = self.read().index.holder(&worker_id).cloned();
                if let Some(sink) = holder {
                    let status = Status::unavailable(format!(
                        "worker id {worker_id:?}: this broker cannot renew its lease (the cluster is unreachable); \
                         claim it again"
                    ));
                    self.end_session(&sink, status);
                }
            }
        }
    }

    /// Queues `event` for each of `listeners`; returns how many took it.
    pub(super) async fn deliver(&self, listeners: Option<Listeners<Arc<Sink>>>, event: Event) -> u32 {
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

/// Refuses a connection that is not live on the gateway of this broker
/// holding its worker id.
pub(super) fn check_live(state: &State, address: &ConnectionAddress) -> Result<(), PublishError> {
    let holder = state.index.holder(&address.worker_id).map(|sink| sink.session_id);
    if holder.is_some_and(|session| !state.directory.has_reported(session)) {
        return Err(PublishError::GatewayReconnecting(address.worker_id.clone()));
    }
    let live = holder.is_some_and(|session| state.directory.has_connection(session, &address.connection_id));
    if live {
        Ok(())
    } else {
        Err(PublishError::UnknownConnection {
            worker_id: address.worker_id.clone(),
            connection_id: address.connection_id.clone(),
        })
    }
}
