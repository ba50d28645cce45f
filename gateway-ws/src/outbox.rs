//! One connection's outbound queue, bounded in bytes, and the only way other
//! tasks reach the connection's task: frames to send, or a request to close.
//!
//! The broker link pushes frames in (never waiting); the connection's task
//! takes everything queued at once and writes it with one flush. A push that
//! would exceed the byte limit closes the queue as overflowed instead, so
//! the connection is closed with a clear code rather than silently losing
//! part of its stream. The heartbeat closes a queue whose client stopped
//! answering (reading [`Outbox::last_heard`] to decide), and shutdown closes
//! every queue after what it holds is written.
//!
//! Waking is one flag and one registered waker per connection, so a
//! broadcast to many connections touches no shared lock or waiter list.
//!
//! While a subscription is being set up, the channel's publications are
//! held aside ([`Outbox::hold`]) and released after the subscribe reply
//! ([`Outbox::release`]), skipping those the reply's position already
//! covers: a client sees its reply, then the channel's publications, with
//! no gap and no duplicate at the seam ([`Streams`] keeps the count).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use herald_proto::v1::StreamPosition;
use tokio_tungstenite::tungstenite::Message;

use crate::close::CloseReason;
use crate::protocol::{self, Protocol};
use crate::streams::{Admit, Streams};

#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    /// Set when frames or a closure are waiting for the connection's task.
    ready: AtomicBool,
    waker: AtomicWaker,
    limit_bytes: usize,
    /// Milliseconds since the gateway's clock origin at which the client was last heard from.
    last_heard_ms: AtomicU64,
    /// The second (of the gateway's clock) the client's messages are being
    /// counted in, high 32 bits, and how many it sent in it, low 32 bits.
    messages_this_second: AtomicU64,
    /// What the connection speaks, so that a delivery queues the frame it understands.
    protocol: Protocol,
}

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<Message>,
    bytes: usize,
    /// When the oldest queued frame was published (unix µs; 0 if unknown).
    oldest_published_us: u64,
    closed: Option<CloseReason>,
    /// The close frame's text, when a backend gave one.
    close_text: Option<Box<str>>,
    /// Where the connection stands in the channel streams it follows.
    streams: Streams,
}

/// What one [`Outbox::take`] handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Taken {
    /// Payload bytes of the frames taken.
    pub bytes: usize,
    /// When the oldest of them was published (unix µs; 0 if unknown).
    pub oldest_published_us: u64,
    /// Set when the connection must be closed once the frames are written.
    pub then_close: Option<CloseReason>,
}

impl Outbox {
    pub fn new(limit_bytes: usize, now_ms: u64) -> Self {
        Self {
            state: Mutex::new(State::default()),
            ready: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            limit_bytes,
            last_heard_ms: AtomicU64::new(now_ms),
            messages_this_second: AtomicU64::new(0),
            protocol: Protocol::Raw,
        }
    }

    /// The outbox of a connection that speaks `protocol`.
    pub fn speaking(self, protocol: Protocol) -> Self {
        Self { protocol, ..self }
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Queues `frame`, published at `published_us` (unix µs, 0 if unknown).
    /// When it does not fit, the queue closes as overflowed and drops what
    /// it holds.
    pub fn push(&self, frame: Message, published_us: u64) -> Result<(), CloseReason> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let woke = self.queue(&mut state, frame, published_us);
        drop(state);
        self.after_queue(woke)
    }

