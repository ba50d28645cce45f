//! The rpc scenario: client-to-backend calls at a fixed request rate. herald
//! runs standalone unless told otherwise; the bench serves the method
//! `bench.echo` itself (`ServeCalls`, `--backends` streams, each answering a
//! call with its data), then `--connections` client-protocol connections take
//! turns sending `rpc` commands at `--rate` all together for `--duration`:
//! request `k` goes out at `k / rate` on connection `k mod connections`,
//! whether or not earlier ones were answered (open loop, so a slow answer
//! cannot hide the requests behind it). Latency is from writing a request
//! to reading its reply; a reply must carry the request's text back (else
//! it is wrong), and a request not answered within `--drain` after sending
//! stops is an error, as is a refused one.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail};
use herald_proto::v1::{
    CallAnswer, Content, ServeCallsRequest, ServeCallsStart, call_answer, content, serve_calls_request,
};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::codegen::tokio_stream::wrappers::UnboundedReceiverStream;

use crate::cli::RpcArgs;
use crate::clients::{self, Client};
use crate::procfs::CpuMeter;
use crate::procs::Endpoints;
use crate::publishers;
use crate::rpc::Calls;
use crate::stats::{Column, Measurement};

use super::events::cpu_note;
use super::{
    Bench, RowRuns, check_alive, print_summary, print_table, standalone_unless_split, thousands, topology, watched,
};

const COLUMNS: [Column; 7] = [
    Column::Connections,
    Column::RequestRate,
    Column::Sent,
    Column::PublishErrors,
    Column::Wrong,
    Column::LatencyP90,
    Column::Cpu,
];

/// The method the bench serves.
const METHOD: &str = "bench.echo";

pub async fn run(args: &RpcArgs) -> anyhow::Result<()> {
    let common = standalone_unless_split(&args.common, args.split);
    if args.connections == 0 || args.backends == 0 || args.rate.iter().any(|r| !(*r > 0.0 && r.is_finite())) {
        bail!("--connections, --backends and --rate must be above 0");
    }
    let bench = Bench::new(&common)?;
    let mut rows = RowRuns::new();
    let mut headline = Vec::new();
    for &rate in &args.rate {
        eprintln!(
            "rpc {rate}/s: {} × {:?}, {} connections, {} backend stream(s), {} B requests",
            common.runs, common.duration, args.connections, args.backends, args.payload
        );
        let label = format!("{rate}/s, {}", topology(&common, args.connections));
        // The summary row is the last row's: its runs only.
        headline.clear();
        for run in 1..=common.runs {
            let (m, first_error) = run_once(&bench, args, rate).await?;
            headline.push(m.latency.map_or(f64::NAN, |l| l.p99));
            rows.add(&label, run, &COLUMNS, m, first_error);
        }
    }
    let title = format!(
        "rpc: `rpc` commands from {} client-protocol connections in turn (open loop) through the gateway to a \
         backend in the bench ({} ServeCalls stream(s) echoing {} B); latency from send to reply; {} s per run, \
         median of {} runs",
        args.connections,
        args.backends,
        args.payload,
        common.duration.as_secs_f64(),
        common.runs
    );
    let summary = rows.summarize();
    print_table(&title, "requests", &COLUMNS, &summary);
    if let (Some(row), Some(&rate)) = (summary.last(), args.rate.last()) {
        let m = &row.measurement;
        let l = m.latency.unwrap_or_default();
        print_summary(
            &format!(
                "client → backend rpc round trip, {} requests/s from {} connections, {} (`rpc`)",
                thousands(rate as u64),
                args.connections,
                topology(&common, args.connections)
            ),
            &format!("p99 ≤ 5 ms at {} requests/s", thousands(rate as u64)),
            &format!("p99 {:.2} ms", l.p99),
            &headline.iter().map(|p| format!("{p:.2}")).collect::<Vec<_>>(),
            &format!(
                "p50 {:.2}, p90 {:.2}, max {:.1} ms; {} answered/s; {} errors, {} wrong (worst run); {}",
                l.p50,
                l.p90,
                l.max,
                thousands(m.ops_rate.round() as u64),
                thousands(m.publish_errors),
                thousands(m.wrong),
                cpu_note(&m.cpu)
            ),
        );
    }
    Ok(())
}

