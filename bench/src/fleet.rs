//! The harness's side of the load generators: splits the clients over
//! processes and source addresses, starts one `loadgen` process per share
//! (this same binary), follows their progress and collects their reports.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::sync::{Notify, mpsc};

use crate::endpoints::{SourceAddrs, WsUrl};
use crate::identity::ClientIdentity;
use crate::loadgen::{Event, Finished, Plan, Report, Task};
use crate::message;
use crate::stats::thousands;

/// How often the harness says how far a long connect has got.
const CONNECTING_SAID_EVERY: Duration = Duration::from_secs(10);

/// How clients are spread over processes and source addresses.
#[derive(Debug, Clone)]
pub struct Spread {
    /// Most clients in one load-generator process (each process may hold
    /// 20,000 open files).
    pub per_process: usize,
    /// Most clients from one source address (about 28k ephemeral ports).
    pub per_source: usize,
    pub connect_concurrency: usize,
    pub connect_timeout: Duration,
}

/// One plan per process for `connections` clients of `urls`; client `i`
/// logs in as `identities[i]` (all anonymous when `identities` is empty).
pub fn plans(
    connections: usize,
    urls: &[WsUrl],
    spread: &Spread,
    sources: &mut SourceAddrs,
    identities: &[ClientIdentity],
    subscribe: &[String],
) -> Vec<Plan> {
    let processes = connections.div_ceil(spread.per_process.max(1)).max(1);
    let mut first = 0;
    (0..processes)
        .map(|p| {
            let share = connections / processes + usize::from(p < connections % processes);
            let mine = identities.get(first..(first + share).min(identities.len())).unwrap_or_default().to_vec();
            first += share;
            Plan {
                ws_urls: urls.iter().map(ToString::to_string).collect(),
                sources: sources.take(share.div_ceil(spread.per_source.max(1)).max(1)),
                connections: share,
                connect_concurrency: spread.connect_concurrency,
                connect_timeout_ms: spread.connect_timeout.as_millis() as u64,
                progress_ms: 2,
                identities: mine,
                subscribe: subscribe.to_vec(),
                task: Task::Receive,
            }
        })
        .collect()
}

/// Delivery totals across processes, updated as progress lines arrive.
pub struct Progress {
    delivered: Vec<AtomicU64>,
    closed: Vec<AtomicU64>,
    /// While connecting: clients connected, and failed, per process.
    connecting: Vec<(AtomicU64, AtomicU64)>,
    /// `CLOCK_MONOTONIC` ns of the last change in the delivered total.
    last_delivery_ns: AtomicU64,
    changed: Notify,
}

