//! The routing core: which sessions listen on which channels, who holds each
//! worker id, and the delivery of published events into session queues.
//!
//! State lives behind one `RwLock` that is never held across an `.await`.
//! Each channel's subscriber list is an immutable `Arc<[..]>` replaced on
//! change, so a publish takes the read lock only long enough to clone one
//! `Arc`, and delivers with the lock released.
//!
//! A session's events go into a bounded queue. When it is full the publisher
//! waits up to a grace period; a session that still does not drain is evicted
//! with `RESOURCE_EXHAUSTED` (its gateway reconnects), never silently skipped.
//!
//! With a [`Cluster`], publishes are also handed to the other brokers, worker
//! ids are leased cluster-wide, and channel interest changes (a channel's
//! first listener arriving, its last leaving) are passed on in the order the
//! lock saw them.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use herald_common::metrics::Exposition;
use herald_proto::names;
use herald_proto::v1::{
    Ack, Event, PublishRequest, PublishResponse, SubscribeRequest, SubscribeResponse, subscribe_request,
    subscribe_response,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tonic::Status;

use crate::cluster::bus::Interest;
use crate::cluster::leases::ClaimError;
use crate::cluster::{Cluster, ClusterNotice};
use crate::error::{CommandError, CommandErrorKind, PublishError};
use crate::metrics::BrokerMetrics;
use crate::route::{self, TargetKind};

/// Limits the broker enforces.
#[derive(Debug, Clone)]
pub struct HubLimits {
    /// Largest content of one message, in bytes.
    pub max_content_bytes: usize,
    /// Most messages in one `PublishBatch`.
    pub max_batch: usize,
    /// Most channels one session may listen on.
    pub max_channels_per_session: usize,
    /// Most subscriber sessions at once.
    pub max_sessions: usize,
    /// Events queued per session before publishers have to wait.
    pub session_queue: usize,
    /// How long a publisher waits on a full session queue before evicting it.
    pub slow_session_grace: Duration,
}

impl Default for HubLimits {
    fn default() -> Self {
        Self {
            max_content_bytes: 64 * 1024,
            max_batch: 1000,
            max_channels_per_session: 1024,
            max_sessions: 10_000,
            session_queue: 16 * 1024,
            slow_session_grace: Duration::from_secs(2),
        }
    }
}

/// The broker's routing core. Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct Hub {
    shared: Arc<Shared>,
}

struct Shared {
    state: RwLock<State>,
    limits: HubLimits,
    metrics: BrokerMetrics,
    next_session_id: AtomicU64,
    cluster: Option<Arc<Cluster>>,
}

type SessionId = u64;

/// A publish that passed the checks.
struct Routed {
    kind: TargetKind,
    channel: String,
    content_bytes: usize,
    /// Whether other brokers may have listeners (cluster mode).
    forward: bool,
}
type Subscribers = Arc<[Arc<Sink>]>;

#[derive(Default)]
struct State {
    channels: HashMap<String, Subscribers>,
    workers: HashMap<String, WorkerHolder>,
    sessions: HashMap<SessionId, SessionEntry>,
    shutting_down: bool,
}

struct WorkerHolder {
    session_id: SessionId,
    instance_id: String,
}

struct SessionEntry {
    sink: Arc<Sink>,
    channels: HashSet<String>,
    worker_id: Option<String>,
}

/// The sending side of one session's queue, plus the switch that ends it.
struct Sink {
    session_id: SessionId,
    tx: mpsc::Sender<SubscribeResponse>,
    end: Mutex<Option<oneshot::Sender<Status>>>,
}

impl Sink {
    /// Ends the session's event stream with `status` (first call wins).
    fn end(&self, status: Status) {
        let taken = self.end.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(tx) = taken {
            let _ = tx.send(status);
        }
    }
}

impl Default for Hub {
    fn default() -> Self {
        Self::new(HubLimits::default())
    }
}

impl Hub {
    /// A broker on its own.
    pub fn new(limits: HubLimits) -> Self {
        Self::build(limits, None)
    }

    /// A broker that is one of a cluster. `notices` are what the cluster
    /// sends this broker; they are handled in the background.
    pub fn clustered(limits: HubLimits, cluster: Cluster, mut notices: mpsc::Receiver<ClusterNotice>) -> Self {
        let hub = Self::build(limits, Some(Arc::new(cluster)));
        let handler = hub.clone();
        tokio::spawn(async move {
            while let Some(notice) = notices.recv().await {
                handler.on_cluster_notice(notice).await;
            }
        });
        hub
    }

