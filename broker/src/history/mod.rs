//! Channel history: the last publications of each client channel whose
//! namespace keeps them, with offsets and an epoch, so that a client that
//! comes back gets exactly what it missed, or is told plainly that it cannot.
//!
//! - [`memory`]: in this broker's memory, for a broker on its own;
//! - JetStream, for a cluster: `federation::nats::history`.
//!
//! Both answer a [`Read`] by the same rules, kept here: where the read
//! starts, and whether what it found is everything the reader missed.

pub mod memory;

use herald_proto::v1::{HistoryPublication, HistoryResponse, StreamPosition};

/// What a read of a channel's history asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Read {
    /// The position the reader knows: the publications after it are read,
    /// and the answer says whether they are all there. `None`: the newest.
    pub since: Option<StreamPosition>,
    /// Most publications read.
    pub limit: u32,
}

impl Read {
    /// The answer for a channel whose stream holds nothing (never written,
    /// or forgotten): only a reader that saw nothing either missed nothing.
    pub fn of_nothing(&self) -> HistoryResponse {
        let complete = self.since.as_ref().is_some_and(|since| since.offset == 0 && since.epoch.is_empty());
        HistoryResponse { publications: Vec::new(), position: Some(StreamPosition::default()), complete }
    }

    /// The offset after which a stream now at `top` is read: after `since`,
    /// or the newest `limit` without one. `None` when `since` is of another
    /// epoch: its offsets mean nothing in this stream.
    pub fn after(&self, top: &StreamPosition) -> Option<u64> {
        match &self.since {
            None => Some(top.offset.saturating_sub(u64::from(self.limit))),
            Some(since) if since.epoch.is_empty() && since.offset == 0 => Some(0),
            Some(since) if since.epoch == top.epoch => Some(since.offset),
            Some(_) => None,
        }
    }

    /// The answer for a stream at `top` read after `after` (see
    /// [`Read::after`]; `None`: another epoch), `oldest` being the oldest
    /// offset the stream still holds (`top + 1` when it holds none). With
    /// `since`, the publications are all the reader missed only when nothing
    /// after its position was dropped; otherwise none are handed out.
    pub fn answer(
        &self,
        top: StreamPosition,
        after: Option<u64>,
        oldest: u64,
        publications: Vec<HistoryPublication>,
    ) -> HistoryResponse {
        let complete = self.since.is_some() && after.is_some_and(|after| oldest <= after + 1);
        let publications = if self.since.is_some() && !complete { Vec::new() } else { publications };
        HistoryResponse { publications, position: Some(top), complete }
    }
}
