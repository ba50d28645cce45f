//! Several brokers as one, bridged by NATS (no home-made clustering).
//!
//! - Each broker forwards what its publishers send to the NATS subject of
//!   the channel (`<prefix>.<channel>`) and subscribes to exactly the
//!   channels its own sessions listen on ([`bus`]). The connection is made
//!   with `no_echo`, so a broker never receives its own messages back: every
//!   subscriber gets each message once.
//! - Worker ids are leased in a JetStream key-value bucket ([`leases`]), so a
//!   worker id is held by one gateway in the whole cluster.
//! - While NATS is unreachable the broker is not ready: publishes and
//!   subscriptions are refused with `UNAVAILABLE`, never half-done.

pub mod bus;
pub mod leases;

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv::Store;
use async_nats::{ConnectOptions, ServerAddr};
use herald_proto::v1::Event;
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::cluster::bus::Interest;
use crate::cluster::leases::{ClaimError, Leases};

/// How to join a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// NATS server URLs, comma-separated (`nats://host:4222,...`).
    pub urls: String,
    /// Key-value bucket holding worker-id leases.
    pub bucket: String,
    /// Subject prefix of the channels.
    pub subject_prefix: String,
    /// Replicas of the lease bucket in a NATS cluster.
    pub kv_replicas: usize,
    /// How long a worker-id lease lasts without renewal.
    pub lease_ttl: Duration,
}

impl ClusterConfig {
    pub fn new(urls: String) -> Self {
        Self {
            urls,
            bucket: "herald_workers".to_owned(),
            subject_prefix: "herald.ch".to_owned(),
            kv_replicas: 1,
            lease_ttl: Duration::from_secs(10),
        }
    }
}

/// Why joining failed at start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("NATS URL {url:?} is not valid: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("connecting to NATS: {0}")]
    Connect(String),
}

/// What the cluster tells the hub.
#[derive(Debug)]
pub enum ClusterNotice {
    /// An event published on another broker, for local listeners.
    Event(Event),
    /// Bytes on the bus that are not an event (counted, then dropped).
    Undecodable,
    /// A lease this broker held was taken over: end the session holding it.
    WorkerLost { worker_id: String, same_instance: bool },
}

/// This broker's membership in a cluster.
pub struct Cluster {
    client: async_nats::Client,
    broker_id: String,
    subject_prefix: String,
    interest: mpsc::UnboundedSender<Interest>,
    leases: Arc<Leases>,
    store: Arc<RwLock<Option<Store>>>,
    stop: CancellationToken,
}

impl Cluster {
    /// Starts joining: the NATS connection and the lease bucket come up in
    /// the background (and come back by themselves after an outage); until
    /// then [`Cluster::is_ready`] is false.
    pub async fn join(config: ClusterConfig) -> Result<(Cluster, mpsc::Receiver<ClusterNotice>), ClusterError> {
        let broker_id = herald_common::token::random_token(12);
        let addrs = config
            .urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| {
                u.parse::<ServerAddr>().map_err(|e| ClusterError::BadUrl { url: u.to_owned(), reason: e.to_string() })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if addrs.is_empty() {
            return Err(ClusterError::BadUrl { url: config.urls.clone(), reason: "no URL".into() });
        }
        let client = ConnectOptions::new()
            .name(format!("herald-broker-{broker_id}"))
            .no_echo()
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .ping_interval(Duration::from_secs(5))
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis(100).saturating_mul(1 << attempts.min(5)).min(Duration::from_secs(2))
            })
            .event_callback(|event| async move { tracing::info!(%event, "NATS connection event") })
            .connect(addrs)
            .await
            .map_err(|e| ClusterError::Connect(e.to_string()))?;

