//! A load-generator process (the hidden `loadgen` subcommand): opens its share
//! of the WebSocket clients and reports on them to the harness that started it.
//!
//! The protocol is JSON lines. The harness writes one [`Plan`] on standard
//! input; the process connects every client (printing [`Event::Connecting`]
//! now and then on the way), prints [`Event::Connected`], then
//! an [`Event::Progress`] whenever its delivery count changes, and an
//! [`Event::Report`] for each `report` line it reads. It exits when its
//! standard input closes.
//!
//! A plan's [`Task`] may instead make its clients talk: at the `go` line,
//! each connected client sends frames for a while ([`Task::Send`]), or the
//! process opens, holds and closes connections at a steady rate
//! ([`Task::Cycle`]); either way it prints [`Event::Finished`] when done.

use std::io::BufRead;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::clients::{self, Client, Period, Stats};
use crate::endpoints::WsUrl;
use crate::identity::ClientIdentity;
use crate::stats::Latency;

/// How long a cycled connection's close handshake may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a process tells the harness how many clients it has connected
/// so far (the harness gives up on a process that stops getting anywhere).
const CONNECTING_EVERY: Duration = Duration::from_millis(500);

/// What one load-generator process does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// Client `i` connects to `ws_urls[i % len]`…
    pub ws_urls: Vec<String>,
    /// …from `sources[i % len]`.
    pub sources: Vec<Ipv4Addr>,
    pub connections: usize,
    /// Handshakes in progress at once.
    pub connect_concurrency: usize,
    pub connect_timeout_ms: u64,
    /// How often the delivery count is reported while it changes.
    pub progress_ms: u64,
    /// Client `i` logs in as `identities[i]` (a JWT in its handshake); none:
    /// every client is anonymous.
    #[serde(default)]
    pub identities: Vec<ClientIdentity>,
    /// Client channels every client subscribes to, speaking the client
    /// protocol (`herald.json.v1`); none: classic raw clients.
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// What the clients do once connected.
    #[serde(default)]
    pub task: Task,
}

/// What a load-generator process's clients do.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Task {
    /// Receive and check messages until the process exits.
    #[default]
    Receive,
    /// At `go`, every client sends text frames for a while (and answers pings).
    Send(Sending),
    /// Nobody connects first; at `go`, connections are opened at a steady
    /// rate (from the plan's sources, in turn), each held, then closed with
    /// a close frame.
    Cycle(Cycling),
}

/// How each client of a [`Task::Send`] sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sending {
    /// Frames per second per client; `None`: flat out, `burst` frames per write.
    pub rate: Option<f64>,
    pub duration_ms: u64,
    /// Payload bytes of each frame (`<seq>:<sent_ns>::` padded with `x`).
    pub payload: usize,
    /// Flat out: frames per write.
    pub burst: usize,
    /// At a rate: a client writes the frames due at most this often.
    pub interval_ms: u64,
    /// Flat out: the process sends no more frames in all than the harness
    /// allows (`allow <n>` lines, a running total); else without bound.
    #[serde(default)]
    pub windowed: bool,
}

/// How many frames a process's clients may have sent in all, as the harness
/// allows them (a window on frames sent but not yet received by the consumer).
pub struct Allowance {
    allowed: AtomicU64,
    claimed: AtomicU64,
    raised: Notify,
}

impl Allowance {
    pub fn new(allowed: u64) -> Self {
        Self { allowed: AtomicU64::new(allowed), claimed: AtomicU64::new(0), raised: Notify::new() }
    }

    /// Raises the allowance to `allowed` (it never goes down).
    pub fn allow(&self, allowed: u64) {
        if self.allowed.fetch_max(allowed, Ordering::AcqRel) < allowed {
            self.raised.notify_waiters();
        }
    }

