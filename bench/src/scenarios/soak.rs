//! The soak scenario (issue 15), run by hand rather than in CI: does herald
//! hold steady over an hour of ordinary, varied traffic? A leak of a few
//! hundred bytes or one descriptor per connection, subscription or group
//! change shows only after tens of thousands of them, and a delivery bug may
//! need state to come and go many times; the ten-second scenarios see neither.
//!
//! For `--duration` (1 h), against herald started by the harness (standalone
//! unless split roles are asked for) or a running one:
//! - `-n` standing connections are held throughout by load-generator
//!   processes: half classic raw clients, half speaking herald.json.v1 and
//!   subscribed to every soak channel (`bench:soak-<i>`);
//! - this process churns connections: `--churn-rate` opened per second at a
//!   steady pace, each held `--hold`, then closed (half with a close frame, half
//!   by dropping the socket). Half speak herald.json.v1: subscribed to a soak
//!   channel on opening, moved to the next one half-way (unsubscribe, then
//!   subscribe). Each joins a group (`soak-<i>`) by a gRPC Control once settled;
//!   half leave it by Control before closing, the others by closing;
//! - one publisher sends `--rate` messages per second (unary gRPC `Publish`, one at a time), to
//!   targets drawn as `--mix` says: everyone, a standing or settled churned
//!   connection, a soak channel, a soak group.
//!
//! Every message must reach every connection that was live for it. A standing
//! connection must get every broadcast, every message sent to it and (the
//! herald.json.v1 half) every publication to the soak channels. A churned
//! connection must get every broadcast published between its greeting and the
//! moment it starts leaving, and every message to it, its channel or its group
//! published between the answer that put it there and that moment; it stays
//! open a grace period after, for those to arrive. Payloads carry a sequence
//! number per target, so lost, duplicated and misdelivered messages are
//! counted exactly; any of them fails the soak, as does any refused publish,
//! control, subscription or connect.
//!
//! Every `--sample-every` (1 min), the resident memory (VmRSS) and open
//! descriptors (entries of `/proc/<pid>/fd`) of each herald process are read.
//! After `--warmup` (5 min), a least-squares line through each process's
//! samples must rise less than an allowance ([`RSS_ALLOWANCE_KIB`],
//! [`FD_ALLOWANCE`] say which and why) over the rest of the soak. The samples
//! go to `soak.csv` and a plot of them to `soak.svg`, in `--out`.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cli::{Mix, SoakArgs};
use crate::clients::{self, Reader, Writer};
use crate::endpoints::WsUrl;
use crate::fleet::{Fleet, Progress};
use crate::message;
use crate::procfs::{self, CpuMeter, Watched};
use crate::procs::Endpoints;
use crate::publishers::{self, Address, Msg, Source, To, Via, xorshift};
use crate::rpc::{Rpc, group_change};
use crate::stats::{Column, Latency, Measurement, Row, thousands};

use super::{Bench, check_alive, print_table, standalone_unless_split, topology, watched};

/// Time after its greeting before a churned connection is sent messages or
/// joins a group: the broker learns of a connection from its gateway's next
/// directory report, and refuses to address one it does not know yet.
const SETTLE: Duration = Duration::from_secs(1);
/// Time between a churned connection's leaving (no message is expected after
/// it) and its close, for what was published just before to arrive.
const GRACE: Duration = Duration::from_secs(2);
/// How long a churned connection waits for the last message it must get on
/// a channel before it unsubscribes.
const ARRIVAL_WAIT: Duration = Duration::from_secs(2);
/// The shortest `--hold`: time to settle, a second of traffic, the grace.
const MIN_HOLD: Duration = Duration::from_secs(4);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long sockets a client closed stay in TIME_WAIT on Linux, holding
/// their source port: churned connections need enough source addresses.
const TIME_WAIT: Duration = Duration::from_secs(60);

/// RSS may rise by this much after warm-up (or by [`RSS_ALLOWANCE_FRACTION`]
/// of the process's RSS, if more) without failing the soak. Allocators keep
/// freed memory in their arenas and fragmentation moves RSS by a few MiB over
/// an hour with no leak; a leak worth finding does not hide under 16 MiB: at
/// the default churn, 16 MiB over the 55 minutes after warm-up is under 300
/// bytes per churned connection, while one connection's state is ~7 KiB.
const RSS_ALLOWANCE_KIB: f64 = 16.0 * 1024.0;
/// See [`RSS_ALLOWANCE_KIB`]: the allowance for a process that holds more.
const RSS_ALLOWANCE_FRACTION: f64 = 0.10;
/// Descriptors may rise by this much after warm-up, plus the spread of the
/// live connection count over the same samples (a gateway holds one
/// descriptor per connection, so its count legitimately moves with them).
/// The 32 are herald's own comings and goings (gRPC and admin connections,
/// a connection in its accept queue). A leak of one descriptor per thousand
/// churned connections exceeds it within the hour.
const FD_ALLOWANCE: f64 = 32.0;

const COLUMNS: [Column; 12] = [
    Column::Connections,
    Column::ConnectRate,
    Column::PublishRate,
    Column::Expected,
    Column::Received,
    Column::Lost,
    Column::Duplicated,
    Column::Misdelivered,
    Column::PublishErrors,
    Column::Closed,
    Column::Latency,
    Column::Cpu,
];