async fn run_once(bench: &Bench<'_>, args: &RpcArgs, rate: f64) -> anyhow::Result<(Measurement, Option<String>)> {
    let common = bench.common;
    let mut herald = bench.herald(args.connections, false).await?;
    let endpoints = herald.endpoints.clone();
    let mut backends = Vec::with_capacity(args.backends);
    for i in 0..args.backends {
        backends.push(Backend::start(&endpoints, i).await?);
    }
    if endpoints.ws_urls.is_empty() {
        bail!("no WebSocket URL to connect clients to (give --ws-url)");
    }
    let mut callers = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let url = &endpoints.ws_urls[i % endpoints.ws_urls.len()];
        let caller = clients::connect_speaking(url, Ipv4Addr::LOCALHOST).await?;
        // A request never waits behind an unacknowledged one (Nagle), as herald's replies do not.
        caller.set_nodelay()?;
        callers.push(caller);
    }
    let meter = CpuMeter::start(&watched(&endpoints, None));
    // A moment for every caller to be scheduled before the first request is due.
    let began = Instant::now() + Duration::from_millis(50);
    let plan = Schedule {
        began,
        rate,
        callers: args.connections,
        end: began + common.duration,
        give_up: began + common.duration + args.drain,
        payload: args.payload,
    };
    let tasks: Vec<_> =
        callers.into_iter().enumerate().map(|(i, client)| tokio::spawn(call(client, i, plan.clone()))).collect();
    let mut total = Calls::default();
    let mut sent = 0;
    let mut last_answer = began;
    for task in tasks {
        let (calls, caller_sent, caller_last) = task.await.context("an rpc caller failed")?;
        total.merge(calls);
        sent += caller_sent;
        last_answer = last_answer.max(caller_last);
    }
    let cpu = meter.finish();
    let served: u64 = backends.iter().map(|b| b.served.load(Ordering::Relaxed)).sum();
    for backend in backends {
        backend.task.abort();
    }
    let span_s = last_answer.saturating_duration_since(began).as_secs_f64();
    eprintln!(
        "    {} sent, {} answered, {} served by the backend(s), {} errors, {} wrong",
        thousands(sent),
        thousands(total.answered),
        thousands(served),
        thousands(total.errors),
        thousands(total.wrong)
    );
    let m = Measurement {
        connections: args.connections as u64,
        ops_rate: if span_s > 0.0 { total.answered as f64 / span_s } else { 0.0 },
        sent,
        publish_errors: total.errors,
        wrong: total.wrong,
        latency: total.latency.percentiles(),
        cpu,
        ..Measurement::default()
    };
    check_alive(&mut herald);
    Ok((m, total.first_error))
}

/// When the requests go out.
#[derive(Clone)]
struct Schedule {
    began: Instant,
    rate: f64,
    callers: usize,
    /// No request is sent from then on…
    end: Instant,
    /// …and none is waited for from then on.
    give_up: Instant,
    payload: usize,
}

impl Schedule {
    /// When request `k` of the whole run is due.
    fn due(&self, k: u64) -> Instant {
        self.began + Duration::from_secs_f64(k as f64 / self.rate)
    }
}

/// The text of request `id` of caller `caller`: `<caller>:<id>:` padded to `size`.
fn request_text(caller: usize, id: u64, size: usize) -> String {
    let mut text = format!("{caller}:{id}:");
    let pad = size.saturating_sub(text.len());
    text.extend(std::iter::repeat_n('x', pad));
    text
}

