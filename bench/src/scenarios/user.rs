//! The user scenario: N clients, each logged in as a user of its own (JWT).
//! For each publish path, messages go to random connections (the targeted
//! scenario's traffic, the baseline) and then to random users, on the same
//! herald and the same clients, in alternating order from run to run. Every
//! client checks every message: to its own connection or its own user id,
//! once, in order. With `--one`, every message goes to the first client's
//! connection or user instead, while the others stay connected.

use std::sync::{Arc, Mutex};

use crate::cli::{Rate, UserArgs};
use crate::publishers::{Address, RandomTargets, To, Via};
use crate::stats::Column;

use super::phase::{self, Phase};
use super::{Bench, RowRuns, check_alive, print_table, ratio, topology};

const COLUMNS: [Column; 12] = phase::COMPARED_COLUMNS;

/// The payload bytes in flight with `--one`: half of the gateway's default
/// outbox (1 MiB), so that the one client is never closed as too slow.
const ONE_TARGET_WINDOW_BYTES: u64 = 512 * 1024;

/// What a message is addressed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Aim {
    Connection,
    User,
}

fn describe(via: Via, aim: Aim, args: &UserArgs) -> String {
    let flat_out = args.rate == Rate::Max;
    let whom = match (aim, args.one) {
        (Aim::Connection, false) => "to a connection",
        (Aim::Connection, true) => "to the same connection",
        (Aim::User, false) => "to a user",
        (Aim::User, true) => "to the same user",
    };
    match via {
        Via::GrpcBatch => format!("gRPC PublishBatch ×{}, {whom}", args.batch),
        Via::Grpc => format!("gRPC Publish, {whom}"),
        Via::Http => {
            let query = if aim == Aim::User { "?to_uid=" } else { "?to_worker_id=&to_connection_id=" };
            let conns = if flat_out { format!(" ({} conns)", args.http_connections) } else { String::new() };
            format!("HTTP GET /{query}{conns}, {whom}")
        }
        Via::HttpJson => format!("HTTP POST /v1/publish, {whom}"),
    }
}

pub async fn run(args: &UserArgs) -> anyhow::Result<()> {
    let common = &args.common;
    let mut bench = Bench::new(common)?;
    let http = args.via.iter().any(|v| v.is_http());
    let mut rows = RowRuns::new();
    for &connections in &args.connections {
        eprintln!(
            "user {connections}: {} × {:?} per row, {} B payloads via {:?}",
            common.runs, common.duration, args.payload, args.via
        );
        for run in 1..=common.runs {
            let mut herald = bench.herald_with(connections, http, true).await?;
            let identities = bench.identities(connections, |_| Vec::new())?;
            let (mut fleet, connected) = bench.logged_in(&herald.endpoints, &identities).await?;
            let clients = connected.addresses.len() as u64;
            let targeted = if args.one { 1 } else { connected.addresses.len() };
            let to_connections = connected
                .addresses
                .iter()
                .take(targeted)
                .map(|a| Address::parse(a).map(|a| To::Connection(Arc::new(a))))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let to_users: Vec<To> =
                connected.users.iter().take(targeted).map(|u| To::User(Arc::from(u.as_str()))).collect();
            // One source per kind of target for the whole run: every path goes on numbering where the last stopped.
            let to_connections = Arc::new(Mutex::new(RandomTargets::new(to_connections, args.payload)?));
            let to_users = Arc::new(Mutex::new(RandomTargets::new(to_users, args.payload)?));
            for &via in &args.via {
                let mut aims = [Aim::Connection, Aim::User];
                if run % 2 == 0 {
                    aims.reverse();
                }
                let mut measured = Vec::new();
                for aim in aims {
                    let phase = Phase {
                        via,
                        rate: args.rate,
                        lanes: if via.is_http() { args.http_connections } else { args.lanes },
                        channels: 1,
                        batch: args.batch,
                        duration: common.duration,
                        drain: args.drain,
                        window: window(args),
                        fan: 1,
                        to_everyone: false,
                    };
                    let source = Box::new(if aim == Aim::User { to_users.clone() } else { to_connections.clone() });
                    measured.push((aim, phase::run(&mut fleet, &herald.endpoints, clients, &phase, source).await?));
                }
                let baseline =
                    measured.iter().find(|(aim, _)| *aim == Aim::Connection).map_or(0.0, |(_, (m, _))| m.delivery_rate);
                measured.sort_by_key(|(aim, _)| *aim != Aim::Connection);
                for (aim, (mut m, first_error)) in measured {
                    m.ratio = ratio(m.delivery_rate, baseline);
                    rows.add(&describe(via, aim, args), run, &COLUMNS, m, first_error);
                }
            }
            check_alive(&mut herald);
        }
    }
    let herald: Vec<String> = args.connections.iter().map(|&n| topology(common, n)).collect();
    let flat_out = match args.rate {
        Rate::Max => format!(", {} gRPC lane(s), window {} msgs", args.lanes, window(args)),
        Rate::PerSecond(_) => String::new(),
    };
    let aims = if args.one { "one connection vs one user" } else { "random connections vs random users" };
    let title = format!(
        "user: clients logged in as a user each (JWT sub), {} B payloads to {aims}, \
         {}{flat_out}, on {}; deliveries/s vs the connection row of the same run; {} s per row, median of {} runs",
        args.payload,
        args.rate,
        herald.join(" / "),
        common.duration.as_secs_f64(),
        common.runs
    );
    print_table(&title, "publish", &COLUMNS, &rows.summarize());
    Ok(())
}

/// The flat-out window: as given, or the default for the kind of target.
fn window(args: &UserArgs) -> u64 {
    let one_target = || (ONE_TARGET_WINDOW_BYTES / args.payload.max(1) as u64).max(1);
    args.window.unwrap_or_else(|| if args.one { one_target() } else { phase::default_window(1) })
}
