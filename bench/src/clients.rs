//! The load generator's WebSocket clients and the statistics they add to.
//!
//! The client is raw on purpose: it writes the HTTP upgrade itself and parses
//! server frames in place in one small buffer, so a delivery costs no
//! allocation and the load generator stays cheaper than the server it
//! measures. It binds a chosen loopback source address before connecting
//! (the ephemeral ports of one source address run out near 28k connections).
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

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
/// Initial receive buffer per client; it grows for frames that do not fit.
const BUFFER_BYTES: usize = 4096;
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

#[repr(align(64))]
#[derive(Default)]
struct PaddedCounter(AtomicU64);

/// What every client of one load-generator process has seen.
pub struct Stats {
    delivered: [PaddedCounter; SHARDS],
    sent: [PaddedCounter; SHARDS],
    latency: Vec<Mutex<Latency>>,
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
            latency: (0..SHARDS).map(|_| Mutex::new(Latency::new())).collect(),
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
            latency.merge(&shard.lock().unwrap_or_else(|e| e.into_inner()));
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
    buf: Vec<u8>,
    start: usize,
    end: usize,
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
    let mut client =
        Client { stream, buf: vec![0; BUFFER_BYTES], start: 0, end: 0, address: String::new(), also: Vec::new(), json };
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
            match parse_frame(&self.buf[self.start..self.end])? {
                Some(frame) => {
                    self.start += frame.len;
                    if frame.opcode == OP_CLOSE {
                        return Ok(());
                    }
                }
                None => {
                    self.reserve(BUFFER_BYTES);
                    match self.stream.read(&mut self.buf[self.end..]).await? {
                        0 => return Ok(()),
                        n => self.end += n,
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
        let reader = Reader { read, buf: self.buf, start: self.start, end: self.end, writer: writer.clone() };
        (reader, writer)
    }

    /// Makes the client accept messages to `user` and to each of `groups`.
    pub fn also_accept(&mut self, user: String, groups: Vec<String>) {
        self.also.push(user);
        self.also.extend(groups);
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
            if let Some(i) = self.buf[..self.end].windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            self.fill().await.context("reading the upgrade response")?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_len]);
        let status = head.lines().next().unwrap_or_default();
        if !status.starts_with("HTTP/1.1 101") {
            bail!("upgrade refused: {status}");
        }
        self.start = head_len;
        Ok(())
    }

    /// Reads frames until the next text frame (the greeting, or a reply).
    async fn greeting(&mut self) -> anyhow::Result<String> {
        loop {
            match parse_frame(&self.buf[self.start..self.end])? {
                Some(frame) => {
                    let payload = &self.buf[self.start + frame.payload.start..self.start + frame.payload.end];
                    self.start += frame.len;
                    match frame.opcode {
                        OP_TEXT => return Ok(String::from_utf8_lossy(payload).into_owned()),
                        OP_CLOSE => bail!("closed before the greeting: {}", describe_close(payload)),
                        _ => {}
                    }
                }
                None => self.fill().await.context("reading the greeting")?,
            }
        }
    }

    /// Reads more bytes after the unread ones. Fails on end of stream.
    async fn fill(&mut self) -> anyhow::Result<()> {
        self.reserve(BUFFER_BYTES);
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            bail!("connection closed");
        }
        self.end += n;
        Ok(())
    }

    /// Makes room for at least `need` unread bytes plus some free space.
    fn reserve(&mut self, need: usize) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let want = need.max(self.end + 1024);
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
    }

    /// Receives messages until the connection ends, adding to `stats`.
    pub async fn receive(mut self, stats: &Stats, shard: usize) {
        let shard = shard % SHARDS;
        let mut check = Check::new(&self.address, &self.also, self.json);
        let mut fragments: Option<Vec<u8>> = None;
        let mut arrived_ns = message::now_ns();
        loop {
            let mut delivered = 0;
            let need = loop {
                let frame = match parse_frame(&self.buf[self.start..self.end]) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break frame_len(&self.buf[self.start..self.end]).unwrap_or(0),
                    Err(_) => return ended(stats),
                };
                let payload = self.start + frame.payload.start..self.start + frame.payload.end;
                self.start += frame.len;
                let payload = &self.buf[payload];
                match (frame.opcode, frame.fin) {
                    (OP_TEXT | OP_BINARY, true) => delivered += check.message(payload, arrived_ns, stats),
                    (OP_TEXT | OP_BINARY, false) => fragments = Some(payload.to_vec()),
                    (OP_CONTINUATION, fin) => {
                        let Some(gathered) = fragments.as_mut() else { return ended(stats) };
                        gathered.extend_from_slice(payload);
                        if fin {
                            let whole = fragments.take().unwrap_or_default();
                            delivered += check.message(&whole, arrived_ns, stats);
                        }
                    }
                    (OP_PING, _) => {
                        let reply = control_frame(OP_PONG, payload);
                        if self.stream.write_all(&reply).await.is_err() {
                            return ended(stats);
                        }
                    }
                    (OP_CLOSE, _) => {
                        let reply = control_frame(OP_CLOSE, &payload[..payload.len().min(2)]);
                        let _ = self.stream.write_all(&reply).await;
                        return ended(stats);
                    }
                    _ => {}
                }
            };
            if delivered > 0 {
                stats.delivered[shard].0.fetch_add(delivered, Ordering::Relaxed);
            }
            check.flush_latencies(&stats.latency[shard]);
            self.reserve(need);
            match self.stream.read(&mut self.buf[self.end..]).await {
                Ok(0) | Err(_) => return ended(stats),
                Ok(n) => self.end += n,
            }
            arrived_ns = message::now_ns();
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
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Where pings are answered.
    writer: Writer,
}

