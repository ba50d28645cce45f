//! The idle scenario: N clients connect and stay silent for the duration
//! while gateway memory and CPU are measured; then one broadcast checks that
//! every client is still there and receiving (its latency is the time the
//! broadcast took to reach each client). With `--subscriptions K` the clients
//! speak the client protocol and each holds K channel subscriptions.
//!
//! Besides the gateways' memory per connection, each run reports what the
//! whole machine paid, as holding a million connections on one machine is
//! the point (issue 16): how many gateways, their memory together, the load
//! generators' memory per client (they share the machine's RAM with herald),
//! the growth of the machine's memory in use and of the kernel's TCP buffers
//! since before herald started, and the TCP sockets in use.

use std::time::Duration;

use anyhow::Context;

use crate::cli::IdleArgs;
use crate::fleet::Fleet;
use crate::procfs::{self, CpuMeter, TcpSockets};
use crate::procs::Endpoints;
use crate::publishers::{self, Broadcasts, Source, Via};
use crate::stats::{Column, Latency, Measurement, Row, thousands};

use super::{Bench, check_alive, gateway_rss, measure_runs, print_table, rss_per_connection, watched};

const COLUMNS: [Column; 13] = [
    Column::Connections,
    Column::Gateways,
    Column::RssPerConnection,
    Column::GatewayRss,
    Column::LoadgenRssPerClient,
    Column::MachineUsed,
    Column::SocketMemory,
    Column::TcpInuse,
    Column::Cpu,
    Column::Closed,
    Column::Lost,
    Column::Misdelivered,
    Column::Latency,
];

/// A gateway holding more than this share of its descriptor limit is worth a
/// warning: the kernel's SO_REUSEPORT spread is random, and one more client
/// than the limit allows is refused.
const DESCRIPTOR_WARNING: f64 = 0.9;

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
        "idle: clients{clients} held {} s (CPU over the hold; memory and sockets at its end, machine and TCP mem \
         as growth since before herald started){check}; median of {} runs",
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
    let machine_before = Machine::now();
    let mut herald = bench.herald(connections, false).await?;
    let endpoints = &herald.endpoints;
    let baseline = gateway_rss(endpoints);
    let channels: Vec<String> = (0..args.subscriptions).map(|i| format!("bench:idle-{i}")).collect();
    let (mut fleet, connected) = bench.subscribers(endpoints, connections, &channels).await?;
    let clients = connected.addresses.len() as u64;
    say_descriptors(endpoints, &fleet);
    let meter = CpuMeter::start(&watched(endpoints, Some(&fleet)));
    tokio::time::sleep(args.common.duration).await;
    let cpu = meter.finish();
    let rss = gateway_rss(endpoints);
    let machine_after = Machine::now();
    let mut m = Measurement { connections: clients, cpu, ..Measurement::default() };
    m.rss_per_connection_kib = rss_per_connection(baseline, rss, clients);
    m.gateways = endpoints.gateway_pids.len() as u64;
    m.gateway_rss_mib = rss.map(|kib| kib as f64 / 1024.0);
    let loadgen_rss: Option<u64> = fleet.pids().iter().map(|&pid| procfs::rss_kib(pid).ok()).sum();
    m.loadgen_rss_per_client_kib = loadgen_rss.map(|kib| kib as f64 / clients.max(1) as f64);
    say_loadgen_memory(&fleet, loadgen_rss, clients);
    m.machine_used_mib = machine_after.used_mib_since(&machine_before);
    m.socket_mem_mib = machine_after.socket_mib_since(&machine_before);
    m.tcp_inuse = machine_after.sockets.map(|s| s.inuse);
    let mut first_error = None;
    if !args.no_broadcast {
        let via = if endpoints.grpc.is_empty() { Via::Http } else { Via::Grpc };
        let mut lane = publishers::lanes(via, endpoints, 1, 1).await?.pop().context("no publisher")?;
        let tally =
            publishers::once(&mut lane, via, Broadcasts { seq: 0, payload_bytes: 64, key_prefix: None }.next()).await;
        let expected = tally.accepted * clients;
        // However long a broadcast to a million clients takes, while it gets somewhere.
        fleet.progress.wait_delivered_unless_stalled(expected, args.drain).await;
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

/// The machine-wide figures, read at one moment.
struct Machine {
    used_kib: Option<u64>,
    sockets: Option<TcpSockets>,
}

impl Machine {
    fn now() -> Self {
        Self { used_kib: procfs::machine_used_kib().ok(), sockets: procfs::tcp_sockets().ok() }
    }

    fn used_mib_since(&self, before: &Machine) -> Option<f64> {
        Some((self.used_kib? as f64 - before.used_kib? as f64) / 1024.0)
    }

    fn socket_mib_since(&self, before: &Machine) -> Option<f64> {
        Some((self.sockets?.mem_bytes as f64 - before.sockets?.mem_bytes as f64) / (1 << 20) as f64)
    }
}

/// Says how much of the load generators' resident memory is their own: the
/// rest, the binary's and libraries' pages, is the same few MiB in each
/// process, shared between them, which their RSS counts once per process.
fn say_loadgen_memory(fleet: &Fleet, rss_kib: Option<u64>, clients: u64) {
    let anon: Option<u64> = fleet.pids().iter().map(|&pid| procfs::rss_anon_kib(pid).ok()).sum();
    let (Some(rss), Some(anon)) = (rss_kib, anon) else { return };
    eprintln!(
        "  load generators: {} MiB resident, {} MiB of it their own memory ({:.2} KiB per client), the rest \
         the pages of the binary and libraries they share",
        thousands(rss / 1024),
        thousands(anon / 1024),
        anon as f64 / clients.max(1) as f64
    );
}

/// Says how many descriptors the busiest gateway and load generator hold
/// against their limits, and warns when one is near its limit: the kernel
/// spreads connections over gateways sharing a port at random, not evenly.
fn say_descriptors(endpoints: &Endpoints, fleet: &Fleet) {
    for (role, pids) in [("gateway", &endpoints.gateway_pids), ("load generator", &fleet.pids())] {
        let held: Vec<(u64, u64)> = pids
            .iter()
            .filter_map(|&pid| Some((procfs::open_fds(pid).ok()?, procfs::open_files_limit(pid).ok()?)))
            .collect();
        let Some(&(most, limit)) = held.iter().max_by_key(|(fds, _)| *fds) else { continue };
        let least = held.iter().map(|(fds, _)| *fds).min().unwrap_or(most);
        eprintln!(
            "  {role} descriptors: {} to {} per process ({} processes), limit {}",
            thousands(least),
            thousands(most),
            held.len(),
            thousands(limit)
        );
        if most as f64 > limit as f64 * DESCRIPTOR_WARNING {
            eprintln!(
                "  warning: a {role} holds {most} of its {limit} descriptors: give more of them (--gateways, --per-process)"
            );
        }
    }
}
