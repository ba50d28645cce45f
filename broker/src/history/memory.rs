//! Channel history in this broker's memory, for a broker on its own
//! (`herald standalone`, or one `herald broker` without NATS): each channel
//! with history is a bounded queue of its last publications.
//!
//! A stream's epoch is a random token made when the stream starts. The
//! stream is forgotten once every publication in it has expired and it has
//! been idle a while longer, so a channel that comes back later starts a new
//! epoch: a client still holding an offset of the old one is told that it
//! cannot recover, rather than handed offsets that mean something else.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use herald_common::namespaces::HistoryRule;
use herald_common::token::random_token;
use herald_proto::v1::{Content, HistoryPublication, HistoryResponse, StreamPosition};

use super::Read;

/// How long an emptied stream's position outlives its last publication, so
/// that a client away for longer than the history's lifetime, but with
/// nothing missed, still recovers.
const POSITION_LIFETIME: Duration = Duration::from_secs(3600);
/// Appends between two sweeps of forgotten streams.
const SWEEP_EVERY: u64 = 4096;

/// The histories of every channel, in memory.
#[derive(Debug, Default)]
pub struct MemoryHistory {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    streams: HashMap<String, Stream>,
    appends: u64,
}

#[derive(Debug)]
struct Stream {
    epoch: String,
    /// The offset of the last publication appended.
    top: u64,
    entries: VecDeque<Entry>,
    ttl: Duration,
    last_append: Instant,
}

#[derive(Debug)]
struct Entry {
    offset: u64,
    content: Content,
    stored: Instant,
    published_at: SystemTime,
}

impl Stream {
    fn new(rule: &HistoryRule, now: Instant) -> Self {
        Self { epoch: random_token(8), top: 0, entries: VecDeque::new(), ttl: rule.ttl, last_append: now }
    }

    fn expire(&mut self, now: Instant) {
        while self.entries.front().is_some_and(|e| now.duration_since(e.stored) >= self.ttl) {
            self.entries.pop_front();
        }
    }

    fn forgotten(&self, now: Instant) -> bool {
        self.entries.is_empty() && now.duration_since(self.last_append) >= self.ttl + POSITION_LIFETIME
    }

    fn position(&self) -> StreamPosition {
        StreamPosition { offset: self.top, epoch: self.epoch.clone() }
    }

    /// The offset of the oldest publication still held.
    fn oldest(&self) -> u64 {
        self.entries.front().map_or(self.top + 1, |e| e.offset)
    }
}

impl MemoryHistory {
    /// Stores `content` as the channel's next publication; returns its position.
    pub fn append(&self, channel: &str, rule: &HistoryRule, content: &Content) -> StreamPosition {
        let now = Instant::now();
        let mut state = self.lock();
        state.appends += 1;
        if state.appends.is_multiple_of(SWEEP_EVERY) {
            state.streams.retain(|_, stream| {
                stream.expire(now);
                !stream.forgotten(now)
            });
        }
        let stream = match state.streams.get_mut(channel) {
            Some(stream) => stream,
            None => state.streams.entry(channel.to_owned()).or_insert_with(|| Stream::new(rule, now)),
        };
        stream.expire(now);
        if stream.forgotten(now) {
            *stream = Stream::new(rule, now);
        }
        stream.ttl = rule.ttl;
        stream.top += 1;
        stream.last_append = now;
        stream.entries.push_back(Entry {
            offset: stream.top,
            content: content.clone(),
            stored: now,
            published_at: SystemTime::now(),
        });
        while stream.entries.len() > rule.size {
            stream.entries.pop_front();
        }
        stream.position()
    }

