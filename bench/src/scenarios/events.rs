//! The events scenario: client messages to one backend. herald runs with
//! `--events message` (standalone unless told otherwise); N classic raw
//! clients each send text frames for `--duration`, flat out or at `--rate`
//! all together; every frame becomes a message event. The backend is, by
//! `--backend`: one instance of the consumer group `bench` (`ConsumeEvents`,
//! `--max-unacked`), acknowledging in batches (`AckEvents`, pipelined, so
//! acknowledging never throttles receiving); or herald's webhook, POSTing
//! signed batches of `--webhook-batch` to an endpoint in the bench (plain
//! HTTP, or HTTPS with a certificate herald is told to trust), which
//! verifies each signature as a backend must. Either checks each event:
//! `(connection, seq)` from the event's connection and the frame's sequence
//! number, seen once. After the clients stop, it waits for the tail.
//!
//! Figures: events/s = distinct events received over the time from the
//! first frame sent to the last event received; sent/s = frames the clients
//! wrote over their sending time; lost = frames written − distinct events
//! received (a frame herald read but dropped, or never read: the clients'
//! count is of frames handed to the kernel); dup = receipts of an event
//! already received (redeliveries included); redelivered = deliveries with
//! a delivery count above 1; dropped = herald's own count of events it
//! dropped on purpose (`herald_ws_events_dropped_total`, a full gateway
//! queue, plus `herald_events_dropped_total`, a group past its retention),
//! from `/metrics` before and after. Latency: a frame's send stamp to its
//! event's arrival at the consumer.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use herald_proto::v1::{ConsumedEvent, connection_event, content};

use crate::cli::{EventsArgs, EventsBackend, Rate};
use crate::consumer::{self, Consumer, Progress, Sink};
use crate::loadgen::{Sending, Task};
use crate::message;
use crate::procfs::CpuMeter;
use crate::stats::{Column, Latency, Measurement};
use crate::webhook::Receiver;

use super::{
    Bench, RowRuns, check_alive, grew, metric_totals, print_summary, print_table, standalone_unless_split, thousands,
    topology, watched,
};

const COLUMNS: [Column; 12] = [
    Column::Connections,
    Column::SendRate,
    Column::EventRate,
    Column::Sent,
    Column::Received,
    Column::Lost,
    Column::Duplicated,
    Column::Redelivered,
    Column::Dropped,
    Column::Misdelivered,
    Column::Latency,
    Column::Cpu,
];

/// The consumer group.
const GROUP: &str = "bench";
/// The tail is over when no event has arrived for this long.
const IDLE: Duration = Duration::from_secs(3);
/// herald's counts of events it dropped: a full gateway queue, a group past its retention.
const DROPPED: [&str; 2] = ["herald_ws_events_dropped_total", "herald_events_dropped_total"];
/// Reports to the broker that failed (each is retried): a sign of trouble, not of loss.
const REPORTS_FAILED: &str = "herald_ws_event_reports_failed_total";
/// The webhook's shared secret.
const WEBHOOK_SECRET: &str = "herald-bench-webhook-secret";

/// Where the events go.
enum Receiving {
    Grpc(Consumer<Messages>),
    Webhook(Receiver<Messages>),
}

impl Receiving {
    fn progress(&self) -> &Arc<Progress> {
        match self {
            Receiving::Grpc(consumer) => &consumer.progress,
            Receiving::Webhook(receiver) => &receiver.progress,
        }
    }

    async fn stop(self) -> anyhow::Result<Messages> {
        match self {
            Receiving::Grpc(consumer) => consumer.stop().await,
            Receiving::Webhook(receiver) => receiver.stop(),
        }
    }
}

