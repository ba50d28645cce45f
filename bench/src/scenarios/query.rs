//! The query scenario: how long herald takes to say who is connected. N
//! clients log in as a user each, spread over the gateways of a cluster (3
//! brokers on NATS by default, a gateway on each); then callers ask broker 0,
//! each waiting for its answer before asking again, for `--duration` per row:
//!
//! - `local`: Query{connection} for a connection of broker 0's own gateway,
//!   answered by broker 0 from its copy of that gateway's directory (the
//!   baseline: a gRPC round trip and a lookup);
//! - `remote`: Query{connection} for a connection of another broker's gateway
//!   (broker 0 asks that broker over NATS);
//! - `online` / `offline`: Query{user_online} for a connected user, or one
//!   that never connected (broker 0 asks every broker);
//! - `presence`: Query{channel_subscribers} for a client channel every
//!   client subscribed to (the clients then speak the client protocol):
//!   broker 0 asks every broker and lists every subscriber.
//!
//! Every answer is checked: the connection is live and bound to its user, the
//! user is online (or not), every subscriber is listed, and no gateway is
//! missing from the answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use herald_proto::v1::QueryResponse;
use herald_proto::v1::query_request::Question;

use crate::cli::{QueryArgs, QueryKind};
use crate::procfs::CpuMeter;
use crate::procs::Endpoints;
use crate::publishers::{Address, address, xorshift};
use crate::rpc::{Calls, Rpc, joined};
use crate::stats::{Column, Measurement};

use super::{Bench, RowRuns, check_alive, print_table, ratio, topology, watched};

const COLUMNS: [Column; 7] = [
    Column::Connections,
    Column::OpsRate,
    Column::PublishErrors,
    Column::Wrong,
    Column::Latency,
    Column::Ratio,
    Column::Cpu,
];

/// Most HTTP/2 connections the callers of one row share.
const MAX_CHANNELS: usize = 4;
/// How long the directories may take to list every client after they connected.
const SETTLE: Duration = Duration::from_secs(15);
/// The client channel every client subscribes to for the presence row.
const PRESENCE_CHANNEL: &str = "bench:presence";

/// A connected client: where it is and who it is.
#[derive(Debug, Clone)]
struct Known {
    address: Address,
    user: Arc<str>,
}

/// What one row asks about.
struct Asked {
    kind: QueryKind,
    /// For `local`, `remote` and `online`: the clients to pick from.
    clients: Arc<Vec<Known>>,
}

fn describe(kind: QueryKind, concurrency: usize) -> String {
    let what = match kind {
        QueryKind::Local => "Query{connection}, on broker 0's own gateway (baseline)",
        QueryKind::Remote => "Query{connection}, on another broker's gateway",
        QueryKind::Online => "Query{user_online}, a connected user",
        QueryKind::Offline => "Query{user_online}, a user never connected",
        QueryKind::Presence => "Query{channel_subscribers}, every client subscribed",
    };
    format!("{what}, {concurrency} in flight")
}

pub async fn run(args: &QueryArgs) -> anyhow::Result<()> {
    let common = &args.common;
    let mut bench = Bench::new(common)?;
    if args.concurrency.contains(&0) {
        bail!("--concurrency must be at least 1");
    }
    let mut rows = RowRuns::new();
    for &connections in &args.connections {
        eprintln!(
            "query {connections}: {} × {:?} per row, {:?} at {:?} in flight",
            common.runs, common.duration, args.kinds, args.concurrency
        );
        for run in 1..=common.runs {
            let mut herald = bench.herald_with(connections, false, true).await?;
            let identities = bench.identities(connections, |_| Vec::new())?;
            let channels =
                if args.kinds.contains(&QueryKind::Presence) { vec![PRESENCE_CHANNEL.to_owned()] } else { Vec::new() };
            let (fleet, connected) = bench.logged_in_to(&herald.endpoints, &identities, &channels).await?;
            let endpoints = &herald.endpoints;
            let mut known = Vec::with_capacity(connected.addresses.len());
            for (address, user) in connected.addresses.iter().zip(&connected.users) {
                known.push(Known { address: Address::parse(address)?, user: Arc::from(user.as_str()) });
            }
            let settle_wrong = settle(endpoints, known.len() as u64).await?;
            let (local, remote) = split_by_broker(common, endpoints, &known);
            let clients = known.len() as u64;
            let known = Arc::new(known);
            for &concurrency in &args.concurrency {
                let mut measured = Vec::new();
                for &kind in &args.kinds {
                    let clients_asked = match kind {
                        QueryKind::Local => local.clone(),
                        QueryKind::Remote => remote.clone(),
                        QueryKind::Online | QueryKind::Offline | QueryKind::Presence => known.clone(),
                    };
                    if clients_asked.is_empty() && kind != QueryKind::Offline {
                        eprintln!("  {}: no such client here, skipped", describe(kind, concurrency));
                        continue;
                    }
                    let asked = Arc::new(Asked { kind, clients: clients_asked });
                    let meter = CpuMeter::start(&watched(endpoints, Some(&fleet)));
                    let (mut m, first_error) = ask(endpoints, &asked, concurrency, common.duration).await?;
                    m.cpu = meter.finish();
                    m.connections = clients;
                    m.wrong += settle_wrong;
                    measured.push((kind, m, first_error));
                }
                let baseline = measured
                    .iter()
                    .find(|(kind, ..)| *kind == QueryKind::Local)
                    .and_then(|(_, m, _)| m.latency.map(|l| l.p99));
                for (kind, mut m, first_error) in measured {
                    m.ratio = m.latency.zip(baseline).and_then(|(l, base)| ratio(l.p99, base));
                    let label = format!("{}, {}", describe(kind, concurrency), topology(common, connections));
                    rows.add(&label, run, &COLUMNS, m, first_error);
                }
            }
            drop(fleet);
            check_alive(&mut herald);
        }
    }
    let title = format!(
        "query: clients logged in as a user each, queries to broker 0, each caller waiting for its answer; \
         every answer checked; p99 vs the local Query{{connection}} row of the same run and concurrency; \
         {} s per row, median of {} runs",
        common.duration.as_secs_f64(),
        common.runs
    );
    print_table(&title, "query", &COLUMNS, &rows.summarize());
    Ok(())
}

