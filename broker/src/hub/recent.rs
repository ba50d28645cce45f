//! Idempotency keys accepted lately, so that a retried publish is not routed
//! twice. A key is in flight from its publish's start until that publish is
//! routed: a retry meanwhile is told to try again, not that it is a duplicate,
//! since the first attempt may still fail. Bounded twice: a key is kept for
//! the window, and at most `capacity` keys are kept (past that the oldest go
//! early, and are counted).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// What is known of a key being recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seen {
    /// Not within the window: its publish goes ahead.
    New,
    /// Its first publish is still on its way: the outcome is not known yet.
    InFlight,
    /// Its first publish was routed: this one is a duplicate.
    Routed,
}

#[derive(Debug)]
pub(crate) struct RecentKeys {
    window: Duration,
    capacity: usize,
    /// Key → when it was accepted, and whether its publish was routed.
    seen: HashMap<String, (Instant, bool)>,
    /// The same keys, oldest first, for expiry.
    order: VecDeque<(Instant, String)>,
}

impl RecentKeys {
    pub(crate) fn new(window: Duration, capacity: usize) -> Self {
        Self { window, capacity: capacity.max(1), seen: HashMap::new(), order: VecDeque::new() }
    }

    /// Records `key` as accepted at `now`, in flight, unless it already was
    /// within the window. Returns also how many keys had to be forgotten early.
    pub(crate) fn insert(&mut self, key: &str, now: Instant) -> (Seen, u64) {
        self.expire(now);
        match self.seen.get(key) {
            Some((_, true)) => return (Seen::Routed, 0),
            Some((_, false)) => return (Seen::InFlight, 0),
            None => {}
        }
        let mut evicted = 0;
        while self.seen.len() >= self.capacity {
            let Some((at, oldest)) = self.order.pop_front() else { break };
            if self.accepted_at(&oldest) == Some(at) {
                self.seen.remove(&oldest);
                evicted += 1;
            }
        }
        self.seen.insert(key.to_owned(), (now, false));
        self.order.push_back((now, key.to_owned()));
        (Seen::New, evicted)
    }

    /// Marks `key`'s publish as routed: from now on it is a duplicate.
    pub(crate) fn settle(&mut self, key: &str) {
        if let Some((_, routed)) = self.seen.get_mut(key) {
            *routed = true;
        }
    }

    fn accepted_at(&self, key: &str) -> Option<Instant> {
        self.seen.get(key).map(|(at, _)| *at)
    }

    /// Forgets `key`: the publish that recorded it was not routed after all.
    pub(crate) fn remove(&mut self, key: &str) {
        self.seen.remove(key);
    }

    pub(crate) fn len(&self) -> usize {
        self.seen.len()
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < self.window {
                break;
            }
            if let Some((at, key)) = self.order.pop_front()
                && self.accepted_at(&key) == Some(at)
            {
                self.seen.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_refused_again_within_the_window_and_taken_after_it() {
        let start = Instant::now();
        let mut keys = RecentKeys::new(Duration::from_secs(10), 100);
        assert_eq!(keys.insert("a", start), (Seen::New, 0));
        assert_eq!(keys.insert("a", start), (Seen::InFlight, 0), "its publish is not routed yet");
        keys.settle("a");
        assert_eq!(keys.insert("a", start + Duration::from_secs(9)), (Seen::Routed, 0));
        assert_eq!(keys.insert("a", start + Duration::from_secs(10)), (Seen::New, 0));
    }

    #[test]
    fn a_forgotten_key_is_taken_again() {
        let now = Instant::now();
        let mut keys = RecentKeys::new(Duration::from_secs(10), 100);
        keys.insert("a", now);
        keys.remove("a");
        assert_eq!(keys.insert("a", now), (Seen::New, 0));
        assert_eq!(keys.len(), 1);
    }

    #[test]
    fn past_capacity_the_oldest_keys_go_early_and_are_counted() {
        let now = Instant::now();
        let mut keys = RecentKeys::new(Duration::from_secs(10), 2);
        keys.insert("a", now);
        keys.insert("b", now);
        assert_eq!(keys.insert("c", now), (Seen::New, 1));
        assert_eq!(keys.len(), 2);
        assert_eq!(keys.insert("a", now), (Seen::New, 1), "a was forgotten to make room");
        assert_eq!(keys.insert("c", now), (Seen::InFlight, 0));
    }
}
