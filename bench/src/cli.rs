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
    /// N idle clients logged in with a JWT each (a user id of its own and groups) against N
    /// anonymous ones, in the same run: gateway and broker memory per connection; then every
    /// client, user and group is sent a message, each checked to arrive once.
    UsersIdle(UsersIdleArgs),
    /// N clients, each a user of its own (JWT): messages to random users against messages to
    /// random connections, in the same run, over gRPC and HTTP; each checked at the clients.
    User(UserArgs),
    /// N clients all in one group (JWT groups claim): group publishes against broadcasts to the
    /// same clients, in the same run; every client checks every message.
    Group(DeliveryArgs),
    /// N clients speaking the client protocol (herald.json.v1), all subscribed to one client
    /// channel: channel publishes against broadcasts to the same clients, in the same run.
    Channel(DeliveryArgs),
    /// As channel, on a client channel whose namespace keeps history: each publication is
    /// stored with its offset (in memory standalone, in JetStream with --brokers > 1).
    History(DeliveryArgs),
    /// Recovery latency: callers on connections of their own resubscribe to a client channel
    /// with history from a position --missed publications back, and get them in the reply.
    Recover(RecoverArgs),
    /// Query latency on a cluster (3 brokers on NATS by default) with N users connected:
    /// `user_online` against a `connection` query the broker answers alone, in the same run.
    Query(QueryArgs),
    /// Group join/leave Controls per second on N connected clients (standalone by default),
    /// against unary publishes to the same connections in the same run; then every group's
    /// members are checked.
    Churn(ChurnArgs),
    /// Client-channel subscribe/unsubscribe commands per second, each answered once the broker
    /// follows it, from callers on connections of their own.
    Subscribe(SubscribeArgs),
    /// Client messages to one gRPC consumer: N raw clients send text frames (flat out or at a
    /// rate), herald reports each as a message event (`--events message`), and one consumer
    /// instance in the bench receives and acknowledges them; each is checked to arrive once.
    /// A running herald given by address must have `--events message`.
    Events(EventsArgs),
    /// Connect and disconnect events at a steady connect rate: clients open connections, hold
    /// them briefly and close them; a consumer checks that each connection's connect and
    /// disconnect event arrive exactly once (`--events connect,disconnect`, which a running
    /// herald given by address must have).
    Connects(ConnectsArgs),
    /// Client-to-backend RPC at a fixed request rate: client-protocol connections send `rpc`
    /// commands through the gateway to a backend in the bench (`ServeCalls`) that echoes them;
    /// latency from send to reply.
    Rpc(RpcArgs),
    /// A soak, run by hand: an hour of steady connection churn, mixed publishing (broadcast,
    /// to connections, to client channels, to groups) and subscription and group churn; every
    /// herald process's RSS and open descriptors sampled each minute. Fails on any message
    /// lost, duplicated or misdelivered, or on RSS or descriptors still growing after warm-up.
    /// Writes soak.csv and soak.svg to --out.
    Soak(SoakArgs),
    /// A load-generator process (started by the harness itself).
    #[command(hide = true)]
    Loadgen,
}

/// Options every scenario shares: the herald under test, repetitions, and how
/// clients are spread.
#[derive(Debug, Clone, Args)]
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
    /// HS256 secret (32 bytes or more) that signs the tokens of logged-in clients (users-idle,
    /// user, group, query); a herald the harness starts requires it (`--client-auth jwt`).
    /// Default: a fixed benchmark secret.
    #[arg(long, env = "HERALD_BENCH_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
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
    /// Clients speak the client protocol (herald.json.v1) and each subscribes to this many
    /// client channels (the same ones for every client); 0: classic raw clients.
    #[arg(long, default_value_t = 0)]
    pub subscriptions: usize,
    /// How long the wait for that broadcast to reach every client may go without a delivery
    /// (it lasts as long as deliveries keep coming: a million clients take seconds).
    #[arg(long, default_value = "10s", value_parser = herald_common::duration::parse)]
    pub drain: Duration,
}

