//! A load-generator process (the hidden `loadgen` subcommand): opens its share
//! of the WebSocket clients and reports on them to the harness that started it.
//!
//! The protocol is JSON lines. The harness writes one [`Plan`] on standard
//! input; the process connects every client, prints [`Event::Connected`], then
//! an [`Event::Progress`] whenever its delivery count changes, and an
//! [`Event::Report`] for each `report` line it reads. It exits when its
//! standard input closes.

use std::io::BufRead;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::clients::{self, Client, Stats};
use crate::endpoints::WsUrl;
use crate::identity::ClientIdentity;
use crate::stats::Latency;

/// What one load-generator process does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// Client `i` connects to `ws_urls[i % len]`…
    pub ws_urls: Vec<String>,
    /// …from `sources[i % len]`.
    pub sources: Vec<Ipv4Addr>,
    pub connections: usize,
    /// Handshakes in progress at once.
    pub connect_concurrency: usize,
    pub connect_timeout_ms: u64,
    /// How often the delivery count is reported while it changes.
    pub progress_ms: u64,
    /// Client `i` logs in as `identities[i]` (a JWT in its handshake); none:
    /// every client is anonymous.
    #[serde(default)]
    pub identities: Vec<ClientIdentity>,
    /// Client channels every client subscribes to, speaking the client
    /// protocol (`herald.json.v1`); none: classic raw clients.
    #[serde(default)]
    pub subscribe: Vec<String>,
}

/// What a load-generator process tells the harness.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Every client has connected or failed to; `addresses` lists the
    /// connected ones (`<worker_id>/<connection_id>`) and, when they logged
    /// in, `users` their user ids in the same order.
    Connected {
        addresses: Vec<String>,
        #[serde(default)]
        users: Vec<String>,
        failed: usize,
        first_error: Option<String>,
    },
    /// Totals so far.
    Progress { delivered: u64, closed: u64 },
    /// Final figures, on request.
    Report(Report),
}

/// One process's delivery statistics.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub delivered: u64,
    pub duplicated: u64,
    pub misdelivered: u64,
    pub reordered: u64,
    pub closed: u64,
    /// Publish→delivery latency histogram as `(µs, count)` pairs.
    pub latency_us: Vec<(u64, u64)>,
}

impl Report {
    pub fn latency(&self) -> Latency {
        Latency::from_pairs(&self.latency_us)
    }

    /// What happened between `earlier` (a report of the same process) and
    /// this one: reports are totals since the process started.
    pub fn since(&self, earlier: &Report) -> Report {
        Report {
            delivered: self.delivered.saturating_sub(earlier.delivered),
            duplicated: self.duplicated.saturating_sub(earlier.duplicated),
            misdelivered: self.misdelivered.saturating_sub(earlier.misdelivered),
            reordered: self.reordered.saturating_sub(earlier.reordered),
            closed: self.closed.saturating_sub(earlier.closed),
            latency_us: self.latency().since(&earlier.latency()).to_pairs(),
        }
    }
}

fn emit(event: &Event) {
    // Standard output is line-buffered and read by the harness: one line per event.
    match serde_json::to_string(event) {
        Ok(line) => println!("{line}"),
        Err(e) => eprintln!("herald-bench loadgen: cannot encode an event: {e}"),
    }
}

/// Runs a load-generator process until its standard input closes.
pub fn main() -> anyhow::Result<()> {
    let mut stdin = std::io::stdin().lock();
    let mut line = String::new();
    stdin.read_line(&mut line).context("reading the plan")?;
    let plan: Plan = serde_json::from_str(&line).context("parsing the plan")?;
    let urls = plan.ws_urls.iter().map(|u| WsUrl::parse(u)).collect::<anyhow::Result<Vec<_>>>()?;
    if urls.is_empty() || plan.sources.is_empty() {
        bail!("the plan names no WebSocket URL or no source address");
    }
    let runtime = crate::runtime()?;
    let stats = Arc::new(Stats::new());
    runtime.block_on(connect_all(&plan, &urls, &stats));
    for line in stdin.lines() {
        match line?.trim() {
            "report" => emit(&Event::Report(report(&stats))),
            other => bail!("unknown command {other:?}"),
        }
    }
    // Exit without tearing down thousands of client tasks one by one.
    std::process::exit(0);
}

