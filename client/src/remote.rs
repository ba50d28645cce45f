//! Brokers reached over gRPC: one or more addresses, tried in turn.
//!
//! Calls go to the last broker that answered, and move on to the next address
//! when one is unreachable (`UNAVAILABLE`): that rule lives in one place,
//! [`Remote::failover`]. The API key is added to every call by an
//! interceptor. Single publishes are coalesced into batches ([`coalesce`]).
//!
//! A link is TLS when [`RemoteOptions::tls`] is set (then every address is
//! `https://`), optionally presenting a client certificate. The API key is
//! never sent in clear to a broker off this machine unless the caller
//! allows it ([`RemoteOptions::allow_plaintext_key`]).
//!
//! [`coalesce`]: crate::coalesce

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use herald_proto::v1::broker_service_client::BrokerServiceClient;
use herald_proto::v1::{CallAnswer, CallRequest, ConnectionEvent, ReportEventsRequest};
use herald_proto::v1::{
    ControlBatchRequest, ControlRequest, ControlResponse, ControlResult, HistoryRequest, HistoryResponse,
    PublishBatchRequest, PublishRequest, PublishResponse, PublishResult, QueryRequest, QueryResponse, SubscribeRequest,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::api_key::ApiKey;
use crate::coalesce::{self, Pending, Publisher};
use crate::{Broker, BrokerSession, SessionCommands};

/// The service name brokers report health for.
const BROKER_SERVICE: &str = "herald.v1.BrokerService";

/// Largest gRPC message decoded from a broker: a full batch of results, or
/// an event as large as the broker's content limit lets it be (the broker
/// is trusted to keep to its own limit).
const MAX_DECODING_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// Commands queued for a remote session before `send` waits.
const SESSION_COMMAND_QUEUE: usize = 64;

/// How long connecting to a broker may take, by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one call to a broker may take, by default.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

type Client = BrokerServiceClient<InterceptedService<Channel, ApiKey>>;

/// A broker address list could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("no broker address given")]
    Empty,
    #[error("broker address {address:?} is not valid: {reason}")]
    Invalid { address: String, reason: String },
    #[error("the API key cannot be sent as gRPC metadata")]
    BadApiKey,
    #[error(
        "refusing to send the API key in clear to broker {address}, which is not on this machine: \
         give the broker TLS (--tls-cert) and this role its CA (--broker-ca), or allow it with \
         --allow-plaintext-secrets"
    )]
    PlaintextKey { address: String },
    #[error("broker address {address:?} is plaintext (http://) but TLS to brokers is configured")]
    PlaintextWithTls { address: String },
    #[error("broker address {address:?} is https:// but no CA is configured to check it (--broker-ca)")]
    TlsWithoutCa { address: String },
}

/// TLS to brokers, as PEM (read and checked by the caller).
#[derive(Debug, Clone)]
pub struct BrokerTls {
    /// CA certificates the brokers' certificates must chain to.
    pub ca_pem: Vec<u8>,
    /// A certificate chain and key presented to brokers that ask for one.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the brokers' certificates are checked against, instead of
    /// each address's host.
    pub server_name: Option<String>,
}

/// How to call a remote broker.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// Presented as `authorization: Bearer <key>` on every call.
    pub api_key: Option<String>,
    /// TLS to every broker, when set.
    pub tls: Option<BrokerTls>,
    /// Send the API key over plaintext to brokers off this machine.
    pub allow_plaintext_key: bool,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            api_key: None,
            tls: None,
            allow_plaintext_key: false,
        }
    }
}

/// One or more remote brokers. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct RemoteBrokers {
    inner: Arc<Remote>,
}

struct Remote {
    /// Single publishes waiting to go out in a batch (started on first use).
    coalescer: OnceLock<mpsc::Sender<Pending>>,
    brokers: Vec<Address>,
    preferred: AtomicUsize,
    request_timeout: Duration,
}

/// One broker address and its (lazily connected) clients.
struct Address {
    address: String,
    client: Client,
    health: HealthClient<InterceptedService<Channel, ApiKey>>,
}

