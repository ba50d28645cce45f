//! The routing core: sessions, the interest index, worker-id claims and the
//! delivery of published events into session queues. No sockets here.
//!
//! - [`index`]: who listens on what, and who holds each worker id;
//! - [`session`]: a subscriber session, its queue and its event stream;
//! - [`commands`]: the commands a session sends (claim, subscribe, unsubscribe);
//! - [`publish`]: routing a publish and delivering it;
//! - [`Federation`]: the other brokers, if any.
//!
//! State lives behind one `RwLock` that is never held across an `.await`.

mod backends;
mod commands;
mod control;
mod directory;
mod history;
mod index;
mod publish;
mod recent;
mod session;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use herald_common::metrics::Exposition;
use herald_common::namespaces::Namespaces;
use tokio::sync::mpsc;

use self::control::Pending;
pub(crate) use self::directory::check_data;
use self::directory::{Directory, MemberChange};
use self::index::{Changes, Index};
use self::recent::RecentKeys;
use self::session::Sink;
pub use self::session::{Session, SessionEvents};
use crate::backends::Backends;
use crate::backends::LogConfig;
use crate::backends::memory::MemoryLog;
use crate::federation::{Federation, Local, Notice};
use crate::history::memory::MemoryHistory;
use crate::metrics::BrokerMetrics;

/// Most messages in one `PublishBatch`, by default.
pub const DEFAULT_MAX_BATCH: usize = 1000;
/// Most channels one session may listen on, by default.
pub const DEFAULT_MAX_CHANNELS_PER_SESSION: usize = 1024;
/// Most subscriber sessions at once, by default.
pub const DEFAULT_MAX_SESSIONS: usize = 10_000;
/// Events queued per session before publishers wait, by default.
pub const DEFAULT_SESSION_QUEUE: usize = 16 * 1024;
/// How long a publisher waits on a full session queue, by default.
pub const DEFAULT_SLOW_SESSION_GRACE: Duration = Duration::from_secs(2);
/// How long a broker whose gateways run in other processes refuses
/// publishes after it starts, by default: longer than a gateway's longest
/// reconnect backoff (2 s), so that the gateways of a restarted broker are
/// back before it takes a publish as routed.
pub const DEFAULT_STARTUP_GRACE: Duration = Duration::from_secs(3);
/// How long an idempotency key is remembered, by default.
pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(120);
/// Most idempotency keys remembered at once, by default.
pub const DEFAULT_DEDUP_CAPACITY: usize = 100_000;
/// How long a control waits for its gateways to confirm, and a query for
/// the other brokers' parts, by default.
pub const DEFAULT_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// Limits the broker enforces.
#[derive(Debug, Clone)]
pub struct HubLimits {
    /// Largest content of one message, in bytes.
    pub max_content_bytes: usize,
    /// Most messages in one `PublishBatch`, and most controls in one `ControlBatch`.
    pub max_batch: usize,
    /// Most channels one session may listen on.
    pub max_channels_per_session: usize,
    /// Most subscriber sessions at once.
    pub max_sessions: usize,
    /// Events queued per session before publishers have to wait (at least 1).
    pub session_queue: usize,
    /// How long a publisher waits on a full session queue before evicting it.
    pub slow_session_grace: Duration,
    /// How long after start publishes are refused (`UNAVAILABLE`), so that
    /// gateways reconnect first; zero for none.
    pub startup_grace: Duration,
    /// How long an idempotency key is remembered.
    pub dedup_window: Duration,
    /// Most idempotency keys remembered at once.
    pub dedup_capacity: usize,
    /// How long a control waits for its gateways to confirm, and a query
    /// (or a publish to a connection on another broker) for the other
    /// brokers' answers.
    pub answer_timeout: Duration,
    /// The client channel namespaces, for the history their channels keep.
    pub namespaces: Namespaces,
    /// How connection events are kept for consumer groups.
    pub events: LogConfig,
}

