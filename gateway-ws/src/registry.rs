//! The gateway's live connections: connection id allocation, delivery of
//! frames into their outboxes, and the heartbeat sweep. No sockets here, so
//! routing is testable alone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use tokio_tungstenite::tungstenite::Message;

use crate::outbox::{Closure, Outbox};

/// Why a frame for one connection was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// No live connection has that id on this gateway.
    UnknownConnection,
    /// The connection is being closed (it overflowed or stopped answering).
    Closing(Closure),
}

/// What a broadcast did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fanout {
    pub delivered: u64,
    pub dropped: u64,
}

/// What a heartbeat sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sweep {
    pub pinged: u64,
    pub unresponsive: u64,
}

#[derive(Debug)]
pub struct Registry {
    next_id: AtomicU64,
    connections: RwLock<HashMap<u64, Arc<Outbox>>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self { next_id: AtomicU64::new(1), connections: RwLock::default() }
    }
}

impl Registry {
    /// Adds a connection and gives it an id never used before by this gateway.
    pub fn register(&self, outbox: Arc<Outbox>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.connections.write().unwrap_or_else(PoisonError::into_inner).insert(id, outbox);
        id
    }

    pub fn remove(&self, id: u64) {
        self.connections.write().unwrap_or_else(PoisonError::into_inner).remove(&id);
    }

    pub fn len(&self) -> usize {
        self.connections.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queues `frame` (published at `published_us`, unix µs) on every
    /// connection. The payload is shared, not copied.
    pub fn broadcast(&self, frame: &Message, published_us: u64) -> Fanout {
        let connections = self.connections.read().unwrap_or_else(PoisonError::into_inner);
        let mut fanout = Fanout::default();
        for outbox in connections.values() {
            match outbox.push(frame.clone(), published_us) {
                Ok(()) => fanout.delivered += 1,
                Err(_) => fanout.dropped += 1,
            }
        }
        fanout
    }

    /// Queues `frame` (published at `published_us`, unix µs) on the
    /// connection named `connection_id`.
    pub fn send_to(&self, connection_id: &str, frame: Message, published_us: u64) -> Result<(), SendError> {
        let id: u64 = connection_id.parse().map_err(|_| SendError::UnknownConnection)?;
        let connections = self.connections.read().unwrap_or_else(PoisonError::into_inner);
        let outbox = connections.get(&id).ok_or(SendError::UnknownConnection)?;
        outbox.push(frame, published_us).map_err(SendError::Closing)
    }

    /// Closes every connection for `closure`.
    pub fn close_all(&self, closure: Closure) {
        for outbox in self.connections.read().unwrap_or_else(PoisonError::into_inner).values() {
            outbox.close(closure);
        }
    }

    /// Bytes queued on all connections together.
    pub fn queued_bytes(&self) -> usize {
        self.connections.read().unwrap_or_else(PoisonError::into_inner).values().map(|o| o.queued_bytes()).sum()
    }

    /// Pings every connection heard from since `silent_since_ms`, and closes
    /// the others as unresponsive.
    pub fn heartbeat(&self, silent_since_ms: u64) -> Sweep {
        let connections = self.connections.read().unwrap_or_else(PoisonError::into_inner);
        let mut sweep = Sweep::default();
        for outbox in connections.values() {
            if outbox.last_heard() < silent_since_ms {
                outbox.close(Closure::Unresponsive);
                sweep.unresponsive += 1;
            } else if outbox.push(Message::Ping(Default::default()), 0).is_ok() {
                sweep.pinged += 1;
            }
        }
        sweep
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    fn outbox(limit: usize) -> Arc<Outbox> {
        Arc::new(Outbox::new(limit, 0))
    }

    fn drain(outbox: &Outbox) -> Result<Vec<Message>, Closure> {
        let mut batch = VecDeque::new();
        outbox.take(&mut batch).map(|_| batch.into())
    }

    #[test]
    fn ids_are_never_reused() {
        let registry = Registry::default();
        let a = registry.register(outbox(1024));
        registry.remove(a);
        let b = registry.register(outbox(1024));
        assert_ne!(a, b);
        assert_eq!(registry.len(), 1);
    }

    #[test]
    fn broadcast_reaches_every_connection_once() {
        let registry = Registry::default();
        let boxes: Vec<_> = (0..3).map(|_| outbox(1024)).collect();
        for b in &boxes {
            registry.register(b.clone());
        }
        let fanout = registry.broadcast(&Message::text("all"), 0);
        assert_eq!(fanout, Fanout { delivered: 3, dropped: 0 });
        for b in &boxes {
            assert_eq!(drain(b), Ok(vec![Message::text("all")]));
        }
    }

    #[test]
    fn a_targeted_frame_reaches_only_its_connection() {
        let registry = Registry::default();
        let a = outbox(1024);
        let b = outbox(1024);
        registry.register(a.clone());
        let b_id = registry.register(b.clone());
        registry.send_to(&b_id.to_string(), Message::text("just b"), 0).unwrap();
        assert_eq!(drain(&a), Ok(vec![]));
        assert_eq!(drain(&b), Ok(vec![Message::text("just b")]));
    }

    #[test]
    fn unknown_or_malformed_connection_ids_are_reported() {
        let registry = Registry::default();
        registry.register(outbox(1024));
        for id in ["99", "x", "", "-1"] {
            assert_eq!(registry.send_to(id, Message::text("?"), 0), Err(SendError::UnknownConnection), "{id}");
        }
    }

    #[test]
    fn a_full_connection_overflows_without_affecting_the_others() {
        let registry = Registry::default();
        let small = outbox(4);
        let big = outbox(1024);
        registry.register(small.clone());
        registry.register(big.clone());
        let fanout = registry.broadcast(&Message::text("12345"), 0);
        assert_eq!(fanout, Fanout { delivered: 1, dropped: 1 });
        assert_eq!(drain(&big), Ok(vec![Message::text("12345")]));
        assert_eq!(drain(&small), Err(Closure::Overflow));
    }

    #[test]
    fn the_heartbeat_pings_live_clients_and_closes_silent_ones() {
        let registry = Registry::default();
        let live = outbox(1024);
        let silent = outbox(1024);
        live.heard(5_000);
        silent.heard(1_000);
        registry.register(live.clone());
        registry.register(silent.clone());
        assert_eq!(registry.heartbeat(2_000), Sweep { pinged: 1, unresponsive: 1 });
        assert_eq!(drain(&live), Ok(vec![Message::Ping(Default::default())]));
        assert_eq!(drain(&silent), Err(Closure::Unresponsive));
    }
}
