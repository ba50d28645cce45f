//! Several brokers as one, bridged by NATS (no home-made clustering).
//!
//! - Each broker forwards what its publishers send to the NATS subject of
//!   the channel (`<prefix>.<channel>`) and subscribes to exactly the
//!   channels its own sessions listen on ([`bus`]). The connection is made
//!   with `no_echo`, so a broker never receives its own messages back: every
//!   subscriber gets each message once.
//! - Worker ids are leased in a JetStream key-value bucket ([`leases`]), so a
//!   worker id is held by one gateway in the whole cluster.
//! - Client channels with history are kept in JetStream streams that every
//!   broker reads ([`history`]).
//! - Connection events for backends are kept in a JetStream stream that
//!   every broker serves consumer groups from ([`events`]), and clients'
//!   calls reach the broker whose backends serve them ([`calls`]).
//! - While NATS is unreachable the broker is not ready: publishes and
//!   subscriptions are refused with `UNAVAILABLE`, never half-done. Back on
//!   NATS, it forwards nothing until the other brokers are back too
//!   ([`roster`]).
//! - The link to NATS may be TLS ([`NatsAccess::tls`]) and carry credentials;
//!   a password or token is never sent in clear off this machine unless
//!   allowed ([`NatsAccess::allow_plaintext_secrets`]).

mod bus;
mod calls;
mod confirm;
mod dedup;
pub mod events;
pub mod history;
mod leases;
mod roster;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv::Store;
use async_nats::{ConnectOptions, ServerAddr};
use async_trait::async_trait;
use herald_common::metrics::Exposition;
use herald_common::namespaces::Namespaces;
use herald_proto::v1::{CallAnswer, CallRequest, Event};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use self::bus::Change;
use self::calls::CallRouter;
use self::confirm::{Confirmations, confirm_forwards};
use self::dedup::Dedup;
use self::events::{EventsConfig, JetStreamEvents};
use self::history::{HistoryConfig, HistoryStorage, JetStreamHistory};
use self::leases::{Leases, fence_leases, maintain_leases};
use self::roster::{RollCall, call_the_roll};
use crate::backends::LogConfig;
use crate::backends::calls::CallFailure;
use crate::backends::log::EventLog;

use super::{Answer, Ask, AskError, ClaimError, Federation, FederationError, Forwarding, Gathered, Interest, Notice};

/// Key-value bucket holding worker-id leases, by default.
pub const DEFAULT_BUCKET: &str = "herald_workers";
/// Subject prefix of channel messages, by default.
pub const DEFAULT_SUBJECT_PREFIX: &str = "herald.ch";
/// Replicas of the lease bucket, by default.
pub const DEFAULT_KV_REPLICAS: usize = 1;
/// How long a worker-id lease lasts without renewal, by default.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// Key-value bucket holding recent idempotency keys, by default.
pub const DEFAULT_DEDUP_BUCKET: &str = "herald_dedup";
pub use self::roster::DEFAULT_REJOIN_WAIT;

/// The oldest NATS server whose key-value API herald's client speaks.
pub const MIN_NATS_VERSION: (u64, u64) = (2, 10);
/// How long joining waits for NATS to say which version it is.
const VERSION_CHECK_WAIT: Duration = Duration::from_secs(3);

/// Notices from NATS queued for the hub before the bus waits.
const NOTICE_QUEUE: usize = 64 * 1024;

/// How to join a cluster.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// NATS server URLs, comma-separated (`nats://host:4222,...`).
    pub urls: String,
    /// Key-value bucket holding worker-id leases.
    pub bucket: String,
    /// Subject prefix of the channels.
    pub subject_prefix: String,
    /// Replicas of the lease bucket in a NATS cluster (at least 1).
    pub kv_replicas: usize,
    /// How long a worker-id lease lasts without renewal.
    pub lease_ttl: Duration,
    /// Key-value bucket holding recent idempotency keys, for all brokers.
    pub dedup_bucket: String,
    /// How long an idempotency key is remembered.
    pub dedup_window: Duration,
    /// The client channel namespaces, for the history their channels keep.
    pub namespaces: Namespaces,
    /// Where that history lives (and the connection events).
    pub history_storage: HistoryStorage,
    /// How connection events are kept for consumer groups.
    pub events: LogConfig,
    /// TLS and credentials of the connection.
    pub access: NatsAccess,
    /// How long forwards wait for the other brokers after a reconnect.
    pub rejoin_wait: Duration,
}

/// How the broker proves itself to NATS, and over what.
#[derive(Clone, Default)]
pub struct NatsAccess {
    /// TLS with this configuration, required of every server.
    pub tls: Option<rustls::ClientConfig>,
    pub credentials: NatsCredentials,
    /// Send a password or token in clear to a server off this machine.
    pub allow_plaintext_secrets: bool,
}