    /// Reads a channel's history (see [`Read`]).
    pub fn read(&self, channel: &str, read: &Read) -> HistoryResponse {
        let now = Instant::now();
        let mut state = self.lock();
        let Some(stream) = state.streams.get_mut(channel).filter(|stream| !stream.forgotten(now)) else {
            return read.of_nothing();
        };
        stream.expire(now);
        let top = stream.position();
        let after = read.after(&top);
        let publications = stream
            .entries
            .iter()
            .filter(|e| after.is_some_and(|after| e.offset > after))
            .take(read.limit as usize)
            .map(|e| HistoryPublication {
                offset: e.offset,
                content: Some(e.content.clone()),
                published_at: Some(e.published_at.into()),
            })
            .collect();
        read.answer(top, after, stream.oldest(), publications)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use herald_proto::v1::content;

    use super::*;

    fn rule(size: usize) -> HistoryRule {
        HistoryRule { size, ttl: Duration::from_secs(60), recover: true }
    }

    fn text(s: &str) -> Content {
        Content { body: Some(content::Body::Text(s.into())) }
    }

    fn since(offset: u64, epoch: &str) -> Read {
        Read { since: Some(StreamPosition { offset, epoch: epoch.into() }), limit: 100 }
    }

    fn offsets(r: &HistoryResponse) -> Vec<u64> {
        r.publications.iter().map(|p| p.offset).collect()
    }

    #[test]
    fn offsets_count_up_from_one_in_one_epoch_per_channel() {
        let history = MemoryHistory::default();
        let a1 = history.append("feed:a", &rule(10), &text("1"));
        let a2 = history.append("feed:a", &rule(10), &text("2"));
        let b1 = history.append("feed:b", &rule(10), &text("1"));
        assert_eq!((a1.offset, a2.offset, b1.offset), (1, 2, 1));
        assert_eq!(a1.epoch, a2.epoch);
        assert_ne!(a1.epoch, b1.epoch, "each channel's stream has its own life");
    }

    #[test]
    fn a_client_gets_exactly_what_came_after_its_position() {
        let history = MemoryHistory::default();
        let epoch = (1..=5).map(|i| history.append("feed:a", &rule(10), &text(&i.to_string()))).last().unwrap().epoch;
        let r = history.read("feed:a", &since(2, &epoch));
        assert_eq!((offsets(&r), r.complete), (vec![3, 4, 5], true));
        assert_eq!(r.position, Some(StreamPosition { offset: 5, epoch: epoch.clone() }));
        let r = history.read("feed:a", &since(5, &epoch));
        assert_eq!((offsets(&r), r.complete), (vec![], true), "at the top: nothing missed");
        let r = history.read("feed:a", &since(0, ""));
        assert_eq!((offsets(&r), r.complete), (vec![1, 2, 3, 4, 5], true), "subscribed before the first publication");
    }

    #[test]
    fn a_position_older_than_what_is_kept_or_of_another_epoch_cannot_be_recovered() {
        let history = MemoryHistory::default();
        let epoch = (1..=5).map(|i| history.append("feed:a", &rule(3), &text(&i.to_string()))).last().unwrap().epoch;
        let r = history.read("feed:a", &since(1, &epoch));
        assert_eq!((offsets(&r), r.complete), (vec![], false), "2 was dropped: 3..5 alone are not all");
        let r = history.read("feed:a", &since(2, &epoch));
        assert_eq!((offsets(&r), r.complete), (vec![3, 4, 5], true));
        let r = history.read("feed:a", &since(4, "other"));
        assert!(!r.complete && r.publications.is_empty());
        let r = history.read("feed:a", &since(0, ""));
        assert!(!r.complete, "1 and 2 are gone");
        let r = history.read("feed:never", &since(3, &epoch));
        assert!(!r.complete, "a stream that is not there lost what the client knew of");
        assert!(history.read("feed:never", &since(0, "")).complete);
    }

    #[test]
    fn without_a_position_the_newest_are_read_up_to_the_limit() {
        let history = MemoryHistory::default();
        for i in 1..=5 {
            history.append("feed:a", &rule(10), &text(&i.to_string()));
        }
        let r = history.read("feed:a", &Read { since: None, limit: 2 });
        assert_eq!((offsets(&r), r.complete), (vec![4, 5], false));
        let r = history.read("feed:a", &Read { since: None, limit: 0 });
        assert_eq!(r.position.map(|p| p.offset), Some(5), "limit 0: the position alone");
        assert!(r.publications.is_empty());
    }

    #[test]
    fn expired_publications_are_not_recovered_but_the_position_is_kept() {
        let history = MemoryHistory::default();
        let short = HistoryRule { size: 10, ttl: Duration::from_millis(30), recover: true };
        history.append("feed:a", &short, &text("1"));
        let p = history.append("feed:a", &short, &text("2"));
        std::thread::sleep(Duration::from_millis(50));
        let r = history.read("feed:a", &since(1, &p.epoch));
        assert!(!r.complete, "2 expired unseen");
        let r = history.read("feed:a", &since(2, &p.epoch));
        assert!(r.complete, "a client that saw 2 missed nothing");
        assert_eq!(history.append("feed:a", &short, &text("3")), StreamPosition { offset: 3, epoch: p.epoch });
    }
}
