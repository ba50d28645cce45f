//! Restarts under load, in a cluster of three brokers bridged by NATS with
//! three WebSocket gateways, each given every broker: NATS restarted
//! mid-run, and a rolling restart of every broker, then every gateway, one
//! by one.
//!
//! The load is what a site sees: followers of a channel with history
//! (`feed:live`), raw classic clients taking numbered broadcasts, and
//! messages addressed to one connection each. Every client counts what it
//! got by number. Followers lose nothing. Raw clients lose at most what was
//! published while they, or their gateway's broker session, were away (a
//! reconnect, a `herald_ws_broker_disconnects_total`), never more. Nobody
//! gets a message twice, out of order, or meant for another connection,
//! and no worker id is ever held by two live gateways. Each scenario
//! records its [`Outcome`]; its `sent` counts deliveries owed: every
//! broadcast to every raw client, every feed publication to every
//! follower, and every accepted message to its connection.
//!
//! These run on loopback: the faults are process restarts, not the network.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use herald_proto::v1::broker_service_client::BrokerServiceClient;
use herald_proto::v1::{ConnectionAddress, PublishRequest, PublishResponse, target};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, block_in_place};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use super::Outcome;
use crate::follower::Follower;
use crate::support::{Client, Cluster, Herald, PATIENCE, broadcast, text_publish, wait_until};

const NAMESPACE: [&str; 2] = ["--namespace", "feed:subscribe=anyone,history=5000,history_ttl=1m"];
const FEED: &str = "feed:live";
const GATEWAYS: usize = 3;
const RAW_PER_GATEWAY: usize = 2;
/// Between two numbered broadcasts, and between two feed publications.
const PACE: Duration = Duration::from_millis(5);
/// Between two rounds of messages to single connections.
const TARGETED_PACE: Duration = Duration::from_millis(30);
/// The broadcast after the last numbered one: clients stop at it.
const END: &str = "end";
/// How long stragglers after [`END`] are watched for.
const QUIET: Duration = Duration::from_millis(300);
/// The longest stretch of the stream a raw client may miss in one gap.
const LONGEST_GAP: Duration = Duration::from_secs(5);
/// How long the load runs before a fault, and after it was recovered from.
const RUN_BEFORE: Duration = Duration::from_millis(1500);
const RUN_AFTER: Duration = Duration::from_millis(1000);
/// How long a follower waits for the rest of the feed once it ended.
const STALL: Duration = Duration::from_secs(3);

/// NATS dies and comes back on its store while every kind of client is
/// served. Publishes are refused (never taken and dropped) meanwhile, and
/// retried; brokers and gateways reconnect by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_mid_run_loses_nothing_on_history_and_delivers_everything_else_once() {
    let Some(mut site) = Site::start() else { return };
    let load = Load::start(&site).await;
    load.until_flowing_everywhere().await;

    tokio::time::sleep(RUN_BEFORE).await;
    site.note("NATS killed");
    block_in_place(|| site.cluster.nats.restart());
    site.note("NATS accepting again");
    let recovery = load.until_flowing_everywhere().await;
    site.note("flowing everywhere again");
    tokio::time::sleep(RUN_AFTER).await;
    for broker in &site.cluster.brokers {
        block_in_place(|| broker.wait_ready());
    }

    let report = load.finish(&site).await;
    report.assert_nothing_duplicated_reordered_or_misdelivered();
    report.assert_followers_lost_nothing();
    report.assert_raw_gaps_short();
    let unconfirmed = site.cluster.brokers.iter().map(|b| b.metric("herald_broker_cluster_forwards_unconfirmed_total"));
    report.assert_raw_loss_within_unconfirmed_forwards(unconfirmed.sum());
    site.assert_no_session_was_evicted();
    let outcome = report.outcome("nats restarted mid-run", recovery);
    outcome.record();
    site.holders.assert_never_shared();
}