pub async fn run(args: &EventsArgs) -> anyhow::Result<()> {
    let common = standalone_unless_split(&args.common, args.split);
    let mut bench = Bench::new(&common)?;
    bench.herald_env.push(("HERALD_EVENTS".into(), "message".into()));
    let mut rows = RowRuns::new();
    let mut headline = Vec::new();
    for &connections in &args.connections {
        if connections == 0 {
            anyhow::bail!("-n must be at least 1");
        }
        for &backend in &args.backend {
            eprintln!(
                "events {connections} to a {backend}: {} × {:?}, {} B frames, {}, max_unacked {}, acks of {}, \
                 webhook batches of {}",
                common.runs,
                common.duration,
                args.payload,
                args.rate,
                args.consumer.max_unacked,
                args.consumer.ack_batch,
                args.webhook_batch
            );
            let label = format!("{connections} raw clients, {backend}, {}", topology(&common, connections));
            // The summary row is the last row's: its runs only.
            headline.clear();
            for run in 1..=common.runs {
                let (m, first_error) = run_once(&mut bench, args, &common, connections, backend).await?;
                headline.push(m.delivery_rate);
                rows.add(&label, run, &COLUMNS, m, first_error);
            }
        }
    }
    let title = format!(
        "events: client frames of {} B, {}, to one consumer instance (group {GROUP}, max_unacked {}, \
         AckEvents of {} pipelined) or to a webhook endpoint (POSTs of {} events, signatures verified); \
         events/s = distinct events received from the first send to the last receipt; {} s per run, median \
         of {} runs",
        args.payload,
        match args.rate {
            Rate::Max => match window(args) {
                Some(w) => format!("flat out ({} frames per write, window {w})", args.burst),
                None => format!("flat out ({} frames per write, no window)", args.burst),
            },
            rate => rate.to_string(),
        },
        args.consumer.max_unacked,
        args.consumer.ack_batch,
        args.webhook_batch,
        common.duration.as_secs_f64(),
        common.runs
    );
    let summary = rows.summarize();
    print_table(&title, "clients", &COLUMNS, &summary);
    if let Some(row) = summary.last() {
        let m = &row.measurement;
        print_summary(
            &format!(
                "client messages to one {}, {} raw clients {}, {} (`events`)",
                args.backend.last().copied().unwrap_or(EventsBackend::Grpc),
                thousands(m.connections),
                match (args.rate, window(args)) {
                    (Rate::Max, Some(w)) => format!("flat out (window {})", thousands(w)),
                    (Rate::Max, None) => "flat out, no window".to_owned(),
                    (rate, _) => format!("at {rate}"),
                },
                topology(&common, args.connections.last().copied().unwrap_or(0))
            ),
            "≥ 100,000 events/s",
            &format!("{} events/s", thousands(m.delivery_rate.round() as u64)),
            &headline.iter().map(|r| thousands(r.round() as u64)).collect::<Vec<_>>(),
            &format!(
                "{} lost, {} dup, {} redelivered, {} dropped by herald (worst run); p99 {:.1} ms send → consumer; {}",
                thousands(m.lost),
                thousands(m.duplicated),
                thousands(m.redelivered),
                thousands(m.dropped),
                m.latency.map_or(f64::NAN, |l| l.p99),
                cpu_note(&m.cpu)
            ),
        );
    }
    Ok(())
}

/// The window on frames sent but not yet received, flat out.
fn window(args: &EventsArgs) -> Option<u64> {
    (args.rate == Rate::Max && args.window > 0).then_some(args.window)
}

/// `role CPU n%` for every role, for a summary's notes.
pub(super) fn cpu_note(cpu: &[(String, f64)]) -> String {
    cpu.iter().map(|(role, pct)| format!("{role} {pct:.0}%")).collect::<Vec<_>>().join(", ") + " CPU"
}