pub async fn run(args: &SoakArgs) -> anyhow::Result<()> {
    let common = standalone_unless_split(&args.common, args.split);
    let duration = common.duration;
    if args.connections < 2 {
        bail!("-n must be at least 2: half the standing connections are raw clients, half herald.json.v1");
    }
    if !(args.churn_rate > 0.0 && args.churn_rate.is_finite() && args.rate > 0.0 && args.rate.is_finite()) {
        bail!("--churn-rate and --rate must be above 0");
    }
    if args.hold < MIN_HOLD {
        bail!("--hold must be at least {MIN_HOLD:?}: a churned connection settles, then has a grace before closing");
    }
    if args.sample_every.is_zero() || duration < args.warmup + args.sample_every * 2 {
        bail!("--duration must leave at least 3 samples (--sample-every) after --warmup");
    }
    let churned_at_once = (args.churn_rate * args.hold.as_secs_f64()).ceil() as usize;
    let mut bench = Bench::new(&common)?;
    let mut herald = bench.herald(args.connections + churned_at_once, false).await?;
    let endpoints = herald.endpoints.clone();
    let label = topology(&common, args.connections + churned_at_once);
    eprintln!(
        "soak, {label}: {duration:?}, {} standing connections, {}/s churned (held {:?}), {}/s published, \
         sampled every {:?}, warm-up {:?}",
        args.connections, args.churn_rate, args.hold, args.rate, args.sample_every, args.warmup
    );

    let channel_names: Vec<String> = (0..args.channels).map(|i| format!("bench:soak-{i}")).collect();
    let raw_count = args.connections / 2;
    let (raw, raw_connected) = bench.clients(&endpoints, raw_count).await?;
    let (json, json_connected) = bench.subscribers(&endpoints, args.connections - raw_count, &channel_names).await?;
    let standing: Vec<Target> = raw_connected
        .addresses
        .iter()
        .chain(&json_connected.addresses)
        .map(|a| Ok(Target { address: Arc::new(Address::parse(a)?), issued: AtomicU64::new(0) }))
        .collect::<anyhow::Result<_>>()?;
    if standing.len() != args.connections {
        bail!("{} of {} standing connections connected: a soak needs all of them", standing.len(), args.connections);
    }
    let traffic = Arc::new(Traffic::new(standing, raw_count, args.channels, args.groups));
    let processes = herald_processes(&endpoints);
    if processes.is_empty() {
        bail!("no herald process to watch (give --gateway-pid for a running herald)");
    }

    let churn = Arc::new(Churn {
        urls: endpoints.ws_urls.clone(),
        sources: bench
            .sources
            .take((args.churn_rate * TIME_WAIT.as_secs_f64() / common.per_source.max(1) as f64).ceil() as usize + 1),
        traffic: traffic.clone(),
        rpc: Rpc::connect(&endpoints, 0).await?,
        hold: args.hold,
        channels: channel_names.clone(),
        groups: args.groups,
        stats: ChurnStats::default(),
    });
    let mut lane = publishers::lanes(Via::Grpc, &endpoints, 1, 1).await?.pop().context("no publisher lane")?;
    let mut source = SoakSource::new(traffic.clone(), args.mix, &channel_names, args.groups, args.payload);
    let mut watched_procs = watched(&endpoints, Some(&raw));
    watched_procs.extend(json.pids().into_iter().map(|pid| Watched { role: "clients".into(), pid }));
    let meter = CpuMeter::start(&watched_procs);

    let began = Instant::now();
    let rate = args.rate;
    let published = traffic.clone();
    let publishing = tokio::spawn(async move {
        let tally = publishers::paced(&mut lane, Via::Grpc, rate, 1, duration, &mut source).await;
        published.done.store(true, Ordering::SeqCst);
        tally
    });
    let churning = tokio::spawn(drive_churn(churn.clone(), began, duration, args.churn_rate));
    let gauges = Gauges {
        fleets: [raw.progress.clone(), json.progress.clone()],
        standing: args.connections as u64,
        traffic: &traffic,
        churn: &churn.stats,
    };
    let (samples, unreadable) = sample_until(&processes, began, duration, args.sample_every, &gauges).await;

    let tally = publishing.await.context("the publisher failed")?;
    let opened = churning.await.context("the churn driver failed")?;
    let churn_elapsed = began.elapsed().min(duration).as_secs_f64();
    let cpu = meter.finish();
    let standing = Standing::expected(&traffic);
    let (raw_m, json_m) = tokio::join!(drain(raw, standing.raw, args.drain), drain(json, standing.json, args.drain));
    let (raw_m, json_m) = (raw_m?, json_m?);
    check_alive(&mut herald);

    let stats = &churn.stats;
    let churned_expected = stats.expected.load(Ordering::Relaxed);
    let churned_lost = stats.lost.load(Ordering::Relaxed);
    let errors = tally.errors + stats.errors.load(Ordering::Relaxed);
    let mut latency = raw_m.latency;
    latency.merge(&json_m.latency);
    let m = Measurement {
        connections: args.connections as u64,
        ops_rate: opened as f64 / churn_elapsed.max(1e-9),
        publish_rate: tally.rate(),
        expected: standing.raw + standing.json + churned_expected,
        // Of the churned connections' deliveries, those they had to get (others are allowed).
        received: raw_m.delivered + json_m.delivered + churned_expected.saturating_sub(churned_lost),
        lost: raw_m.lost + json_m.lost + churned_lost,
        duplicated: raw_m.duplicated + json_m.duplicated + stats.duplicated.load(Ordering::Relaxed),
        misdelivered: raw_m.misdelivered + json_m.misdelivered + stats.misdelivered.load(Ordering::Relaxed),
        publish_errors: errors,
        closed: raw_m.closed + json_m.closed,
        latency: latency.percentiles(),
        cpu,
        ..Measurement::default()
    };
    let lost_by_kind: Vec<String> = Kind::ALL
        .iter()
        .map(|&kind| format!("{kind:?} {}", thousands(stats.lost_by_kind[kind as usize].load(Ordering::Relaxed))))
        .collect();
    eprintln!(
        "  churned: {} opened, {} failed to open, {} subscription changes, {} group changes; {} of {} expected \
         messages lost ({}); standing: {} of {} lost",
        thousands(opened),
        thousands(stats.failed.load(Ordering::Relaxed)),
        thousands(stats.subscription_changes.load(Ordering::Relaxed)),
        thousands(stats.group_changes.load(Ordering::Relaxed)),
        thousands(churned_lost),
        thousands(churned_expected),
        lost_by_kind.join(", "),
        thousands(raw_m.lost + json_m.lost),
        thousands(standing.raw + standing.json),
    );
    if let Some(e) = tally.first_error.clone().or_else(|| stats.first_error()) {
        eprintln!("    first error: {e}");
    }

    let verdicts = judge(&samples, args.warmup.as_secs_f64());
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let csv_path = args.out.join("soak.csv");
    let svg_path = args.out.join("soak.svg");
    std::fs::write(&csv_path, csv(&samples)).with_context(|| format!("writing {}", csv_path.display()))?;
    let plot = svg(&samples, args.warmup.as_secs_f64() / 60.0, duration.as_secs_f64() / 60.0);
    std::fs::write(&svg_path, plot).with_context(|| format!("writing {}", svg_path.display()))?;

    let title = format!(
        "soak: {} standing connections, {}/s churned (held {:?}, half herald.json.v1 moving between {} channels, \
         each in one of {} groups), {}/s published ({}), {} s; every message checked at every connection live \
         for it",
        args.connections,
        args.churn_rate,
        args.hold,
        args.channels,
        args.groups,
        args.rate,
        mix_label(&args.mix),
        duration.as_secs_f64()
    );
    print_table(&title, "herald", &COLUMNS, &[Row { label: label.clone(), measurement: m.clone() }]);
    println!(
        "\nMemory and descriptors after the {:?} warm-up (fitted rise: a least-squares line over the rest):\n",
        args.warmup
    );
    println!("{}", flatness_table(&verdicts));
    println!("Samples: {}; plot: {}", csv_path.display(), svg_path.display());

    let mut failures = Vec::new();
    if m.lost + m.duplicated + m.misdelivered > 0 {
        failures.push(format!(
            "{} lost, {} duplicated, {} misdelivered",
            thousands(m.lost),
            thousands(m.duplicated),
            thousands(m.misdelivered)
        ));
    }
    if errors > 0 {
        failures.push(format!("{} refused publishes, controls, subscriptions or connects", thousands(errors)));
    }
    if m.closed > 0 {
        failures.push(format!("{} standing connections closed", thousands(m.closed)));
    }
    if unreadable > 0 {
        failures.push(format!("{unreadable} readings of a herald process failed (did it exit?)"));
    }
    for (process, _) in processes.iter().filter(|(p, _)| !verdicts.iter().any(|v| v.process == *p)) {
        failures.push(format!("{process}: too few samples after warm-up to judge"));
    }
    for v in verdicts.iter().filter(|v| !v.flat()) {
        failures.push(format!(
            "{} is not flat after warm-up: RSS rose {:.0} KiB (limit {:.0}), descriptors {:.1} (limit {:.0})",
            v.process, v.rss.rise, v.rss.limit, v.fds.rise, v.fds.limit
        ));
    }
    if !failures.is_empty() {
        bail!("the soak failed: {}", failures.join("; "));
    }
    println!("\nPassed: 0 lost, duplicated or misdelivered; RSS and descriptors flat after warm-up.");
    Ok(())
}

