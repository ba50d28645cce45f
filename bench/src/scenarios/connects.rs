//! The connects scenario: connect and disconnect events at a steady connect
//! rate. herald runs with `--events connect,disconnect` (standalone unless
//! told otherwise); the bench attaches one instance of the consumer group
//! `bench`; then load-generator processes open `--rate` connections per
//! second for `--duration` (classic raw clients, each from a loopback source
//! address in turn, a fresh one per `--per-source` connections, so that
//! ephemeral ports and TIME_WAIT never run short), each reads its greeting
//! (its address), sends nothing for `--hold`, and closes with a close frame.
//!
//! The consumer keeps, per connection address, the distinct ids of its
//! connect and of its disconnect events. Once every client is done and the
//! tail has drained, each connection a client opened must have exactly one
//! of each: expected = 2 × connections opened; lost = connections without a
//! connect event plus those without a disconnect event; dup = further
//! distinct event ids of the same kind on one connection (a repeated id is
//! a redelivery, counted apart). wrong = disconnects whose cause is not the
//! client, plus events of connections no client saw open (a handshake that
//! herald finished but the client gave up on would explain those: see
//! errors). Connect rate = connections opened over the time from the first
//! connect to the last greeting. Latency: an event's `at` (the gateway's
//! clock) to its arrival at the consumer; handshake: a client's TCP connect
//! to its greeting.
//!
//! With `--connect-hook http|https`, herald asks an endpoint in the bench
//! about every connection before its upgrade (over HTTPS, trusting the CA
//! the bench made); the endpoint lets every one in, anonymous. A connection
//! opened without the hook asked counts as wrong.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::bail;
use herald_proto::v1::{ConsumedEvent, DisconnectCause, connection_event};

use crate::cli::{ConnectHook, ConnectsArgs};
use crate::consumer::{self, Consumer, Sink};
use crate::endpoint::{Answer, Endpoint, Handler, Request};
use crate::fleet::Fleet;
use crate::loadgen::{Cycling, Plan, Task};
use crate::procfs::CpuMeter;
use crate::stats::{Column, Latency, Measurement};

use super::events::cpu_note;
use super::{
    Bench, RowRuns, check_alive, grew, metric_totals, print_summary, print_table, standalone_unless_split, thousands,
    topology, watched,
};

const COLUMNS: [Column; 13] = [
    Column::ConnectRate,
    Column::Handshake,
    Column::Connections,
    Column::PublishErrors,
    Column::Expected,
    Column::Received,
    Column::Lost,
    Column::Duplicated,
    Column::Redelivered,
    Column::Dropped,
    Column::Wrong,
    Column::Latency,
    Column::Cpu,
];

const GROUP: &str = "bench";
/// The tail is over when no event has arrived for this long.
const IDLE: Duration = Duration::from_secs(3);
/// How long one handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const DROPPED: [&str; 2] = ["herald_ws_events_dropped_total", "herald_events_dropped_total"];

/// A connect hook that lets every connection in, anonymous, and counts what
/// it was asked.
#[derive(Default)]
struct LetEveryoneIn {
    asked: AtomicU64,
    failures: AtomicU64,
}

impl Handler for LetEveryoneIn {
    fn answer(&self, _: Request) -> Answer {
        self.asked.fetch_add(1, Ordering::Relaxed);
        Answer { status: "200 OK", body: Vec::new() }
    }

    fn failed(&self, error: String) {
        if self.failures.fetch_add(1, Ordering::Relaxed) == 0 {
            eprintln!("    the connect hook: {error}");
        }
    }
}

