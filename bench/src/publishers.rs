//! Publishers: the ways a message reaches herald (gRPC `PublishBatch`, gRPC
//! unary `Publish`, the HTTP classic `GET /?content=…`, the HTTP JSON
//! `POST /v1/publish`, or `wrk` for the HTTP throughput figure) and the loops
//! that drive them: paced at a fixed rate in publish order, or flat out over
//! several concurrent lanes with a window on undelivered messages so the
//! publisher cannot run away from the clients.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::ValueEnum;
use herald_proto::v1::broker_service_client::BrokerServiceClient;
use herald_proto::v1::{
    Broadcast, ConnectionAddress, Content, PublishBatchRequest, PublishRequest, Target, content, publish_result, target,
};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

use crate::fleet::Progress;
use crate::http1;
use crate::message;
use crate::procs::Endpoints;
use crate::stats::{Latency, Percentiles};

/// How messages are published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Via {
    /// gRPC `PublishBatch`, several messages per call.
    GrpcBatch,
    /// gRPC unary `Publish`, one message per call.
    Grpc,
    /// The HTTP gateway's classic `GET /?content=…`, keep-alive.
    Http,
    /// The HTTP gateway's JSON `POST /v1/publish`, keep-alive.
    HttpJson,
}

impl Via {
    /// Whether this goes through the HTTP gateway.
    pub fn is_http(self) -> bool {
        matches!(self, Self::Http | Self::HttpJson)
    }
}

/// One connection's address, as its greeting told it.
#[derive(Debug, Clone)]
pub struct Address {
    pub worker_id: String,
    pub connection_id: String,
    /// `<worker_id>/<connection_id>`, the target field of a payload.
    pub joined: String,
}

impl Address {
    pub fn parse(joined: &str) -> anyhow::Result<Self> {
        let (worker_id, connection_id) =
            joined.split_once('/').with_context(|| format!("{joined:?} is not worker/connection"))?;
        Ok(Self { worker_id: worker_id.into(), connection_id: connection_id.into(), joined: joined.into() })
    }
}

/// Who a message goes to.
#[derive(Debug, Clone)]
pub enum To {
    /// Every connection.
    Everyone,
    /// One connection.
    Connection(Arc<Address>),
    /// Every connection of a user.
    User(Arc<str>),
    /// Every member of a group.
    Group(Arc<str>),
    /// The subscribers of a client channel, and the target field its
    /// messages carry ([`message::channel_label`]).
    Channel { name: Arc<str>, label: Arc<str> },
}

impl To {
    /// The subscribers of client channel `name`.
    pub fn channel(name: &str) -> Self {
        Self::Channel { name: Arc::from(name), label: Arc::from(message::channel_label(name)) }
    }

    /// The target field of a payload to this target: what a client that
    /// should get it recognizes.
    pub fn label(&self) -> &str {
        match self {
            Self::Everyone => message::BROADCAST,
            Self::Connection(address) => &address.joined,
            Self::User(name) | Self::Group(name) => name,
            Self::Channel { label, .. } => label,
        }
    }
}

/// One message to publish.
pub struct Msg {
    pub to: To,
    pub payload: String,
    /// An idempotency key, for the gRPC paths (empty: none).
    pub key: String,
}

/// Makes the messages of a run, stamping each as it is made.
pub trait Source: Send {
    fn next(&mut self) -> Msg;
}

/// A source kept across phases that publish to the same clients: its
/// numbering goes on where the previous phase left it (clients count a
/// sequence number seen before as a duplicate).
impl<S: Source> Source for Arc<Mutex<S>> {
    fn next(&mut self) -> Msg {
        self.lock().unwrap_or_else(|e| e.into_inner()).next()
    }
}

/// Broadcasts numbered 0, 1, 2, …
pub struct Broadcasts {
    pub seq: u64,
    pub payload_bytes: usize,
    /// When set, each message carries a key unique to it: `<prefix>-<seq>`.
    pub key_prefix: Option<String>,
}

impl Source for Broadcasts {
    fn next(&mut self) -> Msg {
        let payload = message::encode(self.seq, message::BROADCAST, self.payload_bytes);
        let key = self.key_prefix.as_ref().map_or_else(String::new, |prefix| format!("{prefix}-{}", self.seq));
        self.seq += 1;
        Msg { to: To::Everyone, payload, key }
    }
}

