//! Command-line interface: one subcommand per role. Every option can also be
//! set from the environment (`HERALD_*`) or a TOML file ([`crate::config`]);
//! flags win over the environment, which wins over the file.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use herald_broker::backends::webhook::{self, Webhook, WebhookConfig, WebhookError};
use herald_broker::backends::{self, LogConfig};
use herald_broker::federation::nats::history::HistoryStorage;
use herald_broker::federation::nats::{self, NatsAccess, NatsConfig, NatsCredentials};
use herald_broker::server::DEFAULT_MAX_CONCURRENT_STREAMS;
use herald_broker::tls::ServerTls;
use herald_broker::{HubLimits, hub};
use herald_client::{BrokerTls, RemoteOptions};
use herald_common::auth::{ApiKeys, AuthConfigError};
use herald_common::duration::format as duration;
use herald_common::http::{DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_MAX_CONNECTIONS, HttpServerOptions};
use herald_common::http_client::Trust;
use herald_common::namespaces::{Namespace, NamespaceError, Namespaces};
use herald_common::tls::{Authority, ClientTls, TlsError};
use herald_gateway_http::HttpConfig;
use herald_gateway_ws::{
    ClientAuth, ClientAuthConfig, ConnectHookConfig, EventKinds, GatewayConfig, Greeting, HookDown,
};
use tokio_rustls::TlsAcceptor;

/// A loopback address: every listener's default, so that nothing is exposed
/// until asked for.
fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// The default broker address list of the gateways.
fn default_brokers() -> String {
    loopback(herald_broker::DEFAULT_PORT).to_string()
}

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
    Standalone(Box<StandaloneArgs>),
}

#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// Address of the broker's gRPC service.
    #[arg(long, env = "HERALD_BROKER_LISTEN", default_value_t = loopback(herald_broker::DEFAULT_PORT))]
    pub listen: SocketAddr,
    /// Address of the admin endpoints (/metrics, /healthz, /readyz).
    #[arg(long, env = "HERALD_BROKER_ADMIN_LISTEN", default_value_t = loopback(herald_broker::DEFAULT_ADMIN_PORT))]
    pub admin_listen: SocketAddr,
    #[command(flatten)]
    pub auth: PublisherAuthArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub client_ca: ClientCaArg,
    #[command(flatten)]
    pub content: ContentArgs,
    #[command(flatten)]
    pub broker: BrokerOptions,
    #[command(flatten)]
    pub namespaces: NamespaceArgs,
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
    #[arg(long, env = "HERALD_NATS_BUCKET", default_value = nats::DEFAULT_BUCKET)]
    pub nats_bucket: String,
    /// NATS subject prefix of channel messages.
    #[arg(long, env = "HERALD_NATS_SUBJECT_PREFIX", default_value = nats::DEFAULT_SUBJECT_PREFIX)]
    pub nats_subject_prefix: String,
    /// Replicas of the lease bucket (in a clustered NATS).
    #[arg(long, env = "HERALD_NATS_KV_REPLICAS", default_value_t = nats::DEFAULT_KV_REPLICAS)]
    pub nats_kv_replicas: usize,
    /// How long a worker-id lease lasts without renewal (a dead broker's ids free up after this).
    #[arg(long, env = "HERALD_WORKER_LEASE", default_value = duration(nats::DEFAULT_LEASE_TTL),
          value_parser = herald_common::duration::parse)]
    pub worker_lease: Duration,
    /// Back on NATS after losing it, how long publishes bound for other brokers are refused
    /// (UNAVAILABLE, for publishers to retry) while the brokers heard before are not back yet;
    /// one still silent after this is presumed gone.
    #[arg(long, env = "HERALD_REJOIN_WAIT", default_value = duration(nats::DEFAULT_REJOIN_WAIT),
          value_parser = herald_common::duration::parse)]
    pub rejoin_wait: Duration,
    /// Where the JetStream streams of channel history live: `file` survives a NATS restart;
    /// `memory` does not (clients then cannot recover, and are told so).
    #[arg(long, env = "HERALD_HISTORY_STORAGE", value_enum, default_value_t = HistoryStorageArg::File)]
    pub history_storage: HistoryStorageArg,
    /// PEM CA certificate(s) the NATS servers' certificates must chain to: reach NATS over TLS only.
    #[arg(long, env = "HERALD_NATS_CA", requires = "nats")]
    pub nats_ca: Option<PathBuf>,
    /// PEM certificate chain presented to NATS servers that verify clients (needs --nats-ca).
    #[arg(long, env = "HERALD_NATS_CERT", requires_all = ["nats_key", "nats_ca"])]
    pub nats_cert: Option<PathBuf>,
    /// PEM private key of --nats-cert.
    #[arg(long, env = "HERALD_NATS_KEY", requires = "nats_cert")]
    pub nats_key: Option<PathBuf>,
    /// NATS credentials file (user JWT and NKey seed, as `nsc` writes them).
    #[arg(long, env = "HERALD_NATS_CREDS", requires = "nats", conflicts_with_all = ["nats_user", "nats_token"])]
    pub nats_creds: Option<PathBuf>,
    /// NATS user name (with --nats-password).
    #[arg(long, env = "HERALD_NATS_USER", requires_all = ["nats", "nats_password"], conflicts_with = "nats_token")]
    pub nats_user: Option<String>,
    /// NATS password of --nats-user.
    #[arg(long, env = "HERALD_NATS_PASSWORD", requires = "nats_user", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// NATS authentication token.
    #[arg(long, env = "HERALD_NATS_TOKEN", requires = "nats", hide_env_values = true)]
    pub nats_token: Option<String>,
    /// Send a NATS password or token over plaintext to a server that is not on this machine.
    #[arg(long, env = "HERALD_ALLOW_PLAINTEXT_SECRETS")]
    pub allow_plaintext_secrets: bool,
}

