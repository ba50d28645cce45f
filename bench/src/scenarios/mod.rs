//! The scenarios, and what they share: a herald per run, clients spread over
//! load-generator processes, memory and CPU figures, and printing results
//! (one line per run on standard error, the median table on standard output).

mod delivery;
mod floor;
mod idle;
mod publish;

use std::time::Duration;

use anyhow::bail;

use crate::cli::{Common, Scenario};
use crate::endpoints::{self, SourceAddrs, WsUrl};
use crate::fleet::{self, Connected, Fleet, Spread};
use crate::nats;
use crate::procfs::{self, Watched};
use crate::procs::{Endpoints, External, Herald, Topology};
use crate::stats::{Column, Measurement, Row, inline, table, thousands};

/// Gateways started per this many connections when `--gateways` is not given.
const CONNECTIONS_PER_GATEWAY: usize = 15_000;

pub async fn run(scenario: Scenario) -> anyhow::Result<()> {
    match scenario {
        Scenario::Fanout(args) => delivery::run(&args, delivery::Targeting::Broadcast).await,
        Scenario::Targeted(args) => delivery::run(&args, delivery::Targeting::Single).await,
        Scenario::Idle(args) => idle::run(&args).await,
        Scenario::Publish(args) => publish::run(&args).await,
        Scenario::Floor(args) => floor::run(&args).await,
        Scenario::Loadgen => bail!("loadgen is not a scenario"),
    }
}

/// How many gateways `connections` get when `--gateways` is not given: one
/// per 15,000 connections, and at least one per broker.
fn default_gateways(common: &Common, connections: usize) -> usize {
    let brokers = usize::from(common.brokers);
    common.gateways.unwrap_or_else(|| connections.div_ceil(CONNECTIONS_PER_GATEWAY).max(brokers)).max(1)
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
}

impl<'a> Bench<'a> {
    fn new(common: &'a Common) -> anyhow::Result<Self> {
        if common.runs == 0 {
            bail!("--runs must be at least 1");
        }
        Ok(Self { common, sources: SourceAddrs::new() })
    }

    /// A herald for one run: freshly started, or the running one given on the command line.
    async fn herald(&self, connections: usize, http: bool) -> anyhow::Result<Herald> {
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
        Herald::start(&common.herald_binary()?, &topology, common.api_key.as_deref()).await
    }

    /// Starts load generators and connects `connections` clients to `endpoints`.
    async fn clients(&mut self, endpoints: &Endpoints, connections: usize) -> anyhow::Result<(Fleet, Connected)> {
        if endpoints.ws_urls.is_empty() {
            bail!("no WebSocket URL to connect clients to (give --ws-url)");
        }
        let spread = Spread {
            per_process: self.common.per_process,
            per_source: self.common.per_source,
            connect_concurrency: self.common.connect_concurrency,
            connect_timeout: Duration::from_secs(30),
        };
        let plans = fleet::plans(connections, &endpoints.ws_urls, &spread, &mut self.sources);
        let processes = plans.len();
        let began = std::time::Instant::now();
        let mut fleet = Fleet::start(plans)?;
        let connected = fleet.connected(Duration::from_secs(600)).await?;
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

/// Prints the medians of each configuration as a markdown table under `title`.
fn print_table(title: &str, label: &str, columns: &[Column], rows: &[Row]) {
    println!("\n### {title}\n");
    println!("{}", table(label, columns, rows));
}