impl Progress {
    pub fn delivered(&self) -> u64 {
        self.delivered.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    pub fn closed(&self) -> u64 {
        self.closed.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Clients connected and failed so far, while the processes connect.
    pub fn connecting(&self) -> (u64, u64) {
        self.connecting.iter().fold((0, 0), |(connected, failed), (c, f)| {
            (connected + c.load(Ordering::Relaxed), failed + f.load(Ordering::Relaxed))
        })
    }

    pub fn last_delivery_ns(&self) -> u64 {
        self.last_delivery_ns.load(Ordering::Relaxed)
    }

    /// Waits for the next change (or `at_most`, whichever comes first).
    pub async fn changed(&self, at_most: Duration) {
        let _ = tokio::time::timeout(at_most, self.changed.notified()).await;
    }

    /// Waits until `target` deliveries are counted or `within` has passed;
    /// tells whether the target was reached.
    pub async fn wait_delivered(&self, target: u64, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while self.delivered() < target {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            self.changed(Duration::from_millis(20)).await;
        }
        true
    }

    /// Waits until `target` deliveries are counted, or until none has been
    /// for `stall` (counted from the call at first); tells whether the
    /// target was reached. A broadcast to a million clients takes seconds:
    /// a fixed wait would have to be long for it, and long for nothing when
    /// a client is really gone.
    pub async fn wait_delivered_unless_stalled(&self, target: u64, stall: Duration) -> bool {
        let called_ns = message::now_ns();
        while self.delivered() < target {
            let quiet_since = self.last_delivery_ns().max(called_ns);
            if message::now_ns().saturating_sub(quiet_since) >= stall.as_nanos() as u64 {
                return false;
            }
            self.changed(Duration::from_millis(20)).await;
        }
        true
    }
}

struct Worker {
    /// Clients this process was given.
    connections: usize,
    child: Child,
    stdin: ChildStdin,
    events: mpsc::UnboundedReceiver<Event>,
}

/// The running load-generator processes.
pub struct Fleet {
    workers: Vec<Worker>,
    pub progress: Arc<Progress>,
}

/// What the clients of the fleet are, once connected.
pub struct Connected {
    /// Addresses of the connected clients, in no particular order.
    pub addresses: Vec<String>,
    /// For clients that logged in, their user ids, in the order of `addresses`.
    pub users: Vec<String>,
    pub failed: usize,
    pub first_error: Option<String>,
}

impl Fleet {
    /// Starts one load-generator process per plan.
    pub fn start(plans: Vec<Plan>) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating herald-bench")?;
        let progress = Arc::new(Progress {
            delivered: plans.iter().map(|_| AtomicU64::new(0)).collect(),
            closed: plans.iter().map(|_| AtomicU64::new(0)).collect(),
            connecting: plans.iter().map(|_| (AtomicU64::new(0), AtomicU64::new(0))).collect(),
            last_delivery_ns: AtomicU64::new(message::now_ns()),
            changed: Notify::new(),
        });
        let mut fleet = Fleet { workers: Vec::new(), progress };
        for (index, plan) in plans.iter().enumerate() {
            let mut child = Command::new(&exe)
                .arg("loadgen")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting a load generator")?;
            let mut stdin = child.stdin.take().context("load generator stdin")?;
            let stdout = child.stdout.take().context("load generator stdout")?;
            writeln!(stdin, "{}", serde_json::to_string(plan)?)?;
            let (tx, events) = mpsc::unbounded_channel();
            let progress = fleet.progress.clone();
            std::thread::spawn(move || follow(BufReader::new(stdout), index, &progress, &tx));
            fleet.workers.push(Worker { connections: plan.connections, child, stdin, events });
        }
        Ok(fleet)
    }

    pub fn pids(&self) -> Vec<u32> {
        self.workers.iter().map(|w| w.child.id()).collect()
    }

    /// Waits for every process to finish connecting, however long that
    /// takes (a million clients take minutes) as long as they get somewhere:
    /// fails once no client of any process has connected or failed for
    /// `stall`. Says how far they got every [`CONNECTING_SAID_EVERY`].
    pub async fn connected(&mut self, stall: Duration) -> anyhow::Result<Connected> {
        let mut all = Connected { addresses: Vec::new(), users: Vec::new(), failed: 0, first_error: None };
        let total: usize = self.workers.iter().map(|w| w.connections).sum();
        let began = tokio::time::Instant::now();
        let mut said = began;
        let mut last = (self.progress.connecting(), began);
        for worker in &mut self.workers {
            let event = loop {
                match tokio::time::timeout(Duration::from_millis(500), worker.events.recv()).await {
                    Ok(Some(event)) => break event,
                    Ok(None) => bail!("load generator {} exited (see its error above)", worker.child.id()),
                    Err(_) => {}
                }
                let now = tokio::time::Instant::now();
                let counts = self.progress.connecting();
                if counts != last.0 {
                    last = (counts, now);
                } else if now.duration_since(last.1) >= stall {
                    bail!("the load generators connected no client for {stall:?} ({} of {total} so far)", counts.0);
                }
                if now.duration_since(said) >= CONNECTING_SAID_EVERY {
                    said = now;
                    let (connected, failed) = counts;
                    let failed = if failed > 0 { format!(", {} failed", thousands(failed)) } else { String::new() };
                    eprintln!(
                        "  connecting: {} of {} after {:.0}s{failed}",
                        thousands(connected),
                        thousands(total as u64),
                        now.duration_since(began).as_secs_f64()
                    );
                }
            };
            match event {
                Event::Connected { addresses, users, failed, first_error } => {
                    all.addresses.extend(addresses);
                    all.users.extend(users);
                    all.failed += failed;
                    if all.first_error.is_none() {
                        all.first_error = first_error;
                    }
                }
                other => bail!("a load generator answered {other:?} before connecting"),
            }
        }
        Ok(all)
    }

    /// Starts every process's task (sending, or opening and closing connections).
    pub fn go(&mut self) -> anyhow::Result<()> {
        for worker in &mut self.workers {
            writeln!(worker.stdin, "go").context("starting a load generator's task")?;
        }
        Ok(())
    }

    /// As [`Fleet::finished`], meanwhile telling the processes every few
    /// milliseconds how many frames they may have sent in all: `window()`
    /// (when it is `Some`), shared in proportion to their clients.
    pub async fn finished_within_window(
        &mut self,
        within: Duration,
        mut window: impl FnMut() -> Option<u64>,
    ) -> anyhow::Result<Vec<Finished>> {
        let deadline = tokio::time::Instant::now() + within;
        let total: usize = self.workers.iter().map(|w| w.connections).sum::<usize>().max(1);
        let mut done: Vec<Option<Finished>> = self.workers.iter().map(|_| None).collect();
        loop {
            if let Some(allowed) = window() {
                for (worker, done) in self.workers.iter_mut().zip(&done) {
                    if done.is_none() {
                        let share = (allowed as f64 * worker.connections as f64 / total as f64) as u64;
                        writeln!(worker.stdin, "allow {share}").context("telling a load generator its window")?;
                    }
                }
            }
            for (worker, done) in self.workers.iter_mut().zip(done.iter_mut()) {
                while let Ok(event) = worker.events.try_recv() {
                    match event {
                        Event::Finished(finished) => *done = Some(finished),
                        other => bail!("a load generator answered {other:?} instead of finishing"),
                    }
                }
            }
            if done.iter().all(Option::is_some) {
                return Ok(done.into_iter().flatten().collect());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("the load generators did not finish within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Waits for every process to finish the task `go` started.
    pub async fn finished(&mut self, within: Duration) -> anyhow::Result<Vec<Finished>> {
        let deadline = tokio::time::Instant::now() + within;
        let mut all = Vec::new();
        for worker in &mut self.workers {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match next_event(worker, left).await? {
                Event::Finished(finished) => all.push(finished),
                other => bail!("a load generator answered {other:?} instead of finishing"),
            }
        }
        Ok(all)
    }

    /// Asks every process for its final figures.
    pub async fn reports(&mut self, within: Duration) -> anyhow::Result<Vec<Report>> {
        for worker in &mut self.workers {
            writeln!(worker.stdin, "report").context("asking a load generator for its report")?;
        }
        let mut reports = Vec::new();
        for worker in &mut self.workers {
            match next_event(worker, within).await? {
                Event::Report(report) => reports.push(report),
                other => bail!("a load generator answered {other:?} instead of a report"),
            }
        }
        Ok(reports)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for worker in &mut self.workers {
            let _ = worker.child.kill();
        }
        for worker in &mut self.workers {
            let _ = worker.child.wait();
        }
    }
}

async fn next_event(worker: &mut Worker, within: Duration) -> anyhow::Result<Event> {
    match tokio::time::timeout(within, worker.events.recv()).await {
        Ok(Some(event)) => Ok(event),
        Ok(None) => bail!("load generator {} exited (see its error above)", worker.child.id()),
        Err(_) => bail!("load generator {} did not answer within {within:?}", worker.child.id()),
    }
}

/// Reads one process's events: progress updates the totals, the rest is queued.
fn follow(stdout: impl BufRead, index: usize, progress: &Progress, events: &mpsc::UnboundedSender<Event>) {
    for line in stdout.lines().map_while(Result::ok) {
        match serde_json::from_str::<Event>(&line) {
            Ok(Event::Connecting { connected, failed }) => {
                progress.connecting[index].0.store(connected, Ordering::Relaxed);
                progress.connecting[index].1.store(failed, Ordering::Relaxed);
            }
            Ok(Event::Progress { delivered, closed }) => {
                if progress.delivered[index].swap(delivered, Ordering::Relaxed) != delivered {
                    progress.last_delivery_ns.store(message::now_ns(), Ordering::Relaxed);
                }
                progress.closed[index].store(closed, Ordering::Relaxed);
                progress.changed.notify_waiters();
            }
            Ok(event) => {
                if events.send(event).is_err() {
                    return;
                }
            }
            Err(e) => eprintln!("herald-bench: unreadable load generator line ({e}): {line}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn clients_are_spread_evenly_over_processes_and_sources() {
        let spread = Spread {
            per_process: 15_000,
            per_source: 10_000,
            connect_concurrency: 100,
            connect_timeout: Duration::from_secs(1),
        };
        let urls = [WsUrl::parse("ws://127.0.0.1:1").unwrap()];
        let mut sources = SourceAddrs::new();
        let plans = plans(40_001, &urls, &spread, &mut sources, &[], &[]);
        assert_eq!(plans.iter().map(|p| p.connections).collect::<Vec<_>>(), [13_334, 13_334, 13_333]);
        assert!(plans.iter().all(|p| p.identities.is_empty()));
        assert!(plans.iter().all(|p| p.sources.len() == 2));
        let mut all: Vec<Ipv4Addr> = plans.iter().flat_map(|p| p.sources.clone()).collect();
        all.dedup();
        assert_eq!(all.len(), 6, "every process has sources of its own");
        assert_eq!(self::plans(10, &urls, &spread, &mut sources, &[], &[]).len(), 1);
    }

    #[tokio::test]
    async fn a_wait_for_deliveries_lasts_while_they_come() {
        let progress = Arc::new(Progress {
            delivered: vec![AtomicU64::new(0)],
            closed: vec![AtomicU64::new(0)],
            connecting: vec![(AtomicU64::new(3), AtomicU64::new(1))],
            last_delivery_ns: AtomicU64::new(0),
            changed: Notify::new(),
        });
        assert_eq!(progress.connecting(), (3, 1));
        let began = tokio::time::Instant::now();
        assert!(!progress.wait_delivered_unless_stalled(10, Duration::from_millis(50)).await);
        assert!(began.elapsed() >= Duration::from_millis(50), "the stall counts from the call");
        // Deliveries every 30 ms: a 50 ms stall never comes, though the whole wait takes longer.
        let feeding = tokio::spawn({
            let progress = progress.clone();
            async move {
                for n in 1..=5 {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    progress.delivered[0].store(n * 2, Ordering::Relaxed);
                    progress.last_delivery_ns.store(message::now_ns(), Ordering::Relaxed);
                    progress.changed.notify_waiters();
                }
            }
        });
        assert!(progress.wait_delivered_unless_stalled(10, Duration::from_millis(50)).await);
        feeding.await.unwrap();
    }

    #[test]
    fn each_process_gets_the_identities_of_its_own_clients() {
        let spread =
            Spread { per_process: 4, per_source: 10, connect_concurrency: 1, connect_timeout: Duration::from_secs(1) };
        let urls = [WsUrl::parse("ws://127.0.0.1:1").unwrap()];
        let identities = crate::identity::clients(10, crate::identity::DEFAULT_SECRET, |_| Vec::new()).unwrap();
        let plans = plans(10, &urls, &spread, &mut SourceAddrs::new(), &identities, &[]);
        let users: Vec<Vec<&str>> =
            plans.iter().map(|p| p.identities.iter().map(|id| id.user.as_str()).collect()).collect();
        assert_eq!(users, [vec!["u0", "u1", "u2", "u3"], vec!["u4", "u5", "u6"], vec!["u7", "u8", "u9"]]);
        assert!(plans.iter().all(|p| p.identities.len() == p.connections));
    }
}