/// Why the NATS TLS or credential options cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NatsAccessError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot read --nats-creds {path}: {source}")]
    ReadCreds { path: PathBuf, source: std::io::Error },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HistoryStorageArg {
    File,
    Memory,
}

impl ClusterArgs {
    /// The cluster to join, if any, keeping the history of `namespaces`;
    /// fails when a TLS or credentials file is wrong.
    pub fn nats_config(&self, namespaces: Namespaces) -> Result<Option<NatsConfig>, NatsAccessError> {
        let Some(urls) = &self.nats else { return Ok(None) };
        Ok(Some(NatsConfig { access: self.nats_access()?, ..self.nats_settings(urls, namespaces) }))
    }

    fn nats_access(&self) -> Result<NatsAccess, NatsAccessError> {
        let tls = match &self.nats_ca {
            Some(ca) => {
                let identity = self.nats_cert.as_deref().zip(self.nats_key.as_deref());
                Some(ClientTls::load(ca, identity)?.client_config()?)
            }
            None => None,
        };
        let credentials = if let Some(path) = &self.nats_creds {
            let text = std::fs::read_to_string(path)
                .map_err(|source| NatsAccessError::ReadCreds { path: path.clone(), source })?;
            NatsCredentials::Creds(text)
        } else if let (Some(user), Some(password)) = (&self.nats_user, &self.nats_password) {
            NatsCredentials::UserPassword { user: user.clone(), password: password.clone() }
        } else if let Some(token) = &self.nats_token {
            NatsCredentials::Token(token.clone())
        } else {
            NatsCredentials::None
        };
        Ok(NatsAccess { tls, credentials, allow_plaintext_secrets: self.allow_plaintext_secrets })
    }

    fn nats_settings(&self, urls: &str, namespaces: Namespaces) -> NatsConfig {
        NatsConfig {
            bucket: self.nats_bucket.clone(),
            subject_prefix: self.nats_subject_prefix.clone(),
            kv_replicas: self.nats_kv_replicas,
            lease_ttl: self.worker_lease,
            rejoin_wait: self.rejoin_wait,
            namespaces,
            history_storage: match self.history_storage {
                HistoryStorageArg::File => HistoryStorage::File,
                HistoryStorageArg::Memory => HistoryStorage::Memory,
            },
            ..NatsConfig::new(urls.to_owned())
        }
    }
}

#[derive(Debug, Args)]
pub struct WsArgs {
    /// Address WebSocket clients connect to.
    #[arg(long, env = "HERALD_WS_LISTEN", default_value_t = loopback(herald_gateway_ws::DEFAULT_PORT))]
    pub listen: SocketAddr,
    /// Address of the admin endpoints (/metrics, /healthz, /readyz).
    #[arg(long, env = "HERALD_WS_ADMIN_LISTEN", default_value_t = loopback(herald_gateway_ws::DEFAULT_ADMIN_PORT))]
    pub admin_listen: SocketAddr,
    /// Broker addresses, comma-separated; the gateway fails over between them.
    #[arg(long = "broker", env = "HERALD_BROKERS", default_value_t = default_brokers())]
    pub brokers: String,
    /// Let several gateway processes listen on the same address (SO_REUSEPORT).
    #[arg(long, env = "HERALD_WS_REUSE_PORT")]
    pub reuse_port: bool,
    #[command(flatten)]
    pub key: ApiKeyArg,
    #[command(flatten)]
    pub link: BrokerLinkArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub ws: WsOptions,
    #[command(flatten)]
    pub namespaces: NamespaceArgs,
}

