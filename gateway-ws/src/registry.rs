//! The gateway's live connections: connection id allocation, delivery of
//! frames into their outboxes, and the heartbeat sweep. No sockets here, so
//! routing is testable alone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use herald_proto::v1::delivery;
use tokio_tungstenite::tungstenite::Message;

use crate::close::CloseReason;
use crate::outbox::Outbox;

/// Why a frame for one connection was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// No live connection has that id on this gateway.
    UnknownConnection,
    /// The connection is being closed (it overflowed or stopped answering).
    Closing(CloseReason),
}

/// What carrying out one delivery did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Frames queued on a connection.
    pub queued: u64,
    /// Connection ids that are not live on this gateway.
    pub unknown: u64,
    /// Connections that are closing (overflowed or unresponsive).
    pub closing: u64,
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

    /// Queues `frame` (published at `published_us`, unix µs) on the
    /// connections `to` names, as the broker decided. The payload is shared,
    /// not copied.
    pub fn deliver(&self, to: &delivery::To, frame: Message, published_us: u64) -> Outcome {
        match to {
            delivery::To::Everyone(_) => self.broadcast(&frame, published_us),
            delivery::To::Connections(connections) => {
                let mut outcome = Outcome::default();
                let Some((last, others)) = connections.ids.split_last() else {
                    return outcome;
                };
                let mut count = |sent: Result<(), SendError>| match sent {
                    Ok(()) => outcome.queued += 1,
                    Err(SendError::UnknownConnection) => outcome.unknown += 1,
                    Err(SendError::Closing(_)) => outcome.closing += 1,
                };
                for id in others {
                    count(self.send_to(id, frame.clone(), published_us));
                }
                // The last connection takes the frame itself: a clone of a
                // payload read off the wire costs an allocation.
                count(self.send_to(last, frame, published_us));
                outcome
            }
        }
    }

    /// Queues `frame` on every connection.
    fn broadcast(&self, frame: &Message, published_us: u64) -> Outcome {
        let connections = self.connections.read().unwrap_or_else(PoisonError::into_inner);
        let mut outcome = Outcome::default();
        for outbox in connections.values() {
            match outbox.push(frame.clone(), published_us) {
                Ok(()) => outcome.queued += 1,
                Err(_) => outcome.closing += 1,
            }
        }
        outcome
    }

    /// Queues `frame` (published at `published_us`, unix µs) on the
    /// connection named `connection_id`.
    fn send_to(&self, connection_id: &str, frame: Message, published_us: u64) -> Result<(), SendError> {
        let id: u64 = connection_id.parse().map_err(|_| SendError::UnknownConnection)?;
        let connections = self.connections.read().unwrap_or_else(PoisonError::into_inner);
        let outbox = connections.get(&id).ok_or(SendError::UnknownConnection)?;
        outbox.push(frame, published_us).map_err(SendError::Closing)
    }

    /// Closes every connection for `reason`.
    pub fn close_all(&self, reason: CloseReason) {
        for outbox in self.connections.read().unwrap_or_else(PoisonError::into_inner).values() {
            outbox.close(reason);
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
                outbox.close(CloseReason::Unresponsive);
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

    use herald_proto::v1::{ConnectionIds, Everyone};

    use super::*;

    fn outbox(limit: usize) -> Arc<Outbox> {
        Arc::new(Outbox::new(limit, 0))
    }

    fn everyone() -> delivery::To {
        delivery::To::Everyone(Everyone {})
    }

    fn connections(ids: &[&str]) -> delivery::To {
        delivery::To::Connections(ConnectionIds { ids: ids.iter().map(|id| id.to_string()).collect() })
    }

    fn drain(outbox: &Outbox) -> Result<Vec<Message>, CloseReason> {
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
    fn everyone_means_every_connection_once() {
        let registry = Registry::default();
        let boxes: Vec<_> = (0..3).map(|_| outbox(1024)).collect();
        for b in &boxes {
            registry.register(b.clone());
        }
        let outcome = registry.deliver(&everyone(), Message::text("all"), 0);
        assert_eq!(outcome, Outcome { queued: 3, ..Outcome::default() });
        for b in &boxes {
            assert_eq!(drain(b), Ok(vec![Message::text("all")]));
        }
    }

    #[test]
    fn named_connections_get_the_frame_and_no_other_does() {
        let registry = Registry::default();
        let (a, b, c) = (outbox(1024), outbox(1024), outbox(1024));
        registry.register(a.clone());
        let b_id = registry.register(b.clone()).to_string();
        let c_id = registry.register(c.clone()).to_string();
        let outcome = registry.deliver(&connections(&[&b_id, &c_id]), Message::text("b and c"), 0);
        assert_eq!(outcome, Outcome { queued: 2, ..Outcome::default() });
        assert_eq!(drain(&a), Ok(vec![]));
        assert_eq!(drain(&b), Ok(vec![Message::text("b and c")]));
        assert_eq!(drain(&c), Ok(vec![Message::text("b and c")]));
    }

    #[test]
    fn unknown_or_malformed_connection_ids_are_counted() {
        let registry = Registry::default();
        registry.register(outbox(1024));
        let outcome = registry.deliver(&connections(&["99", "x", "", "-1"]), Message::text("?"), 0);
        assert_eq!(outcome, Outcome { unknown: 4, ..Outcome::default() });
    }

    #[test]
    fn a_full_connection_overflows_without_affecting_the_others() {
        let registry = Registry::default();
        let small = outbox(4);
        let big = outbox(1024);
        registry.register(small.clone());
        registry.register(big.clone());
        let outcome = registry.deliver(&everyone(), Message::text("12345"), 0);
        assert_eq!(outcome, Outcome { queued: 1, closing: 1, ..Outcome::default() });
        assert_eq!(drain(&big), Ok(vec![Message::text("12345")]));
        assert_eq!(drain(&small), Err(CloseReason::SlowConsumer));
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
        assert_eq!(drain(&silent), Err(CloseReason::Unresponsive));
    }
}