#[derive(Debug, Args)]
pub struct UsersIdleArgs {
    #[command(flatten)]
    pub common: Common,
    /// Client connections; a comma-separated list gives rows for each.
    #[arg(long, short = 'n', value_delimiter = ',', default_value = "10000")]
    pub connections: Vec<usize>,
    /// Groups each logged-in connection joins (its token's groups claim); a comma-separated
    /// list gives one row each (0: a user id and no group).
    #[arg(long, value_delimiter = ',', default_value = "3",
          value_parser = clap::value_parser!(u8).range(0..=MAX_TOKEN_GROUPS))]
    pub groups: Vec<u8>,
    /// Distinct groups those are drawn from, in turn: each has about N × groups / pool members.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub group_pool: u32,
    /// How long to wait for the check messages sent after the hold.
    #[arg(long, default_value = "10s", value_parser = herald_common::duration::parse)]
    pub drain: Duration,
}

/// Most groups one client token may carry (herald's limit).
const MAX_TOKEN_GROUPS: i64 = 64;

#[derive(Debug, Args)]
pub struct UserArgs {
    #[command(flatten)]
    pub common: Common,
    /// Client connections, each a user of its own; a comma-separated list gives rows for each.
    #[arg(long, short = 'n', value_delimiter = ',', default_value = "10000")]
    pub connections: Vec<usize>,
    /// How to publish, comma-separated: each gives two rows, messages to random connections
    /// (the baseline) and to random users. http is the classic GET (`?to_worker_id=&to_connection_id=`,
    /// `?to_uid=`), http-json is POST /v1/publish.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "grpc-batch,http")]
    pub via: Vec<Via>,
    /// Messages published per second, or "max" for flat out (within --window).
    #[arg(long, default_value = "max", value_parser = parse_rate)]
    pub rate: Rate,
    /// Payload size in bytes (the header `seq:stamp:target:` is padded to it).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Messages per PublishBatch call (flat out: always this many; at a fixed rate: at most).
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Flat out: most messages published but not yet delivered. Default: 1,000,000.
    #[arg(long)]
    pub window: Option<u64>,
    /// Flat out: concurrent gRPC requests. Above 1, messages may legitimately arrive out of order.
    #[arg(long, default_value_t = 1)]
    pub lanes: usize,
    /// Flat out: keep-alive connections (one request at a time each) for the HTTP paths.
    #[arg(long, default_value_t = 64)]
    pub http_connections: usize,
    /// How long to wait for the last deliveries after publishing stops.
    #[arg(long, default_value = "5s", value_parser = herald_common::duration::parse)]
    pub drain: Duration,
    /// Send every message to one connection and one user (the first client's) rather than to
    /// random ones, while all N stay connected. Flat out, the window then defaults to 512 KiB
    /// of payloads (8,192 messages of 64 B), half of one connection's default outbox.
    #[arg(long)]
    pub one: bool,
}

/// A question timed by the query scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QueryKind {
    /// Query{connection} for a connection of the queried broker's own gateway: answered by that
    /// broker alone (the baseline).
    Local,
    /// Query{connection} for a connection of another broker's gateway: one NATS round trip.
    Remote,
    /// Query{user_online} for a connected user: every broker is asked.
    Online,
    /// Query{user_online} for a user who never connected: every broker is asked.
    Offline,
    /// Query{channel_subscribers} for a client channel every client subscribed to (presence):
    /// every broker is asked, and every subscriber listed.
    Presence,
}

#[derive(Debug, Args)]
#[command(
    mut_arg("brokers", |a| a.default_value("3")),
    mut_arg("duration", |a| a.default_value("5s").help("How long each row queries: 10s, 500ms, 1m"))
)]
pub struct QueryArgs {
    #[command(flatten)]
    pub common: Common,
    /// Client connections, each a user of its own; a comma-separated list gives rows for each.
    #[arg(long, short = 'n', value_delimiter = ',', default_value = "3000")]
    pub connections: Vec<usize>,
    /// Questions to time, comma-separated; one row each per --concurrency. Queries go to broker 0.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "local,remote,online,offline")]
    pub kinds: Vec<QueryKind>,
    /// Queries in flight at once (each caller waits for its answer before the next); a
    /// comma-separated list gives rows for each.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub concurrency: Vec<usize>,
}

