//! The command line: one subcommand per scenario, the options they share,
//! and the hidden `loadgen` subcommand the harness starts its load
//! generators with.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::publishers::Via;

#[derive(Debug, Parser)]
#[command(
    name = "herald-bench",
    about = "Benchmarks herald with real WebSocket clients and publishers on this machine",
    after_help = "Started herald processes inherit the environment: HERALD_* variables tune them \
                  (e.g. HERALD_WS_READ_BUFFER_BYTES); HERALD_BENCH_LOG sets their log level (default warn)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// N clients; broadcasts at a fixed rate or flat out; every client checks every message.
    Fanout(DeliveryArgs),
    /// N clients; messages to random single connections, each checked to land on its target only.
    Targeted(DeliveryArgs),
    /// N idle clients held for the duration: gateway memory and CPU, then one broadcast to all.
    Idle(IdleArgs),
    /// Publish throughput without clients: HTTP keep-alive, gRPC Publish, gRPC PublishBatch.
    Publish(PublishArgs),
    /// The machine's floor, without herald: the kernel's cost of one small loopback TCP write
    /// and read, i.e. the least a fan-out to N connections can cost here.
    Floor(FloorArgs),
    /// A load-generator process (started by the harness itself).
    #[command(hide = true)]
    Loadgen,
}

/// Options every scenario shares: the herald under test, repetitions, and how
/// clients are spread.
#[derive(Debug, Args)]
pub struct Common {
    /// The herald binary to start (not used when addresses of a running herald are given).
    /// Default: `herald` beside this binary, i.e. target/release/herald.
    #[arg(long)]
    pub herald: Option<PathBuf>,
    /// Start all roles in one `herald standalone` process instead of a broker plus gateways.
    #[arg(long)]
    pub standalone: bool,
    /// WebSocket gateway processes to start: with one broker they share one port
    /// (SO_REUSEPORT); with several, each has its own port and clients go round-robin.
    /// Default: one per 15,000 connections, and at least one per broker.
    #[arg(long)]
    pub gateways: Option<usize>,
    /// Brokers to start. Above 1 they form a cluster through a nats-server the harness
    /// starts too; gateway i attaches to broker i mod K (the others as failover), and
    /// publisher lane i publishes through broker i mod K.
    #[arg(long, default_value_t = 1, conflicts_with = "standalone", value_parser = clap::value_parser!(u16).range(1..))]
    pub brokers: u16,
    /// The nats-server binary for --brokers above 1. Default: `nats-server` on PATH.
    #[arg(long, env = "HERALD_NATS_SERVER")]
    pub nats_server: Option<PathBuf>,
    /// WebSocket URL(s) of a running herald (comma-separated); clients go round-robin.
    #[arg(long = "ws-url", value_delimiter = ',')]
    pub ws_urls: Vec<String>,
    /// HTTP gateway of a running herald, e.g. http://127.0.0.1:4237.
    #[arg(long)]
    pub http_url: Option<String>,
    /// Broker gRPC address(es) of a running herald (comma-separated), e.g. 127.0.0.1:2206;
    /// publisher lane i uses address i mod their number.
    #[arg(long = "grpc-addr", value_delimiter = ',')]
    pub grpc_addrs: Vec<String>,
    /// Admin URL(s) of a running herald (comma-separated), waited on until /readyz answers 200.
    #[arg(long = "admin-url", value_delimiter = ',')]
    pub admin_urls: Vec<String>,
    /// Process id(s) of a running herald's WebSocket gateways, for memory and CPU figures.
    #[arg(long = "gateway-pid", value_delimiter = ',')]
    pub gateway_pids: Vec<u32>,
    /// API key to publish with (and, for a herald the harness starts, the key it requires).
    #[arg(long, env = "HERALD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Runs per configuration; the table shows medians (and the worst error counts).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// How long each run publishes (or, for idle, holds its clients): 10s, 500ms, 1m.
    #[arg(long, default_value = "10s", value_parser = herald_common::duration::parse)]
    pub duration: Duration,
    /// Most clients per load-generator process.
    #[arg(long, default_value_t = 15_000)]
    pub per_process: usize,
    /// Most clients per loopback source address.
    #[arg(long, default_value_t = 10_000)]
    pub per_source: usize,
    /// WebSocket handshakes in progress at once, per load-generator process.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
}

impl Common {
    /// The herald binary to start.
    pub fn herald_binary(&self) -> anyhow::Result<PathBuf> {
        if let Some(path) = &self.herald {
            return Ok(path.clone());
        }
        let me = std::env::current_exe()?;
        Ok(me.with_file_name("herald"))
    }

    /// Whether the scenario targets a herald that is already running.
    pub fn is_external(&self) -> bool {
        !self.ws_urls.is_empty() || self.http_url.is_some() || !self.grpc_addrs.is_empty()
    }
}

/// Publishing flat out or at a fixed rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    Max,
    PerSecond(f64),
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Max => f.write_str("flat out"),
            Self::PerSecond(rate) => write!(f, "{rate}/s"),
        }
    }
}

fn parse_rate(s: &str) -> Result<Rate, String> {
    if s == "max" {
        return Ok(Rate::Max);
    }
    match s.parse::<f64>() {
        Ok(rate) if rate > 0.0 && rate.is_finite() => Ok(Rate::PerSecond(rate)),
        _ => Err(format!("{s:?}: expected messages per second or \"max\"")),
    }
}

