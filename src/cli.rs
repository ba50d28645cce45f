//! Command-line interface: one subcommand per role. Every option can also be
//! set from the environment (`HERALD_*`) or a TOML file ([`crate::config`]);
//! flags win over the environment, which wins over the file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use herald_broker::HubLimits;
use herald_broker::cluster::ClusterConfig;
use herald_common::auth::{ApiKeys, AuthConfigError};
use herald_common::http::HttpServerOptions;
use herald_common::tls::TlsError;
use herald_gateway_http::HttpConfig;
use herald_gateway_ws::{GatewayConfig, Greeting};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, Parser)]
#[command(name = "herald", version, about = "Distributed WebSocket push server", propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub role: Role,
    /// Log line format (the level comes from RUST_LOG, default "info").
    #[arg(long, global = true, env = "HERALD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// TOML file of option defaults: top-level keys for every role, [broker], [ws], [http] and
    /// [standalone] tables for one (precedence: flags, then HERALD_* environment, then this file).
    #[arg(long, global = true, env = "HERALD_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Role {
    /// The channel broker: routes published messages to the gateways that need them (gRPC).
    Broker(BrokerArgs),
    /// A WebSocket gateway: holds client connections and delivers events to them.
    Ws(WsArgs),
    /// An HTTP gateway: turns HTTP publish requests into broker publishes.
    Http(HttpArgs),
    /// Broker, WebSocket gateway and HTTP gateway in one process (no other server needed).
    Standalone(StandaloneArgs),
}

#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// Address of the broker's gRPC service.
    #[arg(long, env = "HERALD_BROKER_LISTEN", default_value = "127.0.0.1:2206")]
    pub listen: SocketAddr,
    /// Address of the admin endpoints (/metrics, /healthz, /readyz).
    #[arg(long, env = "HERALD_BROKER_ADMIN_LISTEN", default_value = "127.0.0.1:2207")]
    pub admin_listen: SocketAddr,
    #[command(flatten)]
    pub auth: PublisherAuthArgs,
    #[command(flatten)]
    pub content: ContentArgs,
    #[command(flatten)]
    pub broker: BrokerOptions,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// Join a broker cluster through these NATS servers (comma-separated nats://host:port).
    /// Without it the broker works alone.
    #[arg(long, env = "HERALD_NATS")]
    pub nats: Option<String>,
    /// JetStream key-value bucket holding worker-id leases.
    #[arg(long, env = "HERALD_NATS_BUCKET", default_value = "herald_workers")]
    pub nats_bucket: String,
    /// NATS subject prefix of channel messages.
    #[arg(long, env = "HERALD_NATS_SUBJECT_PREFIX", default_value = "herald.ch")]
    pub nats_subject_prefix: String,
    /// Replicas of the lease bucket (in a clustered NATS).
    #[arg(long, env = "HERALD_NATS_KV_REPLICAS", default_value_t = 1)]
    pub nats_kv_replicas: usize,
    /// How long a worker-id lease lasts without renewal (a dead broker's ids free up after this).
    #[arg(long, env = "HERALD_WORKER_LEASE", default_value = "10s", value_parser = herald_common::duration::parse)]
    pub worker_lease: Duration,
}

impl ClusterArgs {
    /// The cluster to join, if any.
    pub fn config(&self) -> Option<ClusterConfig> {
        self.nats.as_ref().map(|urls| ClusterConfig {
            bucket: self.nats_bucket.clone(),
            subject_prefix: self.nats_subject_prefix.clone(),
            kv_replicas: self.nats_kv_replicas.max(1),
            lease_ttl: self.worker_lease,
            ..ClusterConfig::new(urls.clone())
        })
    }
}

#[derive(Debug, Args)]
pub struct WsArgs {
    /// Address WebSocket clients connect to.
    #[arg(long, env = "HERALD_WS_LISTEN", default_value = "127.0.0.1:4236")]
    pub listen: SocketAddr,
    /// Address of the admin endpoints (/metrics, /healthz, /readyz).
    #[arg(long, env = "HERALD_WS_ADMIN_LISTEN", default_value = "127.0.0.1:4238")]
    pub admin_listen: SocketAddr,
    /// Broker addresses, comma-separated; the gateway fails over between them.
    #[arg(long = "broker", env = "HERALD_BROKERS", default_value = "127.0.0.1:2206")]
    pub brokers: String,
    /// Let several gateway processes listen on the same address (SO_REUSEPORT).
    #[arg(long, env = "HERALD_WS_REUSE_PORT")]
    pub reuse_port: bool,
    #[command(flatten)]
    pub key: ApiKeyArg,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub ws: WsOptions,
}