/// The herald processes to sample, each under a name of its own (`herald`
/// standalone; `broker`, `gw0`, `gw1`, … otherwise). NATS is not herald.
fn herald_processes(endpoints: &Endpoints) -> Vec<(String, u32)> {
    let herald: Vec<&Watched> = endpoints.watched.iter().filter(|w| w.role != "nats").collect();
    let mut seen: Vec<(&str, usize)> = Vec::new();
    herald
        .iter()
        .map(|w| {
            let of_role = herald.iter().filter(|o| o.role == w.role).count();
            let nth = match seen.iter_mut().find(|(role, _)| *role == w.role) {
                Some((_, n)) => {
                    *n += 1;
                    *n
                }
                None => {
                    seen.push((&w.role, 0));
                    0
                }
            };
            let name = if of_role == 1 { w.role.clone() } else { format!("{}{nth}", w.role) };
            (name, w.pid)
        })
        .collect()
}

/// A connection messages are sent to, and how many have been issued to it.
struct Target {
    address: Arc<Address>,
    issued: AtomicU64,
}

/// What the publisher has issued to each target: the next sequence number.
/// Churned connections read it to know which messages they must get.
struct Traffic {
    broadcasts: AtomicU64,
    channels: Vec<AtomicU64>,
    groups: Vec<AtomicU64>,
    /// The standing connections: raw clients first, then the herald.json.v1 ones.
    standing: Vec<Target>,
    /// Where the herald.json.v1 standing connections start.
    json_from: usize,
    /// Churned connections settled enough to be sent messages.
    live: Mutex<Vec<Arc<Target>>>,
    /// Every message issued.
    issued: AtomicU64,
    /// Whether publishing is over (every message issued has been answered).
    done: AtomicBool,
}

impl Traffic {
    fn new(standing: Vec<Target>, json_from: usize, channels: u32, groups: u32) -> Self {
        Self {
            broadcasts: AtomicU64::new(0),
            channels: (0..channels).map(|_| AtomicU64::new(0)).collect(),
            groups: (0..groups).map(|_| AtomicU64::new(0)).collect(),
            standing,
            json_from,
            live: Mutex::new(Vec::new()),
            issued: AtomicU64::new(0),
            done: AtomicBool::new(false),
        }
    }

    /// Waits until herald has answered every message issued before the call.
    /// The publisher sends one message at a time and numbers the next only
    /// once the last is answered; so when two more have been numbered (one
    /// may have been half-way through numbering at the call), or publishing
    /// is over, the earlier ones are in.
    async fn answered(&self) {
        let issued = self.issued.load(Ordering::SeqCst);
        while self.issued.load(Ordering::SeqCst) < issued + 2 && !self.done.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn live(&self) -> MutexGuard<'_, Vec<Arc<Target>>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the standing connections must have received once publishing is over.
struct Standing {
    raw: u64,
    json: u64,
}

impl Standing {
    fn expected(traffic: &Traffic) -> Self {
        let to = |targets: &[Target]| targets.iter().map(|t| t.issued.load(Ordering::Relaxed)).sum::<u64>();
        let (raw, json) = traffic.standing.split_at(traffic.json_from);
        let broadcasts = traffic.broadcasts.load(Ordering::Relaxed);
        let publications: u64 = traffic.channels.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        Self {
            raw: raw.len() as u64 * broadcasts + to(raw),
            json: json.len() as u64 * (broadcasts + publications) + to(json),
        }
    }
}

/// The soak's messages: each to a kind of target drawn by the mix's
/// weights, numbered per target.
struct SoakSource {
    traffic: Arc<Traffic>,
    mix: Mix,
    channels: Vec<To>,
    groups: Vec<To>,
    rng: u64,
    payload: usize,
}

impl SoakSource {
    fn new(traffic: Arc<Traffic>, mix: Mix, channels: &[String], groups: u32, payload: usize) -> Self {
        Self {
            traffic,
            mix,
            channels: channels.iter().map(|name| To::channel(name)).collect(),
            groups: (0..groups).map(|i| To::Group(Arc::from(group_name(i as usize)))).collect(),
            rng: message::now_ns() | 1,
            payload,
        }
    }

    /// A target connection: a settled churned one half the time there is any,
    /// else a standing one. The number is taken while the churned connection
    /// is listed, so it knows every message it was issued.
    fn connection(&self, pick: u64) -> (To, u64) {
        let live = self.traffic.live();
        let target = if pick & 1 == 1 && !live.is_empty() {
            &live[(pick >> 1) as usize % live.len()]
        } else {
            &self.traffic.standing[(pick >> 1) as usize % self.traffic.standing.len()]
        };
        (To::Connection(target.address.clone()), target.issued.fetch_add(1, Ordering::SeqCst))
    }
}

impl Source for SoakSource {
    fn next(&mut self) -> Msg {
        self.rng = xorshift(self.rng);
        let pick = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let Mix { broadcast, connection, channel, group } = self.mix;
        let draw = (pick >> 40) % u64::from(broadcast + connection + channel + group);
        let (to, seq) = if draw < u64::from(broadcast) {
            (To::Everyone, self.traffic.broadcasts.fetch_add(1, Ordering::SeqCst))
        } else if draw < u64::from(broadcast + connection) {
            self.connection(pick & 0xff_ffff_ffff)
        } else if draw < u64::from(broadcast + connection + channel) {
            let i = pick as usize % self.channels.len();
            (self.channels[i].clone(), self.traffic.channels[i].fetch_add(1, Ordering::SeqCst))
        } else {
            let i = pick as usize % self.groups.len();
            (self.groups[i].clone(), self.traffic.groups[i].fetch_add(1, Ordering::SeqCst))
        };
        self.traffic.issued.fetch_add(1, Ordering::SeqCst);
        let payload = message::encode(seq, to.label(), self.payload);
        Msg { to, payload, key: String::new() }
    }
}

/// The kinds of target, by the label their messages carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Broadcast,
    Connection,
    Channel,
    Group,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Broadcast, Kind::Connection, Kind::Channel, Kind::Group];

    fn of(label: &str) -> Self {
        if label == message::BROADCAST {
            Self::Broadcast
        } else if label.contains('/') {
            Self::Connection
        } else if label.contains('~') {
            Self::Channel
        } else {
            Self::Group
        }
    }
}

fn group_name(i: usize) -> String {
    format!("soak-{i}")
}

fn mix_label(mix: &Mix) -> String {
    let total = f64::from(mix.broadcast + mix.connection + mix.channel + mix.group).max(1.0);
    let pct = |w: u32| f64::from(w) / total * 100.0;
    format!(
        "{:.0}% broadcast, {:.0}% to connections, {:.0}% to channels, {:.0}% to groups",
        pct(mix.broadcast),
        pct(mix.connection),
        pct(mix.channel),
        pct(mix.group)
    )
}