impl RemoteBrokers {
    /// Parses a comma-separated list of `host:port` (or `http://host:port`,
    /// `https://host:port`) addresses. Connections are made lazily, on first
    /// use.
    pub fn parse(addresses: &str, options: &RemoteOptions) -> Result<Self, AddressError> {
        let api_key = ApiKey::new(options.api_key.as_deref()).map_err(|_| AddressError::BadApiKey)?;
        let mut brokers = Vec::new();
        for address in addresses.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            let endpoint = endpoint(address, options)?;
            let endpoint = endpoint
                .connect_timeout(options.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(10));
            let channel = endpoint.connect_lazy();
            brokers.push(Address {
                address: address.to_owned(),
                health: HealthClient::with_interceptor(channel.clone(), api_key.clone()),
                client: BrokerServiceClient::with_interceptor(channel, api_key.clone())
                    .max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES),
            });
        }
        if brokers.is_empty() {
            return Err(AddressError::Empty);
        }
        Ok(Self {
            inner: Arc::new(Remote {
                coalescer: OnceLock::new(),
                brokers,
                preferred: AtomicUsize::new(0),
                request_timeout: options.request_timeout,
            }),
        })
    }
}

/// The endpoint of one broker address, with TLS when configured; refuses a
/// plaintext link that would carry the API key off this machine.
fn endpoint(address: &str, options: &RemoteOptions) -> Result<Endpoint, AddressError> {
    let invalid = |reason: String| AddressError::Invalid { address: address.to_owned(), reason };
    let scheme = if options.tls.is_some() { "https" } else { "http" };
    let uri = if address.contains("://") { address.to_owned() } else { format!("{scheme}://{address}") };
    let endpoint = Endpoint::from_shared(uri).map_err(|e| invalid(e.to_string()))?;
    let secure = endpoint.uri().scheme_str() == Some("https");
    let Some(tls) = &options.tls else {
        if secure {
            return Err(AddressError::TlsWithoutCa { address: address.to_owned() });
        }
        let host = endpoint.uri().host().unwrap_or_default();
        if options.api_key.is_some() && !options.allow_plaintext_key && !herald_common::net::is_loopback_host(host) {
            return Err(AddressError::PlaintextKey { address: address.to_owned() });
        }
        return Ok(endpoint);
    };
    if !secure {
        return Err(AddressError::PlaintextWithTls { address: address.to_owned() });
    }
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
    if let Some((cert, key)) = &tls.identity {
        config = config.identity(Identity::from_pem(cert, key));
    }
    if let Some(name) = &tls.server_name {
        config = config.domain_name(name.clone());
    }
    endpoint.tls_config(config).map_err(|e| invalid(describe_error(&e)))
}

impl Remote {
    /// The brokers, in the order they are tried: the preferred one first.
    fn rotation(&self) -> impl Iterator<Item = (usize, &Address)> {
        let n = self.brokers.len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        (0..n).map(move |k| {
            let i = (first + k) % n;
            (i, &self.brokers[i])
        })
    }

    /// Moves on from `address` if it is the preferred broker, so the next
    /// attempt starts with another one.
    fn demote(&self, address: &str) {
        let n = self.brokers.len();
        let current = self.preferred.load(Ordering::Relaxed) % n;
        if self.brokers[current].address == address {
            let _ = self.preferred.compare_exchange(current, (current + 1) % n, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// Runs `call` against each broker in turn, from the preferred one, until
    /// one answers with anything but `UNAVAILABLE`; that broker becomes the
    /// preferred one. Returns the answer and the address that gave it.
    ///
    /// A `timed` call that gets no answer within the request timeout ends
    /// with `DEADLINE_EXCEEDED` and is not tried elsewhere: the broker may
    /// have acted on it, so its outcome is unknown.
    async fn failover<T, F, Fut>(&self, timed: bool, mut call: F) -> Result<(T, &str), Status>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut failures = Vec::with_capacity(self.brokers.len());
        for (i, broker) in self.rotation() {
            let answer = call(broker.client.clone());
            let answer = if timed {
                match tokio::time::timeout(self.request_timeout, answer).await {
                    Ok(answer) => answer,
                    Err(_) => {
                        return Err(Status::deadline_exceeded(format!(
                            "broker {} did not answer within {:?}: the message may have been routed \
                             (retry with the same idempotency key)",
                            broker.address, self.request_timeout
                        )));
                    }
                }
            } else {
                answer.await
            };
            match answer {
                Ok(answer) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok((answer, &broker.address));
                }
                Err(status) if status.code() == Code::Unavailable => {
                    tracing::debug!(broker = %broker.address, %status, "broker unreachable; trying the next one");
                    failures.push(format!("{}: {}", broker.address, describe(&status)));
                }
                Err(status) => return Err(status),
            }
        }
        Err(Status::unavailable(format!("no broker took the call ({})", failures.join("; "))))
    }
}

impl Publisher for Remote {
    async fn publish_one(&self, req: PublishRequest) -> Result<PublishResponse, Status> {
        let answer = self
            .failover(true, |mut client| {
                let request = tonic::Request::new(req.clone());
                async move { client.publish(request).await }
            })
            .await?;
        Ok(answer.0.into_inner())
    }

