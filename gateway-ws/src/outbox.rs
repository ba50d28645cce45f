//! One connection's outbound queue, bounded in bytes.
//!
//! The broker link pushes frames in (never waiting); the connection's task
//! takes everything queued at once and writes it with one flush. A push that
//! would exceed the byte limit marks the queue overflowed instead: the
//! connection is then closed with a clear code rather than silently losing
//! part of its stream.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

/// The queue was over its byte limit; the connection must be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow;

#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    ready: Notify,
    limit_bytes: usize,
}

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<Message>,
    bytes: usize,
    overflowed: bool,
}

impl Outbox {
    pub fn new(limit_bytes: usize) -> Self {
        Self { state: Mutex::new(State::default()), ready: Notify::new(), limit_bytes }
    }

    /// Queues `frame`, or marks the queue overflowed (dropping what it holds)
    /// when the frame does not fit.
    pub fn push(&self, frame: Message) -> Result<(), Overflow> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.overflowed {
            return Err(Overflow);
        }
        let len = frame.len();
        if state.bytes + len > self.limit_bytes {
            state.overflowed = true;
            state.frames = VecDeque::new();
            state.bytes = 0;
            drop(state);
            self.ready.notify_one();
            return Err(Overflow);
        }
        let was_empty = state.frames.is_empty();
        state.frames.push_back(frame);
        state.bytes += len;
        drop(state);
        if was_empty {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Resolves when frames are queued or the queue overflowed.
    pub async fn ready(&self) {
        self.ready.notified().await;
    }

    /// Moves every queued frame into `batch`. Returns `Err(Overflow)` once the
    /// queue has overflowed.
    pub fn take(&self, batch: &mut VecDeque<Message>) -> Result<(), Overflow> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.overflowed {
            return Err(Overflow);
        }
        if batch.is_empty() {
            std::mem::swap(batch, &mut state.frames);
        } else {
            batch.append(&mut state.frames);
        }
        state.bytes = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn frames_come_out_in_order_after_a_wakeup() {
        let outbox = Outbox::new(100);
        outbox.push(Message::text("a")).unwrap();
        outbox.push(Message::text("b")).unwrap();
        tokio::time::timeout(Duration::from_secs(1), outbox.ready()).await.unwrap();
        let mut batch = VecDeque::new();
        outbox.take(&mut batch).unwrap();
        assert_eq!(Vec::from(batch), [Message::text("a"), Message::text("b")]);
    }

    #[test]
    fn a_frame_over_the_byte_limit_overflows_the_queue_for_good() {
        let outbox = Outbox::new(10);
        outbox.push(Message::text("12345")).unwrap();
        outbox.push(Message::text("12345")).unwrap();
        assert_eq!(outbox.push(Message::text("1")), Err(Overflow));
        assert_eq!(outbox.push(Message::text("")), Err(Overflow));
        assert_eq!(outbox.take(&mut VecDeque::new()), Err(Overflow));
    }

    #[test]
    fn taking_frees_the_byte_budget() {
        let outbox = Outbox::new(10);
        let mut batch = VecDeque::new();
        for _ in 0..5 {
            outbox.push(Message::text("1234567890")).unwrap();
            outbox.take(&mut batch).unwrap();
        }
        assert_eq!(batch.len(), 5);
    }
}
