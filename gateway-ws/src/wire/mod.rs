//! The WebSocket framing of an open connection (RFC 6455), server side,
//! shaped for connections that are idle most of their life.
//!
//! An idle connection holds its socket and nothing else: no read buffer and
//! no write buffer. Reads go into a buffer of the worker thread's own
//! ([`SCRATCH`]), borrowed only while a read is in progress; only bytes that
//! do not yet make a whole frame, or the frames of a message still arriving
//! in fragments, are kept for the connection ([`Inbound`]), and freed once
//! they are consumed. Writes copy a batch of frames into a write buffer of
//! the thread's, likewise borrowed only for the write, so that a batch costs
//! one system call and an idle connection keeps no write buffer either.
//!
//! Pings from the client come out of [`Wire::next`] like any message: the
//! connection answers them through its outbox, in order with the rest.

mod frame;
pub mod fuzzing;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

use frame::{Header, MAX_SERVER_HEADER_BYTES, OpCode};

/// Bytes read from a socket at once, into the worker thread's buffer.
const SCRATCH_BYTES: usize = 16 * 1024;
/// Most bytes given to one write, from the worker thread's buffer.
const WRITE_CHUNK: usize = 64 * 1024;

thread_local! {
    /// The read buffer every connection polled on this thread shares: it is
    /// only borrowed for the length of one `poll_read`.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice());
    /// The write buffer every connection polled on this thread shares, the
    /// same way: what a write does not take is copied again from the batch
    /// at the next one.
    static OUTGOING: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(WRITE_CHUNK));
}

/// Why the client's side of a connection cannot be read any more.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WireError {
    #[error("message over the size limit")]
    MessageTooBig,
    #[error("text message that is not UTF-8")]
    InvalidUtf8,
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// One open WebSocket connection on `stream`.
pub(crate) struct Wire<S> {
    stream: S,
    /// What has arrived but is not a whole message yet; `None` on an idle
    /// connection.
    inbound: Option<Box<Inbound>>,
    /// Largest message (and frame) the client may send.
    max_message_bytes: usize,
}

/// Bytes of a connection that wait for the rest of their frame or message.
#[derive(Default)]
struct Inbound {
    /// Received and not yet read as frames: less than one frame, unless
    /// several arrived at once.
    bytes: Vec<u8>,
    /// A fragmented message so far: whether it is text, and its payload.
    fragments: Option<(bool, Vec<u8>)>,
}