    fn build(limits: HubLimits, cluster: Option<Arc<Cluster>>) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: RwLock::new(State::default()),
                limits,
                metrics: BrokerMetrics::default(),
                next_session_id: AtomicU64::new(1),
                cluster,
            }),
        }
    }

    fn cluster(&self) -> Option<&Cluster> {
        self.shared.cluster.as_deref()
    }

    /// Why the broker cannot do its job right now, if it cannot.
    pub fn unready_reason(&self) -> Option<&'static str> {
        if self.is_shutting_down() {
            Some("shutting down")
        } else if self.cluster().is_some_and(|c| !c.is_ready()) {
            Some("not connected to the cluster (NATS)")
        } else {
            None
        }
    }

    /// Renders the broker's metrics, queue depths and cluster state included.
    pub fn render_metrics(&self, out: &mut Exposition) {
        self.shared.metrics.render(out);
        let capacity = self.shared.limits.session_queue;
        let depths: Vec<usize> =
            self.read().sessions.values().map(|e| capacity.saturating_sub(e.sink.tx.capacity())).collect();
        out.gauge(
            "herald_broker_session_queue_events",
            "Events queued for subscriber sessions, summed over sessions.",
            depths.iter().sum::<usize>() as i64,
        );
        out.gauge(
            "herald_broker_session_queue_events_max",
            "Events queued for the most backed-up subscriber session.",
            depths.iter().copied().max().unwrap_or(0) as i64,
        );
        if let Some(cluster) = self.cluster() {
            out.info(
                "herald_broker_cluster_info",
                "This broker's id in its cluster.",
                &[("broker_id", cluster.broker_id())],
            );
            out.gauge(
                "herald_broker_cluster_ready",
                "1 while connected to NATS with the lease bucket at hand.",
                i64::from(cluster.is_ready()),
            );
        }
    }

    pub fn limits(&self) -> &HubLimits {
        &self.shared.limits
    }

    pub fn metrics(&self) -> &BrokerMetrics {
        &self.shared.metrics
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.shared.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.shared.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Routes one message. Returns how many sessions it was handed to.
    pub async fn publish(&self, req: PublishRequest) -> Result<PublishResponse, PublishError> {
        let metrics = &self.shared.metrics;
        let result = self.route(&req);
        let (route, subscribers) = match result {
            Ok(found) => found,
            Err(e) => {
                metrics.publish_rejected(&e);
                return Err(e);
            }
        };
        metrics.publish_accepted(route.kind);
        metrics.published_bytes.add(route.content_bytes as u64);
        let event = Event {
            channel: route.channel,
            target: req.target,
            content: req.content,
            published_at: Some(prost_types::Timestamp::from(SystemTime::now())),
        };
        let forwarded = match (self.cluster(), route.forward) {
            (Some(cluster), true) => {
                if let Err(e) = cluster.forward(&event).await {
                    let e = PublishError::ClusterUnavailable(e);
                    metrics.publish_rejected(&e);
                    return Err(e);
                }
                metrics.events_forwarded.inc();
                true
            }
            _ => false,
        };
        let delivered = self.deliver(subscribers, event).await;
        Ok(PublishResponse { subscribers: delivered, forwarded })
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

    fn route(&self, req: &PublishRequest) -> Result<(Routed, Option<Subscribers>), PublishError> {
        let route = route::resolve(req, self.shared.limits.max_content_bytes)?;
        let state = self.read();
        if state.shutting_down {
            return Err(PublishError::ShuttingDown);
        }
        let cluster = self.cluster();
        if let Some(cluster) = cluster
            && !cluster.is_ready()
        {
            return Err(PublishError::ClusterUnavailable("not connected to NATS".into()));
        }
        let held_here = route.worker_id.as_ref().map(|w| state.workers.contains_key(w));
        if let (Some(worker_id), Some(false)) = (&route.worker_id, held_here)
            && !cluster.is_some_and(|c| c.is_held(worker_id))
        {
            return Err(PublishError::UnknownWorker(worker_id.clone()));
        }
        let subscribers = state.channels.get(&route.channel).cloned();
        // A connection on a gateway of this broker needs no other broker.
        let forward = cluster.is_some() && held_here != Some(true);
        Ok((
            Routed { kind: route.kind, channel: route.channel, content_bytes: route.content_bytes, forward },
            subscribers,
        ))
    }

    /// Delivers an event published on another broker to local listeners.
    async fn on_cluster_notice(&self, notice: ClusterNotice) {
        let metrics = &self.shared.metrics;
        match notice {
            ClusterNotice::Event(event) => {
                metrics.events_from_cluster.inc();
                let subscribers = self.read().channels.get(&event.channel).cloned();
                self.deliver(subscribers, event).await;
            }
            ClusterNotice::Undecodable => metrics.cluster_undecodable.inc(),
            ClusterNotice::WorkerLost { worker_id, same_instance } => {
                let sink = {
                    let state = self.read();
                    let holder = state.workers.get(&worker_id).map(|h| h.session_id);
                    holder.and_then(|id| state.sessions.get(&id)).map(|e| e.sink.clone())
                };
                if let Some(sink) = sink {
                    let status = if same_instance {
                        Status::aborted(format!("worker id {worker_id:?} moved to another session of the same gateway"))
                    } else {
                        Status::already_exists(format!("worker id {worker_id:?} was taken over by another gateway"))
                    };
                    sink.end(status);
                    self.close_session(sink.session_id);
                }
            }
        }
    }

    async fn deliver(&self, subscribers: Option<Subscribers>, event: Event) -> u32 {
        let Some(subscribers) = subscribers else {
            return 0;
        };
        let Some(last) = subscribers.len().checked_sub(1) else {
            return 0;
        };
        let mut event = Some(event);
        let mut delivered = 0;
        for (i, sink) in subscribers.iter().enumerate() {
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
        sink.end(Status::resource_exhausted(format!(
            "session evicted: its {queued} queued events were not read within {grace:?}"
        )));
        self.close_session(sink.session_id);
    }

    /// Opens a subscriber session. The session lives while either the
    /// returned handle or the event stream is held.
    pub fn open_session(&self) -> (Arc<Session>, SessionEvents) {
        let id = self.shared.next_session_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.shared.limits.session_queue);
        let (end_tx, end_rx) = oneshot::channel();
        let sink = Arc::new(Sink { session_id: id, tx, end: Mutex::new(Some(end_tx)) });
        let mut state = self.write();
        let max = self.shared.limits.max_sessions;
        if state.shutting_down {
            sink.end(Status::unavailable("broker is shutting down"));
        } else if state.sessions.len() >= max {
            sink.end(Status::resource_exhausted(format!("the broker holds its limit of {max} subscriber sessions")));
        } else {
            state.sessions.insert(id, SessionEntry { sink: sink.clone(), channels: HashSet::new(), worker_id: None });
            self.shared.metrics.sessions.inc();
        }
        drop(state);
        let session = Arc::new(Session { hub: self.clone(), id, sink });
        let events =
            SessionEvents { rx, end: Some(end_rx), final_status: None, ended: false, _session: session.clone() };
        (session, events)
    }

    /// Ends every session with `UNAVAILABLE` and refuses new publishes, so that
    /// gateways move to another broker and the gRPC server can drain.
    pub fn shut_down(&self) {
        let sessions: Vec<_> = {
            let mut state = self.write();
            state.shutting_down = true;
            state.sessions.values().map(|s| s.sink.clone()).collect()
        };
        for sink in sessions {
            sink.end(Status::unavailable("broker is shutting down"));
            self.close_session(sink.session_id);
        }
        if let Some(cluster) = self.cluster() {
            cluster.leave();
        }
    }

    /// Whether [`Self::shut_down`] was called.
    pub fn is_shutting_down(&self) -> bool {
        self.read().shutting_down
    }

    /// Whether a live session holds `worker_id`.
    pub fn worker_is_held(&self, worker_id: &str) -> bool {
        self.read().workers.contains_key(worker_id)
    }

    /// Counts of live sessions, channels with listeners, and held worker ids.
    pub fn census(&self) -> (usize, usize, usize) {
        let state = self.read();
        (state.sessions.len(), state.channels.len(), state.workers.len())
    }

    async fn apply(&self, session_id: SessionId, sink: &Sink, req: SubscribeRequest) -> Result<(), CommandError> {
        let request_id = req.request_id;
        let err = |kind| CommandError { request_id, kind };
        let command = req.command.ok_or_else(|| err(CommandErrorKind::Invalid("command is required".into())))?;
        let cluster = self.cluster();
        if let Some(cluster) = cluster
            && !cluster.is_ready()
        {
            return Err(err(CommandErrorKind::ClusterUnavailable("not connected to NATS".into())));
        }
        let needs_sync = match command {
            subscribe_request::Command::ClaimWorker(claim) => {
                names::validate_worker_id(&claim.worker_id).map_err(|e| err(e.into()))?;
                if claim.instance_id.is_empty() {
                    return Err(err(CommandErrorKind::Invalid("instance_id is required".into())));
                }
                self.read().check_claim(session_id, &claim.worker_id, &claim.instance_id).map_err(|e| {
                    if matches!(e, CommandErrorKind::WorkerTaken { .. }) {
                        self.shared.metrics.claims_refused.inc();
                    }
                    err(e)
                })?;
                if let Some(cluster) = cluster {
                    cluster.claim(&claim.worker_id, &claim.instance_id).await.map_err(|e| match e {
                        ClaimError::Taken => {
                            self.shared.metrics.claims_refused.inc();
                            err(CommandErrorKind::WorkerTaken { worker_id: claim.worker_id.clone() })
                        }
                        ClaimError::Unavailable(reason) => err(CommandErrorKind::ClusterUnavailable(reason)),
                    })?;
                }
                let mut state = self.write();
                let mut changes = Vec::new();
                let claimed = state.check_claim(session_id, &claim.worker_id, &claim.instance_id).and_then(|()| {
                    state.claim_worker(
                        session_id,
                        &claim.worker_id,
                        &claim.instance_id,
                        &self.shared.metrics,
                        &mut changes,
                    )
                });
                if let Err(e) = claimed {
                    drop(state);
                    if let Some(cluster) = cluster {
                        cluster.release(claim.worker_id.clone());
                    }
                    return Err(err(e));
                }
                self.commit(&state, changes);
                true
            }
            subscribe_request::Command::Subscribe(sub) => {
                for channel in &sub.channels {
                    names::validate_channel(channel).map_err(|e| err(e.into()))?;
                    if names::is_worker_channel(channel) {
                        return Err(err(CommandErrorKind::Invalid(format!(
                            "channel {channel:?} is a worker channel: claim the worker id instead"
                        ))));
                    }
                }
                let mut state = self.write();
                let entry = state.session(session_id).map_err(err)?;
                let new: HashSet<&String> = sub.channels.iter().filter(|c| !entry.channels.contains(*c)).collect();
                let count = entry.channels.len() + new.len();
                let max = self.shared.limits.max_channels_per_session;
                if count > max {
                    return Err(err(CommandErrorKind::TooManyChannels { count, max }));
                }
                let new: Vec<String> = new.into_iter().cloned().collect();
                let mut changes = Vec::new();
                for channel in new {
                    state.add_listener(session_id, channel, &mut changes);
                }
                self.commit(&state, changes);
                true
            }
            subscribe_request::Command::Unsubscribe(unsub) => {
                let mut state = self.write();
                let mut changes = Vec::new();
                for channel in &unsub.channels {
                    if !names::is_worker_channel(channel) {
                        state.remove_listener(session_id, channel, &mut changes);
                    }
                }
                self.commit(&state, changes);
                false
            }
        };
        // In a cluster, acknowledge only once NATS has the subscriptions:
        // from the ack on, events published on any broker arrive.
        if let (Some(cluster), true) = (cluster, needs_sync) {
            cluster.sync().await.map_err(|e| err(CommandErrorKind::ClusterUnavailable(e)))?;
        }
        let ack = SubscribeResponse { kind: Some(subscribe_response::Kind::Ack(Ack { request_id })) };
        if sink.tx.try_send(ack).is_err() {
            tracing::debug!(session = session_id, request_id, "ack not queued: session queue full or closed");
        }
        Ok(())
    }

    /// Passes the interest changes of one locked update on to the cluster,
    /// while the lock is still held so that they keep the lock's order.
    fn commit(&self, state: &State, changes: Vec<Interest>) {
        state.report_census(&self.shared.metrics);
        if let Some(cluster) = self.cluster() {
            for change in changes {
                cluster.interest(change);
            }
        }
    }

    fn close_session(&self, session_id: SessionId) {
        let mut state = self.write();
        let Some(entry) = state.sessions.remove(&session_id) else {
            return;
        };
        let mut changes = Vec::new();
        for channel in &entry.channels {
            state.unlink(session_id, channel, &mut changes);
        }
        let mut released = None;
        if let Some(worker_id) = entry.worker_id
            && state.workers.get(&worker_id).is_some_and(|h| h.session_id == session_id)
        {
            state.workers.remove(&worker_id);
            released = Some(worker_id);
        }
        self.shared.metrics.sessions.dec();
        self.commit(&state, changes);
        drop(state);
        if let (Some(cluster), Some(worker_id)) = (self.cluster(), released) {
            cluster.release(worker_id);
        }
    }
}

impl State {
    fn report_census(&self, metrics: &BrokerMetrics) {
        metrics.channels.set(self.channels.len() as i64);
        metrics.workers.set(self.workers.len() as i64);
    }

    fn session(&mut self, id: SessionId) -> Result<&mut SessionEntry, CommandErrorKind> {
        self.sessions.get_mut(&id).ok_or(CommandErrorKind::ShuttingDown)
    }

    /// Refuses a claim that cannot succeed locally: a second claim on one
    /// session, or an id held here by another instance.
    fn check_claim(&self, session_id: SessionId, worker_id: &str, instance_id: &str) -> Result<(), CommandErrorKind> {
        let entry = self.sessions.get(&session_id).ok_or(CommandErrorKind::ShuttingDown)?;
        if let Some(held) = &entry.worker_id {
            return Err(CommandErrorKind::SecondClaim(held.clone()));
        }
        match self.workers.get(worker_id) {
            Some(holder) if holder.instance_id != instance_id => {
                Err(CommandErrorKind::WorkerTaken { worker_id: worker_id.to_owned() })
            }
            _ => Ok(()),
        }
    }

    fn claim_worker(
        &mut self,
        session_id: SessionId,
        worker_id: &str,
        instance_id: &str,
        metrics: &BrokerMetrics,
        changes: &mut Vec<Interest>,
    ) -> Result<(), CommandErrorKind> {
        if let Some(holder) = self.workers.get(worker_id) {
            // The same gateway process reconnected before its old session was
            // noticed dead: the new session takes over.
            let stale = holder.session_id;
            if let Some(entry) = self.sessions.remove(&stale) {
                entry.sink.end(Status::aborted(format!(
                    "worker id {worker_id:?} was claimed again by a newer session of the same instance"
                )));
                for channel in &entry.channels {
                    self.unlink(stale, channel, changes);
                }
                metrics.sessions.dec();
            }
        }
        self.workers.insert(worker_id.to_owned(), WorkerHolder { session_id, instance_id: instance_id.to_owned() });
        self.session(session_id)?.worker_id = Some(worker_id.to_owned());
        self.add_listener(session_id, names::worker_channel(worker_id), changes);
        Ok(())
    }

    fn add_listener(&mut self, session_id: SessionId, channel: String, changes: &mut Vec<Interest>) {
        let Some(entry) = self.sessions.get_mut(&session_id) else {
            return;
        };
        if !entry.channels.insert(channel.clone()) {
            return;
        }
        let sink = entry.sink.clone();
        let list = self.channels.entry(channel.clone()).or_insert_with(|| {
            changes.push(Interest::Add(channel));
            Arc::from(Vec::new())
        });
        let mut grown = Vec::with_capacity(list.len() + 1);
        grown.extend(list.iter().cloned());
        grown.push(sink);
        *list = grown.into();
    }

    fn remove_listener(&mut self, session_id: SessionId, channel: &str, changes: &mut Vec<Interest>) {
        let removed = self.sessions.get_mut(&session_id).is_some_and(|e| e.channels.remove(channel));
        if removed {
            self.unlink(session_id, channel, changes);
        }
    }

    /// Drops `session_id` from the subscriber list of `channel`.
    fn unlink(&mut self, session_id: SessionId, channel: &str, changes: &mut Vec<Interest>) {
        let Some(list) = self.channels.get_mut(channel) else {
            return;
        };
        let kept: Vec<_> = list.iter().filter(|s| s.session_id != session_id).cloned().collect();
        if kept.is_empty() {
            self.channels.remove(channel);
            changes.push(Interest::Remove(channel.to_owned()));
        } else {
            *list = kept.into();
        }
    }
}

/// A subscriber session: apply commands to it; drop every handle (and its
/// event stream) to end it.
pub struct Session {
    hub: Hub,
    id: SessionId,
    sink: Arc<Sink>,
}

impl Session {
    /// Applies one command. A refused command ends the session: its event
    /// stream yields the refusal as its final status.
    pub async fn apply(&self, req: SubscribeRequest) -> Result<(), CommandError> {
        self.hub.apply(self.id, &self.sink, req).await.inspect_err(|e| {
            tracing::debug!(session = self.id, error = %e, "subscriber command refused");
            self.end(e.clone().into());
        })
    }

    /// Ends the session with `status` as the last item of its event stream.
    pub fn end(&self, status: Status) {
        self.sink.end(status);
        self.hub.close_session(self.id);
    }

    /// Resolves once the session's event stream has been dropped.
    pub async fn closed(&self) {
        self.sink.tx.closed().await;
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.hub.close_session(self.id);
    }
}

/// The stream of acks and events of one session. It ends with an error status
/// when the session is refused, evicted or the broker shuts down.
pub struct SessionEvents {
    rx: mpsc::Receiver<SubscribeResponse>,
    end: Option<oneshot::Receiver<Status>>,
    /// The status the session ended with, yielded once the queue is drained.
    final_status: Option<Status>,
    ended: bool,
    _session: Arc<Session>,
}

impl Stream for SessionEvents {
    type Item = Result<SubscribeResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if let Some(end) = self.end.as_mut() {
            match Pin::new(end).poll(cx) {
                Poll::Ready(Ok(status)) => {
                    self.final_status = Some(status);
                    self.end = None;
                }
                Poll::Ready(Err(_)) => self.end = None,
                Poll::Pending => {}
            }
        }
        // Once ended, no new events arrive: hand over what is queued (events
        // published before the end), then the final status.
        if self.final_status.is_some() {
            return match self.rx.try_recv() {
                Ok(item) => Poll::Ready(Some(Ok(item))),
                Err(_) => {
                    self.ended = true;
                    Poll::Ready(self.final_status.take().map(Err))
                }
            };
        }
        self.rx.poll_recv(cx).map(|m| m.map(Ok))
    }
}

