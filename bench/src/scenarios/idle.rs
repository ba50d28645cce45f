//! The idle scenario: N clients connect and stay silent for the duration
//! while gateway memory and CPU are measured; then one broadcast checks that
//! every client is still there and receiving (its latency is the time the
//! broadcast took to reach each client). With `--subscriptions K` the clients
//! speak the client protocol and each holds K channel subscriptions.

use std::time::Duration;

use anyhow::Context;

use crate::cli::IdleArgs;
use crate::procfs::CpuMeter;
use crate::publishers::{self, Broadcasts, Source, Via};
use crate::stats::{Column, Latency, Measurement, Row};

use super::{Bench, check_alive, gateway_rss, measure_runs, print_table, rss_per_connection, watched};

const COLUMNS: [Column; 7] = [
    Column::Connections,
    Column::RssPerConnection,
    Column::Cpu,
    Column::Closed,
    Column::Lost,
    Column::Misdelivered,
    Column::Latency,
];

pub async fn run(args: &IdleArgs) -> anyhow::Result<()> {
    let mut bench = Bench::new(&args.common)?;
    let mut rows = Vec::new();
    for &connections in &args.connections {
        let label = format!("idle {connections}");
        eprintln!("{label}: {} × {:?}", args.common.runs, args.common.duration);
        let measurement =
            measure_runs(&label, args.common.runs, &COLUMNS, async || run_once(&mut bench, args, connections).await)
                .await?;
        rows.push(Row { label: super::topology(&args.common, connections), measurement });
    }
    let check = if args.no_broadcast { "" } else { "; then one broadcast (latency = its delivery to every client)" };
    let clients = match args.subscriptions {
        0 => String::new(),
        n => format!(" speaking herald.json.v1 with {n} channel subscriptions each"),
    };
    let title = format!(
        "idle: clients{clients} held {} s (CPU over the hold){check}; median of {} runs",
        args.common.duration.as_secs_f64(),
        args.common.runs
    );
    print_table(&title, "herald", &COLUMNS, &rows);
    Ok(())
}

async fn run_once(
    bench: &mut Bench<'_>,
    args: &IdleArgs,
    connections: usize,
) -> anyhow::Result<(Measurement, Option<String>)> {
    let mut herald = bench.herald(connections, false).await?;
    let endpoints = &herald.endpoints;
    let baseline = gateway_rss(endpoints);
    let channels: Vec<String> = (0..args.subscriptions).map(|i| format!("bench:idle-{i}")).collect();
    let (mut fleet, connected) = bench.subscribers(endpoints, connections, &channels).await?;
    let clients = connected.addresses.len() as u64;
    let meter = CpuMeter::start(&watched(endpoints, Some(&fleet)));
    tokio::time::sleep(args.common.duration).await;
    let cpu = meter.finish();
    let rss = gateway_rss(endpoints);
    let mut m = Measurement { connections: clients, cpu, ..Measurement::default() };
    m.rss_per_connection_kib = rss_per_connection(baseline, rss, clients);
    let mut first_error = None;
    if !args.no_broadcast {
        let via = if endpoints.grpc.is_empty() { Via::Http } else { Via::Grpc };
        let mut lane = publishers::lanes(via, endpoints, 1, 1).await?.pop().context("no publisher")?;
        let tally =
            publishers::once(&mut lane, via, Broadcasts { seq: 0, payload_bytes: 64, key_prefix: None }.next()).await;
        let expected = tally.accepted * clients;
        fleet.progress.wait_delivered(expected, args.drain).await;
        m.publish_errors = tally.errors;
        first_error = tally.first_error;
        let reports = fleet.reports(Duration::from_secs(30)).await?;
        let mut latency = Latency::new();
        let mut delivered = 0;
        for report in &reports {
            delivered += report.delivered;
            m.misdelivered += report.misdelivered;
            m.duplicated += report.duplicated;
            latency.merge(&report.latency());
        }
        m.lost = expected.saturating_sub(delivered);
        m.latency = latency.percentiles();
    }
    m.closed = fleet.progress.closed();
    check_alive(&mut herald);
    Ok((m, first_error))
}