#[derive(Debug, Args)]
pub struct HttpArgs {
    /// Address of the HTTP publish API.
    #[arg(long, env = "HERALD_HTTP_LISTEN", default_value_t = loopback(herald_gateway_http::DEFAULT_PORT))]
    pub listen: SocketAddr,
    /// Address of the admin endpoints (/metrics, /healthz, /readyz).
    #[arg(long, env = "HERALD_HTTP_ADMIN_LISTEN", default_value_t = loopback(herald_gateway_http::DEFAULT_ADMIN_PORT))]
    pub admin_listen: SocketAddr,
    /// Broker addresses, comma-separated; publishes fail over between them.
    #[arg(long = "broker", env = "HERALD_BROKERS", default_value_t = default_brokers())]
    pub brokers: String,
    #[command(flatten)]
    pub auth: PublisherAuthArgs,
    #[command(flatten)]
    pub link: BrokerLinkArgs,
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
    #[arg(long, env = "HERALD_BROKER_LISTEN", default_value_t = loopback(herald_broker::DEFAULT_PORT))]
    pub broker_listen: SocketAddr,
    /// Address WebSocket clients connect to.
    #[arg(long, env = "HERALD_WS_LISTEN", default_value_t = loopback(herald_gateway_ws::DEFAULT_PORT))]
    pub ws_listen: SocketAddr,
    /// Address of the HTTP publish API.
    #[arg(long, env = "HERALD_HTTP_LISTEN", default_value_t = loopback(herald_gateway_http::DEFAULT_PORT))]
    pub http_listen: SocketAddr,
    /// Address of the admin endpoints (/metrics, /healthz, /readyz).
    #[arg(long, env = "HERALD_ADMIN_LISTEN", default_value_t = loopback(herald_gateway_ws::DEFAULT_ADMIN_PORT))]
    pub admin_listen: SocketAddr,
    #[command(flatten)]
    pub auth: PublisherAuthArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub client_ca: ClientCaArg,
    #[command(flatten)]
    pub content: ContentArgs,
    #[command(flatten)]
    pub broker: BrokerOptions,
    #[command(flatten)]
    pub ws: WsOptions,
    #[command(flatten)]
    pub namespaces: NamespaceArgs,
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
    /// PEM certificate chain: serve TLS on the role's listeners (wss://, HTTPS, gRPC) instead of
    /// plaintext. The admin port stays plaintext.
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

    /// TLS of the broker's gRPC port, mutual when `client_ca` names a CA.
    pub fn grpc(&self, client_ca: &ClientCaArg) -> Result<Option<ServerTls>, TlsError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => ServerTls::load(cert, key, client_ca.tls_client_ca.as_deref()).map(Some),
            _ => Ok(None),
        }
    }
}

