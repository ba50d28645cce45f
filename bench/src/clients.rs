//! The load generator's WebSocket clients and the statistics they add to.
//!
//! The client is raw on purpose: it writes the HTTP upgrade itself and parses
//! server frames in place, so a delivery costs no allocation and the load
//! generator stays cheaper than the server it measures. It binds a chosen
//! loopback source address before connecting (the ephemeral ports of one
//! source address run out near 28k connections).
//!
//! An idle client must cost next to nothing: the idle scenario holds up to a
//! million of them on one machine, and the load generators' memory comes out
//! of the same RAM as herald's. So no client owns a receive buffer. Every
//! client reads into its thread's one scratch buffer and parses what it read
//! there, before its next await (so no other client can need the buffer
//! meanwhile); a client keeps bytes of its own only while a frame is partial,
//! and frees them once the frame is whole. A receiving client's task holds
//! just the socket, its checks and a few words ([`Client::receive`]); what
//! few clients need (fragments, a log of sequence gaps, a logged-in client's
//! targets) is boxed.
//!
//! A client may speak herald's client protocol instead (`herald.json.v1`):
//! it then subscribes to client channels once connected, and finds each
//! message's payload inside the JSON push that carries it.
//!
//! Every client checks each message: its target must be `*`, the client's
//! own address, a channel it subscribed to or, for a client that logged in
//! with a JWT, its user id or one of its groups (else it is misdelivered); its sequence number, counted
//! per target, must be new (else it is duplicated) and should be the next one
//! (else it is reordered); and its stamp gives the publish→delivery latency.
//!
//! A client may also talk: send text frames for a while ([`Client::send`],
//! the events scenario), close with a close handshake ([`Client::close`],
//! connects), or be split into a reader and a writer for commands that
//! overlap ([`Client::split`], rpc).

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

use crate::endpoints::WsUrl;
use crate::loadgen::{Allowance, Sending};
use crate::message;
use crate::stats::Latency;

/// Delivery counters and latency histograms are split in shards so that
/// clients on different threads rarely touch the same cache line or lock.
const SHARDS: usize = 16;
/// The scratch buffer every client of a thread reads into: large, so that a
/// fan-out backlog takes few reads (it exists once per thread, not per client).
const SCRATCH_BYTES: usize = 64 * 1024;
/// The largest frame a client accepts. A partial frame is kept until it is
/// whole, so a header announcing more would make the client allocate
/// whatever the peer says; it ends the connection instead.
const MAX_FRAME_BYTES: usize = 16 << 20;
/// How many gaps in its sequence a client remembers to tell a late message
/// from a duplicate.
const MAX_MISSING: usize = 1024;
/// Every client sends the same key: herald only hashes it.
const WEBSOCKET_KEY: &str = "aGVyYWxkLWJlbmNobWFyaw==";

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

thread_local! {
    /// Where every client on this thread reads into (see the module doc).
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice());
    /// Latencies (µs) of the messages one read brought, recorded in the
    /// shared histogram in one go after the read.
    static LATENCIES: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

#[repr(align(64))]
#[derive(Default)]
struct PaddedCounter(AtomicU64);

/// What every client of one load-generator process has seen.
pub struct Stats {
    delivered: [PaddedCounter; SHARDS],
    sent: [PaddedCounter; SHARDS],
    /// Each made at its first latency: a histogram takes 190 KiB, and an
    /// idle load generator records none until the final broadcast.
    latency: Vec<Mutex<Option<Latency>>>,
    duplicated: AtomicU64,
    misdelivered: AtomicU64,
    reordered: AtomicU64,
    closed: AtomicU64,
}

/// A snapshot of [`Stats`].
#[derive(Debug, Default)]
pub struct Totals {
    pub delivered: u64,
    pub duplicated: u64,
    pub misdelivered: u64,
    pub reordered: u64,
    pub closed: u64,
    pub sent: u64,
    pub latency: Latency,
}

impl Stats {
    pub fn new() -> Self {
        Self {
            delivered: Default::default(),
            sent: Default::default(),
            latency: (0..SHARDS).map(|_| Mutex::new(None)).collect(),
            duplicated: AtomicU64::new(0),
            misdelivered: AtomicU64::new(0),
            reordered: AtomicU64::new(0),
            closed: AtomicU64::new(0),
        }
    }

    /// Messages delivered to their target for the first time, so far.
    pub fn delivered(&self) -> u64 {
        self.delivered.iter().map(|c| c.0.load(Ordering::Relaxed)).sum()
    }

    /// Frames the clients have sent, so far.
    pub fn sent(&self) -> u64 {
        self.sent.iter().map(|c| c.0.load(Ordering::Relaxed)).sum()
    }

    /// Clients whose connection has ended, so far.
    pub fn closed(&self) -> u64 {
        self.closed.load(Ordering::Relaxed)
    }

    pub fn totals(&self) -> Totals {
        let mut latency = Latency::new();
        for shard in &self.latency {
            if let Some(recorded) = &*shard.lock().unwrap_or_else(|e| e.into_inner()) {
                latency.merge(recorded);
            }
        }
        Totals {
            delivered: self.delivered(),
            duplicated: self.duplicated.load(Ordering::Relaxed),
            misdelivered: self.misdelivered.load(Ordering::Relaxed),
            reordered: self.reordered.load(Ordering::Relaxed),
            closed: self.closed.load(Ordering::Relaxed),
            sent: self.sent(),
            latency,
        }
    }
}

/// A connected client that has read its greeting.
pub struct Client {
    stream: TcpStream,
    /// Bytes read but not yet parsed: none (and no allocation) unless a
    /// frame is partial or came along with the greeting.
    unread: Vec<u8>,
    /// `<worker_id>/<connection_id>`, from the greeting.
    pub address: String,
    /// Targets besides `*` and the address that this client is in: its user
    /// id and groups, the channels it subscribed to.
    also: Vec<String>,
    /// Whether it speaks the client protocol.
    json: bool,
}

/// Connects to `url` from `source`, upgrades to WebSocket (presenting
/// `token` as `Authorization: Bearer`, when given) and reads the greeting.
/// With channels to `subscribe` to, it speaks the client protocol and is
/// subscribed to each when this returns.
pub async fn connect(
    url: &WsUrl,
    source: Ipv4Addr,
    token: Option<&str>,
    subscribe: &[String],
) -> anyhow::Result<Client> {
    let mut client = open(url, source, token, !subscribe.is_empty()).await?;
    for (id, channel) in (1..).zip(subscribe) {
        client.change_subscription(id, channel, true).await?;
        client.also.push(message::channel_label(channel));
    }
    Ok(client)
}

/// Connects to `url` from `source` speaking the client protocol, subscribed
/// to nothing: a client for the bench's own commands.
pub async fn connect_speaking(url: &WsUrl, source: Ipv4Addr) -> anyhow::Result<Client> {
    open(url, source, None, true).await
}