/// What the churned connections came to, all together.
#[derive(Default)]
struct ChurnStats {
    /// Connections open now.
    live: AtomicU64,
    failed: AtomicU64,
    expected: AtomicU64,
    delivered: AtomicU64,
    lost: AtomicU64,
    lost_by_kind: [AtomicU64; 4],
    duplicated: AtomicU64,
    misdelivered: AtomicU64,
    /// Failed connects, commands and controls, and wrong answers to them.
    errors: AtomicU64,
    subscription_changes: AtomicU64,
    group_changes: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl ChurnStats {
    fn error(&self, reason: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.first_error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(reason);
    }

    fn first_error(&self) -> Option<String> {
        self.first_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What every churned connection shares.
struct Churn {
    urls: Vec<WsUrl>,
    sources: Vec<Ipv4Addr>,
    traffic: Arc<Traffic>,
    rpc: Rpc,
    hold: Duration,
    channels: Vec<String>,
    groups: u32,
    stats: ChurnStats,
}

/// Opens churned connections at `rate` per second from `began` for
/// `duration`, each living out its schedule on a task of its own; returns
/// how many were opened once every one has closed.
async fn drive_churn(churn: Arc<Churn>, began: Instant, duration: Duration, rate: f64) -> u64 {
    let mut tasks = JoinSet::new();
    let mut index = 0u64;
    loop {
        let at = began + Duration::from_secs_f64(index as f64 / rate);
        if at >= began + duration {
            break;
        }
        tokio::time::sleep_until(at).await;
        let mine = churn.clone();
        tasks.spawn(async move { churned(&mine, index, at).await });
        index += 1;
        while let Some(done) = tasks.try_join_next() {
            if let Err(e) = done {
                churn.stats.error(format!("a churned connection's task failed: {e}"));
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            churn.stats.error(format!("a churned connection's task failed: {e}"));
        }
    }
    index
}

/// One churned connection, from its connect at `opened` to its close.
async fn churned(churn: &Churn, index: u64, opened: Instant) {
    let stats = &churn.stats;
    let json = index.is_multiple_of(2);
    let url = &churn.urls[index as usize % churn.urls.len()];
    let source = churn.sources[index as usize % churn.sources.len()];
    let connecting = async {
        let client = if json {
            clients::connect_speaking(url, source).await?
        } else {
            clients::connect(url, source, None, &[]).await?
        };
        Ok::<_, anyhow::Error>((Arc::new(Address::parse(&client.address)?), client))
    };
    let (address, client) = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(connected)) => connected,
        Ok(Err(e)) => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            return stats.error(format!("{e:#}"));
        }
        Err(_) => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            return stats.error(format!("connect to {url} timed out"));
        }
    };
    stats.live.fetch_add(1, Ordering::Relaxed);
    let broadcasts_from = churn.traffic.broadcasts.load(Ordering::SeqCst);
    let received = Arc::new(Mutex::new(Received::new(&address.joined)));
    let (reader, writer) = client.split();
    let (replies_tx, replies) = mpsc::unbounded_channel();
    let mut reading = tokio::spawn(read(reader, json, received.clone(), replies_tx));
    let mut session = Session {
        churn,
        index,
        opened,
        address,
        received: received.clone(),
        commands: Commands { writer: writer.clone(), replies, next_id: 0 },
        expected: Vec::new(),
    };
    if let Err(e) = session.live_out(json, broadcasts_from).await {
        stats.error(format!("churned connection {}: {e:#}", session.address.joined));
    }
    tokio::time::sleep_until(opened + churn.hold).await;
    // Half close politely (a close frame, and the server's answer ends the
    // reader), the others abruptly (the socket closes once both halves are dropped).
    let polite = (index / 2).is_multiple_of(2);
    let closed =
        polite && writer.close().await.is_ok() && tokio::time::timeout(CLOSE_TIMEOUT, &mut reading).await.is_ok();
    if !closed {
        reading.abort();
        // Cancelled or ended: either way the reader is done.
        let _ = reading.await;
    }
    let expected = std::mem::take(&mut session.expected);
    let session_address = session.address.joined.clone();
    drop(session);
    drop(writer);
    stats.live.fetch_sub(1, Ordering::Relaxed);
    let received = received.lock().unwrap_or_else(|e| e.into_inner());
    for (label, issued) in &expected {
        stats.expected.fetch_add(issued.end.saturating_sub(issued.start), Ordering::Relaxed);
        let missing = received.missing(label, issued.clone());
        if missing > 0 {
            let kind = Kind::of(label);
            stats.lost_by_kind[kind as usize].fetch_add(missing, Ordering::Relaxed);
            if stats.lost.fetch_add(missing, Ordering::Relaxed) == 0 {
                eprintln!(
                    "    first loss: churned connection {} ({}) missed {missing} of {label} {issued:?} ({kind:?})",
                    session_address,
                    if json { "herald.json.v1" } else { "raw" },
                );
            }
        }
    }
    stats.delivered.fetch_add(received.delivered, Ordering::Relaxed);
    stats.duplicated.fetch_add(received.duplicated, Ordering::Relaxed);
    stats.misdelivered.fetch_add(received.misdelivered, Ordering::Relaxed);
}

/// A churned connection's life between its greeting and its close.
struct Session<'a> {
    churn: &'a Churn,
    index: u64,
    opened: Instant,
    address: Arc<Address>,
    received: Arc<Mutex<Received>>,
    commands: Commands,
    /// Per target label, the sequence numbers this connection must receive.
    expected: Vec<(String, Range<u64>)>,
}