#[cfg(test)]
mod tests {
    use herald_proto::v1::{
        Broadcast, ClaimWorker, ConnectionAddress, Content, SubscribeChannels, Target, UnsubscribeChannels, content,
        target,
    };
    use tokio_stream::StreamExt;
    use tonic::Code;

    use super::*;

    fn text(kind: target::Kind, body: &str) -> PublishRequest {
        PublishRequest {
            target: Some(Target { kind: Some(kind) }),
            content: Some(Content { body: Some(content::Body::Text(body.into())) }),
        }
    }

    fn broadcast(body: &str) -> PublishRequest {
        text(target::Kind::Broadcast(Broadcast {}), body)
    }

    fn to(worker: &str, conn: &str, body: &str) -> PublishRequest {
        text(target::Kind::Connection(ConnectionAddress { worker_id: worker.into(), connection_id: conn.into() }), body)
    }

    fn claim(request_id: u64, worker: &str, instance: &str) -> SubscribeRequest {
        SubscribeRequest {
            request_id,
            command: Some(subscribe_request::Command::ClaimWorker(ClaimWorker {
                worker_id: worker.into(),
                instance_id: instance.into(),
            })),
        }
    }

    fn subscribe(request_id: u64, channels: &[&str]) -> SubscribeRequest {
        SubscribeRequest {
            request_id,
            command: Some(subscribe_request::Command::Subscribe(SubscribeChannels {
                channels: channels.iter().map(|c| c.to_string()).collect(),
            })),
        }
    }