/// Connects every client, announces them, and leaves them receiving in the
/// background along with a progress reporter.
async fn connect_all(plan: &Plan, urls: &[WsUrl], stats: &Arc<Stats>) {
    let permits = Arc::new(Semaphore::new(plan.connect_concurrency.max(1)));
    let timeout = Duration::from_millis(plan.connect_timeout_ms);
    let attempts: Vec<_> = (0..plan.connections)
        .map(|i| {
            let url = urls[i % urls.len()].clone();
            let source = plan.sources[i % plan.sources.len()];
            let identity = plan.identities.get(i).cloned();
            let permits = permits.clone();
            let subscribe = plan.subscribe.clone();
            tokio::spawn(async move {
                let _permit = permits.acquire_owned().await?;
                let token = identity.as_ref().map(|id| id.token.as_str());
                let mut client = tokio::time::timeout(timeout, clients::connect(&url, source, token, &subscribe))
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("connect to {url} timed out")))?;
                if let Some(identity) = identity {
                    client.also_accept(identity.user, identity.groups);
                }
                Ok::<_, anyhow::Error>(client)
            })
        })
        .collect();
    let mut addresses = Vec::with_capacity(plan.connections);
    let mut users = Vec::new();
    let mut failed = 0;
    let mut first_error = None;
    for (i, attempt) in attempts.into_iter().enumerate() {
        match attempt.await.map_err(anyhow::Error::from).and_then(|r| r) {
            Ok(client) => {
                addresses.push(client.address.clone());
                if let Some(identity) = plan.identities.get(i) {
                    users.push(identity.user.clone());
                }
                spawn_receiver(client, stats.clone(), i);
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    emit(&Event::Connected { addresses, users, failed, first_error });
    tokio::spawn(report_progress(stats.clone(), Duration::from_millis(plan.progress_ms.max(1))));
}

fn spawn_receiver(client: Client, stats: Arc<Stats>, index: usize) {
    tokio::spawn(async move { client.receive(&stats, index).await });
}

async fn report_progress(stats: Arc<Stats>, every: Duration) {
    let mut last = (u64::MAX, u64::MAX);
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let totals = (stats.delivered(), stats.closed());
        if totals != last {
            last = totals;
            emit(&Event::Progress { delivered: totals.0, closed: totals.1 });
        }
    }
}

fn report(stats: &Stats) -> Report {
    let totals = stats.totals();
    Report {
        delivered: totals.delivered,
        duplicated: totals.duplicated,
        misdelivered: totals.misdelivered,
        reordered: totals.reordered,
        closed: totals.closed,
        latency_us: totals.latency.to_pairs(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_one_json_object_tagged_by_kind() {
        let line = serde_json::to_string(&Event::Progress { delivered: 3, closed: 0 }).unwrap();
        assert_eq!(line, r#"{"event":"progress","delivered":3,"closed":0}"#);
        let report = Event::Report(Report { delivered: 1, latency_us: vec![(5, 1)], ..Report::default() });
        let back: Event = serde_json::from_str(&serde_json::to_string(&report).unwrap()).unwrap();
        assert!(matches!(back, Event::Report(r) if r.latency().count() == 1));
        let old = r#"{"event":"connected","addresses":["gw0/1"],"failed":0,"first_error":null}"#;
        assert!(matches!(serde_json::from_str(old).unwrap(), Event::Connected { users, .. } if users.is_empty()));
    }

    #[test]
    fn a_report_since_an_earlier_one_holds_only_what_came_between() {
        let mut latency = Latency::new();
        latency.record(100);
        let earlier = Report { delivered: 5, reordered: 1, latency_us: latency.to_pairs(), ..Report::default() };
        latency.record(100);
        latency.record(9000);
        let later =
            Report { delivered: 8, reordered: 1, closed: 2, latency_us: latency.to_pairs(), ..Report::default() };
        let between = later.since(&earlier);
        assert_eq!((between.delivered, between.reordered, between.closed), (3, 0, 2));
        let latency = between.latency();
        assert_eq!(latency.count(), 2);
        assert!((latency.percentiles().unwrap().max - 9.0).abs() < 0.01);
    }
}
