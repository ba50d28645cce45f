//! Channel history: the last publications of each client channel whose
//! namespace keeps them, with offsets and an epoch, so that a client that
//! comes back gets exactly what it missed, or is told plainly that it cannot.
//!
//! - [`memory`]: in this broker's memory, for a broker on its own.

pub mod memory;

use herald_proto::v1::StreamPosition;

/// What a read of a channel's history asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Read {
    /// The position the reader knows: the publications after it are read,
    /// and the answer says whether they are all there. `None`: the newest.
    pub since: Option<StreamPosition>,
    /// Most publications read.
    pub limit: u32,
}