impl Default for HubLimits {
    fn default() -> Self {
        Self {
            max_content_bytes: herald_proto::DEFAULT_MAX_CONTENT_BYTES,
            max_batch: DEFAULT_MAX_BATCH,
            max_channels_per_session: DEFAULT_MAX_CHANNELS_PER_SESSION,
            max_sessions: DEFAULT_MAX_SESSIONS,
            session_queue: DEFAULT_SESSION_QUEUE,
            slow_session_grace: DEFAULT_SLOW_SESSION_GRACE,
            startup_grace: Duration::ZERO,
            dedup_window: DEFAULT_DEDUP_WINDOW,
            dedup_capacity: DEFAULT_DEDUP_CAPACITY,
            answer_timeout: DEFAULT_ANSWER_TIMEOUT,
            namespaces: Namespaces::default(),
            events: LogConfig::default(),
        }
    }
}

/// The broker's routing core. Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct Hub {
    shared: Arc<Shared>,
}

struct Shared {
    state: RwLock<State>,
    limits: HubLimits,
    metrics: BrokerMetrics,
    next_session_id: AtomicU64,
    next_control_id: AtomicU64,
    /// Controls handed to gateways and not confirmed yet, by control id.
    pending: Mutex<HashMap<u64, Pending>>,
    federation: Box<dyn Federation>,
    /// Idempotency keys accepted lately, by this broker.
    recent: Mutex<RecentKeys>,
    /// When the hub started (tokio's clock, so that tests can move it).
    started: tokio::time::Instant,
    /// Set once the startup grace is over, so that publishes stop reading
    /// the clock for it.
    grace_over: AtomicBool,
    /// The history of client channels whose namespace keeps one.
    history: MemoryHistory,
    /// Held while a publication is stored and delivered, so that channels
    /// with history deliver in offset order.
    history_order: tokio::sync::Mutex<()>,
    /// Connection events for backends, and clients' calls to them.
    backends: Backends,
}

#[derive(Default)]
struct State {
    index: Index<Arc<Sink>>,
    directory: Directory,
    shutting_down: bool,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new(HubLimits::default())
    }
}

impl Hub {
    /// A broker on its own.
    pub fn new(limits: HubLimits) -> Self {
        Self::build(limits, Box::new(Local))
    }

    /// A broker that works with others through `federation`; `notices` are
    /// what the federation sends this broker, handled in the background.
    pub fn federated(limits: HubLimits, federation: impl Federation, mut notices: mpsc::Receiver<Notice>) -> Self {
        let hub = Self::build(limits, Box::new(federation));
        let handler = hub.clone();
        tokio::spawn(async move {
            while let Some(notice) = notices.recv().await {
                handler.on_notice(notice).await;
            }
        });
        hub
    }

    fn build(mut limits: HubLimits, federation: Box<dyn Federation>) -> Self {
        limits.session_queue = limits.session_queue.max(1);
        let log = federation.event_log().unwrap_or_else(|| Arc::new(MemoryLog::new(limits.events.clone())));
        let backends = Backends::new(log, &limits.events);
        Self {
            shared: Arc::new(Shared {
                state: RwLock::new(State::default()),
                metrics: BrokerMetrics::default(),
                next_session_id: AtomicU64::new(1),
                next_control_id: AtomicU64::new(1),
                pending: Mutex::default(),
                federation,
                recent: Mutex::new(RecentKeys::new(limits.dedup_window, limits.dedup_capacity)),
                started: tokio::time::Instant::now(),
                grace_over: AtomicBool::new(false),
                history: MemoryHistory::default(),
                history_order: tokio::sync::Mutex::new(()),
                backends,
                limits,
            }),
        }
    }

    fn federation(&self) -> &dyn Federation {
        self.shared.federation.as_ref()
    }

