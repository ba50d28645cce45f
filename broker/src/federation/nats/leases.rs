//! Worker-id leases in a JetStream key-value bucket, so that a worker id is
//! held by one live gateway in the whole cluster.
//!
//! A lease is a key (the worker id) whose value names the holding gateway
//! instance, the broker serving it and when the lease runs out. The broker
//! renews its leases well before they run out; a broker that dies stops
//! renewing, so its leases lapse and the ids become free again.
//!
//! A broker cut off from NATS cannot renew, yet its gateways stay linked to
//! it. So a lease is also fenced here ([`fence_leases`]): shortly before the
//! expiry it last wrote, a broker that could not renew ends the session
//! holding it, by its own clock and without asking NATS. When another broker
//! may take the id over, nobody holds it any more. Every change
//! is made with compare-and-set on the key's revision, so two brokers cannot
//! both win. Every broker watches the bucket to answer "is this worker held?"
//! without a round trip. [`maintain_leases`] keeps the bucket open, through
//! NATS restarts, and the leases renewed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, Store, UpdateErrorKind};
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{MIN_NATS_VERSION, NatsConfig, client_version, supported};
use crate::federation::{ClaimError, Notice};

/// What a lease's value says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub instance_id: String,
    pub broker_id: String,
    pub expires_at_ms: u64,
}

impl Lease {
    fn encode(&self) -> Bytes {
        Bytes::from(format!("{} {} {}", self.instance_id, self.broker_id, self.expires_at_ms))
    }

