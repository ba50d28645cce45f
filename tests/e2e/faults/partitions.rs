//! Partitions between hosts: a gateway cut off from its broker while
//! publishing goes on, and a broker cut off from NATS, then healed, while a
//! rival gateway keeps trying to take the worker id its gateway holds.
//!
//! Both count, message by message, what every client got (see [`traffic`],
//! also used by the lossy scenario): a history channel must come through
//! whole; the rest may lose a bounded, counted share, and nothing may be
//! duplicated, reordered or delivered to the wrong connection.

use std::time::{Duration, Instant};

use super::net::{Host, Network};
use crate::follower::Follower;
use crate::support::{Client, Herald, PATIENCE};

use self::traffic::{Tally, Traffic};

/// A channel namespace with history, on every role.
const HISTORY: [&str; 2] = ["--namespace", "feed:subscribe=anyone,history=10000,history_ttl=2m"];
/// The history channel the followers follow.
const FEED: &str = "feed:live";

/// A gateway loses its broker for 5 s while a publisher goes on publishing
/// through that broker; another gateway of the same broker is the control.
/// TCP holds the stalled session through the partition: the cut gateway's
/// clients get everything once it heals, late but whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_cut_off_from_its_broker_for_5s_catches_up_without_loss() {
    const TICKS: u64 = 900;
    const PARTITION: Duration = Duration::from_secs(5);
    let Some(net) = Network::new(&["broker", "cut", "steady"]) else { return };
    let broker = net.host("broker").broker(&HISTORY);
    let brokers = broker.address("broker");
    let cut = net.host("cut").ws(&brokers, &HISTORY);
    let steady = net.host("steady").ws(&brokers, &HISTORY);

    let raw = [
        Client::connect(&cut.ws_url()).await,
        Client::connect(&cut.ws_url()).await,
        Client::connect(&steady.ws_url()).await,
    ];
    let mut follower = Follower::subscribe(&cut.ws_url(), FEED).await;
    let traffic = Traffic::new(&brokers, &raw, TICKS).with_history(FEED, TICKS);
    let tallies: Vec<_> = raw.into_iter().map(|client| Tally::follow(client, &traffic)).collect();
    let following = tokio::spawn(async move {
        traffic::follow_until(&mut follower, TICKS as usize).await;
        follower
    });
    let publishing = traffic.start(Duration::from_millis(10));

    traffic.wait_for_tick(TICKS / 5).await;
    net.partition("cut", "broker");
    tokio::time::sleep(PARTITION).await;
    net.heal("cut", "broker");
    let healed = Instant::now();
    let published = publishing.await.expect("the publisher");

    let follower = following.await.expect("the follower");
    follower.assert_all(TICKS as usize);
    let (deliveries, recovery) =
        traffic::check_all(tallies, &published, healed, |tally| tally.worker_id == cut.worker_id()).await;
    let outcome = traffic::outcome("gateway-broker partition 5s", &deliveries, TICKS, recovery);
    outcome.record();
    let disconnects = cut.metric("herald_ws_broker_disconnects_total");
    let evicted = broker.metric("herald_broker_sessions_evicted_total");
    println!("cut gateway: {disconnects} broker disconnects; broker: {evicted} sessions evicted");
    // TCP carried the session through: nothing was lost to count.
    assert_eq!(outcome.lost, 0, "a 5 s partition is within what a stalled session survives");
    assert!(outcome.recovery < Duration::from_secs(5), "caught up promptly: {:?}", outcome.recovery);
}

/// The worker id the holder gateway claims, and its rivals try to take.
const HELD: &str = "held-id";