    /// Claims `n` frames, waiting for the allowance; false when `deadline`
    /// came first.
    pub async fn claim(&self, n: u64, deadline: Instant) -> bool {
        loop {
            let raised = self.raised.notified();
            tokio::pin!(raised);
            raised.as_mut().enable();
            let claimed = self.claimed.load(Ordering::Acquire);
            if claimed + n <= self.allowed.load(Ordering::Acquire) {
                if self.claimed.compare_exchange(claimed, claimed + n, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                    return true;
                }
                continue;
            }
            tokio::select! {
                () = raised => {}
                () = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }
}

/// How a [`Task::Cycle`] opens and closes connections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cycling {
    /// Connections opened per second by this process.
    pub rate: f64,
    pub duration_ms: u64,
    /// How long each connection stays open after its greeting.
    pub hold_ms: u64,
}

/// What a process's [`Task::Send`] or [`Task::Cycle`] came to.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Finished {
    /// Frames written (send).
    pub sent: u64,
    /// Addresses of the connections opened, from their greetings (cycle).
    pub opened: Vec<String>,
    /// Connections that could not be opened (cycle), or clients whose
    /// sending failed (send).
    pub failed: usize,
    pub first_error: Option<String>,
    /// Connections whose close handshake did not complete (cycle).
    pub close_failed: usize,
    /// Time from `go` to the last write (send) or the last greeting (cycle).
    pub elapsed_ms: u64,
    /// Cycle: connect → greeting latency as `(µs, count)` pairs.
    pub handshake_us: Vec<(u64, u64)>,
}
/// What a load-generator process tells the harness.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Every client has connected or failed to; `addresses` lists the
    /// connected ones (`<worker_id>/<connection_id>`) and, when they logged
    /// in, `users` their user ids in the same order.
    Connected {
        addresses: Vec<String>,
        #[serde(default)]
        users: Vec<String>,
        failed: usize,
        first_error: Option<String>,
    },
    /// While connecting: clients connected and failed so far.
    Connecting { connected: u64, failed: u64 },
    /// Totals so far.
    Progress { delivered: u64, closed: u64 },
    /// Final figures, on request.
    Report(Report),
    /// The task started by `go` is done.
    Finished(Finished),
}

/// One process's delivery statistics.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub delivered: u64,
    pub duplicated: u64,
    pub misdelivered: u64,
    pub reordered: u64,
    pub closed: u64,
    /// Publish→delivery latency histogram as `(µs, count)` pairs.
    pub latency_us: Vec<(u64, u64)>,
    /// Frames the clients sent (a [`Task::Send`]).
    #[serde(default)]
    pub sent: u64,
}

impl Report {
    pub fn latency(&self) -> Latency {
        Latency::from_pairs(&self.latency_us)
    }

    /// What happened between `earlier` (a report of the same process) and
    /// this one: reports are totals since the process started.
    pub fn since(&self, earlier: &Report) -> Report {
        Report {
            delivered: self.delivered.saturating_sub(earlier.delivered),
            duplicated: self.duplicated.saturating_sub(earlier.duplicated),
            misdelivered: self.misdelivered.saturating_sub(earlier.misdelivered),
            reordered: self.reordered.saturating_sub(earlier.reordered),
            closed: self.closed.saturating_sub(earlier.closed),
            latency_us: self.latency().since(&earlier.latency()).to_pairs(),
            sent: self.sent.saturating_sub(earlier.sent),
        }
    }
}

fn emit(event: &Event) {
    // Standard output is line-buffered and read by the harness: one line per event.
    match serde_json::to_string(event) {
        Ok(line) => println!("{line}"),
        Err(e) => eprintln!("herald-bench loadgen: cannot encode an event: {e}"),
    }
}