#[derive(Debug, Args)]
pub struct ClientCaArg {
    /// PEM CA certificate(s): every gRPC caller of the broker (gateways, publishers, backends)
    /// must present a certificate signed by one (mutual TLS). Needs --tls-cert.
    #[arg(long, env = "HERALD_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

/// How a gateway reaches its brokers.
#[derive(Debug, Args)]
pub struct BrokerLinkArgs {
    /// PEM CA certificate(s) the brokers' certificates must chain to: reach brokers over TLS only.
    #[arg(long, env = "HERALD_BROKER_CA")]
    pub broker_ca: Option<PathBuf>,
    /// PEM certificate chain presented to brokers that require client certificates
    /// (--tls-client-ca on the broker). Needs --broker-ca.
    #[arg(long, env = "HERALD_BROKER_CERT", requires_all = ["broker_key", "broker_ca"])]
    pub broker_cert: Option<PathBuf>,
    /// PEM private key of --broker-cert.
    #[arg(long, env = "HERALD_BROKER_KEY", requires = "broker_cert")]
    pub broker_key: Option<PathBuf>,
    /// The name the brokers' certificates are checked against (default: each address's host).
    #[arg(long, env = "HERALD_BROKER_TLS_NAME", requires = "broker_ca")]
    pub broker_tls_name: Option<String>,
    /// Send the API key over plaintext to brokers that are not on this machine.
    #[arg(long, env = "HERALD_ALLOW_PLAINTEXT_SECRETS")]
    pub allow_plaintext_secrets: bool,
}

impl BrokerLinkArgs {
    /// How to call the brokers, presenting `api_key`; fails when a TLS file is wrong.
    pub fn remote_options(&self, api_key: Option<&str>) -> Result<RemoteOptions, TlsError> {
        let tls = match &self.broker_ca {
            Some(ca) => {
                let identity = self.broker_cert.as_deref().zip(self.broker_key.as_deref());
                let files = ClientTls::load(ca, identity)?;
                Some(BrokerTls {
                    ca_pem: files.authority.pem,
                    identity: files.identity.map(|identity| (identity.cert_pem, identity.key_pem)),
                    server_name: self.broker_tls_name.clone(),
                })
            }
            None => None,
        };
        Ok(RemoteOptions {
            api_key: api_key.map(str::to_owned),
            tls,
            allow_plaintext_key: self.allow_plaintext_secrets,
            ..RemoteOptions::default()
        })
    }
}

#[derive(Debug, Args)]
pub struct ContentArgs {
    /// Largest message content accepted for publishing, in bytes.
    #[arg(long, env = "HERALD_MAX_CONTENT_BYTES", default_value_t = herald_proto::DEFAULT_MAX_CONTENT_BYTES)]
    pub max_content_bytes: usize,
}

#[derive(Debug, Args)]
pub struct BrokerOptions {
    /// Most messages in one batch publish, and most controls in one batch of controls.
    #[arg(long, env = "HERALD_MAX_BATCH", default_value_t = hub::DEFAULT_MAX_BATCH)]
    pub max_batch: usize,
    /// Most channels one subscriber session may listen on.
    #[arg(long, env = "HERALD_MAX_CHANNELS_PER_SESSION", default_value_t = hub::DEFAULT_MAX_CHANNELS_PER_SESSION)]
    pub max_channels_per_session: usize,
    /// Most subscriber sessions (gateways and other subscribers) at once.
    #[arg(long, env = "HERALD_MAX_SESSIONS", default_value_t = hub::DEFAULT_MAX_SESSIONS)]
    pub max_sessions: usize,
    /// Events queued per subscriber session before publishers wait.
    #[arg(long, env = "HERALD_SESSION_QUEUE", default_value_t = hub::DEFAULT_SESSION_QUEUE)]
    pub session_queue: usize,
    /// How long publishers wait on a full session queue before evicting the session (e.g. 2s, 500ms).
    #[arg(long, env = "HERALD_SLOW_SESSION_GRACE", default_value = duration(hub::DEFAULT_SLOW_SESSION_GRACE),
          value_parser = herald_common::duration::parse)]
    pub slow_session_grace: Duration,
    /// After start, refuse publishes (UNAVAILABLE, HTTP 503) this long, so that the gateways
    /// of a restarted broker are back before a publish is taken as routed [default: 3s for
    /// `herald broker`, 0s for `herald standalone`, whose gateway is in-process].
    #[arg(long, env = "HERALD_STARTUP_GRACE", value_parser = herald_common::duration::parse)]
    pub startup_grace: Option<Duration>,
    /// How long a publish's idempotency key is remembered: a publish with a key seen within
    /// this window is answered as a duplicate and not routed again.
    #[arg(long, env = "HERALD_DEDUP_WINDOW", default_value = duration(hub::DEFAULT_DEDUP_WINDOW),
          value_parser = herald_common::duration::parse)]
    pub dedup_window: Duration,
    /// Most idempotency keys remembered at once (past it the oldest are forgotten early).
    #[arg(long, env = "HERALD_DEDUP_CAPACITY", default_value_t = hub::DEFAULT_DEDUP_CAPACITY)]
    pub dedup_capacity: usize,
    /// Most concurrent gRPC calls on one connection to the broker.
    #[arg(long, env = "HERALD_MAX_CONCURRENT_STREAMS", default_value_t = DEFAULT_MAX_CONCURRENT_STREAMS)]
    pub max_concurrent_streams: u32,
    /// How long a control waits for the gateways to confirm it (then DEADLINE_EXCEEDED, or the
    /// gateway listed in missing_workers), and a query or a publish to a connection on another
    /// broker waits for the other brokers.
    #[arg(long, env = "HERALD_ANSWER_TIMEOUT", default_value = duration(hub::DEFAULT_ANSWER_TIMEOUT),
          value_parser = herald_common::duration::parse)]
    pub answer_timeout: Duration,
    /// Connection events kept per consumer group (ConsumeEvents, webhooks); past it a group's
    /// oldest are dropped (counted in herald_events_dropped_total).
    #[arg(long, env = "HERALD_EVENT_RETENTION", default_value_t = backends::DEFAULT_RETENTION)]
    pub event_retention: usize,
    /// How long connection events are kept for consumer groups.
    #[arg(long, env = "HERALD_EVENT_MAX_AGE", default_value = duration(backends::DEFAULT_MAX_AGE),
          value_parser = herald_common::duration::parse)]
    pub event_max_age: Duration,
    /// How long a delivered event waits for its acknowledgement before it is delivered again.
    #[arg(long, env = "HERALD_EVENT_ACK_WAIT", default_value = duration(backends::DEFAULT_ACK_WAIT),
          value_parser = herald_common::duration::parse)]
    pub event_ack_wait: Duration,
    /// How long a gateway's session may be gone, not back on any broker, before the disconnects
    /// of its connections are reported for it (cause GATEWAY_LOST).
    #[arg(long, env = "HERALD_GATEWAY_LOST_GRACE", default_value = duration(backends::DEFAULT_GATEWAY_GRACE),
          value_parser = herald_common::duration::parse)]
    pub gateway_lost_grace: Duration,
    /// POST connection events to this URL (http:// or https://), signed with --webhook-secret.
    #[arg(long, env = "HERALD_WEBHOOK_URL", requires = "webhook_secret")]
    pub webhook_url: Option<String>,
    /// PEM CA certificate(s) an https:// webhook's certificate must chain to (default: the
    /// system's CA certificates).
    #[arg(long, env = "HERALD_WEBHOOK_CA", requires = "webhook_url")]
    pub webhook_ca: Option<PathBuf>,
    /// Secret of the webhook's HMAC-SHA256 signature (Herald-Signature header), 16+ characters.
    #[arg(long, env = "HERALD_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// The consumer group the webhook consumes (shared by every broker's webhook).
    #[arg(long, env = "HERALD_WEBHOOK_GROUP", default_value = webhook::DEFAULT_GROUP)]
    pub webhook_group: String,
    /// Most events in one webhook POST.
    #[arg(long, env = "HERALD_WEBHOOK_BATCH", default_value_t = webhook::DEFAULT_BATCH)]
    pub webhook_batch: usize,
    /// How long one webhook POST may take.
    #[arg(long, env = "HERALD_WEBHOOK_TIMEOUT", default_value = duration(webhook::DEFAULT_TIMEOUT),
          value_parser = herald_common::duration::parse)]
    pub webhook_timeout: Duration,
    /// Attempts at one webhook batch (with backoff) before it waits for the ack wait to come again.
    #[arg(long, env = "HERALD_WEBHOOK_ATTEMPTS", default_value_t = webhook::DEFAULT_ATTEMPTS)]
    pub webhook_attempts: u32,
}

