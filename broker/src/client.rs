//! How publishers and gateways reach a broker: in the same process (the
//! `standalone` role) or over gRPC to one or more broker addresses, moving to
//! the next address when one is unreachable.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use herald_proto::v1::broker_service_client::BrokerServiceClient;
use herald_proto::v1::{
    PublishBatchRequest, PublishRequest, PublishResponse, PublishResult, SubscribeRequest, SubscribeResponse,
    publish_result,
};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::hub::{Hub, Session};

/// The service name brokers report health for.
const BROKER_SERVICE: &str = "herald.v1.BrokerService";

/// A broker address list could not be parsed.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("no broker address given")]
    Empty,
    #[error("broker address {address:?} is not valid: {reason}")]
    Invalid { address: String, reason: String },
    #[error("the API key cannot be sent as gRPC metadata")]
    BadApiKey,
}

/// How to call a remote broker.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// Presented as `authorization: Bearer <key>` on every call.
    pub api_key: Option<String>,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        Self { connect_timeout: Duration::from_secs(1), request_timeout: Duration::from_secs(5), api_key: None }
    }
}

/// A way to reach a broker.
#[derive(Clone)]
pub enum BrokerClient {
    /// The broker runs in this process.
    Local(Hub),
    /// Brokers reached over gRPC, tried in turn.
    Remote(RemoteBrokers),
}

/// One or more remote brokers. Calls go to the last broker that answered and
/// move on to the next address when it is unreachable.
#[derive(Clone)]
pub struct RemoteBrokers {
    inner: Arc<Remote>,
}

struct Remote {
    /// Single publishes waiting to go out in a batch (started on first use).
    coalescer: OnceLock<mpsc::Sender<Pending>>,
    brokers: Vec<(String, BrokerServiceClient<Channel>)>,
    health: Vec<HealthClient<Channel>>,
    preferred: AtomicUsize,
    request_timeout: Duration,
    authorization: Option<MetadataValue<Ascii>>,
}

