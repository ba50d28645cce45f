//! The event log of a broker on its own: in memory, lost with the process.
//!
//! Each group has a backlog (stored, not yet delivered, oldest first) and
//! its pending deliveries (delivered, not yet acknowledged), with their
//! deadlines in delivery order. A pull first hands expired deliveries back to
//! the front of the backlog, so redelivery needs no timer of its own.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use herald_proto::v1::{ConnectionEvent, ConsumedEvent};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::log::{EventLog, LogError};
use super::{LogConfig, ack_ids};

/// How long and how many event ids are remembered, so that a retried report
/// is stored once.
const DEDUP_WINDOW: Duration = Duration::from_secs(120);
const DEDUP_CAPACITY: usize = 200_000;

pub struct MemoryLog {
    config: LogConfig,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    groups: HashMap<String, Arc<Group>>,
    /// Ids stored lately, in a set and in the order they came (one
    /// allocation each, shared).
    seen: HashSet<Arc<str>>,
    seen_order: VecDeque<(Instant, Arc<str>)>,
}

struct Group {
    queue: Mutex<Queue>,
    arrived: Notify,
}

#[derive(Default)]
struct Queue {
    backlog: VecDeque<Entry>,
    pending: HashMap<u64, Entry>,
    /// Deliveries by deadline (ack wait is the same for all, so this is
    /// delivery order); acknowledged ones are skipped when met.
    deadlines: VecDeque<(Instant, u64)>,
    next_delivery: u64,
    dropped: u64,
}

struct Entry {
    event: Arc<ConnectionEvent>,
    stored_at: Instant,
    deliveries: u32,
}

impl MemoryLog {
    pub fn new(config: LogConfig) -> Self {
        Self { config, state: Mutex::default() }
    }

    fn group(&self, name: &str) -> Arc<Group> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state
            .groups
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(Group { queue: Mutex::default(), arrived: Notify::new() }))
            .clone()
    }

    fn existing(&self, name: &str) -> Option<Arc<Group>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).groups.get(name).cloned()
    }
}

impl Group {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Queue {
    fn push(&mut self, event: Arc<ConnectionEvent>, now: Instant, config: &LogConfig) {
        self.backlog.push_back(Entry { event, stored_at: now, deliveries: 0 });
        while self.backlog.len() + self.pending.len() > config.retention
            || self.backlog.front().is_some_and(|e| now.duration_since(e.stored_at) > config.max_age)
        {
            if self.backlog.pop_front().is_none() {
                break;
            }
            self.dropped += 1;
        }
    }

    /// Hands deliveries whose ack wait ended back to the front of the
    /// backlog, oldest delivery first; returns the next deadline.
    fn expire(&mut self, now: Instant) -> Option<Instant> {
        let mut expired = Vec::new();
        while let Some(&(deadline, id)) = self.deadlines.front() {
            if !self.pending.contains_key(&id) {
                self.deadlines.pop_front();
                continue;
            }
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            expired.extend(self.pending.remove(&id));
        }
        for entry in expired.into_iter().rev() {
            self.backlog.push_front(entry);
        }
        // The loop left a pending delivery at the front, or nothing.
        self.deadlines.front().map(|&(deadline, _)| deadline)
    }

    fn take(&mut self, max: usize, now: Instant, ack_wait: Duration) -> Vec<ConsumedEvent> {
        let n = max.min(self.backlog.len());
        let mut taken = Vec::with_capacity(n);
        for mut entry in self.backlog.drain(..n) {
            entry.deliveries += 1;
            self.next_delivery += 1;
            let id = self.next_delivery;
            taken.push(ConsumedEvent {
                event: Some(ConnectionEvent::clone(&entry.event)),
                ack_id: ack_ids::memory(id),
                delivery: entry.deliveries,
            });
            self.deadlines.push_back((now + ack_wait, id));
            self.pending.insert(id, entry);
        }
        taken
    }
}

#[async_trait]
impl EventLog for MemoryLog {
    async fn store(&self, events: &[ConnectionEvent]) -> Result<(), LogError> {
        let now = Instant::now();
        let (groups, fresh) = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            while state.seen_order.front().is_some_and(|(at, _)| now.duration_since(*at) > DEDUP_WINDOW)
                || state.seen_order.len() > DEDUP_CAPACITY
            {
                if let Some((_, id)) = state.seen_order.pop_front() {
                    state.seen.remove(&id);
                }
            }
            let mut fresh: Vec<Arc<ConnectionEvent>> = Vec::with_capacity(events.len());
            for event in events {
                if state.seen.contains(event.id.as_str()) {
                    continue;
                }
                let id: Arc<str> = Arc::from(event.id.as_str());
                state.seen.insert(id.clone());
                state.seen_order.push_back((now, id));
                fresh.push(Arc::new(event.clone()));
            }
            let groups: Vec<Arc<Group>> = state.groups.values().cloned().collect();
            (groups, fresh)
        };
        if fresh.is_empty() {
            return Ok(());
        }
        for group in groups {
            {
                let mut queue = group.queue();
                for event in &fresh {
                    queue.push(event.clone(), now, &self.config);
                }
            }
            group.arrived.notify_one();
        }
        Ok(())
    }

    async fn open(&self, group: &str) -> Result<(), LogError> {
        self.group(group);
        Ok(())
    }