pub async fn run(args: &ConnectsArgs) -> anyhow::Result<()> {
    let common = standalone_unless_split(&args.common, args.split);
    if args.processes == 0 || args.rate.iter().any(|r| !(*r > 0.0 && r.is_finite())) {
        bail!("--processes and --rate must be above 0");
    }
    let mut bench = Bench::new(&common)?;
    bench.herald_env.push(("HERALD_EVENTS".into(), "connect,disconnect".into()));
    let mut rows = RowRuns::new();
    let mut headline = Vec::new();
    for &rate in &args.rate {
        for &hook in &args.connect_hook {
            eprintln!(
                "connects {rate}/s, {hook}: {} × {:?}, hold {:?}, {} load generator(s)",
                common.runs, common.duration, args.hold, args.processes
            );
            let open_at_once = (rate * args.hold.as_secs_f64()).ceil() as usize;
            let label = format!("{rate}/s, hold {:?}, {hook}, {}", args.hold, topology(&common, open_at_once));
            // The summary row is the last row's: its runs only.
            headline.clear();
            for run in 1..=common.runs {
                let (m, first_error) = run_once(&mut bench, args, rate, open_at_once, hook).await?;
                headline.push((m.ops_rate, m.lost));
                rows.add(&label, run, &COLUMNS, m, first_error);
            }
        }
    }
    let title = format!(
        "connects: connections opened at a steady rate, held {:?} (sending nothing) and closed by the client; \
         one consumer instance (group {GROUP}, max_unacked {}) checks each has one connect and one disconnect \
         event; {} s per run, median of {} runs (error counts: the worst run)",
        args.hold,
        args.consumer.max_unacked,
        common.duration.as_secs_f64(),
        common.runs
    );
    let summary = rows.summarize();
    print_table(&title, "connects", &COLUMNS, &summary);
    if let (Some(row), Some(&rate)) = (summary.last(), args.rate.last()) {
        let m = &row.measurement;
        print_summary(
            &format!(
                "connect/disconnect events at {} connects/s, held {:?}, {} (`connects`)",
                thousands(rate as u64),
                args.hold,
                topology(&common, 0)
            ),
            &format!("0 lost at {} connects/s", thousands(rate as u64)),
            &format!("{} lost", thousands(m.lost)),
            &headline.iter().map(|(_, lost)| format!("{lost}")).collect::<Vec<_>>(),
            &format!(
                "{} connects/s achieved ({}); {} of {} events, {} dup, {} redelivered, {} failed connects \
                 (worst run); event p99 {:.1} ms; {}",
                thousands(m.ops_rate.round() as u64),
                headline.iter().map(|(r, _)| thousands(r.round() as u64)).collect::<Vec<_>>().join(", "),
                thousands(m.received),
                thousands(m.expected),
                thousands(m.duplicated),
                thousands(m.redelivered),
                thousands(m.publish_errors),
                m.latency.map_or(f64::NAN, |l| l.p99),
                cpu_note(&m.cpu)
            ),
        );
    }
    Ok(())
}