/// A broker loses NATS for 6 s, longer than two lease renewals take, then
/// gets it back, while publishing goes on through the other broker. The
/// holder gateway keeps its worker id throughout: when the cut broker can
/// no longer renew the lease it ends the holder's session before the lease
/// lapses, and the holder claims the id again through the other broker. A
/// rival gateway that keeps claiming the id there never gets it, and never
/// is the id held twice. The history channel comes through whole; the
/// holder's raw clients may miss broadcasts published during the partition,
/// counted as its broker disconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_cut_off_from_nats_keeps_its_gateways_worker_id_and_no_rival_takes_it() {
    // 12 s of broadcasts, one every 10 ms: the flood outlasts the heal (7 s
    // in) by 5 s, so that a recovery slower than a second is measured, not
    // missed (with 8 s, one run in three saw no broadcast after the heal).
    const TICKS: u64 = 1200;
    const PARTITION: Duration = Duration::from_secs(6);
    let Some(net) = Network::new(&["nats", "broker-1", "broker-2", "holder", "steady", "rival"]) else { return };
    let Some(nats) = net.host("nats").nats() else { return };
    let nats_url = nats.url();
    let cluster = [&["--nats", &nats_url][..], &HISTORY].concat();
    let (cut, healthy) = (net.host("broker-1").broker(&cluster), net.host("broker-2").broker(&cluster));
    let (cut_address, healthy_address) = (cut.address("broker"), healthy.address("broker"));
    let holder_brokers = format!("{cut_address},{healthy_address}");
    let holder = net.host("holder").ws(&holder_brokers, &[&["--worker-id", HELD][..], &HISTORY].concat());
    let steady = net.host("steady").ws(&healthy_address, &HISTORY);

    let on_holder = Client::connect(&holder.ws_url()).await;
    let on_steady = Client::connect(&steady.ws_url()).await;
    let mut follower = Follower::subscribe(&holder.ws_url(), FEED).await;
    // Only the steady client is addressed: a publish to the holder's
    // connections through the healthy broker cannot reach the cut one, and
    // is refused after the answer timeout, which would slow the flood.
    let traffic = Traffic::new(&healthy_address, std::slice::from_ref(&on_steady), TICKS).with_history(FEED, TICKS);
    let tallies = [Tally::follow(on_holder, &traffic), Tally::follow(on_steady, &traffic)];
    let following = tokio::spawn(async move {
        traffic::follow_until(&mut follower, TICKS as usize).await;
        follower
    });
    let publishing = traffic.start(Duration::from_millis(10));

    traffic.wait_for_tick(TICKS / 8).await;
    net.partition("broker-1", "nats");
    let partitioned = Instant::now();
    let mut rival = Rival::new(net.host("rival"), &healthy_address);
    let mut watch = HoldWatch::default();
    let mut healed = None;
    while partitioned.elapsed() < PARTITION + Duration::from_secs(4) {
        if healed.is_none() && partitioned.elapsed() >= PARTITION {
            net.heal("broker-1", "nats");
            healed = Some(Instant::now());
        }
        rival.attempt();
        watch.sample(&holder, &rival);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let healed = healed.expect("healed");
    let published = publishing.await.expect("the publisher");

    println!("{rival}; {watch}");
    assert_eq!(watch.double_held, Duration::ZERO, "worker id {HELD:?} was held by two gateways: {watch}");
    assert!(rival.refusals >= 3, "the rival tried, and was refused: {rival}");
    let relinks = holder.metric("herald_ws_broker_disconnects_total");
    println!("the holder's broker session was lost {relinks} times");
    assert!(linked(&holder) && watch.rival_samples == 0, "the holder keeps its id: {watch}");
    let follower = following.await.expect("the follower");
    follower.assert_all(TICKS as usize);
    let (deliveries, recovery) = traffic::check_all(tallies, &published, healed, |tally| tally.worker_id == HELD).await;
    let outcome = traffic::outcome("broker-NATS partition 6s", &deliveries, TICKS, recovery);
    outcome.record();
    let forwarded = healthy.metric("herald_broker_cluster_events_forwarded_total");
    let received = cut.metric("herald_broker_cluster_events_received_total");
    println!("the healthy broker forwarded {forwarded} events; the cut one received {received}");
    // Once the cut broker gave the lease up (as late as four fifths of a
    // lease after the partition began, by when it had renewed it last), the
    // holder moved to the healthy broker; the broadcasts bound for its old
    // session through NATS were lost with it, and counted as that one broker
    // disconnect. Nothing published before the partition is missed.
    let since_partition = published.broadcasts.values().filter(|at| **at >= partitioned).count() as u64;
    println!("{} lost, of {since_partition} broadcasts published from the partition on", outcome.lost);
    assert!(outcome.lost == 0 || relinks == 1.0, "a loss comes with the one session that lost it: {relinks}");
    assert!(outcome.lost <= since_partition, "the loss is bounded: {} > {since_partition}", outcome.lost);
    assert!(recovery < PATIENCE, "delivery whole again promptly: {recovery:?}");
}