#[derive(Debug, Args)]
pub struct HttpArgs {
    /// Address of the HTTP publish API.
    #[arg(long, env = "HERALD_HTTP_LISTEN", default_value = "127.0.0.1:4237")]
    pub listen: SocketAddr,
    /// Address of the admin endpoints (/metrics, /healthz, /readyz).
    #[arg(long, env = "HERALD_HTTP_ADMIN_LISTEN", default_value = "127.0.0.1:4239")]
    pub admin_listen: SocketAddr,
    /// Broker addresses, comma-separated; publishes fail over between them.
    #[arg(long = "broker", env = "HERALD_BROKERS", default_value = "127.0.0.1:2206")]
    pub brokers: String,
    #[command(flatten)]
    pub auth: PublisherAuthArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub content: ContentArgs,
    #[command(flatten)]
    pub http: HttpOptions,
}

#[derive(Debug, Args)]
pub struct StandaloneArgs {
    /// Address of the broker's gRPC service.
    #[arg(long, env = "HERALD_BROKER_LISTEN", default_value = "127.0.0.1:2206")]
    pub broker_listen: SocketAddr,
    /// Address WebSocket clients connect to.
    #[arg(long, env = "HERALD_WS_LISTEN", default_value = "127.0.0.1:4236")]
    pub ws_listen: SocketAddr,
    /// Address of the HTTP publish API.
    #[arg(long, env = "HERALD_HTTP_LISTEN", default_value = "127.0.0.1:4237")]
    pub http_listen: SocketAddr,
    /// Address of the admin endpoints (/metrics, /healthz, /readyz).
    #[arg(long, env = "HERALD_ADMIN_LISTEN", default_value = "127.0.0.1:4238")]
    pub admin_listen: SocketAddr,
    #[command(flatten)]
    pub auth: PublisherAuthArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub content: ContentArgs,
    #[command(flatten)]
    pub broker: BrokerOptions,
    #[command(flatten)]
    pub ws: WsOptions,
    #[command(flatten)]
    pub http: HttpOptions,
}

#[derive(Debug, Args)]
pub struct ApiKeyArg {
    /// Shared secret(s), comma-separated (16+ printable characters each). Publishers must send
    /// one as "Authorization: Bearer <key>" (HTTP) or "authorization" metadata (gRPC), and
    /// gateways present the first to their brokers.
    #[arg(long, env = "HERALD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

#[derive(Debug, Args)]
pub struct PublisherAuthArgs {
    #[command(flatten)]
    pub key: ApiKeyArg,
    /// Accept publishers without an API key on a non-loopback address.
    #[arg(long, env = "HERALD_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,
}

#[derive(Debug, Args)]
pub struct TlsArgs {
    /// PEM certificate chain: serve wss:// and HTTPS instead of ws:// and HTTP.
    #[arg(long, env = "HERALD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "HERALD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl TlsArgs {
    /// An acceptor offering `alpn`, when a certificate is configured.
    pub fn acceptor(&self, alpn: &[&[u8]]) -> Result<Option<TlsAcceptor>, TlsError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => herald_common::tls::acceptor(cert, key, alpn).map(Some),
            _ => Ok(None),
        }
    }
}

#[derive(Debug, Args)]
pub struct ContentArgs {
    /// Largest message content accepted for publishing, in bytes.
    #[arg(long, env = "HERALD_MAX_CONTENT_BYTES", default_value_t = 64 * 1024)]
    pub max_content_bytes: usize,
}

#[derive(Debug, Args)]
pub struct BrokerOptions {
    /// Most messages in one batch publish.
    #[arg(long, env = "HERALD_MAX_BATCH", default_value_t = 1000)]
    pub max_batch: usize,
    /// Most channels one subscriber session may listen on.
    #[arg(long, env = "HERALD_MAX_CHANNELS_PER_SESSION", default_value_t = 1024)]
    pub max_channels_per_session: usize,
    /// Most subscriber sessions (gateways and other subscribers) at once.
    #[arg(long, env = "HERALD_MAX_SESSIONS", default_value_t = 10_000)]
    pub max_sessions: usize,
    /// Events queued per subscriber session before publishers wait.
    #[arg(long, env = "HERALD_SESSION_QUEUE", default_value_t = 16 * 1024)]
    pub session_queue: usize,
    /// How long publishers wait on a full session queue before evicting the session (e.g. 2s, 500ms).
    #[arg(long, env = "HERALD_SLOW_SESSION_GRACE", default_value = "2s", value_parser = herald_common::duration::parse)]
    pub slow_session_grace: Duration,
    /// Most concurrent gRPC calls on one connection to the broker.
    #[arg(long, env = "HERALD_MAX_CONCURRENT_STREAMS", default_value_t = 1024)]
    pub max_concurrent_streams: u32,
}

