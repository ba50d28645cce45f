//! Where one connection stands in each channel stream it follows: what is
//! held aside while a subscription is set up, and, on channels with history,
//! the offset of the last publication queued for it.
//!
//! With that, every publication of a history channel is checked against the
//! connection's place before it is queued: one already covered (by the
//! subscribe reply, or seen twice after a broker failover) is skipped, and
//! one that leaves a gap marks the stream stale. A stale stream queues
//! nothing more; the client is told to resubscribe, and recovers what it
//! missed from its last position. Pure bookkeeping, no locks: the outbox
//! keeps it under its own.

use herald_proto::v1::StreamPosition;
use tokio_tungstenite::tungstenite::Message;

/// The streams of one connection.
#[derive(Debug, Default)]
pub struct Streams(Vec<Stream>);

#[derive(Debug)]
struct Stream {
    channel: Box<str>,
    epoch: Box<str>,
    /// The offset of the last publication queued; 0 before the first.
    last: u64,
    /// Publications held while the subscription is set up.
    held: Option<Held>,
    /// A publication was missed: nothing more is queued until the client
    /// resubscribes.
    stale: bool,
}

#[derive(Debug, Default)]
struct Held {
    /// (offset, epoch, frame, published at).
    frames: Vec<(u64, Box<str>, Message, u64)>,
    bytes: usize,
}

/// What to do with a publication.
#[derive(Debug, PartialEq)]
pub enum Admit {
    /// Queue it.
    Queue(Message),
    /// Held aside, or skipped (covered already, or the stream is stale).
    Kept,
    /// It leaves a gap: the stream is now stale, and the client must be told.
    Gap,
    /// Holding it would pass the byte limit.
    Overflow,
}

impl Streams {
    /// Starts holding `channel`'s publications aside (a subscription to it is
    /// being set up, or set up again after going stale).
    pub fn hold(&mut self, channel: &str) {
        match self.find(channel) {
            Some(stream) => {
                stream.held = Some(Held::default());
                stream.stale = false;
            }
            None => self.0.push(Stream {
                channel: channel.into(),
                epoch: "".into(),
                last: 0,
                held: Some(Held::default()),
                stale: false,
            }),
        }
    }

    /// Decides what happens to a publication of `channel` at `position`
    /// (none without history); `limit` bounds what is held, in bytes.
    pub fn admit(
        &mut self,
        channel: &str,
        position: Option<&StreamPosition>,
        frame: Message,
        published_us: u64,
        limit: usize,
    ) -> Admit {
        let Some(stream) = self.find(channel) else {
            return Admit::Queue(frame);
        };
        // A stale stream skips publications; a join or leave (no position)
        // is no part of the stream and still goes out.
        if stream.stale && position.is_some() {
            return Admit::Kept;
        }
        let (offset, epoch) = position.map_or((0, ""), |p| (p.offset, p.epoch.as_str()));
        if let Some(held) = &mut stream.held {
            if held.bytes + frame.len() > limit {
                return Admit::Overflow;
            }
            held.bytes += frame.len();
            held.frames.push((offset, epoch.into(), frame, published_us));
            return Admit::Kept;
        }
        match stream.follow(offset, epoch) {
            Follow::Next => Admit::Queue(frame),
            Follow::Covered => Admit::Kept,
            Follow::Gap => {
                stream.stale = true;
                Admit::Gap
            }
        }
    }

    /// Ends the hold on `channel` once the subscribe reply is queued, the
    /// channel being at `position` (none without history): returns the held
    /// publications that come after it, to queue after the reply. A gap
    /// among them leaves the stream stale (the second value).
    pub fn release(&mut self, channel: &str, position: Option<&StreamPosition>) -> (Vec<(Message, u64)>, bool) {
        let Some(index) = self.0.iter().position(|s| *s.channel == *channel) else {
            return (Vec::new(), false);
        };
        let stream = &mut self.0[index];
        let held = stream.held.take().unwrap_or_default();
        let Some(position) = position else {
            self.0.swap_remove(index);
            self.free_if_empty();
            return (held.frames.into_iter().map(|(_, _, frame, at)| (frame, at)).collect(), false);
        };
        stream.epoch = position.epoch.as_str().into();
        stream.last = position.offset;
        let mut queued = Vec::new();
        for (offset, epoch, frame, at) in held.frames {
            match stream.follow(offset, &epoch) {
                Follow::Next => queued.push((frame, at)),
                Follow::Covered => {}
                Follow::Gap => {
                    stream.stale = true;
                    return (queued, true);
                }
            }
        }
        (queued, false)
    }

    /// Stops following `channel` (unsubscribed, or its subscription
    /// refused); a refused resubscription (`stale`) leaves it stale instead.
    pub fn forget(&mut self, channel: &str, stale: bool) {
        if !stale {
            self.0.retain(|s| *s.channel != *channel);
            self.free_if_empty();
        } else if let Some(stream) = self.find(channel) {
            stream.held = None;
            stream.stale = true;
        }
    }

    /// Whether `channel`'s stream went stale: the client may subscribe to it
    /// again while still subscribed.
    pub fn is_stale(&self, channel: &str) -> bool {
        self.0.iter().any(|s| *s.channel == *channel && s.stale)
    }

