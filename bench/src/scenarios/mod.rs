//! The scenarios, and what they share: a herald per run, clients spread over
//! load-generator processes, memory and CPU figures, and printing results
//! (one line per run on standard error, the median table on standard output).

mod churn;
mod connects;
mod delivery;
mod events;
mod floor;
mod group;
mod idle;
mod phase;
mod publish;
mod query;
mod recover;
mod rpc;
mod soak;
mod subscribe;
mod user;
mod users_idle;

use std::time::Duration;

use anyhow::bail;

use crate::cli::{Common, Scenario};
use crate::endpoints::{self, SourceAddrs, WsUrl};
use crate::fleet::{self, Connected, Fleet, Spread};
use crate::http1;
use crate::identity::{self, ClientIdentity};
use crate::loadgen::Task;
use crate::nats;
use crate::procfs::{self, Watched};
use crate::procs::{Endpoints, External, Herald, Topology};
use crate::stats::{Column, Measurement, Row, inline, table, thousands};

/// Gateways started per this many connections when `--gateways` is not given
/// (fewer where the open-files limit is low: see [`connections_per_gateway`]).
const CONNECTIONS_PER_GATEWAY: usize = 15_000;
/// Descriptors a herald process keeps free of client connections (herald's
/// `DESCRIPTOR_RESERVE`).
const GATEWAY_RESERVE: usize = 128;
/// Descriptors a load generator needs besides its clients' (standard
/// streams, the runtime's epoll and wakers), with room to spare.
const LOADGEN_RESERVE: usize = 64;

pub async fn run(scenario: Scenario) -> anyhow::Result<()> {
    match scenario {
        Scenario::Fanout(args) => delivery::run(&args, delivery::Targeting::Broadcast).await,
        Scenario::Targeted(args) => delivery::run(&args, delivery::Targeting::Single).await,
        Scenario::Idle(args) => idle::run(&args).await,
        Scenario::Publish(args) => publish::run(&args).await,
        Scenario::Floor(args) => floor::run(&args).await,
        Scenario::UsersIdle(args) => users_idle::run(&args).await,
        Scenario::User(args) => user::run(&args).await,
        Scenario::Group(args) => group::run(&args, group::Audience::Group).await,
        Scenario::Channel(args) => group::run(&args, group::Audience::Channel).await,
        Scenario::History(args) => group::run(&args, group::Audience::History).await,
        Scenario::Recover(args) => recover::run(&args).await,
        Scenario::Query(args) => query::run(&args).await,
        Scenario::Churn(args) => churn::run(&args).await,
        Scenario::Subscribe(args) => subscribe::run(&args).await,
        Scenario::Events(args) => events::run(&args).await,
        Scenario::Connects(args) => connects::run(&args).await,
        Scenario::Rpc(args) => rpc::run(&args).await,
        Scenario::Soak(args) => soak::run(&args).await,
        Scenario::Loadgen => bail!("loadgen is not a scenario"),
    }
}

/// How many gateways `connections` get when `--gateways` is not given: one
/// per [`connections_per_gateway`], and at least one per broker.
fn default_gateways(common: &Common, connections: usize) -> usize {
    let brokers = usize::from(common.brokers);
    common.gateways.unwrap_or_else(|| connections.div_ceil(connections_per_gateway()).max(brokers)).max(1)
}

/// Connections per gateway: 15,000, or three quarters of what the open-files
/// limit leaves, if less (gateways inherit this process's limit; each
/// refuses clients past its limit). With several gateways on one port the
/// kernel hashes each connection to one of them at random: a gateway's share,
/// 15,000 on average, varies by about √15,000 ≈ 120 (at 250,000 connections
/// on 17 gateways: 14,486 to 14,907), so the quarter spare (5,000 at a 20,000
/// limit) is never near used up.
fn connections_per_gateway() -> usize {
    let room = open_files_limit().saturating_sub(GATEWAY_RESERVE);
    CONNECTIONS_PER_GATEWAY.min(room / 4 * 3).max(1)
}

