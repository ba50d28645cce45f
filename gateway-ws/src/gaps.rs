//! Keeping a gateway's channels with history whole across broker trouble.
//!
//! The link remembers the last position it dispatched on each channel with
//! history. An event that skips past it (the gateway's broker failed over
//! while publications were stored) has the missing publications read back
//! from the channel's history and dispatched first, in order; after a new
//! broker session every remembered channel is caught up the same way, so
//! that the last publications before a failover are not left behind either.
//! When the history no longer holds them nothing is filled: each
//! connection's stream then sees the gap and asks its client to resubscribe
//! (see `streams`), and the client learns that it cannot recover.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use herald_proto::v1::{Event, HistoryRequest, StreamPosition};

use crate::link;
use crate::shared::Shared;

/// The last position dispatched on each channel with history.
#[derive(Debug, Default)]
pub(crate) struct Gaps {
    tops: Mutex<HashMap<String, StreamPosition>>,
}

impl Gaps {
    /// The position to read from when publications before `position` were
    /// not dispatched on `channel`.
    fn missing_before(&self, channel: &str, position: &StreamPosition) -> Option<StreamPosition> {
        let tops = self.tops.lock().unwrap_or_else(PoisonError::into_inner);
        let top = tops.get(channel)?;
        (top.epoch == position.epoch && position.offset > top.offset + 1).then(|| top.clone())
    }

    /// Records that `position` was dispatched on `channel`.
    fn advance(&self, channel: &str, position: &StreamPosition) {
        let mut tops = self.tops.lock().unwrap_or_else(PoisonError::into_inner);
        match tops.get_mut(channel) {
            Some(top) if top.epoch == position.epoch => top.offset = top.offset.max(position.offset),
            Some(top) => *top = position.clone(),
            None => {
                tops.insert(channel.to_owned(), position.clone());
            }
        }
    }

    /// The remembered channels that still have a subscriber here; the
    /// others are forgotten.
    fn followed(&self, subscribed: impl Fn(&str) -> bool) -> Vec<(String, StreamPosition)> {
        let mut tops = self.tops.lock().unwrap_or_else(PoisonError::into_inner);
        tops.retain(|channel, _| subscribed(channel));
        tops.iter().map(|(channel, top)| (channel.clone(), top.clone())).collect()
    }
}

/// Dispatches `event`, after the publications of its channel that were
/// missed before it.
pub(crate) async fn dispatch(shared: &Shared, event: Event) {
    let Some(position) = event.position.clone() else {
        link::dispatch(shared, event);
        return;
    };
    if let Some(since) = shared.gaps.missing_before(&event.channel, &position) {
        fill(shared, &event.channel, since, Some(position.offset)).await;
    }
    let channel = event.channel.clone();
    link::dispatch(shared, event);
    shared.gaps.advance(&channel, &position);
}

/// After a new broker session: catches up every channel with history that
/// has a subscriber here.
pub(crate) async fn catch_up(shared: &Shared) {
    for (channel, top) in shared.gaps.followed(|channel| shared.registry.has_subscribers(channel)) {
        fill(shared, &channel, top, None).await;
    }
}

/// Reads `channel`'s publications after `since` (and before offset
/// `before`) and dispatches them.
async fn fill(shared: &Shared, channel: &str, since: StreamPosition, before: Option<u64>) {
    let (Some(broker), Some(rule)) = (shared.broker.get(), shared.config.namespaces.history_of(channel)) else {
        return;
    };
    let limit = u32::try_from(rule.size).unwrap_or(u32::MAX);
    let request = HistoryRequest { channel: channel.to_owned(), since: Some(since), limit };
    let read = match broker.history(request).await {
        Ok(read) if read.complete => read,
        Ok(_) => {
            shared.metrics.history_gaps_unfilled.inc();
            return;
        }
        Err(status) => {
            tracing::warn!(channel, reason = status.message(), "cannot read back the publications a gap left out");
            shared.metrics.history_gaps_unfilled.inc();
            return;
        }
    };
    let epoch = read.position.map(|p| p.epoch).unwrap_or_default();
    for publication in read.publications {
        if before.is_some_and(|before| publication.offset >= before) {
            break;
        }
        let position = StreamPosition { offset: publication.offset, epoch: epoch.clone() };
        let event = Event {
            channel: channel.to_owned(),
            target: None,
            content: publication.content,
            published_at: publication.published_at,
            delivery: None,
            position: Some(position.clone()),
            presence_change: None,
        };
        link::dispatch(shared, event);
        shared.gaps.advance(channel, &position);
        shared.metrics.history_filled.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(offset: u64, epoch: &str) -> StreamPosition {
        StreamPosition { offset, epoch: epoch.into() }
    }

    #[test]
    fn a_skip_past_the_last_dispatched_position_is_a_gap_to_fill() {
        let gaps = Gaps::default();
        assert_eq!(gaps.missing_before("feed:a", &at(5, "e")), None, "nothing known yet");
        gaps.advance("feed:a", &at(5, "e"));
        assert_eq!(gaps.missing_before("feed:a", &at(6, "e")), None);
        assert_eq!(gaps.missing_before("feed:a", &at(3, "e")), None, "a repeat is no gap");
        assert_eq!(gaps.missing_before("feed:a", &at(9, "e")), Some(at(5, "e")));
        assert_eq!(gaps.missing_before("feed:a", &at(9, "f")), None, "another epoch cannot be filled");
        gaps.advance("feed:a", &at(2, "f"));
        assert_eq!(gaps.followed(|_| true), [("feed:a".to_owned(), at(2, "f"))]);
        assert!(gaps.followed(|_| false).is_empty(), "channels without subscribers are forgotten");
    }
}