/// Connects, upgrades (asking for the client protocol when `json`) and
/// reads the greeting.
async fn open(url: &WsUrl, source: Ipv4Addr, token: Option<&str>, json: bool) -> anyhow::Result<Client> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source.into(), 0)).with_context(|| format!("bind {source}"))?;
    let stream = socket.connect(url.addr).await.with_context(|| format!("connect {} from {source}", url.addr))?;
    let mut client = Client { stream, unread: Vec::new(), address: String::new(), also: Vec::new(), json };
    client.upgrade(url, token).await?;
    let greeting = client.greeting().await?;
    client.address = address_from_greeting(&greeting).with_context(|| format!("unexpected greeting {greeting:?}"))?;
    Ok(client)
}

impl Client {
    /// Sends command `id`, a subscribe to `channel` or an unsubscribe from
    /// it, and waits for its reply; fails unless it says it was done.
    pub async fn change_subscription(&mut self, id: u64, channel: &str, subscribe: bool) -> anyhow::Result<()> {
        let (command, done) = if subscribe { ("subscribe", "subscribed") } else { ("unsubscribe", "unsubscribed") };
        let text = serde_json::json!({ "id": id, command: { "channel": channel } }).to_string();
        self.stream.write_all(&text_frame(text.as_bytes())).await?;
        let reply = self.greeting().await?;
        if !reply.contains(&format!("\"{done}\"")) {
            bail!("{command} {channel}: {reply}");
        }
        Ok(())
    }

    /// Sends command `id`, a subscribe to `channel` recovering from offset
    /// `since` of `epoch`, and waits for its reply: the number of
    /// publications it recovered. Fails unless the reply says it recovered.
    pub async fn recover(&mut self, id: u64, channel: &str, since: u64, epoch: &str) -> anyhow::Result<usize> {
        let since = serde_json::json!({ "offset": since, "epoch": epoch });
        let text =
            serde_json::json!({ "id": id, "subscribe": { "channel": channel, "recover": true, "since": since } });
        self.stream.write_all(&text_frame(text.to_string().as_bytes())).await?;
        let reply: serde_json::Value = serde_json::from_str(&self.greeting().await?)?;
        let subscribed = &reply["subscribed"];
        if subscribed["recovered"] != true {
            bail!("recovering {channel} from {since}: {reply}");
        }
        Ok(subscribed["publications"].as_array().map_or(0, Vec::len))
    }