/// `wanted` clients per load generator, or fewer if that is more than its
/// open-files limit (this process's, which it inherits) can hold.
fn clients_per_process(wanted: usize) -> usize {
    let room = open_files_limit().saturating_sub(LOADGEN_RESERVE).max(1);
    if wanted > room {
        eprintln!("  --per-process {wanted} is more than the open-files limit allows: {room} per load generator");
        return room;
    }
    wanted
}

/// This process's open-files limit (its children inherit it).
fn open_files_limit() -> usize {
    procfs::open_files_limit(std::process::id()).map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX))
}

/// The herald a row was measured on, as its table label.
fn topology(common: &Common, connections: usize) -> String {
    let gateways = default_gateways(common, connections);
    if common.is_external() {
        "running herald".into()
    } else if common.standalone {
        "standalone".into()
    } else if common.brokers > 1 {
        format!("{} brokers (NATS) + {gateways} ws gw", common.brokers)
    } else {
        format!("broker + {gateways} ws gw")
    }
}

/// What the runs of one invocation share.
struct Bench<'a> {
    common: &'a Common,
    sources: SourceAddrs,
    /// Variables set for every herald process the bench starts (besides the
    /// environment they inherit), e.g. `HERALD_EVENTS`.
    herald_env: Vec<(String, String)>,
}

impl<'a> Bench<'a> {
    fn new(common: &'a Common) -> anyhow::Result<Self> {
        if common.runs == 0 {
            bail!("--runs must be at least 1");
        }
        Ok(Self { common, sources: SourceAddrs::new(), herald_env: Vec::new() })
    }

    /// A herald for one run: freshly started, or the running one given on the command line.
    async fn herald(&self, connections: usize, http: bool) -> anyhow::Result<Herald> {
        self.herald_with(connections, http, false).await
    }

    /// The HS256 secret client tokens are signed with.
    fn jwt_secret(&self) -> &str {
        self.common.jwt_secret.as_deref().unwrap_or(identity::DEFAULT_SECRET)
    }

    /// As [`Bench::herald`]; with `logins`, a started herald's WebSocket
    /// gateways require a JWT signed with [`Bench::jwt_secret`] from every client.
    async fn herald_with(&self, connections: usize, http: bool, logins: bool) -> anyhow::Result<Herald> {
        let common = self.common;
        if common.is_external() {
            return Herald::external(&external(common)?).await;
        }
        let gateways = default_gateways(common, connections);
        let topology = if common.standalone {
            Topology::Standalone
        } else if common.brokers > 1 {
            let nats_server = nats::binary(common.nats_server.as_deref())?;
            Topology::Cluster { brokers: common.brokers.into(), gateways, http, nats_server }
        } else {
            Topology::Split { gateways, http }
        };
        let secret = logins.then(|| self.jwt_secret());
        Herald::start(&common.herald_binary()?, &topology, common.api_key.as_deref(), secret, &self.herald_env).await
    }

    /// `count` logged-in clients: client `i` is user `u<i>` in `groups_of(i)`.
    fn identities(
        &self,
        count: usize,
        groups_of: impl Fn(usize) -> Vec<String>,
    ) -> anyhow::Result<Vec<ClientIdentity>> {
        identity::clients(count, self.jwt_secret(), groups_of)
    }

    /// Starts load generators and connects `connections` anonymous clients to `endpoints`.
    async fn clients(&mut self, endpoints: &Endpoints, connections: usize) -> anyhow::Result<(Fleet, Connected)> {
        self.clients_with(endpoints, connections, &[], &[]).await
    }

    /// Starts load generators and connects `connections` anonymous raw
    /// clients that will do `task` at [`Fleet::go`].
    async fn talkers(
        &mut self,
        endpoints: &Endpoints,
        connections: usize,
        task: Task,
    ) -> anyhow::Result<(Fleet, Connected)> {
        self.clients_doing(endpoints, connections, &[], &[], task).await
    }

    /// Starts load generators and connects `connections` anonymous clients
    /// speaking the client protocol, each subscribed to `channels` (none:
    /// classic raw clients).
    async fn subscribers(
        &mut self,
        endpoints: &Endpoints,
        connections: usize,
        channels: &[String],
    ) -> anyhow::Result<(Fleet, Connected)> {
        self.clients_with(endpoints, connections, &[], channels).await
    }

