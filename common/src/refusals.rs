//! Reasons for the refusals hyper makes on its own.
//!
//! hyper answers a request it cannot parse (HTTP/0.9, a malformed or doubled
//! `Content-Length`, too many or too large header fields, a request line over
//! the 65,534 bytes a URI may have) before any handler runs, with a status and
//! an empty body, then closes the connection. It offers no hook to change
//! that answer, so this wrapper around the connection's socket recognises it
//! on its way out and gives it a one-line reason, like every other refusal
//! herald makes. herald's own answers always carry a body, so an empty 4xx
//! answer can only be hyper's.
//!
//! A request line too long to parse is answered 413, not 414: past that
//! length the content cannot be carried in a query string, and content over
//! a limit is 413 however it arrives.
//!
//! The wrapper also refuses a request that gives both `Content-Length` and
//! `Transfer-Encoding` (the shape of request smuggling), which hyper would
//! serve by the latter: it reads the connection's first request head as it
//! passes, and on such a head spoils a byte of it, so that hyper refuses the
//! request (400) instead of serving it; the answer then says why. hyper
//! closes a connection after any request with both headers, so a later
//! request on the same connection cannot smuggle anything either.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::http::plain_answer;

/// The refusals recognised: hyper's status line, and the status and reason
/// sent instead.
const REFUSALS: [(&[u8], u16, &str); 4] = [
    (b"HTTP/1.1 400 Bad Request\r\n", 400, "malformed HTTP request"),
    (
        b"HTTP/1.1 414 URI Too Long\r\n",
        413,
        "request line over 65,534 bytes: send content this large in a POST body (form or JSON)",
    ),
    (b"HTTP/1.1 431 Request Header Fields Too Large\r\n", 431, "too many header fields, or fields too large"),
    (b"HTTP/1.1 505 HTTP Version Not Supported\r\n", 505, "use HTTP/1.1 or HTTP/2"),
];

/// The reason given when a request had both framing headers.
const BOTH_LENGTHS: &str = "both Content-Length and Transfer-Encoding given: send one";
/// Most bytes of the first request head kept for the check.
const MAX_SCANNED_HEAD: usize = 64 * 1024;

/// A connection's socket whose outgoing empty refusals get a reason.
pub(crate) struct WithReasons<S> {
    inner: S,
    /// The rewritten refusal, still to be written.
    pending: Vec<u8>,
    /// The first request head as read so far; `None` once checked.
    first_head: Option<Vec<u8>>,
    /// The first request had both framing headers and was spoiled.
    both_lengths: bool,
}

impl<S> WithReasons<S> {
    pub(crate) fn new(inner: S) -> Self {
        Self { inner, pending: Vec::new(), first_head: Some(Vec::new()), both_lengths: false }
    }

    /// Follows the first request head through `fresh` (bytes just read);
    /// once it is complete, spoils `fresh` if the head has both framing
    /// headers.
    fn check_first_head(&mut self, fresh: &mut [u8]) {
        let Some(head) = self.first_head.as_mut() else { return };
        let room = MAX_SCANNED_HEAD.saturating_sub(head.len());
        head.extend_from_slice(&fresh[..fresh.len().min(room)]);
        let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
            if head.len() >= MAX_SCANNED_HEAD {
                self.first_head = None;
            }
            return;
        };
        let has = |name: &[u8]| {
            head[..end].split(|&b| b == b'\n').skip(1).any(|line| {
                line.len() > name.len() && line[..name.len()].eq_ignore_ascii_case(name) && line[name.len()] == b':'
            })
        };
        if has(b"content-length") && has(b"transfer-encoding") && !fresh.is_empty() {
            // The head ends in these bytes, so hyper has not parsed it yet:
            // a NUL in it makes the whole head unparsable.
            fresh[0] = 0;
            self.both_lengths = true;
        }
        self.first_head = None;
    }
}

/// The answer to send instead of `head`, when `head` is one of hyper's
/// empty refusals; `both_lengths` names the reason of a spoiled request.
fn with_reason(head: &[u8], both_lengths: bool) -> Option<Vec<u8>> {
    if !head.ends_with(b"\r\n\r\n") || !contains(head, b"\r\ncontent-length: 0\r\n") {
        return None;
    }
    let (_, status, reason) = REFUSALS.iter().find(|(line, ..)| head.starts_with(line))?;
    let reason = if both_lengths && *status == 400 { BOTH_LENGTHS } else { reason };
    Some(plain_answer(*status, reason, &[]).into_bytes())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

impl<S: AsyncWrite + Unpin> WithReasons<S> {
    /// Writes what is pending; ready once nothing is.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let written = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.drain(..written);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WithReasons<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        if self.first_head.is_some() {
            let fresh = &mut buf.filled_mut()[before..];
            self.check_first_head(fresh);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WithReasons<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        if let Some(answer) = with_reason(buf, self.both_lengths) {
            self.pending = answer;
            // hyper's bytes are taken; ours go out now or on the next call.
            let _ = self.poll_pending(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypers_empty_refusals_get_a_reason_and_its_other_answers_pass_as_they_are() {
        let refusal = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let answer = String::from_utf8(with_reason(refusal, false).unwrap()).unwrap();
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
        assert!(answer.ends_with("\r\n\r\ntoo many header fields, or fields too large\n"), "{answer}");
        let too_long = b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\n\r\n";
        assert!(String::from_utf8(with_reason(too_long, false).unwrap()).unwrap().starts_with("HTTP/1.1 413 "));
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 25\r\n\r\nmissing parameter 'content'\n";
        assert_eq!(with_reason(ours, false), None);
        assert_eq!(with_reason(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", false), None);
    }

    #[test]
    fn a_first_head_with_both_framing_headers_is_spoiled_wherever_it_ends() {
        let request = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        for split in [1, 20, request.len() - 8] {
            let mut socket = WithReasons::new(());
            let (first, second) = request.split_at(split);
            let (mut first, mut second) = (first.to_vec(), second.to_vec());
            socket.check_first_head(&mut first);
            socket.check_first_head(&mut second);
            assert!(socket.both_lengths, "split at {split}");
            assert!(first.iter().chain(&second).any(|&b| b == 0), "split at {split}");
        }
        let mut clean = b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello".to_vec();
        let mut socket = WithReasons::new(());
        socket.check_first_head(&mut clean);
        assert!(!socket.both_lengths && !clean.contains(&0));
        assert!(socket.first_head.is_none(), "only the first head is read");
    }

    #[tokio::test]
    async fn the_reason_reaches_the_peer() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (near, mut far) = tokio::io::duplex(64);
        let mut socket = WithReasons::new(near);
        let writer = tokio::spawn(async move {
            socket.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").await.unwrap();
            socket.shutdown().await.unwrap();
        });
        let mut got = String::new();
        far.read_to_string(&mut got).await.unwrap();
        writer.await.unwrap();
        assert!(got.ends_with("\r\n\r\nmalformed HTTP request\n"), "{got}");
    }
}
