//! Which other brokers are on NATS, and whether all of them are back since
//! this broker last reconnected.
//!
//! A forward is a core NATS publish: it reaches the brokers subscribed at
//! that moment, and nobody else. When NATS restarts, the brokers reconnect,
//! and resubscribe, each on its own backoff, up to seconds apart. What the
//! first one back forwards meanwhile reaches nobody on the others, and no
//! flush tells it so. So the brokers call the roll on a subject of their
//! own: each says `here` every [`BEAT`], and `hello` each time it
//! (re)connects, which every other broker answers with `here`. Hearing a
//! broker proves its subscriptions are back: the client sends them again
//! before anything else on a new connection, and NATS keeps one
//! connection's order.
//!
//! After a reconnect, forwards are refused (and retried by publishers) until
//! every broker heard within [`GONE_AFTER`] before the connection was lost
//! is heard again, or for at most the rejoin wait: a broker still silent
//! then is presumed gone.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_nats::Client;
use tokio::sync::Notify;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

/// Between two `here`s of a broker.
const BEAT: Duration = Duration::from_secs(1);
/// A broker not heard for this long is presumed gone.
const GONE_AFTER: Duration = Duration::from_secs(3);
/// How long forwards wait for the other brokers after a reconnect, by default.
pub const DEFAULT_REJOIN_WAIT: Duration = Duration::from_secs(3);

/// The NATS subject of the roll call. Its first token differs from the
/// channels' (`herald.ch_roll` next to `herald.ch`), so that no channel name
/// can reach it.
fn subject(prefix: &str) -> String {
    format!("{prefix}_roll")
}

/// What a broker says on the roll-call subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    /// "I (re)connected: who is there?"
    Hello,
    /// "I am connected."
    Here,
}

impl Call {
    fn say(self, broker_id: &str) -> String {
        match self {
            Call::Hello => format!("hello {broker_id}"),
            Call::Here => format!("here {broker_id}"),
        }
    }

    /// Reads `hello <id>` or `here <id>`; anything else is not a call.
    fn read(payload: &[u8]) -> Option<(Call, &str)> {
        let text = std::str::from_utf8(payload).ok()?;
        let (call, broker_id) = text.split_once(' ')?;
        let call = match call {
            "hello" => Call::Hello,
            "here" => Call::Here,
            _ => return None,
        };
        // Broker ids are random alphanumeric tokens.
        let valid = (1..=64).contains(&broker_id.len()) && broker_id.bytes().all(|b| b.is_ascii_alphanumeric());
        valid.then_some((call, broker_id))
    }
}

/// Why forwards wait.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum Waiting {
    #[error("not connected to NATS")]
    Disconnected,
    #[error("rejoining the cluster: waiting up to {left:?} more for {brokers} other broker(s) to be back on NATS")]
    Brokers { brokers: usize, left: Duration },
}

/// Where this broker's connection stands, as far as the roll is concerned.
#[derive(Debug)]
enum Link {
    /// Lost (or not made yet) since then.
    Lost(Instant),
    /// Back: forwards wait for these brokers until then.
    Rejoining { awaited: HashSet<String>, until: Instant },
    /// Every broker heard before the last loss is back, or presumed gone.
    Joined,
}

/// The roll: when each other broker was last heard, and whom forwards wait
/// for. Pure bookkeeping; time is given.
#[derive(Debug)]
struct Roster {
    last_heard: HashMap<String, Instant>,
    link: Link,
    rejoin_wait: Duration,
}

impl Roster {
    fn new(rejoin_wait: Duration, now: Instant) -> Self {
        Roster { last_heard: HashMap::new(), link: Link::Lost(now), rejoin_wait }
    }

    fn heard(&mut self, broker_id: &str, now: Instant) {
        match self.last_heard.get_mut(broker_id) {
            Some(last) => *last = now,
            None => {
                self.last_heard.insert(broker_id.to_owned(), now);
            }
        }
        if let Link::Rejoining { awaited, .. } = &mut self.link {
            awaited.remove(broker_id);
            if awaited.is_empty() {
                self.link = Link::Joined;
            }
        }
    }

    fn lost(&mut self, now: Instant) {
        if !matches!(self.link, Link::Lost(_)) {
            self.link = Link::Lost(now);
        }
    }

    /// Connected again: awaits every broker heard shortly before the loss,
    /// however long the loss lasted.
    fn rejoined(&mut self, now: Instant) {
        let Link::Lost(since) = self.link else { return };
        self.last_heard.retain(|_, last| *last + GONE_AFTER >= since);
        let awaited: HashSet<String> = self.last_heard.keys().cloned().collect();
        self.link =
            if awaited.is_empty() { Link::Joined } else { Link::Rejoining { awaited, until: now + self.rejoin_wait } };
    }

    /// Whether a forward may go now.
    fn check(&mut self, now: Instant) -> Result<(), Waiting> {
        match &self.link {
            Link::Joined => Ok(()),
            Link::Lost(_) => Err(Waiting::Disconnected),
            Link::Rejoining { until, .. } if now >= *until => {
                self.link = Link::Joined;
                Ok(())
            }
            Link::Rejoining { awaited, until } => {
                Err(Waiting::Brokers { brokers: awaited.len(), left: until.saturating_duration_since(now) })
            }
        }
    }