impl Session<'_> {
    /// Subscribes (herald.json.v1 only), settles, joins its group, moves to
    /// another channel half-way, then leaves: from then on it expects nothing.
    async fn live_out(&mut self, json: bool, broadcasts_from: u64) -> anyhow::Result<()> {
        let churn = self.churn;
        let traffic = &churn.traffic;
        let mut channel = None;
        if json {
            channel = Some(self.subscribe(self.index as usize % churn.channels.len()).await?);
        }
        tokio::time::sleep_until(self.opened + SETTLE).await;
        let listed = Listed::new(traffic, &self.address);
        let group = self.index as usize % churn.groups as usize;
        self.accept(group_name(group));
        self.change_group(group, true).await?;
        let group_from = traffic.groups[group].load(Ordering::SeqCst);
        if let Some((from_channel, from)) = channel.take() {
            tokio::time::sleep_until(self.opened + churn.hold / 2).await;
            let name = &churn.channels[from_channel];
            let to = traffic.channels[from_channel].load(Ordering::SeqCst);
            let label = message::channel_label(name);
            self.expected.push((label.clone(), from..to));
            // What it must get must reach it before it unsubscribes: herald's
            // answer to a publish means the broker routed it, and the
            // unsubscribe, going straight to the gateway, could overtake it.
            traffic.answered().await;
            self.arrived(&label, from..to).await;
            self.commands.change(name, false).await?;
            churn.stats.subscription_changes.fetch_add(1, Ordering::SeqCst);
            channel = Some(self.subscribe((from_channel + 1) % churn.channels.len()).await?);
        }
        tokio::time::sleep_until(self.opened + churn.hold - GRACE).await;
        let targeted = listed.leave();
        self.expected.push((self.address.joined.clone(), 0..targeted));
        self.expected.push((message::BROADCAST.to_owned(), broadcasts_from..traffic.broadcasts.load(Ordering::SeqCst)));
        if let Some((i, from)) = channel {
            let to = traffic.channels[i].load(Ordering::SeqCst);
            self.expected.push((message::channel_label(&churn.channels[i]), from..to));
        }
        self.expected.push((group_name(group), group_from..traffic.groups[group].load(Ordering::SeqCst)));
        // Half leave their group by Control; the others leave it by closing.
        if (self.index / 4).is_multiple_of(2) {
            traffic.answered().await;
            self.change_group(group, false).await?;
        }
        Ok(())
    }

    /// Subscribes to soak channel `i`: the channel and the first publication
    /// on it this connection must get.
    async fn subscribe(&mut self, i: usize) -> anyhow::Result<(usize, u64)> {
        let name = &self.churn.channels[i];
        self.accept(message::channel_label(name));
        self.commands.change(name, true).await?;
        self.churn.stats.subscription_changes.fetch_add(1, Ordering::SeqCst);
        Ok((i, self.churn.traffic.channels[i].load(Ordering::SeqCst)))
    }

    /// Joins or leaves soak group `i` by a gRPC Control on this connection.
    async fn change_group(&self, i: usize, join: bool) -> anyhow::Result<()> {
        let op = group_change(&self.address, &group_name(i), join);
        let answer = self.churn.rpc.clone().control(op).await.context("a group Control")?;
        if answer.connections != 1 || !answer.missing_workers.is_empty() {
            bail!("a group Control answered {answer:?}");
        }
        self.churn.stats.group_changes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Makes the connection take messages to `label` as its own (before
    /// asking for them: they may come before the answer does).
    fn accept(&self, label: String) {
        self.received.lock().unwrap_or_else(|e| e.into_inner()).accept(label);
    }

    /// Waits (at most [`ARRIVAL_WAIT`]) until the last of `expected` on
    /// `label` has arrived; what has not by then is counted lost at the end.
    async fn arrived(&self, label: &str, expected: Range<u64>) {
        let Some(last) = expected.end.checked_sub(1).filter(|last| *last >= expected.start) else { return };
        let deadline = tokio::time::Instant::now() + ARRIVAL_WAIT;
        while !self.received.lock().unwrap_or_else(|e| e.into_inner()).has(label, last)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A churned connection on the publisher's list of targets, until it
/// leaves (or is dropped on the way, after an error).
struct Listed<'a> {
    traffic: &'a Traffic,
    target: Arc<Target>,
}

impl<'a> Listed<'a> {
    fn new(traffic: &'a Traffic, address: &Arc<Address>) -> Self {
        let target = Arc::new(Target { address: address.clone(), issued: AtomicU64::new(0) });
        traffic.live().push(target.clone());
        Self { traffic, target }
    }

    /// Takes the connection off the list: the number of messages issued to it.
    fn leave(self) -> u64 {
        self.unlist()
    }

    fn unlist(&self) -> u64 {
        // The publisher numbers a message to a listed connection while it holds this lock.
        let mut live = self.traffic.live();
        live.retain(|t| !Arc::ptr_eq(t, &self.target));
        self.target.issued.load(Ordering::Relaxed)
    }
}

impl Drop for Listed<'_> {
    fn drop(&mut self) {
        self.unlist();
    }
}

/// Client-protocol commands on a churned connection whose reader hands the
/// replies over.
struct Commands {
    writer: Writer,
    replies: mpsc::UnboundedReceiver<serde_json::Value>,
    next_id: u64,
}

impl Commands {
    /// Subscribes to `channel` or unsubscribes from it; fails unless the reply says it was done.
    async fn change(&mut self, channel: &str, subscribe: bool) -> anyhow::Result<()> {
        let (command, done) = if subscribe { ("subscribe", "subscribed") } else { ("unsubscribe", "unsubscribed") };
        self.next_id += 1;
        let id = self.next_id;
        let text = serde_json::json!({ "id": id, command: { "channel": channel } }).to_string();
        self.writer.command(&text).await.with_context(|| format!("{command} {channel}"))?;
        loop {
            let reply = tokio::time::timeout(COMMAND_TIMEOUT, self.replies.recv())
                .await
                .map_err(|_| anyhow::anyhow!("{command} {channel}: no reply within {COMMAND_TIMEOUT:?}"))?
                .with_context(|| format!("{command} {channel}: the connection ended"))?;
            if reply["id"] == id {
                if reply.get(done).is_some() {
                    return Ok(());
                }
                bail!("{command} {channel}: {reply}");
            }
        }
    }
}

/// Reads a churned connection until it ends: checks every message, and
/// hands command replies (herald.json.v1) to `replies`.
async fn read(
    mut reader: Reader,
    json: bool,
    received: Arc<Mutex<Received>>,
    replies: mpsc::UnboundedSender<serde_json::Value>,
) {
    while let Some(text) = reader.next_text().await {
        let payload = if json { message::pushed_text(text.as_bytes()) } else { Some(text.as_bytes()) };
        if let Some(header) = payload.and_then(message::parse) {
            received.lock().unwrap_or_else(|e| e.into_inner()).message(header.target, header.seq);
            continue;
        }
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(reply) if json && reply.get("id").is_some() => {
                // The session may be gone (its schedule failed): the reply then matters to nobody.
                let _ = replies.send(reply);
            }
            _ => received.lock().unwrap_or_else(|e| e.into_inner()).misdelivered += 1,
        }
    }
}

/// What one churned connection received: for each target it takes as its
/// own (everyone, its address, the channels and groups it was put in), the
/// sequence numbers seen.
#[derive(Debug)]
struct Received {
    streams: Vec<(String, HashSet<u64>)>,
    delivered: u64,
    duplicated: u64,
    misdelivered: u64,
}

impl Received {
    fn new(address: &str) -> Self {
        let streams = vec![(message::BROADCAST.to_owned(), HashSet::new()), (address.to_owned(), HashSet::new())];
        Self { streams, delivered: 0, duplicated: 0, misdelivered: 0 }
    }

    fn has(&self, label: &str, seq: u64) -> bool {
        self.streams.iter().any(|(l, seen)| l == label && seen.contains(&seq))
    }

    fn accept(&mut self, label: String) {
        if !self.streams.iter().any(|(l, _)| *l == label) {
            self.streams.push((label, HashSet::new()));
        }
    }

    fn message(&mut self, target: &[u8], seq: u64) {
        match self.streams.iter_mut().find(|(label, _)| label.as_bytes() == target) {
            Some((_, seen)) => {
                if seen.insert(seq) {
                    self.delivered += 1;
                } else {
                    self.duplicated += 1;
                }
            }
            None => self.misdelivered += 1,
        }
    }

    /// How many of the sequence numbers `issued` to `label` never arrived.
    fn missing(&self, label: &str, issued: Range<u64>) -> u64 {
        match self.streams.iter().find(|(l, _)| l == label) {
            Some((_, seen)) => issued.filter(|seq| !seen.contains(seq)).count() as u64,
            None => issued.end.saturating_sub(issued.start),
        }
    }
}

/// What one fleet of standing connections received, once drained.
struct Delivered {
    delivered: u64,
    lost: u64,
    duplicated: u64,
    misdelivered: u64,
    closed: u64,
    latency: Latency,
}

/// Waits (at most `within`) for `fleet` to have received `expected`
/// messages, then reads its figures and stops it.
async fn drain(mut fleet: Fleet, expected: u64, within: Duration) -> anyhow::Result<Delivered> {
    fleet.progress.wait_delivered(expected, within).await;
    let reports = fleet.reports(Duration::from_secs(30)).await?;
    let mut total =
        Delivered { delivered: 0, lost: 0, duplicated: 0, misdelivered: 0, closed: 0, latency: Latency::new() };
    for report in &reports {
        total.delivered += report.delivered;
        total.duplicated += report.duplicated;
        total.misdelivered += report.misdelivered;
        total.closed += report.closed;
        total.latency.merge(&report.latency());
    }
    total.lost = expected.saturating_sub(total.delivered);
    Ok(total)
}

/// One reading of one herald process.
#[derive(Debug, Clone)]
struct Sample {
    /// Seconds since the soak began.
    at_s: f64,
    process: String,
    rss_kib: u64,
    fds: u64,
    /// Connections open at the time (standing and churned).
    connections: u64,
    /// Messages issued so far.
    sent: u64,
    /// Messages received so far (churned connections count theirs as they close).
    received: u64,
}

/// What the sampler reads besides /proc.
struct Gauges<'a> {
    fleets: [Arc<Progress>; 2],
    standing: u64,
    traffic: &'a Traffic,
    churn: &'a ChurnStats,
}