/// Runs a load-generator process until its standard input closes.
pub fn main() -> anyhow::Result<()> {
    let mut stdin = std::io::stdin().lock();
    let mut line = String::new();
    stdin.read_line(&mut line).context("reading the plan")?;
    let plan: Plan = serde_json::from_str(&line).context("parsing the plan")?;
    let urls = plan.ws_urls.iter().map(|u| WsUrl::parse(u)).collect::<anyhow::Result<Vec<_>>>()?;
    if urls.is_empty() || plan.sources.is_empty() {
        bail!("the plan names no WebSocket URL or no source address");
    }
    let runtime = crate::runtime()?;
    let stats = Arc::new(Stats::new());
    let mut clients = runtime.block_on(connect_all(&plan, &urls, &stats));
    let _entered = runtime.enter();
    let windowed = matches!(&plan.task, Task::Send(sending) if sending.windowed && sending.rate.is_none());
    let allowance = Arc::new(Allowance::new(if windowed { 0 } else { u64::MAX }));
    let mut started = false;
    for line in stdin.lines() {
        let line = line?;
        if let Some(n) = line.trim().strip_prefix("allow ") {
            allowance.allow(n.parse().with_context(|| format!("bad allowance {n:?}"))?);
            continue;
        }
        match line.trim() {
            "report" => emit(&Event::Report(report(&stats))),
            "go" if !started => {
                started = true;
                match &plan.task {
                    Task::Receive => bail!("go: this process only receives"),
                    Task::Send(sending) => {
                        let clients = std::mem::take(&mut clients);
                        tokio::spawn(send_all(clients, sending.clone(), stats.clone(), allowance.clone()));
                    }
                    Task::Cycle(cycling) => {
                        tokio::spawn(cycle(plan.clone(), urls.clone(), cycling.clone()));
                    }
                }
            }
            other => bail!("unknown command {other:?}"),
        }
    }
    // Exit without tearing down thousands of client tasks one by one.
    std::process::exit(0);
}

/// Connects every client and announces them. Receiving clients are left
/// receiving in the background, each from its connection on (so that it
/// answers pings however long the others take), along with a progress
/// reporter; the others are handed back for their task.
///
/// At most `connect_concurrency` handshakes are in flight, and only they are
/// spawned: a handshake's task is far larger than a receiving client's, and
/// spawning them all up front would peak (and leave the allocator holding)
/// several KiB per client. Meanwhile [`Event::Connecting`] tells the harness
/// how far it got.
async fn connect_all(plan: &Plan, urls: &[WsUrl], stats: &Arc<Stats>) -> Vec<Client> {
    let timeout = Duration::from_millis(plan.connect_timeout_ms);
    let receive = plan.task == Task::Receive;
    let mut attempts = JoinSet::new();
    let mut next = 0;
    let mut addresses = Vec::with_capacity(plan.connections);
    let mut users = Vec::new();
    let mut connected = Vec::new();
    let mut failed = 0;
    let mut first_error = None;
    let mut told = Instant::now();
    while next < plan.connections || !attempts.is_empty() {
        while next < plan.connections && attempts.len() < plan.connect_concurrency.max(1) {
            let i = next;
            next += 1;
            let url = urls[i % urls.len()].clone();
            let source = plan.sources[i % plan.sources.len()];
            let identity = plan.identities.get(i).cloned();
            let subscribe = plan.subscribe.clone();
            let stats = stats.clone();
            // Boxed: the task then fits the allocator's pool of small aligned
            // blocks, and the handshake's large state is an ordinary allocation.
            // glibc gives a large aligned block with fragments around it that
            // pile up, handshake after handshake (6 MB per 10,000 clients).
            attempts.spawn(Box::pin(async move {
                let token = identity.as_ref().map(|id| id.token.as_str());
                let mut client = tokio::time::timeout(timeout, clients::connect(&url, source, token, &subscribe))
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("connect to {url} timed out")))?;
                let user = identity.map(|identity| {
                    client.also_accept(identity.user.clone(), identity.groups);
                    identity.user
                });
                let address = client.address.clone();
                if receive {
                    // A task of its own, sized for receiving: this one ends here.
                    tokio::spawn(client.receive(stats, i));
                    return Ok::<_, anyhow::Error>((address, user, None));
                }
                Ok((address, user, Some(client)))
            }));
        }
        let Some(attempt) = attempts.join_next().await else { break };
        match attempt.map_err(anyhow::Error::from).and_then(|r| r) {
            Ok((address, user, client)) => {
                addresses.push(address);
                users.extend(user);
                connected.extend(client);
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
        if told.elapsed() >= CONNECTING_EVERY {
            told = Instant::now();
            emit(&Event::Connecting { connected: addresses.len() as u64, failed: failed as u64 });
        }
    }
    emit(&Event::Connected { addresses, users, failed, first_error });
    if receive {
        tokio::spawn(report_progress(stats.clone(), Duration::from_millis(plan.progress_ms.max(1))));
    }
    connected
}