impl RemoteBrokers {
    /// Parses a comma-separated list of `host:port` (or `http://host:port`)
    /// addresses. Connections are made lazily, on first use.
    pub fn parse(addresses: &str, options: &RemoteOptions) -> Result<Self, AddressError> {
        let mut brokers = Vec::new();
        let mut health = Vec::new();
        for address in addresses.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            let uri = if address.contains("://") { address.to_owned() } else { format!("http://{address}") };
            let invalid = |reason: String| AddressError::Invalid { address: address.to_owned(), reason };
            let endpoint = Endpoint::from_shared(uri)
                .map_err(|e| invalid(e.to_string()))?
                .connect_timeout(options.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(10));
            let channel = endpoint.connect_lazy();
            health.push(HealthClient::new(channel.clone()));
            let client = BrokerServiceClient::new(channel).max_decoding_message_size(16 * 1024 * 1024);
            brokers.push((address.to_owned(), client));
        }
        if brokers.is_empty() {
            return Err(AddressError::Empty);
        }
        let authorization = match &options.api_key {
            Some(key) => Some(format!("Bearer {key}").parse().map_err(|_| AddressError::BadApiKey)?),
            None => None,
        };
        Ok(Self {
            inner: Arc::new(Remote {
                coalescer: OnceLock::new(),
                brokers,
                health,
                preferred: AtomicUsize::new(0),
                request_timeout: options.request_timeout,
                authorization,
            }),
        })
    }

    /// Wraps `body` with the call's timeout and credentials.
    fn request<T>(&self, body: T, timeout: bool) -> tonic::Request<T> {
        let mut request = tonic::Request::new(body);
        if timeout {
            request.set_timeout(self.inner.request_timeout);
        }
        if let Some(authorization) = &self.inner.authorization {
            request.metadata_mut().insert("authorization", authorization.clone());
        }
        request
    }

    /// The addresses, in the order they are tried from the preferred one.
    fn rotation(&self) -> impl Iterator<Item = (usize, &(String, BrokerServiceClient<Channel>))> {
        let n = self.inner.brokers.len();
        let first = self.inner.preferred.load(Ordering::Relaxed) % n;
        (0..n).map(move |k| {
            let i = (first + k) % n;
            (i, &self.inner.brokers[i])
        })
    }

    fn prefer(&self, i: usize) {
        self.inner.preferred.store(i, Ordering::Relaxed);
    }

    /// Moves on from `address` if it is the preferred broker, so the next
    /// attempt starts with another one.
    fn demote(&self, address: &str) {
        let n = self.inner.brokers.len();
        let current = self.inner.preferred.load(Ordering::Relaxed) % n;
        if self.inner.brokers[current].0 == address {
            let _ =
                self.inner.preferred.compare_exchange(current, (current + 1) % n, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// Whether some broker answers its health check with SERVING.
    async fn probe(&self) -> bool {
        for (i, _) in self.rotation() {
            let mut request = tonic::Request::new(HealthCheckRequest { service: BROKER_SERVICE.to_owned() });
            request.set_timeout(self.inner.request_timeout);
            let answer = self.inner.health[i].clone().check(request).await;
            if answer.is_ok_and(|a| a.into_inner().status == ServingStatus::Serving as i32) {
                return true;
            }
        }
        false
    }

    /// Routes one message, in a batch with whatever other single publishes
    /// are waiting (see [`coalesce`]).
    async fn publish(&self, req: PublishRequest) -> Result<PublishResponse, Status> {
        let queue = self.inner.coalescer.get_or_init(|| coalesce(Arc::downgrade(&self.inner)));
        let (reply, answer) = oneshot::channel();
        if queue.send(Pending { req, reply }).await.is_err() {
            return Err(Status::unavailable("publisher is shutting down"));
        }
        answer.await.map_err(|_| Status::unavailable("publisher is shutting down"))?
    }

    async fn publish_one(&self, req: PublishRequest) -> Result<PublishResponse, Status> {
        let mut last = Status::unavailable("no broker address");
        let attempts = self.inner.brokers.len();
        let mut req = Some(req);
        for (k, (i, (address, client))) in self.rotation().enumerate() {
            let body = if k + 1 == attempts { req.take() } else { req.clone() };
            let Some(body) = body else { break };
            match client.clone().publish(self.request(body, true)).await {
                Ok(res) => {
                    self.prefer(i);
                    return Ok(res.into_inner());
                }
                Err(status) if is_unreachable(&status) => {
                    tracing::debug!(broker = %address, %status, "broker unreachable; trying the next one");
                    last = status;
                }
                Err(status) => return Err(status),
            }
        }
        Err(unreachable(last))
    }

    async fn publish_batch(&self, requests: &[PublishRequest]) -> Result<Vec<PublishResult>, Status> {
        let mut last = Status::unavailable("no broker address");
        for (i, (address, client)) in self.rotation() {
            let request = self.request(PublishBatchRequest { requests: requests.to_vec() }, true);
            match client.clone().publish_batch(request).await {
                Ok(res) => {
                    self.prefer(i);
                    return Ok(res.into_inner().results);
                }
                Err(status) if is_unreachable(&status) => {
                    tracing::debug!(broker = %address, %status, "broker unreachable; trying the next one");
                    last = status;
                }
                Err(status) => return Err(status),
            }
        }
        Err(unreachable(last))
    }

    async fn open_session(&self) -> Result<BrokerSession, Status> {
        let mut last = Status::unavailable("no broker address");
        for (i, (address, client)) in self.rotation() {
            let (tx, rx) = mpsc::channel(64);
            match client.clone().subscribe(self.request(ReceiverStream::new(rx), false)).await {
                Ok(res) => {
                    self.prefer(i);
                    return Ok(BrokerSession {
                        commands: Commands::Remote(tx),
                        events: Box::pin(res.into_inner()),
                        broker: address.clone(),
                    });
                }
                Err(status) => {
                    tracing::debug!(broker = %address, %status, "could not open a session; trying the next broker");
                    last = status;
                }
            }
        }
        Err(unreachable(last))
    }
}

/// A single publish waiting for its batch.
struct Pending {
    req: PublishRequest,
    reply: oneshot::Sender<Result<PublishResponse, Status>>,
}

/// Batches in flight at once from one publisher process.
const BATCHES_IN_FLIGHT: usize = 4;
/// Most single publishes sent in one batch.
const MAX_COALESCED: usize = 100;

/// Starts the task that turns concurrent single publishes into
/// `PublishBatch` calls: it takes whatever is waiting (never waiting for
/// more), so a lone publish goes out at once, and under load one call
/// carries many. Each publisher's messages keep their order, as a batch is
/// routed in order. The task ends when the brokers' client is dropped.
fn coalesce(remote: Weak<Remote>) -> mpsc::Sender<Pending> {
    let (tx, mut rx) = mpsc::channel::<Pending>(16 * 1024);
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
        while let Some(first) = rx.recv().await {
            // Waiting for a slot lets more publishes join this batch.
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let mut batch = vec![first];
            while batch.len() < MAX_COALESCED {
                match rx.try_recv() {
                    Ok(pending) => batch.push(pending),
                    Err(_) => break,
                }
            }
            let Some(inner) = remote.upgrade() else { return };
            let brokers = RemoteBrokers { inner };
            tokio::spawn(async move {
                brokers.send_coalesced(batch).await;
                drop(slot);
            });
        }
    });
    tx
}