    fn decode(value: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(value).ok()?;
        let mut parts = text.split(' ');
        let lease = Lease {
            instance_id: parts.next()?.to_owned(),
            broker_id: parts.next()?.to_owned(),
            expires_at_ms: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(lease)
    }

    fn is_live(&self, now_ms: u64) -> bool {
        self.expires_at_ms > now_ms
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A lease this broker holds, as last written.
#[derive(Debug, Clone)]
struct Held {
    instance_id: String,
    revision: u64,
    expires_at_ms: u64,
}

/// This broker's leases and its view of everyone's.
pub struct Leases {
    broker_id: String,
    ttl: Duration,
    /// Leases this broker holds, by worker id.
    held: Mutex<HashMap<String, Held>>,
    /// Every lease in the bucket, as last seen by the watch.
    seen: RwLock<HashMap<String, Lease>>,
}

impl Leases {
    pub fn new(broker_id: String, ttl: Duration) -> Self {
        Self { broker_id, ttl, held: Mutex::default(), seen: RwLock::default() }
    }

    /// The bucket configuration: one value per key, on disk so that leases
    /// survive a NATS restart; entries nobody renews are dropped by the
    /// server after a few lease periods.
    pub fn bucket_config(bucket: &str, replicas: usize, ttl: Duration) -> kv::Config {
        kv::Config {
            bucket: bucket.to_owned(),
            description: "herald worker-id leases".to_owned(),
            history: 1,
            max_age: ttl * 6,
            num_replicas: replicas,
            ..kv::Config::default()
        }
    }

    fn lease(&self, instance_id: &str) -> Lease {
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        Lease {
            instance_id: instance_id.to_owned(),
            broker_id: self.broker_id.clone(),
            expires_at_ms: now_ms().saturating_add(ttl_ms),
        }
    }

    /// Whether any live gateway in the cluster holds `worker_id`.
    pub fn is_held(&self, worker_id: &str) -> bool {
        let now = now_ms();
        self.seen.read().unwrap_or_else(PoisonError::into_inner).get(worker_id).is_some_and(|l| l.is_live(now))
    }

    /// The worker ids held, by live lease, through other brokers, each
    /// with the id of the broker holding it.
    pub fn held_by_others(&self) -> Vec<(String, String)> {
        let now = now_ms();
        let seen = self.seen.read().unwrap_or_else(PoisonError::into_inner);
        seen.iter()
            .filter(|(_, l)| l.is_live(now) && l.broker_id != self.broker_id)
            .map(|(w, l)| (w.clone(), l.broker_id.clone()))
            .collect()
    }

    /// Takes the lease on `worker_id` for `instance_id`: free, lapsed and
    /// same-instance leases are taken; a live lease of another instance is
    /// refused.
    pub async fn claim(&self, store: &Store, worker_id: &str, instance_id: &str) -> Result<(), ClaimError> {
        let unavailable = |e: &dyn std::fmt::Display| ClaimError::Unavailable(e.to_string());
        for _ in 0..5 {
            let lease = self.lease(instance_id);
            let current = store.entry(worker_id).await.map_err(|e| unavailable(&e))?;
            let written = match current {
                Some(entry) if entry.operation == Operation::Put => {
                    let holder = Lease::decode(&entry.value);
                    let free = holder.as_ref().is_none_or(|h| h.instance_id == instance_id || !h.is_live(now_ms()));
                    if !free {
                        return Err(ClaimError::Taken);
                    }
                    match store.update(worker_id, lease.encode(), entry.revision).await {
                        Ok(revision) => Some(revision),
                        Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => None,
                        Err(e) => return Err(unavailable(&e)),
                    }
                }
                // Absent, deleted or purged: create it, unless someone else just did.
                _ => match store.create(worker_id, lease.encode()).await {
                    Ok(revision) => Some(revision),
                    Err(e) if e.kind() == CreateErrorKind::AlreadyExists => None,
                    Err(e) => return Err(unavailable(&e)),
                },
            };
            if let Some(revision) = written {
                self.hold(worker_id, &lease, revision);
                self.seen.write().unwrap_or_else(PoisonError::into_inner).insert(worker_id.to_owned(), lease);
                return Ok(());
            }
        }
        Err(ClaimError::Unavailable(format!("lease on {worker_id:?} kept changing under us")))
    }

    fn hold(&self, worker_id: &str, lease: &Lease, revision: u64) {
        let held = Held { instance_id: lease.instance_id.clone(), revision, expires_at_ms: lease.expires_at_ms };
        self.held.lock().unwrap_or_else(PoisonError::into_inner).insert(worker_id.to_owned(), held);
    }

    /// Gives up this broker's lease on `worker_id`, if it still holds it.
    pub async fn release(&self, store: &Store, worker_id: &str) {
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner).remove(worker_id);
        if let Some(Held { revision, .. }) = held
            && let Err(e) = store.delete_expect_revision(worker_id, Some(revision)).await
        {
            tracing::debug!(worker_id, error = %e, "lease not released (it lapses on its own)");
        }
    }

    /// Renews every lease this broker holds. A lease found taken over is
    /// reported as lost, so its local session can be ended.
    pub async fn renew(&self, store: &Store, notices: &mpsc::Sender<Notice>) {
        let held: Vec<(String, Held)> = self
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (worker_id, Held { instance_id, revision, .. }) in held {
            let lease = self.lease(&instance_id);
            match store.update(&worker_id, lease.encode(), revision).await {
                Ok(new_revision) => {
                    // Unless it was fenced meanwhile: then its session is
                    // already being ended, and the written lease lapses.
                    if let Some(entry) = self.held.lock().unwrap_or_else(PoisonError::into_inner).get_mut(&worker_id) {
                        entry.revision = new_revision;
                        entry.expires_at_ms = lease.expires_at_ms;
                    }
                }
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                    self.recover(store, &worker_id, &instance_id, notices).await;
                }
                Err(e) => tracing::warn!(worker_id, error = %e, "lease renewal failed; retrying"),
            }
        }
    }

    /// A renewal found the lease changed: take it back when it is gone or
    /// lapsed (say, the bucket was lost in a NATS restart); report it lost
    /// when another session holds it.
    async fn recover(&self, store: &Store, worker_id: &str, instance_id: &str, notices: &mpsc::Sender<Notice>) {
        let current = match store.entry(worker_id).await {
            Ok(current) => current,
            Err(e) => {
                tracing::warn!(worker_id, error = %e, "cannot read a lease; retrying");
                return;
            }
        };
        let holder = current.as_ref().filter(|e| e.operation == Operation::Put).and_then(|e| Lease::decode(&e.value));
        let lease = self.lease(instance_id);
        let retaken = match (&current, &holder) {
            (Some(entry), Some(h)) if !h.is_live(now_ms()) => {
                store.update(worker_id, lease.encode(), entry.revision).await.ok()
            }
            (Some(_), Some(_)) => None,
            _ => store.create(worker_id, lease.encode()).await.ok(),
        };
        if let Some(revision) = retaken {
            self.hold(worker_id, &lease, revision);
            return;
        }
        self.held.lock().unwrap_or_else(PoisonError::into_inner).remove(worker_id);
        let same_instance = holder.is_some_and(|h| h.instance_id == instance_id);
        tracing::warn!(worker_id, same_instance, "lease taken over");
        let notice = Notice::WorkerLost { worker_id: worker_id.to_owned(), same_instance };
        let _ = notices.send(notice).await;
    }

    /// Follows every change to the bucket until the watch ends.
    pub async fn watch(&self, store: &Store) -> Result<(), async_nats::Error> {
        let mut changes = store.watch_all().await?;
        while let Some(entry) = changes.next().await {
            let entry = entry?;
            let mut seen = self.seen.write().unwrap_or_else(PoisonError::into_inner);
            match (entry.operation, Lease::decode(&entry.value)) {
                (Operation::Put, Some(lease)) => {
                    seen.insert(entry.key, lease);
                }
                _ => {
                    seen.remove(&entry.key);
                }
            }
        }
        Ok(())
    }

    /// How often leases are renewed.
    pub fn renew_interval(&self) -> Duration {
        self.ttl / 3
    }

    /// How long before its written expiry an unrenewed lease is given up:
    /// time to end the session, and for the brokers' clocks to differ.
    fn fence_margin(&self) -> Duration {
        (self.ttl / 5).max(FENCE_MARGIN_FLOOR)
    }

    /// Gives up the leases whose renewal is overdue (they expire within the
    /// fence margin) and returns their worker ids.
    fn fence_overdue(&self, now_ms: u64) -> Vec<String> {
        let margin_ms = u64::try_from(self.fence_margin().as_millis()).unwrap_or(u64::MAX);
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let overdue: Vec<String> = held
            .iter()
            .filter(|(_, h)| h.expires_at_ms.saturating_sub(margin_ms) <= now_ms)
            .map(|(worker_id, _)| worker_id.clone())
            .collect();
        for worker_id in &overdue {
            held.remove(worker_id);
        }
        overdue
    }
}

/// The least time an unrenewed lease is given up before its expiry.
const FENCE_MARGIN_FLOOR: Duration = Duration::from_millis(200);
/// How often the fence looks at the held leases.
const FENCE_CHECK: Duration = Duration::from_millis(100);

/// Ends the session of every lease this broker could not renew in time
/// (see the module's doc), until `stop`. It runs apart from the renewals,
/// which may hang on a NATS that does not answer.
pub(super) async fn fence_leases(leases: Arc<Leases>, notices: mpsc::Sender<Notice>, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(FENCE_CHECK);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        for worker_id in leases.fence_overdue(now_ms()) {
            tracing::warn!(worker_id, "worker-id lease not renewed in time (NATS unreachable?): ending its session");
            let _ = notices.send(Notice::LeaseLapsing { worker_id }).await;
        }
    }
}

