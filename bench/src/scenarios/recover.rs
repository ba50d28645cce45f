//! The recover scenario: how long a client that comes back waits for what
//! it missed. A channel with history is given `--missed` publications; then
//! callers, each on a connection of its own speaking the client protocol,
//! resubscribe to it recovering from the position `--missed` publications
//! back, check that the reply holds them all, unsubscribe, and again, for
//! `--duration`. Latency is from sending the subscribe to reading its reply.
//! Standalone, the history is in the broker's memory; with `--brokers` above
//! 1, in JetStream.

use std::time::Instant;

use anyhow::{Context, bail};
use herald_proto::v1::{Content, PublishRequest, Target, content, target};

use crate::cli::RecoverArgs;
use crate::clients::Client;
use crate::rpc::{Calls, Rpc};
use crate::stats::Column;

use super::subscribe::measure_callers;
use super::{Bench, RowRuns, check_alive, print_table, topology};

const COLUMNS: [Column; 6] =
    [Column::Connections, Column::OpsRate, Column::PublishErrors, Column::Latency, Column::Cpu, Column::Closed];

/// The channel recovered from (in the bench's `hist:` namespace).
const CHANNEL: &str = "hist:recover";

pub async fn run(args: &RecoverArgs) -> anyhow::Result<()> {
    let common = &args.common;
    if args.callers == 0 || args.missed == 0 || args.missed > 1000 {
        bail!("--callers must be at least 1, --missed from 1 to 1000 (the history kept)");
    }
    let bench = Bench::new(common)?;
    let mut rows = RowRuns::new();
    eprintln!("recover: {} × {:?}, {} callers, {} missed", common.runs, common.duration, args.callers, args.missed);
    for run in 1..=common.runs {
        let mut herald = bench.herald(args.callers, false).await?;
        let mut rpc = Rpc::connect(&herald.endpoints, 0).await?;
        let mut last = None;
        for i in 0..args.missed {
            let text = format!("{i}:{}", "x".repeat(args.payload.saturating_sub(8)));
            let request = PublishRequest {
                target: Some(Target { kind: Some(target::Kind::Channel(CHANNEL.into())), except: Vec::new() }),
                content: Some(Content { body: Some(content::Body::Text(text)) }),
                ..PublishRequest::default()
            };
            last = rpc.publish(request).await.context("publishing the history to recover")?.position;
        }
        let last = last.context("a publication to a channel with history has a position")?;
        let since = last.offset - args.missed;
        let missed = args.missed;
        let (m, first_error) =
            measure_callers(&herald, args.callers, common.duration, "recovering", |_, client, deadline| {
                recover(client, since, last.epoch.clone(), missed, deadline)
            })
            .await?;
        let label = format!("recover {} missed, {}", args.missed, topology(common, args.callers));
        rows.add(&label, run, &COLUMNS, m, first_error);
        check_alive(&mut herald);
    }
    let title = format!(
        "recover: callers on connections of their own speaking herald.json.v1 resubscribe to a channel with history \
         from {} publications back ({} B payloads) and get them in the reply; recoveries/s and their latency; {} s \
         per row, median of {} runs",
        args.missed,
        args.payload,
        common.duration.as_secs_f64(),
        common.runs
    );
    print_table(&title, "recoveries", &COLUMNS, &rows.summarize());
    Ok(())
}

/// One caller: recover, check, unsubscribe, until `deadline`.
async fn recover(mut client: Client, since: u64, epoch: String, missed: u64, deadline: Instant) -> Calls {
    let mut calls = Calls::default();
    let mut id = 0;
    while Instant::now() < deadline {
        id += 2;
        let sent = Instant::now();
        let recovered = client.recover(id - 1, CHANNEL, since, &epoch).await;
        calls.latency.record(sent.elapsed().as_micros() as u64);
        let outcome = match recovered {
            Ok(n) if n as u64 == missed => client.change_subscription(id, CHANNEL, false).await,
            Ok(n) => Err(anyhow::anyhow!("recovered {n} publications, not {missed}")),
            Err(e) => Err(e),
        };
        match outcome {
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
