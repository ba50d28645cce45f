//! A backend's side of connection events: one instance of a consumer group
//! (`ConsumeEvents`) that hands every delivery to a [`Sink`] and
//! acknowledges them in batches (`AckEvents`, on an HTTP/2 connection of
//! its own, several calls in flight), so that acknowledging never holds up
//! receiving: the broker pauses a group's delivery to an instance at its
//! `max_unacked` deliveries, and acknowledgements give that room back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use herald_proto::v1::broker_service_client::BrokerServiceClient;
use herald_proto::v1::{AckEventsRequest, ConsumeEventsRequest, ConsumedEvent};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

use crate::message;
use crate::procs::Endpoints;
use crate::publishers;

/// Most ack ids in one `AckEvents` (herald's limit).
pub const MAX_ACK_BATCH: usize = 10_000;
/// `AckEvents` calls in flight at once.
const ACKS_IN_FLIGHT: usize = 4;
/// Acknowledgements waiting for a full batch are sent at least this often.
const ACK_FLUSH: Duration = Duration::from_millis(5);

/// What a scenario does with each delivery.
pub trait Sink: Send + 'static {
    /// Takes one delivery, received at `now_ns` (`CLOCK_MONOTONIC`).
    fn take(&mut self, delivery: ConsumedEvent, now_ns: u64);
    /// How far along the scenario is (e.g. distinct events matched so far):
    /// what [`Consumer::wait_for`] waits on.
    fn progress(&self) -> u64;
}

/// How the consumer is doing, readable while it runs.
#[derive(Default)]
pub struct Progress {
    /// The sink's [`Sink::progress`] after the last batch.
    matched: AtomicU64,
    /// Deliveries received (every one, redeliveries too).
    deliveries: AtomicU64,
    /// `CLOCK_MONOTONIC` ns of the last delivery.
    last_ns: AtomicU64,
    acked: AtomicU64,
    ack_errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    changed: Notify,
}

impl Progress {
    pub fn matched(&self) -> u64 {
        self.matched.load(Ordering::Relaxed)
    }

    pub fn deliveries(&self) -> u64 {
        self.deliveries.load(Ordering::Relaxed)
    }

    pub fn last_ns(&self) -> u64 {
        self.last_ns.load(Ordering::Relaxed)
    }

    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    pub fn ack_errors(&self) -> u64 {
        self.ack_errors.load(Ordering::Relaxed)
    }