    async fn pull(&self, group: &str, max: usize, wait: Duration) -> Result<Vec<ConsumedEvent>, LogError> {
        let group = self.group(group);
        let until = Instant::now() + wait;
        loop {
            let now = Instant::now();
            let next_deadline = {
                let mut queue = group.queue();
                let next_deadline = queue.expire(now);
                let taken = queue.take(max, now, self.config.ack_wait);
                if !taken.is_empty() {
                    return Ok(taken);
                }
                next_deadline
            };
            if now >= until {
                return Ok(Vec::new());
            }
            let wake = next_deadline.map_or(until, |deadline| deadline.min(until));
            let _ = tokio::time::timeout_at(wake, group.arrived.notified()).await;
        }
    }

    async fn ack(&self, group: &str, ids: &[String]) -> Result<(), LogError> {
        let Some(group) = self.existing(group) else {
            return Ok(());
        };
        let mut queue = group.queue();
        for id in ids {
            if let Some(id) = ack_ids::parse_memory(id) {
                queue.pending.remove(&id);
            }
        }
        Ok(())
    }

    async fn release(&self, group: &str, ids: &[String]) {
        let Some(group) = self.existing(group) else {
            return;
        };
        {
            let mut queue = group.queue();
            let mut released: Vec<(u64, Entry)> = ids
                .iter()
                .filter_map(|id| ack_ids::parse_memory(id))
                .filter_map(|id| queue.pending.remove(&id).map(|entry| (id, entry)))
                .collect();
            released.sort_by_key(|(id, _)| std::cmp::Reverse(*id));
            for (_, entry) in released {
                queue.backlog.push_front(entry);
            }
        }
        group.arrived.notify_one();
    }

    fn dropped(&self) -> Vec<(String, u64)> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.groups.iter().map(|(name, group)| (name.clone(), group.queue().dropped)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str) -> ConnectionEvent {
        ConnectionEvent { id: id.to_owned(), ..Default::default() }
    }

    fn config() -> LogConfig {
        LogConfig { retention: 3, ack_wait: Duration::from_secs(5), ..LogConfig::default() }
    }

    fn ids(events: &[ConsumedEvent]) -> Vec<String> {
        events.iter().map(|e| e.event.as_ref().map(|e| e.id.clone()).unwrap_or_default()).collect()
    }

    const NOW: Duration = Duration::ZERO;

    #[tokio::test]
    async fn a_group_sees_events_stored_after_it_was_first_consumed() {
        let log = MemoryLog::new(config());
        log.store(&[event("before")]).await.unwrap();
        assert!(log.pull("g", 10, NOW).await.unwrap().is_empty());
        log.store(&[event("a"), event("b")]).await.unwrap();
        assert_eq!(ids(&log.pull("g", 10, NOW).await.unwrap()), ["a", "b"]);
    }

    #[tokio::test]
    async fn every_group_gets_every_event_and_a_repeated_id_is_stored_once() {
        let log = MemoryLog::new(config());
        log.pull("one", 1, NOW).await.unwrap();
        log.pull("two", 1, NOW).await.unwrap();
        log.store(&[event("a")]).await.unwrap();
        log.store(&[event("a"), event("b")]).await.unwrap();
        assert_eq!(ids(&log.pull("one", 10, NOW).await.unwrap()), ["a", "b"]);
        assert_eq!(ids(&log.pull("two", 10, NOW).await.unwrap()), ["a", "b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unacknowledged_event_comes_back_after_the_ack_wait_and_an_acknowledged_one_does_not() {
        let log = MemoryLog::new(config());
        log.pull("g", 1, NOW).await.unwrap();
        log.store(&[event("a"), event("b")]).await.unwrap();
        let first = log.pull("g", 10, NOW).await.unwrap();
        log.ack("g", &[first[0].ack_id.clone()]).await.unwrap();
        assert!(log.pull("g", 10, NOW).await.unwrap().is_empty());
        let again = log.pull("g", 10, Duration::from_secs(6)).await.unwrap();
        assert_eq!(ids(&again), ["b"]);
        assert_eq!(again[0].delivery, 2);
        assert_ne!(again[0].ack_id, first[1].ack_id);
    }

    #[tokio::test]
    async fn released_events_are_delivered_again_at_once_in_order() {
        let log = MemoryLog::new(config());
        log.pull("g", 1, NOW).await.unwrap();
        log.store(&[event("a"), event("b"), event("c")]).await.unwrap();
        let first = log.pull("g", 2, NOW).await.unwrap();
        log.release("g", &[first[1].ack_id.clone(), first[0].ack_id.clone()]).await;
        assert_eq!(ids(&log.pull("g", 10, NOW).await.unwrap()), ["a", "b", "c"]);
    }

    #[tokio::test]
    async fn a_group_that_falls_behind_the_retention_loses_its_oldest_events_and_counts_them() {
        let log = MemoryLog::new(config());
        log.pull("g", 1, NOW).await.unwrap();
        log.store(&(1..=5).map(|n| event(&n.to_string())).collect::<Vec<_>>()).await.unwrap();
        assert_eq!(ids(&log.pull("g", 10, NOW).await.unwrap()), ["3", "4", "5"]);
        assert_eq!(log.dropped(), [("g".to_owned(), 2)]);
    }

    #[tokio::test]
    async fn a_pull_waits_for_the_next_event() {
        let log = Arc::new(MemoryLog::new(config()));
        log.pull("g", 1, NOW).await.unwrap();
        let waiting = tokio::spawn({
            let log = log.clone();
            async move { log.pull("g", 10, Duration::from_secs(10)).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        log.store(&[event("late")]).await.unwrap();
        assert_eq!(ids(&waiting.await.unwrap().unwrap()), ["late"]);
    }
}
