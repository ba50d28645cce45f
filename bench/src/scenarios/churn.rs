//! The churn scenario: how many group joins and leaves herald carries out per
//! second. N anonymous clients connect (to `herald standalone` unless told
//! otherwise); then callers send gRPC Controls, each one `join_groups` or
//! `leave_groups` of one group on one connection (connection `i` toggles its
//! membership of group `i mod --groups`), each caller waiting for its answer
//! before its next, for `--duration`. The baseline, in the same run and with
//! the same callers and connections: unary `Publish`es to random connections,
//! each checked at its client. With `--batch N`, each call carries N
//! operations: a `ControlBatch` of N connections' changes against a
//! `PublishBatch` of N messages.
//!
//! Each caller owns its connections (`i mod callers`), so the changes to one
//! connection are made in order and the harness knows where each one ends up.
//! After the run, every group's members are queried and compared with that.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use herald_proto::v1::query_request::Question;

use crate::cli::{ChurnArgs, Rate};
use crate::procfs::CpuMeter;
use crate::procs::Endpoints;
use crate::publishers::{Address, RandomTargets, To, Via};
use crate::rpc::{Calls, Rpc, group_change, joined};
use crate::stats::{Column, Measurement};

use super::phase::{self, Phase};
use super::{Bench, RowRuns, check_alive, print_table, ratio, topology, watched};

const COLUMNS: [Column; 10] = [
    Column::Connections,
    Column::OpsRate,
    Column::Ratio,
    Column::PublishErrors,
    Column::Wrong,
    Column::Lost,
    Column::Misdelivered,
    Column::Closed,
    Column::Latency,
    Column::Cpu,
];

/// Connection `i`'s group.
fn group_of(i: usize, groups: u32) -> String {
    format!("churn-{}", i % groups as usize)
}

/// Which connections caller `caller` of `callers` owns.
fn owned(connections: usize, caller: usize, callers: usize) -> impl Iterator<Item = usize> {
    (caller..connections).step_by(callers.max(1))
}

pub async fn run(args: &ChurnArgs) -> anyhow::Result<()> {
    let mut common = args.common.clone();
    common.standalone = !args.split && common.brokers == 1 && common.gateways.is_none() && !common.is_external();
    if args.concurrency == 0 || args.channels == 0 {
        bail!("--concurrency and --channels must be at least 1");
    }
    let mut bench = Bench::new(&common)?;
    let mut rows = RowRuns::new();
    for &connections in &args.connections {
        eprintln!(
            "churn {connections}: {} × {:?} per row, {} in flight on {} channel(s)",
            common.runs, common.duration, args.concurrency, args.channels
        );
        for run in 1..=common.runs {
            let mut herald = bench.herald(connections, false).await?;
            let (mut fleet, connected) = bench.clients(&herald.endpoints, connections).await?;
            let clients = connected.addresses.len() as u64;
            let addresses = connected
                .addresses
                .iter()
                .map(|a| Address::parse(a).map(Arc::new))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mut order = [false, true];
            if run % 2 == 0 {
                order.reverse();
            }
            let mut measured = Vec::new();
            for controls in order {
                let (mut m, first_error) = if controls {
                    churn(&herald.endpoints, &fleet, &addresses, args, common.duration).await?
                } else {
                    let phase = Phase {
                        via: if args.batch > 1 { Via::GrpcBatch } else { Via::Grpc },
                        rate: Rate::Max,
                        lanes: args.concurrency,
                        channels: args.channels,
                        batch: args.batch as usize,
                        duration: common.duration,
                        drain: args.drain,
                        window: phase::default_window(1),
                        fan: 1,
                        to_everyone: false,
                    };
                    let targets = addresses.iter().map(|a| To::Connection(a.clone())).collect();
                    let source = Box::new(RandomTargets::new(targets, args.payload)?);
                    let (mut m, first_error) =
                        phase::run(&mut fleet, &herald.endpoints, clients, &phase, source).await?;
                    m.ops_rate = m.publish_rate;
                    // Several callers publish to one connection: order between them is not promised.
                    m.reordered = 0;
                    (m, first_error)
                };
                m.connections = clients;
                measured.push((controls, m, first_error));
            }
            let baseline = measured.iter().find(|(controls, ..)| !controls).map_or(0.0, |(_, m, _)| m.ops_rate);
            measured.sort_by_key(|(controls, ..)| *controls);
            for (controls, mut m, first_error) in measured {
                m.ratio = ratio(m.ops_rate, baseline);
                let what = match (controls, args.batch) {
                    (true, 1) => "Control join_groups / leave_groups, 1 connection × 1 group each".to_owned(),
                    (true, n) => {
                        format!("ControlBatch ×{n} of join_groups / leave_groups, 1 connection × 1 group each")
                    }
                    (false, 1) => "Publish to a connection (baseline)".to_owned(),
                    (false, n) => format!("PublishBatch ×{n} to connections (baseline)"),
                };
                let label = format!("{what}, {}", topology(&common, connections));
                rows.add(&label, run, &COLUMNS, m, first_error);
            }
            check_alive(&mut herald);
        }
    }
    let title = format!(
        "churn: gRPC calls of {} operation(s), {} in flight on {} HTTP/2 connection(s), each caller waiting for \
         its answer; ops/s vs the Publish row of the same run; {} groups, members checked after the run; \
         {} s per row, median of {} runs",
        args.batch,
        args.concurrency,
        args.channels,
        args.groups,
        common.duration.as_secs_f64(),
        common.runs
    );
    print_table(&title, "calls", &COLUMNS, &rows.summarize());
    Ok(())
}