async fn run_once(
    bench: &mut Bench<'_>,
    args: &EventsArgs,
    common: &crate::cli::Common,
    connections: usize,
    backend: EventsBackend,
) -> anyhow::Result<(Measurement, Option<String>)> {
    // The endpoint listens before herald starts: herald is told its URL.
    let receiver = match backend {
        EventsBackend::Grpc => None,
        EventsBackend::Webhook | EventsBackend::WebhookTls => {
            Some(Receiver::start(WEBHOOK_SECRET, backend == EventsBackend::WebhookTls, Messages::default()).await?)
        }
    };
    bench.herald_env.retain(|(name, _)| !name.starts_with("HERALD_WEBHOOK_"));
    if let Some(receiver) = &receiver {
        bench.herald_env.extend([
            ("HERALD_WEBHOOK_URL".to_owned(), receiver.url.clone()),
            ("HERALD_WEBHOOK_SECRET".to_owned(), WEBHOOK_SECRET.to_owned()),
            ("HERALD_WEBHOOK_BATCH".to_owned(), args.webhook_batch.to_string()),
        ]);
        if let Some(ca) = receiver.ca_file() {
            bench.herald_env.push(("HERALD_WEBHOOK_CA".to_owned(), ca.display().to_string()));
        }
    }
    let mut herald = bench.herald(connections, false).await?;
    let endpoints = herald.endpoints.clone();
    let consumer = match receiver {
        Some(receiver) => Receiving::Webhook(receiver),
        // The group exists once the consumer is attached: every event from then on is its.
        None => Receiving::Grpc(
            Consumer::start(
                &endpoints,
                GROUP,
                args.consumer.max_unacked,
                args.consumer.ack_batch as usize,
                Messages::default(),
            )
            .await?,
        ),
    };
    let sending = Sending {
        rate: match args.rate {
            Rate::Max => None,
            Rate::PerSecond(rate) => Some(rate / connections as f64),
        },
        duration_ms: common.duration.as_millis() as u64,
        payload: args.payload,
        burst: args.burst as usize,
        interval_ms: args.interval.as_millis() as u64,
        windowed: window(args).is_some(),
    };
    let (mut fleet, connected) = bench.talkers(&endpoints, connections, Task::Send(sending)).await?;
    let clients = connected.addresses.len() as u64;
    let before = metric_totals(&endpoints, &[DROPPED[0], DROPPED[1], REPORTS_FAILED]).await;
    let meter = CpuMeter::start(&watched(&endpoints, Some(&fleet)));
    let start_ns = message::now_ns();
    let progress = consumer.progress().clone();
    let window = window(args);
    // Flat out, the clients may be this far ahead of the consumer (told every few ms).
    let allowed = || window.map(|w| progress.matched() + w);
    fleet.go()?;
    let finished = fleet.finished_within_window(common.duration + Duration::from_secs(120), allowed).await?;
    let sent: u64 = finished.iter().map(|f| f.sent).sum();
    let send_s = finished.iter().map(|f| f.elapsed_ms).max().unwrap_or(0) as f64 / 1000.0;
    let failed: usize = finished.iter().map(|f| f.failed).sum();
    let mut first_error = finished.iter().find_map(|f| f.first_error.clone());
    let tail_began = message::now_ns();
    let complete = progress.wait_for(sent, IDLE, args.consumer.drain).await;
    let cpu = meter.finish();
    let after = metric_totals(&endpoints, &[DROPPED[0], DROPPED[1], REPORTS_FAILED]).await;
    let seen = consumer.stop().await?;
    let tail_s = progress.last_ns().saturating_sub(tail_began) as f64 / 1e9;
    let span_s = progress.last_ns().saturating_sub(start_ns) as f64 / 1e9;
    let known: HashSet<&str> = connected.addresses.iter().map(String::as_str).collect();
    let strangers: u64 =
        seen.by_address.iter().filter(|(a, _)| !known.contains(a.as_str())).map(|(_, (_, events))| events).sum();
    let foreign = seen.foreign + strangers;
    let (gw_dropped, log_dropped) = (grew(before[0], after[0]), grew(before[1], after[1]));
    let reports_failed = grew(before[2], after[2]);
    eprintln!(
        "    {} sent by {} clients in {send_s:.1} s ({} failed); {} received ({} deliveries, {} acked, {} ack errors); \
         tail {tail_s:.1} s{}; herald dropped {gw_dropped} at the gateway, {log_dropped} past retention; \
         {reports_failed} failed reports",
        thousands(sent),
        thousands(clients),
        failed,
        thousands(seen.received),
        thousands(progress.deliveries()),
        thousands(progress.acked()),
        progress.ack_errors(),
        if complete { "" } else { " (ended before every event arrived)" },
    );
    if first_error.is_none() {
        first_error = progress.first_error();
    }
    let m = Measurement {
        connections: clients,
        publish_rate: if send_s > 0.0 { sent as f64 / send_s } else { 0.0 },
        delivery_rate: if span_s > 0.0 { seen.received as f64 / span_s } else { 0.0 },
        publish_errors: failed as u64 + progress.ack_errors(),
        sent,
        received: seen.received,
        lost: sent.saturating_sub(seen.received),
        duplicated: seen.repeated,
        redelivered: seen.redelivered,
        dropped: gw_dropped + log_dropped,
        misdelivered: foreign,
        latency: seen.latency.percentiles(),
        cpu,
        ..Measurement::default()
    };
    drop(fleet);
    check_alive(&mut herald);
    Ok((m, first_error))
}