impl std::fmt::Debug for NatsAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsAccess")
            .field("tls", &self.tls.is_some())
            .field("credentials", &self.credentials)
            .field("allow_plaintext_secrets", &self.allow_plaintext_secrets)
            .finish()
    }
}

/// The credentials presented to NATS.
#[derive(Clone, Default)]
pub enum NatsCredentials {
    /// None (or those in the URLs).
    #[default]
    None,
    /// The text of a `.creds` file (a user JWT and its NKey seed: the seed
    /// only signs the server's challenge, and never leaves the broker).
    Creds(String),
    UserPassword {
        user: String,
        password: String,
    },
    Token(String),
}

impl std::fmt::Debug for NatsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NatsCredentials::None => "None",
            NatsCredentials::Creds(_) => "Creds(..)",
            NatsCredentials::UserPassword { .. } => "UserPassword(..)",
            NatsCredentials::Token(_) => "Token(..)",
        })
    }
}

impl NatsCredentials {
    /// Whether these are sent to the server as they are (not a signature).
    fn sent_in_clear(&self) -> bool {
        matches!(self, NatsCredentials::UserPassword { .. } | NatsCredentials::Token(_))
    }

    fn apply(&self, options: ConnectOptions) -> Result<ConnectOptions, JoinError> {
        Ok(match self {
            NatsCredentials::None => options,
            NatsCredentials::Creds(text) => {
                options.credentials(text).map_err(|e| JoinError::BadCredentials(e.to_string()))?
            }
            NatsCredentials::UserPassword { user, password } => {
                options.user_and_password(user.clone(), password.clone())
            }
            NatsCredentials::Token(token) => options.token(token.clone()),
        })
    }
}

impl NatsConfig {
    pub fn new(urls: String) -> Self {
        Self {
            urls,
            bucket: DEFAULT_BUCKET.to_owned(),
            subject_prefix: DEFAULT_SUBJECT_PREFIX.to_owned(),
            kv_replicas: DEFAULT_KV_REPLICAS,
            lease_ttl: DEFAULT_LEASE_TTL,
            dedup_bucket: DEFAULT_DEDUP_BUCKET.to_owned(),
            dedup_window: crate::hub::DEFAULT_DEDUP_WINDOW,
            namespaces: Namespaces::default(),
            history_storage: HistoryStorage::File,
            events: LogConfig::default(),
            access: NatsAccess::default(),
            rejoin_wait: DEFAULT_REJOIN_WAIT,
        }
    }
}

/// Why joining failed at start.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("NATS URL {url:?} is not valid: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("connecting to NATS: {0}")]
    Connect(String),
    #[error("NATS credentials: {0}")]
    BadCredentials(String),
    #[error(
        "refusing to send the NATS password or token in clear to {url}, which is not on this machine: \
         use TLS (--nats-ca, or a tls:// URL), or allow it with --allow-plaintext-secrets"
    )]
    PlaintextSecret { url: String },
    #[error("NATS server {found} at {urls} is too old: herald's cluster mode needs NATS {}.{} or newer (JetStream key-value)", MIN_NATS_VERSION.0, MIN_NATS_VERSION.1)]
    TooOld { found: String, urls: String },
}

/// Whether a NATS server `version` (`2.9.10`) is one herald can use.
fn supported(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.trim_start_matches('v').parse::<u64>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    found >= MIN_NATS_VERSION
}

/// This broker's membership in a NATS-bridged cluster.
pub struct NatsFederation {
    client: async_nats::Client,
    broker_id: String,
    subject_prefix: String,
    changes: mpsc::UnboundedSender<Change>,
    leases: Arc<Leases>,
    store: Arc<RwLock<Option<Store>>>,
    dedup: Dedup,
    history: Option<JetStreamHistory>,
    events: Arc<JetStreamEvents>,
    calls: CallRouter,
    confirmations: Arc<Confirmations>,
    roll: Arc<RollCall>,
    stop: CancellationToken,
}

