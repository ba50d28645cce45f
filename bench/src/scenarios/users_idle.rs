//! The users-idle scenario: what a logged-in connection costs at rest. Each
//! run measures N anonymous clients (the idle scenario's baseline) and N
//! clients that log in with a JWT each (a user id of their own and `--groups`
//! groups from a pool), each on a fresh herald, in alternating order from run
//! to run: gateway (and broker) memory per connection after the hold, and its
//! ratio to the anonymous figure of the same run.
//!
//! Then it checks that the connections are who their tokens say: the
//! cluster's totals and every group's member count are queried, and one
//! broadcast, one message per user and one message per group are published,
//! each checked at the clients (every client must get exactly its own).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use herald_proto::v1::query_request::Question;

use crate::cli::UsersIdleArgs;
use crate::identity::{self, ClientIdentity};
use crate::message;
use crate::procfs::CpuMeter;
use crate::publishers::{self, Msg, To, Via};
use crate::rpc::Rpc;
use crate::stats::{Column, Measurement};

use super::{
    Bench, RowRuns, broker_rss, check_alive, gateway_rss, print_table, ratio, rss_per_connection, topology, watched,
};

const COLUMNS: [Column; 10] = [
    Column::Connections,
    Column::RssPerConnection,
    Column::Ratio,
    Column::BrokerRssPerConnection,
    Column::Cpu,
    Column::Closed,
    Column::Lost,
    Column::Duplicated,
    Column::Misdelivered,
    Column::Wrong,
];

/// Messages per `PublishBatch` of the check.
const CHECK_BATCH: usize = 1000;

/// Who the clients of one row are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Anonymous,
    /// Logged in, each a user of its own, in this many groups.
    Users(usize),
}

impl Kind {
    fn describe(self, pool: u32) -> String {
        match self {
            Self::Anonymous => "anonymous".into(),
            Self::Users(0) => "a user id each, no group".into(),
            Self::Users(1) => format!("a user id and 1 group each (of {pool})"),
            Self::Users(groups) => format!("a user id and {groups} groups each (of {pool})"),
        }
    }
}

pub async fn run(args: &UsersIdleArgs) -> anyhow::Result<()> {
    let common = &args.common;
    let mut bench = Bench::new(common)?;
    let mut kinds = vec![Kind::Anonymous];
    kinds.extend(args.groups.iter().map(|&g| Kind::Users(usize::from(g))));
    let mut rows = RowRuns::new();
    for &connections in &args.connections {
        eprintln!("users-idle {connections}: {} × {:?}, rows {kinds:?}", common.runs, common.duration);
        for run in 1..=common.runs {
            // Alternate the order, so that neither row always runs on a machine fresher than the other.
            let order: Vec<Kind> = if run % 2 == 0 { kinds.iter().rev().copied().collect() } else { kinds.clone() };
            let mut measured = Vec::new();
            for kind in order {
                measured.push((kind, run_once(&mut bench, args, connections, kind).await?));
            }
            let baseline =
                measured.iter().find(|(k, _)| *k == Kind::Anonymous).and_then(|(_, (m, _))| m.rss_per_connection_kib);
            for kind in &kinds {
                let Some(i) = measured.iter().position(|(k, _)| k == kind) else { continue };
                let (_, (mut m, first_error)) = measured.swap_remove(i);
                m.ratio = m.rss_per_connection_kib.zip(baseline).and_then(|(rss, base)| ratio(rss, base));
                let label = format!("{}; {}", kind.describe(args.group_pool), topology(common, connections));
                rows.add(&label, run, &COLUMNS, m, first_error);
            }
        }
    }
    let title = format!(
        "users-idle: clients held {} s, anonymous then logged in with a JWT (sub, groups claim); \
         RSS/conn vs the anonymous row of the same run; then a broadcast, a message per user and per group, \
         each checked at the clients; median of {} runs",
        common.duration.as_secs_f64(),
        common.runs
    );
    print_table(&title, "clients", &COLUMNS, &rows.summarize());
    Ok(())
}