    /// Forgets brokers not heard for [`GONE_AFTER`], while connected (a
    /// broker heard before a loss stays awaited after it).
    fn forget_gone(&mut self, now: Instant) {
        if matches!(self.link, Link::Joined) {
            self.last_heard.retain(|_, last| *last + GONE_AFTER >= now);
        }
    }

    /// Other brokers heard within [`GONE_AFTER`].
    fn present(&self, now: Instant) -> usize {
        self.last_heard.values().filter(|last| **last + GONE_AFTER >= now).count()
    }

    /// Brokers forwards wait for now.
    fn awaited(&self, now: Instant) -> usize {
        match &self.link {
            Link::Rejoining { awaited, until } if now < *until => awaited.len(),
            _ => 0,
        }
    }
}

/// The roll, shared by the connection's event callback (which reports
/// losses and reconnections), the roll-call task (which hears brokers) and
/// forwards (which ask whether they may go).
#[derive(Debug)]
pub(super) struct RollCall {
    roster: Mutex<Roster>,
    /// Set while forwards may go without a look at the roster.
    joined: AtomicBool,
    /// Wakes the roll-call task to say `hello` after a reconnection.
    rejoined: Notify,
}

impl RollCall {
    pub(super) fn new(rejoin_wait: Duration) -> Self {
        RollCall {
            roster: Mutex::new(Roster::new(rejoin_wait, Instant::now())),
            joined: AtomicBool::new(false),
            rejoined: Notify::new(),
        }
    }

    fn roster(&self) -> std::sync::MutexGuard<'_, Roster> {
        self.roster.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a forward may go now. A forward is counted as made before it
    /// asks, and a loss is reported here before unconfirmed forwards are
    /// counted: so each forward is either refused or counted with the loss.
    pub(super) fn check(&self) -> Result<(), Waiting> {
        if self.joined.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut roster = self.roster();
        let checked = roster.check(Instant::now());
        if checked.is_ok() {
            self.joined.store(true, Ordering::SeqCst);
        }
        checked
    }

    /// The connection to NATS was lost.
    pub(super) fn lost(&self) {
        let mut roster = self.roster();
        self.joined.store(false, Ordering::SeqCst);
        roster.lost(Instant::now());
    }

    /// The connection to NATS is back (or made for the first time).
    pub(super) fn connected(&self) {
        self.roster().rejoined(Instant::now());
        self.rejoined.notify_one();
    }

    fn heard(&self, broker_id: &str) {
        self.roster().heard(broker_id, Instant::now());
    }

    /// Other brokers heard lately, and those forwards wait for.
    pub(super) fn counts(&self) -> (usize, usize) {
        let now = Instant::now();
        let roster = self.roster();
        (roster.present(now), roster.awaited(now))
    }
}

