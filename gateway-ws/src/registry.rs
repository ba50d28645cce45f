//! The gateway's live connections: connection id allocation and delivery of
//! frames into their outboxes. No sockets here, so routing is testable alone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use tokio_tungstenite::tungstenite::Message;

use crate::outbox::{Outbox, Overflow};

/// Why a frame for one connection was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// No live connection has that id on this gateway.
    UnknownConnection,
    /// The connection's queue overflowed; it is being closed.
    Overflow,
}

/// What a broadcast did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fanout {
    pub delivered: u64,
    pub overflowed: u64,
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

    /// Queues `frame` on every connection. The payload is shared, not copied.
    pub fn broadcast(&self, frame: &Message) -> Fanout {
        let connections = self.connections.read().unwrap_or_else(PoisonError::into_inner);
        let mut fanout = Fanout::default();
        for outbox in connections.values() {
            match outbox.push(frame.clone()) {
                Ok(()) => fanout.delivered += 1,
                Err(Overflow) => fanout.overflowed += 1,
            }
        }
        fanout
    }

    /// Queues `frame` on the connection named `connection_id`.
    pub fn send_to(&self, connection_id: &str, frame: Message) -> Result<(), SendError> {
        let id: u64 = connection_id.parse().map_err(|_| SendError::UnknownConnection)?;
        let connections = self.connections.read().unwrap_or_else(PoisonError::into_inner);
        let outbox = connections.get(&id).ok_or(SendError::UnknownConnection)?;
        outbox.push(frame).map_err(|Overflow| SendError::Overflow)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    fn drain(outbox: &Outbox) -> Vec<Message> {
        let mut batch = VecDeque::new();
        let _ = outbox.take(&mut batch);
        batch.into()
    }

    #[test]
    fn ids_are_never_reused() {
        let registry = Registry::default();
        let a = registry.register(Arc::new(Outbox::new(1024)));
        registry.remove(a);
        let b = registry.register(Arc::new(Outbox::new(1024)));
        assert_ne!(a, b);
        assert_eq!(registry.len(), 1);
    }

    #[test]
    fn broadcast_reaches_every_connection_once() {
        let registry = Registry::default();
        let boxes: Vec<_> = (0..3).map(|_| Arc::new(Outbox::new(1024))).collect();
        for b in &boxes {
            registry.register(b.clone());
        }
        let fanout = registry.broadcast(&Message::text("all"));
        assert_eq!(fanout, Fanout { delivered: 3, overflowed: 0 });
        for b in &boxes {
            assert_eq!(drain(b), [Message::text("all")]);
        }
    }

    #[test]
    fn a_targeted_frame_reaches_only_its_connection() {
        let registry = Registry::default();
        let a = Arc::new(Outbox::new(1024));
        let b = Arc::new(Outbox::new(1024));
        registry.register(a.clone());
        let b_id = registry.register(b.clone());
        registry.send_to(&b_id.to_string(), Message::text("just b")).unwrap();
        assert!(drain(&a).is_empty());
        assert_eq!(drain(&b), [Message::text("just b")]);
    }

    #[test]
    fn unknown_or_malformed_connection_ids_are_reported() {
        let registry = Registry::default();
        registry.register(Arc::new(Outbox::new(1024)));
        for id in ["99", "x", "", "-1"] {
            assert_eq!(registry.send_to(id, Message::text("?")), Err(SendError::UnknownConnection), "{id}");
        }
    }

    #[test]
    fn a_full_connection_overflows_without_affecting_the_others() {
        let registry = Registry::default();
        let small = Arc::new(Outbox::new(4));
        let big = Arc::new(Outbox::new(1024));
        registry.register(small.clone());
        registry.register(big.clone());
        let fanout = registry.broadcast(&Message::text("12345"));
        assert_eq!(fanout, Fanout { delivered: 1, overflowed: 1 });
        assert_eq!(drain(&big), [Message::text("12345")]);
    }
}