    /// Sends text frames as `sending` says during `period` (flat out, or at
    /// its rate per client), counting each written frame in `stats`;
    /// meanwhile answers the server's pings. Flat out, each burst is first
    /// claimed from `allowance`. Frame `seq` carries `<seq>:<sent_ns>::`,
    /// padded. The connection stays open afterwards, still answering pings.
    pub async fn send(
        self,
        sending: &Sending,
        period: Period,
        stats: &Stats,
        allowance: &Allowance,
        shard: usize,
    ) -> anyhow::Result<()> {
        let Period { began, phase, deadline } = period;
        let counter = &stats.sent[shard % SHARDS].0;
        let (reader, writer) = self.split();
        tokio::spawn(reader.answer_pings());
        let mut seq = 0u64;
        let mut out = Vec::with_capacity(sending.burst.max(1) * (sending.payload + 16));
        match sending.rate {
            None => {
                while Instant::now() < deadline {
                    if !allowance.claim(sending.burst.max(1) as u64, deadline).await {
                        break;
                    }
                    out.clear();
                    for _ in 0..sending.burst.max(1) {
                        push_event_frame(&mut out, seq, sending.payload);
                        seq += 1;
                    }
                    writer.write(&out).await?;
                    counter.fetch_add(sending.burst.max(1) as u64, Ordering::Relaxed);
                }
            }
            Some(rate) => {
                let every = Duration::from_millis(sending.interval_ms.max(1)).max(Duration::from_secs_f64(1.0 / rate));
                let mut ticks = tokio::time::interval_at(began + every.mul_f64(phase), every);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    let now = ticks.tick().await;
                    if now >= deadline {
                        break;
                    }
                    let due = (now.duration_since(began).as_secs_f64() * rate) as u64 + 1;
                    if due <= seq {
                        continue;
                    }
                    out.clear();
                    let first = seq;
                    while seq < due {
                        push_event_frame(&mut out, seq, sending.payload);
                        seq += 1;
                    }
                    writer.write(&out).await?;
                    counter.fetch_add(seq - first, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    /// Closes the connection: a close frame (1000), then reads until the
    /// server's close frame or the end of the stream.
    pub async fn close(mut self) -> anyhow::Result<()> {
        self.stream.write_all(&control_frame(OP_CLOSE, &1000u16.to_be_bytes())).await?;
        loop {
            match parse_frame(&self.unread)? {
                Some(frame) => {
                    consume(&mut self.unread, frame.len);
                    if frame.opcode == OP_CLOSE {
                        return Ok(());
                    }
                }
                None => {
                    if !fill(&mut self.stream, &mut self.unread).await? {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Sends small writes at once (TCP_NODELAY), for request/reply timing.
    pub fn set_nodelay(&self) -> std::io::Result<()> {
        self.stream.set_nodelay(true)
    }

    /// Splits the client into a reader of the server's frames and a writer
    /// that several tasks may share (pings are answered through it).
    pub fn split(self) -> (Reader, Writer) {
        let (read, write) = self.stream.into_split();
        let writer = Writer(Arc::new(tokio::sync::Mutex::new(write)));
        let reader = Reader { read, unread: self.unread, writer: writer.clone() };
        (reader, writer)
    }

    /// Makes the client accept messages to `user` and to each of `groups`.
    pub fn also_accept(&mut self, user: String, groups: Vec<String>) {
        self.also.push(user);
        self.also.extend(groups);
    }

    /// Receives messages until the connection ends, adding to `stats` (in
    /// shard `shard`). Not an `async fn` on purpose: the future is the
    /// [`Receiver`] alone, not the client and its copy side by side, and it
    /// is what each idle client of a load generator costs.
    pub fn receive(self, stats: Arc<Stats>, shard: usize) -> impl Future<Output = ()> + Send + 'static {
        let check = Check::new(self.address.into_bytes().into_boxed_slice(), &self.also, self.json);
        let leftover = !self.unread.is_empty();
        let partial = leftover.then(|| Box::new(Partial(self.unread)));
        // SHARDS fits a u8.
        let shard = (shard % SHARDS) as u8;
        Receiver { stream: self.stream, partial, check, stats, replies: None, shard, leftover, done: false }
    }

    async fn upgrade(&mut self, url: &WsUrl, token: Option<&str>) -> anyhow::Result<()> {
        let authorization = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
        let protocol = if self.json { "Sec-WebSocket-Protocol: herald.json.v1\r\n" } else { "" };
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {WEBSOCKET_KEY}\r\nSec-WebSocket-Version: 13\r\n{authorization}{protocol}\r\n",
            url.path, url.addr
        );
        self.stream.write_all(request.as_bytes()).await?;
        let head_len = loop {
            if let Some(i) = self.unread.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            self.fill().await.context("reading the upgrade response")?;
        };
        let head = String::from_utf8_lossy(&self.unread[..head_len]);
        let status = head.lines().next().unwrap_or_default();
        if !status.starts_with("HTTP/1.1 101") {
            bail!("upgrade refused: {status}");
        }
        consume(&mut self.unread, head_len);
        Ok(())
    }

    /// Reads frames until the next text frame (the greeting, or a reply).
    async fn greeting(&mut self) -> anyhow::Result<String> {
        loop {
            match parse_frame(&self.unread)? {
                Some(frame) => {
                    let payload = &self.unread[frame.payload.clone()];
                    let text = match frame.opcode {
                        OP_TEXT => Some(Ok(String::from_utf8_lossy(payload).into_owned())),
                        OP_CLOSE => Some(Err(describe_close(payload))),
                        _ => None,
                    };
                    consume(&mut self.unread, frame.len);
                    match text {
                        Some(Ok(text)) => return Ok(text),
                        Some(Err(close)) => bail!("closed before the greeting: {close}"),
                        None => {}
                    }
                }
                None => self.fill().await.context("reading the greeting")?,
            }
        }
    }

    /// Reads more bytes after the unread ones. Fails on end of stream.
    async fn fill(&mut self) -> anyhow::Result<()> {
        if !fill(&mut self.stream, &mut self.unread).await? {
            bail!("connection closed");
        }
        Ok(())
    }
}

/// A receiving client, and its future: all it keeps between reads. With the
/// task around it and its socket's registration in the runtime, this is what
/// an idle client costs a load generator, so it is small (a test pins its
/// size) and a future written by hand: the same loop as an `async fn` keeps
/// its locals and the futures it awaits beside the client, 384 bytes where
/// this takes 128.
struct Receiver {
    stream: TcpStream,
    /// A partial frame, when one is pending (see [`split_frames`]).
    partial: Option<Box<Partial>>,
    check: Check,
    stats: Arc<Stats>,
    /// Pongs and a close reply not yet written.
    replies: Option<Box<Replies>>,
    shard: u8,
    /// Frames came along with the greeting: the first poll parses them before reading.
    leftover: bool,
    /// The server closed, or broke the protocol: the client ends once its replies are written.
    done: bool,
}

/// The bytes of a partial frame (a box of its own keeps a word, not a `Vec`, in every client).
struct Partial(Vec<u8>);

/// Replies being written, and how many bytes of them were.
struct Replies {
    bytes: Vec<u8>,
    written: usize,
}

impl Future for Receiver {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        let this = &mut *self;
        loop {
            // Replies go out before anything more is read, as the server sent their frames first.
            if let Some(replies) = this.replies.as_mut() {
                while replies.written < replies.bytes.len() {
                    match Pin::new(&mut this.stream).poll_write(cx, &replies.bytes[replies.written..]) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(0) | Err(_)) => return this.end(),
                        Poll::Ready(Ok(n)) => replies.written += n,
                    }
                }
                this.replies = None;
            }
            if this.done {
                return this.end();
            }
            let mut unread = this.partial.take().map_or_else(Vec::new, |partial| partial.0);
            let (check, stats, shard) = (&mut this.check, &*this.stats, usize::from(this.shard));
            let absorbed = if std::mem::take(&mut this.leftover) {
                absorb(&mut unread, None, check, stats, shard)
            } else {
                match poll_read_with(&mut this.stream, cx, |bytes| {
                    absorb(&mut unread, Some(bytes), check, stats, shard)
                }) {
                    Poll::Ready(Ok(Some(absorbed))) => absorbed,
                    Poll::Ready(_) => return this.end(),
                    Poll::Pending => {
                        this.partial = (!unread.is_empty()).then(|| Box::new(Partial(unread)));
                        return Poll::Pending;
                    }
                }
            };
            this.partial = (!unread.is_empty()).then(|| Box::new(Partial(unread)));
            this.done = absorbed.done;
            if !absorbed.replies.is_empty() {
                this.replies = Some(Box::new(Replies { bytes: absorbed.replies, written: 0 }));
            }
        }
    }
}

impl Receiver {
    fn end(&self) -> Poll<()> {
        ended(&self.stats);
        Poll::Ready(())
    }
}

/// What the frames of one read came to, besides the counts.
struct Absorbed {
    /// Pongs and a close reply, to write now.
    replies: Vec<u8>,
    /// The server closed, or broke the protocol: the client is done.
    done: bool,
}

/// Checks the frames of `unread` followed by `input` (when given; else the
/// complete frames of `unread` alone), adds them to the shard's counts and
/// histogram, and says what to reply.
fn absorb(unread: &mut Vec<u8>, input: Option<&[u8]>, check: &mut Check, stats: &Stats, shard: usize) -> Absorbed {
    let mut batch = Batch { check, stats, arrived_ns: None, delivered: 0, replies: Vec::new(), done: false };
    let mut on_frame = |frame: &Frame, payload: &[u8]| batch.frame(frame, payload);
    let parsed = match input {
        Some(input) => split_frames(unread, input, &mut on_frame),
        None => drain_unread(unread, &mut on_frame).map(drop),
    };
    if parsed.is_err() {
        batch.done = true;
    }
    if batch.delivered > 0 {
        stats.delivered[shard].0.fetch_add(batch.delivered, Ordering::Relaxed);
    }
    LATENCIES.with_borrow_mut(|latencies| flush_latencies(latencies, &stats.latency[shard]));
    Absorbed { replies: batch.replies, done: batch.done }
}

/// One read's frames as a receiving client handles them.
struct Batch<'a> {
    check: &'a mut Check,
    stats: &'a Stats,
    /// When the read's bytes arrived: taken at the first message.
    arrived_ns: Option<u64>,
    delivered: u64,
    replies: Vec<u8>,
    done: bool,
}

impl Batch<'_> {
    fn frame(&mut self, frame: &Frame, payload: &[u8]) -> Flow {
        match (frame.opcode, frame.fin) {
            (OP_TEXT | OP_BINARY, true) => self.message(payload),
            (OP_TEXT | OP_BINARY, false) => self.check.extra().fragments = Some(payload.to_vec()),
            (OP_CONTINUATION, fin) => {
                let Some(gathered) = self.check.extra.as_mut().and_then(|extra| extra.fragments.as_mut()) else {
                    // A continuation of nothing: the stream is broken.
                    self.done = true;
                    return Flow::Stop;
                };
                gathered.extend_from_slice(payload);
                if fin {
                    let whole = self.check.take_fragments();
                    self.message(&whole);
                }
            }
            (OP_PING, _) => push_control_frame(&mut self.replies, OP_PONG, payload),
            (OP_CLOSE, _) => {
                push_control_frame(&mut self.replies, OP_CLOSE, &payload[..payload.len().min(2)]);
                self.done = true;
                return Flow::Stop;
            }
            _ => {}
        }
        Flow::Go
    }

    fn message(&mut self, payload: &[u8]) {
        let arrived_ns = *self.arrived_ns.get_or_insert_with(message::now_ns);
        if let Some(us) = self.check.message(payload, arrived_ns, self.stats) {
            self.delivered += 1;
            LATENCIES.with_borrow_mut(|latencies| latencies.push(us));
        }
    }
}

/// When a client sends: from `began` until `deadline`; at a rate, its
/// writes start `phase` (0 to 1) of an interval late, so that clients do
/// not all write at once.
#[derive(Debug, Clone, Copy)]
pub struct Period {
    pub began: Instant,
    pub phase: f64,
    pub deadline: Instant,
}

/// The write half of a split client; clones share it.
#[derive(Clone)]
pub struct Writer(Arc<tokio::sync::Mutex<OwnedWriteHalf>>);

impl Writer {
    /// Writes `bytes` (whole frames) at once.
    pub async fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        self.0.lock().await.write_all(bytes).await
    }

    /// Sends a client-protocol command as a text frame.
    pub async fn command(&self, json: &str) -> std::io::Result<()> {
        self.write(&text_frame(json.as_bytes())).await
    }

    /// Sends a close frame with code 1000 (normal closure).
    pub async fn close(&self) -> std::io::Result<()> {
        self.write(&control_frame(OP_CLOSE, &1000u16.to_be_bytes())).await
    }
}

/// The read half of a split client.
pub struct Reader {
    read: OwnedReadHalf,
    /// Bytes read but not yet parsed: a partial frame, or the frames that
    /// came after the last text returned.
    unread: Vec<u8>,
    /// Where pings are answered.
    writer: Writer,
}

impl Reader {
    /// The next text (or binary) frame's payload, answering pings on the
    /// way; `None` once the connection has ended or closed.
    pub async fn next_text(&mut self) -> Option<String> {
        let mut fragments: Option<Vec<u8>> = None;
        loop {
            let mut text = None;
            let mut replies = Vec::new();
            let mut done = false;
            let mut on_frame = |frame: &Frame, payload: &[u8]| {
                match (frame.opcode, frame.fin) {
                    (OP_TEXT | OP_BINARY, true) => {
                        text = Some(String::from_utf8_lossy(payload).into_owned());
                        return Flow::Stop;
                    }
                    (OP_TEXT | OP_BINARY, false) => fragments = Some(payload.to_vec()),
                    (OP_CONTINUATION, fin) => {
                        let Some(gathered) = fragments.as_mut() else {
                            done = true;
                            return Flow::Stop;
                        };
                        gathered.extend_from_slice(payload);
                        if fin {
                            text = fragments.take().map(|whole| String::from_utf8_lossy(&whole).into_owned());
                            return Flow::Stop;
                        }
                    }
                    (OP_PING, _) => push_control_frame(&mut replies, OP_PONG, payload),
                    (OP_CLOSE, _) => {
                        push_control_frame(&mut replies, OP_CLOSE, &payload[..payload.len().min(2)]);
                        done = true;
                        return Flow::Stop;
                    }
                    _ => {}
                }
                Flow::Go
            };
            // Frames left from the last read come first; read only once they are all handled.
            let open = match drain_unread(&mut self.unread, &mut on_frame) {
                Err(_) => false,
                Ok(Flow::Stop) => true,
                Ok(Flow::Go) => {
                    let unread = &mut self.unread;
                    let read = read_with(&mut self.read, |bytes| split_frames(unread, bytes, &mut on_frame).is_ok());
                    read.await.ok().flatten().unwrap_or(false)
                }
            };
            if !replies.is_empty() && self.writer.write(&replies).await.is_err() {
                return None;
            }
            if let Some(text) = text {
                return Some(text);
            }
            if done || !open {
                return None;
            }
        }
    }