    /// Gives back the list's memory once it follows nothing: most
    /// connections follow no stream between their subscriptions' setups.
    fn free_if_empty(&mut self) {
        if self.0.is_empty() {
            self.0 = Vec::new();
        }
    }

    fn find(&mut self, channel: &str) -> Option<&mut Stream> {
        self.0.iter_mut().find(|s| *s.channel == *channel)
    }
}

/// Where a publication falls in a followed stream.
enum Follow {
    /// Right after the last one: queue it (it is now the last).
    Next,
    /// At or before the last one: the client has it.
    Covered,
    /// Past a publication the client did not get, or in a stream that
    /// started again.
    Gap,
}

impl Stream {
    fn follow(&mut self, offset: u64, epoch: &str) -> Follow {
        if offset == 0 {
            return Follow::Next;
        }
        let first_of_stream = self.epoch.is_empty() && self.last == 0;
        if *self.epoch != *epoch && !first_of_stream {
            return Follow::Gap;
        }
        if first_of_stream {
            self.epoch = epoch.into();
        }
        if offset <= self.last {
            Follow::Covered
        } else if offset == self.last + 1 {
            self.last = offset;
            Follow::Next
        } else {
            Follow::Gap
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 1000;

    fn at(offset: u64, epoch: &str) -> StreamPosition {
        StreamPosition { offset, epoch: epoch.into() }
    }

    fn admit(streams: &mut Streams, offset: u64, epoch: &str) -> Admit {
        streams.admit("feed:a", Some(&at(offset, epoch)), Message::text(offset.to_string()), 0, LIMIT)
    }

    fn texts(frames: Vec<(Message, u64)>) -> Vec<String> {
        frames.into_iter().map(|(m, _)| m.into_text().unwrap().to_string()).collect()
    }

    #[test]
    fn held_publications_after_the_position_follow_the_reply_and_the_rest_are_skipped() {
        let mut streams = Streams::default();
        streams.hold("feed:a");
        for offset in 4..=7 {
            assert_eq!(admit(&mut streams, offset, "e"), Admit::Kept, "held");
        }
        let (queued, stale) = streams.release("feed:a", Some(&at(5, "e")));
        assert_eq!((texts(queued), stale), (vec!["6".to_owned(), "7".to_owned()], false));
        assert_eq!(admit(&mut streams, 7, "e"), Admit::Kept, "seen twice: skipped");
        assert_eq!(admit(&mut streams, 8, "e"), Admit::Queue(Message::text("8")));
    }

    #[test]
    fn a_missed_publication_makes_the_stream_stale_until_it_is_subscribed_again() {
        let mut streams = Streams::default();
        streams.hold("feed:a");
        streams.release("feed:a", Some(&at(5, "e")));
        assert_eq!(admit(&mut streams, 7, "e"), Admit::Gap, "6 never came");
        assert!(streams.is_stale("feed:a"));
        assert_eq!(admit(&mut streams, 8, "e"), Admit::Kept, "nothing more is queued");
        let join = Message::text("join");
        assert_eq!(streams.admit("feed:a", None, join.clone(), 0, LIMIT), Admit::Queue(join), "but joins and leaves");
        streams.hold("feed:a");
        assert!(!streams.is_stale("feed:a"));
        assert_eq!(admit(&mut streams, 9, "e"), Admit::Kept);
        let (queued, _) = streams.release("feed:a", Some(&at(8, "e")));
        assert_eq!(texts(queued), ["9"]);
    }

    #[test]
    fn a_stream_that_started_again_is_a_gap_unless_nothing_was_seen_yet() {
        let mut streams = Streams::default();
        streams.hold("feed:a");
        streams.release("feed:a", Some(&at(0, "")));
        assert_eq!(admit(&mut streams, 1, "e1"), Admit::Queue(Message::text("1")), "the first publication of all");
        assert_eq!(admit(&mut streams, 1, "e2"), Admit::Gap, "a new epoch");
        let mut streams = Streams::default();
        streams.hold("feed:a");
        let (_, stale) = {
            admit(&mut streams, 3, "e1");
            streams.release("feed:a", Some(&at(0, "")))
        };
        assert!(stale, "1 and 2 never came");
    }

    #[test]
    fn without_history_everything_held_is_queued_and_nothing_is_followed() {
        let mut streams = Streams::default();
        streams.hold("chat:a");
        streams.admit("chat:a", None, Message::text("x"), 0, LIMIT);
        let (queued, stale) = streams.release("chat:a", None);
        assert_eq!((texts(queued), stale), (vec!["x".to_owned()], false));
        assert_eq!(streams.admit("chat:a", None, Message::text("y"), 0, LIMIT), Admit::Queue(Message::text("y")));
        assert!(streams.0.is_empty());
    }

    #[test]
    fn what_is_held_is_bounded() {
        let mut streams = Streams::default();
        streams.hold("feed:a");
        assert_eq!(streams.admit("feed:a", Some(&at(1, "e")), Message::text("12345"), 0, 8), Admit::Kept);
        assert_eq!(streams.admit("feed:a", Some(&at(2, "e")), Message::text("12345"), 0, 8), Admit::Overflow);
        streams.forget("feed:a", false);
        assert_eq!(
            streams.admit("feed:a", Some(&at(3, "e")), Message::text("z"), 0, 8),
            Admit::Queue(Message::text("z"))
        );
    }
}