/// Every client sends as `sending` says; then the process reports the total.
async fn send_all(clients: Vec<Client>, sending: Sending, stats: Arc<Stats>, allowance: Arc<Allowance>) {
    let began = Instant::now();
    let deadline = began + Duration::from_millis(sending.duration_ms);
    let count = clients.len().max(1);
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, client)| {
            let sending = sending.clone();
            let (stats, allowance) = (stats.clone(), allowance.clone());
            // Paced clients start spread over one interval, not all at once.
            let phase = i as f64 / count as f64;
            let period = Period { began, phase, deadline };
            tokio::spawn(async move { client.send(&sending, period, &stats, &allowance, i).await })
        })
        .collect();
    let mut finished = Finished::default();
    for task in tasks {
        if let Err(e) = task.await.map_err(anyhow::Error::from).and_then(|r| r) {
            finished.failed += 1;
            finished.first_error.get_or_insert_with(|| format!("{e:#}"));
        }
    }
    finished.elapsed_ms = began.elapsed().as_millis() as u64;
    finished.sent = stats.sent();
    emit(&Event::Finished(finished));
}

/// Opens connections at `cycling.rate` for its duration, holds each, closes
/// it; then reports every connection's address.
async fn cycle(plan: Plan, urls: Vec<WsUrl>, cycling: Cycling) {
    let permits = Arc::new(Semaphore::new(plan.connect_concurrency.max(1)));
    let timeout = Duration::from_millis(plan.connect_timeout_ms);
    let hold = Duration::from_millis(cycling.hold_ms);
    let total = (cycling.rate * cycling.duration_ms as f64 / 1000.0).round() as u64;
    let began = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for k in 0..total {
        tokio::time::sleep_until(began + Duration::from_secs_f64(k as f64 / cycling.rate)).await;
        // At most connect_concurrency handshakes at once: past that the
        // schedule slips, and the achieved rate says so.
        let Ok(permit) = permits.clone().acquire_owned().await else { break };
        let url = urls[k as usize % urls.len()].clone();
        let source = plan.sources[k as usize % plan.sources.len()];
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let client = tokio::time::timeout(timeout, clients::connect(&url, source, None, &[]))
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("connect to {url} timed out")));
            drop(permit);
            let client = client?;
            let opened = Instant::now();
            let address = client.address.clone();
            tokio::time::sleep(hold).await;
            let closed = tokio::time::timeout(CLOSE_TIMEOUT, client.close()).await.is_ok_and(|r| r.is_ok());
            Ok::<_, anyhow::Error>((address, opened.duration_since(sent), opened, closed))
        }));
    }
    let mut finished = Finished::default();
    let mut handshakes = Latency::new();
    let mut last_open = began;
    for task in tasks {
        match task.await.map_err(anyhow::Error::from).and_then(|r| r) {
            Ok((address, handshake, opened, closed)) => {
                finished.opened.push(address);
                handshakes.record(handshake.as_micros() as u64);
                last_open = last_open.max(opened);
                finished.close_failed += usize::from(!closed);
            }
            Err(e) => {
                finished.failed += 1;
                finished.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    finished.elapsed_ms = last_open.duration_since(began).as_millis() as u64;
    finished.handshake_us = handshakes.to_pairs();
    emit(&Event::Finished(finished));
}

async fn report_progress(stats: Arc<Stats>, every: Duration) {
    let mut last = (u64::MAX, u64::MAX);
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let totals = (stats.delivered(), stats.closed());
        if totals != last {
            last = totals;
            emit(&Event::Progress { delivered: totals.0, closed: totals.1 });
        }
    }
}

fn report(stats: &Stats) -> Report {
    let totals = stats.totals();
    Report {
        delivered: totals.delivered,
        duplicated: totals.duplicated,
        misdelivered: totals.misdelivered,
        reordered: totals.reordered,
        closed: totals.closed,
        latency_us: totals.latency.to_pairs(),
        sent: totals.sent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_one_json_object_tagged_by_kind() {
        let line = serde_json::to_string(&Event::Progress { delivered: 3, closed: 0 }).unwrap();
        assert_eq!(line, r#"{"event":"progress","delivered":3,"closed":0}"#);
        let line = serde_json::to_string(&Event::Connecting { connected: 5, failed: 1 }).unwrap();
        assert_eq!(line, r#"{"event":"connecting","connected":5,"failed":1}"#);
        let report = Event::Report(Report { delivered: 1, latency_us: vec![(5, 1)], ..Report::default() });
        let back: Event = serde_json::from_str(&serde_json::to_string(&report).unwrap()).unwrap();
        assert!(matches!(back, Event::Report(r) if r.latency().count() == 1));
        let old = r#"{"event":"connected","addresses":["gw0/1"],"failed":0,"first_error":null}"#;
        assert!(matches!(serde_json::from_str(old).unwrap(), Event::Connected { users, .. } if users.is_empty()));
    }

    #[test]
    fn a_plan_without_a_task_receives_and_tasks_survive_the_trip() {
        let old = r#"{"ws_urls":["ws://127.0.0.1:1/"],"sources":["127.0.0.1"],"connections":1,
                      "connect_concurrency":1,"connect_timeout_ms":1,"progress_ms":1}"#;
        assert_eq!(serde_json::from_str::<Plan>(old).unwrap().task, Task::Receive);
        let cycle = Task::Cycle(Cycling { rate: 2500.0, duration_ms: 10_000, hold_ms: 500 });
        let line = serde_json::to_string(&cycle).unwrap();
        assert!(line.starts_with(r#"{"kind":"cycle","#), "{line}");
        assert_eq!(serde_json::from_str::<Task>(&line).unwrap(), cycle);
        let send =
            Task::Send(Sending { rate: None, duration_ms: 1, payload: 32, burst: 16, interval_ms: 20, windowed: true });
        assert_eq!(serde_json::from_str::<Task>(&serde_json::to_string(&send).unwrap()).unwrap(), send);
        let finished = Event::Finished(Finished { sent: 5, opened: vec!["gw/1".into()], ..Finished::default() });
        let back: Event = serde_json::from_str(&serde_json::to_string(&finished).unwrap()).unwrap();
        assert!(matches!(back, Event::Finished(f) if f.sent == 5 && f.opened == ["gw/1"]));
    }

    #[tokio::test]
    async fn claims_wait_for_the_allowance_or_the_deadline() {
        let allowance = Arc::new(Allowance::new(10));
        let soon = Instant::now() + Duration::from_secs(5);
        assert!(allowance.claim(6, soon).await);
        assert!(!allowance.claim(6, Instant::now() + Duration::from_millis(20)).await, "only 4 left");
        let waiting = tokio::spawn({
            let allowance = allowance.clone();
            async move { allowance.claim(6, soon).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        allowance.allow(5);
        allowance.allow(12);
        assert!(waiting.await.unwrap());
        assert_eq!(allowance.claimed.load(Ordering::Relaxed), 12);
    }

    #[test]
    fn a_report_since_an_earlier_one_holds_only_what_came_between() {
        let mut latency = Latency::new();
        latency.record(100);
        let earlier = Report { delivered: 5, reordered: 1, latency_us: latency.to_pairs(), ..Report::default() };
        latency.record(100);
        latency.record(9000);
        let later =
            Report { delivered: 8, reordered: 1, closed: 2, latency_us: latency.to_pairs(), ..Report::default() };
        let between = later.since(&earlier);
        assert_eq!((between.delivered, between.reordered, between.closed), (3, 0, 2));
        let latency = between.latency();
        assert_eq!(latency.count(), 2);
        assert!((latency.percentiles().unwrap().max - 9.0).abs() < 0.01);
    }
}
