//! The group and channel scenarios. Group: N clients logged in with a JWT
//! whose groups claim puts every one of them in one group. Channel: N
//! anonymous clients speaking the client protocol, every one subscribed to
//! one client channel; history: the same on a channel whose namespace keeps
//! history (each publication stored, with its offset). Broadcasts (the
//! fanout scenario's traffic, the
//! baseline) and then messages to that group or channel reach the same
//! clients, on the same herald, in alternating order from run to run; every
//! client checks every message.

use crate::cli::{DeliveryArgs, Rate};
use crate::publishers::{RandomTargets, To, Via};
use crate::stats::Column;

use super::phase::{self, Phase};
use super::{Bench, RowRuns, check_alive, print_table, ratio, topology};

const COLUMNS: [Column; 12] = phase::COMPARED_COLUMNS;

/// The group every client is in.
const GROUP: &str = "everyone";
/// The client channel every client subscribes to (in the namespace the
/// bench's gateways offer).
const CHANNEL: &str = "bench:everyone";
/// The client channel with history every client subscribes to.
const HISTORY_CHANNEL: &str = "hist:everyone";

/// Who the non-broadcast messages go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    Group,
    Channel,
    History,
}

impl Audience {
    fn name(self) -> &'static str {
        match self {
            Self::Group => "group",
            Self::Channel => "channel",
            Self::History => "history",
        }
    }

    /// The client channel its clients subscribe to, if any.
    fn channel(self) -> Option<&'static str> {
        match self {
            Self::Group => None,
            Self::Channel => Some(CHANNEL),
            Self::History => Some(HISTORY_CHANNEL),
        }
    }
}

pub async fn run(args: &DeliveryArgs, audience: Audience) -> anyhow::Result<()> {
    let common = &args.common;
    let mut bench = Bench::new(common)?;
    let via = args.via.unwrap_or(if args.rate == Rate::Max { Via::GrpcBatch } else { Via::Grpc });
    let mut rows = RowRuns::new();
    for &connections in &args.connections {
        eprintln!(
            "{} {connections}: {} × {:?} per row, {} B payloads via {via:?}",
            audience.name(),
            common.runs,
            common.duration,
            args.payload
        );
        for run in 1..=common.runs {
            let logins = audience == Audience::Group;
            let mut herald = bench.herald_with(connections, via.is_http(), logins).await?;
            let (mut fleet, connected) = match audience.channel() {
                None => {
                    let identities = bench.identities(connections, |_| vec![GROUP.to_owned()])?;
                    bench.logged_in(&herald.endpoints, &identities).await?
                }
                Some(channel) => bench.subscribers(&herald.endpoints, connections, &[channel.to_owned()]).await?,
            };
            let clients = connected.addresses.len() as u64;
            let members = match audience.channel() {
                None => To::Group(GROUP.into()),
                Some(channel) => To::channel(channel),
            };
            let mut targets = [To::Everyone, members];
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
                let label = match (everyone, audience) {
                    (true, _) => "broadcast",
                    (false, Audience::Group) => "group (every client a member)",
                    (false, Audience::Channel) => "client channel (every client subscribed)",
                    (false, Audience::History) => "client channel with history (every client subscribed)",
                };
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
    let clients = match audience {
        Audience::Group => "clients logged in with a JWT putting each in one group",
        Audience::Channel => "clients speaking herald.json.v1, each subscribed to one client channel",
        Audience::History => {
            "clients speaking herald.json.v1, each subscribed to one client channel keeping the last 1,000 publications"
        }
    };
    let title = format!(
        "{}: {clients}, {} B payloads, {} via {via:?}{batch}{flat_out}; broadcasts vs {} messages to the same \
         clients, deliveries/s vs the broadcast row of the same run; {} s per row, median of {} runs",
        audience.name(),
        args.payload,
        args.rate,
        audience.name(),
        common.duration.as_secs_f64(),
        common.runs
    );
    print_table(&title, "herald", &COLUMNS, &rows.summarize());
    Ok(())
}