/// One caller: sends its requests on schedule while reading the replies;
/// returns what they came to, how many it sent, and when the last answer came.
async fn call(client: Client, caller: usize, plan: Schedule) -> (Calls, u64, Instant) {
    let (mut reader, writer) = client.split();
    // Replies, each with when it was read, from a task of their own (so that
    // waiting for them can be given up without cutting a read short).
    let (replies, mut replied) = mpsc::unbounded_channel();
    let reading = tokio::spawn(async move {
        while let Some(text) = reader.next_text().await {
            if replies.send((text, Instant::now())).is_err() {
                break;
            }
        }
    });
    let waiting: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let woken = Arc::new(Notify::new());
    let sent = Arc::new(AtomicU64::new(0));
    let sender: JoinHandle<Option<String>> = tokio::spawn({
        let (waiting, done, woken, sent, plan) =
            (waiting.clone(), done.clone(), woken.clone(), sent.clone(), plan.clone());
        async move {
            let mut failure = None;
            let mut k = caller as u64;
            let mut id = 0;
            loop {
                let at = plan.due(k);
                if at >= plan.end {
                    break;
                }
                tokio::time::sleep_until(at).await;
                id += 1;
                let text = request_text(caller, id, plan.payload);
                let command =
                    serde_json::json!({ "id": id, "rpc": { "method": METHOD, "data": { "text": text } } }).to_string();
                waiting.lock().unwrap_or_else(PoisonError::into_inner).insert(id, Instant::now());
                if let Err(e) = writer.command(&command).await {
                    failure = Some(format!("sending an rpc: {e}"));
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
                k += plan.callers as u64;
            }
            done.store(true, Ordering::Release);
            woken.notify_one();
            failure
        }
    });
    let mut calls = Calls::default();
    let mut last_answer = plan.began;
    loop {
        if done.load(Ordering::Acquire) && waiting.lock().unwrap_or_else(PoisonError::into_inner).is_empty() {
            break;
        }
        let reply = tokio::select! {
            reply = replied.recv() => reply,
            () = woken.notified() => continue,
            () = tokio::time::sleep_until(plan.give_up) => break,
        };
        let Some((text, now)) = reply else {
            calls.first_error.get_or_insert_with(|| "the connection ended".into());
            break;
        };
        let reply: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let Some(id) = reply["id"].as_u64().filter(|&id| id > 0) else { continue };
        let Some(sent_at) = waiting.lock().unwrap_or_else(PoisonError::into_inner).remove(&id) else {
            calls.wrong += 1;
            continue;
        };
        last_answer = now;
        if !reply["error"].is_null() {
            calls.errors += 1;
            calls.first_error.get_or_insert_with(|| format!("rpc refused: {}", reply["error"]));
        } else if reply["rpc"]["data"]["text"].as_str() == Some(request_text(caller, id, plan.payload).as_str()) {
            calls.answered += 1;
            calls.latency.record(now.duration_since(sent_at).as_micros() as u64);
        } else {
            calls.wrong += 1;
            if calls.wrong == 1 {
                eprintln!("    a wrong rpc reply: {text}");
            }
        }
    }
    reading.abort();
    if let Ok(Some(failure)) = sender.await {
        calls.first_error.get_or_insert(failure);
    }
    let unanswered = waiting.lock().unwrap_or_else(PoisonError::into_inner).len() as u64;
    if unanswered > 0 {
        calls.errors += unanswered;
        calls.first_error.get_or_insert_with(|| format!("{unanswered} requests unanswered"));
    }
    (calls, sent.load(Ordering::Relaxed), last_answer)
}

/// A backend serving [`METHOD`] in the bench: answers every call with its data.
struct Backend {
    served: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Backend {
    /// Serves on broker `index` of `endpoints`; registered once this returns.
    async fn start(endpoints: &Endpoints, index: usize) -> anyhow::Result<Self> {
        let brokers = endpoints.grpc()?;
        let mut client = publishers::broker_client(brokers[index % brokers.len()]).await?;
        let authorization = publishers::authorization(endpoints)?;
        let (answers, outgoing) = mpsc::unbounded_channel();
        let start = ServeCallsStart { methods: vec![METHOD.to_owned()] };
        answers.send(ServeCallsRequest { kind: Some(serve_calls_request::Kind::Start(start)) })?;
        let request = publishers::authorized(UnboundedReceiverStream::new(outgoing), &authorization);
        let mut calls = client.serve_calls(request).await.context("ServeCalls")?.into_inner();
        let served = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let served = served.clone();
            async move {
                while let Ok(Some(call)) = calls.message().await {
                    served.fetch_add(1, Ordering::Relaxed);
                    let data = call
                        .call
                        .and_then(|c| c.data)
                        .unwrap_or(Content { body: Some(content::Body::Text(String::new())) });
                    let answer = CallAnswer { call_id: call.call_id, result: Some(call_answer::Result::Data(data)) };
                    if answers
                        .send(ServeCallsRequest { kind: Some(serve_calls_request::Kind::Answer(answer)) })
                        .is_err()
                    {
                        break;
                    }
                }
            }
        });
        Ok(Self { served, task })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_take_turns_on_the_callers_at_the_rate() {
        let began = Instant::now();
        let plan = Schedule {
            began,
            rate: 1000.0,
            callers: 100,
            end: began + Duration::from_secs(1),
            give_up: began + Duration::from_secs(2),
            payload: 16,
        };
        assert_eq!(plan.due(0), began);
        assert_eq!(plan.due(150).duration_since(began), Duration::from_millis(150));
        assert_eq!(request_text(3, 7, 16), "3:7:xxxxxxxxxxxx");
        assert_eq!(request_text(123, 456_789, 4), "123:456789:");
    }
}
