//! The wire's reading driven without a socket: a client's bytes, cut into
//! reads of given sizes. It serves the `ws_frames` fuzz target (`fuzz/`),
//! which checks that any bytes, cut any way, read the same and never panic.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
pub use tokio_tungstenite::tungstenite::Message;

use super::Wire;

/// What one step of reading a client's bytes came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Message(Message),
    /// The connection is refused for this reason (it closes with 1002,
    /// 1007 or 1009).
    Refused(String),
    /// The bytes ran out; `kept` says whether the connection still holds
    /// an unfinished frame or message.
    Ended {
        kept: bool,
    },
    /// The wire waited for more with bytes still to read: a bug.
    Stalled,
}

/// Reads `bytes` as what a client sent on an open connection whose limit is
/// `max_message_bytes`, in reads of the sizes in `reads` (taken in turn;
/// all at once when empty), until the bytes end or the connection is
/// refused.
pub fn read_client_bytes(bytes: &[u8], reads: &[usize], max_message_bytes: usize) -> Vec<Outcome> {
    let client = Pieces { bytes, at: 0, reads, turn: 0 };
    let mut wire = Wire::new(client, Vec::new(), max_message_bytes);
    let mut cx = Context::from_waker(Waker::noop());
    let mut outcomes = Vec::new();
    loop {
        let outcome = match wire.poll_next(&mut cx) {
            Poll::Ready(Some(Ok(message))) => Outcome::Message(message),
            Poll::Ready(Some(Err(e))) => Outcome::Refused(e.to_string()),
            Poll::Ready(None) => Outcome::Ended { kept: wire.inbound.is_some() },
            Poll::Pending => Outcome::Stalled,
        };
        let last = !matches!(outcome, Outcome::Message(_));
        outcomes.push(outcome);
        if last {
            return outcomes;
        }
    }
}

/// A client whose bytes are always ready, in pieces of the given sizes.
struct Pieces<'a> {
    bytes: &'a [u8],
    at: usize,
    reads: &'a [usize],
    turn: usize,
}

impl AsyncRead for Pieces<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let size = match self.reads {
            [] => usize::MAX,
            reads => reads[self.turn % reads.len()].max(1),
        };
        self.turn += 1;
        let end = self.bytes.len().min(self.at.saturating_add(size)).min(self.at + buf.remaining());
        buf.put_slice(&self.bytes[self.at..end]);
        self.at = end;
        Poll::Ready(Ok(()))
    }
}

/// Writes go nowhere: only reading is driven.
impl AsyncWrite for Pieces<'_> {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::tests::client_frame;

    #[test]
    fn bytes_read_whole_or_byte_by_byte_come_out_the_same() {
        let mut bytes = client_frame(0x01, b"frag", [1, 2, 3, 4]);
        bytes.extend(client_frame(0x89, b"ping", [5, 6, 7, 8]));
        bytes.extend(client_frame(0x80, b"ment", [9, 9, 9, 9]));
        bytes.extend(&client_frame(0x82, &[0; 10], [0; 4])[..5]);
        let whole = read_client_bytes(&bytes, &[], 1024);
        assert_eq!(
            whole,
            [
                Outcome::Message(Message::Ping("ping".into())),
                Outcome::Message(Message::text("fragment")),
                Outcome::Ended { kept: true },
            ]
        );
        assert_eq!(read_client_bytes(&bytes, &[1], 1024), whole);
        assert_eq!(read_client_bytes(&bytes, &[3, 1, 7], 1024), whole);
    }

    #[test]
    fn a_refusal_ends_the_reading() {
        let bytes = client_frame(0x81, &[0xff], [1, 2, 3, 4]);
        assert_eq!(read_client_bytes(&bytes, &[2], 1024), [Outcome::Refused("text message that is not UTF-8".into())]);
    }
}