    /// Reads (and drops) whatever the server sends, answering its pings,
    /// until the connection ends.
    pub async fn answer_pings(mut self) {
        while self.next_text().await.is_some() {}
    }
}

/// What a frame handler tells the parser: go on with the next frame, or
/// stop there (the frames after it stay unread).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Go,
    Stop,
}

/// Waits until `io` has bytes, reads them into this thread's scratch buffer
/// and hands them to `take`, all in one poll: no other client of the thread
/// can use the buffer in between. `Ok(None)` at the end of the stream.
async fn read_with<R: AsyncRead + Unpin, T>(
    io: &mut R,
    mut take: impl FnMut(&[u8]) -> T,
) -> std::io::Result<Option<T>> {
    std::future::poll_fn(|cx| poll_read_with(io, cx, &mut take)).await
}

/// One poll of [`read_with`].
fn poll_read_with<R: AsyncRead + Unpin, T>(
    io: &mut R,
    cx: &mut std::task::Context<'_>,
    take: impl FnOnce(&[u8]) -> T,
) -> Poll<std::io::Result<Option<T>>> {
    SCRATCH.with_borrow_mut(|scratch| {
        let mut buf = ReadBuf::new(scratch);
        match Pin::new(io).poll_read(cx, &mut buf) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) if buf.filled().is_empty() => Poll::Ready(Ok(None)),
            Poll::Ready(Ok(())) => Poll::Ready(Ok(Some(take(buf.filled())))),
        }
    })
}

/// Reads what `io` has onto the end of `unread`; false at the end of the stream.
async fn fill<R: AsyncRead + Unpin>(io: &mut R, unread: &mut Vec<u8>) -> std::io::Result<bool> {
    Ok(read_with(io, |bytes| unread.extend_from_slice(bytes)).await?.is_some())
}

/// Drops the first `n` bytes of `unread`, and its allocation once nothing is left.
fn consume(unread: &mut Vec<u8>, n: usize) {
    if n >= unread.len() {
        *unread = Vec::new();
    } else if n > 0 {
        unread.drain(..n);
    }
}

/// Hands `on_frame` each complete frame at the start of `unread`, in order,
/// until it says stop, and removes them. Fails on a frame the client does
/// not accept.
fn drain_unread(unread: &mut Vec<u8>, on_frame: &mut impl FnMut(&Frame, &[u8]) -> Flow) -> anyhow::Result<Flow> {
    let mut at = 0;
    let mut flow = Flow::Go;
    while flow == Flow::Go {
        let Some(frame) = parse_frame(&unread[at..])? else { break };
        flow = on_frame(&frame, &unread[at + frame.payload.start..at + frame.payload.end]);
        at += frame.len;
    }
    consume(unread, at);
    Ok(flow)
}