/// Every broker in turn is stopped (SIGTERM), started again on its address
/// and waited for; then every gateway in turn, started again with its
/// worker id while the old process still drains. The gateways of a stopped
/// broker move to another; the clients of a stopped gateway come back to
/// its address, followers recovering from their last position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_broker_then_every_gateway_loses_nothing_on_history_and_a_bounded_counted_rest() {
    let Some(mut site) = Site::start() else { return };
    let mut load = Load::start(&site).await;
    load.until_flowing_everywhere().await;
    tokio::time::sleep(RUN_BEFORE).await;

    for b in 0..site.cluster.brokers.len() {
        block_in_place(|| site.restart_broker(b));
        load.until_flowing_everywhere().await;
    }
    let mut refused_claims = 0;
    for g in 0..GATEWAYS {
        refused_claims += site.restart_gateway(g, &mut load).await;
    }
    let recovery = load.until_flowing_everywhere().await;
    site.note("flowing everywhere again");
    tokio::time::sleep(RUN_AFTER).await;

    let report = load.finish(&site).await;
    report.assert_followers_lost_nothing();
    report.assert_nothing_duplicated_reordered_or_misdelivered();
    report.assert_raw_loss_explained_by_reconnects_and_broker_disconnects();
    for raw in &report.raw {
        assert_eq!(raw.reconnects, 1, "each raw client came back once, after its gateway's restart");
        assert!(raw.closes.iter().all(|c| *c == Some(1001)), "closed as going away: {:?}", raw.closes);
    }
    site.assert_no_session_was_evicted();
    let outcome = report.outcome("rolling restart of every broker and gateway", recovery);
    outcome.record();
    println!(
        "rolling restart: {refused_claims} restarted gateway(s) refused their worker id while the old process drained"
    );
    site.holders.assert_never_shared();
}

/// The cluster, its gateways, and a watch on who holds which worker id.
struct Site {
    cluster: Cluster,
    brokers: Vec<String>,
    gateways: Vec<Herald>,
    /// What each gateway's past processes counted before they were stopped.
    past_disconnects: Vec<f64>,
    holders: HolderWatch,
    /// When the site started, and what was done to it since.
    began: Instant,
    timeline: Vec<(Duration, String)>,
}

impl Site {
    fn start() -> Option<Site> {
        let cluster = Cluster::start(3, &NAMESPACE)?;
        let brokers: Vec<String> = (0..cluster.brokers.len()).map(|i| cluster.address(i)).collect();
        let holders = HolderWatch::start();
        let gateways: Vec<Herald> = (0..GATEWAYS)
            .map(|g| {
                // Each gateway tries the brokers from a different one first.
                let list: Vec<&str> = (0..brokers.len()).map(|i| brokers[(g + i) % brokers.len()].as_str()).collect();
                let mut args = vec!["--worker-id", worker_id(g)];
                args.extend(NAMESPACE);
                let gateway = Herald::ws(&list.join(","), &args);
                holders.watch(worker_id(g), gateway.addr("admin"));
                gateway
            })
            .collect();
        for broker in &cluster.brokers {
            holders.watch_broker(broker.addr("admin"));
        }
        let past_disconnects = vec![0.0; GATEWAYS];
        Some(Site {
            cluster,
            brokers,
            gateways,
            past_disconnects,
            holders,
            began: Instant::now(),
            timeline: Vec::new(),
        })
    }

    /// Writes down what is being done, for the reports of failures.
    fn note(&mut self, what: impl Into<String>) {
        self.timeline.push((self.began.elapsed(), what.into()));
    }

    /// Stops broker `b` gracefully and starts it again on its address, with
    /// the default startup grace a restarted broker has; waits until it is
    /// ready and every gateway is linked again.
    fn restart_broker(&mut self, b: usize) {
        self.note(format!("broker {b} stopping"));
        let broker = &mut self.cluster.brokers[b];
        broker.signal(libc::SIGTERM);
        broker.wait_exit(PATIENCE);
        let nats = self.cluster.nats.url();
        let mut args = vec!["broker", "--listen", &self.brokers[b], "--admin-listen", "127.0.0.1:0", "--nats", &nats];
        args.extend(NAMESPACE);
        *broker = Herald::start(&args, &["broker", "admin"]);
        broker.wait_ready();
        self.holders.watch_broker(broker.addr("admin"));
        self.note(format!("broker {b} ready again"));
        for gateway in &self.gateways {
            gateway.wait_ready();
        }
    }