    /// Why the broker cannot do its job right now, if it cannot.
    pub fn unready_reason(&self) -> Option<&'static str> {
        if self.is_shutting_down() {
            Some("shutting down")
        } else if self.is_starting() {
            Some("starting: waiting for gateways to reconnect")
        } else {
            self.federation().unready_reason()
        }
    }

    /// Whether the startup grace is still running.
    fn is_starting(&self) -> bool {
        if self.shared.grace_over.load(Ordering::Relaxed) {
            return false;
        }
        let starting = self.shared.started.elapsed() < self.shared.limits.startup_grace;
        if !starting {
            self.shared.grace_over.store(true, Ordering::Relaxed);
        }
        starting
    }

    /// Renders the broker's metrics, queue depths and federation state included.
    pub fn render_metrics(&self, out: &mut Exposition) {
        self.shared.metrics.render(out);
        let capacity = self.shared.limits.session_queue;
        let depths: Vec<usize> =
            self.read().index.sessions().map(|sink| capacity.saturating_sub(sink.tx.capacity())).collect();
        out.gauge(
            "herald_broker_session_queue_events",
            "Events queued for subscriber sessions, summed over sessions.",
            depths.iter().sum::<usize>() as i64,
        );
        out.gauge(
            "herald_broker_session_queue_events_max",
            "Events queued for the most backed-up subscriber session.",
            depths.iter().copied().max().unwrap_or(0) as i64,
        );
        out.gauge(
            "herald_broker_idempotency_keys",
            "Idempotency keys this broker remembers (accepted within the de-duplication window).",
            self.shared.recent.lock().unwrap_or_else(PoisonError::into_inner).len() as i64,
        );
        {
            let state = self.read();
            let (connections, users, groups) = state.directory.census();
            out.gauge(
                "herald_broker_directory_connections",
                "Live connections of this broker's gateways.",
                connections as i64,
            );
            out.gauge("herald_broker_directory_users", "Distinct user ids among those connections.", users as i64);
            out.gauge("herald_broker_directory_groups", "Groups with a member among those connections.", groups as i64);
        }
        self.shared.backends.render(out);
        self.federation().render_metrics(out);
    }

    /// The largest content of one message this broker takes.
    pub fn max_content_bytes(&self) -> usize {
        self.shared.limits.max_content_bytes
    }

    /// Counts calls refused for a missing or wrong API key.
    pub fn count_auth_failure(&self) {
        self.shared.metrics.auth_failures.inc();
    }

    /// Counts failed TLS handshakes on the gRPC port.
    pub fn count_tls_handshake_failure(&self) {
        self.shared.metrics.tls_handshake_failures.inc();
    }

    /// Whether [`Self::shut_down`] was called.
    pub fn is_shutting_down(&self) -> bool {
        self.read().shutting_down
    }

    /// Whether a live session of this broker holds `worker_id`.
    pub fn worker_is_held(&self, worker_id: &str) -> bool {
        self.read().index.holds(worker_id)
    }

    /// Counts of live sessions, channels with listeners, and held worker ids.
    pub fn census(&self) -> (usize, usize, usize) {
        self.read().index.census()
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.shared.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.shared.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes the sessions in `members` listen on their user and group
    /// channels, or stop, collecting the interest changes in `changes`.
    fn follow_members(state: &mut State, members: Vec<MemberChange>, changes: &mut Changes) {
        for member in members {
            match member {
                MemberChange::Gained { session, channel } => state.index.add_member_channel(session, channel, changes),
                MemberChange::Lost { session, channel } => {
                    state.index.remove_member_channel(session, &channel, changes)
                }
            }
        }
    }

    /// Publishes the census and passes the interest changes of one locked
    /// update on to the federation, while the lock is still held so that
    /// they keep the lock's order.
    fn commit(&self, state: &State, changes: Changes) {
        let (_, channels, workers) = state.index.census();
        self.shared.metrics.channels.set(channels as i64);
        self.shared.metrics.workers.set(workers as i64);
        for change in changes {
            self.federation().interest(change);
        }
    }
}

#[cfg(test)]
mod tests;