    /// Starts load generators and connects one client per identity, each
    /// logging in with its token.
    async fn logged_in(
        &mut self,
        endpoints: &Endpoints,
        identities: &[ClientIdentity],
    ) -> anyhow::Result<(Fleet, Connected)> {
        self.logged_in_to(endpoints, identities, &[]).await
    }

    /// As [`Bench::logged_in`], each client also subscribed to `channels`
    /// with the client protocol.
    async fn logged_in_to(
        &mut self,
        endpoints: &Endpoints,
        identities: &[ClientIdentity],
        channels: &[String],
    ) -> anyhow::Result<(Fleet, Connected)> {
        let (fleet, connected) = self.clients_with(endpoints, identities.len(), identities, channels).await?;
        if connected.users.len() != connected.addresses.len() {
            bail!("{} clients connected but {} said who they are", connected.addresses.len(), connected.users.len());
        }
        Ok((fleet, connected))
    }

    async fn clients_with(
        &mut self,
        endpoints: &Endpoints,
        connections: usize,
        identities: &[ClientIdentity],
        subscribe: &[String],
    ) -> anyhow::Result<(Fleet, Connected)> {
        self.clients_doing(endpoints, connections, identities, subscribe, Task::Receive).await
    }

    async fn clients_doing(
        &mut self,
        endpoints: &Endpoints,
        connections: usize,
        identities: &[ClientIdentity],
        subscribe: &[String],
        task: Task,
    ) -> anyhow::Result<(Fleet, Connected)> {
        if endpoints.ws_urls.is_empty() {
            bail!("no WebSocket URL to connect clients to (give --ws-url)");
        }
        let spread = Spread {
            per_process: clients_per_process(self.common.per_process),
            per_source: self.common.per_source,
            connect_concurrency: self.common.connect_concurrency,
            connect_timeout: Duration::from_secs(30),
        };
        let mut plans =
            fleet::plans(connections, &endpoints.ws_urls, &spread, &mut self.sources, identities, subscribe);
        for plan in &mut plans {
            plan.task = task.clone();
        }
        let processes = plans.len();
        let began = std::time::Instant::now();
        let mut fleet = Fleet::start(plans)?;
        // However long connecting takes, while the load generators get somewhere (a
        // handshake succeeds or times out within the connect timeout).
        let connected = fleet.connected(Duration::from_secs(120)).await?;
        eprintln!(
            "  {} clients connected from {processes} load generator(s) in {:.1}s{}",
            thousands(connected.addresses.len() as u64),
            began.elapsed().as_secs_f64(),
            match &connected.first_error {
                Some(e) => format!("; {} failed, first: {e}", connected.failed),
                None => String::new(),
            }
        );
        if connected.addresses.is_empty() {
            bail!("no client could connect");
        }
        Ok((fleet, connected))
    }
}

fn external(common: &Common) -> anyhow::Result<External> {
    Ok(External {
        ws_urls: common.ws_urls.iter().map(|u| WsUrl::parse(u)).collect::<anyhow::Result<_>>()?,
        http: common.http_url.as_deref().map(endpoints::http_addr).transpose()?,
        grpc: common.grpc_addrs.iter().map(|a| endpoints::loopback(a)).collect::<anyhow::Result<_>>()?,
        admin: common.admin_urls.iter().map(|u| endpoints::http_addr(u)).collect::<anyhow::Result<_>>()?,
        gateway_pids: common.gateway_pids.clone(),
        api_key: common.api_key.clone(),
    })
}

/// Resident memory of every gateway process together, in KiB.
fn gateway_rss(endpoints: &Endpoints) -> Option<u64> {
    if endpoints.gateway_pids.is_empty() {
        return None;
    }
    endpoints.gateway_pids.iter().map(|&pid| procfs::rss_kib(pid).ok()).sum()
}

/// Resident memory of every broker process together, in KiB (`None` when
/// there is no separate broker, e.g. standalone).
fn broker_rss(endpoints: &Endpoints) -> Option<u64> {
    let brokers: Vec<u32> = endpoints.watched.iter().filter(|w| w.role == "broker").map(|w| w.pid).collect();
    if brokers.is_empty() {
        return None;
    }
    brokers.iter().map(|&pid| procfs::rss_kib(pid).ok()).sum()
}