        let stop = CancellationToken::new();
        let (interest_tx, interest_rx) = mpsc::unbounded_channel();
        let (notices_tx, notices_rx) = mpsc::channel(64 * 1024);
        let leases = Arc::new(Leases::new(broker_id.clone(), config.lease_ttl));
        let store = Arc::new(RwLock::new(None));
        tokio::spawn(bus::run(
            client.clone(),
            config.subject_prefix.clone(),
            interest_rx,
            notices_tx.clone(),
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
        let cluster = Cluster {
            client,
            broker_id,
            subject_prefix: config.subject_prefix,
            interest: interest_tx,
            leases,
            store,
            stop,
        };
        Ok((cluster, notices_rx))
    }

    /// Connected to NATS, with the lease bucket at hand.
    pub fn is_ready(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected && self.current_store().is_some()
    }

    fn current_store(&self) -> Option<Store> {
        self.store.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub fn broker_id(&self) -> &str {
        &self.broker_id
    }

    /// Hands `event` to the brokers that have listeners on its channel.
    pub async fn forward(&self, event: &Event) -> Result<(), String> {
        let subject = bus::subject(&self.subject_prefix, &event.channel);
        self.client.publish(subject, event.encode_to_vec().into()).await.map_err(|e| e.to_string())
    }

    /// Records a change of local interest; applied in call order.
    pub fn interest(&self, change: Interest) {
        let _ = self.interest.send(change);
    }

    /// Waits until every interest change so far has reached NATS.
    pub async fn sync(&self) -> Result<(), String> {
        let (done, wait) = oneshot::channel();
        self.interest(Interest::Sync(done));
        wait.await.map_err(|_| "cluster bus stopped".to_owned())?
    }

    /// Leases `worker_id` to `instance_id` cluster-wide.
    pub async fn claim(&self, worker_id: &str, instance_id: &str) -> Result<(), ClaimError> {
        let store = self.current_store().ok_or_else(|| ClaimError::Unavailable("lease bucket not ready".into()))?;
        self.leases.claim(&store, worker_id, instance_id).await
    }

    /// Gives the lease on `worker_id` back, in the background.
    pub fn release(&self, worker_id: String) {
        let leases = self.leases.clone();
        if let Some(store) = self.current_store() {
            tokio::spawn(async move { leases.release(&store, &worker_id).await });
        }
    }

    /// Whether a gateway anywhere in the cluster holds `worker_id`.
    pub fn is_held(&self, worker_id: &str) -> bool {
        self.leases.is_held(worker_id)
    }

    /// Stops the bus and the lease upkeep.
    pub fn leave(&self) {
        self.stop.cancel();
    }
}

/// Opens (or creates) the lease bucket, then keeps watching it and renewing
/// this broker's leases until `stop`. When the watch breaks (NATS restarted,
/// the bucket was lost) the bucket is opened again, created if need be.
async fn maintain_leases(
    client: async_nats::Client,
    config: ClusterConfig,
    leases: Arc<Leases>,
    slot: Arc<RwLock<Option<Store>>>,
    notices: mpsc::Sender<ClusterNotice>,
    stop: CancellationToken,
) {
    let jetstream = async_nats::jetstream::new(client);
    loop {
        let opened = match jetstream.get_key_value(&config.bucket).await {
            Ok(store) => Ok(store),
            Err(_) => jetstream
                .create_key_value(Leases::bucket_config(&config.bucket, config.kv_replicas, config.lease_ttl))
                .await
                .map_err(|e| e.to_string()),
        };
        let store = match opened {
            Ok(store) => store,
            Err(e) => {
                tracing::warn!(bucket = %config.bucket, error = %e, "lease bucket unavailable; retrying");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        *slot.write().unwrap_or_else(PoisonError::into_inner) = Some(store.clone());
        let renew = async {
            let mut ticker = tokio::time::interval(leases.renew_interval());
            loop {
                ticker.tick().await;
                leases.renew(&store, &notices).await;
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            watched = leases.watch(&store) => {
                if let Err(e) = watched {
                    tracing::debug!(error = %e, "lease watch ended; reopening the bucket");
                }
            }
            () = renew => {}
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}