/// Takes part in the roll call until `stop`: says `hello` on every
/// (re)connection and `here` every [`BEAT`], answers every `hello`, and
/// records every broker heard.
pub(super) async fn call_the_roll(
    client: Client,
    broker_id: String,
    prefix: String,
    roll: Arc<RollCall>,
    stop: CancellationToken,
) {
    let subject = subject(&prefix);
    let mut calls = match client.subscribe(subject.clone()).await {
        Ok(calls) => calls,
        Err(e) => {
            tracing::warn!(error = %e, "cannot join the brokers' roll call; forwards will not wait for them");
            return;
        }
    };
    let say = |call: Call| {
        let (client, subject, text) = (client.clone(), subject.clone(), call.say(&broker_id));
        async move {
            if let Err(e) = client.publish(subject, text.into()).await {
                tracing::debug!(error = %e, "roll call not sent");
            }
        }
    };
    let mut beat = tokio::time::interval(BEAT);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            // The event comes just before the client calls itself connected:
            // the hello waits in its queue, behind the subscriptions.
            () = roll.rejoined.notified() => say(Call::Hello).await,
            _ = beat.tick() => {
                roll.roster().forget_gone(Instant::now());
                // Beats are not queued up while disconnected.
                if client.connection_state() == async_nats::connection::State::Connected {
                    say(Call::Here).await;
                }
            }
            message = calls.next() => {
                let Some(message) = message else { return };
                match Call::read(&message.payload) {
                    Some((call, other)) => {
                        roll.heard(other);
                        if call == Call::Hello {
                            say(Call::Here).await;
                        }
                    }
                    None => tracing::debug!("not a roll call on the roll-call subject"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(3);

    fn joined_with(brokers: &[&str], now: Instant) -> Roster {
        let mut roster = Roster::new(WAIT, now);
        roster.rejoined(now);
        for broker in brokers {
            roster.heard(broker, now);
        }
        roster
    }

    #[test]
    fn a_first_connection_waits_for_nobody() {
        let now = Instant::now();
        let mut roster = Roster::new(WAIT, now);
        assert_eq!(roster.check(now), Err(Waiting::Disconnected), "not connected yet");
        roster.rejoined(now);
        assert_eq!(roster.check(now), Ok(()));
    }

    #[test]
    fn after_a_reconnect_forwards_wait_until_every_broker_heard_before_is_heard_again() {
        let t0 = Instant::now();
        let mut roster = joined_with(&["a", "b"], t0);
        roster.lost(t0 + Duration::from_millis(500));
        assert_eq!(roster.check(t0 + Duration::from_secs(1)), Err(Waiting::Disconnected));
        let back = t0 + Duration::from_secs(20);
        roster.rejoined(back);
        assert_eq!(roster.check(back), Err(Waiting::Brokers { brokers: 2, left: WAIT }), "however long it was away");
        roster.heard("a", back + Duration::from_millis(10));
        assert_eq!(roster.awaited(back + Duration::from_millis(10)), 1);
        assert!(roster.check(back + Duration::from_millis(10)).is_err());
        roster.heard("b", back + Duration::from_millis(20));
        assert_eq!(roster.check(back + Duration::from_millis(20)), Ok(()));
    }

    #[test]
    fn a_broker_silent_for_the_rejoin_wait_is_presumed_gone() {
        let t0 = Instant::now();
        let mut roster = joined_with(&["a", "b"], t0);
        roster.lost(t0);
        roster.rejoined(t0 + Duration::from_secs(1));
        roster.heard("a", t0 + Duration::from_secs(2));
        let left = roster.check(t0 + Duration::from_secs(2));
        assert_eq!(left, Err(Waiting::Brokers { brokers: 1, left: Duration::from_secs(2) }));
        assert_eq!(roster.check(t0 + Duration::from_secs(1) + WAIT), Ok(()));
        roster.lost(t0 + Duration::from_secs(5));
        roster.rejoined(t0 + Duration::from_secs(6));
        assert_eq!(roster.awaited(t0 + Duration::from_secs(6)), 1, "only the broker heard lately is awaited next time");
    }

    #[test]
    fn a_broker_gone_long_before_the_loss_is_not_awaited() {
        let t0 = Instant::now();
        let mut roster = joined_with(&["old"], t0);
        roster.heard("recent", t0 + Duration::from_secs(9));
        roster.lost(t0 + Duration::from_secs(10));
        roster.rejoined(t0 + Duration::from_secs(11));
        assert_eq!(roster.awaited(t0 + Duration::from_secs(11)), 1);
        roster.heard("recent", t0 + Duration::from_secs(11));
        assert_eq!(roster.check(t0 + Duration::from_secs(11)), Ok(()));
    }

    #[test]
    fn a_newcomer_heard_while_rejoining_is_not_waited_for_and_a_second_connected_event_changes_nothing() {
        let t0 = Instant::now();
        let mut roster = joined_with(&["a"], t0);
        roster.lost(t0);
        roster.rejoined(t0 + Duration::from_secs(1));
        roster.heard("newcomer", t0 + Duration::from_secs(1));
        roster.rejoined(t0 + Duration::from_secs(1));
        assert_eq!(roster.awaited(t0 + Duration::from_secs(1)), 1, "still waiting for a");
        roster.heard("a", t0 + Duration::from_secs(1));
        assert_eq!(roster.check(t0 + Duration::from_secs(1)), Ok(()));
    }

    #[test]
    fn brokers_not_heard_lately_are_forgotten_only_while_joined() {
        let t0 = Instant::now();
        let mut roster = joined_with(&["a", "b"], t0);
        roster.heard("b", t0 + Duration::from_secs(3));
        roster.forget_gone(t0 + Duration::from_secs(5));
        assert_eq!(roster.present(t0 + Duration::from_secs(5)), 1);
        roster.lost(t0 + Duration::from_secs(5));
        roster.forget_gone(t0 + Duration::from_secs(60));
        roster.rejoined(t0 + Duration::from_secs(61));
        assert_eq!(roster.awaited(t0 + Duration::from_secs(61)), 1, "b, heard just before the loss");
    }

    #[test]
    fn calls_are_read_strictly() {
        assert_eq!(Call::read(b"hello Ab3xZ9"), Some((Call::Hello, "Ab3xZ9")));
        assert_eq!(Call::read(b"here Ab3"), Some((Call::Here, "Ab3")));
        assert_eq!(Call::read(Call::Here.say("id").as_bytes()), Some((Call::Here, "id")));
        for junk in [&b"hello"[..], b"hello ", b"bye x", b"here a b", b"here \xff", b"", b"HERE x", b"here a.b"] {
            assert_eq!(Call::read(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn a_loss_closes_the_gate_before_anything_else_sees_it() {
        let roll = RollCall::new(WAIT);
        roll.connected();
        assert_eq!(roll.check(), Ok(()));
        roll.heard("a");
        roll.lost();
        assert_eq!(roll.check(), Err(Waiting::Disconnected));
        roll.connected();
        assert!(matches!(roll.check(), Err(Waiting::Brokers { brokers: 1, .. })));
        assert_eq!(roll.counts().1, 1);
        roll.heard("a");
        assert_eq!(roll.check(), Ok(()));
        assert_eq!(roll.counts(), (1, 0));
    }
}