/// What one caller's controls came to, and where they left its connections.
#[derive(Default)]
struct Toggled {
    calls: Calls,
    /// For each owned connection: whether it ends in its group (`None`: unknown, a call failed).
    membership: Vec<(usize, Option<bool>)>,
}

/// Joins and leaves for `duration`, then checks every group's members.
async fn churn(
    endpoints: &Endpoints,
    fleet: &crate::fleet::Fleet,
    addresses: &[Arc<Address>],
    args: &ChurnArgs,
    duration: Duration,
) -> anyhow::Result<(Measurement, Option<String>)> {
    let callers = args.concurrency.min(addresses.len()).max(1);
    let mut channels = Vec::new();
    for _ in 0..args.channels.min(callers) {
        channels.push(Rpc::connect(endpoints, 0).await?);
    }
    let addresses: Arc<Vec<Arc<Address>>> = Arc::new(addresses.to_vec());
    let meter = CpuMeter::start(&watched(endpoints, Some(fleet)));
    let began = Instant::now();
    let deadline = began + duration;
    let tasks: Vec<_> = (0..callers)
        .map(|caller| {
            let rpc = channels[caller % channels.len()].clone();
            let mine = Owned { addresses: addresses.clone(), caller, callers, groups: args.groups };
            tokio::spawn(toggle(rpc, mine, args.batch as usize, deadline))
        })
        .collect();
    let mut total = Calls::default();
    let mut membership = Vec::new();
    for task in tasks {
        let toggled = task.await.context("a control caller failed")?;
        total.merge(toggled.calls);
        membership.extend(toggled.membership);
    }
    let elapsed = began.elapsed();
    let cpu = meter.finish();
    let mismatched = check_members(endpoints, &addresses, &membership, args.groups).await?;
    let m = Measurement {
        ops_rate: total.answered as f64 / elapsed.as_secs_f64(),
        publish_errors: total.errors,
        wrong: total.wrong + mismatched,
        latency: total.latency.percentiles(),
        closed: fleet.progress.closed(),
        cpu,
        ..Measurement::default()
    };
    Ok((m, total.first_error))
}

/// The connections one caller owns, of all `addresses`.
struct Owned {
    addresses: Arc<Vec<Arc<Address>>>,
    caller: usize,
    callers: usize,
    groups: u32,
}