#[derive(Debug, Args)]
pub struct DeliveryArgs {
    #[command(flatten)]
    pub common: Common,
    /// Client connections; a comma-separated list gives one table row each.
    #[arg(long, short = 'n', value_delimiter = ',', default_value = "10000")]
    pub connections: Vec<usize>,
    /// Messages published per second, or "max" for flat out (within --window).
    #[arg(long, default_value = "max", value_parser = parse_rate)]
    pub rate: Rate,
    /// Payload size in bytes (the header `seq:stamp:target:` is padded to it).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// How to publish. Default: grpc-batch flat out, grpc at a fixed rate.
    #[arg(long, value_enum)]
    pub via: Option<Via>,
    /// Messages per PublishBatch call (flat out: always this many; at a fixed rate: at most).
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Flat out: most messages published but not yet delivered (to every client, for broadcasts).
    /// Default: 1,000,000 deliveries' worth (fanout: 1,000,000 / clients messages, at least 4).
    /// Batches are cut to fit.
    #[arg(long)]
    pub window: Option<u64>,
    /// Flat out: concurrent publish requests. Above 1, messages may legitimately arrive out of order.
    #[arg(long, default_value_t = 1)]
    pub lanes: usize,
    /// How long to wait for the last deliveries after publishing stops.
    #[arg(long, default_value = "5s", value_parser = herald_common::duration::parse)]
    pub drain: Duration,
}

#[derive(Debug, Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    /// Client connections; a comma-separated list gives one table row each.
    #[arg(long, short = 'n', value_delimiter = ',', default_value = "10000")]
    pub connections: Vec<usize>,
    /// Skip the broadcast sent after the hold to check every client still receives.
    #[arg(long)]
    pub no_broadcast: bool,
    /// How long to wait for that broadcast to reach every client.
    #[arg(long, default_value = "10s", value_parser = herald_common::duration::parse)]
    pub drain: Duration,
}

#[derive(Debug, Args)]
pub struct FloorArgs {
    /// Socket pairs (each takes two of this process's file descriptors).
    #[arg(long, short = 'n', default_value_t = 5000)]
    pub sockets: usize,
    /// Bytes written to each socket per round (a 64 B message is a 66 B WebSocket frame).
    #[arg(long, default_value_t = 66)]
    pub bytes: usize,
    /// Rounds of one write per socket, then one read per socket; the table shows medians.
    #[arg(long, default_value_t = 20)]
    pub rounds: usize,
    /// Fan-out sizes to project the cost of one broadcast for.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub project: Vec<usize>,
}

/// A publish path measured by the publish scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PublishPath {
    /// HTTP classic GET /?content=… from herald-bench's keep-alive client.
    Http,
    /// HTTP classic GET /?content=… from wrk (skipped when wrk is not installed).
    Wrk,
    /// gRPC unary Publish.
    Grpc,
    /// gRPC PublishBatch.
    GrpcBatch,
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    #[command(flatten)]
    pub common: Common,
    /// Paths to measure, one table row each.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "http,wrk,grpc,grpc-batch")]
    pub paths: Vec<PublishPath>,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Keep-alive connections for the HTTP paths.
    #[arg(long, default_value_t = 64)]
    pub http_connections: usize,
    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    pub wrk_threads: usize,
    /// Unary Publish calls in flight at once.
    #[arg(long, default_value_t = 64)]
    pub grpc_concurrency: usize,
    /// PublishBatch calls in flight at once.
    #[arg(long, default_value_t = 4)]
    pub batch_concurrency: usize,
    /// HTTP/2 connections the gRPC calls share.
    #[arg(long, default_value_t = 4)]
    pub grpc_channels: usize,
    /// Messages per PublishBatch call.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Give every message an idempotency key of its own (gRPC paths only), to measure what
    /// de-duplication costs: a local window on one broker, a JetStream key-value write per
    /// message with --brokers above 1.
    #[arg(long)]
    pub keyed: bool,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("max"), Ok(Rate::Max));
        assert_eq!(parse_rate("20"), Ok(Rate::PerSecond(20.0)));
        assert!(parse_rate("0").is_err());
    }

    #[test]
    fn scenarios_take_lists_of_sizes() {
        let cli = Cli::try_parse_from(["herald-bench", "fanout", "-n", "100,1000", "--rate", "20"]).unwrap();
        let Scenario::Fanout(args) = cli.scenario else { panic!("not fanout") };
        assert_eq!(args.connections, [100, 1000]);
        assert_eq!(args.rate, Rate::PerSecond(20.0));
        assert_eq!(args.common.runs, 3);
        assert_eq!(args.common.brokers, 1);
    }

    #[test]
    fn a_cluster_takes_brokers_but_not_standalone() {
        let cli =
            Cli::try_parse_from(["herald-bench", "fanout", "--brokers", "3", "--nats-server", "/bin/nats"]).unwrap();
        let Scenario::Fanout(args) = cli.scenario else { panic!("not fanout") };
        assert_eq!(args.common.brokers, 3);
        assert_eq!(args.common.nats_server, Some(PathBuf::from("/bin/nats")));
        assert!(Cli::try_parse_from(["herald-bench", "fanout", "--brokers", "0"]).is_err());
        assert!(Cli::try_parse_from(["herald-bench", "fanout", "--brokers", "2", "--standalone"]).is_err());
        assert!(Cli::try_parse_from(["herald-bench", "fanout", "--standalone"]).is_ok());
    }
}