async fn run_once(
    bench: &mut Bench<'_>,
    args: &ConnectsArgs,
    rate: f64,
    open_at_once: usize,
    hook: ConnectHook,
) -> anyhow::Result<(Measurement, Option<String>)> {
    let common = bench.common;
    // The hook listens before herald starts: herald is told its URL.
    let asked = Arc::new(LetEveryoneIn::default());
    let endpoint = match hook {
        ConnectHook::None => None,
        ConnectHook::Http | ConnectHook::Https => {
            Some(Endpoint::start(hook == ConnectHook::Https, asked.clone()).await?)
        }
    };
    bench.herald_env.retain(|(name, _)| !name.starts_with("HERALD_CONNECT_HOOK"));
    if let Some(endpoint) = &endpoint {
        bench.herald_env.push(("HERALD_CONNECT_HOOK".to_owned(), format!("{}/connect", endpoint.base)));
        if let Some(ca) = &endpoint.ca_file {
            bench.herald_env.push(("HERALD_CONNECT_HOOK_CA".to_owned(), ca.display().to_string()));
        }
    }
    let mut herald = bench.herald(open_at_once, false).await?;
    let endpoints = herald.endpoints.clone();
    if endpoints.ws_urls.is_empty() {
        bail!("no WebSocket URL to connect clients to (give --ws-url)");
    }
    let consumer = Consumer::start(
        &endpoints,
        GROUP,
        args.consumer.max_unacked,
        args.consumer.ack_batch as usize,
        Lifecycles::default(),
    )
    .await?;
    let processes = args.processes;
    let per_process = rate * common.duration.as_secs_f64() / processes as f64;
    let cycling = Cycling {
        rate: rate / processes as f64,
        duration_ms: common.duration.as_millis() as u64,
        hold_ms: args.hold.as_millis() as u64,
    };
    let plans: Vec<Plan> = (0..processes)
        .map(|_| Plan {
            ws_urls: endpoints.ws_urls.iter().map(ToString::to_string).collect(),
            sources: bench.sources.take((per_process / common.per_source.max(1) as f64).ceil() as usize + 1),
            connections: 0,
            connect_concurrency: common.connect_concurrency,
            connect_timeout_ms: CONNECT_TIMEOUT.as_millis() as u64,
            progress_ms: 2,
            identities: Vec::new(),
            subscribe: Vec::new(),
            task: Task::Cycle(cycling.clone()),
        })
        .collect();
    let mut fleet = Fleet::start(plans)?;
    fleet.connected(Duration::from_secs(60)).await?;
    let before = metric_totals(&endpoints, &DROPPED).await;
    let meter = CpuMeter::start(&watched(&endpoints, Some(&fleet)));
    fleet.go()?;
    let finished = fleet.finished(common.duration + CONNECT_TIMEOUT + args.hold + Duration::from_secs(60)).await?;
    let opened: Vec<String> = finished.iter().flat_map(|f| f.opened.iter().cloned()).collect();
    let failed: usize = finished.iter().map(|f| f.failed).sum();
    let close_failed: usize = finished.iter().map(|f| f.close_failed).sum();
    let elapsed_s = finished.iter().map(|f| f.elapsed_ms).max().unwrap_or(0) as f64 / 1000.0;
    let mut handshakes = Latency::new();
    for f in &finished {
        handshakes.merge(&Latency::from_pairs(&f.handshake_us));
    }
    let expected = 2 * opened.len() as u64;
    // Connections herald opened but whose client gave up have events too.
    let complete = consumer.wait_for(expected + 2 * failed as u64, IDLE, args.consumer.drain).await;
    let cpu = meter.finish();
    let after = metric_totals(&endpoints, &DROPPED).await;
    let progress = consumer.progress.clone();
    let lifecycles = consumer.stop().await?;
    let tally = lifecycles.check(&opened);
    let dropped = grew(before[0], after[0]) + grew(before[1], after[1]);
    let handshake = handshakes.percentiles().unwrap_or_default();
    eprintln!(
        "    {} opened in {elapsed_s:.1} s, {failed} failed, {close_failed} close handshakes unfinished; handshake \
         p50 {:.2} ms p99 {:.2} ms; {} of {} events ({} deliveries); {} events of connections no client saw open{}",
        thousands(opened.len() as u64),
        handshake.p50,
        handshake.p99,
        thousands(tally.received),
        thousands(expected),
        thousands(progress.deliveries()),
        tally.strangers,
        if complete { "" } else { "; the tail ended before every event arrived" },
    );
    let first_error = finished.iter().find_map(|f| f.first_error.clone()).or_else(|| progress.first_error());
    // Every connection a client opened was asked about first.
    let unasked = match endpoint {
        Some(_) => (opened.len() as u64).saturating_sub(asked.asked.load(Ordering::Relaxed)),
        None => 0,
    };
    if let Some(endpoint) = &endpoint {
        eprintln!(
            "    the connect hook was asked {} times, over {} connections from herald",
            thousands(asked.asked.load(Ordering::Relaxed)),
            thousands(endpoint.connections())
        );
    }
    let m = Measurement {
        connections: opened.len() as u64,
        ops_rate: if elapsed_s > 0.0 { opened.len() as f64 / elapsed_s } else { 0.0 },
        publish_errors: failed as u64 + progress.ack_errors(),
        expected,
        received: tally.received,
        lost: tally.lost,
        duplicated: tally.duplicated,
        redelivered: lifecycles.redelivered,
        dropped,
        wrong: lifecycles.wrong_cause + tally.strangers + unasked,
        latency: lifecycles.latency.percentiles(),
        handshake: Some(handshake),
        cpu,
        ..Measurement::default()
    };
    drop(fleet);
    check_alive(&mut herald);
    Ok((m, first_error))
}

/// The distinct connect and disconnect event ids of one connection.
#[derive(Default)]
struct Life {
    connects: Vec<String>,
    disconnects: Vec<String>,
}

/// What the consumer saw of connections' lives.
#[derive(Default)]
struct Lifecycles {
    by_address: HashMap<String, Life>,
    /// Distinct (connection, kind) pairs seen.
    matched: u64,
    /// Deliveries with a delivery count above 1.
    redelivered: u64,
    /// Deliveries of an event id already received.
    repeated: u64,
    /// Disconnects whose cause is not the client.
    wrong_cause: u64,
    /// Events of other kinds, or without a connection.
    other: u64,
    latency: Latency,
}