/// KiB of gateway memory per connection: growth since `baseline` over `connections`.
fn rss_per_connection(baseline: Option<u64>, now: Option<u64>, connections: u64) -> Option<f64> {
    Some(now?.saturating_sub(baseline?) as f64 / connections.max(1) as f64)
}

/// Processes whose CPU a run reports: herald's, the load generators, and this one.
fn watched(endpoints: &Endpoints, fleet: Option<&Fleet>) -> Vec<Watched> {
    let mut watched = endpoints.watched.clone();
    if let Some(fleet) = fleet {
        watched.extend(fleet.pids().into_iter().map(|pid| Watched { role: "clients".into(), pid }));
    }
    watched.push(Watched { role: "bench".into(), pid: std::process::id() });
    watched
}

/// Warns about herald processes that died during a run: their absence
/// explains errors and losses.
fn check_alive(herald: &mut Herald) {
    for exited in herald.exited() {
        eprintln!("  warning: {exited}");
    }
}

/// Measures one configuration `runs` times with `once`, printing each run's
/// figures on standard error under `label`, and returns the medians.
async fn measure_runs(
    label: &str,
    runs: usize,
    columns: &[Column],
    mut once: impl AsyncFnMut() -> anyhow::Result<(Measurement, Option<String>)>,
) -> anyhow::Result<Measurement> {
    let mut measured = Vec::with_capacity(runs);
    for run in 1..=runs {
        let (m, first_error) = once().await?;
        eprintln!("  {label} run {run}: {}", inline(columns, &m));
        if let Some(e) = first_error {
            eprintln!("    first publish error: {e}");
        }
        measured.push(m);
    }
    Ok(Measurement::summarize(&measured))
}

/// Prints the medians of each configuration as a markdown table under
/// `title` and the command line that measured it.
fn print_table(title: &str, label: &str, columns: &[Column], rows: &[Row]) {
    println!("\n### {title}\n");
    println!("`{}`\n", command_line(std::env::args().skip(1)));
    println!("{}", table(label, columns, rows));
}

/// `herald-bench` and `args` as a shell would take them back.
fn command_line(args: impl Iterator<Item = String>) -> String {
    let mut line = String::from("herald-bench");
    for arg in args {
        line.push(' ');
        let plain = !arg.is_empty() && arg.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./,:=@%+".contains(&b));
        if plain {
            line.push_str(&arg);
        } else {
            line.push('\'');
            line.push_str(&arg.replace('\'', "'\\''"));
            line.push('\'');
        }
    }
    line
}

/// Rows measured together, every run measuring each of them once.
struct RowRuns {
    rows: Vec<(String, Vec<Measurement>)>,
}

impl RowRuns {
    fn new() -> Self {
        Self { rows: Vec::new() }
    }

    /// Adds one run's measurement of the row `label`, printing it on
    /// standard error (with `first_error`, if any) as `measure_runs` does.
    fn add(&mut self, label: &str, run: usize, columns: &[Column], m: Measurement, first_error: Option<String>) {
        eprintln!("  {label} run {run}: {}", inline(columns, &m));
        if let Some(e) = first_error {
            eprintln!("    first error: {e}");
        }
        match self.rows.iter_mut().find(|(l, _)| l == label) {
            Some((_, runs)) => runs.push(m),
            None => self.rows.push((label.to_owned(), vec![m])),
        }
    }

    /// The medians, one row per label in the order they were first added.
    fn summarize(&self) -> Vec<Row> {
        self.rows
            .iter()
            .map(|(label, runs)| Row { label: label.clone(), measurement: Measurement::summarize(runs) })
            .collect()
    }
}

/// `common` with `standalone` set unless the command line asks for split
/// roles (`--split`, `--brokers` above 1, `--gateways`) or a running herald:
/// the default of the scenarios whose target is a standalone figure.
fn standalone_unless_split(common: &Common, split: bool) -> Common {
    let mut common = common.clone();
    common.standalone = !split && common.brokers == 1 && common.gateways.is_none() && !common.is_external();
    common
}