    /// Stops gateway `g` gracefully and at once starts its successor on the
    /// same address with the same worker id, as a deploy would. The
    /// successor may claim the id only once the old process let it go: a
    /// refused claim makes it exit, and it is started again. Returns how
    /// many times it was refused.
    async fn restart_gateway(&mut self, g: usize, load: &mut Load) -> u32 {
        let listen = self.gateways[g].address("ws");
        self.past_disconnects[g] += block_in_place(|| self.gateways[g].metric("herald_ws_broker_disconnects_total"));
        load.gateway_going_away(g).await;
        self.note(format!("gateway {g} stopping"));
        self.gateways[g].signal(libc::SIGTERM);
        // The old process stops listening first, then drains.
        block_in_place(|| {
            wait_until("the stopped gateway's listener is closed", || std::net::TcpStream::connect(&listen).is_err());
        });
        let brokers = self.brokers.join(",");
        let mut args = vec!["ws", "--listen", &listen, "--admin-listen", "127.0.0.1:0", "--broker", &brokers];
        args.extend(["--worker-id", worker_id(g)]);
        args.extend(NAMESPACE);
        let mut refused = 0;
        let successor = block_in_place(|| {
            let mut early = Herald::start(&args, &["admin"]);
            self.holders.watch(worker_id(g), early.addr("admin"));
            self.gateways[g].wait_exit(PATIENCE);
            wait_until("the successor announces, or says it was refused", || {
                early.announced("ws") || early.log_text().contains("is held by another live gateway")
            });
            if early.announced("ws") {
                return early;
            }
            refused += 1;
            assert!(!early.wait_exit(PATIENCE).success(), "a refused gateway exits with an error");
            let late = Herald::start(&args, &["ws", "admin"]);
            self.holders.watch(worker_id(g), late.addr("admin"));
            late
        });
        block_in_place(|| successor.wait_ready());
        self.note(format!("gateway {g} ready again ({refused} claims refused)"));
        self.gateways[g] = successor;
        load.gateway_back(g, format!("ws://{listen}")).await;
        refused
    }

    /// One metric of every gateway.
    fn gateway_metric(&self, name: &str) -> Vec<f64> {
        self.gateways.iter().map(|g| g.metric(name)).collect()
    }

    fn disconnects(&self, g: usize) -> f64 {
        self.past_disconnects[g] + self.gateways[g].metric("herald_ws_broker_disconnects_total")
    }

    /// Publishers never waited a broker out of a gateway's session: no
    /// gateway was cut off for reading too slowly.
    fn assert_no_session_was_evicted(&self) {
        for broker in &self.cluster.brokers {
            assert_eq!(broker.metric("herald_broker_sessions_evicted_total"), 0.0);
        }
    }
}

fn worker_id(g: usize) -> &'static str {
    ["gw-0", "gw-1", "gw-2"][g]
}

/// Polls, from a thread of its own, every gateway process ever started
/// (`herald_ws_broker_linked`: it holds its worker id) and every broker
/// (`herald_broker_workers`), and writes down any moment a worker id was
/// held by two gateways, or the brokers held more ids than there are.
struct HolderWatch {
    gateways: Arc<Mutex<Vec<(&'static str, SocketAddr)>>>,
    brokers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(u64, Vec<String>)>>,
}

impl HolderWatch {
    fn start() -> HolderWatch {
        let gateways: Arc<Mutex<Vec<(&'static str, SocketAddr)>>> = Arc::default();
        let brokers: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (gateways, brokers, stop) = (gateways.clone(), brokers.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut samples, mut violations) = (0, Vec::new());
                while !stop.load(Ordering::SeqCst) {
                    let gateways = gateways.lock().unwrap_or_else(PoisonError::into_inner).clone();
                    let mut holders: HashMap<&str, Vec<SocketAddr>> = HashMap::new();
                    for (worker_id, admin) in gateways {
                        if scrape(admin, "herald_ws_broker_linked") == Some(1.0) {
                            holders.entry(worker_id).or_default().push(admin);
                        }
                    }
                    for (worker_id, admins) in holders.iter().filter(|(_, a)| a.len() > 1) {
                        violations.push(format!("{worker_id} held by the gateways of admin ports {admins:?}"));
                    }
                    let brokers = brokers.lock().unwrap_or_else(PoisonError::into_inner).clone();
                    let held: f64 = brokers.iter().filter_map(|b| scrape(*b, "herald_broker_workers")).sum();
                    if held > GATEWAYS as f64 {
                        violations.push(format!("the brokers hold {held} worker ids, for {GATEWAYS} gateways"));
                    }
                    samples += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                (samples, violations)
            })
        };
        HolderWatch { gateways, brokers, stop, thread: Some(thread) }
    }

    fn watch(&self, worker_id: &'static str, admin: SocketAddr) {
        self.gateways.lock().unwrap_or_else(PoisonError::into_inner).push((worker_id, admin));
    }

    fn watch_broker(&self, admin: SocketAddr) {
        self.brokers.lock().unwrap_or_else(PoisonError::into_inner).push(admin);
    }

    fn assert_never_shared(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let thread = self.thread.take().expect("asserted once");
        let (samples, violations) = thread.join().expect("the holder watch");
        println!("worker ids: {samples} samples of every gateway and broker, {} violations", violations.len());
        assert!(samples >= 10, "the watch looked often enough: {samples}");
        assert!(violations.is_empty(), "a worker id was held twice: {violations:#?}");
    }
}