impl Inbound {
    fn is_empty(&self) -> bool {
        self.bytes.is_empty() && self.fragments.is_none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    /// A connection whose handshake is done, with `tail`: what the client
    /// sent after its upgrade request, already read.
    pub(crate) fn new(stream: S, tail: Vec<u8>, max_message_bytes: usize) -> Self {
        let inbound = (!tail.is_empty()).then(|| Box::new(Inbound { bytes: tail, fragments: None }));
        Self { stream, inbound, max_message_bytes }
    }

    /// The next message from the client, `None` once its TCP connection has
    /// ended. Cancel-safe: what a cancelled call read stays for the next.
    pub(crate) async fn next(&mut self) -> Option<Result<Message, WireError>> {
        poll_fn(|cx| self.poll_next(cx)).await
    }

    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message, WireError>>> {
        loop {
            match self.message_from_inbound() {
                Ok(Some(message)) => return Poll::Ready(Some(Ok(message))),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
            match ready!(self.poll_read(cx)) {
                Ok(Read::Message(message)) => return Poll::Ready(Some(Ok(message))),
                Ok(Read::More) => {}
                Ok(Read::End) => return Poll::Ready(None),
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
        }
    }

    /// A whole message from the bytes kept for the connection, when they
    /// hold one.
    fn message_from_inbound(&mut self) -> Result<Option<Message>, WireError> {
        let max = self.max_message_bytes;
        while let Some(inbound) = self.inbound.as_deref_mut() {
            let Some(header) = frame::parse_header(&inbound.bytes, max)? else { return Ok(None) };
            if inbound.bytes.len() < header.frame_len() {
                return Ok(None);
            }
            let payload = frame::unmask(&inbound.bytes, &header);
            inbound.bytes.drain(..header.frame_len());
            if inbound.bytes.is_empty() {
                inbound.bytes = Vec::new();
            }
            let message = assemble(&mut inbound.fragments, header, payload, max)?;
            if inbound.is_empty() {
                self.inbound = None;
            }
            if message.is_some() {
                return Ok(message);
            }
        }
        Ok(None)
    }

    /// Reads what the socket has into the thread's buffer. Whole frames in
    /// it are read in place while nothing is kept for the connection; the
    /// rest is kept.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<Read, WireError>> {
        SCRATCH.with_borrow_mut(|scratch| {
            let mut buf = ReadBuf::new(scratch);
            ready!(Pin::new(&mut self.stream).poll_read(cx, &mut buf))?;
            let read = buf.filled();
            if read.is_empty() {
                return Poll::Ready(Ok(Read::End));
            }
            if let Some(inbound) = self.inbound.as_deref_mut()
                && !inbound.bytes.is_empty()
            {
                inbound.bytes.extend_from_slice(read);
                return Poll::Ready(Ok(Read::More));
            }
            Poll::Ready(self.frames_in_place(read))
        })
    }

    /// Reads the frames in `read` (fresh from the socket, nothing kept
    /// before it) until one completes a message, and keeps what is left.
    fn frames_in_place(&mut self, mut read: &[u8]) -> Result<Read, WireError> {
        let max = self.max_message_bytes;
        loop {
            let header = match frame::parse_header(read, max)? {
                Some(header) if header.frame_len() <= read.len() => header,
                _ => {
                    self.keep(read);
                    return Ok(Read::More);
                }
            };
            let payload = frame::unmask(read, &header);
            read = &read[header.frame_len()..];
            // Kept for the connection only while a fragmented message lasts.
            let mut fragments = self.inbound.take().and_then(|inbound| inbound.fragments);
            let message = assemble(&mut fragments, header, payload, max)?;
            if fragments.is_some() {
                self.inbound = Some(Box::new(Inbound { bytes: Vec::new(), fragments }));
            }
            if let Some(message) = message {
                self.keep(read);
                return Ok(Read::Message(message));
            }
        }
    }

    /// Keeps `rest` for the next read, when there is any. Only what arrived
    /// is kept, never room for the length a header declares: that length is
    /// the client's word, and a few bytes would hold a whole message's worth
    /// of memory on every connection that sends them.
    fn keep(&mut self, rest: &[u8]) {
        if rest.is_empty() {
            return;
        }
        self.inbound.get_or_insert_default().bytes.extend_from_slice(rest);
    }

    /// Writes `batch`, emptying it, then flushes.
    pub(crate) async fn send_batch(&mut self, batch: &mut VecDeque<Message>) -> io::Result<()> {
        let mut written = 0;
        poll_fn(|cx| self.poll_send(cx, batch, &mut written)).await
    }

    /// Writes `batch`, emptying it, then flushes; `written` bytes of its
    /// first frame are already out (the count of a write still in
    /// progress, which starts at 0).
    pub(crate) fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        batch: &mut VecDeque<Message>,
        written: &mut usize,
    ) -> Poll<io::Result<()>> {
        ready!(self.poll_write_batch(cx, batch, written))?;
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    /// Writes one message, then flushes.
    pub(crate) async fn send(&mut self, message: Message) -> io::Result<()> {
        self.send_batch(&mut VecDeque::from([message])).await
    }

    /// Sends a close frame.
    pub(crate) async fn close(&mut self, frame: Option<CloseFrame>) -> io::Result<()> {
        self.send(frame::close_message(frame)).await
    }

    /// Writes the frames at the front of `batch`, `written` bytes of the
    /// first being already out, until it is empty: copied into the worker
    /// thread's write buffer, [`WRITE_CHUNK`] bytes at most per write, so
    /// that a batch of small frames costs one system call.
    fn poll_write_batch(
        &mut self,
        cx: &mut Context<'_>,
        batch: &mut VecDeque<Message>,
        written: &mut usize,
    ) -> Poll<io::Result<()>> {
        while !batch.is_empty() {
            let sent = OUTGOING.with_borrow_mut(|chunk| {
                chunk.clear();
                fill(chunk, batch, *written);
                Pin::new(&mut self.stream).poll_write(cx, chunk)
            });
            let mut sent = ready!(sent)?;
            if sent == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            while let Some(message) = batch.front() {
                let left = wire_length(message) - *written;
                if sent < left {
                    *written += sent;
                    break;
                }
                sent -= left;
                *written = 0;
                batch.pop_front();
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Copies the frames of `batch` into `chunk`, from byte `skip` of the first
/// one, until it holds [`WRITE_CHUNK`] bytes or the batch is all in.
fn fill(chunk: &mut Vec<u8>, batch: &mut VecDeque<Message>, mut skip: usize) {
    for message in batch.iter_mut() {
        if let Message::Close(close) = message {
            let close = close.take();
            *message = frame::close_message(close);
        }
        let (opcode, payload) = frame::outgoing(message);
        let mut header = [0; MAX_SERVER_HEADER_BYTES];
        let header_len = frame::write_header(&mut header, opcode, payload.len());
        for part in [&header[..header_len], payload] {
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            let take = (part.len() - skip).min(WRITE_CHUNK - chunk.len());
            chunk.extend_from_slice(&part[skip..skip + take]);
            skip = 0;
            if chunk.len() == WRITE_CHUNK {
                return;
            }
        }
    }
}

/// Bytes `message` takes on the wire.
fn wire_length(message: &Message) -> usize {
    let (opcode, payload) = frame::outgoing(message);
    let mut header = [0; MAX_SERVER_HEADER_BYTES];
    frame::write_header(&mut header, opcode, payload.len()) + payload.len()
}

/// What one read from the socket gave.
enum Read {
    Message(Message),
    /// Not a whole message yet.
    More,
    /// The client closed its side of the TCP connection.
    End,
}

/// Adds one frame to the message being assembled: the message, when the
/// frame ends one.
fn assemble(
    fragments: &mut Option<(bool, Vec<u8>)>,
    header: Header,
    payload: Vec<u8>,
    max: usize,
) -> Result<Option<Message>, WireError> {
    let (text, payload) = match header.opcode {
        OpCode::Ping => return Ok(Some(Message::Ping(Bytes::from(payload)))),
        OpCode::Pong => return Ok(Some(Message::Pong(Bytes::from(payload)))),
        OpCode::Close => return Ok(Some(Message::Close(frame::close_frame(payload)?))),
        OpCode::Text | OpCode::Binary if fragments.is_some() => {
            return Err(WireError::Protocol("new message before the last one ended"));
        }
        OpCode::Text | OpCode::Binary if !header.fin => {
            *fragments = Some((header.opcode == OpCode::Text, payload));
            return Ok(None);
        }
        OpCode::Text | OpCode::Binary => (header.opcode == OpCode::Text, payload),
        OpCode::Continuation => {
            let Some((text, so_far)) = fragments.as_mut() else {
                return Err(WireError::Protocol("continuation frame with no message to continue"));
            };
            if so_far.len() + payload.len() > max {
                return Err(WireError::MessageTooBig);
            }
            so_far.extend_from_slice(&payload);
            if !header.fin {
                return Ok(None);
            }
            let text = *text;
            let Some((_, whole)) = fragments.take() else { return Ok(None) };
            (text, whole)
        }
    };
    if text {
        Utf8Bytes::try_from(payload).map(|text| Some(Message::Text(text))).map_err(|_| WireError::InvalidUtf8)
    } else {
        Ok(Some(Message::Binary(Bytes::from(payload))))
    }
}

#[cfg(test)]
mod tests;