/// The sum of every sample of the metric `name` (whatever its labels) over
/// the admin endpoints of `endpoints`; `None` when there is none to ask or
/// none answered.
async fn metric_total(endpoints: &Endpoints, name: &str) -> Option<f64> {
    let mut total = None;
    for admin in &endpoints.admin {
        let Ok(mut conn) = http1::Conn::connect(*admin, None).await else { continue };
        let Ok((200, body)) = conn.get("/metrics").await else { continue };
        let sum = metric_sum(&String::from_utf8_lossy(&body), name);
        *total.get_or_insert(0.0) += sum;
    }
    total
}

/// The sum of the samples of `name` in a Prometheus text exposition.
fn metric_sum(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|line| line.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{')))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Several metrics' totals (see [`metric_total`]), in the order of `names`.
async fn metric_totals(endpoints: &Endpoints, names: &[&str]) -> Vec<Option<f64>> {
    let mut totals = Vec::with_capacity(names.len());
    for name in names {
        totals.push(metric_total(endpoints, name).await);
    }
    totals
}

/// How much a counter grew between two scrapes (0 when either is missing).
fn grew(before: Option<f64>, after: Option<f64>) -> u64 {
    match (before, after) {
        (Some(b), Some(a)) => (a - b).max(0.0).round() as u64,
        _ => 0,
    }
}

/// Prints a row for the summary tables of BENCHMARKS.md (`| measure |
/// target | measured | notes |`): the headline figure in bold with each
/// run's value after it.
fn print_summary(measure: &str, target: &str, headline: &str, per_run: &[String], notes: &str) {
    println!("\nSummary row for BENCHMARKS.md (| measure | target | measured | baseline / notes |):\n");
    println!("| {measure} | {target} | **{headline}** ({}) | {notes} |", per_run.join(", "));
}

/// `value / baseline`, when both are figures.
fn ratio(value: f64, baseline: f64) -> Option<f64> {
    (baseline > 0.0 && value.is_finite()).then(|| value / baseline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_summed_over_their_labels() {
        let text = "# HELP herald_events_dropped_total x\n# TYPE herald_events_dropped_total counter\n\
                    herald_events_dropped_total{group=\"a\"} 3\nherald_events_dropped_total{group=\"b\"} 4\n\
                    herald_events_dropped_total_other 100\nherald_ws_events_dropped_total 7\n";
        assert_eq!(metric_sum(text, "herald_events_dropped_total"), 7.0);
        assert_eq!(metric_sum(text, "herald_ws_events_dropped_total"), 7.0);
        assert_eq!(metric_sum(text, "herald_nothing_total"), 0.0);
        assert_eq!(grew(Some(5.0), Some(8.0)), 3);
        assert_eq!(grew(None, Some(8.0)), 0);
    }

    #[test]
    fn command_lines_quote_what_a_shell_would_split() {
        let args = ["user", "-n", "10000", "--via", "grpc-batch,http", "--jwt-secret", "a b's"].map(String::from);
        assert_eq!(
            command_line(args.into_iter()),
            "herald-bench user -n 10000 --via grpc-batch,http --jwt-secret 'a b'\\''s'"
        );
        assert_eq!(command_line([String::new()].into_iter()), "herald-bench ''");
    }

    #[test]
    fn rows_of_several_runs_keep_their_order_and_give_medians() {
        let mut rows = RowRuns::new();
        for (run, rate) in [(1, 10.0), (2, 30.0), (3, 20.0)] {
            let m = |r: f64| Measurement { delivery_rate: r, ..Measurement::default() };
            rows.add("b", run, &[Column::DeliveryRate], m(rate), None);
            rows.add("a", run, &[Column::DeliveryRate], m(rate * 2.0), None);
        }
        let rows = rows.summarize();
        assert_eq!(rows.iter().map(|r| r.label.as_str()).collect::<Vec<_>>(), ["b", "a"]);
        assert_eq!((rows[0].measurement.delivery_rate, rows[1].measurement.delivery_rate), (20.0, 40.0));
        assert_eq!(ratio(5.0, 4.0), Some(1.25));
        assert_eq!(ratio(5.0, 0.0), None);
    }
}