    /// Queues `frame` ahead of everything queued: a connection's greeting.
    pub fn push_first(&self, frame: Message) -> Result<(), CloseReason> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let woke = self.queue(&mut state, frame, 0);
        if woke.is_ok()
            && let Some(greeting) = state.frames.pop_back()
        {
            state.frames.push_front(greeting);
        }
        drop(state);
        self.after_queue(woke)
    }

    /// Queues a publication of `channel` at `position` (none without
    /// history), unless the connection's place in that stream says to hold
    /// it aside or skip it ([`Streams::admit`]). A publication that leaves
    /// a gap is replaced by a push telling the client to resubscribe.
    pub fn push_publication(
        &self,
        channel: &str,
        position: Option<&StreamPosition>,
        frame: Message,
        published_us: u64,
    ) -> Result<(), CloseReason> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let woke = match state.streams.admit(channel, position, frame, published_us, self.limit_bytes) {
            Admit::Queue(frame) => self.queue(&mut state, frame, published_us),
            Admit::Kept => Ok(false),
            Admit::Gap => self.queue(&mut state, protocol::resubscribe(channel), 0),
            Admit::Overflow => Err(CloseReason::SlowConsumer),
        };
        drop(state);
        self.after_queue(woke)
    }

    /// Starts holding `channel`'s publications aside while its subscription
    /// is set up.
    pub fn hold(&self, channel: &str) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).streams.hold(channel);
    }

    /// Queues `reply`, then what was held of `channel` past `position` (all
    /// of it without history), and stops holding it.
    pub fn release(&self, channel: &str, reply: Message, position: Option<&StreamPosition>) -> Result<(), CloseReason> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (held, stale) = state.streams.release(channel, position);
        let mut woke = self.queue(&mut state, reply, 0);
        for (frame, published_us) in held {
            woke = woke.and_then(|w| self.queue(&mut state, frame, published_us).map(|again| w || again));
        }
        if stale {
            woke = woke.and_then(|w| self.queue(&mut state, protocol::resubscribe(channel), 0).map(|again| w || again));
        }
        drop(state);
        self.after_queue(woke)
    }

    /// Stops following `channel`: unsubscribed, or its subscription refused
    /// (when `stale`, a refused resubscription: the stream stays stale).
    pub fn forget(&self, channel: &str, stale: bool) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.streams.forget(channel, stale);
    }

    /// Whether `channel`'s stream went stale (see [`Streams`]).
    pub fn is_stale(&self, channel: &str) -> bool {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).streams.is_stale(channel)
    }

    /// Appends `frame` under the lock: `Ok(true)` when the queue was empty
    /// (the task must be woken), or why the queue is closed.
    fn queue(&self, state: &mut State, frame: Message, published_us: u64) -> Result<bool, CloseReason> {
        if let Some(reason) = state.closed {
            return Err(reason);
        }
        let len = frame.len();
        if state.bytes + len > self.limit_bytes {
            return Err(CloseReason::SlowConsumer);
        }
        let was_empty = state.frames.is_empty();
        if was_empty {
            state.oldest_published_us = published_us;
        }
        state.frames.push_back(frame);
        state.bytes += len;
        Ok(was_empty)
    }

    /// Wakes the task after queueing, or closes the queue it overflowed.
    fn after_queue(&self, queued: Result<bool, CloseReason>) -> Result<(), CloseReason> {
        match queued {
            Ok(true) => {
                self.wake();
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(CloseReason::SlowConsumer) => {
                self.close(CloseReason::SlowConsumer);
                Err(CloseReason::SlowConsumer)
            }
            Err(reason) => Err(reason),
        }
    }

    /// Stops the queue for `closure` (the first closure wins) and wakes the
    /// connection's task so that it closes the connection.
    pub fn close(&self, reason: CloseReason) {
        self.close_with(reason, None);
    }

    /// Like [`Outbox::close`], with the text of the close frame.
    pub fn close_with(&self, reason: CloseReason, text: Option<Box<str>>) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.closed.is_none() {
            state.closed = Some(reason);
            state.close_text = text;
            if !reason.writes_queued() {
                state.frames = VecDeque::new();
                state.bytes = 0;
            }
        }
        drop(state);
        self.wake();
    }

    fn wake(&self) {
        self.ready.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Resolves when frames are queued or the queue was closed.
    #[cfg(test)]
    pub async fn ready(&self) {
        poll_fn(|cx| self.poll_ready(cx)).await;
    }

    /// Ready when frames are queued or the queue was closed.
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.ready.swap(false, Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // A wake between the check and the registration must not be lost.
        if self.ready.swap(false, Ordering::Acquire) { Poll::Ready(()) } else { Poll::Pending }
    }

    /// The close frame's text given with the closure, if any.
    pub fn close_text(&self) -> Option<Box<str>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).close_text.take()
    }

    /// Takes every queued frame, leaving the queue without an allocation
    /// (an idle connection keeps none), or says why the queue closed with
    /// nothing left to write.
    pub fn take(&self) -> Result<(VecDeque<Message>, Taken), CloseReason> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match state.closed {
            Some(reason) if !reason.writes_queued() || state.frames.is_empty() => return Err(reason),
            _ => {}
        }
        let taken =
            Taken { bytes: state.bytes, oldest_published_us: state.oldest_published_us, then_close: state.closed };
        state.bytes = 0;
        state.oldest_published_us = 0;
        Ok((std::mem::take(&mut state.frames), taken))
    }

    /// The reason the queue closed, when it closed dropping what it held
    /// (overflow, silence): the connection must end now, even in the middle
    /// of a write.
    pub fn abandoned(&self) -> Option<CloseReason> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).closed.filter(|r| !r.writes_queued())
    }

    /// Resolves when the queue closes dropping what it held (overflow,
    /// silence), with the reason. The connection's task waits on it while a
    /// write waits on the client; pushes wake it too, and it goes back to
    /// sleep, leaving them for [`Outbox::ready`].
    pub async fn abandoned_wait(&self) -> CloseReason {
        poll_fn(|cx| {
            if let Some(reason) = self.abandoned() {
                return Poll::Ready(reason);
            }
            self.waker.register(cx.waker());
            // A close between the check and the registration must not be lost.
            self.abandoned().map_or(Poll::Pending, Poll::Ready)
        })
        .await
    }

    /// Bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).bytes
    }

    /// Records that the client was heard from at `now_ms`.
    pub fn heard(&self, now_ms: u64) {
        self.last_heard_ms.store(now_ms, Ordering::Relaxed);
    }

    /// When the client was last heard from.
    pub fn last_heard(&self) -> u64 {
        self.last_heard_ms.load(Ordering::Relaxed)
    }

    /// Counts a message the client sent at `now_ms`; false when it is over
    /// `per_second` in that second. Only the connection's own task calls it.
    pub fn admit_message(&self, now_ms: u64, per_second: u32) -> bool {
        let second = (now_ms / 1000) & u64::from(u32::MAX);
        let counted = self.messages_this_second.load(Ordering::Relaxed);
        let count = if counted >> 32 == second { (counted & u64::from(u32::MAX)) + 1 } else { 1 };
        self.messages_this_second.store((second << 32) | count.min(u64::from(u32::MAX)), Ordering::Relaxed);
        count <= u64::from(per_second)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_client_may_send_its_messages_per_second_and_no_more() {
        let outbox = Outbox::new(100, 0);
        assert!((0..3).all(|i| outbox.admit_message(10_000 + i, 3)), "three in one second");
        assert!(!outbox.admit_message(10_500, 3), "a fourth in the same second");
        assert!(outbox.admit_message(11_000, 3), "a new second counts from zero");
    }
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn frames_come_out_in_order_after_a_wakeup() {
        let outbox = Outbox::new(100, 0);
        outbox.push(Message::text("a"), 0).unwrap();
        outbox.push(Message::text("b"), 0).unwrap();
        tokio::time::timeout(Duration::from_secs(1), outbox.ready()).await.unwrap();
        let (batch, taken) = outbox.take().unwrap();
        assert_eq!(taken, Taken { bytes: 2, oldest_published_us: 0, then_close: None });
        assert_eq!(Vec::from(batch), [Message::text("a"), Message::text("b")]);
    }

    #[tokio::test]
    async fn a_push_while_waiting_wakes_the_waiter() {
        let outbox = std::sync::Arc::new(Outbox::new(100, 0));
        let waiter = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.ready().await }
        });
        tokio::task::yield_now().await;
        outbox.push(Message::text("x"), 0).unwrap();
        tokio::time::timeout(Duration::from_secs(1), waiter).await.unwrap().unwrap();
    }

    #[test]
    fn a_frame_over_the_byte_limit_overflows_the_queue_for_good() {
        let outbox = Outbox::new(10, 0);
        outbox.push(Message::text("12345"), 0).unwrap();
        outbox.push(Message::text("12345"), 0).unwrap();
        assert_eq!(outbox.push(Message::text("1"), 0), Err(CloseReason::SlowConsumer));
        assert_eq!(outbox.push(Message::text(""), 0), Err(CloseReason::SlowConsumer));
        assert_eq!(outbox.take().map(|(_, taken)| taken), Err(CloseReason::SlowConsumer));
    }

    #[test]
    fn taking_frees_the_byte_budget() {
        let outbox = Outbox::new(10, 0);
        let mut batch = Vec::new();
        for _ in 0..5 {
            outbox.push(Message::text("1234567890"), 0).unwrap();
            batch.extend(outbox.take().unwrap().0);
        }
        assert_eq!(batch.len(), 5);
    }

    #[test]
    fn the_oldest_publish_time_of_a_batch_is_reported() {
        let outbox = Outbox::new(100, 0);
        outbox.push(Message::text("first"), 1_000).unwrap();
        outbox.push(Message::text("second"), 2_000).unwrap();
        assert_eq!(outbox.take().unwrap().1.oldest_published_us, 1_000);
        outbox.push(Message::text("third"), 3_000).unwrap();
        assert_eq!(outbox.take().unwrap().1, Taken { bytes: 5, oldest_published_us: 3_000, then_close: None });
    }

    #[tokio::test]
    async fn closing_wakes_the_connection_and_the_first_reason_sticks() {
        let outbox = Outbox::new(10, 0);
        outbox.push(Message::text("x"), 0).unwrap();
        outbox.close(CloseReason::Unresponsive);
        outbox.close(CloseReason::SlowConsumer);
        tokio::time::timeout(Duration::from_secs(1), outbox.ready()).await.unwrap();
        assert_eq!(outbox.take().map(|(_, taken)| taken), Err(CloseReason::Unresponsive));
        assert_eq!(outbox.push(Message::text("y"), 0), Err(CloseReason::Unresponsive));
    }

    #[test]
    fn an_overflow_abandons_the_queue_and_a_shutdown_does_not() {
        let outbox = Outbox::new(4, 0);
        assert_eq!(outbox.abandoned(), None);
        assert!(outbox.push(Message::text("12345"), 0).is_err());
        assert_eq!(outbox.abandoned(), Some(CloseReason::SlowConsumer));
        let closing = Outbox::new(4, 0);
        closing.close(CloseReason::Shutdown);
        assert_eq!(closing.abandoned(), None);
    }

    #[tokio::test]
    async fn a_writer_waiting_on_its_client_hears_of_an_overflow_and_not_of_a_push() {
        let outbox = std::sync::Arc::new(Outbox::new(8, 0));
        let waiting = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.abandoned_wait().await }
        });
        tokio::task::yield_now().await;
        outbox.push(Message::text("1234"), 0).unwrap();
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "a push is no reason to stop writing");
        assert!(outbox.push(Message::text("12345"), 0).is_err());
        let reason = tokio::time::timeout(Duration::from_secs(1), waiting).await.unwrap().unwrap();
        assert_eq!(reason, CloseReason::SlowConsumer);
    }

    fn taken(outbox: &Outbox) -> Vec<Message> {
        Vec::from(outbox.take().unwrap().0)
    }

    #[test]
    fn a_subscription_s_reply_comes_before_its_channel_and_a_gap_asks_the_client_to_resubscribe() {
        let outbox = Outbox::new(1000, 0);
        let at = |offset| StreamPosition { offset, epoch: "e".into() };
        outbox.hold("feed:a");
        outbox.push_publication("feed:a", Some(&at(5)), Message::text("p5"), 0).unwrap();
        outbox.push_publication("feed:b", Some(&at(9)), Message::text("b9"), 0).unwrap();
        outbox.push_publication("feed:a", Some(&at(6)), Message::text("p6"), 0).unwrap();
        assert_eq!(taken(&outbox), [Message::text("b9")], "feed:a is held");
        outbox.release("feed:a", Message::text("subscribed at 5"), Some(&at(5))).unwrap();
        assert_eq!(taken(&outbox), [Message::text("subscribed at 5"), Message::text("p6")]);
        outbox.push_publication("feed:a", Some(&at(8)), Message::text("p8"), 0).unwrap();
        assert_eq!(taken(&outbox), [protocol::resubscribe("feed:a")], "7 was missed");
        assert!(outbox.is_stale("feed:a"));
        outbox.forget("feed:a", false);
        outbox.push_publication("feed:a", Some(&at(9)), Message::text("p9"), 0).unwrap();
        assert_eq!(taken(&outbox), [Message::text("p9")], "a stream no longer followed is queued as it comes");
    }

    #[test]
    fn what_is_held_is_bounded_like_the_queue() {
        let outbox = Outbox::new(8, 0);
        outbox.hold("chat:a");
        outbox.push_publication("chat:a", None, Message::text("12345"), 0).unwrap();
        assert_eq!(outbox.push_publication("chat:a", None, Message::text("12345"), 0), Err(CloseReason::SlowConsumer));
        assert_eq!(outbox.abandoned(), Some(CloseReason::SlowConsumer));
    }

    #[test]
    fn shutdown_hands_over_what_is_queued_then_closes() {
        let outbox = Outbox::new(10, 0);
        outbox.push(Message::text("last"), 0).unwrap();
        outbox.close(CloseReason::Shutdown);
        assert_eq!(outbox.push(Message::text("late"), 0), Err(CloseReason::Shutdown));
        let (batch, taken) = outbox.take().unwrap();
        assert_eq!(taken.then_close, Some(CloseReason::Shutdown));
        assert_eq!(Vec::from(batch), [Message::text("last")]);
        assert_eq!(outbox.take().map(|(_, taken)| taken), Err(CloseReason::Shutdown));
    }
}