    async fn publish_batch(&self, requests: &[PublishRequest]) -> Result<Vec<PublishResult>, Status> {
        let answer = self
            .failover(true, |mut client| {
                let request = tonic::Request::new(PublishBatchRequest { requests: requests.to_vec() });
                async move { client.publish_batch(request).await }
            })
            .await?;
        Ok(answer.0.into_inner().results)
    }
}

/// A status's message and the errors beneath it (for a transport failure,
/// the OS or TLS error), on one line.
pub fn describe(status: &Status) -> String {
    with_causes(status.message().to_owned(), std::error::Error::source(status))
}

fn describe_error(error: &(dyn std::error::Error + 'static)) -> String {
    with_causes(error.to_string(), error.source())
}

fn with_causes(mut text: String, mut source: Option<&(dyn std::error::Error + 'static)>) -> String {
    while let Some(e) = source {
        let cause = e.to_string();
        if !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
        source = e.source();
    }
    text.replace(['\r', '\n'], " ")
}

#[async_trait]
impl Broker for RemoteBrokers {
    /// Routes one message, in a batch with whatever other single publishes
    /// are waiting.
    async fn publish(&self, req: PublishRequest) -> Result<PublishResponse, Status> {
        let queue = self.inner.coalescer.get_or_init(|| coalesce::start(Arc::downgrade(&self.inner)));
        let (reply, answer) = oneshot::channel();
        if queue.send(Pending { req, reply }).await.is_err() {
            return Err(Status::unavailable("publisher is shutting down"));
        }
        answer.await.map_err(|_| Status::unavailable("publisher is shutting down"))?
    }

    async fn publish_batch(&self, requests: Vec<PublishRequest>) -> Result<Vec<PublishResult>, Status> {
        self.inner.publish_batch(&requests).await
    }

    async fn control(&self, req: ControlRequest) -> Result<ControlResponse, Status> {
        let answer = self
            .inner
            .failover(true, |mut client| {
                let request = tonic::Request::new(req.clone());
                async move { client.control(request).await }
            })
            .await?;
        Ok(answer.0.into_inner())
    }

    async fn control_batch(&self, requests: Vec<ControlRequest>) -> Result<Vec<ControlResult>, Status> {
        let answer = self
            .inner
            .failover(true, |mut client| {
                let request = tonic::Request::new(ControlBatchRequest { requests: requests.clone() });
                async move { client.control_batch(request).await }
            })
            .await?;
        Ok(answer.0.into_inner().results)
    }

    async fn query(&self, req: QueryRequest) -> Result<QueryResponse, Status> {
        let answer = self
            .inner
            .failover(true, |mut client| {
                let request = tonic::Request::new(req.clone());
                async move { client.query(request).await }
            })
            .await?;
        Ok(answer.0.into_inner())
    }

    async fn history(&self, req: HistoryRequest) -> Result<HistoryResponse, Status> {
        let answer = self
            .inner
            .failover(true, |mut client| {
                let request = tonic::Request::new(req.clone());
                async move { client.history(request).await }
            })
            .await?;
        Ok(answer.0.into_inner())
    }

    async fn report_events(&self, events: &[ConnectionEvent]) -> Result<(), Status> {
        self.inner
            .failover(true, |mut client| {
                let request = tonic::Request::new(ReportEventsRequest { events: events.to_vec() });
                async move { client.report_events(request).await }
            })
            .await?;
        Ok(())
    }

    async fn call(&self, req: CallRequest) -> Result<CallAnswer, Status> {
        let answer = self
            .inner
            .failover(false, |mut client| {
                let request = tonic::Request::new(req.clone());
                async move { client.call(request).await }
            })
            .await?;
        answer.0.into_inner().answer.ok_or_else(|| Status::internal("the broker answered a call without an answer"))
    }

    async fn open_session(&self) -> Result<BrokerSession, Status> {
        let remote = &self.inner;
        let ((commands, events), broker) = remote
            .failover(false, |mut client| {
                let (tx, rx) = mpsc::channel(SESSION_COMMAND_QUEUE);
                let request = tonic::Request::new(ReceiverStream::new(rx));
                async move { Ok((tx, client.subscribe(request).await?.into_inner())) }
            })
            .await?;
        Ok(BrokerSession {
            commands: Box::new(RemoteCommands(commands)),
            events: Box::pin(events),
            broker: broker.to_owned(),
        })
    }

    /// Whether some broker answers its health check with SERVING.
    async fn probe(&self) -> bool {
        for (_, broker) in self.inner.rotation() {
            let request = tonic::Request::new(HealthCheckRequest { service: BROKER_SERVICE.to_owned() });
            let answer = tokio::time::timeout(self.inner.request_timeout, broker.health.clone().check(request)).await;
            let Ok(answer) = answer else { continue };
            if answer.is_ok_and(|a| a.into_inner().status == ServingStatus::Serving as i32) {
                return true;
            }
        }
        false
    }

    fn session_failed(&self, broker: &str) {
        self.inner.demote(broker);
    }
}

/// Commands of a session on a remote broker: the request stream of its call.
struct RemoteCommands(mpsc::Sender<SubscribeRequest>);

#[async_trait]
impl SessionCommands for RemoteCommands {
    async fn send(&self, req: SubscribeRequest) -> Result<(), Status> {
        self.0.send(req).await.map_err(|_| Status::unavailable("broker session closed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(brokers: &RemoteBrokers) -> Vec<String> {
        brokers.inner.rotation().map(|(_, b)| b.address.clone()).collect()
    }

    #[tokio::test]
    async fn the_api_key_goes_in_clear_only_to_this_machine_unless_allowed() {
        let keyed = RemoteOptions { api_key: Some("k".repeat(20)), ..RemoteOptions::default() };
        for local in ["127.0.0.1:2206", "localhost:2206", "[::1]:2206", "http://127.0.0.2:2206"] {
            assert!(RemoteBrokers::parse(local, &keyed).is_ok(), "{local}");
        }
        for remote in ["10.0.0.7:2206", "broker.internal:2206", "127.0.0.1:2206,192.0.2.1:2206"] {
            let refused = RemoteBrokers::parse(remote, &keyed).err().expect("refused");
            assert!(matches!(refused, AddressError::PlaintextKey { .. }), "{remote}: {refused}");
            let allowed = RemoteOptions { allow_plaintext_key: true, ..keyed.clone() };
            assert!(RemoteBrokers::parse(remote, &allowed).is_ok(), "{remote}");
        }
        assert!(RemoteBrokers::parse("10.0.0.7:2206", &RemoteOptions::default()).is_ok(), "no key, nothing to leak");
    }

    #[tokio::test]
    async fn tls_and_plaintext_addresses_do_not_mix() {
        let refused = RemoteBrokers::parse("https://10.0.0.7:2206", &RemoteOptions::default()).err();
        assert!(matches!(refused, Some(AddressError::TlsWithoutCa { .. })), "{refused:?}");
        let tls = BrokerTls { ca_pem: Vec::new(), identity: None, server_name: None };
        let with_tls = RemoteOptions { tls: Some(tls), ..RemoteOptions::default() };
        let refused = RemoteBrokers::parse("http://10.0.0.7:2206", &with_tls).err();
        assert!(matches!(refused, Some(AddressError::PlaintextWithTls { .. })), "{refused:?}");
    }

    #[tokio::test]
    async fn a_failed_broker_is_tried_last() {
        let brokers = RemoteBrokers::parse("127.0.0.1:1,127.0.0.1:2,127.0.0.1:3", &RemoteOptions::default()).unwrap();
        brokers.session_failed("127.0.0.1:2");
        assert_eq!(order(&brokers)[0], "127.0.0.1:1", "only the preferred broker is demoted");
        brokers.session_failed("127.0.0.1:1");
        assert_eq!(order(&brokers), ["127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:1"]);
    }

    #[tokio::test]
    async fn addresses_are_a_comma_separated_list() {
        let options = RemoteOptions::default();
        let brokers = RemoteBrokers::parse("127.0.0.1:2206, http://127.0.0.1:2207,", &options).unwrap();
        assert_eq!(order(&brokers), ["127.0.0.1:2206", "http://127.0.0.1:2207"]);
        assert!(matches!(RemoteBrokers::parse(" , ", &options), Err(AddressError::Empty)));
        assert!(matches!(RemoteBrokers::parse("not a uri", &options), Err(AddressError::Invalid { .. })));
        let bad_key = RemoteOptions { api_key: Some("line\nbreak".into()), ..RemoteOptions::default() };
        assert!(matches!(RemoteBrokers::parse("127.0.0.1:1", &bad_key), Err(AddressError::BadApiKey)));
    }

    #[tokio::test]
    async fn when_no_broker_answers_the_error_names_every_address_and_why() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed = listener.local_addr().unwrap();
        drop(listener);
        let brokers = RemoteBrokers::parse(&format!("{closed},{closed}"), &RemoteOptions::default()).unwrap();
        let status = brokers.inner.publish_one(PublishRequest::default()).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        let message = status.message();
        assert_eq!(message.matches(&closed.to_string()).count(), 2, "{message}");
        assert!(message.contains("refused"), "the OS error is named: {message}");
    }
}
