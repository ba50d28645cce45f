//! Sharing a group's events among the instances attached to this broker.
//!
//! One puller task per group pulls from the [`EventLog`] as much as the
//! local instances have room for (each may hold `max_unacked` deliveries),
//! and hands each batch to the instance with the most room. Room comes back
//! when a delivery is acknowledged through this broker or its ack wait ends
//! (acknowledged elsewhere, or due again from the log). An instance that
//! goes away hands its deliveries back to the log at once.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use herald_proto::v1::{ConsumeEventsResponse, ConsumedEvent};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_stream::Stream;
use tonic::Status;

use super::log::{EventLog, LogError};

/// Most events one pull asks for.
const MAX_PULL: usize = 1024;
/// How long a pull waits for events before the puller looks around again.
const PULL_WAIT: Duration = Duration::from_millis(500);
/// How long the puller waits after the log failed.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

pub(crate) struct Dispatcher {
    log: Arc<dyn EventLog>,
    ack_wait: Duration,
    groups: Mutex<HashMap<String, Arc<LocalGroup>>>,
}

struct LocalGroup {
    name: String,
    state: Mutex<Instances>,
    /// An instance came, went, or got room.
    changed: Notify,
}

#[derive(Default)]
struct Instances {
    next_id: u64,
    list: Vec<Instance>,
    /// Which instance holds each delivery, with when it stops holding it.
    owners: HashMap<String, u64>,
    deadlines: VecDeque<(Instant, String)>,
}

struct Instance {
    id: u64,
    tx: mpsc::UnboundedSender<Vec<ConsumedEvent>>,
    max_unacked: usize,
    held: usize,
}

impl Instances {
    fn free(&self, instance: &Instance) -> usize {
        instance.max_unacked.saturating_sub(instance.held)
    }

    /// Forgets deliveries whose ack wait ended: the log has them again.
    fn expire(&mut self, now: Instant) {
        while let Some((deadline, _)) = self.deadlines.front() {
            if *deadline > now {
                break;
            }
            if let Some((_, ack_id)) = self.deadlines.pop_front() {
                self.settle(&ack_id);
            }
        }
    }

    fn settle(&mut self, ack_id: &str) -> bool {
        let Some(owner) = self.owners.remove(ack_id) else {
            return false;
        };
        if let Some(instance) = self.list.iter_mut().find(|i| i.id == owner) {
            instance.held = instance.held.saturating_sub(1);
        }
        true
    }
}

impl Dispatcher {
    pub(crate) fn new(log: Arc<dyn EventLog>, ack_wait: Duration) -> Self {
        Self { log, ack_wait, groups: Mutex::default() }
    }

    /// Attaches a new instance of `group`, once the group exists.
    pub(crate) async fn attach(self: &Arc<Self>, group: &str, max_unacked: usize) -> Result<Consumer, LogError> {
        self.log.open(group).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let local = {
            let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
            match groups.get(group) {
                Some(local) => local.clone(),
                None => {
                    let local = Arc::new(LocalGroup {
                        name: group.to_owned(),
                        state: Mutex::default(),
                        changed: Notify::new(),
                    });
                    groups.insert(group.to_owned(), local.clone());
                    tokio::spawn(pull(self.clone(), local.clone()));
                    local
                }
            }
        };
        let id = {
            let mut state = local.state();
            state.next_id += 1;
            let id = state.next_id;
            state.list.push(Instance { id, tx, max_unacked, held: 0 });
            id
        };
        local.changed.notify_one();
        Ok(Consumer { rx, detach: Some(Detach { dispatcher: self.clone(), group: local, id }) })
    }

    /// Acknowledges deliveries of `group`, on the log and for this broker's
    /// instances' room.
    pub(crate) async fn ack(&self, group: &str, ack_ids: &[String]) -> Result<(), LogError> {
        self.log.ack(group, ack_ids).await?;
        let local = self.groups.lock().unwrap_or_else(PoisonError::into_inner).get(group).cloned();
        if let Some(local) = local {
            let settled = {
                let mut state = local.state();
                ack_ids.iter().filter(|id| state.settle(id)).count()
            };
            if settled > 0 {
                local.changed.notify_one();
            }
        }
        Ok(())
    }