/// Hands `on_frame` the frames of `unread` (at most one partial frame, once
/// [`drain_unread`] has run) followed by `input`, in order, until it says
/// stop: the partial frame is completed from the first bytes of `input`,
/// the rest of `input` is parsed where it lies. What is left (a partial
/// frame, or the frames after a stop) is copied to `unread`. Fails on a
/// frame the client does not accept.
fn split_frames(
    unread: &mut Vec<u8>,
    mut input: &[u8],
    on_frame: &mut impl FnMut(&Frame, &[u8]) -> Flow,
) -> anyhow::Result<()> {
    if !unread.is_empty() {
        if !complete(unread, &mut input)? {
            return Ok(());
        }
        let frame = parse_frame(unread)?.context("a completed frame does not parse")?;
        let flow = on_frame(&frame, &unread[frame.payload.clone()]);
        *unread = Vec::new();
        if flow == Flow::Stop {
            unread.extend_from_slice(input);
            return Ok(());
        }
    }
    let mut at = 0;
    while let Some(frame) = parse_frame(&input[at..])? {
        let flow = on_frame(&frame, &input[at + frame.payload.start..at + frame.payload.end]);
        at += frame.len;
        if flow == Flow::Stop {
            break;
        }
    }
    let rest = &input[at..];
    if !rest.is_empty() {
        // Room for the whole frame at once, when its header says how long it is.
        let want = frame_len(rest).map_or(0, |len| len.min(MAX_FRAME_BYTES)).max(rest.len());
        unread.reserve_exact(want);
        unread.extend_from_slice(rest);
    }
    Ok(())
}

/// Moves bytes from the front of `input` onto the partial frame in `unread`
/// until it is whole; tells whether it is.
fn complete(unread: &mut Vec<u8>, input: &mut &[u8]) -> anyhow::Result<bool> {
    loop {
        let want = wanted(unread)?;
        if unread.len() >= want {
            return Ok(true);
        }
        if input.is_empty() {
            return Ok(false);
        }
        unread.reserve_exact(want - unread.len());
        let (taken, rest) = input.split_at((want - unread.len()).min(input.len()));
        unread.extend_from_slice(taken);
        *input = rest;
    }
}

/// How many bytes the frame starting `buf` needs before the next step: its
/// header's length while the header is partial, then its whole length.
fn wanted(buf: &[u8]) -> anyhow::Result<usize> {
    let header = match buf.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    };
    if buf.len() < header {
        return Ok(header);
    }
    // Refuses, as soon as the header is there, what the client never accepts
    // (a masked frame, one over the limit).
    parse_frame(buf)?;
    frame_len(buf).context("frame too large")
}

/// Appends a masked text frame carrying event `seq`: `<seq>:<sent_ns>::`
/// padded with `x` to `payload` bytes (longer when the header does not fit).
fn push_event_frame(out: &mut Vec<u8>, seq: u64, payload: usize) {
    let mut header = [0u8; 48];
    let mut cursor = std::io::Cursor::new(&mut header[..]);
    let _ = write!(cursor, "{seq}:{}::", message::now_ns());
    let header_len = cursor.position() as usize;
    let len = payload.max(header_len).min(u16::MAX as usize);
    out.push(0x80 | OP_TEXT);
    if len <= 125 {
        out.push(0x80 | len as u8);
    } else {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    }
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&header[..header_len]);
    out.resize(out.len() + (len - header_len), b'x');
}

fn ended(stats: &Stats) {
    stats.closed.fetch_add(1, Ordering::Relaxed);
}

/// Adds `latencies` (µs) to the histogram `into` in one go, and empties them.
fn flush_latencies(latencies: &mut Vec<u64>, into: &Mutex<Option<Latency>>) {
    if latencies.is_empty() {
        return;
    }
    let mut shard = into.lock().unwrap_or_else(|e| e.into_inner());
    let histogram = shard.get_or_insert_with(Latency::new);
    for &us in latencies.iter() {
        histogram.record(us);
    }
    latencies.clear();
}

/// One client's checks on the messages it receives: the targets it accepts,
/// each with the sequence numbers seen on it.
struct Check {
    /// `<worker_id>/<connection_id>`.
    address: Box<[u8]>,
    /// Messages to `*`.
    broadcast: Order,
    /// Messages to the address.
    own: Order,
    /// What few clients need; boxed, so that an anonymous raw client pays a word for it.
    extra: Option<Box<Extra>>,
    /// Whether messages arrive as client-protocol pushes.
    json: bool,
}

/// The part of a client's checks most clients never need.
#[derive(Default)]
struct Extra {
    /// Its other targets (user id, groups, channels), each once.
    also: Vec<(Box<[u8]>, Order)>,
    /// The payloads so far of a fragmented message.
    fragments: Option<Vec<u8>>,
}

impl Check {
    fn new(address: Box<[u8]>, also: &[String], json: bool) -> Self {
        let mut check = Self { address, broadcast: Order::default(), own: Order::default(), extra: None, json };
        for target in also.iter().map(String::as_bytes) {
            // A target repeated (or equal to `*` or the address) is one stream.
            if check.order_of(target).is_none() {
                check.extra().also.push((target.into(), Order::default()));
            }
        }
        check
    }

    fn extra(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Box::default)
    }

    /// The fragments gathered so far, taken; the box goes once it holds nothing.
    fn take_fragments(&mut self) -> Vec<u8> {
        let Some(extra) = self.extra.as_mut() else { return Vec::new() };
        let whole = extra.fragments.take().unwrap_or_default();
        if extra.also.is_empty() {
            self.extra = None;
        }
        whole
    }

    /// The sequence numbers seen on `target`, if this client accepts it.
    fn order_of(&mut self, target: &[u8]) -> Option<&mut Order> {
        if target == message::BROADCAST.as_bytes() {
            Some(&mut self.broadcast)
        } else if *target == *self.address {
            Some(&mut self.own)
        } else {
            let extra = self.extra.as_mut()?;
            extra.also.iter_mut().find(|(t, _)| **t == *target).map(|(_, order)| order)
        }
    }

    /// Checks one message; when it is a first delivery to its target,
    /// returns its latency in µs.
    fn message(&mut self, payload: &[u8], arrived_ns: u64, stats: &Stats) -> Option<u64> {
        let payload = if self.json { message::pushed_text(payload) } else { Some(payload) };
        let accepted = payload.and_then(message::parse).and_then(|header| {
            let order = self.order_of(header.target)?;
            Some((header, order))
        });
        let Some((header, order)) = accepted else {
            // Someone else's message, or not a benchmark message at all.
            stats.misdelivered.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        match order.observe(header.seq) {
            Seen::Again => {
                stats.duplicated.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            Seen::Late => {
                stats.reordered.fetch_add(1, Ordering::Relaxed);
            }
            Seen::Next => {}
        }
        Some(arrived_ns.saturating_sub(header.sent_ns) / 1000)
    }

    /// How many targets it counts sequences on.
    #[cfg(test)]
    fn streams(&self) -> usize {
        2 + self.extra.as_ref().map_or(0, |extra| extra.also.len())
    }
}

/// How a sequence number relates to those seen before.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// Higher than any seen so far (gaps are remembered as missing).
    Next,
    /// A missing one, arriving after a higher one.
    Late,
    /// Seen before.
    Again,
}