#[derive(Debug, Args)]
#[command(mut_arg("standalone", |a| a.hide(true)))]
pub struct ChurnArgs {
    #[command(flatten)]
    pub common: Common,
    /// Start a broker and WebSocket gateways instead of one `herald standalone` process
    /// (implied by --brokers above 1 and by --gateways).
    #[arg(long)]
    pub split: bool,
    /// Client connections (anonymous); a comma-separated list gives rows for each.
    #[arg(long, short = 'n', value_delimiter = ',', default_value = "10000")]
    pub connections: Vec<usize>,
    /// Controls in flight at once (and unary publishes, for the baseline). Each caller owns
    /// its own connections, so the changes to one connection are made in order.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// HTTP/2 connections to the broker they share.
    #[arg(long, default_value_t = 4)]
    pub channels: usize,
    /// Distinct groups the connections join and leave (connection i uses group i mod this).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub groups: u32,
    /// Payload size of the baseline's publishes, in bytes.
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Operations per call: above 1, each call is a `ControlBatch` of this many joins and
    /// leaves (each on another connection of its caller), and the baseline a `PublishBatch`
    /// of this many messages.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: u32,
    /// How long to wait for the baseline's last deliveries after publishing stops.
    #[arg(long, default_value = "5s", value_parser = herald_common::duration::parse)]
    pub drain: Duration,
}

#[derive(Debug, Args)]
pub struct SubscribeArgs {
    #[command(flatten)]
    pub common: Common,
    /// Callers, each on a connection of its own, one command in flight each.
    #[arg(long, default_value_t = 64)]
    pub callers: usize,
    /// Distinct channels the callers cycle through.
    #[arg(long, default_value_t = 100)]
    pub channels: usize,
}

/// The consumer side of the event scenarios.
#[derive(Debug, Clone, Args)]
pub struct ConsumerArgs {
    /// The consumer instance's `max_unacked`: deliveries it may hold unacknowledged before
    /// the broker pauses (herald's limit: 100,000).
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_unacked: u32,
    /// Ack ids per `AckEvents` call (at most 10,000); calls are pipelined, up to 4 in flight,
    /// and a partial batch goes out every 5 ms.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub ack_batch: u32,
    /// Longest wait for the last events once the clients are done; the wait ends sooner when
    /// every expected event has arrived, or when none has arrived for 3 s.
    #[arg(long, default_value = "30s", value_parser = herald_common::duration::parse)]
    pub drain: Duration,
}

#[derive(Debug, Args)]
#[command(mut_arg("standalone", |a| a.hide(true)))]
pub struct EventsArgs {
    #[command(flatten)]
    pub common: Common,
    /// Start a broker and WebSocket gateways instead of one `herald standalone` process
    /// (implied by --brokers above 1 and by --gateways).
    #[arg(long)]
    pub split: bool,
    /// Sending clients (classic raw WebSocket); a comma-separated list gives one row each.
    #[arg(long, short = 'n', value_delimiter = ',', default_value = "1000")]
    pub connections: Vec<usize>,
    /// Frames per second, all clients together, or "max": every client flat out, --burst
    /// frames per write, as fast as herald takes them (within --window).
    #[arg(long, default_value = "max", value_parser = parse_rate)]
    pub rate: Rate,
    /// Payload bytes of each frame (`<seq>:<sent_ns>::` padded with `x`).
    #[arg(long, default_value_t = 32)]
    pub payload: usize,
    /// Flat out: frames per write (each still a frame, and an event, of its own).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub burst: u32,
    /// At a rate: each client writes the frames that are due at most this often.
    #[arg(long, default_value = "20ms", value_parser = herald_common::duration::parse)]
    pub interval: Duration,
    /// Flat out: most frames sent but not yet received by the consumer (so flat out is the
    /// most herald carries without loss; the default stays below the gateway's event queue,
    /// 100,000). 0: no window, the clients outrun herald and it drops what its queue cannot
    /// hold (counted in the dropped column).
    #[arg(long, default_value_t = 50_000)]
    pub window: u64,
    /// Where herald sends the events; one table row each (herald restarted for each).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "grpc")]
    pub backend: Vec<EventsBackend>,
    /// Events per webhook POST (herald's --webhook-batch).
    #[arg(long, default_value_t = 100)]
    pub webhook_batch: usize,
    #[command(flatten)]
    pub consumer: ConsumerArgs,
}

