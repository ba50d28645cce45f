//! The fanout and targeted scenarios: N clients, messages published for a
//! fixed time (broadcasts, or messages to random single connections), every
//! client checking every message it gets; then the last deliveries are
//! drained and the load generators' figures added up.

use std::sync::Arc;

use crate::cli::{DeliveryArgs, Rate};
use crate::message;
use crate::procfs::CpuMeter;
use crate::publishers::{self, Address, Broadcasts, Msg, Source, To, Via, Window};
use crate::stats::{Column, Measurement, Row};

use super::{Bench, check_alive, gateway_rss, measure_runs, print_table, rss_per_connection, watched};

/// Who each message goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Targeting {
    /// Every message to every client.
    Broadcast,
    /// Each message to one client picked at random.
    Single,
}

const COLUMNS: [Column; 12] = [
    Column::Connections,
    Column::PublishRate,
    Column::DeliveryRate,
    Column::PublishErrors,
    Column::Lost,
    Column::Duplicated,
    Column::Misdelivered,
    Column::Reordered,
    Column::Closed,
    Column::Latency,
    Column::RssPerConnection,
    Column::Cpu,
];

/// The default flat-out window, in deliveries: deep enough that herald can
/// batch its writes, shallow enough to bound its queues (tens of MB).
pub(super) const WINDOW_DELIVERIES: u64 = 1_000_000;

pub async fn run(args: &DeliveryArgs, targeting: Targeting) -> anyhow::Result<()> {
    let mut bench = Bench::new(&args.common)?;
    let via = args.via.unwrap_or(if args.rate == Rate::Max { Via::GrpcBatch } else { Via::Grpc });
    let name = if targeting == Targeting::Broadcast { "fanout" } else { "targeted" };
    let mut rows = Vec::new();
    for &connections in &args.connections {
        let label = format!("{name} {connections}");
        eprintln!(
            "{label}: {} × {:?}, {} B payloads via {via:?}",
            args.common.runs, args.common.duration, args.payload
        );
        let measurement = measure_runs(&label, args.common.runs, &COLUMNS, async || {
            run_once(&mut bench, args, targeting, via, connections).await
        })
        .await?;
        rows.push(Row { label: super::topology(&args.common, connections), measurement });
    }
    let batch = match (via, args.rate) {
        (Via::GrpcBatch, Rate::Max) => format!(" ×{}", args.batch),
        (Via::GrpcBatch, Rate::PerSecond(_)) => format!(" (≤{} per call)", args.batch),
        _ => String::new(),
    };
    let flat_out = match args.rate {
        Rate::Max => match args.window {
            Some(window) => format!(", {} lane(s), window {window} msgs", args.lanes),
            None => format!(", {} lane(s), window {WINDOW_DELIVERIES} deliveries", args.lanes),
        },
        Rate::PerSecond(_) => String::new(),
    };
    let title = format!(
        "{name}: {} B payloads, {} via {via:?}{batch}{flat_out}; {} s per run, median of {} runs",
        args.payload,
        args.rate,
        args.common.duration.as_secs_f64(),
        args.common.runs
    );
    print_table(&title, "herald", &COLUMNS, &rows);
    Ok(())
}

async fn run_once(
    bench: &mut Bench<'_>,
    args: &DeliveryArgs,
    targeting: Targeting,
    via: Via,
    connections: usize,
) -> anyhow::Result<(Measurement, Option<String>)> {
    let mut herald = bench.herald(connections, via.is_http()).await?;
    let endpoints = &herald.endpoints;
    let baseline = gateway_rss(endpoints);
    let (mut fleet, connected) = bench.clients(endpoints, connections).await?;
    let clients = connected.addresses.len() as u64;
    let source: Box<dyn Source> = match targeting {
        Targeting::Broadcast => Box::new(Broadcasts { seq: 0, payload_bytes: args.payload, key_prefix: None }),
        Targeting::Single => Box::new(Targets::new(&connected.addresses, args.payload)?),
    };
    let fan = if targeting == Targeting::Broadcast { clients } else { 1 };
    let lanes = if args.rate == Rate::Max { args.lanes } else { 1 };
    let mut lanes = publishers::lanes(via, endpoints, lanes, 1).await?;
    let meter = CpuMeter::start(&watched(endpoints, Some(&fleet)));
    let start_ns = message::now_ns();
    let tally = match args.rate {
        Rate::Max => {
            let window = Window {
                progress: fleet.progress.clone(),
                base: 0,
                limit: args.window.unwrap_or((WINDOW_DELIVERIES / fan).max(4)),
                broadcast_to: (targeting == Targeting::Broadcast).then_some(clients),
            };
            publishers::flat_out(lanes, via, args.batch, args.common.duration, source, Some(window)).await
        }
        Rate::PerSecond(rate) => {
            let mut source = source;
            publishers::paced(&mut lanes[0], via, rate, args.batch, args.common.duration, source.as_mut()).await
        }
    };
    let rss = gateway_rss(endpoints);
    let expected = tally.accepted * fan;
    fleet.progress.wait_delivered(expected, args.drain).await;
    let cpu = meter.finish();
    let reports = fleet.reports(std::time::Duration::from_secs(30)).await?;
    let span_s = fleet.progress.last_delivery_ns().saturating_sub(start_ns) as f64 / 1e9;
    let mut m = super::phase::measured(&reports, clients, expected, span_s, &tally);
    m.rss_per_connection_kib = rss_per_connection(baseline, rss, clients);
    m.cpu = cpu;
    check_alive(&mut herald);
    Ok((m, tally.first_error))
}

/// Messages to connections picked at random, numbered per connection.
struct Targets {
    clients: Vec<Arc<Address>>,
    seqs: Vec<u64>,
    rng: u64,
    payload_bytes: usize,
}

impl Targets {
    fn new(addresses: &[String], payload_bytes: usize) -> anyhow::Result<Self> {
        let clients = addresses.iter().map(|a| Address::parse(a).map(Arc::new)).collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self { seqs: vec![0; clients.len()], clients, rng: message::now_ns() | 1, payload_bytes })
    }

    /// xorshift64*: plenty for picking targets.
    fn random(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

impl Source for Targets {
    fn next(&mut self) -> Msg {
        let i = (self.random() % self.clients.len() as u64) as usize;
        let to = self.clients[i].clone();
        let payload = message::encode(self.seqs[i], &to.joined, self.payload_bytes);
        self.seqs[i] += 1;
        Msg { to: To::Connection(to), payload, key: String::new() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_numbered_per_connection() {
        let mut targets = Targets::new(&["gw0/1".into(), "gw0/2".into()], 8).unwrap();
        let mut seen = std::collections::HashMap::new();
        for _ in 0..100 {
            let msg = targets.next();
            let header = message::parse(msg.payload.as_bytes()).unwrap();
            let To::Connection(to) = msg.to else { panic!("not to a connection") };
            assert_eq!(header.target, to.joined.as_bytes());
            let next = seen.entry(to.joined.clone()).or_insert(0);
            assert_eq!(header.seq, *next);
            *next += 1;
        }
        assert_eq!(seen.len(), 2, "both connections are picked");
    }
}