/// How the events compare with the connections the clients opened.
#[derive(Debug, PartialEq, Eq)]
struct Tally {
    received: u64,
    lost: u64,
    duplicated: u64,
    /// Events of connections no client reported opening.
    strangers: u64,
}

impl Lifecycles {
    fn check(&self, opened: &[String]) -> Tally {
        let mut tally = Tally { received: 0, lost: 0, duplicated: 0, strangers: 0 };
        let ours: HashSet<&str> = opened.iter().map(String::as_str).collect();
        for address in &ours {
            let (connects, disconnects) =
                self.by_address.get(*address).map_or((0, 0), |life| (life.connects.len(), life.disconnects.len()));
            tally.received += u64::from(connects > 0) + u64::from(disconnects > 0);
            tally.lost += u64::from(connects == 0) + u64::from(disconnects == 0);
            tally.duplicated += (connects.saturating_sub(1) + disconnects.saturating_sub(1)) as u64;
        }
        tally.strangers = self
            .by_address
            .iter()
            .filter(|(address, _)| !ours.contains(address.as_str()))
            .map(|(_, life)| (life.connects.len() + life.disconnects.len()) as u64)
            .sum();
        tally
    }
}

impl Sink for Lifecycles {
    fn take(&mut self, delivery: ConsumedEvent, _now_ns: u64) {
        if delivery.delivery > 1 {
            self.redelivered += 1;
        }
        let address = consumer::address_of(&delivery);
        let Some((event, address)) = delivery.event.zip(address) else {
            self.other += 1;
            return;
        };
        let life = self.by_address.entry(address).or_default();
        let ids = match &event.kind {
            Some(connection_event::Kind::Connect(_)) => &mut life.connects,
            Some(connection_event::Kind::Disconnect(disconnect)) => {
                if disconnect.cause != DisconnectCause::Client as i32 {
                    self.wrong_cause += 1;
                }
                &mut life.disconnects
            }
            _ => {
                self.other += 1;
                return;
            }
        };
        if ids.contains(&event.id) {
            self.repeated += 1;
            return;
        }
        if ids.is_empty() {
            self.matched += 1;
        }
        ids.push(event.id);
        if let Some(at) = event.at.and_then(|at| SystemTime::try_from(at).ok())
            && let Ok(age) = SystemTime::now().duration_since(at)
        {
            self.latency.record(age.as_micros() as u64);
        }
    }

    fn progress(&self) -> u64 {
        self.matched
    }
}

#[cfg(test)]
mod tests {
    use herald_proto::v1::{ConnectEvent, ConnectionAddress, ConnectionEvent, DisconnectEvent};

    use super::*;

    fn delivery(connection: &str, id: &str, kind: connection_event::Kind) -> ConsumedEvent {
        let event = ConnectionEvent {
            id: id.into(),
            connection: Some(ConnectionAddress { worker_id: "gw".into(), connection_id: connection.into() }),
            kind: Some(kind),
            ..ConnectionEvent::default()
        };
        ConsumedEvent { event: Some(event), ack_id: "m1".into(), delivery: 1 }
    }

    fn connect() -> connection_event::Kind {
        connection_event::Kind::Connect(ConnectEvent::default())
    }

    fn disconnect(cause: DisconnectCause) -> connection_event::Kind {
        connection_event::Kind::Disconnect(DisconnectEvent { cause: cause as i32, ..DisconnectEvent::default() })
    }

    #[test]
    fn each_opened_connection_needs_one_connect_and_one_disconnect() {
        let mut sink = Lifecycles::default();
        let now = 0;
        sink.take(delivery("1", "a", connect()), now);
        sink.take(delivery("1", "b", disconnect(DisconnectCause::Client)), now);
        sink.take(delivery("2", "c", connect()), now);
        sink.take(delivery("2", "c", connect()), now);
        sink.take(delivery("2", "d", connect()), now);
        sink.take(delivery("3", "e", connect()), now);
        sink.take(delivery("9", "f", disconnect(DisconnectCause::SlowConsumer)), now);
        let opened = ["gw/1", "gw/2", "gw/3", "gw/4"].map(String::from);
        let tally = sink.check(&opened);
        // 1 complete; 2 two connects (one repeated id), no disconnect; 3 no disconnect; 4 nothing.
        assert_eq!(tally, Tally { received: 4, lost: 4, duplicated: 1, strangers: 1 });
        assert_eq!((sink.repeated, sink.wrong_cause, sink.progress()), (1, 1, 5));
    }
}