/// What the consumer saw of the clients' messages.
#[derive(Default)]
struct Messages {
    /// Each sending connection's number (in the order first seen) and events.
    by_address: HashMap<String, (u64, u64)>,
    /// `(connection number << 40) | seq` of every event received.
    seen: HashSet<u64>,
    received: u64,
    repeated: u64,
    redelivered: u64,
    /// Deliveries that were not a benchmark frame's message event.
    foreign: u64,
    latency: Latency,
}

impl Sink for Messages {
    fn take(&mut self, delivery: ConsumedEvent, now_ns: u64) {
        if delivery.delivery > 1 {
            self.redelivered += 1;
        }
        let address = consumer::address_of(&delivery);
        let text = match delivery.event.and_then(|e| e.kind) {
            Some(connection_event::Kind::Message(m)) => match m.content.and_then(|c| c.body) {
                Some(content::Body::Text(text)) => text,
                _ => String::new(),
            },
            _ => String::new(),
        };
        let (Some(address), Some(header)) = (address, message::parse(text.as_bytes())) else {
            self.foreign += 1;
            return;
        };
        let next = self.by_address.len() as u64;
        let (number, events) = self.by_address.entry(address).or_insert((next, 0));
        *events += 1;
        let number = *number;
        if self.seen.insert((number << 40) | (header.seq & ((1 << 40) - 1))) {
            self.received += 1;
            self.latency.record(now_ns.saturating_sub(header.sent_ns) / 1000);
        } else {
            self.repeated += 1;
        }
    }

    fn progress(&self) -> u64 {
        self.received
    }
}

#[cfg(test)]
mod tests {
    use herald_proto::v1::{ConnectionAddress, ConnectionEvent, Content, MessageEvent};

    use super::*;

    fn delivery(connection: &str, text: &str, delivery: u32) -> ConsumedEvent {
        let event = ConnectionEvent {
            id: format!("{connection}.{text}"),
            connection: Some(ConnectionAddress { worker_id: "gw".into(), connection_id: connection.into() }),
            kind: Some(connection_event::Kind::Message(MessageEvent {
                content: Some(Content { body: Some(content::Body::Text(text.into())) }),
            })),
            ..ConnectionEvent::default()
        };
        ConsumedEvent { event: Some(event), ack_id: "m1".into(), delivery }
    }

    #[test]
    fn each_connection_and_sequence_number_counts_once() {
        let mut sink = Messages::default();
        let now = message::now_ns();
        let stamp = |seq: u64| format!("{seq}:{now}::xx");
        sink.take(delivery("1", &stamp(0), 1), now);
        sink.take(delivery("2", &stamp(0), 1), now);
        sink.take(delivery("1", &stamp(1), 1), now);
        sink.take(delivery("1", &stamp(1), 2), now);
        sink.take(delivery("1", "hello", 1), now);
        assert_eq!((sink.received, sink.repeated, sink.redelivered, sink.foreign), (3, 1, 1, 1));
        assert_eq!(sink.progress(), 3);
        assert_eq!(sink.by_address.len(), 2);
    }
}