/// How the events scenario's backend gets its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EventsBackend {
    /// One ConsumeEvents instance (gRPC), acknowledging in batches.
    Grpc,
    /// herald's webhook, POSTing signed batches to an HTTP endpoint in the bench.
    Webhook,
    /// The same over HTTPS, herald verifying the endpoint against a CA made by the bench.
    WebhookTls,
}

impl std::fmt::Display for EventsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EventsBackend::Grpc => "gRPC consumer",
            EventsBackend::Webhook => "webhook (http)",
            EventsBackend::WebhookTls => "webhook (https)",
        })
    }
}

#[derive(Debug, Args)]
#[command(mut_arg("standalone", |a| a.hide(true)))]
pub struct ConnectsArgs {
    #[command(flatten)]
    pub common: Common,
    /// Start a broker and WebSocket gateways instead of one `herald standalone` process
    /// (implied by --brokers above 1 and by --gateways).
    #[arg(long)]
    pub split: bool,
    /// Connections opened per second, all load generators together (for --duration); a
    /// comma-separated list gives one row each. Handshakes in flight are capped at
    /// --connect-concurrency per process: past that the achieved rate falls behind.
    #[arg(long, value_delimiter = ',', default_value = "5000")]
    pub rate: Vec<f64>,
    /// How long each connection stays open after its greeting (sending nothing) before the
    /// client closes it with a close frame.
    #[arg(long, default_value = "500ms", value_parser = herald_common::duration::parse)]
    pub hold: Duration,
    /// Load-generator processes sharing the connections (each from source addresses of its
    /// own, a fresh one per --per-source connections).
    #[arg(long, default_value_t = 1)]
    pub processes: usize,
    /// The connect hook herald asks about every connection: none, or an endpoint in the bench
    /// letting every connection in over http or https; one table row each.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "none")]
    pub connect_hook: Vec<ConnectHook>,
    #[command(flatten)]
    pub consumer: ConsumerArgs,
}

/// The connects scenario's connect hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConnectHook {
    None,
    Http,
    /// Over HTTPS, herald verifying the endpoint against a CA made by the bench.
    Https,
}

impl std::fmt::Display for ConnectHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConnectHook::None => "no hook",
            ConnectHook::Http => "hook (http)",
            ConnectHook::Https => "hook (https)",
        })
    }
}

#[derive(Debug, Args)]
#[command(mut_arg("standalone", |a| a.hide(true)))]
pub struct RpcArgs {
    #[command(flatten)]
    pub common: Common,
    /// Start a broker and WebSocket gateways instead of one `herald standalone` process
    /// (implied by --brokers above 1 and by --gateways).
    #[arg(long)]
    pub split: bool,
    /// Requests per second, all connections together; open loop: a request never waits for
    /// the answers of earlier ones. A comma-separated list gives one row each.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    pub rate: Vec<f64>,
    /// Client-protocol connections (herald.json.v1) the requests take turns on.
    #[arg(long, short = 'n', default_value_t = 100)]
    pub connections: usize,
    /// Bytes of text in each request, echoed back by the backend.
    #[arg(long, default_value_t = 32)]
    pub payload: usize,
    /// ServeCalls streams serving the method in the bench (calls are shared among them).
    #[arg(long, default_value_t = 1)]
    pub backends: usize,
    /// Longest wait for the last answers once sending stops (herald's rpc timeout is 5 s).
    #[arg(long, default_value = "6s", value_parser = herald_common::duration::parse)]
    pub drain: Duration,
}

