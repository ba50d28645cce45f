//! The user scenario: N clients, each logged in as a user of its own (JWT).
//! For each publish path, messages go to random connections (the targeted
//! scenario's traffic, the baseline) and then to random users, on the same
//! herald and the same clients, in alternating order from run to run. Every
//! client checks every message: to its own connection or its own user id,
//! once, in order.

use std::sync::{Arc, Mutex};

use crate::cli::{Rate, UserArgs};
use crate::publishers::{Address, RandomTargets, To, Via};
use crate::stats::Column;

use super::phase::{self, Phase};
use super::{Bench, RowRuns, check_alive, print_table, ratio, topology};

const COLUMNS: [Column; 12] = phase::COMPARED_COLUMNS;

/// What a message is addressed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Aim {
    Connection,
    User,
}

fn describe(via: Via, aim: Aim, args: &UserArgs) -> String {
    let flat_out = args.rate == Rate::Max;
    match (via, aim) {
        (Via::GrpcBatch, Aim::Connection) => format!("gRPC PublishBatch ×{}, to a connection", args.batch),
        (Via::GrpcBatch, Aim::User) => format!("gRPC PublishBatch ×{}, to a user", args.batch),
        (Via::Grpc, Aim::Connection) => "gRPC Publish, to a connection".into(),
        (Via::Grpc, Aim::User) => "gRPC Publish, to a user".into(),
        (Via::Http, Aim::Connection) if flat_out => {
            format!("HTTP GET /?to_worker_id=&to_connection_id= ({} conns)", args.http_connections)
        }
        (Via::Http, Aim::Connection) => "HTTP GET /?to_worker_id=&to_connection_id=".into(),
        (Via::Http, Aim::User) if flat_out => format!("HTTP GET /?to_uid= ({} conns)", args.http_connections),
        (Via::Http, Aim::User) => "HTTP GET /?to_uid=".into(),
        (Via::HttpJson, Aim::Connection) => "HTTP POST /v1/publish, to a connection".into(),
        (Via::HttpJson, Aim::User) => "HTTP POST /v1/publish, to a user".into(),
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
            let to_connections = connected
                .addresses
                .iter()
                .map(|a| Address::parse(a).map(|a| To::Connection(Arc::new(a))))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let to_users: Vec<To> = connected.users.iter().map(|u| To::User(Arc::from(u.as_str()))).collect();
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
                        window: args.window.unwrap_or_else(|| phase::default_window(1)),
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
        Rate::Max => format!(
            ", {} gRPC lane(s), window {} msgs",
            args.lanes,
            args.window.unwrap_or_else(|| phase::default_window(1))
        ),
        Rate::PerSecond(_) => String::new(),
    };
    let title = format!(
        "user: clients logged in as a user each (JWT sub), {} B payloads to random connections vs random users, \
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
