//! `herald-bench`: starts (or targets) herald, drives it with real WebSocket
//! clients and publishers on this machine, and prints markdown tables.
//!
//! `cargo run --release -p herald-bench -- <scenario> [options]`, the scenarios being
//! fanout, targeted, idle, publish, floor, users-idle, user, group, channel, history,
//! recover, query, churn, subscribe, events, connects, rpc and soak (an hour, by hand);
//! `--help` on each scenario lists its options. See BENCHMARKS.md for results.

mod alloc;
mod cli;
mod clients;
mod consumer;
mod endpoint;
mod endpoints;
mod fleet;
mod http1;
mod identity;
mod loadgen;
mod message;
mod nats;
mod procfs;
mod procs;
mod publishers;
mod rpc;
mod scenarios;
mod stats;
mod webhook;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Scenario};

/// Small cache-line-aligned blocks (a client's task and socket registration) from a pool: see `alloc`.
#[global_allocator]
static ALLOCATOR: alloc::Lean = alloc::Lean;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.scenario {
        Scenario::Loadgen => loadgen::main(),
        scenario => runtime().and_then(|rt| rt.block_on(scenarios::run(scenario))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A multi-thread runtime with one worker per core.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()?)
}