impl NatsFederation {
    /// Starts joining: the NATS connection and the lease bucket come up in
    /// the background (and come back by themselves after an outage); until
    /// then the broker is not ready. The receiver carries what the cluster
    /// sends this broker.
    pub async fn join(mut config: NatsConfig) -> Result<(Self, mpsc::Receiver<Notice>), JoinError> {
        config.kv_replicas = config.kv_replicas.max(1);
        let broker_id = herald_common::token::random_token(12);
        let addrs = config
            .urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| {
                u.parse::<ServerAddr>().map_err(|e| JoinError::BadUrl { url: u.to_owned(), reason: e.to_string() })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if addrs.is_empty() {
            return Err(JoinError::BadUrl { url: config.urls.clone(), reason: "no URL".into() });
        }
        check_secrets_are_safe(&addrs, &config.access)?;
        // Counts (re)connections: consumers made before one are gone after
        // a NATS restart, and are made again from where they stopped.
        let connections = Arc::new(AtomicU64::new(0));
        let counted = connections.clone();
        let confirmations = Arc::new(Confirmations::default());
        let roll = Arc::new(RollCall::new(config.rejoin_wait));
        let (on_loss, on_event) = (confirmations.clone(), roll.clone());
        let mut options = config.access.credentials.apply(ConnectOptions::new())?;
        if let Some(tls) = &config.access.tls {
            options = options.require_tls(true).tls_client_config(tls.clone());
        }
        let client = options
            .name(format!("herald-broker-{broker_id}"))
            .no_echo()
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .ping_interval(Duration::from_secs(5))
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis(100).saturating_mul(1 << attempts.min(5)).min(Duration::from_secs(2))
            })
            .event_callback(move |event| {
                let (counted, on_loss, roll) = (counted.clone(), on_loss.clone(), on_event.clone());
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            counted.fetch_add(1, Ordering::Relaxed);
                            roll.connected();
                        }
                        // The roll first: see RollCall::check.
                        async_nats::Event::Disconnected => {
                            roll.lost();
                            on_loss.connection_lost();
                        }
                        _ => {}
                    }
                    log_event(&event);
                }
            })
            .connect(addrs)
            .await
            .map_err(|e| JoinError::Connect(e.to_string()))?;
        // A server too old to serve the key-value API is refused here, in one
        // line, rather than retried forever. One that cannot be reached yet
        // is checked when it can (see maintain_leases).
        let deadline = tokio::time::Instant::now() + VERSION_CHECK_WAIT;
        while client.connection_state() != async_nats::connection::State::Connected
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let version = client.server_info().version;
        if !version.is_empty() && !supported(&version) {
            return Err(JoinError::TooOld { found: version, urls: config.urls.clone() });
        }

        let stop = CancellationToken::new();
        let (changes_tx, changes_rx) = mpsc::unbounded_channel();
        let (notices_tx, notices_rx) = mpsc::channel(NOTICE_QUEUE);
        let leases = Arc::new(Leases::new(broker_id.clone(), config.lease_ttl));
        let store = Arc::new(RwLock::new(None));
        tokio::spawn(bus::run(
            client.clone(),
            broker_id.clone(),
            config.subject_prefix.clone(),
            changes_rx,
            notices_tx.clone(),
            stop.clone(),
        ));
        let history = config.namespaces.iter().any(|n| n.history.is_some()).then(|| {
            let history = HistoryConfig {
                namespaces: config.namespaces.clone(),
                storage: config.history_storage,
                subject_prefix: config.subject_prefix.clone(),
                replicas: config.kv_replicas,
            };
            JetStreamHistory::start(client.clone(), history, connections, notices_tx.clone(), stop.clone())
        });
        let events = Arc::new(JetStreamEvents::new(
            client.clone(),
            EventsConfig {
                log: config.events.clone(),
                storage: config.history_storage,
                subject_prefix: config.subject_prefix.clone(),
                replicas: config.kv_replicas,
            },
        ));
        tokio::spawn(events.clone().watch(stop.clone()));
        let calls = CallRouter::new(client.clone(), config.subject_prefix.clone(), notices_tx.clone(), stop.clone());
        tokio::spawn(fence_leases(leases.clone(), notices_tx.clone(), stop.clone()));
        tokio::spawn(confirm_forwards(client.clone(), confirmations.clone(), stop.clone()));
        tokio::spawn(call_the_roll(
            client.clone(),
            broker_id.clone(),
            config.subject_prefix.clone(),
            roll.clone(),
            stop.clone(),
        ));
        tokio::spawn(maintain_leases(
            client.clone(),
            config.clone(),
            leases.clone(),
            store.clone(),
            notices_tx,
            stop.clone(),
        ));
        tracing::info!(broker_id, urls = %config.urls, "joining the broker cluster");
        let dedup = Dedup::new(client.clone(), &config);
        let federation = Self {
            client,
            broker_id,
            subject_prefix: config.subject_prefix,
            changes: changes_tx,
            leases,
            store,
            dedup,
            history,
            events,
            calls,
            confirmations,
            roll,
            stop,
        };
        Ok((federation, notices_rx))
    }

    /// Connected to NATS, with the lease bucket at hand.
    fn is_ready(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected && self.current_store().is_some()
    }

    fn current_store(&self) -> Option<Store> {
        self.store.read().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// The version of the NATS server a JetStream context talks to, if known.
fn client_version(jetstream: &async_nats::jetstream::Context) -> String {
    jetstream.client().server_info().version
}

/// Logs one event of the NATS connection, once, at the level it deserves.
/// Refuses a plaintext link to a server off this machine that would carry a
/// password or a token (given as credentials or in the URL).
fn check_secrets_are_safe(addrs: &[ServerAddr], access: &NatsAccess) -> Result<(), JoinError> {
    if access.allow_plaintext_secrets || access.tls.is_some() {
        return Ok(());
    }
    for addr in addrs {
        let secret = access.credentials.sent_in_clear() || addr.has_user_pass();
        if secret && !addr.tls_required() && !herald_common::net::is_loopback_host(addr.host()) {
            return Err(JoinError::PlaintextSecret { url: format!("{}:{}", addr.host(), addr.port()) });
        }
    }
    Ok(())
}

fn log_event(event: &async_nats::Event) {
    match event {
        async_nats::Event::Connected => tracing::info!("connected to NATS"),
        async_nats::Event::Disconnected => tracing::warn!("lost the NATS connection; reconnecting"),
        async_nats::Event::ServerError(_) | async_nats::Event::ClientError(_) | async_nats::Event::SlowConsumer(_) => {
            tracing::warn!(%event, "NATS connection trouble")
        }
        other => tracing::debug!(event = %other, "NATS connection event"),
    }
}

#[async_trait]
impl Federation for NatsFederation {
    fn unready_reason(&self) -> Option<&'static str> {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            Some("not connected to NATS")
        } else if self.current_store().is_none() {
            Some("connected to NATS, but the worker-id lease bucket is not open (see the log)")
        } else {
            None
        }
    }

    fn forward<'a>(&'a self, event: &'a Event) -> Option<Forwarding<'a>> {
        let subject = bus::subject(&self.subject_prefix, &event.channel);
        let payload = event.encode_to_vec().into();
        Some(Box::pin(async move {
            self.confirmations.forwarded();
            self.roll.check().map_err(|waiting| FederationError(waiting.to_string()))?;
            self.client.publish(subject, payload).await.map_err(|e| FederationError(e.to_string()))?;
            Ok(())
        }))
    }

    fn interest(&self, change: Interest) {
        let _ = self.changes.send(Change::Interest(change));
    }

    fn history(&self) -> Option<&JetStreamHistory> {
        self.history.as_ref()
    }

    fn event_log(&self) -> Option<Arc<dyn EventLog>> {
        Some(self.events.clone())
    }

    fn serve_method(&self, change: Interest) {
        self.calls.serve(change);
    }

    async fn forward_call(&self, request: &CallRequest, timeout: Duration) -> Option<Result<CallAnswer, CallFailure>> {
        Some(self.calls.forward(request, timeout).await)
    }

    async fn sync(&self) -> Result<(), FederationError> {
        let (done, wait) = oneshot::channel();
        let _ = self.changes.send(Change::Sync(done));
        wait.await.map_err(|_| FederationError("cluster bus stopped".to_owned()))?
    }

    async fn claim(&self, worker_id: &str, instance_id: &str) -> Result<(), ClaimError> {
        let store = self.current_store().ok_or_else(|| ClaimError::Unavailable("lease bucket not ready".into()))?;
        self.leases.claim(&store, worker_id, instance_id).await
    }

    fn release(&self, worker_id: String) {
        let leases = self.leases.clone();
        if let Some(store) = self.current_store() {
            tokio::spawn(async move { leases.release(&store, &worker_id).await });
        }
    }

    fn held_elsewhere(&self, worker_id: &str) -> bool {
        self.leases.is_held(worker_id)
    }

    async fn ask_worker(&self, worker_id: &str, ask: &Ask, timeout: Duration) -> Result<Answer, AskError> {
        let subject = bus::ask_worker_subject(&self.subject_prefix, worker_id);
        let request = self.client.request(subject, ask.encode_to_vec().into());
        let reply = tokio::time::timeout(timeout, request).await.map_err(|_| AskError::TimedOut(timeout))?.map_err(
            |e| match e.kind() {
                async_nats::RequestErrorKind::TimedOut => AskError::TimedOut(timeout),
                async_nats::RequestErrorKind::NoResponders => {
                    AskError::Unavailable(format!("no broker serves worker id {worker_id:?} any more"))
                }
                _ => AskError::Unavailable(e.to_string()),
            },
        )?;
        Answer::decode(reply.payload).map_err(|e| AskError::Unavailable(format!("undecodable answer: {e}")))
    }

    async fn ask_all(&self, ask: &Ask, timeout: Duration) -> Result<Gathered, FederationError> {
        let expected = self.leases.held_by_others();
        let mut gathered = Gathered { answers: Vec::new(), expected };
        if gathered.expected.is_empty() {
            return Ok(gathered);
        }
        let unavailable = |e: &dyn std::fmt::Display| FederationError(e.to_string());
        let inbox = self.client.new_inbox();
        let mut answers = self.client.subscribe(inbox.clone()).await.map_err(|e| unavailable(&e))?;
        let subject = bus::ask_all_subject(&self.subject_prefix);
        self.client
            .publish_with_reply(subject, inbox, ask.encode_to_vec().into())
            .await
            .map_err(|e| unavailable(&e))?;
        let deadline = tokio::time::Instant::now() + timeout;
        // Each broker answers for every worker id it leases.
        let mut waiting: HashSet<String> = gathered.expected.iter().map(|(_, broker)| broker.clone()).collect();
        while !waiting.is_empty() {
            let Ok(Some(message)) = tokio::time::timeout_at(deadline, answers.next()).await else {
                break;
            };
            match Answer::decode(message.payload) {
                Ok(answer) => {
                    waiting.remove(&answer.broker_id);
                    gathered.answers.push(answer);
                }
                Err(e) => tracing::warn!(error = %e, "undecodable answer from another broker"),
            }
        }
        Ok(gathered)
    }

    async fn first_use(&self, key: &str) -> Result<bool, FederationError> {
        self.dedup.first_use(key, &self.broker_id).await
    }

    fn forget(&self, key: &str) {
        self.dedup.forget(key);
    }

    fn leave(&self) {
        self.stop.cancel();
    }

    fn render_metrics(&self, out: &mut Exposition) {
        out.info("herald_broker_cluster_info", "This broker's id in its cluster.", &[("broker_id", &self.broker_id)]);
        out.gauge(
            "herald_broker_cluster_ready",
            "1 while connected to NATS with the lease bucket at hand.",
            i64::from(self.is_ready()),
        );
        out.counter(
            "herald_broker_cluster_forwards_unconfirmed_total",
            "Events forwarded to other brokers that NATS had not confirmed receiving when the connection to it was \
             lost: each may have been lost with it (an upper bound).",
            self.confirmations.unconfirmed(),
        );
        let (present, awaited) = self.roll.counts();
        out.gauge("herald_broker_cluster_peers", "Other brokers heard on NATS in the last 3 s.", present);
        out.gauge(
            "herald_broker_cluster_peers_awaited",
            "Brokers that forwards wait for, back on NATS after a reconnect: publishes that reach other brokers \
             are refused until they are back too (or presumed gone).",
            awaited,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_2_10_and_later_are_supported() {
        for (version, ok) in [("2.9.10", false), ("2.10.0", true), ("2.15.1", true), ("3.0.0", true), ("1.4", false)] {
            assert_eq!(supported(version), ok, "{version}");
        }
    }

    #[test]
    fn a_password_or_token_goes_in_clear_only_to_this_machine_unless_allowed() {
        let addrs = |url: &str| vec![url.parse::<ServerAddr>().expect("a URL")];
        let token = NatsAccess { credentials: NatsCredentials::Token("t".into()), ..NatsAccess::default() };
        assert!(check_secrets_are_safe(&addrs("nats://127.0.0.1:4222"), &token).is_ok());
        assert!(check_secrets_are_safe(&addrs("tls://10.0.0.7:4222"), &token).is_ok(), "tls:// is TLS");
        let refused = check_secrets_are_safe(&addrs("nats://10.0.0.7:4222"), &token);
        assert!(matches!(refused, Err(JoinError::PlaintextSecret { .. })), "{refused:?}");
        let in_url = check_secrets_are_safe(&addrs("nats://u:p@10.0.0.7:4222"), &NatsAccess::default());
        assert!(matches!(in_url, Err(JoinError::PlaintextSecret { .. })), "{in_url:?}");
        let allowed = NatsAccess { allow_plaintext_secrets: true, ..token };
        assert!(check_secrets_are_safe(&addrs("nats://10.0.0.7:4222"), &allowed).is_ok());
        let creds = NatsAccess { credentials: NatsCredentials::Creds(String::new()), ..NatsAccess::default() };
        assert!(
            check_secrets_are_safe(&addrs("nats://10.0.0.7:4222"), &creds).is_ok(),
            "a signature reveals no secret"
        );
    }
}
