//! Idempotency keys accepted lately, so that a retried publish is not routed
//! twice. Bounded twice: a key is kept for the window, and at most
//! `capacity` keys are kept (past that the oldest go early, and are counted).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub(crate) struct RecentKeys {
    window: Duration,
    capacity: usize,
    /// Key → when it was accepted.
    seen: HashMap<String, Instant>,
    /// The same keys, oldest first, for expiry.
    order: VecDeque<(Instant, String)>,
}

impl RecentKeys {
    pub(crate) fn new(window: Duration, capacity: usize) -> Self {
        Self { window, capacity: capacity.max(1), seen: HashMap::new(), order: VecDeque::new() }
    }

    /// Records `key` as accepted at `now`; false when it already was within
    /// the window. Returns also how many keys had to be forgotten early.
    pub(crate) fn insert(&mut self, key: &str, now: Instant) -> (bool, u64) {
        self.expire(now);
        if self.seen.contains_key(key) {
            return (false, 0);
        }
        let mut evicted = 0;
        while self.seen.len() >= self.capacity {
            let Some((at, oldest)) = self.order.pop_front() else { break };
            if self.seen.get(&oldest) == Some(&at) {
                self.seen.remove(&oldest);
                evicted += 1;
            }
        }
        self.seen.insert(key.to_owned(), now);
        self.order.push_back((now, key.to_owned()));
        (true, evicted)
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
                && self.seen.get(&key) == Some(&at)
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
        assert_eq!(keys.insert("a", start), (true, 0));
        assert_eq!(keys.insert("a", start + Duration::from_secs(9)), (false, 0));
        assert_eq!(keys.insert("a", start + Duration::from_secs(10)), (true, 0));
    }

    #[test]
    fn a_forgotten_key_is_taken_again() {
        let now = Instant::now();
        let mut keys = RecentKeys::new(Duration::from_secs(10), 100);
        keys.insert("a", now);
        keys.remove("a");
        assert_eq!(keys.insert("a", now), (true, 0));
        assert_eq!(keys.len(), 1);
    }

    #[test]
    fn past_capacity_the_oldest_keys_go_early_and_are_counted() {
        let now = Instant::now();
        let mut keys = RecentKeys::new(Duration::from_secs(10), 2);
        keys.insert("a", now);
        keys.insert("b", now);
        assert_eq!(keys.insert("c", now), (true, 1));
        assert_eq!(keys.len(), 2);
        assert_eq!(keys.insert("a", now), (true, 1), "a was forgotten to make room");
        assert_eq!(keys.insert("c", now), (false, 0));
    }
}
