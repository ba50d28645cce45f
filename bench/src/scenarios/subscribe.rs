//! The subscribe scenario: how many client-channel subscriptions and
//! unsubscriptions herald carries out per second. Callers, each on a
//! connection of its own speaking the client protocol, alternately subscribe
//! to a channel and unsubscribe from it (channel `i mod --channels` for the
//! caller's i-th pair), each waiting for the reply before the next command,
//! for `--duration`. A subscription is answered once the broker follows it,
//! so each one is a round trip through the gateway's directory report.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::cli::SubscribeArgs;
use crate::clients::{self, Client};
use crate::procfs::CpuMeter;
use crate::procs::Herald;
use crate::rpc::Calls;
use crate::stats::{Column, Measurement};

use super::{Bench, RowRuns, check_alive, print_table, topology, watched};

const COLUMNS: [Column; 6] =
    [Column::Connections, Column::OpsRate, Column::PublishErrors, Column::Latency, Column::Cpu, Column::Closed];

pub async fn run(args: &SubscribeArgs) -> anyhow::Result<()> {
    let common = &args.common;
    if args.callers == 0 || args.channels == 0 {
        bail!("--callers and --channels must be at least 1");
    }
    let bench = Bench::new(common)?;
    let mut rows = RowRuns::new();
    eprintln!(
        "subscribe: {} × {:?}, {} callers on {} channels",
        common.runs, common.duration, args.callers, args.channels
    );
    for run in 1..=common.runs {
        let mut herald = bench.herald(args.callers, false).await?;
        let channels = args.channels;
        let (m, first_error) =
            measure_callers(&herald, args.callers, common.duration, "subscribe", |i, client, deadline| {
                churn(client, i, channels, deadline)
            })
            .await?;
        let label = format!("subscribe + unsubscribe, {}", topology(common, args.callers));
        rows.add(&label, run, &COLUMNS, m, first_error);
        check_alive(&mut herald);
    }
    let title = format!(
        "subscribe: callers on connections of their own speaking herald.json.v1, each alternately subscribing to \
         and unsubscribing from one of {} channels and waiting for the reply; commands/s; {} s per row, median of {} runs",
        args.channels,
        common.duration.as_secs_f64(),
        common.runs
    );
    print_table(&title, "commands", &COLUMNS, &rows.summarize());
    Ok(())
}

/// Connects `count` callers to `herald`, each on a connection of its own
/// speaking the client protocol, runs `caller(i, client, deadline)` for
/// each until `duration` has passed, and measures what they did: calls
/// answered per second, errors, latency, CPU; and the first error.
pub(super) async fn measure_callers<F, Fut>(
    herald: &Herald,
    count: usize,
    duration: Duration,
    what: &str,
    caller: F,
) -> anyhow::Result<(Measurement, Option<String>)>
where
    F: Fn(usize, Client, Instant) -> Fut,
    Fut: Future<Output = Calls> + Send + 'static,
{
    let url = herald.endpoints.ws_urls.first().cloned().context("no WebSocket URL")?;
    let mut callers = Vec::with_capacity(count);
    for _ in 0..count {
        callers.push(clients::connect_speaking(&url, Ipv4Addr::LOCALHOST).await?);
    }
    let meter = CpuMeter::start(&watched(&herald.endpoints, None));
    let began = Instant::now();
    let deadline = began + duration;
    let tasks: Vec<_> =
        callers.into_iter().enumerate().map(|(i, client)| tokio::spawn(caller(i, client, deadline))).collect();
    let mut total = Calls::default();
    for task in tasks {
        total.merge(task.await.with_context(|| format!("a {what} caller failed"))?);
    }
    let m = Measurement {
        connections: count as u64,
        ops_rate: total.answered as f64 / began.elapsed().as_secs_f64(),
        publish_errors: total.errors,
        latency: total.latency.percentiles(),
        cpu: meter.finish(),
        ..Measurement::default()
    };
    Ok((m, total.first_error))
}

/// One caller: subscribe, unsubscribe, next channel, until `deadline`.
async fn churn(mut client: Client, caller: usize, channels: usize, deadline: Instant) -> Calls {
    let mut calls = Calls::default();
    let mut id = 0;
    while Instant::now() < deadline {
        let channel = format!("bench:churn-{}", (caller + id as usize / 2) % channels);
        id += 1;
        let sent = Instant::now();
        let done = client.change_subscription(id, &channel, id % 2 == 1).await;
        calls.latency.record(sent.elapsed().as_micros() as u64);
        match done {
            Ok(()) => calls.answered += 1,
            Err(e) => {
                calls.errors += 1;
                calls.first_error.get_or_insert_with(|| format!("{e:#}"));
                break;
            }
        }
    }
    calls
}