#[derive(Debug, Args)]
#[command(
    mut_arg("standalone", |a| a.hide(true)),
    mut_arg("runs", |a| a.hide(true)),
    mut_arg("duration", |a| a.default_value("1h").help("How long the soak churns and publishes: 1h, 10m, 90s"))
)]
pub struct SoakArgs {
    #[command(flatten)]
    pub common: Common,
    /// Start a broker and WebSocket gateways instead of one `herald standalone` process
    /// (implied by --brokers above 1 and by --gateways).
    #[arg(long)]
    pub split: bool,
    /// Standing connections, held for the whole soak: half classic raw clients, half speaking
    /// herald.json.v1 and subscribed to every soak channel.
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub connections: usize,
    /// Connections opened per second, at a steady pace; each is closed --hold after it opened,
    /// so once the first ones close as many close per second.
    #[arg(long, default_value_t = 20.0)]
    pub churn_rate: f64,
    /// How long each churned connection stays open. Half speak herald.json.v1 (subscribed to a
    /// soak channel, then moved to another half-way); each joins a group by a gRPC Control.
    #[arg(long, default_value = "10s", value_parser = herald_common::duration::parse)]
    pub hold: Duration,
    /// Messages published per second (unary gRPC Publish, one at a time), shared out as --mix says.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Shares of the publishes by target: broadcast, connection (a random standing or churned
    /// connection), channel (a soak client channel), group (a soak group of churned connections).
    #[arg(long, default_value = "broadcast=10,connection=50,channel=30,group=10", value_parser = parse_mix)]
    pub mix: Mix,
    /// Client channels (`bench:soak-<i>`) the publishes and subscriptions go round.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub channels: u32,
    /// Groups (`soak-<i>`) the churned connections join and leave.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub groups: u32,
    /// Payload size in bytes (the header `seq:stamp:target:` is padded to it).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// How often every herald process's RSS and open descriptors are read.
    #[arg(long, default_value = "1m", value_parser = herald_common::duration::parse)]
    pub sample_every: Duration,
    /// The start of the soak left out of the flatness verdict: caches, pools and allocator
    /// arenas fill up first.
    #[arg(long, default_value = "5m", value_parser = herald_common::duration::parse)]
    pub warmup: Duration,
    /// Where soak.csv and soak.svg are written (created if missing).
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
    /// How long to wait for the standing connections' last deliveries after publishing stops.
    #[arg(long, default_value = "10s", value_parser = herald_common::duration::parse)]
    pub drain: Duration,
}

/// How the soak's publishes are shared out between kinds of target (relative weights).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mix {
    pub broadcast: u32,
    pub connection: u32,
    pub channel: u32,
    pub group: u32,
}

fn parse_mix(s: &str) -> Result<Mix, String> {
    let mut mix = Mix { broadcast: 0, connection: 0, channel: 0, group: 0 };
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (kind, weight) = part.split_once('=').ok_or_else(|| format!("{part:?}: expected kind=weight"))?;
        let weight: u32 = weight.trim().parse().map_err(|_| format!("{part:?}: the weight is not a whole number"))?;
        let slot = match kind.trim() {
            "broadcast" => &mut mix.broadcast,
            "connection" => &mut mix.connection,
            "channel" => &mut mix.channel,
            "group" => &mut mix.group,
            other => return Err(format!("{other:?}: expected broadcast, connection, channel or group")),
        };
        *slot = weight;
    }
    if mix.broadcast + mix.connection + mix.channel + mix.group == 0 {
        return Err("every weight is 0: nothing to publish".into());
    }
    Ok(mix)
}

#[derive(Debug, Args)]
pub struct RecoverArgs {
    #[command(flatten)]
    pub common: Common,
    /// Callers, each on a connection of its own, one recovery in flight each.
    #[arg(long, default_value_t = 16)]
    pub callers: usize,
    /// Publications each recovery gets back.
    #[arg(long, default_value_t = 100)]
    pub missed: u64,
    /// Payload size in bytes of those publications.
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
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