/// What a series of publishes achieved.
#[derive(Debug, Default)]
pub struct Tally {
    pub accepted: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    /// Time each request took to be answered.
    pub request_latency: Latency,
}

impl Tally {
    fn error(&mut self, count: u64, reason: impl FnOnce() -> String) {
        self.errors += count;
        if self.first_error.is_none() {
            self.first_error = Some(reason());
        }
    }

    fn add(&mut self, other: Tally) {
        self.accepted += other.accepted;
        if other.errors > 0 {
            self.error(other.errors, || other.first_error.unwrap_or_default());
        }
        self.request_latency.merge(&other.request_latency);
    }

    pub fn rate(&self) -> f64 {
        self.accepted as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Messages to targets picked at random among given ones, numbered per target.
pub struct RandomTargets {
    targets: Vec<To>,
    seqs: Vec<u64>,
    rng: u64,
    payload_bytes: usize,
}

impl RandomTargets {
    pub fn new(targets: Vec<To>, payload_bytes: usize) -> anyhow::Result<Self> {
        if targets.is_empty() {
            bail!("no target to publish to");
        }
        Ok(Self { seqs: vec![0; targets.len()], targets, rng: message::now_ns() | 1, payload_bytes })
    }
}

impl Source for RandomTargets {
    fn next(&mut self) -> Msg {
        self.rng = xorshift(self.rng);
        let i = (self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) % self.targets.len() as u64) as usize;
        let to = self.targets[i].clone();
        let payload = message::encode(self.seqs[i], to.label(), self.payload_bytes);
        self.seqs[i] += 1;
        Msg { to, payload, key: String::new() }
    }
}

/// One step of xorshift64 (the state must not be 0): plenty for picking targets.
pub fn xorshift(mut x: u64) -> u64 {
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    x
}

/// One connection to publish through.
pub enum Lane {
    Grpc(BrokerServiceClient<Channel>, Option<MetadataValue<Ascii>>),
    Http(http1::Conn),
}

/// `count` lanes for `via`: gRPC lanes share `channels` HTTP/2 connections
/// (at least one per broker, while there are lanes for them), lane `i`
/// publishing through broker `i mod brokers`; HTTP lanes each have a
/// keep-alive connection.
pub async fn lanes(via: Via, endpoints: &Endpoints, count: usize, channels: usize) -> anyhow::Result<Vec<Lane>> {
    let count = count.max(1);
    match via {
        Via::Http | Via::HttpJson => {
            let addr = endpoints.http()?;
            let mut lanes = Vec::with_capacity(count);
            for _ in 0..count {
                lanes.push(Lane::Http(http1::Conn::connect(addr, endpoints.api_key.as_deref()).await?));
            }
            Ok(lanes)
        }
        Via::Grpc | Via::GrpcBatch => {
            let brokers = endpoints.grpc()?;
            // A multiple of the brokers, so that lane i's channel is on broker i mod brokers.
            let channels = channels.max(1).next_multiple_of(brokers.len()).min(count);
            let mut clients = Vec::new();
            for addr in brokers.iter().cycle().take(channels) {
                clients.push(broker_client(*addr).await?);
            }
            let authorization = authorization(endpoints)?;
            Ok((0..count).map(|i| Lane::Grpc(clients[i % clients.len()].clone(), authorization.clone())).collect())
        }
    }
}

/// A gRPC client of the broker at `addr`, on a connection of its own.
pub async fn broker_client(addr: SocketAddr) -> anyhow::Result<BrokerServiceClient<Channel>> {
    let channel = Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await
        .with_context(|| format!("connecting to the broker at {addr}"))?;
    Ok(BrokerServiceClient::new(channel))
}

/// The `authorization` metadata gRPC calls carry, when herald wants an API key.
pub fn authorization(endpoints: &Endpoints) -> anyhow::Result<Option<MetadataValue<Ascii>>> {
    match &endpoints.api_key {
        Some(key) => Ok(Some(format!("Bearer {key}").parse().context("the API key is not valid metadata")?)),
        None => Ok(None),
    }
}

/// The protobuf address of a connection.
pub fn address(to: &Address) -> ConnectionAddress {
    ConnectionAddress { worker_id: to.worker_id.clone(), connection_id: to.connection_id.clone() }
}

fn request(msg: Msg) -> PublishRequest {
    let kind = match msg.to {
        To::Everyone => target::Kind::Broadcast(Broadcast {}),
        To::Connection(to) => target::Kind::Connection(address(&to)),
        To::User(user) => target::Kind::User(user.to_string()),
        To::Group(group) => target::Kind::Group(group.to_string()),
        To::Channel { name, .. } => target::Kind::Channel(name.to_string()),
    };
    PublishRequest {
        target: Some(Target { kind: Some(kind), except: Vec::new() }),
        content: Some(Content { body: Some(content::Body::Text(msg.payload)) }),
        idempotency_key: msg.key,
        presence_change: None,
    }
}

pub fn authorized<T>(message: T, authorization: &Option<MetadataValue<Ascii>>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = authorization {
        request.metadata_mut().insert("authorization", value.clone());
    }
    request
}

fn http_path(msg: &Msg) -> String {
    let content = http1::query_encode(&msg.payload);
    match &msg.to {
        To::Everyone => format!("/?content={content}"),
        To::Connection(to) => format!(
            "/?to_worker_id={}&to_connection_id={}&content={content}",
            http1::query_encode(&to.worker_id),
            http1::query_encode(&to.connection_id)
        ),
        To::User(user) => format!("/?to_uid={}&content={content}", http1::query_encode(user)),
        To::Group(group) => format!("/?to_group={}&content={content}", http1::query_encode(group)),
        To::Channel { name, .. } => format!("/?to_channel={}&content={content}", http1::query_encode(name)),
    }
}

/// The body of `POST /v1/publish`: the protobuf JSON mapping of a `PublishRequest`.
fn json_body(msg: &Msg) -> String {
    let target = match &msg.to {
        To::Everyone => serde_json::json!({"broadcast": {}}),
        To::Connection(to) => {
            serde_json::json!({"connection": {"worker_id": to.worker_id, "connection_id": to.connection_id}})
        }
        To::User(user) => serde_json::json!({"user": &**user}),
        To::Group(group) => serde_json::json!({"group": &**group}),
        To::Channel { name, .. } => serde_json::json!({"channel": &**name}),
    };
    let mut body = serde_json::json!({"target": target, "content": {"text": msg.payload}});
    if !msg.key.is_empty() {
        body["idempotency_key"] = msg.key.clone().into();
    }
    body.to_string()
}

impl Lane {
    /// Publishes `msgs` in order (as one batch for [`Via::GrpcBatch`]) and
    /// counts what was accepted. Fails when the lane's connection is broken.
    pub async fn send(&mut self, via: Via, msgs: Vec<Msg>, tally: &mut Tally) -> anyhow::Result<()> {
        match (self, via) {
            (Lane::Grpc(client, authorization), Via::GrpcBatch) => {
                let count = msgs.len() as u64;
                let batch = PublishBatchRequest { requests: msgs.into_iter().map(request).collect() };
                match client.publish_batch(authorized(batch, authorization)).await {
                    Ok(response) => {
                        for result in response.into_inner().results {
                            match result.outcome {
                                Some(publish_result::Outcome::Published(_)) => tally.accepted += 1,
                                Some(publish_result::Outcome::Error(e)) => {
                                    tally.error(1, || format!("code {}: {}", e.code, e.message));
                                }
                                None => tally.error(1, || "a batch result without an outcome".into()),
                            }
                        }
                    }
                    Err(status) => tally.error(count, || status.to_string()),
                }
            }
            (Lane::Grpc(client, authorization), _) => {
                for msg in msgs {
                    match client.publish(authorized(request(msg), authorization)).await {
                        Ok(_) => tally.accepted += 1,
                        Err(status) => tally.error(1, || status.to_string()),
                    }
                }
            }
            (Lane::Http(conn), _) => {
                for msg in msgs {
                    let (status, body) = if via == Via::HttpJson {
                        conn.post("/v1/publish", "application/json", json_body(&msg).as_bytes()).await?
                    } else {
                        conn.get(&http_path(&msg)).await?
                    };
                    if status == 200 {
                        tally.accepted += 1;
                    } else {
                        tally.error(1, || format!("HTTP {status}: {}", String::from_utf8_lossy(&body).trim()));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Publishes `msgs` in order through one lane, `batch` per request for
/// [`Via::GrpcBatch`] (one otherwise).
pub async fn all(lane: &mut Lane, via: Via, msgs: Vec<Msg>, batch: usize) -> Tally {
    let mut tally = Tally::default();
    let began = Instant::now();
    let per_request = if via == Via::GrpcBatch { batch.max(1) } else { 1 };
    let mut msgs = msgs.into_iter().peekable();
    while msgs.peek().is_some() {
        let chunk: Vec<Msg> = msgs.by_ref().take(per_request).collect();
        let count = chunk.len() as u64;
        let sent = Instant::now();
        if let Err(e) = lane.send(via, chunk, &mut tally).await {
            tally.error(count + msgs.len() as u64, || format!("{e:#}"));
            break;
        }
        tally.request_latency.record(sent.elapsed().as_micros() as u64);
    }
    tally.elapsed = began.elapsed();
    tally
}

/// Publishes one message.
pub async fn once(lane: &mut Lane, via: Via, msg: Msg) -> Tally {
    let mut tally = Tally::default();
    let began = Instant::now();
    if let Err(e) = lane.send(via, vec![msg], &mut tally).await {
        tally.error(1, || format!("{e:#}"));
    }
    tally.elapsed = began.elapsed();
    tally
}

/// Publishes `rate` messages per second for `duration` through one lane, in
/// order. Batches (up to `batch` messages) only carry what is due, so a
/// publisher that falls behind shows as a lower achieved rate.
pub async fn paced(
    lane: &mut Lane,
    via: Via,
    rate: f64,
    batch: usize,
    duration: Duration,
    source: &mut dyn Source,
) -> Tally {
    let mut tally = Tally::default();
    let start = tokio::time::Instant::now();
    let mut sent: u64 = 0;
    loop {
        let elapsed = start.elapsed();
        if elapsed >= duration {
            break;
        }
        // Message k is due at k / rate.
        let due = ((elapsed.as_secs_f64() * rate) as u64 + 1).saturating_sub(sent);
        if due == 0 {
            tokio::time::sleep_until(start + Duration::from_secs_f64(sent as f64 / rate)).await;
            continue;
        }
        let count = if via == Via::GrpcBatch { due.min(batch.max(1) as u64) } else { 1 };
        let msgs: Vec<Msg> = (0..count).map(|_| source.next()).collect();
        sent += count;
        let began = Instant::now();
        if let Err(e) = lane.send(via, msgs, &mut tally).await {
            tally.error(count, || format!("{e:#}"));
            break;
        }
        tally.request_latency.record(began.elapsed().as_micros() as u64);
    }
    tally.elapsed = start.elapsed();
    tally
}

/// Limits messages published but not yet delivered.
pub struct Window {
    pub progress: Arc<Progress>,
    /// Deliveries counted before this window's publishing began (clients
    /// count deliveries since they connected).
    pub base: u64,
    /// Most messages in flight.
    pub limit: u64,
    /// Clients each message goes to: every client for a broadcast, else one.
    pub broadcast_to: Option<u64>,
}

impl Window {
    /// Messages delivered (for a broadcast: to every client still connected).
    fn delivered(&self) -> u64 {
        let delivered = self.progress.delivered().saturating_sub(self.base);
        match self.broadcast_to {
            Some(clients) => delivered / clients.saturating_sub(self.progress.closed()).max(1),
            None => delivered,
        }
    }

    /// Waits until `more` messages fit in the window (or `deadline`).
    async fn room(&self, issued: &AtomicU64, more: u64, deadline: Instant) {
        while issued.load(Ordering::Relaxed).saturating_sub(self.delivered()) + more > self.limit.max(more) {
            if Instant::now() >= deadline {
                return;
            }
            self.progress.changed(Duration::from_millis(5)).await;
        }
    }
}

/// Publishes as fast as `lanes` concurrent requests go for `duration`, each
/// request carrying `per_request` messages (a batch for [`Via::GrpcBatch`],
/// cut to fit the window; else one), within `window` if given.
pub async fn flat_out(
    lanes: Vec<Lane>,
    via: Via,
    per_request: usize,
    duration: Duration,
    source: Box<dyn Source>,
    window: Option<Window>,
) -> Tally {
    let per_request = match (via, &window) {
        (Via::GrpcBatch, Some(window)) => per_request.clamp(1, window.limit.max(1) as usize),
        (Via::GrpcBatch, None) => per_request.max(1),
        _ => 1,
    };
    let source = Arc::new(Mutex::new(source));
    let window = window.map(Arc::new);
    let issued = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + duration;
    let tasks: Vec<_> = lanes
        .into_iter()
        .map(|mut lane| {
            let (source, window, issued) = (source.clone(), window.clone(), issued.clone());
            tokio::spawn(async move {
                let mut tally = Tally::default();
                while Instant::now() < deadline {
                    if let Some(window) = &window {
                        window.room(&issued, per_request as u64, deadline).await;
                    }
                    let msgs: Vec<Msg> = {
                        let mut source = source.lock().unwrap_or_else(|e| e.into_inner());
                        (0..per_request).map(|_| source.next()).collect()
                    };
                    issued.fetch_add(per_request as u64, Ordering::Relaxed);
                    let errors_before = tally.errors;
                    let began = Instant::now();
                    if let Err(e) = lane.send(via, msgs, &mut tally).await {
                        tally.error(per_request as u64, || format!("{e:#}"));
                        break;
                    }
                    tally.request_latency.record(began.elapsed().as_micros() as u64);
                    // Refused messages will never be delivered: free their room.
                    issued.fetch_sub(tally.errors - errors_before, Ordering::Relaxed);
                }
                tally
            })
        })
        .collect();
    let mut total = Tally::default();
    for task in tasks {
        match task.await {
            Ok(tally) => total.add(tally),
            Err(e) => total.error(0, || format!("a publisher task failed: {e}")),
        }
    }
    total.elapsed = start.elapsed();
    total
}

/// What `wrk` measured.
#[derive(Debug, Default)]
pub struct WrkResult {
    pub requests_per_sec: f64,
    /// Non-2xx responses plus socket errors.
    pub errors: u64,
    /// p50 and p99 from its latency distribution, max from its thread stats;
    /// wrk does not tell p99.9 (NaN).
    pub latency: Percentiles,
}

/// How to run `wrk`.
#[derive(Debug, Clone)]
pub struct WrkRun {
    pub http: SocketAddr,
    pub api_key: Option<String>,
    pub connections: usize,
    pub threads: usize,
    pub duration: Duration,
    pub payload_bytes: usize,
}

/// Runs `wrk` against the classic publish endpoint.
pub fn wrk(run: &WrkRun) -> anyhow::Result<WrkResult> {
    let WrkRun { http, connections, threads, duration, payload_bytes, .. } = run;
    let url = format!(
        "http://{http}/?content={}",
        http1::query_encode(&message::encode(0, message::BROADCAST, *payload_bytes))
    );
    let mut command = Command::new("wrk");
    if let Some(key) = &run.api_key {
        command.arg("-H").arg(format!("Authorization: Bearer {key}"));
    }
    let output = command
        .args(["--latency", "-t", &threads.to_string(), "-c", &connections.to_string()])
        .arg("-d")
        .arg(format!("{}s", duration.as_secs().max(1)))
        .arg(&url)
        .output()
        .context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!("wrk failed: {}{}", text, String::from_utf8_lossy(&output.stderr));
    }
    parse_wrk(&text).with_context(|| format!("unexpected wrk output:\n{text}"))
}

fn parse_wrk(text: &str) -> Option<WrkResult> {
    let mut result = WrkResult::default();
    result.latency.p999 = f64::NAN;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", rate] => result.requests_per_sec = rate.parse().ok()?,
            ["Latency", _avg, _stdev, max, ..] => result.latency.max = wrk_millis(max)?,
            ["50%", value] => result.latency.p50 = wrk_millis(value)?,
            ["99%", value] => result.latency.p99 = wrk_millis(value)?,
            ["Non-2xx", "or", "3xx", "responses:", n] => result.errors += n.parse::<u64>().ok()?,
            ["Socket", "errors:", rest @ ..] => {
                result.errors += rest.iter().filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok()).sum::<u64>();
            }
            _ => {}
        }
    }
    (result.requests_per_sec > 0.0).then_some(result)
}

/// `631.54us`, `1.73ms`, `2.00s` or `1.5m` in milliseconds.
fn wrk_millis(value: &str) -> Option<f64> {
    let split = value.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = value.split_at(split);
    let number: f64 = number.parse().ok()?;
    Some(match unit {
        "us" => number / 1000.0,
        "ms" => number,
        "s" => number * 1000.0,
        "m" => number * 60_000.0,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_gives_rate_errors_and_latency() {
        let text = "Running 10s test @ http://127.0.0.1:1/?content=x
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   631.54us  200.00us  12.36ms   90.10%
    Req/Sec    50.12k     1.00k   55.00k    70.00%
  Latency Distribution
     50%  571.00us
     75%  700.00us
     90%  900.00us
     99%    1.73ms
  1000000 requests in 10.00s, 100.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec: 100000.50
Transfer/sec:     10.00MB
";
        let result = parse_wrk(text).unwrap();
        assert_eq!(result.requests_per_sec, 100_000.5);
        assert_eq!(result.errors, 8);
        assert_eq!((result.latency.p50, result.latency.p99, result.latency.max), (0.571, 1.73, 12.36));
        assert!(result.latency.p999.is_nan());
        assert!(parse_wrk("nothing").is_none());
    }

    #[test]
    fn http_paths_carry_the_classic_parameters() {
        let to = Arc::new(Address::parse("gw0/7").unwrap());
        let msg = Msg { to: To::Connection(to), payload: "1:2:gw0/7:x".into(), key: String::new() };
        assert_eq!(http_path(&msg), "/?to_worker_id=gw0&to_connection_id=7&content=1:2:gw0/7:x");
        assert_eq!(http_path(&Msg { to: To::Everyone, payload: "a b".into(), key: String::new() }), "/?content=a%20b");
        let user = Msg { to: To::User("ana@x".into()), payload: "p".into(), key: String::new() };
        assert_eq!(http_path(&user), "/?to_uid=ana%40x&content=p");
        let group = Msg { to: To::Group("room 1".into()), payload: "p".into(), key: String::new() };
        assert_eq!(http_path(&group), "/?to_group=room%201&content=p");
        assert!(Address::parse("nope").is_err());
    }

    #[test]
    fn json_bodies_follow_the_protobuf_json_mapping() {
        let body = |to: To, key: &str| -> serde_json::Value {
            serde_json::from_str(&json_body(&Msg { to, payload: "hi".into(), key: key.into() })).unwrap()
        };
        assert_eq!(
            body(To::User("u1".into()), ""),
            serde_json::json!({"target": {"user": "u1"}, "content": {"text": "hi"}})
        );
        assert_eq!(
            body(To::Connection(Arc::new(Address::parse("gw0/7").unwrap())), "k1"),
            serde_json::json!({"target": {"connection": {"worker_id": "gw0", "connection_id": "7"}},
                               "content": {"text": "hi"}, "idempotency_key": "k1"})
        );
        assert_eq!(body(To::Group("g".into()), "")["target"], serde_json::json!({"group": "g"}));
        assert_eq!(body(To::Everyone, "")["target"], serde_json::json!({"broadcast": {}}));
    }

    #[test]
    fn grpc_requests_carry_every_kind_of_target() {
        let kind = |to: To| request(Msg { to, payload: String::new(), key: String::new() }).target.unwrap().kind;
        assert_eq!(kind(To::User("u1".into())), Some(target::Kind::User("u1".into())));
        assert_eq!(kind(To::Group("g".into())), Some(target::Kind::Group("g".into())));
        assert_eq!(kind(To::Everyone), Some(target::Kind::Broadcast(Broadcast {})));
    }

    #[test]
    fn random_targets_are_numbered_per_target_and_labelled() {
        let targets = vec![To::User("u0".into()), To::User("u1".into()), To::Group("g".into())];
        let mut source = RandomTargets::new(targets, 32).unwrap();
        let mut seen = std::collections::HashMap::new();
        for _ in 0..300 {
            let msg = source.next();
            let header = message::parse(msg.payload.as_bytes()).unwrap();
            assert_eq!(header.target, msg.to.label().as_bytes());
            let next = seen.entry(msg.to.label().to_owned()).or_insert(0);
            assert_eq!(header.seq, *next);
            *next += 1;
        }
        assert_eq!(seen.len(), 3, "every target is picked");
        assert!(RandomTargets::new(Vec::new(), 32).is_err());
    }

    #[test]
    fn a_shared_source_goes_on_numbering_where_it_stopped() {
        let shared = Arc::new(Mutex::new(RandomTargets::new(vec![To::User("u0".into())], 32).unwrap()));
        let mut first: Box<dyn Source> = Box::new(shared.clone());
        assert!(first.next().payload.starts_with("0:"));
        drop(first);
        let mut second: Box<dyn Source> = Box::new(shared);
        assert!(second.next().payload.starts_with("1:"));
    }

    #[test]
    fn broadcasts_are_numbered_in_order() {
        let mut source = Broadcasts { seq: 0, payload_bytes: 64, key_prefix: None };
        let (a, b) = (source.next(), source.next());
        assert!(a.payload.starts_with("0:") && b.payload.starts_with("1:"));
        assert_eq!(a.payload.len(), 64);
    }
}