    pub fn first_error(&self) -> Option<String> {
        self.first_error.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub fn error(&self, e: String) {
        self.first_error.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(e);
    }

    /// `count` deliveries arrived at `now_ns`; the sink's progress is `matched`.
    pub fn record(&self, count: u64, now_ns: u64, matched: u64) {
        self.deliveries.fetch_add(count, Ordering::Relaxed);
        self.last_ns.store(now_ns, Ordering::Relaxed);
        self.matched.store(matched, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    /// Waits until the sink's progress reaches `target`, or nothing has
    /// arrived for `idle` (counted from this call at the earliest), or
    /// `within` has passed; tells whether the target was reached.
    pub async fn wait_for(&self, target: u64, idle: Duration, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let called_ns = message::now_ns();
        loop {
            if self.matched() >= target {
                return true;
            }
            let now = Instant::now();
            let quiet_since = self.last_ns().max(called_ns);
            let since_last = Duration::from_nanos(message::now_ns().saturating_sub(quiet_since));
            if now >= deadline || since_last >= idle {
                return false;
            }
            let _ = tokio::time::timeout(Duration::from_millis(20), self.changed.notified()).await;
        }
    }
}

/// One running consumer instance, which gives its sink back when stopped.
pub struct Consumer<S> {
    pub progress: Arc<Progress>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<S>,
}

/// An HTTP/2 connection to broker `index` with windows wide enough for a
/// stream of hundreds of thousands of events per second.
async fn client(endpoints: &Endpoints, index: usize) -> anyhow::Result<BrokerServiceClient<Channel>> {
    let brokers = endpoints.grpc()?;
    let addr = brokers[index % brokers.len()];
    let channel = Channel::from_shared(format!("http://{addr}"))?
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to the broker at {addr}"))?;
    Ok(BrokerServiceClient::new(channel).max_decoding_message_size(64 << 20))
}

impl<S: Sink> Consumer<S> {
    /// Attaches an instance of `group` on broker 0 of `endpoints`. Once this
    /// returns the group exists, so it gets every event reported from then on.
    pub async fn start(
        endpoints: &Endpoints,
        group: &str,
        max_unacked: u32,
        ack_batch: usize,
        sink: S,
    ) -> anyhow::Result<Self> {
        let authorization = publishers::authorization(endpoints)?;
        let mut consuming = client(endpoints, 0).await?;
        let acking = client(endpoints, 0).await?;
        let request = ConsumeEventsRequest { group: group.to_owned(), max_unacked };
        let stream = consuming
            .consume_events(publishers::authorized(request, &authorization))
            .await
            .context("ConsumeEvents")?
            .into_inner();
        let progress = Arc::new(Progress::default());
        let (acks, to_ack) = mpsc::unbounded_channel();
        let acker = tokio::spawn(acknowledge(acking, authorization, group.to_owned(), to_ack, progress.clone()));
        let (stop, stopped) = oneshot::channel();
        let batch = ack_batch.clamp(1, MAX_ACK_BATCH);
        let task = tokio::spawn(consume(stream, sink, acks, acker, batch, stopped, progress.clone()));
        Ok(Self { progress, stop: Some(stop), task })
    }

    /// See [`Progress::wait_for`].
    pub async fn wait_for(&self, target: u64, idle: Duration, within: Duration) -> bool {
        self.progress.wait_for(target, idle, within).await
    }

    /// Stops consuming (after sending the acknowledgements due) and gives
    /// the sink back.
    pub async fn stop(mut self) -> anyhow::Result<S> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.context("the consumer failed")
    }
}

/// Receives deliveries into `sink` until `stopped`, queueing their ack ids
/// for `acks` in batches of `batch`.
async fn consume<S: Sink>(
    mut stream: tonic::Streaming<herald_proto::v1::ConsumeEventsResponse>,
    mut sink: S,
    acks: mpsc::UnboundedSender<Vec<String>>,
    acker: JoinHandle<()>,
    batch: usize,
    mut stopped: oneshot::Receiver<()>,
    progress: Arc<Progress>,
) -> S {
    let mut pending: Vec<String> = Vec::with_capacity(batch);
    let mut flush = tokio::time::interval(ACK_FLUSH);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = &mut stopped => break,
            message = stream.message() => match message {
                Ok(Some(response)) => {
                    let now = message::now_ns();
                    let count = response.events.len() as u64;
                    for mut delivery in response.events {
                        pending.push(std::mem::take(&mut delivery.ack_id));
                        sink.take(delivery, now);
                        if pending.len() >= batch {
                            let _ = acks.send(std::mem::replace(&mut pending, Vec::with_capacity(batch)));
                        }
                    }
                    progress.record(count, now, sink.progress());
                }
                Ok(None) => {
                    progress.error("the broker ended the event stream".into());
                    break;
                }
                Err(status) => {
                    progress.error(format!("event stream: {status}"));
                    break;
                }
            },
            _ = flush.tick() => {
                if !pending.is_empty() {
                    let _ = acks.send(std::mem::take(&mut pending));
                }
            }
        }
    }
    if !pending.is_empty() {
        let _ = acks.send(pending);
    }
    drop(acks);
    let _ = acker.await;
    sink
}

/// Sends the ack ids queued on `to_ack`, up to [`ACKS_IN_FLIGHT`] calls at
/// once, until the queue closes and every call has been answered.
async fn acknowledge(
    client: BrokerServiceClient<Channel>,
    authorization: Option<MetadataValue<Ascii>>,
    group: String,
    mut to_ack: mpsc::UnboundedReceiver<Vec<String>>,
    progress: Arc<Progress>,
) {
    let permits = Arc::new(Semaphore::new(ACKS_IN_FLIGHT));
    let mut calls = Vec::new();
    while let Some(mut ack_ids) = to_ack.recv().await {
        // Whatever else is queued goes in the same call, up to the limit.
        while ack_ids.len() < MAX_ACK_BATCH
            && let Ok(more) = to_ack.try_recv()
        {
            ack_ids.extend(more);
        }
        let rest = if ack_ids.len() > MAX_ACK_BATCH { ack_ids.split_off(MAX_ACK_BATCH) } else { Vec::new() };
        for ack_ids in [ack_ids, rest].into_iter().filter(|ids| !ids.is_empty()) {
            let Ok(permit) = permits.clone().acquire_owned().await else { return };
            let mut client = client.clone();
            let request = AckEventsRequest { group: group.clone(), ack_ids };
            let request = publishers::authorized(request, &authorization);
            let progress = progress.clone();
            calls.retain(|call: &JoinHandle<()>| !call.is_finished());
            calls.push(tokio::spawn(async move {
                let count = request.get_ref().ack_ids.len() as u64;
                match client.ack_events(request).await {
                    Ok(_) => progress.acked.fetch_add(count, Ordering::Relaxed),
                    Err(status) => {
                        progress.error(format!("AckEvents: {status}"));
                        progress.ack_errors.fetch_add(count, Ordering::Relaxed)
                    }
                };
                drop(permit);
            }));
        }
    }
    for call in calls {
        let _ = call.await;
    }
}

/// `<worker_id>/<connection_id>` of a delivery's connection.
pub fn address_of(delivery: &ConsumedEvent) -> Option<String> {
    let connection = delivery.event.as_ref()?.connection.as_ref()?;
    Some(format!("{}/{}", connection.worker_id, connection.connection_id))
}