/// One sample from `/metrics` at `admin`, or `None` when the process is
/// gone (a plain request: the watch must be cheaper than a curl per poll).
fn scrape(admin: SocketAddr, name: &str) -> Option<f64> {
    let mut stream = std::net::TcpStream::connect_timeout(&admin, Duration::from_millis(200)).ok()?;
    stream.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: herald\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A gRPC publisher that knows every broker and moves to the next one when
/// a call fails, as a backend given several broker addresses does.
struct Publisher {
    brokers: Vec<BrokerServiceClient<Channel>>,
    current: usize,
}

impl Publisher {
    fn new(addrs: &[String]) -> Publisher {
        let brokers = addrs
            .iter()
            .map(|addr| {
                let endpoint = Endpoint::from_shared(format!("http://{addr}")).expect("a broker URL");
                let channel =
                    endpoint.connect_timeout(Duration::from_millis(500)).timeout(Duration::from_secs(2)).connect_lazy();
                BrokerServiceClient::new(channel)
            })
            .collect();
        Publisher { brokers, current: 0 }
    }

    async fn publish(&mut self, request: PublishRequest) -> Result<PublishResponse, tonic::Status> {
        let answer = self.brokers[self.current].publish(request).await;
        if answer.is_err() {
            self.current = (self.current + 1) % self.brokers.len();
        }
        answer.map(tonic::Response::into_inner)
    }

    /// Publishes `request` (with an idempotency key) until a broker takes it.
    async fn publish_until_taken(&mut self, request: PublishRequest) {
        let deadline = Instant::now() + PATIENCE * 3;
        while let Err(status) = self.publish(request.clone()).await {
            assert!(Instant::now() < deadline, "{:?} refused for too long: {status}", request.idempotency_key);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A stream of numbered publishes, 1, 2, ..., until stopped, each with an
/// idempotency key and retried until taken.
struct Numbered {
    /// The highest number taken so far.
    taken: Arc<AtomicU64>,
    /// When each number was taken, in order.
    task: JoinHandle<Vec<Instant>>,
}

impl Numbered {
    fn start(brokers: &[String], stop: CancellationToken, request: fn(u64) -> PublishRequest) -> Numbered {
        let taken = Arc::new(AtomicU64::new(0));
        let mut publisher = Publisher::new(brokers);
        let task = tokio::spawn({
            let taken = taken.clone();
            async move {
                let mut times = Vec::new();
                for n in 1.. {
                    if stop.is_cancelled() {
                        break;
                    }
                    publisher.publish_until_taken(request(n)).await;
                    times.push(Instant::now());
                    taken.store(n, Ordering::SeqCst);
                    tokio::time::sleep(PACE).await;
                }
                times
            }
        });
        Numbered { taken, task }
    }
}

fn numbered_broadcast(n: u64) -> PublishRequest {
    let mut request = broadcast(&format!("b:{n}"));
    request.idempotency_key = format!("broadcast-{n}");
    request
}

fn feed_publication(n: u64) -> PublishRequest {
    let mut request = text_publish(target::Kind::Channel(FEED.into()), &n.to_string());
    request.idempotency_key = format!("feed-{n}");
    request
}

/// Where a raw client is now, and where it was before.
#[derive(Default)]
struct Addresses {
    current: Option<String>,
    past: Vec<String>,
}

/// `worker/connection`, as messages to one connection name their addressee.
fn address(client: &Client) -> String {
    format!("{}/{}", client.worker_id, client.connection_id)
}

/// What the messages to single connections came to.
#[derive(Default)]
struct Targeted {
    /// Taken by a broker, by `address:number`: when, and by which broker.
    taken: BTreeMap<String, (Duration, usize)>,
    /// Sent to a raw client's previous address: refused, or taken.
    stale_refused: u64,
    stale_taken: u64,
    /// Refused for the addressee (not known yet, or gone), or failed.
    refused: u64,
}

/// Round after round until stopped: one message to each raw client's
/// current address, and now and then one to an address it had before
/// (which nobody may receive).
fn start_targeted(
    brokers: &[String],
    slots: Vec<Arc<Mutex<Addresses>>>,
    began: Instant,
    stop: CancellationToken,
) -> JoinHandle<Targeted> {
    let mut publisher = Publisher::new(brokers);
    tokio::spawn(async move {
        let mut targeted = Targeted::default();
        for round in 0u64.. {
            if stop.is_cancelled() {
                break;
            }
            for slot in &slots {
                let (current, stale) = {
                    let slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
                    (slot.current.clone(), slot.past.last().cloned().filter(|_| round % 4 == 0))
                };
                if let Some(addressee) = current {
                    let text = format!("t:{addressee}:{round}");
                    let broker = publisher.current;
                    match publisher.publish(to_connection(&addressee, &text)).await {
                        Ok(_) => {
                            targeted.taken.insert(format!("{addressee}:{round}"), (began.elapsed(), broker));
                        }
                        Err(_) => targeted.refused += 1,
                    }
                }
                if let Some(gone) = stale {
                    let text = format!("t:{gone}:{round}");
                    match publisher.publish(to_connection(&gone, &text)).await {
                        Ok(_) => targeted.stale_taken += 1,
                        Err(_) => targeted.stale_refused += 1,
                    }
                }
            }
            tokio::time::sleep(TARGETED_PACE).await;
        }
        targeted
    })
}

fn to_connection(addressee: &str, text: &str) -> PublishRequest {
    let (worker_id, connection_id) = addressee.split_once('/').expect("worker/connection");
    let kind = target::Kind::Connection(ConnectionAddress {
        worker_id: worker_id.to_owned(),
        connection_id: connection_id.to_owned(),
    });
    text_publish(kind, text)
}

/// What one raw client saw, over all its connections.
#[derive(Debug, Default)]
struct RawTally {
    gateway: usize,
    /// Broadcast numbers, in arrival order.
    broadcasts: Vec<u64>,
    /// Messages to single connections received by their addressee, as
    /// `address:number`.
    targeted: Vec<String>,
    /// Messages meant for another connection, or never published.
    misdelivered: u64,
    reconnects: u64,
    /// The close code of each connection the gateway ended.
    closes: Vec<Option<u16>>,
}

/// A raw classic client of gateway `g`: reads until [`END`], and when its
/// gateway closes it, comes back to the gateway's address once it is
/// served again (as behind a load balancer), with a new connection id.
fn start_raw(
    gateway: usize,
    mut url: watch::Receiver<Option<String>>,
    slot: Arc<Mutex<Addresses>>,
    progress: Arc<AtomicU64>,
) -> JoinHandle<RawTally> {
    tokio::spawn(async move {
        let mut tally = RawTally { gateway, ..RawTally::default() };
        let first = url.borrow().clone().expect("a gateway to start on");
        let mut client = Client::connect(&first).await;
        slot.lock().unwrap_or_else(PoisonError::into_inner).current = Some(address(&client));
        let mut ended: Option<Instant> = None;
        loop {
            let received = match ended {
                None => client.recv_or_close().await,
                Some(at) => {
                    match tokio::time::timeout(QUIET.saturating_sub(at.elapsed()), client.recv_or_close()).await {
                        Ok(received) => received,
                        Err(_) => return tally,
                    }
                }
            };
            match received {
                Ok(text) if text == END => ended = Some(Instant::now()),
                Ok(text) => tally.take(&text, &address(&client), &progress),
                Err(code) => {
                    tally.closes.push(code);
                    {
                        let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
                        let gone = slot.current.take().expect("a current address");
                        slot.past.push(gone);
                    }
                    let back = url.wait_for(Option::is_some).await.expect("the site outlives its clients").clone();
                    let back = back.expect("a gateway to come back to");
                    client = Client::connect(&back).await;
                    tally.reconnects += 1;
                    slot.lock().unwrap_or_else(PoisonError::into_inner).current = Some(address(&client));
                }
            }
        }
    })
}

impl RawTally {
    fn take(&mut self, text: &str, own: &str, progress: &AtomicU64) {
        if let Some(n) = text.strip_prefix("b:").and_then(|n| n.parse().ok()) {
            self.broadcasts.push(n);
            progress.fetch_max(n, Ordering::SeqCst);
        } else if let Some((addressee, number)) = text.strip_prefix("t:").and_then(|t| t.rsplit_once(':')) {
            if addressee == own {
                self.targeted.push(format!("{addressee}:{number}"));
            } else {
                self.misdelivered += 1;
            }
        } else {
            self.misdelivered += 1;
        }
    }

    /// The numbers of `1..=count` never received, as runs `(first, last)`.
    fn gaps(&self, count: u64) -> Vec<(u64, u64)> {
        let seen: BTreeSet<u64> = self.broadcasts.iter().copied().collect();
        let mut gaps: Vec<(u64, u64)> = Vec::new();
        for n in (1..=count).filter(|n| !seen.contains(n)) {
            match gaps.last_mut() {
                Some((_, last)) if *last + 1 == n => *last = n,
                _ => gaps.push((n, n)),
            }
        }
        gaps
    }

    fn duplicated(&self) -> u64 {
        let distinct: BTreeSet<u64> = self.broadcasts.iter().copied().collect();
        let targeted: BTreeSet<&String> = self.targeted.iter().collect();
        (self.broadcasts.len() - distinct.len() + self.targeted.len() - targeted.len()) as u64
    }

    fn out_of_order(&self) -> u64 {
        self.broadcasts.windows(2).filter(|w| w[1] < w[0]).count() as u64
    }
}

/// Tells a follower's task to let its connection go (its gateway is going
/// away), or where to go on from.
enum Move {
    Leave(oneshot::Sender<()>),
    To(String),
}

/// A follower of [`FEED`] on gateway `g`, reading until it has `total`
/// publications (known once the feed stops). Broadcasts reach it too, as
/// `message` pushes: they are not the feed's.
fn start_follower(
    mut follower: Follower,
    mut moves: mpsc::Receiver<Move>,
    mut total: watch::Receiver<usize>,
    progress: Arc<AtomicUsize>,
) -> JoinHandle<Follower> {
    tokio::spawn(async move {
        loop {
            if follower.received.len() >= *total.borrow() {
                return follower;
            }
            tokio::select! {
                biased;
                Some(order) = moves.recv() => match order {
                    Move::Leave(done) => {
                        // Whatever was not read yet is recovered from history.
                        let _ = futures_util::SinkExt::close(&mut follower.client.ws).await;
                        let _ = done.send(());
                        let Some(Move::To(url)) = moves.recv().await else { panic!("a gateway to move to") };
                        follower.move_to(&url).await;
                    }
                    Move::To(url) => follower.move_to(&url).await,
                },
                _ = total.changed() => {}
                // A publication that never comes is counted as lost, not waited for.
                () = tokio::time::sleep(STALL), if *total.borrow() != usize::MAX => return follower,
                push = follower.client.push() => {
                    if push["unsubscribed"]["resubscribe"] == true {
                        follower.recover().await;
                    } else if push.get("publication").is_some() {
                        follower.take(&push);
                    }
                }
            }
            progress.store(follower.received.len(), Ordering::SeqCst);
        }
    })
}

/// A follower's task: its gateway, where to send it moves, and how far it got.
type FollowerTask = (usize, mpsc::Sender<Move>, JoinHandle<Follower>, Arc<AtomicUsize>);

/// Everything the clients and publishers do while the site is restarted.
struct Load {
    stop: CancellationToken,
    broadcasts: Numbered,
    feed: Numbered,
    targeted: JoinHandle<Targeted>,
    /// Where each gateway serves its clients (`None` while it is away).
    urls: Vec<watch::Sender<Option<String>>>,
    raw: Vec<(JoinHandle<RawTally>, Arc<AtomicU64>)>,
    followers: Vec<FollowerTask>,
    feed_total: watch::Sender<usize>,
    brokers: Vec<String>,
}

impl Load {
    async fn start(site: &Site) -> Load {
        let stop = CancellationToken::new();
        let (feed_total, total) = watch::channel(usize::MAX);
        let mut urls = Vec::new();
        let mut raw = Vec::new();
        let mut slots = Vec::new();
        let mut followers = Vec::new();
        for (g, gateway) in site.gateways.iter().enumerate() {
            let (url, watched) = watch::channel(Some(gateway.ws_url()));
            for _ in 0..RAW_PER_GATEWAY {
                let (slot, progress) = (Arc::new(Mutex::new(Addresses::default())), Arc::new(AtomicU64::new(0)));
                raw.push((start_raw(g, watched.clone(), slot.clone(), progress.clone()), progress));
                slots.push(slot);
            }
            urls.push(url);
            let follower = Follower::subscribe(&gateway.ws_url(), FEED).await;
            let (moves, orders) = mpsc::channel(2);
            let progress = Arc::new(AtomicUsize::new(0));
            followers.push((g, moves, start_follower(follower, orders, total.clone(), progress.clone()), progress));
        }
        block_in_place(|| {
            wait_until("every raw client is greeted", || {
                slots.iter().all(|s| s.lock().unwrap_or_else(PoisonError::into_inner).current.is_some())
            });
        });
        Load {
            broadcasts: Numbered::start(&site.brokers, stop.clone(), numbered_broadcast),
            feed: Numbered::start(&site.brokers, stop.clone(), feed_publication),
            targeted: start_targeted(&site.brokers, slots, site.began, stop.clone()),
            stop,
            urls,
            raw,
            followers,
            feed_total,
            brokers: site.brokers.clone(),
        }
    }

    /// Waits until every client has what was published from now on, and
    /// says how long that took.
    async fn until_flowing_everywhere(&self) -> Duration {
        let began = Instant::now();
        let broadcast_mark = self.broadcasts.taken.load(Ordering::SeqCst) + 1;
        let feed_mark = self.feed.taken.load(Ordering::SeqCst) as usize + 1;
        let deadline = began + PATIENCE * 2;
        loop {
            let raw = self.raw.iter().all(|(_, p)| p.load(Ordering::SeqCst) >= broadcast_mark);
            let followers = self.followers.iter().all(|(.., p)| p.load(Ordering::SeqCst) >= feed_mark);
            if raw && followers {
                return began.elapsed();
            }
            assert!(Instant::now() < deadline, "publishes did not reach every client again");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Gateway `g` is about to stop: its raw clients wait for it to be
    /// served again, its followers let their connections go.
    async fn gateway_going_away(&mut self, g: usize) {
        self.urls[g].send_replace(None);
        for (_, moves, ..) in self.followers.iter().filter(|f| f.0 == g) {
            let (done, left) = oneshot::channel();
            moves.send(Move::Leave(done)).await.expect("the follower runs");
            left.await.expect("the follower let go");
        }
    }

    async fn gateway_back(&mut self, g: usize, url: String) {
        self.urls[g].send_replace(Some(url.clone()));
        for (_, moves, ..) in self.followers.iter().filter(|f| f.0 == g) {
            moves.send(Move::To(url.clone())).await.expect("the follower runs");
        }
    }

    /// Stops publishing, sends [`END`], and gathers what every client got.
    async fn finish(self, site: &Site) -> Report {
        self.stop.cancel();
        let targeted = self.targeted.await.expect("the targeted publisher");
        let broadcast_times = self.broadcasts.task.await.expect("the broadcast publisher");
        let feed_count = self.feed.task.await.expect("the feed publisher").len();
        self.feed_total.send_replace(feed_count);
        Publisher::new(&self.brokers).publish_until_taken(broadcast(END)).await;
        let mut raw = Vec::new();
        for (task, _) in self.raw {
            raw.push(task.await.expect("a raw client"));
        }
        let mut followers = Vec::new();
        for (g, _, task, progress) in self.followers {
            match task.await {
                Ok(follower) => followers.push(follower),
                Err(e) => panic!(
                    "the follower on gateway {g} stopped at {} of {feed_count} ({e}); gateways' channel events {:?}, history filled {:?}, gaps unfilled {:?}; brokers' history appends {:?}, duplicates {:?}; the site: {:?}",
                    progress.load(Ordering::SeqCst),
                    site.gateway_metric("herald_ws_broker_events_total{delivery=\"channel\"}"),
                    site.gateway_metric("herald_ws_history_filled_total"),
                    site.gateway_metric("herald_ws_history_gaps_unfilled_total"),
                    site.cluster
                        .brokers
                        .iter()
                        .map(|b| b.metric("herald_broker_history_appends_total"))
                        .collect::<Vec<_>>(),
                    site.cluster
                        .brokers
                        .iter()
                        .map(|b| b.metric("herald_broker_publish_duplicates_total"))
                        .collect::<Vec<_>>(),
                    site.timeline
                ),
            }
        }
        let disconnects = (0..GATEWAYS).map(|g| site.disconnects(g)).collect();
        let timeline = site.timeline.clone();
        Report { broadcast_times, feed_count, targeted, raw, followers, disconnects, timeline }
    }
}

/// What was published, and what every client got.
struct Report {
    broadcast_times: Vec<Instant>,
    feed_count: usize,
    targeted: Targeted,
    raw: Vec<RawTally>,
    followers: Vec<Follower>,
    /// Broker sessions each gateway lost, over all its processes.
    disconnects: Vec<f64>,
    timeline: Vec<(Duration, String)>,
}

impl Report {
    fn broadcast_count(&self) -> u64 {
        self.broadcast_times.len() as u64
    }

    fn assert_followers_lost_nothing(&self) {
        for follower in &self.followers {
            follower.assert_all(self.feed_count);
            assert!(follower.recovered.iter().all(|r| *r), "every recovery recovered: {:?}", follower.recovered);
        }
    }

    /// Messages taken for a connection that never reached it: what, when
    /// (since the load began) and through which broker.
    fn targeted_lost(&self) -> Vec<(&String, Duration, usize)> {
        let received: BTreeSet<&String> = self.raw.iter().flat_map(|r| &r.targeted).collect();
        let lost = self.targeted.taken.iter().filter(|(m, _)| !received.contains(m));
        lost.map(|(m, (at, broker))| (m, *at, *broker)).collect()
    }

    fn assert_nothing_duplicated_reordered_or_misdelivered(&self) {
        for raw in &self.raw {
            assert_eq!(raw.duplicated(), 0, "no duplicate on a client of gateway {}", raw.gateway);
            assert_eq!(raw.out_of_order(), 0, "in publish order on a client of gateway {}", raw.gateway);
            assert_eq!(raw.misdelivered, 0, "nothing meant for another connection, on gateway {}", raw.gateway);
            assert!(raw.broadcasts.iter().all(|n| *n <= self.broadcast_count()), "only numbers published");
        }
        assert_eq!(self.targeted.stale_taken, 0, "a connection gone is refused as an addressee");
    }

    /// Every gap in a raw client's broadcasts is explained by a reconnect of
    /// its own or a lost broker session of its gateway, and none is long.
    fn assert_raw_loss_explained_by_reconnects_and_broker_disconnects(&self) {
        for raw in &self.raw {
            let gaps = raw.gaps(self.broadcast_count());
            let explained = raw.reconnects + self.disconnects[raw.gateway] as u64;
            assert!(
                gaps.len() as u64 <= explained,
                "a client of gateway {} missed {gaps:?}, with {} reconnects and {} broker disconnects",
                raw.gateway,
                raw.reconnects,
                self.disconnects[raw.gateway]
            );
        }
        self.assert_raw_gaps_short();
    }

    /// Broadcasts missed by raw clients that neither reconnected nor saw
    /// their gateway's broker session end were lost between brokers with a
    /// NATS connection: no more than the brokers counted as unconfirmed
    /// forwards.
    fn assert_raw_loss_within_unconfirmed_forwards(&self, unconfirmed: f64) {
        let count = self.broadcast_count();
        let missed: BTreeSet<u64> = self
            .raw
            .iter()
            .filter(|raw| raw.reconnects == 0 && self.disconnects[raw.gateway] == 0.0)
            .flat_map(|raw| raw.gaps(count))
            .flat_map(|(first, last)| first..=last)
            .collect();
        println!("broadcasts lost between brokers: {}, forwards unconfirmed by NATS: {unconfirmed}", missed.len());
        assert!(missed.len() as f64 <= unconfirmed, "lost {missed:?}, with {unconfirmed} forwards unconfirmed");
    }

    /// No gap in a raw client's broadcasts is longer than [`LONGEST_GAP`].
    fn assert_raw_gaps_short(&self) {
        for raw in &self.raw {
            for (first, last) in raw.gaps(self.broadcast_count()) {
                let span = self.broadcast_times[last as usize - 1] - self.broadcast_times[first as usize - 1];
                assert!(span < LONGEST_GAP, "a gap of {span:?} ({first}..={last}) on gateway {}", raw.gateway);
            }
        }
    }

    fn outcome(&self, scenario: &'static str, recovery: Duration) -> Outcome {
        let count = self.broadcast_count();
        let raw_lost: u64 = self.raw.iter().flat_map(|r| r.gaps(count)).map(|(first, last)| last - first + 1).sum();
        let followers_lost: u64 = self
            .followers
            .iter()
            .map(|f| {
                let distinct: BTreeSet<&String> = f.received.iter().collect();
                (self.feed_count - distinct.len().min(self.feed_count)) as u64
            })
            .sum();
        let followers_duplicated: u64 = self
            .followers
            .iter()
            .map(|f| (f.received.len() - f.received.iter().collect::<BTreeSet<_>>().len()) as u64)
            .sum();
        for raw in &self.raw {
            println!(
                "{scenario}: a raw client of gateway {}: {} broadcasts of {count}, gaps {:?}, {} reconnects, {} broker disconnects of its gateway",
                raw.gateway,
                raw.broadcasts.len(),
                raw.gaps(count),
                raw.reconnects,
                self.disconnects[raw.gateway]
            );
        }
        println!(
            "{scenario}: taken for a live connection and never received (when, through which broker): {:?}; the site: {:?}",
            self.targeted_lost(),
            self.timeline
        );
        println!(
            "{scenario}: to single connections: {} taken, {} refused, {} to old addresses refused",
            self.targeted.taken.len(),
            self.targeted.refused,
            self.targeted.stale_refused
        );
        Outcome {
            scenario,
            sent: count * self.raw.len() as u64
                + (self.feed_count * self.followers.len()) as u64
                + self.targeted.taken.len() as u64,
            lost: raw_lost + followers_lost + self.targeted_lost().len() as u64,
            duplicated: self.raw.iter().map(RawTally::duplicated).sum::<u64>() + followers_duplicated,
            misdelivered: self.raw.iter().map(|r| r.misdelivered).sum::<u64>() + self.targeted.stale_taken,
            recovery,
        }
    }
}