/// Reads every process in `processes` at `began`, then every `every` until
/// `duration` has passed; returns the samples and how many readings failed.
async fn sample_until(
    processes: &[(String, u32)],
    began: Instant,
    duration: Duration,
    every: Duration,
    gauges: &Gauges<'_>,
) -> (Vec<Sample>, usize) {
    let mut samples = Vec::new();
    let mut unreadable = 0;
    for n in 0u32.. {
        let at = began + every * n;
        if at > began + duration {
            break;
        }
        tokio::time::sleep_until(at).await;
        let at_s = (every * n).as_secs_f64();
        let closed: u64 = gauges.fleets.iter().map(|f| f.closed()).sum();
        let connections = gauges.standing.saturating_sub(closed) + gauges.churn.live.load(Ordering::Relaxed);
        let sent = gauges.traffic.issued.load(Ordering::Relaxed);
        let received =
            gauges.fleets.iter().map(|f| f.delivered()).sum::<u64>() + gauges.churn.delivered.load(Ordering::Relaxed);
        let seconds = (every * n).as_secs();
        let mut line = format!("  {:>3}:{:02}:", seconds / 60, seconds % 60);
        for (process, pid) in processes {
            match (procfs::rss_kib(*pid), procfs::open_fds(*pid)) {
                (Ok(rss_kib), Ok(fds)) => {
                    let _ = write!(line, " {process} {:.1} MiB {} fds;", rss_kib as f64 / 1024.0, thousands(fds));
                    let process = process.clone();
                    samples.push(Sample { at_s, process, rss_kib, fds, connections, sent, received });
                }
                (Err(e), _) | (_, Err(e)) => {
                    unreadable += 1;
                    let _ = write!(line, " {process} unreadable ({e:#});");
                }
            }
        }
        eprintln!(
            "{line} {} connections, {} sent, {} received",
            thousands(connections),
            thousands(sent),
            thousands(received)
        );
    }
    (samples, unreadable)
}

/// A least-squares line through `points`: `(slope, intercept)`; `None`
/// without two distinct x values.
fn fit(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    if points.len() < 2 || sxx <= 0.0 {
        return None;
    }
    let slope = sxy / sxx;
    Some((slope, mean_y - slope * mean_x))
}

/// How one figure of one process moved after warm-up.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Trend {
    /// At the first sample after warm-up, and at the last.
    first: f64,
    last: f64,
    /// Of the fitted line, per hour.
    slope_per_hour: f64,
    /// Of the fitted line, from the first sample after warm-up to the last.
    rise: f64,
    /// The most `rise` may be.
    limit: f64,
}

impl Trend {
    /// The trend of `points` (seconds, value); `limit` is given the first value.
    fn of(points: &[(f64, f64)], limit: impl Fn(f64) -> f64) -> Option<Self> {
        let (slope, _) = fit(points)?;
        let (first, last) = (points.first()?, points.last()?);
        Some(Self {
            first: first.1,
            last: last.1,
            slope_per_hour: slope * 3600.0,
            rise: slope * (last.0 - first.0),
            limit: limit(first.1),
        })
    }

    fn flat(&self) -> bool {
        self.rise <= self.limit
    }
}

/// One process's flatness after warm-up: RSS in KiB, descriptors.
#[derive(Debug)]
struct Verdict {
    process: String,
    rss: Trend,
    fds: Trend,
}

impl Verdict {
    fn flat(&self) -> bool {
        self.rss.flat() && self.fds.flat()
    }
}

/// Judges every process on its samples from `warmup_s` on (processes with
/// fewer than two such samples get no verdict).
fn judge(samples: &[Sample], warmup_s: f64) -> Vec<Verdict> {
    let after: Vec<&Sample> = samples.iter().filter(|s| s.at_s >= warmup_s).collect();
    let connections = after.iter().map(|s| s.connections);
    let spread = connections.clone().max().unwrap_or(0) - connections.min().unwrap_or(0);
    let mut processes: Vec<&str> = Vec::new();
    for s in &after {
        if !processes.contains(&s.process.as_str()) {
            processes.push(&s.process);
        }
    }
    processes
        .into_iter()
        .filter_map(|process| {
            let mine: Vec<&&Sample> = after.iter().filter(|s| s.process == process).collect();
            let rss: Vec<(f64, f64)> = mine.iter().map(|s| (s.at_s, s.rss_kib as f64)).collect();
            let fds: Vec<(f64, f64)> = mine.iter().map(|s| (s.at_s, s.fds as f64)).collect();
            Some(Verdict {
                process: process.to_owned(),
                rss: Trend::of(&rss, |first| (first * RSS_ALLOWANCE_FRACTION).max(RSS_ALLOWANCE_KIB))?,
                fds: Trend::of(&fds, |_| FD_ALLOWANCE + spread as f64)?,
            })
        })
        .collect()
}

/// The verdicts as a markdown table.
fn flatness_table(verdicts: &[Verdict]) -> String {
    let mut out = String::from(
        "| process | RSS MiB | RSS growth | RSS slope | fitted rise / limit | fds | fds growth | fds slope | \
         fitted rise / limit | flat |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n",
    );
    for v in verdicts {
        let (rss, fds) = (&v.rss, &v.fds);
        let growth_pct = (rss.last - rss.first) / rss.first.max(1.0) * 100.0;
        let _ = writeln!(
            out,
            "| {} | {:.1} → {:.1} | {:+.0} KiB ({growth_pct:+.1}%) | {:+.0} KiB/h | {:+.0} / {:.0} KiB | {:.0} → {:.0} \
             | {:+.0} | {:+.1}/h | {:+.1} / {:.0} | {} |",
            v.process,
            rss.first / 1024.0,
            rss.last / 1024.0,
            rss.last - rss.first,
            rss.slope_per_hour,
            rss.rise,
            rss.limit,
            fds.first,
            fds.last,
            fds.last - fds.first,
            fds.slope_per_hour,
            fds.rise,
            fds.limit,
            if v.flat() { "yes" } else { "**no**" }
        );
    }
    out
}

/// The samples as CSV, one line per process per sample.
fn csv(samples: &[Sample]) -> String {
    let mut out = String::from("time_s,process,rss_kib,fds,connections,sent,received\n");
    for s in samples {
        let _ = writeln!(
            out,
            "{:.0},{},{},{},{},{},{}",
            s.at_s, s.process, s.rss_kib, s.fds, s.connections, s.sent, s.received
        );
    }
    out
}

/// One chart of the plot: a line per process, (minutes, value) points.
struct Chart<'a> {
    title: &'a str,
    unit: &'a str,
    lines: Vec<(&'a str, Vec<(f64, f64)>)>,
}

const PLOT_WIDTH: f64 = 760.0;
const CHART_HEIGHT: f64 = 280.0;
const MARGIN_LEFT: f64 = 70.0;
const MARGIN_RIGHT: f64 = 130.0;
const MARGIN_TOP: f64 = 36.0;
const MARGIN_BOTTOM: f64 = 46.0;
const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