async fn run_once(
    bench: &mut Bench<'_>,
    args: &UsersIdleArgs,
    connections: usize,
    kind: Kind,
) -> anyhow::Result<(Measurement, Option<String>)> {
    let logins = kind != Kind::Anonymous;
    let mut herald = bench.herald_with(connections, false, logins).await?;
    let endpoints = &herald.endpoints;
    let gateway_before = gateway_rss(endpoints);
    let broker_before = broker_rss(endpoints);
    let pool = args.group_pool as usize;
    let identities = match kind {
        Kind::Anonymous => Vec::new(),
        Kind::Users(groups) => bench.identities(connections, |i| identity::rotating_groups(i, groups, pool))?,
    };
    let (mut fleet, connected) = if logins {
        bench.logged_in(endpoints, &identities).await?
    } else {
        bench.clients(endpoints, connections).await?
    };
    let clients = connected.addresses.len() as u64;
    let meter = CpuMeter::start(&watched(endpoints, Some(&fleet)));
    tokio::time::sleep(args.common.duration).await;
    let cpu = meter.finish();
    let mut m = Measurement { connections: clients, cpu, ..Measurement::default() };
    m.rss_per_connection_kib = rss_per_connection(gateway_before, gateway_rss(endpoints), clients);
    m.broker_rss_per_connection_kib = rss_per_connection(broker_before, broker_rss(endpoints), clients);

    // Who is connected, as the clients know it.
    let by_user: HashMap<&str, &ClientIdentity> = identities.iter().map(|id| (id.user.as_str(), id)).collect();
    let mut members: HashMap<&str, u64> = HashMap::new();
    for user in &connected.users {
        let identity = by_user.get(user.as_str()).with_context(|| format!("a client logged in as unknown {user}"))?;
        for group in &identity.groups {
            *members.entry(group.as_str()).or_default() += 1;
        }
    }
    if !endpoints.grpc.is_empty() {
        m.wrong += check_directory(endpoints, clients, connected.users.len() as u64, &members).await?;
    }

    // One broadcast, one message per user, one per group: every client gets one of each that is its own.
    let mut msgs = vec![msg(To::Everyone)];
    msgs.extend(connected.users.iter().map(|user| msg(To::User(Arc::from(user.as_str())))));
    let mut groups: Vec<&str> = members.keys().copied().collect();
    groups.sort_unstable();
    msgs.extend(groups.iter().map(|group| msg(To::Group(Arc::from(*group)))));
    let fan: u64 = clients + connected.users.len() as u64 + members.values().sum::<u64>();
    let via = if endpoints.grpc.is_empty() { Via::Http } else { Via::GrpcBatch };
    let mut lane = publishers::lanes(via, endpoints, 1, 1).await?.pop().context("no publisher")?;
    let tally = publishers::all(&mut lane, via, msgs, CHECK_BATCH).await;
    // A refused message is an error; the deliveries it would have made are not counted as lost.
    let expected = if tally.errors == 0 { fan } else { fan.min(tally.accepted * clients) };
    fleet.progress.wait_delivered(expected, args.drain).await;
    m.publish_errors = tally.errors;
    let reports = fleet.reports(Duration::from_secs(30)).await?;
    let mut delivered = 0;
    for report in &reports {
        delivered += report.delivered;
        m.duplicated += report.duplicated;
        m.misdelivered += report.misdelivered;
    }
    m.lost = expected.saturating_sub(delivered);
    m.closed = fleet.progress.closed();
    check_alive(&mut herald);
    Ok((m, tally.first_error))
}

/// A check message to `to`, the first (sequence 0) to that target.
fn msg(to: To) -> Msg {
    let payload = message::encode(0, to.label(), 64);
    Msg { to, payload, key: String::new() }
}

/// Asks broker 0 how many connections and users there are and how many
/// members each group has; returns how many answers were wrong.
async fn check_directory(
    endpoints: &crate::procs::Endpoints,
    clients: u64,
    users: u64,
    members: &HashMap<&str, u64>,
) -> anyhow::Result<u64> {
    let mut rpc = Rpc::connect(endpoints, 0).await?;
    let mut wrong = 0;
    let (count, distinct) = rpc.totals().await.context("querying totals")?;
    if (count, distinct) != (clients, users) {
        eprintln!("    totals: {count} connections and {distinct} users, expected {clients} and {users}");
        wrong += 1;
    }
    for (group, &expected) in members {
        let answer = rpc.query(Question::GroupCount((*group).to_owned())).await.context("querying a group")?;
        if answer.count != expected || !answer.missing_workers.is_empty() {
            if wrong < 5 {
                eprintln!(
                    "    group {group}: {} members (missing workers {:?}), expected {expected}",
                    answer.count, answer.missing_workers
                );
            }
            wrong += 1;
        }
    }
    Ok(wrong)
}