impl BrokerOptions {
    /// The webhook, when one is configured.
    pub fn webhook(&self) -> Result<Option<Webhook>, WebhookError> {
        let (Some(url), Some(secret)) = (&self.webhook_url, &self.webhook_secret) else {
            return Ok(None);
        };
        Webhook::new(WebhookConfig {
            url: url.clone(),
            trust: trust(self.webhook_ca.as_deref())?,
            secret: secret.clone(),
            group: self.webhook_group.clone(),
            batch: self.webhook_batch,
            timeout: self.webhook_timeout,
            attempts: self.webhook_attempts,
        })
        .map(Some)
    }
}

#[derive(Debug, Args)]
pub struct WsOptions {
    /// This gateway's worker id, unique in the cluster ([A-Za-z0-9._-], up to 64). Random when unset.
    #[arg(long, env = "HERALD_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Greeting sent to each new connection.
    #[arg(long, env = "HERALD_GREETING", value_enum, default_value_t = GreetingArg::Text)]
    pub greeting: GreetingArg,
    /// Connection events reported to the backends (ConsumeEvents, webhooks): all, none, or a
    /// comma-separated list of connect,disconnect,subscribe,unsubscribe,message.
    #[arg(long, env = "HERALD_EVENTS", default_value = "none", value_parser = EventKinds::parse)]
    pub events: EventKinds,
    /// Handshake headers passed on in connect events, comma-separated (e.g. user-agent,origin).
    #[arg(long, env = "HERALD_EVENT_HEADERS", value_delimiter = ',')]
    pub event_headers: Vec<String>,
    /// Connection events queued for the broker before new ones are dropped (counted).
    #[arg(long, env = "HERALD_EVENT_QUEUE", default_value_t = herald_gateway_ws::DEFAULT_EVENT_QUEUE)]
    pub event_queue: usize,
    /// Ask this HTTP endpoint (http:// or https://) whether each new connection may open, and
    /// who is on it.
    #[arg(long, env = "HERALD_CONNECT_HOOK", conflicts_with = "client_auth")]
    pub connect_hook: Option<String>,
    /// PEM CA certificate(s) an https:// connect hook's certificate must chain to (default: the
    /// system's CA certificates).
    #[arg(long, env = "HERALD_CONNECT_HOOK_CA", requires = "connect_hook")]
    pub connect_hook_ca: Option<PathBuf>,
    /// How long the connect hook may take.
    #[arg(long, env = "HERALD_CONNECT_HOOK_TIMEOUT",
          default_value = duration(herald_gateway_ws::DEFAULT_CONNECT_HOOK_TIMEOUT),
          value_parser = herald_common::duration::parse)]
    pub connect_hook_timeout: Duration,
    /// What to do when the connect hook cannot be asked: refuse (HTTP 503) or anonymous (let in).
    #[arg(long, env = "HERALD_CONNECT_HOOK_DOWN", value_enum, default_value_t = HookDownArg::Refuse)]
    pub connect_hook_down: HookDownArg,
    /// Most messages (data frames or commands) one client may send per second; past it the
    /// connection is closed with 1008. 0: no limit.
    #[arg(long, env = "HERALD_MAX_CLIENT_MESSAGES_PER_SECOND", default_value_t = 0)]
    pub max_client_messages_per_second: u32,
    /// How long a client's rpc waits for a backend's answer (then error 504).
    #[arg(long, env = "HERALD_RPC_TIMEOUT", default_value = duration(herald_gateway_ws::DEFAULT_RPC_TIMEOUT),
          value_parser = herald_common::duration::parse)]
    pub rpc_timeout: Duration,
    /// Most WebSocket connections at once; more are refused with HTTP 503.
    #[arg(long, env = "HERALD_MAX_CONNECTIONS", default_value_t = herald_gateway_ws::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Largest message a client may send, in bytes (larger: close 1009).
    #[arg(long, env = "HERALD_MAX_CLIENT_MESSAGE_BYTES", default_value_t = herald_gateway_ws::DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_client_message_bytes: usize,
    /// Bytes queued for one connection before it is closed as too slow (close 1008).
    #[arg(long, env = "HERALD_OUTBOX_LIMIT_BYTES", default_value_t = herald_gateway_ws::DEFAULT_OUTBOX_LIMIT_BYTES)]
    pub outbox_limit_bytes: usize,
    /// Longest time a batch of frames may take to write before the client is closed as too slow.
    #[arg(long, env = "HERALD_WRITE_TIMEOUT", default_value = duration(herald_gateway_ws::DEFAULT_WRITE_TIMEOUT),
          value_parser = herald_common::duration::parse)]
    pub write_timeout: Duration,
    /// Longest time a WebSocket handshake may take.
    #[arg(long, env = "HERALD_HANDSHAKE_TIMEOUT", default_value = duration(herald_gateway_ws::DEFAULT_HANDSHAKE_TIMEOUT),
          value_parser = herald_common::duration::parse)]
    pub handshake_timeout: Duration,
    /// Browser origins allowed to connect, comma-separated (e.g. https://app.example.com);
    /// others get HTTP 403. Empty: any origin.
    #[arg(long, env = "HERALD_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// With --allowed-origins, still accept upgrades that carry no Origin header (non-browser
    /// clients); without this they get HTTP 403.
    #[arg(long, env = "HERALD_ALLOW_MISSING_ORIGIN")]
    pub allow_missing_origin: bool,
    /// How often every connection is pinged (0s: never).
    #[arg(long, env = "HERALD_PING_INTERVAL", default_value = duration(herald_gateway_ws::DEFAULT_PING_INTERVAL),
          value_parser = herald_common::duration::parse)]
    pub ping_interval: Duration,
    /// How long past a ping a silent client is kept before it is closed (1008).
    #[arg(long, env = "HERALD_PONG_TIMEOUT", default_value = duration(herald_gateway_ws::DEFAULT_PONG_TIMEOUT),
          value_parser = herald_common::duration::parse)]
    pub pong_timeout: Duration,
    /// Most distinct client channels with a subscriber on this gateway; a subscription that
    /// would open one more is refused (429), so that clients cannot make broker interest
    /// without bound.
    #[arg(long, env = "HERALD_MAX_CLIENT_CHANNELS", default_value_t = herald_gateway_ws::DEFAULT_MAX_CLIENT_CHANNELS)]
    pub max_client_channels: usize,
    #[command(flatten)]
    pub client_auth: Box<ClientAuthArgs>,
}