#[derive(Debug, Args)]
pub struct WsOptions {
    /// This gateway's worker id, unique in the cluster ([A-Za-z0-9._-], up to 64). Random when unset.
    #[arg(long, env = "HERALD_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Greeting sent to each new connection.
    #[arg(long, env = "HERALD_GREETING", value_enum, default_value_t = GreetingArg::Text)]
    pub greeting: GreetingArg,
    /// Most WebSocket connections at once; more are refused with HTTP 503.
    #[arg(long, env = "HERALD_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,
    /// Largest message a client may send, in bytes (larger: close 1009).
    #[arg(long, env = "HERALD_MAX_CLIENT_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_client_message_bytes: usize,
    /// Bytes queued for one connection before it is closed as too slow (close 1008).
    #[arg(long, env = "HERALD_OUTBOX_LIMIT_BYTES", default_value_t = 1024 * 1024)]
    pub outbox_limit_bytes: usize,
    /// Longest time a batch of frames may take to write before the client is closed as too slow.
    #[arg(long, env = "HERALD_WRITE_TIMEOUT", default_value = "10s", value_parser = herald_common::duration::parse)]
    pub write_timeout: Duration,
    /// Longest time a WebSocket handshake may take.
    #[arg(long, env = "HERALD_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = herald_common::duration::parse)]
    pub handshake_timeout: Duration,
    /// Browser origins allowed to connect, comma-separated (e.g. https://app.example.com);
    /// others get HTTP 403. Empty: any origin.
    #[arg(long, env = "HERALD_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// How often every connection is pinged (0s: never).
    #[arg(long, env = "HERALD_PING_INTERVAL", default_value = "25s", value_parser = herald_common::duration::parse)]
    pub ping_interval: Duration,
    /// How long past a ping a silent client is kept before it is closed (1008).
    #[arg(long, env = "HERALD_PONG_TIMEOUT", default_value = "10s", value_parser = herald_common::duration::parse)]
    pub pong_timeout: Duration,
    /// Per-connection read buffer, in bytes (allocated for every connection).
    #[arg(long, env = "HERALD_WS_READ_BUFFER_BYTES", default_value_t = 4096)]
    pub read_buffer_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GreetingArg {
    /// Worker ID:{worker_id} Connection ID:{connection_id} connected
    Text,
    /// {"type":"connected","worker_id":"…","connection_id":"…"}
    Json,
}

#[derive(Debug, Args)]
pub struct HttpOptions {
    /// Largest HTTP request body, in bytes.
    #[arg(long, env = "HERALD_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Longest time a client may take to send request headers; also the idle keep-alive timeout.
    #[arg(long, env = "HERALD_HEADER_READ_TIMEOUT", default_value = "30s", value_parser = herald_common::duration::parse)]
    pub header_read_timeout: Duration,
}

impl ContentArgs {
    pub fn hub_limits(&self, broker: &BrokerOptions) -> HubLimits {
        HubLimits {
            max_content_bytes: self.max_content_bytes,
            max_batch: broker.max_batch,
            max_channels_per_session: broker.max_channels_per_session,
            max_sessions: broker.max_sessions,
            session_queue: broker.session_queue.max(1),
            slow_session_grace: broker.slow_session_grace,
        }
    }

    pub fn http_config(&self, http: &HttpOptions, api_keys: ApiKeys) -> HttpConfig {
        HttpConfig {
            max_content_bytes: self.max_content_bytes,
            max_body_bytes: http.max_body_bytes,
            api_keys,
            server: HttpServerOptions { header_read_timeout: http.header_read_timeout, ..HttpServerOptions::default() },
        }
    }
}

impl ApiKeyArg {
    pub fn keys(&self) -> Result<ApiKeys, AuthConfigError> {
        ApiKeys::parse(self.api_key.as_deref())
    }
}

impl PublisherAuthArgs {
    /// The keys, once the publisher-facing `addrs` are known to be safe to serve with them.
    pub fn keys_for(&self, addrs: &[(&'static str, SocketAddr)]) -> Result<ApiKeys, AuthConfigError> {
        let keys = self.key.keys()?;
        for (what, addr) in addrs {
            keys.check_exposure(what, *addr, self.allow_unauthenticated)?;
        }
        Ok(keys)
    }
}

impl WsOptions {
    pub fn gateway_config(&self) -> GatewayConfig {
        let worker_id = self.worker_id.clone().unwrap_or_else(|| herald_common::token::random_token(8));
        GatewayConfig {
            greeting: match self.greeting {
                GreetingArg::Text => Greeting::Text,
                GreetingArg::Json => Greeting::Json,
            },
            max_connections: self.max_connections,
            max_message_bytes: self.max_client_message_bytes,
            outbox_limit_bytes: self.outbox_limit_bytes,
            write_timeout: self.write_timeout,
            handshake_timeout: self.handshake_timeout,
            read_buffer_bytes: self.read_buffer_bytes.max(256),
            allowed_origins: self
                .allowed_origins
                .iter()
                .map(|o| o.trim().to_owned())
                .filter(|o| !o.is_empty())
                .collect(),
            ping_interval: self.ping_interval,
            pong_timeout: self.pong_timeout,
            ..GatewayConfig::new(worker_id)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