/// The same partition, longer than the worker-id lease (3 s here, 10 s by
/// default). The cut broker cannot renew the holder's lease, so shortly
/// before it lapses that broker ends the holder's session by its own clock;
/// the rival may then take the id through the healthy broker, and the
/// holder, claiming it back, is refused and exits. At no moment do two
/// gateways hold it. (Before the fence, both held it for some 11 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_cut_off_from_nats_past_the_lease_never_lets_two_gateways_hold_one_worker_id() {
    const PARTITION: Duration = Duration::from_secs(8);
    let Some(net) = Network::new(&["nats", "broker-1", "broker-2", "holder", "rival"]) else { return };
    let Some(nats) = net.host("nats").nats() else { return };
    let nats_url = nats.url();
    let cluster = ["--nats", &nats_url, "--worker-lease", "3s"];
    let (cut, healthy) = (net.host("broker-1").broker(&cluster), net.host("broker-2").broker(&cluster));
    let holder_brokers = format!("{},{}", cut.address("broker"), healthy.address("broker"));
    let holder = net.host("holder").ws(&holder_brokers, &["--worker-id", HELD]);

    net.partition("broker-1", "nats");
    let partitioned = Instant::now();
    let mut rival = Rival::new(net.host("rival"), &healthy.address("broker"));
    let mut watch = HoldWatch::default();
    let mut healed = false;
    while partitioned.elapsed() < PARTITION * 2 {
        if !healed && partitioned.elapsed() >= PARTITION {
            net.heal("broker-1", "nats");
            healed = true;
        }
        rival.attempt();
        watch.sample(&holder, &rival);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("{rival}; {watch}");
    assert_eq!(watch.double_held, Duration::ZERO, "worker id {HELD:?} was held by two gateways: {watch}");
}

/// Gateways started one after another on a host, each claiming [`HELD`]
/// through one broker; a new one when the last was refused.
struct Rival<'a> {
    host: &'a Host,
    broker: String,
    current: Option<Herald>,
    started: Instant,
    attempts: u32,
    refusals: u32,
}

impl<'a> Rival<'a> {
    fn new(host: &'a Host, broker: &str) -> Self {
        Rival { host, broker: broker.to_owned(), current: None, started: Instant::now(), attempts: 0, refusals: 0 }
    }

    /// Starts an attempt unless one is under way or holds the id, at most
    /// one a second.
    fn attempt(&mut self) {
        if self.current.as_ref().is_some_and(|rival| rival.log_text().contains("is held by another live gateway")) {
            self.current = None;
            self.refusals += 1;
        }
        if self.current.is_some() || self.started.elapsed() < Duration::from_secs(1) {
            return;
        }
        let listen = self.host.addr(0).to_string();
        let args =
            ["ws", "--listen", &listen, "--admin-listen", &listen, "--broker", &self.broker, "--worker-id", HELD];
        self.current = Some(self.host.herald(&args, &["admin"]));
        self.started = Instant::now();
        self.attempts += 1;
    }

    /// Whether the current attempt holds the id: its broker session is up.
    fn holds(&self) -> bool {
        self.current.as_ref().is_some_and(linked)
    }
}

impl std::fmt::Display for Rival<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rival: {} claims, {} refused, holding at the end: {}", self.attempts, self.refusals, self.holds())
    }
}

/// Whether a gateway's broker session is up, by its metrics (false once it
/// has exited).
fn linked(gateway: &Herald) -> bool {
    gateway.metrics().lines().any(|line| line == "herald_ws_broker_linked 1")
}

/// Who held the worker id at each sample, and for how long two did.
#[derive(Default)]
struct HoldWatch {
    samples: u32,
    holder_samples: u32,
    rival_samples: u32,
    double_held: Duration,
    last_sample: Option<Instant>,
}

impl HoldWatch {
    fn sample(&mut self, holder: &Herald, rival: &Rival) {
        let (holder_holds, rival_holds) = (linked(holder), rival.holds());
        let now = Instant::now();
        if holder_holds && rival_holds {
            self.double_held += self.last_sample.map_or(Duration::ZERO, |last| now - last);
        }
        self.last_sample = Some(now);
        self.samples += 1;
        self.holder_samples += u32::from(holder_holds);
        self.rival_samples += u32::from(rival_holds);
    }
}

impl std::fmt::Display for HoldWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "of {} samples the holder held the id in {}, the rival in {}; both for {:?}",
            self.samples, self.holder_samples, self.rival_samples, self.double_held
        )
    }
}