impl Reader {
    /// The next text (or binary) frame's payload, answering pings on the
    /// way; `None` once the connection has ended or closed.
    pub async fn next_text(&mut self) -> Option<String> {
        let mut fragments: Option<Vec<u8>> = None;
        loop {
            let frame = match parse_frame(&self.buf[self.start..self.end]) {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    let need = frame_len(&self.buf[self.start..self.end]).unwrap_or(0);
                    self.reserve(need);
                    match self.read.read(&mut self.buf[self.end..]).await {
                        Ok(0) | Err(_) => return None,
                        Ok(n) => self.end += n,
                    }
                    continue;
                }
                Err(_) => return None,
            };
            let payload = self.start + frame.payload.start..self.start + frame.payload.end;
            self.start += frame.len;
            let payload = &self.buf[payload];
            match (frame.opcode, frame.fin) {
                (OP_TEXT | OP_BINARY, true) => return Some(String::from_utf8_lossy(payload).into_owned()),
                (OP_TEXT | OP_BINARY, false) => fragments = Some(payload.to_vec()),
                (OP_CONTINUATION, fin) => {
                    let gathered = fragments.as_mut()?;
                    gathered.extend_from_slice(payload);
                    if fin {
                        return Some(String::from_utf8_lossy(&fragments.take()?).into_owned());
                    }
                }
                (OP_PING, _) => {
                    let pong = control_frame(OP_PONG, payload);
                    if self.writer.write(&pong).await.is_err() {
                        return None;
                    }
                }
                (OP_CLOSE, _) => {
                    let reply = control_frame(OP_CLOSE, &payload[..payload.len().min(2)]);
                    let _ = self.writer.write(&reply).await;
                    return None;
                }
                _ => {}
            }
        }
    }

    /// Reads (and drops) whatever the server sends, answering its pings,
    /// until the connection ends.
    pub async fn answer_pings(mut self) {
        while self.next_text().await.is_some() {}
    }

    /// As [`Client::reserve`].
    fn reserve(&mut self, need: usize) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let want = need.max(self.end + 1024).max(BUFFER_BYTES);
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
    }
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

/// One client's checks on the messages it receives.
struct Check {
    /// The targets this client accepts, each with the sequence numbers seen
    /// on it: `*`, its address, then its user id and groups, if any.
    streams: Vec<(Box<[u8]>, Order)>,
    /// Latencies (µs) of the current read, recorded in one go.
    latencies: Vec<u64>,
    /// Whether messages arrive as client-protocol pushes.
    json: bool,
}

impl Check {
    fn new(address: &str, also: &[String], json: bool) -> Self {
        let targets = [message::BROADCAST, address].into_iter().chain(also.iter().map(String::as_str));
        let mut streams: Vec<(Box<[u8]>, Order)> = Vec::with_capacity(2 + also.len());
        for target in targets {
            if !streams.iter().any(|(t, _)| **t == *target.as_bytes()) {
                streams.push((target.as_bytes().into(), Order::default()));
            }
        }
        Self { streams, latencies: Vec::new(), json }
    }