/// The sequence numbers one client has seen on one target: the next
/// expected one and the gaps below it (boxed, and only while there are some:
/// in order, messages leave none).
#[derive(Debug, Default)]
struct Order {
    next: u64,
    missing: Option<Box<Gaps>>,
}

/// Sequence numbers skipped and not seen since (a word in every client
/// while boxed, where a `BTreeSet` is three).
#[derive(Debug, Default)]
struct Gaps(BTreeSet<u64>);

impl Order {
    fn observe(&mut self, seq: u64) -> Seen {
        if seq >= self.next {
            let from = self.next.max(seq.saturating_sub(MAX_MISSING as u64));
            if from < seq {
                let missing = &mut self.missing.get_or_insert_with(Box::default).0;
                missing.extend(from..seq);
                while missing.len() > MAX_MISSING {
                    missing.pop_first();
                }
            }
            self.next = seq.saturating_add(1);
            Seen::Next
        } else {
            let Some(Gaps(missing)) = self.missing.as_deref_mut() else { return Seen::Again };
            if !missing.remove(&seq) {
                return Seen::Again;
            }
            if missing.is_empty() {
                self.missing = None;
            }
            Seen::Late
        }
    }

    /// How many gaps it remembers.
    #[cfg(test)]
    fn missing(&self) -> usize {
        self.missing.as_ref().map_or(0, |missing| missing.0.len())
    }
}

/// One parsed frame header: where its payload is, relative to the frame start.
#[derive(Debug, PartialEq, Eq)]
struct Frame {
    fin: bool,
    opcode: u8,
    payload: std::ops::Range<usize>,
    /// Length of the whole frame.
    len: usize,
}

/// The length of the frame starting `buf`, once its header is complete.
fn frame_len(buf: &[u8]) -> Option<usize> {
    let (header, payload) = lengths(buf)?;
    header.checked_add(usize::try_from(payload).ok()?)
}

/// Header length and payload length of the frame starting `buf`, if its header is complete.
fn lengths(buf: &[u8]) -> Option<(usize, u64)> {
    let short = *buf.get(1)? & 0x7f;
    match short {
        126 => Some((4, u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)))),
        127 => Some((10, u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?))),
        n => Some((2, u64::from(n))),
    }
}

/// Parses the frame at the start of `buf`: `None` until it is complete.
fn parse_frame(buf: &[u8]) -> anyhow::Result<Option<Frame>> {
    let Some((header, payload_len)) = lengths(buf) else { return Ok(None) };
    if buf[1] & 0x80 != 0 {
        bail!("the server sent a masked frame");
    }
    let len = usize::try_from(payload_len).ok().and_then(|p| p.checked_add(header)).context("frame too large")?;
    if len > MAX_FRAME_BYTES {
        bail!("a frame of {len} bytes, over the limit of {MAX_FRAME_BYTES}");
    }
    if buf.len() < len {
        return Ok(None);
    }
    Ok(Some(Frame { fin: buf[0] & 0x80 != 0, opcode: buf[0] & 0x0f, payload: header..len, len }))
}

/// A masked client control frame (the zero mask leaves the payload as is).
fn control_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    push_control_frame(&mut frame, opcode, payload);
    frame
}

/// Appends a masked client control frame to `out`.
fn push_control_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    let payload = &payload[..payload.len().min(125)];
    out.extend_from_slice(&[0x80 | opcode, 0x80 | payload.len() as u8, 0, 0, 0, 0]);
    out.extend_from_slice(payload);
}

/// A masked text frame from the client (the zero mask leaves the payload as it is).
fn text_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x80 | OP_TEXT];
    match payload.len() {
        len @ 0..=125 => frame.push(0x80 | len as u8),
        len => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len.min(u16::MAX as usize) as u16).to_be_bytes());
        }
    }
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(&payload[..payload.len().min(u16::MAX as usize)]);
    frame
}

fn describe_close(payload: &[u8]) -> String {
    match payload {
        [a, b, reason @ ..] => format!("code {} {}", u16::from_be_bytes([*a, *b]), String::from_utf8_lossy(reason)),
        _ => "no code".into(),
    }
}