/// The plot of `samples`: RSS (MiB) above descriptors, minutes along, the
/// warm-up shaded.
fn svg(samples: &[Sample], warmup_min: f64, end_min: f64) -> String {
    let mut rss: Vec<(&str, Vec<(f64, f64)>)> = Vec::new();
    let mut fds: Vec<(&str, Vec<(f64, f64)>)> = Vec::new();
    for s in samples {
        let at = s.at_s / 60.0;
        let i = match rss.iter().position(|(p, _)| *p == s.process) {
            Some(i) => i,
            None => {
                rss.push((&s.process, Vec::new()));
                fds.push((&s.process, Vec::new()));
                rss.len() - 1
            }
        };
        rss[i].1.push((at, s.rss_kib as f64 / 1024.0));
        fds[i].1.push((at, s.fds as f64));
    }
    let charts = [
        Chart { title: "Resident memory (VmRSS) per herald process", unit: "MiB", lines: rss },
        Chart { title: "Open file descriptors per herald process", unit: "descriptors", lines: fds },
    ];
    plot(&charts, warmup_min, end_min)
}

/// A standalone SVG document of `charts`, stacked.
fn plot(charts: &[Chart], warmup_min: f64, end_min: f64) -> String {
    let height = CHART_HEIGHT * charts.len() as f64;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{PLOT_WIDTH}" height="{height}" viewBox="0 0 {PLOT_WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="{PLOT_WIDTH}" height="{height}" fill="white"/>"#);
    for (i, chart) in charts.iter().enumerate() {
        draw(&mut out, chart, i as f64 * CHART_HEIGHT, warmup_min, end_min);
    }
    out.push_str("</svg>\n");
    out
}

/// Draws one chart whose box starts `top` pixels down.
fn draw(out: &mut String, chart: &Chart, top: f64, warmup_min: f64, end_min: f64) {
    let (left, right) = (MARGIN_LEFT, PLOT_WIDTH - MARGIN_RIGHT);
    let (upper, lower) = (top + MARGIN_TOP, top + CHART_HEIGHT - MARGIN_BOTTOM);
    let x_max = end_min.max(1e-9);
    let highest = chart.lines.iter().flat_map(|(_, points)| points.iter().map(|p| p.1)).fold(0.0, f64::max);
    let y_step = nice_step(highest, 5.0);
    let y_max = (highest / y_step).ceil().max(1.0) * y_step;
    let x = |minutes: f64| left + (minutes / x_max).clamp(0.0, 1.0) * (right - left);
    let y = |value: f64| lower - (value / y_max).clamp(0.0, 1.0) * (lower - upper);
    let _ = writeln!(
        out,
        r#"<text x="{left}" y="{}" font-size="14" font-weight="bold">{}</text>"#,
        top + 22.0,
        escape(chart.title)
    );
    let _ = writeln!(
        out,
        r##"<rect x="{left}" y="{upper}" width="{:.1}" height="{:.1}" fill="#ececec"/><text x="{:.1}" y="{:.1}" fill="#777">warm-up</text>"##,
        x(warmup_min) - left,
        lower - upper,
        left + 4.0,
        upper + 14.0
    );
    let mut value = 0.0;
    while value <= y_max + y_step / 2.0 {
        let _ = writeln!(
            out,
            r##"<line x1="{left}" y1="{0:.1}" x2="{right}" y2="{0:.1}" stroke="#dddddd"/><text x="{1}" y="{2:.1}" text-anchor="end">{3}</text>"##,
            y(value),
            left - 6.0,
            y(value) + 4.0,
            tick_label(value, y_step)
        );
        value += y_step;
    }
    let x_step = nice_step(x_max, 6.0);
    let mut minute = 0.0;
    while minute <= x_max + x_step / 1000.0 {
        let _ = writeln!(
            out,
            r#"<line x1="{0:.1}" y1="{lower}" x2="{0:.1}" y2="{1}" stroke="black"/><text x="{0:.1}" y="{2}" text-anchor="middle">{3}</text>"#,
            x(minute),
            lower + 5.0,
            lower + 18.0,
            tick_label(minute, x_step)
        );
        minute += x_step;
    }
    let _ = writeln!(
        out,
        r#"<line x1="{left}" y1="{lower}" x2="{right}" y2="{lower}" stroke="black"/><line x1="{left}" y1="{upper}" x2="{left}" y2="{lower}" stroke="black"/>"#
    );
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{}" text-anchor="middle">minutes</text>"#,
        (left + right) / 2.0,
        lower + 36.0
    );
    let _ = writeln!(
        out,
        r#"<text transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        (upper + lower) / 2.0,
        escape(chart.unit)
    );
    for (i, (name, points)) in chart.lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let coordinates: Vec<String> = points.iter().map(|&(m, v)| format!("{:.1},{:.1}", x(m), y(v))).collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
            coordinates.join(" ")
        );
        let key = upper + 8.0 + 18.0 * i as f64;
        let _ = writeln!(
            out,
            r#"<line x1="{0}" y1="{key:.1}" x2="{1}" y2="{key:.1}" stroke="{color}" stroke-width="2"/><text x="{2}" y="{3:.1}">{4}</text>"#,
            right + 12.0,
            right + 30.0,
            right + 36.0,
            key + 4.0,
            escape(name)
        );
    }
}

/// A round step (1, 2 or 5 times a power of ten) giving about `ticks` ticks up to `range`.
fn nice_step(range: f64, ticks: f64) -> f64 {
    if !(range > 0.0 && range.is_finite()) {
        return 1.0;
    }
    let raw = range / ticks;
    let magnitude = 10f64.powf(raw.log10().floor());
    let nice = match raw / magnitude {
        f if f <= 1.0 => 1.0,
        f if f <= 2.0 => 2.0,
        f if f <= 5.0 => 5.0,
        _ => 10.0,
    };
    nice * magnitude
}