/// Opens (or creates) the lease bucket, then keeps watching it and renewing
/// this broker's leases until `stop`. When the watch breaks (NATS restarted,
/// the bucket was lost) the bucket is opened again, created if need be.
pub(super) async fn maintain_leases(
    client: async_nats::Client,
    config: NatsConfig,
    leases: Arc<Leases>,
    slot: Arc<RwLock<Option<Store>>>,
    notices: mpsc::Sender<Notice>,
    stop: CancellationToken,
) {
    let jetstream = async_nats::jetstream::new(client);
    let mut failures = 0u64;
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
                let version = client_version(&jetstream);
                if !version.is_empty() && !supported(&version) {
                    if failures == 0 {
                        tracing::error!(
                            version,
                            "this NATS server is too old for herald's cluster mode: it needs NATS {}.{} or newer",
                            MIN_NATS_VERSION.0,
                            MIN_NATS_VERSION.1
                        );
                    }
                } else if failures == 0 {
                    // The first failure is a warning; the retries each second are not.
                    tracing::warn!(bucket = %config.bucket, error = %e, "lease bucket unavailable; retrying each second");
                } else {
                    tracing::debug!(bucket = %config.bucket, error = %e, failures, "lease bucket still unavailable");
                }
                failures += 1;
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        if failures > 0 {
            tracing::info!(bucket = %config.bucket, failures, "lease bucket available again");
            failures = 0;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_values_round_trip_and_reject_garbage() {
        let lease = Lease { instance_id: "i1".into(), broker_id: "b1".into(), expires_at_ms: 42 };
        assert_eq!(Lease::decode(&lease.encode()), Some(lease));
        for garbage in [&b""[..], b"i1 b1", b"i1 b1 x", b"i1 b1 1 extra", b"\xff"] {
            assert_eq!(Lease::decode(garbage), None);
        }
    }

    #[test]
    fn an_unrenewed_lease_is_fenced_before_it_expires_and_only_then() {
        let leases = Leases::new("b".into(), Duration::from_secs(10));
        let lease = Lease { instance_id: "i".into(), broker_id: "b".into(), expires_at_ms: 100_000 };
        leases.hold("w", &lease, 1);
        assert!(leases.fence_overdue(97_999).is_empty(), "renewals have until the margin (2 s) before expiry");
        assert_eq!(leases.fence_overdue(98_000), ["w"], "then the lease is given up, before anyone may take it");
        assert!(leases.fence_overdue(200_000).is_empty(), "once");
        let short = Leases::new("b".into(), Duration::from_millis(500));
        short.hold("w", &lease, 1);
        assert_eq!(short.fence_overdue(99_800), ["w"], "the margin has a floor");
    }

    #[test]
    fn a_lease_is_live_until_it_expires() {
        let lease = Lease { instance_id: "i".into(), broker_id: "b".into(), expires_at_ms: 1000 };
        assert!(lease.is_live(999));
        assert!(!lease.is_live(1000));
    }
}