/// One caller: toggles the membership of its connections in turn, `batch`
/// connections per call, until `deadline`.
async fn toggle(mut rpc: Rpc, owned_by: Owned, batch: usize, deadline: Instant) -> Toggled {
    let Owned { addresses, caller, callers, groups } = owned_by;
    let mine: Vec<usize> = owned(addresses.len(), caller, callers).collect();
    let names: Vec<String> = mine.iter().map(|&i| group_of(i, groups)).collect();
    let mut member: Vec<Option<bool>> = vec![Some(false); mine.len()];
    let mut calls = Calls::default();
    let mut next = 0;
    while Instant::now() < deadline {
        // The next connections in turn whose membership is known, each once.
        let mut picked = Vec::with_capacity(batch);
        for _ in 0..mine.len() {
            if picked.len() == batch {
                break;
            }
            let j = next % mine.len();
            next += 1;
            if let Some(joined_now) = member[j] {
                picked.push((j, joined_now));
            }
        }
        if picked.is_empty() {
            break;
        }
        let mut ops: Vec<_> =
            picked.iter().map(|&(j, joined_now)| group_change(&addresses[mine[j]], &names[j], !joined_now)).collect();
        let sent = Instant::now();
        let answers = if batch == 1
            && let Some(op) = ops.pop()
        {
            rpc.control(op).await.map(|answer| vec![Ok(answer)])
        } else {
            rpc.control_batch(ops).await
        };
        calls.latency.record(sent.elapsed().as_micros() as u64);
        let answers = match answers {
            Ok(answers) if answers.len() == picked.len() => answers,
            Ok(answers) => {
                let wrong = format!("{} results for {} controls", answers.len(), picked.len());
                vec![Err(wrong); picked.len()]
            }
            // It may or may not have been made (DEADLINE_EXCEEDED): the state of these connections is unknown.
            Err(status) => vec![Err(status.to_string()); picked.len()],
        };
        for ((j, joined_now), answer) in picked.into_iter().zip(answers) {
            member[j] = match answer {
                Ok(answer) if answer.connections == 1 && answer.missing_workers.is_empty() => {
                    calls.answered += 1;
                    Some(!joined_now)
                }
                Ok(answer) => {
                    calls.answered += 1;
                    calls.wrong += 1;
                    if calls.wrong == 1 {
                        eprintln!("    a control on {} answered {answer:?}", addresses[mine[j]].joined);
                    }
                    None
                }
                Err(reason) => {
                    calls.errors += 1;
                    calls.first_error.get_or_insert(reason);
                    None
                }
            };
        }
    }
    Toggled { calls, membership: mine.into_iter().zip(member).collect() }
}

/// Queries every group's members and counts the connections that are (or
/// are not) in a group against what the callers made of them.
async fn check_members(
    endpoints: &Endpoints,
    addresses: &[Arc<Address>],
    membership: &[(usize, Option<bool>)],
    groups: u32,
) -> anyhow::Result<u64> {
    let mut expected: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut unknown: BTreeSet<&str> = BTreeSet::new();
    for &(i, state) in membership {
        match state {
            Some(true) => {
                expected.entry(group_of(i, groups)).or_default().insert(addresses[i].joined.clone());
            }
            Some(false) => {}
            None => {
                unknown.insert(&addresses[i].joined);
            }
        }
    }
    let members: usize = expected.values().map(BTreeSet::len).sum();
    eprintln!(
        "    checking {groups} groups: {members} members expected, {} connections left out (a call failed)",
        unknown.len()
    );
    let mut rpc = Rpc::connect(endpoints, 0).await?;
    let mut mismatched = 0;
    for g in 0..groups as usize {
        let group = group_of(g, groups);
        let answer = rpc.query(Question::GroupMembers(group.clone())).await.context("querying a group's members")?;
        let found: BTreeSet<String> =
            answer.connections.iter().filter_map(|c| c.address.as_ref()).map(joined).collect();
        let want = expected.remove(&group).unwrap_or_default();
        let wrong = mismatches(&want, &found, &unknown);
        if wrong > 0 || !answer.missing_workers.is_empty() {
            if mismatched == 0 {
                eprintln!(
                    "    group {group}: {} members, {} expected, {wrong} differ, missing workers {:?}",
                    found.len(),
                    want.len(),
                    answer.missing_workers
                );
            }
            mismatched += wrong + u64::from(!answer.missing_workers.is_empty());
        }
    }
    Ok(mismatched)
}

/// Connections in one set and not the other, leaving out those whose state is unknown.
fn mismatches(want: &BTreeSet<String>, found: &BTreeSet<String>, unknown: &BTreeSet<&str>) -> u64 {
    want.symmetric_difference(found).filter(|a| !unknown.contains(a.as_str())).count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_own_disjoint_connections_covering_all() {
        let mut all: Vec<usize> = (0..3).flat_map(|c| owned(10, c, 3)).collect();
        assert_eq!(owned(10, 1, 3).collect::<Vec<_>>(), [1, 4, 7]);
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_eq!(group_of(205, 100), "churn-5");
    }

    #[test]
    fn members_are_compared_except_where_unknown() {
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<String>>();
        let want = set(&["gw0/1", "gw0/2"]);
        assert_eq!(mismatches(&want, &set(&["gw0/1", "gw0/2"]), &BTreeSet::new()), 0);
        assert_eq!(mismatches(&want, &set(&["gw0/1", "gw0/3"]), &BTreeSet::new()), 2);
        assert_eq!(mismatches(&want, &set(&["gw0/1", "gw0/3"]), &BTreeSet::from(["gw0/3"])), 1);
    }
}