/// A tick value with as many decimals as its step needs.
fn tick_label(value: f64, step: f64) -> String {
    let decimals = if step >= 1.0 { 0 } else { (-step.log10().floor()) as usize };
    format!("{value:.decimals$}")
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_s: f64, process: &str, rss_kib: u64, fds: u64, connections: u64) -> Sample {
        Sample { at_s, process: process.into(), rss_kib, fds, connections, sent: 0, received: 0 }
    }

    #[test]
    fn a_line_is_fitted_by_least_squares() {
        let (slope, intercept) = fit(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]).unwrap();
        assert!((slope - 2.0).abs() < 1e-9 && (intercept - 1.0).abs() < 1e-9);
        let (slope, _) = fit(&[(0.0, 0.0), (1.0, 1.0), (2.0, 0.0), (3.0, 1.0)]).unwrap();
        assert!((slope - 0.2).abs() < 1e-9, "{slope}");
        assert_eq!(fit(&[(1.0, 1.0)]), None);
        assert_eq!(fit(&[(1.0, 1.0), (1.0, 2.0)]), None);
    }

    #[test]
    fn flat_processes_pass_and_growing_ones_fail_after_warm_up() {
        let mut samples = Vec::new();
        for minute in 0..=60u64 {
            let at = minute as f64 * 60.0;
            let connections = 1200 + minute % 3;
            // Warm-up: the steady process grows, then stays within noise.
            let steady = if minute < 5 { 40_000 + minute * 2_000 } else { 50_000 + (minute % 4) * 300 };
            samples.push(sample(at, "gw", steady, 1_250 + minute % 3, connections));
            // 1 MiB a minute: 55 MiB over the hour after warm-up.
            samples.push(sample(at, "leaky", 50_000 + minute * 1024, 40, connections));
            // One descriptor a minute.
            samples.push(sample(at, "fds", 50_000, 40 + minute, connections));
        }
        let verdicts = judge(&samples, 300.0);
        assert_eq!(verdicts.iter().map(|v| v.process.as_str()).collect::<Vec<_>>(), ["gw", "leaky", "fds"]);
        let [gw, leaky, fds] = &verdicts[..] else { panic!("three verdicts") };
        assert!(gw.flat(), "{gw:?}");
        assert_eq!((gw.rss.first, gw.rss.limit), (50_300.0, RSS_ALLOWANCE_KIB), "the first sample after warm-up");
        assert_eq!(gw.fds.limit, FD_ALLOWANCE + 2.0, "plus the spread of the connections");
        assert!(!leaky.rss.flat() && leaky.fds.flat(), "{leaky:?}");
        assert!((leaky.rss.slope_per_hour - 60.0 * 1024.0).abs() < 1e-6);
        assert!((leaky.rss.rise - 55.0 * 1024.0).abs() < 1e-6);
        assert!(fds.rss.flat() && !fds.fds.flat(), "{fds:?}");
        let table = flatness_table(&verdicts);
        assert_eq!(table.lines().count(), 5);
        assert!(table.lines().nth(3).unwrap().ends_with("| **no** |"), "{table}");
        let big = Trend::of(&[(0.0, 1_000_000.0), (60.0, 1_050_000.0)], |first| first * RSS_ALLOWANCE_FRACTION);
        assert!(big.unwrap().flat(), "10% of a large process");
        assert!(judge(&samples, 3_600.0).is_empty(), "one sample after warm-up is no trend");
    }

    #[test]
    fn the_plot_is_one_well_formed_svg_with_a_line_per_process_and_chart() {
        let samples: Vec<Sample> = (0..10u32)
            .flat_map(|i| {
                let at = f64::from(i) * 10.0;
                [sample(at, "broker", 20_000, 30, 5), sample(at, "gw<0>", 40_000 + u64::from(i), 1_200, 5)]
            })
            .collect();
        let doc = svg(&samples, 0.5, 1.5);
        assert!(doc.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""), "{doc}");
        assert!(doc.ends_with("</svg>\n"));
        assert_eq!(doc.matches("<polyline").count(), 4, "2 processes × 2 charts");
        assert_eq!(doc.matches("<svg").count(), 1);
        assert!(doc.contains("gw&lt;0&gt;") && !doc.contains("gw<0>"), "names are escaped");
        assert!(doc.contains(">warm-up<") && doc.contains(">minutes<") && doc.contains(">MiB<"));
        assert_balanced(&doc);
        let csv = csv(&samples);
        assert_eq!(csv.lines().count(), 21);
        assert_eq!(csv.lines().nth(2), Some("0,gw<0>,40000,1200,5,0,0"));
    }

    /// Every element closes, in order; attribute values hold no markup.
    fn assert_balanced(doc: &str) {
        let mut open: Vec<&str> = Vec::new();
        let mut rest = doc;
        while let Some(start) = rest.find('<') {
            let end = rest[start..].find('>').expect("an unclosed tag") + start;
            let tag = &rest[start + 1..end];
            assert!(!tag.contains('<'), "markup inside a tag: {tag}");
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(open.pop(), Some(name), "closing {name}");
            } else if !tag.ends_with('/') {
                open.push(tag.split_whitespace().next().expect("a tag name"));
            }
            rest = &rest[end + 1..];
        }
        assert!(open.is_empty(), "left open: {open:?}");
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(nice_step(60.0, 6.0), 10.0);
        assert_eq!(nice_step(47.0, 5.0), 10.0);
        assert_eq!(nice_step(1.5, 6.0), 0.5);
        assert_eq!(nice_step(0.0, 5.0), 1.0);
        assert_eq!(tick_label(0.5, 0.5), "0.5");
        assert_eq!(tick_label(1200.0, 200.0), "1200");
    }

    #[test]
    fn a_churned_connection_counts_what_it_missed_repeated_or_was_not_meant_to_get() {
        let mut received = Received::new("gw0/7");
        received.accept("bench~soak-1".into());
        received.accept("bench~soak-1".into());
        for seq in [3, 4, 6] {
            received.message(b"*", seq);
        }
        received.message(b"*", 4);
        received.message(b"gw0/7", 0);
        received.message(b"gw0/8", 0);
        received.message(b"bench~soak-2", 0);
        assert_eq!((received.delivered, received.duplicated, received.misdelivered), (4, 1, 2));
        assert_eq!(received.missing("*", 3..7), 1, "5 never came");
        assert_eq!(received.missing("*", 3..3), 0);
        assert_eq!(received.missing("gw0/7", 0..2), 1);
        assert_eq!(received.missing("bench~soak-1", 0..2), 2);
        assert_eq!(received.missing("soak-0", 5..8), 3, "never joined: all missing");
    }

    fn traffic(standing: usize, json_from: usize) -> Arc<Traffic> {
        let targets = (0..standing)
            .map(|i| Target {
                address: Arc::new(Address::parse(&format!("gw0/{i}")).unwrap()),
                issued: AtomicU64::new(0),
            })
            .collect();
        Arc::new(Traffic::new(targets, json_from, 2, 2))
    }

    #[test]
    fn the_mix_reaches_every_kind_of_target_numbered_per_target() {
        let traffic = traffic(4, 2);
        let mix = Mix { broadcast: 1, connection: 1, channel: 1, group: 1 };
        let channels = ["bench:soak-0".to_owned(), "bench:soak-1".to_owned()];
        let mut source = SoakSource::new(traffic.clone(), mix, &channels, 2, 48);
        let churned = Listed::new(&traffic, &Arc::new(Address::parse("gw0/99").unwrap()));
        let mut seen: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
        for _ in 0..4000 {
            let msg = source.next();
            let header = message::parse(msg.payload.as_bytes()).unwrap();
            assert_eq!(header.target, msg.to.label().as_bytes());
            let next = seen.entry(msg.to.label().to_owned()).or_default();
            assert_eq!(header.seq, *next, "{}", msg.to.label());
            *next += 1;
        }
        for label in ["*", "gw0/0", "gw0/3", "gw0/99", "bench~soak-0", "bench~soak-1", "soak-0", "soak-1"] {
            assert!(seen.get(label).is_some_and(|&n| n > 50), "{label}: {seen:?}");
        }
        assert_eq!(traffic.issued.load(Ordering::Relaxed), 4000);
        assert_eq!(churned.leave(), seen["gw0/99"]);
        assert!(traffic.live().is_empty());
        let expected = Standing::expected(&traffic);
        let broadcasts = seen["*"];
        let publications = seen["bench~soak-0"] + seen["bench~soak-1"];
        assert_eq!(expected.raw, 2 * broadcasts + seen["gw0/0"] + seen["gw0/1"]);
        assert_eq!(expected.json, 2 * (broadcasts + publications) + seen["gw0/2"] + seen["gw0/3"]);
        let only = Mix { broadcast: 0, connection: 0, channel: 0, group: 3 };
        let mut groups = SoakSource::new(traffic, only, &channels, 2, 48);
        assert!((0..100).all(|_| matches!(groups.next().to, To::Group(_))));
    }

    #[test]
    fn processes_are_named_by_role_and_numbered_when_several() {
        let watched = |roles: &[&str]| Endpoints {
            watched: roles.iter().zip(1..).map(|(role, pid)| Watched { role: (*role).into(), pid }).collect(),
            ..Endpoints::default()
        };
        assert_eq!(herald_processes(&watched(&["herald"])), [("herald".to_owned(), 1)]);
        let names: Vec<String> = herald_processes(&watched(&["nats", "broker", "broker", "gw", "gw", "gw"]))
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(names, ["broker0", "broker1", "gw0", "gw1", "gw2"]);
        assert_eq!(herald_processes(&watched(&["broker", "gw"]))[1], ("gw".to_owned(), 2));
    }
}