/// The client channel namespaces: gateways read who may subscribe and
/// publish, brokers how much history the channels keep.
#[derive(Debug, Args)]
pub struct NamespaceArgs {
    /// A client channel namespace, repeatable: `<name>[:subscribe=anyone|users|listed|token]
    /// [,publish=nobody|subscribers][,presence=on|off][,join_leave=on|off][,history=<size>]
    /// [,history_ttl=<duration>][,recover=on|off]` (defaults: users, nobody, off, off, 0 (no history), 5m,
    /// on). Clients
    /// speaking the herald.json.v1 subprotocol subscribe to `<name>:<channel>`; with none, to
    /// nothing. Give brokers and gateways the same list.
    #[arg(long = "namespace", env = "HERALD_NAMESPACES", value_delimiter = ';',
          value_parser = |s: &str| Namespace::parse(s).map_err(|e| e.to_string()))]
    pub namespaces: Vec<Namespace>,
}

impl NamespaceArgs {
    pub fn namespaces(&self) -> Result<Namespaces, NamespaceError> {
        Namespaces::new(self.namespaces.clone())
    }
}

/// Who may open a WebSocket connection.
#[derive(Debug, Args)]
pub struct ClientAuthArgs {
    /// `jwt`: every WebSocket handshake must carry a valid JWT (`Authorization: Bearer <jwt>`,
    /// or `?token=<jwt>` from browsers), else HTTP 401; its `sub` is the connection's user id.
    /// `none`: connections are anonymous.
    #[arg(long, env = "HERALD_CLIENT_AUTH", value_enum, default_value_t = ClientAuthMode::None)]
    pub client_auth: ClientAuthMode,
    /// HS256 secrets, comma-separated (any of them may have signed a token, for rotation; at
    /// least 32 bytes each).
    #[arg(long, env = "HERALD_JWT_SECRET", value_delimiter = ',', hide_env_values = true)]
    pub jwt_secret: Vec<String>,
    /// PEM files of the public keys that may sign tokens, comma-separated: RSA keys for RS256,
    /// EC P-256 keys for ES256.
    #[arg(long, env = "HERALD_JWT_PUBLIC_KEY", value_delimiter = ',')]
    pub jwt_public_key: Vec<PathBuf>,
    /// The `aud` a token must carry (unchecked when unset).
    #[arg(long, env = "HERALD_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// The `iss` a token must carry (unchecked when unset).
    #[arg(long, env = "HERALD_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// The claim listing the groups a connection joins when it opens (an array of strings).
    #[arg(long, env = "HERALD_JWT_GROUPS_CLAIM", default_value = herald_gateway_ws::client_auth::DEFAULT_GROUPS_CLAIM)]
    pub jwt_groups_claim: String,
    /// Clock skew allowed when checking a token's `exp` and `nbf`.
    #[arg(long, env = "HERALD_JWT_LEEWAY", default_value = "0s", value_parser = herald_common::duration::parse)]
    pub jwt_leeway: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ClientAuthMode {
    /// Anonymous connections.
    None,
    /// A JWT at every handshake.
    Jwt,
}

/// Why the client-auth options cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ClientAuthArgsError {
    #[error("--jwt-secret or --jwt-public-key is given without --client-auth jwt: connections would stay anonymous")]
    KeysWithoutJwt,
    #[error("cannot read --jwt-public-key {path}: {source}")]
    ReadKey { path: PathBuf, source: std::io::Error },
    #[error("--client-auth jwt: {0}")]
    Invalid(#[from] herald_gateway_ws::ClientAuthError),
    #[error("--connect-hook-ca: {0}")]
    ConnectHookCa(#[from] TlsError),
}

/// Whom an https:// endpoint herald calls must be vouched for by: the CA in
/// `ca`, or the system's CA certificates.
fn trust(ca: Option<&Path>) -> Result<Trust, TlsError> {
    Ok(match ca {
        Some(path) => Trust::Only(Authority::load(path)?.roots()),
        None => Trust::System,
    })
}

impl ClientAuthArgs {
    /// The token checker, when client auth is on.
    pub fn client_auth(&self) -> Result<Option<Arc<ClientAuth>>, ClientAuthArgsError> {
        if self.client_auth == ClientAuthMode::None {
            if !self.jwt_secret.is_empty() || !self.jwt_public_key.is_empty() {
                return Err(ClientAuthArgsError::KeysWithoutJwt);
            }
            return Ok(None);
        }
        let public_keys = self
            .jwt_public_key
            .iter()
            .map(|path| {
                std::fs::read_to_string(path)
                    .map(|pem| (path.clone(), pem))
                    .map_err(|source| ClientAuthArgsError::ReadKey { path: path.clone(), source })
            })
            .collect::<Result<_, _>>()?;
        let config = ClientAuthConfig {
            hs256_secrets: self.jwt_secret.iter().filter(|s| !s.is_empty()).cloned().collect(),
            public_keys,
            audience: self.jwt_audience.clone(),
            issuer: self.jwt_issuer.clone(),
            groups_claim: self.jwt_groups_claim.clone(),
            leeway: self.jwt_leeway,
        };
        Ok(Some(Arc::new(ClientAuth::new(config)?)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GreetingArg {
    /// Worker ID:{worker_id} Connection ID:{connection_id} connected
    Text,
    /// {"type":"connected","worker_id":"…","connection_id":"…"}
    Json,
    /// Nothing (for echo-style backends built on the event stream)
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HookDownArg {
    /// Refuse the connection with HTTP 503.
    Refuse,
    /// Let the connection in, anonymous.
    Anonymous,
}

#[derive(Debug, Args)]
pub struct HttpOptions {
    /// Largest HTTP request body, in bytes.
    #[arg(long, env = "HERALD_MAX_BODY_BYTES", default_value_t = herald_gateway_http::DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Longest time a client may take to send request headers; also the idle keep-alive timeout.
    #[arg(long, env = "HERALD_HEADER_READ_TIMEOUT", default_value = duration(DEFAULT_HEADER_READ_TIMEOUT),
          value_parser = herald_common::duration::parse)]
    pub header_read_timeout: Duration,
    /// Longest time from a request's headers to the end of its body (slower: HTTP 408).
    #[arg(long, env = "HERALD_REQUEST_TIMEOUT", default_value = duration(herald_gateway_http::DEFAULT_REQUEST_TIMEOUT),
          value_parser = herald_common::duration::parse)]
    pub request_timeout: Duration,
    /// Most HTTP connections at once (more: HTTP 503). Client connections of a process never
    /// take its last 128 open files, which stay free for the admin port and the broker links.
    #[arg(long, env = "HERALD_MAX_HTTP_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_http_connections: usize,
}

impl ContentArgs {
    /// The broker's limits (content from here, the rest from `broker`);
    /// `startup_grace` applies unless the command line sets one.
    pub fn hub_limits(&self, broker: &BrokerOptions, namespaces: Namespaces, startup_grace: Duration) -> HubLimits {
        HubLimits {
            namespaces,
            max_content_bytes: self.max_content_bytes,
            max_batch: broker.max_batch,
            max_channels_per_session: broker.max_channels_per_session,
            max_sessions: broker.max_sessions,
            session_queue: broker.session_queue,
            slow_session_grace: broker.slow_session_grace,
            startup_grace: broker.startup_grace.unwrap_or(startup_grace),
            dedup_window: broker.dedup_window,
            dedup_capacity: broker.dedup_capacity,
            answer_timeout: broker.answer_timeout,
            events: LogConfig {
                retention: broker.event_retention.max(1),
                max_age: broker.event_max_age,
                ack_wait: broker.event_ack_wait,
                gateway_grace: broker.gateway_lost_grace,
            },
        }
    }

    /// The HTTP gateway's configuration, with the keys its publishers present.
    pub fn http_config(&self, http: &HttpOptions, api_keys: ApiKeys) -> HttpConfig {
        HttpConfig {
            max_content_bytes: self.max_content_bytes,
            max_body_bytes: http.max_body_bytes,
            request_timeout: http.request_timeout,
            api_keys,
            server: HttpServerOptions {
                header_read_timeout: http.header_read_timeout,
                max_connections: http.max_http_connections,
                ..HttpServerOptions::default()
            },
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
    /// The gateway's configuration; fails when the client-auth options do.
    pub fn gateway_config(&self, namespaces: Namespaces) -> Result<GatewayConfig, ClientAuthArgsError> {
        let ws = self;
        let worker_id = ws.worker_id.clone().unwrap_or_else(|| herald_common::token::random_token(8));
        let connect_hook_trust = trust(ws.connect_hook_ca.as_deref())?;
        Ok(GatewayConfig {
            greeting: match ws.greeting {
                GreetingArg::Text => Greeting::Text,
                GreetingArg::Json => Greeting::Json,
                GreetingArg::None => Greeting::None,
            },
            events: ws.events,
            event_headers: ws.event_headers.clone(),
            event_queue: ws.event_queue,
            connect_hook: ws.connect_hook.clone().map(|url| ConnectHookConfig {
                url,
                trust: connect_hook_trust,
                timeout: ws.connect_hook_timeout,
                when_down: match ws.connect_hook_down {
                    HookDownArg::Refuse => HookDown::Refuse,
                    HookDownArg::Anonymous => HookDown::Anonymous,
                },
            }),
            rpc_timeout: ws.rpc_timeout,
            max_client_messages_per_second: ws.max_client_messages_per_second,
            max_connections: ws.max_connections,
            max_message_bytes: ws.max_client_message_bytes,
            outbox_limit_bytes: ws.outbox_limit_bytes,
            write_timeout: ws.write_timeout,
            handshake_timeout: ws.handshake_timeout,
            allowed_origins: ws.allowed_origins.clone(),
            allow_missing_origin: ws.allow_missing_origin,
            ping_interval: ws.ping_interval,
            pong_timeout: ws.pong_timeout,
            client_auth: ws.client_auth.client_auth()?,
            namespaces,
            max_client_channels: ws.max_client_channels,
            ..GatewayConfig::new(worker_id)
        })
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

    #[test]
    fn defaults_are_the_libraries_own() {
        let Role::Standalone(args) = Cli::parse_from(["herald", "standalone"]).role else { panic!() };
        assert_eq!(args.broker_listen, "127.0.0.1:2206".parse().unwrap());
        assert_eq!(args.ws_listen, "127.0.0.1:4236".parse().unwrap());
        assert_eq!(args.http_listen, "127.0.0.1:4237".parse().unwrap());
        let limits = args.content.hub_limits(&args.broker, Namespaces::default(), Duration::ZERO);
        let defaults = HubLimits::default();
        assert_eq!(
            (limits.max_content_bytes, limits.max_batch, limits.session_queue, limits.slow_session_grace),
            (defaults.max_content_bytes, defaults.max_batch, defaults.session_queue, defaults.slow_session_grace)
        );
        let gateway = args.ws.gateway_config(Namespaces::default()).unwrap();
        assert!(gateway.client_auth.is_none(), "connections are anonymous by default");
        let library = GatewayConfig::new(gateway.worker_id.clone());
        assert_eq!(
            (gateway.write_timeout, gateway.ping_interval, gateway.pong_timeout, gateway.max_message_bytes),
            (library.write_timeout, library.ping_interval, library.pong_timeout, library.max_message_bytes)
        );
        let Role::Broker(args) = Cli::parse_from(["herald", "broker", "--nats", "nats://127.0.0.1:4222"]).role else {
            panic!()
        };
        let nats = args.cluster.nats_config(Namespaces::default()).unwrap().unwrap();
        assert_eq!((nats.bucket.as_str(), nats.lease_ttl), (nats::DEFAULT_BUCKET, nats::DEFAULT_LEASE_TTL));
        assert_eq!(nats.rejoin_wait, nats::DEFAULT_REJOIN_WAIT);
    }

    #[test]
    fn a_ca_file_for_an_https_endpoint_that_cannot_be_read_is_named() {
        let Role::Standalone(args) = Cli::parse_from([
            "herald",
            "standalone",
            "--webhook-url",
            "https://hooks.example.test/in",
            "--webhook-secret",
            "0123456789abcdef",
            "--webhook-ca",
            "/nonexistent/webhook-ca.pem",
            "--connect-hook",
            "https://auth.example.test/in",
            "--connect-hook-ca",
            "/nonexistent/hook-ca.pem",
        ])
        .role
        else {
            panic!()
        };
        let webhook = args.broker.webhook().err().expect("no such CA file").to_string();
        assert!(webhook.starts_with("--webhook-ca: ") && webhook.contains("/nonexistent/webhook-ca.pem"), "{webhook}");
        let hook = args.ws.gateway_config(Namespaces::default()).expect_err("no such CA file").to_string();
        assert!(hook.starts_with("--connect-hook-ca: ") && hook.contains("/nonexistent/hook-ca.pem"), "{hook}");
    }
}