/// Publishes numbered messages and counts, per client, what arrived.
pub(super) mod traffic {
    use std::collections::{BTreeSet, HashMap};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use futures_util::StreamExt;
    use herald_proto::v1::{ConnectionAddress, PublishBatchRequest, PublishRequest, publish_result, target};
    use tokio_tungstenite::tungstenite::Message;

    use crate::faults::Outcome;
    use crate::follower::Follower;
    use crate::support::{Client, PATIENCE, broadcast, grpc_client, text_publish};

    /// What one run publishes: each tick `i` makes one batch of a broadcast
    /// `b:i` and a message `c:<connection>:i` to each addressed connection;
    /// publications `1..=count` go to the history channel, if any, over the
    /// same time.
    #[derive(Clone)]
    pub struct Traffic {
        broker: String,
        targets: Vec<(String, String)>,
        history: Option<(&'static str, u64)>,
        pub ticks: u64,
        /// The last tick published so far.
        progress: Arc<AtomicU64>,
    }

    /// What the brokers accepted, and when.
    #[derive(Debug, Default)]
    pub struct Published {
        /// When each accepted broadcast's batch was answered, by tick.
        pub broadcasts: HashMap<u64, Instant>,
        /// The ticks accepted for each connection id.
        pub to_connection: HashMap<String, BTreeSet<u64>>,
        /// Messages refused (not counted as sent, nor as lost).
        pub refused: u64,
    }

    impl Traffic {
        /// Traffic through the broker at `broker`, to `clients` (addressed
        /// one by one besides the broadcasts).
        pub fn new(broker: &str, clients: &[Client], ticks: u64) -> Traffic {
            Traffic {
                broker: broker.to_owned(),
                targets: clients.iter().map(|c| (c.worker_id.clone(), c.connection_id.clone())).collect(),
                history: None,
                ticks,
                progress: Arc::default(),
            }
        }

        /// Also `count` publications on `channel`, a channel with history.
        pub fn with_history(mut self, channel: &'static str, count: u64) -> Traffic {
            self.history = Some((channel, count));
            self
        }

        /// Publishes every tick, one each `interval` (later when the broker
        /// is slower). The history publications go on their own, spread
        /// over the same time, so that their storage does not slow the
        /// rest; each is retried until taken, with its idempotency key, so
        /// that the channel holds `1..=count`.
        pub fn start(&self, interval: Duration) -> tokio::task::JoinHandle<Published> {
            let history = self.history.map(|(channel, count)| {
                let pace = interval * u32::try_from(self.ticks / count.max(1)).unwrap_or(u32::MAX);
                tokio::spawn(publish_history(self.broker.clone(), channel, count, pace))
            });
            let traffic = self.clone();
            tokio::spawn(async move {
                let mut grpc = grpc_client(&traffic.broker).await;
                let mut published = Published::default();
                let mut pace = tokio::time::interval(interval);
                pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                for tick in 1..=traffic.ticks {
                    pace.tick().await;
                    let mut requests = vec![broadcast(&format!("b:{tick}"))];
                    for (worker_id, connection_id) in &traffic.targets {
                        let address =
                            ConnectionAddress { worker_id: worker_id.clone(), connection_id: connection_id.clone() };
                        let text = format!("c:{connection_id}:{tick}");
                        requests.push(text_publish(target::Kind::Connection(address), &text));
                    }
                    let accepted = publish(&mut grpc, requests).await;
                    if accepted[0] {
                        published.broadcasts.insert(tick, Instant::now());
                    }
                    for ((_, connection_id), taken) in traffic.targets.iter().zip(&accepted[1..]) {
                        if *taken {
                            published.to_connection.entry(connection_id.clone()).or_default().insert(tick);
                        }
                    }
                    published.refused += accepted.iter().filter(|taken| !**taken).count() as u64;
                    traffic.progress.store(tick, Ordering::SeqCst);
                }
                if let Some(history) = history {
                    history.await.expect("the history publisher");
                }
                published
            })
        }