    /// Ends every instance's stream: the broker is shutting down (their
    /// deliveries come back after the ack wait, on another broker).
    pub(crate) fn close_all(&self) {
        let groups: Vec<Arc<LocalGroup>> =
            self.groups.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect();
        for group in groups {
            group.state().list.clear();
        }
    }

    pub(crate) fn log(&self) -> &Arc<dyn EventLog> {
        &self.log
    }
}

impl LocalGroup {
    fn state(&self) -> std::sync::MutexGuard<'_, Instances> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The group's puller: runs for the broker's life once the group has had
/// an instance here.
async fn pull(dispatcher: Arc<Dispatcher>, group: Arc<LocalGroup>) {
    loop {
        let room = {
            let mut state = group.state();
            state.expire(Instant::now());
            state.list.iter().map(|i| state.free(i)).sum::<usize>()
        };
        if room == 0 {
            let _ = tokio::time::timeout(PULL_WAIT, group.changed.notified()).await;
            continue;
        }
        match dispatcher.log.pull(&group.name, room.min(MAX_PULL), PULL_WAIT).await {
            Ok(events) if events.is_empty() => {}
            Ok(events) => {
                let unplaced = share(&group, events, dispatcher.ack_wait);
                if !unplaced.is_empty() {
                    dispatcher.log.release(&group.name, &unplaced).await;
                }
            }
            Err(e) => {
                tracing::warn!(group = %group.name, error = %e, "pulling events failed; retrying");
                tokio::time::sleep(RETRY_AFTER_FAILURE).await;
            }
        }
    }
}

/// Hands `events` to the instances with room, most room first; returns the
/// ack ids of those no instance took.
fn share(group: &LocalGroup, events: Vec<ConsumedEvent>, ack_wait: Duration) -> Vec<String> {
    let mut state = group.state();
    let deadline = Instant::now() + ack_wait;
    let mut events = events.into_iter().peekable();
    let mut unplaced = Vec::new();
    while events.peek().is_some() {
        let best = (0..state.list.len()).max_by_key(|&i| state.free(&state.list[i]));
        let Some(index) = best.filter(|&i| state.free(&state.list[i]) > 0) else {
            unplaced.extend(events.by_ref().map(|e| e.ack_id));
            break;
        };
        let take = state.free(&state.list[index]);
        let batch: Vec<ConsumedEvent> = events.by_ref().take(take).collect();
        let ids: Vec<String> = batch.iter().map(|e| e.ack_id.clone()).collect();
        let instance = &mut state.list[index];
        if instance.tx.send(batch).is_err() {
            // Going away: its detach is on its way.
            let id = instance.id;
            state.list.retain(|i| i.id != id);
            unplaced.extend(ids);
            continue;
        }
        instance.held += ids.len();
        let owner = instance.id;
        for id in ids {
            state.deadlines.push_back((deadline, id.clone()));
            state.owners.insert(id, owner);
        }
    }
    unplaced
}

/// One instance's stream of event batches; detaches it when dropped.
pub(crate) struct Consumer {
    rx: mpsc::UnboundedReceiver<Vec<ConsumedEvent>>,
    detach: Option<Detach>,
}

struct Detach {
    dispatcher: Arc<Dispatcher>,
    group: Arc<LocalGroup>,
    id: u64,
}

impl Stream for Consumer {
    type Item = Result<ConsumeEventsResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|batch| batch.map(|events| Ok(ConsumeEventsResponse { events })))
    }
}

impl Consumer {
    /// The next batch, for consumers inside the broker (webhooks).
    pub(crate) async fn next_batch(&mut self) -> Option<Vec<ConsumedEvent>> {
        self.rx.recv().await
    }

    /// The next batch if one is already here.
    pub(crate) fn ready_batch(&mut self) -> Option<Vec<ConsumedEvent>> {
        self.rx.try_recv().ok()
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let Some(Detach { dispatcher, group, id }) = self.detach.take() else {
            return;
        };
        let held: Vec<String> = {
            let mut state = group.state();
            state.list.retain(|i| i.id != id);
            let held: Vec<String> =
                state.owners.iter().filter(|(_, owner)| **owner == id).map(|(ack, _)| ack.clone()).collect();
            for ack in &held {
                state.owners.remove(ack);
            }
            held
        };
        if !held.is_empty() {
            tokio::spawn(async move { dispatcher.log.release(&group.name, &held).await });
        }
    }
}