/// Waits until broker 0 counts every client and user; returns 1 if it never
/// did (the rows' answers are then suspect too), else 0.
async fn settle(endpoints: &Endpoints, clients: u64) -> anyhow::Result<u64> {
    let mut rpc = Rpc::connect(endpoints, 0).await?;
    let began = Instant::now();
    loop {
        let totals = rpc.totals().await.context("querying totals")?;
        if totals == (clients, clients) {
            eprintln!("  broker 0 lists every client after {:.1}s", began.elapsed().as_secs_f64());
            return Ok(0);
        }
        if began.elapsed() > SETTLE {
            eprintln!("  broker 0 lists {} connections and {} users, not {clients} of each", totals.0, totals.1);
            return Ok(1);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The clients on broker 0's own gateways, and the others. A started
/// herald's gateway `gw<i>` is on broker `i mod brokers`; a running herald's
/// layout is unknown, so every client counts as local there.
fn split_by_broker(
    common: &crate::cli::Common,
    endpoints: &Endpoints,
    known: &[Known],
) -> (Arc<Vec<Known>>, Arc<Vec<Known>>) {
    let brokers = endpoints.grpc.len().max(1);
    let local = |k: &Known| {
        if common.is_external() || common.standalone {
            return true;
        }
        let index = k.address.worker_id.strip_prefix("gw").and_then(|i| i.parse::<usize>().ok());
        index.is_none_or(|i| i % brokers == 0)
    };
    let (local, remote): (Vec<Known>, Vec<Known>) = known.iter().cloned().partition(local);
    (Arc::new(local), Arc::new(remote))
}

/// `concurrency` callers ask `asked` for `duration`.
async fn ask(
    endpoints: &Endpoints,
    asked: &Arc<Asked>,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<(Measurement, Option<String>)> {
    let mut channels = Vec::new();
    for _ in 0..concurrency.min(MAX_CHANNELS) {
        channels.push(Rpc::connect(endpoints, 0).await?);
    }
    let began = Instant::now();
    let deadline = began + duration;
    let callers: Vec<_> = (0..concurrency)
        .map(|i| {
            let (rpc, asked) = (channels[i % channels.len()].clone(), asked.clone());
            tokio::spawn(caller(rpc, asked, deadline, i as u64))
        })
        .collect();
    let mut total = Calls::default();
    for caller in callers {
        total.merge(caller.await.context("a query caller failed")?);
    }
    let m = Measurement {
        ops_rate: total.answered as f64 / began.elapsed().as_secs_f64(),
        publish_errors: total.errors,
        wrong: total.wrong,
        latency: total.latency.percentiles(),
        ..Measurement::default()
    };
    Ok((m, total.first_error))
}

async fn caller(mut rpc: Rpc, asked: Arc<Asked>, deadline: Instant, seed: u64) -> Calls {
    let mut calls = Calls::default();
    let mut rng = (crate::message::now_ns() ^ seed.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
    while Instant::now() < deadline {
        rng = xorshift(rng);
        let pick = (rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as usize;
        let known = asked.clients.get(pick % asked.clients.len().max(1));
        let question = match (asked.kind, known) {
            (QueryKind::Local | QueryKind::Remote, Some(k)) => Question::Connection(address(&k.address)),
            (QueryKind::Online, Some(k)) => Question::UserOnline(k.user.to_string()),
            (QueryKind::Presence, _) => Question::ChannelSubscribers(PRESENCE_CHANNEL.to_owned()),
            _ => Question::UserOnline(format!("never-{pick}")),
        };
        let sent = Instant::now();
        let answer = rpc.query(question).await;
        calls.latency.record(sent.elapsed().as_micros() as u64);
        match answer {
            Ok(answer) => {
                calls.answered += 1;
                if let Err(why) = check(asked.kind, known, asked.clients.len(), &answer) {
                    if calls.wrong == 0 {
                        eprintln!("    wrong answer: {why}");
                    }
                    calls.wrong += 1;
                }
            }
            Err(status) => {
                calls.errors += 1;
                calls.first_error.get_or_insert_with(|| status.to_string());
            }
        }
    }
    calls
}

/// Whether `answer` is right for a question of `kind` about `known`, with
/// `clients` clients connected.
fn check(kind: QueryKind, known: Option<&Known>, clients: usize, answer: &QueryResponse) -> Result<(), String> {
    if !answer.missing_workers.is_empty() {
        return Err(format!("gateways missing from the answer: {:?}", answer.missing_workers));
    }
    match (kind, known) {
        (QueryKind::Local | QueryKind::Remote, Some(k)) => {
            let found = answer.connections.first();
            let address = found.and_then(|c| c.address.as_ref()).map(joined);
            let user = found.map(|c| c.user_id.as_str());
            if !answer.online || answer.connections.len() != 1 || address.as_deref() != Some(&k.address.joined) {
                return Err(format!("{} not found live: {answer:?}", k.address.joined));
            }
            if user != Some(&*k.user) {
                return Err(format!("{} is bound to {user:?}, not {}", k.address.joined, k.user));
            }
            Ok(())
        }
        (QueryKind::Online, Some(k)) if !answer.online => Err(format!("{} said offline", k.user)),
        (QueryKind::Offline, _) if answer.online => Err("a user who never connected said online".into()),
        (QueryKind::Presence, _) if answer.connections.len() != clients || answer.count != clients as u64 => {
            Err(format!("{} subscribers listed, {} counted, not {clients}", answer.connections.len(), answer.count))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use herald_proto::v1::ConnectionInfo;

    use super::*;

    fn known(address: &str, user: &str) -> Known {
        Known { address: Address::parse(address).unwrap(), user: user.into() }
    }

    #[test]
    fn answers_are_checked_against_who_is_connected() {
        let k = known("gw1/5", "u5");
        let live = QueryResponse {
            online: true,
            connections: vec![ConnectionInfo {
                address: Some(address(&k.address)),
                user_id: "u5".into(),
                ..ConnectionInfo::default()
            }],
            ..QueryResponse::default()
        };
        assert_eq!(check(QueryKind::Remote, Some(&k), 1, &live), Ok(()));
        let stranger = QueryResponse {
            connections: vec![ConnectionInfo { user_id: "u6".into(), ..live.connections[0].clone() }],
            ..live.clone()
        };
        assert!(check(QueryKind::Local, Some(&k), 1, &stranger).is_err());
        assert!(check(QueryKind::Local, Some(&k), 1, &QueryResponse::default()).is_err());
        let online = QueryResponse { online: true, ..QueryResponse::default() };
        assert_eq!(check(QueryKind::Online, Some(&k), 1, &online), Ok(()));
        assert!(check(QueryKind::Online, Some(&k), 1, &QueryResponse::default()).is_err());
        assert_eq!(check(QueryKind::Offline, None, 1, &QueryResponse::default()), Ok(()));
        assert!(check(QueryKind::Offline, None, 1, &online).is_err());
        let partial = QueryResponse { online: true, missing_workers: vec!["gw2".into()], ..QueryResponse::default() };
        assert!(check(QueryKind::Online, Some(&k), 1, &partial).is_err());
        let two = QueryResponse { count: 2, connections: vec![live.connections[0].clone(); 2], ..live.clone() };
        assert_eq!(check(QueryKind::Presence, None, 2, &two), Ok(()));
        assert!(check(QueryKind::Presence, None, 3, &two).is_err());
    }

    #[test]
    fn started_gateways_are_local_to_broker_i_mod_brokers() {
        let cli = <crate::cli::Cli as clap::Parser>::try_parse_from(["herald-bench", "query"]).unwrap();
        let crate::cli::Scenario::Query(args) = cli.scenario else { panic!("not query") };
        let grpc = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"].map(|a| a.parse().unwrap()).to_vec();
        let endpoints = Endpoints { grpc, ..Endpoints::default() };
        let all = [known("gw0/1", "u1"), known("gw1/2", "u2"), known("gw3/3", "u3"), known("gw2/4", "u4")];
        let (local, remote) = split_by_broker(&args.common, &endpoints, &all);
        let ids = |v: &[Known]| v.iter().map(|k| k.address.joined.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&local), ["gw0/1", "gw3/3"]);
        assert_eq!(ids(&remote), ["gw1/2", "gw2/4"]);
    }
}