        /// Waits until `tick` has been published.
        pub async fn wait_for_tick(&self, tick: u64) {
            while self.progress.load(Ordering::SeqCst) < tick {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        fn finished(&self) -> bool {
            self.progress.load(Ordering::SeqCst) >= self.ticks
        }
    }

    /// What one raw client received, in order, with arrival times.
    pub struct Tally {
        pub worker_id: String,
        pub connection_id: String,
        arrivals: Vec<(String, Instant)>,
    }

    /// How one client's delivery went.
    #[derive(Default)]
    pub struct Delivery {
        /// Messages meant for this client (accepted broadcasts and its own).
        pub expected: u64,
        pub lost: u64,
        pub duplicated: u64,
        /// Messages out of order (a number at or below one already seen).
        pub reordered: u64,
        /// Messages for another connection, or never accepted.
        pub misdelivered: u64,
        /// The broadcasts that arrived, by tick, with their arrival time.
        broadcasts: HashMap<u64, Instant>,
    }

    impl Tally {
        /// Reads everything `client` receives until the traffic is over and
        /// its last broadcast and own message are in, or the client has
        /// been quiet for [`PATIENCE`] after the end.
        pub fn follow(client: Client, traffic: &Traffic) -> tokio::task::JoinHandle<Tally> {
            let traffic = traffic.clone();
            tokio::spawn(async move {
                let (worker_id, connection_id) = (client.worker_id.clone(), client.connection_id.clone());
                let mut ws = client.into_inner();
                let last = [format!("b:{}", traffic.ticks), format!("c:{connection_id}:{}", traffic.ticks)];
                let mut got_last = [false, false];
                let mut arrivals = Vec::new();
                let mut quiet_since = Instant::now();
                loop {
                    match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
                        Ok(Some(Ok(Message::Text(text)))) => {
                            let text = text.to_string();
                            for (seen, last) in got_last.iter_mut().zip(&last) {
                                *seen |= text == *last;
                            }
                            arrivals.push((text, Instant::now()));
                            quiet_since = Instant::now();
                        }
                        Ok(Some(Ok(_))) => {}
                        Ok(Some(Err(_)) | None) => break,
                        Err(_) => {}
                    }
                    let all_in = got_last.iter().all(|s| *s);
                    if traffic.finished() && (all_in || quiet_since.elapsed() > PATIENCE) {
                        break;
                    }
                }
                Tally { worker_id, connection_id, arrivals }
            })
        }

        /// Compares what arrived with what was published.
        pub fn check(&self, published: &Published) -> Delivery {
            let mine = published.to_connection.get(&self.connection_id).cloned().unwrap_or_default();
            let mut delivery =
                Delivery { expected: (published.broadcasts.len() + mine.len()) as u64, ..Delivery::default() };
            let mut own_seen = BTreeSet::new();
            let (mut last_broadcast, mut last_own) = (0, 0);
            for (text, at) in &self.arrivals {
                if let Some(tick) = text.strip_prefix("b:").and_then(|t| t.parse::<u64>().ok()) {
                    if !published.broadcasts.contains_key(&tick) {
                        delivery.misdelivered += 1;
                    } else if delivery.broadcasts.insert(tick, *at).is_some() {
                        delivery.duplicated += 1;
                    } else if tick <= last_broadcast {
                        delivery.reordered += 1;
                    }
                    last_broadcast = last_broadcast.max(tick);
                    continue;
                }
                let own = text
                    .strip_prefix("c:")
                    .and_then(|rest| rest.rsplit_once(':'))
                    .filter(|(connection, _)| *connection == self.connection_id)
                    .and_then(|(_, tick)| tick.parse::<u64>().ok())
                    .filter(|tick| mine.contains(tick));
                match own {
                    None => delivery.misdelivered += 1,
                    Some(tick) if !own_seen.insert(tick) => delivery.duplicated += 1,
                    Some(tick) if tick <= last_own => delivery.reordered += 1,
                    Some(_) => {}
                }
                if let Some(tick) = own {
                    last_own = last_own.max(tick);
                }
            }
            let received = (delivery.broadcasts.len() + own_seen.len()) as u64;
            delivery.lost = delivery.expected - received;
            delivery
        }
    }

    impl std::fmt::Display for Delivery {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(
                f,
                "{} expected, {} lost, {} duplicated, {} reordered, {} misdelivered",
                self.expected, self.lost, self.duplicated, self.reordered, self.misdelivered
            )
        }
    }

    impl Delivery {
        /// Nothing duplicated, reordered or misdelivered: what herald
        /// promises whatever the network does.
        pub fn assert_sound(&self) {
            assert_eq!((self.duplicated, self.reordered, self.misdelivered), (0, 0, 0), "{self}");
        }

