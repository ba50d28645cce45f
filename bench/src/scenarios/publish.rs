//! The publish scenario: how fast herald accepts publishes with no clients
//! connected (a gateway is linked, so each broadcast still travels broker →
//! gateway): HTTP classic keep-alive from herald-bench's client and from
//! `wrk`, gRPC unary `Publish`, and gRPC `PublishBatch`. Latency here is the
//! request's round trip, not a delivery.

use crate::cli::{PublishArgs, PublishPath};
use crate::procfs::CpuMeter;
use crate::publishers::{self, Broadcasts, Via, WrkRun};
use crate::stats::{Column, Measurement, Row};

use super::{Bench, check_alive, measure_runs, print_table, watched};

const COLUMNS: [Column; 4] = [Column::PublishRate, Column::PublishErrors, Column::Latency, Column::Cpu];

pub async fn run(args: &PublishArgs) -> anyhow::Result<()> {
    let bench = Bench::new(&args.common)?;
    let mut rows = Vec::new();
    for &path in &args.paths {
        if args.keyed && matches!(path, PublishPath::Http | PublishPath::Wrk) {
            eprintln!("--keyed applies to the gRPC paths: skipping {path:?}");
            continue;
        }
        if path == PublishPath::Wrk && !wrk_installed() {
            eprintln!("wrk is not installed (apt-get install wrk): skipping its row");
            continue;
        }
        let label = describe(path, args);
        eprintln!("{label}: {} × {:?}", args.common.runs, args.common.duration);
        let measurement =
            measure_runs(&label, args.common.runs, &COLUMNS, async || run_once(&bench, args, path).await).await?;
        rows.push(Row { label, measurement });
    }
    let title = format!(
        "publish: broadcasts of {} B{}, no clients; {} s per run, median of {} runs (latency: request round trip)",
        args.payload,
        if args.keyed { ", each with its own idempotency key (gRPC paths)" } else { "" },
        args.common.duration.as_secs_f64(),
        args.common.runs
    );
    print_table(&title, "path", &COLUMNS, &rows);
    Ok(())
}

fn describe(path: PublishPath, args: &PublishArgs) -> String {
    match path {
        PublishPath::Http => format!("HTTP GET /?content= (bench client, {} conns)", args.http_connections),
        PublishPath::Wrk => {
            format!("HTTP GET /?content= (wrk, {} conns, {} threads)", args.http_connections, args.wrk_threads)
        }
        PublishPath::Grpc => {
            format!("gRPC Publish ({} in flight, {} channels)", args.grpc_concurrency, args.grpc_channels)
        }
        PublishPath::GrpcBatch => format!(
            "gRPC PublishBatch ×{} ({} in flight, {} channels)",
            args.batch, args.batch_concurrency, args.grpc_channels
        ),
    }
}

/// A number no other run of this process has had.
fn unique_run() -> u64 {
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn wrk_installed() -> bool {
    std::process::Command::new("wrk").arg("--version").output().is_ok()
}

async fn run_once(
    bench: &Bench<'_>,
    args: &PublishArgs,
    path: PublishPath,
) -> anyhow::Result<(Measurement, Option<String>)> {
    let http = matches!(path, PublishPath::Http | PublishPath::Wrk);
    let mut herald = bench.herald(1, http).await?;
    let endpoints = &herald.endpoints;
    let duration = args.common.duration;
    let (via, lanes, per_request) = match path {
        PublishPath::Wrk => {
            let meter = CpuMeter::start(&endpoints.watched);
            let run = WrkRun {
                http: endpoints.http()?,
                api_key: endpoints.api_key.clone(),
                connections: args.http_connections,
                threads: args.wrk_threads,
                duration,
                payload_bytes: args.payload,
            };
            let result = tokio::task::spawn_blocking(move || publishers::wrk(&run)).await??;
            let m = Measurement {
                publish_rate: result.requests_per_sec,
                publish_errors: result.errors,
                latency: Some(result.latency),
                cpu: meter.finish(),
                ..Measurement::default()
            };
            check_alive(&mut herald);
            return Ok((m, None));
        }
        PublishPath::Http => (Via::Http, args.http_connections, 1),
        PublishPath::Grpc => (Via::Grpc, args.grpc_concurrency, 1),
        PublishPath::GrpcBatch => (Via::GrpcBatch, args.batch_concurrency, args.batch),
    };
    let lanes = publishers::lanes(via, endpoints, lanes, args.grpc_channels).await?;
    // Keys unique to this run: a run's keys must not meet an earlier run's
    // within the brokers' de-duplication window.
    let key_prefix = args.keyed.then(|| format!("bench-{}-{}", std::process::id(), unique_run()));
    let source = Box::new(Broadcasts { seq: 0, payload_bytes: args.payload, key_prefix });
    let meter = CpuMeter::start(&watched(endpoints, None));
    let tally = publishers::flat_out(lanes, via, per_request, duration, source, None).await;
    let m = Measurement {
        publish_rate: tally.rate(),
        publish_errors: tally.errors,
        latency: tally.request_latency.percentiles(),
        cpu: meter.finish(),
        ..Measurement::default()
    };
    check_alive(&mut herald);
    Ok((m, tally.first_error))
}