    fn unsubscribe(request_id: u64, channels: &[&str]) -> SubscribeRequest {
        SubscribeRequest {
            request_id,
            command: Some(subscribe_request::Command::Unsubscribe(UnsubscribeChannels {
                channels: channels.iter().map(|c| c.to_string()).collect(),
            })),
        }
    }

    async fn next(events: &mut SessionEvents) -> SubscribeResponse {
        tokio::time::timeout(Duration::from_secs(1), events.next())
            .await
            .expect("an event in time")
            .expect("stream open")
            .expect("not an error")
    }

    async fn expect_ack(events: &mut SessionEvents, id: u64) {
        assert_eq!(next(events).await.kind, Some(subscribe_response::Kind::Ack(Ack { request_id: id })));
    }

    async fn expect_text(events: &mut SessionEvents, body: &str) -> Event {
        match next(events).await.kind {
            Some(subscribe_response::Kind::Event(ev)) => {
                let got = ev.content.as_ref().and_then(|c| c.body.clone());
                assert_eq!(got, Some(content::Body::Text(body.into())));
                ev
            }
            other => panic!("expected event {body:?}, got {other:?}"),
        }
    }

    fn nothing_pending(events: &mut SessionEvents) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        Pin::new(events).poll_next(&mut cx).is_pending()
    }

    #[tokio::test]
    async fn broadcast_reaches_every_session_on_the_broadcast_channel_once() {
        let hub = Hub::default();
        let (a, mut a_events) = hub.open_session();
        let (b, mut b_events) = hub.open_session();
        let (_idle, mut idle_events) = hub.open_session();
        a.apply(subscribe(1, &["broadcast"])).await.unwrap();
        b.apply(subscribe(1, &["broadcast", "broadcast"])).await.unwrap();
        expect_ack(&mut a_events, 1).await;
        expect_ack(&mut b_events, 1).await;

        let res = hub.publish(broadcast("hello")).await.unwrap();
        assert_eq!(res.subscribers, 2);
        let ev = expect_text(&mut a_events, "hello").await;
        assert_eq!(ev.channel, "broadcast");
        expect_text(&mut b_events, "hello").await;
        assert!(nothing_pending(&mut a_events) && nothing_pending(&mut b_events) && nothing_pending(&mut idle_events));
    }

    #[tokio::test]
    async fn a_connection_target_reaches_only_its_workers_session() {
        let hub = Hub::default();
        let (w1, mut w1_events) = hub.open_session();
        let (w2, mut w2_events) = hub.open_session();
        w1.apply(claim(1, "w1", "i1")).await.unwrap();
        w2.apply(claim(1, "w2", "i2")).await.unwrap();
        expect_ack(&mut w1_events, 1).await;
        expect_ack(&mut w2_events, 1).await;

        assert_eq!(hub.publish(to("w2", "1", "for w2")).await.unwrap().subscribers, 1);
        let ev = expect_text(&mut w2_events, "for w2").await;
        assert_eq!(ev.channel, "worker.w2");
        assert!(nothing_pending(&mut w1_events));
    }

    #[tokio::test]
    async fn publishing_to_an_unheld_worker_is_not_found() {
        let hub = Hub::default();
        let err = hub.publish(to("ghost", "1", "x")).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        assert_eq!(err.to_string(), "no live gateway holds worker id \"ghost\"");
    }

    #[tokio::test]
    async fn a_worker_id_held_by_another_instance_is_refused_and_ends_the_session() {
        let hub = Hub::default();
        let (first, _first_events) = hub.open_session();
        first.apply(claim(1, "w1", "instance-a")).await.unwrap();
        let (second, mut second_events) = hub.open_session();
        let err = second.apply(claim(7, "w1", "instance-b")).await.unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists);
        let status = second_events.next().await.unwrap().unwrap_err();
        assert_eq!(status.code(), Code::AlreadyExists);
        assert!(status.message().contains("request 7"), "{}", status.message());
        assert!(second_events.next().await.is_none());
        assert!(hub.worker_is_held("w1"));
    }

    #[tokio::test]
    async fn the_same_instance_takes_its_worker_id_back_from_a_stale_session() {
        let hub = Hub::default();
        let (stale, mut stale_events) = hub.open_session();
        stale.apply(claim(1, "w1", "instance-a")).await.unwrap();
        expect_ack(&mut stale_events, 1).await;
        let (fresh, mut fresh_events) = hub.open_session();
        fresh.apply(claim(1, "w1", "instance-a")).await.unwrap();
        assert_eq!(stale_events.next().await.unwrap().unwrap_err().code(), Code::Aborted);
        expect_ack(&mut fresh_events, 1).await;
        hub.publish(to("w1", "3", "after takeover")).await.unwrap();
        expect_text(&mut fresh_events, "after takeover").await;
    }

    #[tokio::test]
    async fn a_worker_id_is_released_when_its_session_ends() {
        let hub = Hub::default();
        let (s, events) = hub.open_session();
        s.apply(claim(1, "w1", "i")).await.unwrap();
        drop(s);
        assert!(hub.worker_is_held("w1"), "the event stream still holds the session");
        drop(events);
        assert!(!hub.worker_is_held("w1"));
        assert_eq!(hub.census(), (0, 0, 0));
    }

    #[tokio::test]
    async fn a_session_claims_one_worker_id_only() {
        let hub = Hub::default();
        let (s, _events) = hub.open_session();
        s.apply(claim(1, "w1", "i")).await.unwrap();
        assert_eq!(s.apply(claim(2, "w2", "i")).await.unwrap_err().code(), Code::FailedPrecondition);
    }

    #[tokio::test]
    async fn worker_channels_cannot_be_subscribed_or_published_directly() {
        let hub = Hub::default();
        let (s, _events) = hub.open_session();
        assert_eq!(s.apply(subscribe(1, &["worker.w1"])).await.unwrap_err().code(), Code::InvalidArgument);
        let err = hub.publish(text(target::Kind::Channel("worker.w1".into()), "x")).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }

    #[tokio::test]
    async fn unsubscribed_channels_stop_delivering() {
        let hub = Hub::default();
        let (s, mut events) = hub.open_session();
        s.apply(subscribe(1, &["news", "sport"])).await.unwrap();
        s.apply(unsubscribe(2, &["news", "never-subscribed"])).await.unwrap();
        expect_ack(&mut events, 1).await;
        expect_ack(&mut events, 2).await;
        assert_eq!(hub.publish(text(target::Kind::Channel("news".into()), "n")).await.unwrap().subscribers, 0);
        assert_eq!(hub.publish(text(target::Kind::Channel("sport".into()), "s")).await.unwrap().subscribers, 1);
        expect_text(&mut events, "s").await;
    }

    #[tokio::test]
    async fn sessions_over_the_limit_are_refused() {
        let hub = Hub::new(HubLimits { max_sessions: 1, ..HubLimits::default() });
        let (_first, _first_events) = hub.open_session();
        let (_second, mut second_events) = hub.open_session();
        assert_eq!(second_events.next().await.unwrap().unwrap_err().code(), Code::ResourceExhausted);
        assert_eq!(hub.census().0, 1);
    }

    #[tokio::test]
    async fn channel_limit_per_session_is_enforced() {
        let hub = Hub::new(HubLimits { max_channels_per_session: 2, ..HubLimits::default() });
        let (s, _events) = hub.open_session();
        s.apply(subscribe(1, &["a", "b"])).await.unwrap();
        let err = s.apply(subscribe(2, &["c"])).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
    }

    #[tokio::test]
    async fn events_to_one_session_keep_publish_order() {
        let hub = Hub::default();
        let (s, mut events) = hub.open_session();
        s.apply(claim(1, "w1", "i")).await.unwrap();
        expect_ack(&mut events, 1).await;
        for i in 0..1000 {
            hub.publish(to("w1", "1", &i.to_string())).await.unwrap();
        }
        for i in 0..1000 {
            expect_text(&mut events, &i.to_string()).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_that_stops_reading_is_evicted_after_the_grace_period() {
        let limits =
            HubLimits { session_queue: 2, slow_session_grace: Duration::from_millis(100), ..HubLimits::default() };
        let hub = Hub::new(limits);
        let (reader, mut reader_events) = hub.open_session();
        let (stuck, mut stuck_events) = hub.open_session();
        reader.apply(subscribe(1, &["broadcast"])).await.unwrap();
        stuck.apply(subscribe(1, &["broadcast"])).await.unwrap();
        expect_ack(&mut reader_events, 1).await;
        let drain = tokio::spawn(async move {
            let mut got = 0;
            while let Some(Ok(_)) = reader_events.next().await {
                got += 1;
                if got == 3 {
                    break;
                }
            }
            got
        });
        for i in 0..3 {
            hub.publish(broadcast(&i.to_string())).await.unwrap();
        }
        assert_eq!(drain.await.unwrap(), 3);
        assert_eq!(hub.metrics().sessions_evicted.get(), 1);
        let mut last = None;
        while let Some(item) = stuck_events.next().await {
            last = Some(item);
        }
        assert_eq!(last.unwrap().unwrap_err().code(), Code::ResourceExhausted);
        drop(stuck);
        assert_eq!(hub.census().0, 1);
    }

    #[tokio::test]
    async fn shutting_down_delivers_queued_events_then_ends_sessions_and_refuses_publishes() {
        let hub = Hub::default();
        let (s, mut events) = hub.open_session();
        s.apply(subscribe(1, &["broadcast"])).await.unwrap();
        expect_ack(&mut events, 1).await;
        hub.publish(broadcast("queued before the shutdown")).await.unwrap();
        hub.shut_down();
        expect_text(&mut events, "queued before the shutdown").await;
        assert_eq!(events.next().await.unwrap().unwrap_err().code(), Code::Unavailable);
        assert_eq!(hub.publish(broadcast("late")).await.unwrap_err().code(), Code::Unavailable);
        let (_late, mut late_events) = hub.open_session();
        assert_eq!(late_events.next().await.unwrap().unwrap_err().code(), Code::Unavailable);
    }

    #[tokio::test]
    async fn batches_route_each_message_and_report_each_outcome() {
        let hub = Hub::new(HubLimits { max_batch: 3, ..HubLimits::default() });
        let results = hub.publish_batch(vec![broadcast("a"), to("ghost", "1", "b")]).await.unwrap();
        assert!(results[0].is_ok());
        assert_eq!(results[1].as_ref().unwrap_err().code(), Code::NotFound);
        let too_many = vec![broadcast("a"), broadcast("b"), broadcast("c"), broadcast("d")];
        assert_eq!(hub.publish_batch(too_many).await.unwrap_err().code(), Code::ResourceExhausted);
    }
}
