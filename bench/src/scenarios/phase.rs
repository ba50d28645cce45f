//! One publishing phase on clients that are already connected: scenarios
//! that compare two ways of reaching the same clients (a user against a
//! connection, a group against a broadcast) run them one after the other on
//! one herald and one set of clients, so that only the target differs.
//!
//! Clients count deliveries since they connected; a phase reads every load
//! generator's report before and after, and keeps the difference.

use std::time::Duration;

use crate::cli::Rate;
use crate::fleet::Fleet;
use crate::loadgen::Report;
use crate::message;
use crate::procfs::CpuMeter;
use crate::procs::Endpoints;
use crate::publishers::{self, Source, Tally, Via, Window};
use crate::stats::{Column, Latency, Measurement};

use super::watched;

/// How a phase publishes.
pub(super) struct Phase {
    pub via: Via,
    pub rate: Rate,
    /// Concurrent requests, flat out (HTTP: keep-alive connections).
    pub lanes: usize,
    /// HTTP/2 connections the gRPC lanes share.
    pub channels: usize,
    /// Messages per `PublishBatch`.
    pub batch: usize,
    pub duration: Duration,
    pub drain: Duration,
    /// Flat out: most messages published and not yet delivered.
    pub window: u64,
    /// Clients each message reaches.
    pub fan: u64,
    /// Whether each message goes to every client (for the window's count).
    pub to_everyone: bool,
}

/// Publishes from `source` as `phase` says to the `clients` of `fleet`, waits
/// for the deliveries, and measures what happened in between.
pub(super) async fn run(
    fleet: &mut Fleet,
    endpoints: &Endpoints,
    clients: u64,
    phase: &Phase,
    mut source: Box<dyn Source>,
) -> anyhow::Result<(Measurement, Option<String>)> {
    let before = fleet.reports(Duration::from_secs(30)).await?;
    let delivered_before = fleet.progress.delivered();
    let lanes = if phase.rate == Rate::Max { phase.lanes } else { 1 };
    let mut lanes = publishers::lanes(phase.via, endpoints, lanes, phase.channels).await?;
    let meter = CpuMeter::start(&watched(endpoints, Some(fleet)));
    let start_ns = message::now_ns();
    let tally = match phase.rate {
        Rate::Max => {
            let window = Window {
                progress: fleet.progress.clone(),
                base: delivered_before,
                limit: phase.window.max(1),
                broadcast_to: phase.to_everyone.then_some(clients),
            };
            publishers::flat_out(lanes, phase.via, phase.batch, phase.duration, source, Some(window)).await
        }
        Rate::PerSecond(rate) => {
            publishers::paced(&mut lanes[0], phase.via, rate, phase.batch, phase.duration, source.as_mut()).await
        }
    };
    let expected = tally.accepted * phase.fan;
    fleet.progress.wait_delivered(delivered_before + expected, phase.drain).await;
    let cpu = meter.finish();
    let after = fleet.reports(Duration::from_secs(30)).await?;
    let between = differences(&after, &before);
    let span_s = fleet.progress.last_delivery_ns().saturating_sub(start_ns) as f64 / 1e9;
    let m = Measurement { cpu, ..measured(&between, clients, expected, span_s, &tally) };
    Ok((m, tally.first_error))
}

/// What the clients' `reports` say of a phase that published `tally` and
/// expected `expected` deliveries over `span_s` seconds.
pub(super) fn measured(reports: &[Report], clients: u64, expected: u64, span_s: f64, tally: &Tally) -> Measurement {
    let mut m = Measurement { connections: clients, ..Measurement::default() };
    let mut delivered = 0;
    let mut latency = Latency::new();
    for report in reports {
        delivered += report.delivered;
        m.duplicated += report.duplicated;
        m.misdelivered += report.misdelivered;
        m.reordered += report.reordered;
        m.closed += report.closed;
        latency.merge(&report.latency());
    }
    m.publish_rate = tally.rate();
    m.delivery_rate = if span_s > 0.0 { delivered as f64 / span_s } else { 0.0 };
    m.publish_errors = tally.errors;
    m.lost = expected.saturating_sub(delivered);
    m.latency = latency.percentiles();
    m
}

/// The columns of a scenario that compares two kinds of target on the
/// same clients, with the ratio between them.
pub(super) const COMPARED_COLUMNS: [Column; 12] = [
    Column::Connections,
    Column::PublishRate,
    Column::DeliveryRate,
    Column::Ratio,
    Column::PublishErrors,
    Column::Lost,
    Column::Duplicated,
    Column::Misdelivered,
    Column::Reordered,
    Column::Closed,
    Column::Latency,
    Column::Cpu,
];

/// Each process's report since its earlier one (the processes answer in the same order).
fn differences(after: &[Report], before: &[Report]) -> Vec<Report> {
    after.iter().zip(before).map(|(a, b)| a.since(b)).collect()
}

/// The default flat-out window, in messages, for messages that each reach
/// `fan` clients: 1,000,000 deliveries' worth, as in the fanout and targeted
/// scenarios, and at least 4 messages.
pub(super) fn default_window(fan: u64) -> u64 {
    (super::delivery::WINDOW_DELIVERIES / fan.max(1)).max(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_hold_a_million_deliveries() {
        assert_eq!(default_window(1), 1_000_000);
        assert_eq!(default_window(10_000), 100);
        assert_eq!(default_window(1_000_000_000), 4);
    }

    #[test]
    fn phases_keep_what_each_process_saw_in_between() {
        let before = [Report { delivered: 10, ..Report::default() }, Report { delivered: 5, ..Report::default() }];
        let after = [Report { delivered: 15, ..Report::default() }, Report { delivered: 9, ..Report::default() }];
        let between = differences(&after, &before);
        assert_eq!(between.iter().map(|r| r.delivered).collect::<Vec<_>>(), [5, 4]);
    }
}