/// `<worker_id>/<connection_id>` from the text (`Worker ID:W Connection ID:C
/// connected`) or JSON greeting, or the client protocol's `connected` push.
fn address_from_greeting(greeting: &str) -> Option<String> {
    if greeting.starts_with('{') {
        let value: serde_json::Value = serde_json::from_str(greeting).ok()?;
        let fields = value.get("connected").unwrap_or(&value);
        return Some(format!("{}/{}", fields["worker_id"].as_str()?, fields["connection_id"].as_str()?));
    }
    let rest = greeting.strip_prefix("Worker ID:")?;
    let (worker, rest) = rest.split_once(" Connection ID:")?;
    let connection = rest.strip_suffix(" connected")?;
    Some(format!("{worker}/{connection}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greetings_give_the_address() {
        assert_eq!(address_from_greeting("Worker ID:gw0 Connection ID:17 connected").as_deref(), Some("gw0/17"));
        let json = r#"{"type":"connected","worker_id":"a.b","connection_id":"3"}"#;
        assert_eq!(address_from_greeting(json).as_deref(), Some("a.b/3"));
        let push = r#"{"connected":{"worker_id":"a.b","connection_id":"4","user_id":""}}"#;
        assert_eq!(address_from_greeting(push).as_deref(), Some("a.b/4"));
        assert_eq!(address_from_greeting("hello"), None);
    }

    #[test]
    fn frames_parse_once_complete() {
        let mut frame = vec![0x81, 126, 0x01, 0x00];
        frame.extend(std::iter::repeat_n(b'a', 256));
        assert_eq!(parse_frame(&frame[..3]).unwrap(), None);
        assert_eq!(frame_len(&frame[..4]), Some(260));
        assert_eq!(parse_frame(&frame[..259]).unwrap(), None);
        let parsed = parse_frame(&frame).unwrap().unwrap();
        assert_eq!(parsed, Frame { fin: true, opcode: OP_TEXT, payload: 4..260, len: 260 });
        let short = [0x02, 3, 1, 2, 3];
        assert_eq!(
            parse_frame(&short).unwrap().unwrap(),
            Frame { fin: false, opcode: OP_BINARY, payload: 2..5, len: 5 }
        );
        assert!(parse_frame(&[0x81, 0x85, 0, 0, 0, 0, 1]).is_err());
    }

    #[test]
    fn sequence_numbers_tell_late_and_repeated_messages_apart() {
        let mut order = Order::default();
        assert_eq!(order.observe(0), Seen::Next);
        assert_eq!(order.observe(2), Seen::Next);
        assert_eq!(order.observe(1), Seen::Late);
        assert!(order.missing.is_none(), "the gaps are freed once filled");
        assert_eq!(order.observe(1), Seen::Again);
        assert_eq!(order.observe(2), Seen::Again);
        assert_eq!(order.observe(3), Seen::Next);
        order.observe(1_000_000);
        assert_eq!(order.missing(), MAX_MISSING);
        assert_eq!(order.observe(999_999), Seen::Late);
        assert_eq!(order.observe(5), Seen::Again, "too old to remember");
    }

    /// Checks `payload` the way a receiving client does, recording its latency in `latencies`.
    fn check_one(check: &mut Check, payload: &str, stats: &Stats, latencies: &mut Vec<u64>) -> u64 {
        match check.message(payload.as_bytes(), message::now_ns(), stats) {
            Some(us) => {
                latencies.push(us);
                1
            }
            None => 0,
        }
    }

    #[test]
    fn checks_count_misdeliveries_and_latency() {
        let stats = Stats::new();
        let mut check = Check::new((*b"gw0/1").into(), &[], false);
        assert!(check.extra.is_none(), "an anonymous raw client boxes nothing");
        let mut latencies = Vec::new();
        let mut one = |payload: &str| check_one(&mut check, payload, &stats, &mut latencies);
        assert_eq!(one(&message::encode(0, "gw0/1", 32)), 1);
        assert_eq!(one(&message::encode(0, "gw0/2", 32)), 0);
        assert_eq!(one(&message::encode(0, "*", 32)), 1);
        assert_eq!(one(&message::encode(0, "*", 32)), 0);
        assert_eq!(one("not ours"), 0);
        assert_eq!(one(&message::encode(0, "u1", 32)), 0);
        flush_latencies(&mut latencies, &stats.latency[0]);
        assert!(latencies.is_empty());
        let totals = stats.totals();
        assert_eq!((totals.misdelivered, totals.duplicated, totals.latency.count()), (3, 1, 2));
    }

    #[test]
    fn a_logged_in_client_counts_each_of_its_targets_on_its_own() {
        let stats = Stats::new();
        let also = ["u1", "room", "room", "*", "gw0/1"].map(String::from);
        let mut check = Check::new((*b"gw0/1").into(), &also, false);
        assert_eq!(check.streams(), 4, "a repeated target is one stream");
        let mut latencies = Vec::new();
        let mut one = |payload: &str| check_one(&mut check, payload, &stats, &mut latencies);
        for target in ["*", "gw0/1", "u1", "room"] {
            assert_eq!(one(&message::encode(0, target, 32)), 1, "{target}");
        }
        assert_eq!(one(&message::encode(1, "room", 32)), 1);
        assert_eq!(one(&message::encode(1, "room", 32)), 0);
        assert_eq!(one(&message::encode(0, "u2", 32)), 0);
        assert_eq!(one(&message::encode(0, "other-room", 32)), 0);
        let totals = stats.totals();
        assert_eq!((totals.misdelivered, totals.duplicated, totals.reordered), (2, 1, 0));
    }

    #[test]
    fn a_client_protocol_client_finds_the_payload_in_the_push() {
        let stats = Stats::new();
        let mut check = Check::new((*b"gw0/1").into(), &[message::channel_label("bench:a")], true);
        let push = |target: &str, seq| {
            let payload = message::encode(seq, target, 40);
            format!(r#"{{"publication":{{"channel":"bench:a","content":{{"text":"{payload}"}}}}}}"#)
        };
        let mut latencies = Vec::new();
        let mut one = |payload: &str| check_one(&mut check, payload, &stats, &mut latencies);
        assert_eq!(one(&push("bench~a", 0)), 1);
        assert_eq!(one(&push("bench~a", 2)), 1);
        assert_eq!(one(&push("bench~a", 1)), 1, "late, but a first delivery");
        assert_eq!(one(&push("bench~b", 0)), 0);
        let totals = stats.totals();
        assert_eq!((totals.misdelivered, totals.reordered), (1, 1));
    }

    /// Frames as `(fin, opcode, payload)`, from the server (unmasked).
    fn server_frames(frames: &[(bool, u8, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (fin, opcode, payload) in frames {
            out.push(if *fin { 0x80 } else { 0 } | opcode);
            match payload.len() {
                len @ 0..=125 => out.push(len as u8),
                len @ 126..=0xffff => {
                    out.push(126);
                    out.extend_from_slice(&(len as u16).to_be_bytes());
                }
                len => {
                    out.push(127);
                    out.extend_from_slice(&(len as u64).to_be_bytes());
                }
            }
            out.extend_from_slice(payload);
        }
        out
    }

    #[test]
    fn frames_split_anywhere_come_out_whole_and_partial_ones_are_freed_once_whole() {
        let frames = vec![
            (true, OP_TEXT, b"short".to_vec()),
            (true, OP_BINARY, vec![7; 300]),
            (true, OP_PING, b"p".to_vec()),
            (true, OP_TEXT, vec![b'y'; 70_000]),
            (true, OP_TEXT, Vec::new()),
        ];
        let bytes = server_frames(&frames);
        for chunk in [1, 2, 3, 5, 64, 4096, bytes.len()] {
            let mut unread = Vec::new();
            let mut seen = Vec::new();
            for input in bytes.chunks(chunk) {
                let mut on_frame = |frame: &Frame, payload: &[u8]| {
                    seen.push((frame.fin, frame.opcode, payload.to_vec()));
                    Flow::Go
                };
                split_frames(&mut unread, input, &mut on_frame).unwrap();
                if unread.is_empty() {
                    assert_eq!(unread.capacity(), 0, "nothing pending, nothing held (chunks of {chunk})");
                }
            }
            assert_eq!(seen, frames, "chunks of {chunk}");
            assert!(unread.is_empty());
        }
    }

    #[test]
    fn frames_after_a_stop_wait_in_unread_until_drained() {
        let bytes = server_frames(&[(true, OP_TEXT, b"a".to_vec()), (true, OP_TEXT, b"b".to_vec())]);
        let mut unread = Vec::new();
        let mut seen = Vec::new();
        let mut stop_after_one = |_: &Frame, payload: &[u8]| {
            seen.push(payload.to_vec());
            Flow::Stop
        };
        split_frames(&mut unread, &bytes[..5], &mut stop_after_one).unwrap();
        assert_eq!(unread.len(), 2, "b's frame, partial");
        split_frames(&mut unread, &bytes[5..], &mut stop_after_one).unwrap();
        assert!(unread.is_empty());
        let mut unread = Vec::new();
        split_frames(&mut unread, &bytes, &mut stop_after_one).unwrap();
        assert_eq!(drain_unread(&mut unread, &mut stop_after_one).unwrap(), Flow::Stop);
        assert_eq!((unread.len(), unread.capacity()), (0, 0));
        assert_eq!(seen, [b"a", b"b", b"a", b"b"]);
    }

    #[test]
    fn a_frame_over_the_limit_or_masked_is_refused_from_its_header() {
        let mut header = vec![0x81, 127];
        header.extend_from_slice(&(MAX_FRAME_BYTES as u64).to_be_bytes());
        let mut ignore = |_: &Frame, _: &[u8]| Flow::Go;
        assert!(split_frames(&mut Vec::new(), &header, &mut ignore).is_err());
        let mut unread = Vec::new();
        split_frames(&mut unread, &header[..5], &mut ignore).unwrap();
        assert!(split_frames(&mut unread, &header[5..], &mut ignore).is_err());
        assert!(unread.capacity() < 64, "nothing reserved for it");
        let mut unread = vec![0x81];
        assert!(split_frames(&mut unread, &[0x81], &mut ignore).is_err(), "masked");
    }

    /// A server that upgrades one connection and greets it as `gw0/1`, then
    /// sends `script` in pieces of `piece` bytes (each its own segment), and
    /// returns what the client sent back until it hung up.
    async fn fake_server(script: Vec<u8>, piece: usize) -> (WsUrl, tokio::task::JoinHandle<Vec<u8>>) {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = WsUrl { addr: listener.local_addr().unwrap(), path: "/".into() };
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            socket.set_nodelay(true).unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                head.push(socket.read_u8().await.unwrap());
            }
            let mut out = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n".to_vec();
            out.extend(server_frames(&[(true, OP_TEXT, b"Worker ID:gw0 Connection ID:1 connected".to_vec())]));
            out.extend(script);
            for piece in out.chunks(piece) {
                socket.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let mut back = Vec::new();
            let _ = socket.read_to_end(&mut back).await;
            back
        });
        (url, server)
    }

    #[tokio::test]
    async fn a_receiving_client_checks_every_message_answers_pings_and_closes() {
        let text = |seq, target: &str| (true, OP_TEXT, message::encode(seq, target, 48).into_bytes());
        let fragmented = message::encode(1, "*", 48).into_bytes();
        let script = server_frames(&[
            text(0, "*"),
            text(0, "gw0/1"),
            (true, OP_PING, b"hi".to_vec()),
            (false, OP_TEXT, fragmented[..10].to_vec()),
            (false, OP_CONTINUATION, fragmented[10..20].to_vec()),
            (true, OP_CONTINUATION, fragmented[20..].to_vec()),
            text(1, "*"),
            text(0, "gw0/2"),
            text(3, "*"),
            text(2, "*"),
            (true, OP_CLOSE, vec![0x03, 0xe8, b'b', b'y', b'e']),
        ]);
        for piece in [3, 1000] {
            let (url, server) = fake_server(script.clone(), piece).await;
            let client = connect(&url, Ipv4Addr::LOCALHOST, None, &[]).await.unwrap();
            assert_eq!(client.address, "gw0/1");
            let stats = Arc::new(Stats::new());
            client.receive(stats.clone(), 21).await;
            let totals = stats.totals();
            assert_eq!(
                (totals.delivered, totals.duplicated, totals.misdelivered, totals.reordered, totals.closed),
                (5, 1, 1, 1, 1),
                "in pieces of {piece}"
            );
            assert_eq!(totals.latency.count(), 5);
            let mut expected = control_frame(OP_PONG, b"hi");
            expected.extend(control_frame(OP_CLOSE, &[0x03, 0xe8]));
            let back = server.await.unwrap();
            assert!(back.ends_with(&expected), "pong then close reply, got {back:?}");
        }
    }

    /// The most a receiving client's future may take. Tokio's task adds 104
    /// bytes (a 32-byte header, the scheduler and task id, the stage's tag, a
    /// 48-byte trailer, as of tokio 1.54) and aligns to 128: up to this size
    /// the task fits a 256-byte slot of the bench's allocator (see `alloc`);
    /// past it, glibc's 448-byte blocks for aligned memory.
    const RECEIVER_FUTURE_BYTES: usize = 152;

    #[tokio::test]
    async fn a_receiving_client_is_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let address = "gw0/1796239878472001".to_owned();
        let client = Client { stream, unread: Vec::new(), address, also: Vec::new(), json: false };
        let receiving = client.receive(Arc::new(Stats::new()), 0);
        let size = std::mem::size_of_val(&receiving);
        assert!(size <= RECEIVER_FUTURE_BYTES, "a receiving client's future takes {size} bytes");
    }

    #[test]
    fn event_frames_are_masked_text_frames_of_the_payload_size() {
        let mut out = Vec::new();
        push_event_frame(&mut out, 7, 32);
        push_event_frame(&mut out, 8, 200);
        let first = parse_client_frame(&out);
        assert_eq!(first.len(), 32);
        let header = message::parse(first).unwrap();
        assert_eq!((header.seq, header.target), (7, &b""[..]));
        let second = parse_client_frame(&out[6 + 32..]);
        assert_eq!((second.len(), message::parse(second).unwrap().seq), (200, 8));
        let mut short = Vec::new();
        push_event_frame(&mut short, 123_456, 4);
        assert!(message::parse(parse_client_frame(&short)).is_some(), "a header longer than the size is kept");
    }

    /// The payload of the masked (zero-mask) client frame at the start of `frame`.
    fn parse_client_frame(frame: &[u8]) -> &[u8] {
        let (header, len) = match frame[1] & 0x7f {
            126 => (4, usize::from(u16::from_be_bytes([frame[2], frame[3]]))),
            n => (2, usize::from(n)),
        };
        &frame[header + 4..header + 4 + len]
    }

    #[test]
    fn control_frames_are_masked() {
        assert_eq!(control_frame(OP_PONG, b"hi"), [0x8a, 0x82, 0, 0, 0, 0, b'h', b'i']);
        assert_eq!(text_frame(b"hi"), [0x81, 0x82, 0, 0, 0, 0, b'h', b'i']);
        assert_eq!(text_frame(&[b'x'; 200])[..4], [0x81, 0xfe, 0, 200]);
    }
}
