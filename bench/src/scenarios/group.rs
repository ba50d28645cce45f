//! The group scenario: N clients logged in with a JWT whose groups claim puts
//! every one of them in one group. Broadcasts (the fanout scenario's traffic,
//! the baseline) and then messages to that group reach the same clients, on
//! the same herald, in alternating order from run to run; every client checks
//! every message.

use crate::cli::{DeliveryArgs, Rate};
use crate::publishers::{RandomTargets, To, Via};
use crate::stats::Column;

use super::phase::{self, Phase};
use super::{Bench, RowRuns, check_alive, print_table, ratio, topology};

const COLUMNS: [Column; 12] = phase::COMPARED_COLUMNS;

/// The group every client is in.
const GROUP: &str = "everyone";

pub async fn run(args: &DeliveryArgs) -> anyhow::Result<()> {
    let common = &args.common;
    let mut bench = Bench::new(common)?;
    let via = args.via.unwrap_or(if args.rate == Rate::Max { Via::GrpcBatch } else { Via::Grpc });
    let mut rows = RowRuns::new();
    for &connections in &args.connections {
        eprintln!(
            "group {connections}: {} × {:?} per row, {} B payloads via {via:?}",
            common.runs, common.duration, args.payload
        );
        for run in 1..=common.runs {
            let mut herald = bench.herald_with(connections, via.is_http(), true).await?;
            let identities = bench.identities(connections, |_| vec![GROUP.to_owned()])?;
            let (mut fleet, connected) = bench.logged_in(&herald.endpoints, &identities).await?;
            let clients = connected.addresses.len() as u64;
            let mut targets = [To::Everyone, To::Group(GROUP.into())];
            if run % 2 == 0 {
                targets.reverse();
            }
            let mut measured = Vec::new();
            for to in targets {
                let phase = Phase {
                    via,
                    rate: args.rate,
                    lanes: args.lanes,
                    channels: 1,
                    batch: args.batch,
                    duration: common.duration,
                    drain: args.drain,
                    window: args.window.unwrap_or_else(|| phase::default_window(clients)),
                    fan: clients,
                    to_everyone: true,
                };
                let everyone = matches!(to, To::Everyone);
                let source = Box::new(RandomTargets::new(vec![to], args.payload)?);
                measured.push((everyone, phase::run(&mut fleet, &herald.endpoints, clients, &phase, source).await?));
            }
            let baseline = measured.iter().find(|(everyone, _)| *everyone).map_or(0.0, |(_, (m, _))| m.delivery_rate);
            measured.sort_by_key(|(everyone, _)| !everyone);
            for (everyone, (mut m, first_error)) in measured {
                m.ratio = ratio(m.delivery_rate, baseline);
                let label = if everyone { "broadcast" } else { "group (every client a member)" };
                rows.add(&format!("{label}, {}", topology(common, connections)), run, &COLUMNS, m, first_error);
            }
            check_alive(&mut herald);
        }
    }
    let batch = match (via, args.rate) {
        (Via::GrpcBatch, Rate::Max) => format!(" ×{}", args.batch),
        (Via::GrpcBatch, Rate::PerSecond(_)) => format!(" (≤{} per call)", args.batch),
        _ => String::new(),
    };
    let flat_out = match (args.rate, args.window) {
        (Rate::Max, Some(window)) => format!(", {} lane(s), window {window} msgs", args.lanes),
        (Rate::Max, None) => {
            format!(", {} lane(s), window {} deliveries", args.lanes, super::delivery::WINDOW_DELIVERIES)
        }
        (Rate::PerSecond(_), _) => String::new(),
    };
    let title = format!(
        "group: clients logged in with a JWT putting each in one group, {} B payloads, {} via {via:?}{batch}{flat_out}; \
         broadcasts vs group messages to the same clients, deliveries/s vs the broadcast row of the same run; \
         {} s per row, median of {} runs",
        args.payload,
        args.rate,
        common.duration.as_secs_f64(),
        common.runs
    );
    print_table(&title, "herald", &COLUMNS, &rows.summarize());
    Ok(())
}