    /// Checks one message; returns 1 when it is a first delivery to its target.
    fn message(&mut self, payload: &[u8], arrived_ns: u64, stats: &Stats) -> u64 {
        let payload = if self.json { message::pushed_text(payload) } else { Some(payload) };
        let accepted = payload.and_then(message::parse).and_then(|header| {
            let (_, order) = self.streams.iter_mut().find(|(target, _)| **target == *header.target)?;
            Some((header, order))
        });
        let Some((header, order)) = accepted else {
            // Someone else's message, or not a benchmark message at all.
            stats.misdelivered.fetch_add(1, Ordering::Relaxed);
            return 0;
        };
        match order.observe(header.seq) {
            Seen::Again => {
                stats.duplicated.fetch_add(1, Ordering::Relaxed);
                return 0;
            }
            Seen::Late => {
                stats.reordered.fetch_add(1, Ordering::Relaxed);
            }
            Seen::Next => {}
        }
        self.latencies.push(arrived_ns.saturating_sub(header.sent_ns) / 1000);
        1
    }

    fn flush_latencies(&mut self, into: &Mutex<Latency>) {
        if self.latencies.is_empty() {
            return;
        }
        let mut histogram = into.lock().unwrap_or_else(|e| e.into_inner());
        for &us in &self.latencies {
            histogram.record(us);
        }
        self.latencies.clear();
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

/// The sequence numbers one client has seen: the next expected one and the
/// gaps below it.
#[derive(Debug, Default)]
struct Order {
    next: u64,
    missing: BTreeSet<u64>,
}

impl Order {
    fn observe(&mut self, seq: u64) -> Seen {
        if seq >= self.next {
            let from = self.next.max(seq.saturating_sub(MAX_MISSING as u64));
            self.missing.extend(from..seq);
            while self.missing.len() > MAX_MISSING {
                self.missing.pop_first();
            }
            self.next = seq + 1;
            Seen::Next
        } else if self.missing.remove(&seq) {
            Seen::Late
        } else {
            Seen::Again
        }
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
    if buf.len() < len {
        return Ok(None);
    }
    Ok(Some(Frame { fin: buf[0] & 0x80 != 0, opcode: buf[0] & 0x0f, payload: header..len, len }))
}

/// A masked client control frame (the zero mask leaves the payload as is).
fn control_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x80 | opcode, 0x80 | payload.len().min(125) as u8, 0, 0, 0, 0];
    frame.extend_from_slice(&payload[..payload.len().min(125)]);
    frame
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
        assert_eq!(order.observe(1), Seen::Again);
        assert_eq!(order.observe(2), Seen::Again);
        assert_eq!(order.observe(3), Seen::Next);
        order.observe(1_000_000);
        assert_eq!(order.missing.len(), MAX_MISSING);
    }

    #[test]
    fn checks_count_misdeliveries_and_latency() {
        let stats = Stats::new();
        let mut check = Check::new("gw0/1", &[], false);
        let now = message::now_ns();
        assert_eq!(check.message(message::encode(0, "gw0/1", 32).as_bytes(), now, &stats), 1);
        assert_eq!(check.message(message::encode(0, "gw0/2", 32).as_bytes(), now, &stats), 0);
        assert_eq!(check.message(message::encode(0, "*", 32).as_bytes(), now, &stats), 1);
        assert_eq!(check.message(message::encode(0, "*", 32).as_bytes(), now, &stats), 0);
        assert_eq!(check.message(b"not ours", now, &stats), 0);
        assert_eq!(check.message(message::encode(0, "u1", 32).as_bytes(), now, &stats), 0);
        check.flush_latencies(&stats.latency[0]);
        let totals = stats.totals();
        assert_eq!((totals.misdelivered, totals.duplicated, totals.latency.count()), (3, 1, 2));
    }

    #[test]
    fn a_logged_in_client_counts_each_of_its_targets_on_its_own() {
        let stats = Stats::new();
        let mut check = Check::new("gw0/1", &["u1".into(), "room".into(), "room".into()], false);
        assert_eq!(check.streams.len(), 4, "a repeated target is one stream");
        let now = message::now_ns();
        for target in ["*", "gw0/1", "u1", "room"] {
            assert_eq!(check.message(message::encode(0, target, 32).as_bytes(), now, &stats), 1, "{target}");
        }
        assert_eq!(check.message(message::encode(1, "room", 32).as_bytes(), now, &stats), 1);
        assert_eq!(check.message(message::encode(1, "room", 32).as_bytes(), now, &stats), 0);
        assert_eq!(check.message(message::encode(0, "u2", 32).as_bytes(), now, &stats), 0);
        assert_eq!(check.message(message::encode(0, "other-room", 32).as_bytes(), now, &stats), 0);
        let totals = stats.totals();
        assert_eq!((totals.misdelivered, totals.duplicated, totals.reordered), (2, 1, 0));
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