impl RemoteBrokers {
    async fn send_coalesced(&self, batch: Vec<Pending>) {
        if let [_] = batch.as_slice() {
            for Pending { req, reply } in batch {
                let _ = reply.send(self.publish_one(req).await);
            }
            return;
        }
        let (requests, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.req, p.reply)).unzip();
        match self.publish_batch(&requests).await {
            Ok(results) if results.len() == replies.len() => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(match result.outcome {
                        Some(publish_result::Outcome::Published(published)) => Ok(published),
                        Some(publish_result::Outcome::Error(e)) => {
                            let code = Code::from_i32(i32::try_from(e.code).unwrap_or(Code::Unknown as i32));
                            Err(Status::new(code, e.message))
                        }
                        None => Err(Status::internal("broker sent an empty batch result")),
                    });
                }
            }
            // A broker whose --max-batch is below ours refuses the whole
            // batch: send the messages one by one instead.
            Err(status) if status.code() == Code::ResourceExhausted => {
                for (req, reply) in requests.into_iter().zip(replies) {
                    let _ = reply.send(self.publish_one(req).await);
                }
            }
            Ok(_) => {
                let status = Status::internal("broker answered a batch with the wrong number of results");
                for reply in replies {
                    let _ = reply.send(Err(status.clone()));
                }
            }
            Err(status) => {
                for reply in replies {
                    let _ = reply.send(Err(status.clone()));
                }
            }
        }
    }
}

/// Whether a failed call never reached a working broker, so that another
/// address may be tried.
fn is_unreachable(status: &Status) -> bool {
    status.code() == Code::Unavailable
}

fn unreachable(last: Status) -> Status {
    Status::unavailable(format!("no broker reachable: {}", last.message()))
}

impl BrokerClient {
    /// Routes one message.
    pub async fn publish(&self, req: PublishRequest) -> Result<PublishResponse, Status> {
        match self {
            Self::Local(hub) => hub.publish(req).await.map_err(Status::from),
            Self::Remote(remote) => remote.publish(req).await,
        }
    }

    /// Routes several messages in order; one result per message.
    pub async fn publish_batch(&self, requests: Vec<PublishRequest>) -> Result<Vec<PublishResult>, Status> {
        match self {
            Self::Local(hub) => {
                Ok(hub.publish_batch(requests).await?.into_iter().map(crate::service::publish_result).collect())
            }
            Self::Remote(remote) => remote.publish_batch(&requests).await,
        }
    }

    /// Whether a broker is there to take publishes: always in-process, else
    /// some broker's `grpc.health.v1` answers SERVING.
    pub async fn probe(&self) -> bool {
        match self {
            Self::Local(hub) => hub.unready_reason().is_none(),
            Self::Remote(remote) => remote.probe().await,
        }
    }

    /// Reports that a session on `broker` failed, so the next session is
    /// tried on another broker first.
    pub fn session_failed(&self, broker: &str) {
        if let Self::Remote(remote) = self {
            remote.demote(broker);
        }
    }

    /// Opens a subscriber session.
    pub async fn open_session(&self) -> Result<BrokerSession, Status> {
        match self {
            Self::Local(hub) => {
                let (session, events) = hub.open_session();
                Ok(BrokerSession {
                    commands: Commands::Local(session),
                    events: Box::pin(events),
                    broker: "in-process".to_owned(),
                })
            }
            Self::Remote(remote) => remote.open_session().await,
        }
    }
}

/// The stream of acks and events of an open session.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<SubscribeResponse, Status>> + Send>>;

/// An open subscriber session, wherever its broker runs.
pub struct BrokerSession {
    /// Where commands go.
    pub commands: Commands,
    /// Acks and events; ends with the status that ended the session.
    pub events: EventStream,
    /// The broker this session runs on, for logs.
    pub broker: String,
}

/// The command side of a [`BrokerSession`].
pub enum Commands {
    Local(Arc<Session>),
    Remote(mpsc::Sender<SubscribeRequest>),
}

impl Commands {
    /// Sends one command. A refused command also ends the session's event
    /// stream with the refusal, where callers look for it; an error here
    /// means the command did not get through.
    pub async fn send(&self, req: SubscribeRequest) -> Result<(), Status> {
        match self {
            Self::Local(session) => session.apply(req).await.map_err(Status::from),
            Self::Remote(tx) => tx.send(req).await.map_err(|_| Status::unavailable("broker session closed")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_broker_is_tried_last() {
        let brokers = RemoteBrokers::parse("127.0.0.1:1,127.0.0.1:2,127.0.0.1:3", &RemoteOptions::default()).unwrap();
        let order = |b: &RemoteBrokers| b.rotation().map(|(_, (a, _))| a.clone()).collect::<Vec<_>>();
        brokers.demote("127.0.0.1:2");
        assert_eq!(order(&brokers)[0], "127.0.0.1:1", "only the preferred broker is demoted");
        brokers.demote("127.0.0.1:1");
        assert_eq!(order(&brokers), ["127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:1"]);
    }

    #[tokio::test]
    async fn addresses_are_a_comma_separated_list() {
        let options = RemoteOptions::default();
        let brokers = RemoteBrokers::parse("127.0.0.1:2206, http://127.0.0.1:2207,", &options).unwrap();
        let names: Vec<_> = brokers.inner.brokers.iter().map(|(a, _)| a.as_str()).collect();
        assert_eq!(names, ["127.0.0.1:2206", "http://127.0.0.1:2207"]);
        assert!(matches!(RemoteBrokers::parse(" , ", &options), Err(AddressError::Empty)));
        assert!(matches!(RemoteBrokers::parse("not a uri", &options), Err(AddressError::Invalid { .. })));
    }
}