    #[test]
    fn the_new_scenarios_default_to_the_targets_of_issue_12() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["herald-bench"], args].concat()).unwrap().scenario;
        let Scenario::UsersIdle(args) = parse(&["users-idle"]) else { panic!("not users-idle") };
        assert_eq!((args.connections, args.groups, args.group_pool), (vec![10_000], vec![3], 1000));
        let Scenario::User(args) = parse(&["user"]) else { panic!("not user") };
        assert_eq!((args.connections, args.via), (vec![10_000], vec![Via::GrpcBatch, Via::Http]));
        assert_eq!(args.rate, Rate::Max);
        let Scenario::Group(args) = parse(&["group"]) else { panic!("not group") };
        assert_eq!(args.connections, [10_000]);
        let Scenario::Query(args) = parse(&["query"]) else { panic!("not query") };
        assert_eq!((args.common.brokers, args.common.duration), (3, Duration::from_secs(5)));
        assert_eq!(args.connections, [3000]);
        assert_eq!(args.kinds, [QueryKind::Local, QueryKind::Remote, QueryKind::Online, QueryKind::Offline]);
        assert_eq!(args.concurrency, [1, 8]);
        let Scenario::Query(args) = parse(&["query", "--brokers", "1", "--duration", "1s"]) else { panic!() };
        assert_eq!((args.common.brokers, args.common.duration), (1, Duration::from_secs(1)));
        let Scenario::Churn(args) = parse(&["churn"]) else { panic!("not churn") };
        assert_eq!((args.connections, args.concurrency, args.groups, args.split), (vec![10_000], 64, 100, false));
        let Scenario::Fanout(args) = parse(&["fanout"]) else { panic!("not fanout") };
        assert_eq!((args.common.brokers, args.common.duration), (1, Duration::from_secs(10)), "others keep theirs");
    }

    #[test]
    fn the_event_and_rpc_scenarios_default_to_their_targets() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["herald-bench"], args].concat()).unwrap().scenario;
        let Scenario::Events(args) = parse(&["events"]) else { panic!("not events") };
        assert_eq!((args.connections, args.rate, args.split), (vec![1000], Rate::Max, false));
        assert_eq!((args.consumer.max_unacked, args.consumer.ack_batch), (20_000, 1000));
        let Scenario::Connects(args) = parse(&["connects"]) else { panic!("not connects") };
        assert_eq!((args.rate, args.common.duration), (vec![5000.0], Duration::from_secs(10)));
        let Scenario::Rpc(args) = parse(&["rpc", "--rate", "500,1000"]) else { panic!("not rpc") };
        assert_eq!((args.rate, args.connections, args.backends), (vec![500.0, 1000.0], 100, 1));
        assert!(Cli::try_parse_from(["herald-bench", "events", "--ack-batch", "10001"]).is_err());
        assert!(Cli::try_parse_from(["herald-bench", "events", "--max-unacked", "100001"]).is_err());
    }

    #[test]
    fn the_soak_defaults_to_an_hour_sampled_each_minute() {
        let cli = Cli::try_parse_from(["herald-bench", "soak"]).unwrap();
        let Scenario::Soak(args) = cli.scenario else { panic!("not soak") };
        assert_eq!(args.common.duration, Duration::from_secs(3600));
        assert_eq!((args.sample_every, args.warmup), (Duration::from_secs(60), Duration::from_secs(300)));
        assert_eq!(args.mix, Mix { broadcast: 10, connection: 50, channel: 30, group: 10 });
        let cli = Cli::try_parse_from(["herald-bench", "soak", "--duration", "2m", "--mix", "channel=1"]).unwrap();
        let Scenario::Soak(args) = cli.scenario else { panic!("not soak") };
        assert_eq!(args.common.duration, Duration::from_secs(120));
        assert_eq!(args.mix, Mix { broadcast: 0, connection: 0, channel: 1, group: 0 });
        assert!(parse_mix("broadcast=0").is_err());
        assert!(parse_mix("users=1").is_err());
        assert!(parse_mix("broadcast").is_err());
    }

    #[test]
    fn tokens_carry_at_most_64_groups() {
        assert!(Cli::try_parse_from(["herald-bench", "users-idle", "--groups", "0,3,64"]).is_ok());
        assert!(Cli::try_parse_from(["herald-bench", "users-idle", "--groups", "65"]).is_err());
        assert!(Cli::try_parse_from(["herald-bench", "users-idle", "--group-pool", "0"]).is_err());
    }
}