        /// From `since` until the first broadcast published after it
        /// arrived: by then everything before it that was going to arrive
        /// had (it arrives in order).
        pub fn recovery_after(&self, published: &Published, since: Instant) -> Duration {
            let first_after = published.broadcasts.iter().filter(|(_, at)| **at > since).map(|(tick, _)| *tick).min();
            let arrival = first_after
                .and_then(|first| self.broadcasts.iter().filter(|(tick, _)| **tick >= first).map(|(_, at)| *at).min());
            arrival.map_or(Duration::MAX, |at| at.saturating_duration_since(since))
        }
    }

    /// Like [`Follower::follow_until`], for a follower that also gets the
    /// broadcasts (every connection does): those are skipped.
    pub async fn follow_until(follower: &mut Follower, count: usize) {
        let deadline = Instant::now() + PATIENCE * 6;
        while follower.received.len() < count {
            assert!(Instant::now() < deadline, "only {} of {count} arrived", follower.received.len());
            let push = follower.client.push().await;
            if push["unsubscribed"]["resubscribe"] == true {
                follower.recover().await;
            } else if push.get("publication").is_some() {
                follower.take(&push);
            }
        }
    }

    type Grpc = herald_proto::v1::broker_service_client::BrokerServiceClient<tonic::transport::Channel>;

    /// Publishes `requests` as one batch; says which were routed (none when
    /// the call failed as a whole).
    async fn publish(grpc: &mut Grpc, requests: Vec<PublishRequest>) -> Vec<bool> {
        let count = requests.len();
        let answer = tokio::time::timeout(PATIENCE, grpc.publish_batch(PublishBatchRequest { requests })).await;
        let results = match answer {
            Ok(Ok(answer)) => answer.into_inner().results,
            _ => Vec::new(),
        };
        (0..count)
            .map(|i| results.get(i).is_some_and(|r| matches!(r.outcome, Some(publish_result::Outcome::Published(_)))))
            .collect()
    }

    /// Publishes `1..=count` on `channel`, one each `interval`, each
    /// retried (same idempotency key) until taken.
    async fn publish_history(broker: String, channel: &'static str, count: u64, interval: Duration) {
        let mut grpc = grpc_client(&broker).await;
        let mut pace = tokio::time::interval(interval);
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for i in 1..=count {
            pace.tick().await;
            let mut request = text_publish(target::Kind::Channel(channel.into()), &i.to_string());
            request.idempotency_key = format!("{channel}-{i}");
            let deadline = Instant::now() + PATIENCE * 3;
            while publish(&mut grpc, vec![request.clone()]).await != [true] {
                assert!(Instant::now() < deadline, "history publication {i} refused for too long");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// One scenario's outcome: every client's deliveries, the history
    /// channel's `history` messages (checked whole by its followers), and
    /// the recovery time measured.
    /// Checks every client's delivery (each sound: nothing duplicated,
    /// reordered or misdelivered), printing it, and returns them with the
    /// longest recovery since `fault_ended` among the clients `watched` picks.
    pub async fn check_all(
        tallies: impl IntoIterator<Item = tokio::task::JoinHandle<Tally>>,
        published: &Published,
        fault_ended: Instant,
        watched: impl Fn(&Tally) -> bool,
    ) -> (Vec<Delivery>, Duration) {
        let mut deliveries = Vec::new();
        let mut recovery = Duration::ZERO;
        for tally in tallies {
            let tally = tally.await.expect("a client's tally");
            let delivery = tally.check(published);
            println!("client {} on {}: {delivery}", tally.connection_id, tally.worker_id);
            delivery.assert_sound();
            if watched(&tally) {
                recovery = recovery.max(delivery.recovery_after(published, fault_ended));
            }
            deliveries.push(delivery);
        }
        (deliveries, recovery)
    }

    pub fn outcome(scenario: &'static str, deliveries: &[Delivery], history: u64, recovery: Duration) -> Outcome {
        let sum = |field: fn(&Delivery) -> u64| deliveries.iter().map(field).sum::<u64>();
        Outcome {
            scenario,
            sent: sum(|d| d.expected) + history,
            lost: sum(|d| d.lost),
            duplicated: sum(|d| d.duplicated),
            misdelivered: sum(|d| d.misdelivered),
            recovery,
        }
    }
}
