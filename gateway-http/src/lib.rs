//! herald's HTTP gateway: turns HTTP requests into broker publishes,
//! controls and queries.
//!
//! - `GET|POST /?content=…[&to_worker_id=…&to_connection_id=…|&to_uid=…|&to_group=…][&exclude=W:C,…]`:
//!   the classic API ([`classic`]), answering `ok`;
//! - `POST /v1/publish` and `POST /v1/batch`: the JSON publish API ([`json`]),
//!   e.g. `{"target":{"user":"ana"},"content":{"text":"hi"}}`;
//! - `POST /v1/control`: binds users, changes groups and connection data,
//!   closes connections, e.g. `{"join_groups":{"selection":{"user":"ana"},"groups":["room-1"]}}`,
//!   answering `{"connections":N,"missing_workers":[…]}`; `POST /v1/control/batch`
//!   takes `{"requests":[…]}` of those and answers `{"results":[{"done":{…}}|{"error":{…}},…]}`;
//! - `POST /v1/query`: asks who is connected, e.g. `{"group_count":"room-1"}`,
//!   answering `{"online":…,"connections":[…],"count":…,"users":…,"missing_workers":[…]}`;
//! - read-only views answering as `/v1/query` does:
//!   `GET /v1/users/{user_id}` (its connections; the id percent-decoded, e.g.
//!   `/v1/users/ana%40example.com`), `GET /v1/groups/{group}` (its members),
//!   `GET /v1/channels/{channel}` (a client channel's subscribers),
//!   `GET /v1/channels/{channel}/history[?limit=N][&since_offset=O&epoch=E]`
//!   (a client channel's stored publications: the newest `limit`, or those
//!   after a position; answered as [`json::history_answer`]),
//!   `GET /v1/connections/{worker_id}/{connection_id}` (one connection) and
//!   `GET /v1/totals` (connections and users in the cluster).
//!
//! Every endpoint takes the same API key. Failures are never answered `ok`:
//! 400 for malformed input, 401 without an accepted API key (when keys are
//! configured), 404 for an unknown worker (or a connection a control names
//! that is not live), 405 for a wrong method (with `Allow`), 413 for
//! oversized content or bodies, 503 when no broker can be reached, 504 when
//! the outcome is unknown ([`error`]).

pub mod classic;
pub mod error;
pub mod json;
mod metrics;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, any, get, post};
use bytes::Bytes;
use herald_client::Broker;
use herald_common::auth::ApiKeys;
use herald_common::http::HttpServerOptions;
use herald_common::metrics::Exposition;
use herald_proto::v1::{
    ConnectionAddress, HistoryRequest, PublishResult, QueryRequest, StreamPosition, Totals, control_result,
    publish_result, query_request,
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower_http::limit::RequestBodyLimitLayer;

use crate::error::ApiError;
use crate::metrics::HttpMetrics;

/// Limits and credentials of the HTTP gateway.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Largest content of one message, in bytes.
    pub max_content_bytes: usize,
    /// Largest request body, in bytes (a JSON batch is the biggest).
    pub max_body_bytes: usize,
    /// Longest time from a request's headers to the end of its body; a
    /// slower body is answered 408.
    pub request_timeout: Duration,
    /// Keys publishers must present as `Authorization: Bearer <key>`; none means no auth.
    pub api_keys: ApiKeys,
    pub server: HttpServerOptions,
}

/// The HTTP port in the classic layout.
pub const DEFAULT_PORT: u16 = 4237;
/// The HTTP gateway's admin port (metrics, health).
pub const DEFAULT_ADMIN_PORT: u16 = 4239;
/// Largest request body, in bytes, by default.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Longest time from a request's headers to the end of its body, by default.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The header that carries a publish's idempotency key.
const IDEMPOTENCY_KEY: &str = "idempotency-key";

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_content_bytes: herald_proto::DEFAULT_MAX_CONTENT_BYTES,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            api_keys: ApiKeys::default(),
            server: HttpServerOptions::default(),
        }
    }
}

/// An HTTP gateway. Clone it to watch its metrics while it runs.
#[derive(Clone)]
pub struct HttpGateway {
    shared: Arc<Shared>,
}

struct Shared {
    config: HttpConfig,
    broker: Arc<dyn Broker>,
    metrics: HttpMetrics,
    /// Whether the last probe found a broker serving.
    broker_reachable: AtomicBool,
}

impl HttpGateway {
    pub fn new(config: HttpConfig, broker: Arc<dyn Broker>) -> Self {
        Self {
            shared: Arc::new(Shared {
                config,
                broker,
                metrics: HttpMetrics::default(),
                broker_reachable: AtomicBool::new(false),
            }),
        }
    }

    pub fn render_metrics(&self, out: &mut Exposition) {
        self.shared.metrics.render(out);
    }

    /// The gateway's routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/", any(classic_publish))
            .route("/v1/publish", only(post(json_publish), "POST"))
            .route("/v1/batch", only(post(json_batch), "POST"))
            .route("/v1/control", only(post(json_control), "POST"))
            .route("/v1/control/batch", only(post(json_control_batch), "POST"))
            .route("/v1/query", only(post(json_query), "POST"))
            .route("/v1/users/{user_id}", only(get(user_view), "GET, HEAD"))
            .route("/v1/groups/{group}", only(get(group_view), "GET, HEAD"))
            .route("/v1/channels/{channel}", only(get(channel_view), "GET, HEAD"))
            .route("/v1/channels/{channel}/history", only(get(channel_history), "GET, HEAD"))
            .route("/v1/connections/{worker_id}/{connection_id}", only(get(connection_view), "GET, HEAD"))
            .route("/v1/totals", only(get(totals_view), "GET, HEAD"))
            .fallback(not_found)
            // Refuses a declared Content-Length over the limit before reading
            // anything, and cuts off a chunked body once it passes the limit.
            .layer(RequestBodyLimitLayer::new(self.shared.config.max_body_bytes))
            .layer(DefaultBodyLimit::disable())
            .with_state(self.shared.clone())
    }

    /// Whether a broker was serving at the last probe.
    pub fn is_ready(&self) -> bool {
        self.shared.broker_reachable.load(Ordering::Relaxed)
    }

    /// Serves on `listener` (HTTPS when `tls` is given) until `shutdown`,
    /// letting in-flight requests finish. Meanwhile probes the brokers each
    /// second, for [`Self::is_ready`].
    pub async fn run(self, listener: TcpListener, tls: Option<TlsAcceptor>, shutdown: CancellationToken) {
        let options = self.shared.config.server.clone();
        let shared = self.shared.clone();
        let probing = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(1));
            loop {
                ticker.tick().await;
                shared.broker_reachable.store(shared.broker.probe().await, Ordering::Relaxed);
            }
        });
        herald_common::http::serve(listener, self.router(), options, tls, shutdown).await;
        probing.abort();
    }
}

impl Shared {
    /// Refuses a request without an accepted API key (401).
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let presented = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        if self.config.api_keys.authorizes(presented) {
            return Ok(());
        }
        self.metrics.auth_failures.inc();
        Err(ApiError {
            status: StatusCode::UNAUTHORIZED,
            code: tonic::Code::Unauthenticated,
            message: "missing or invalid API key: send 'Authorization: Bearer <key>'".into(),
        })
    }
}

impl Shared {
    /// Counts and answers a request that started at `started`: on
    /// success, the number of messages the broker accepted and the response;
    /// else the refusal, rendered by `refusal` (a 401 with its challenge).
    fn answer(
        &self,
        started: Instant,
        outcome: Result<(u64, Response), ApiError>,
        refusal: fn(ApiError) -> Response,
    ) -> Response {
        match outcome {
            Ok((published, response)) => {
                self.metrics.messages_published.add(published);
                self.metrics.record(StatusCode::OK, started);
                response
            }
            Err(e) => {
                self.metrics.record(e.status, started);
                with_challenge(e.status, refusal(e))
            }
        }
    }
}

/// Adds the challenge a 401 must carry.
fn with_challenge(status: StatusCode, response: Response) -> Response {
    if status == StatusCode::UNAUTHORIZED {
        ([(header::WWW_AUTHENTICATE, "Bearer")], response).into_response()
    } else {
        response
    }
}

/// What every request goes through: the API key, on the headers
/// alone, then its body, read within the request deadline and no further
/// than the limit. (A request with both Content-Length and
/// Transfer-Encoding never gets here: hyper drops the former, so the check
/// is made on the raw head, in herald-common's HTTP server.)
async fn admit(shared: &Shared, request: Request) -> Result<(Parts, Bytes), ApiError> {
    let (parts, body) = request.into_parts();
    shared.authorize(&parts.headers)?;
    let deadline = shared.config.request_timeout;
    let limit = shared.config.max_body_bytes;
    match tokio::time::timeout(deadline, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => Ok((parts, bytes)),
        Ok(Err(e)) if is_length_limit(&e) => Err(ApiError::too_large(format!("body over {limit} bytes"))),
        Ok(Err(e)) => Err(ApiError::bad_request(format!("reading the body: {e}"))),
        Err(_) => {
            shared.metrics.body_timeouts.inc();
            Err(ApiError::request_timeout(format!("the request body did not arrive within {deadline:?}")))
        }
    }
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// The idempotency key of a request (`Idempotency-Key` header), if any.
fn idempotency_key(parts: &Parts) -> Result<String, ApiError> {
    match parts.headers.get_all(IDEMPOTENCY_KEY).iter().collect::<Vec<_>>()[..] {
        [] => Ok(String::new()),
        [value] => value
            .to_str()
            .map(str::to_owned)
            .map_err(|_| ApiError::bad_request("the Idempotency-Key header is not visible ASCII")),
        _ => Err(ApiError::bad_request("more than one Idempotency-Key header")),
    }
}

async fn classic_publish(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    if method != Method::GET && method != Method::POST {
        let err = ApiError { status: StatusCode::METHOD_NOT_ALLOWED, ..ApiError::bad_request("use GET or POST") };
        return shared.answer(started, Err(err), |e| ([(header::ALLOW, "GET, POST")], e).into_response());
    }
    let outcome = async {
        let (parts, body) = admit(&shared, request).await?;
        let is_form = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        let form = (method == Method::POST && is_form).then_some(&body[..]);
        let mut req = classic::parse(parts.uri.query().unwrap_or(""), form, shared.config.max_content_bytes)?;
        req.idempotency_key = idempotency_key(&parts)?;
        shared.broker.publish(req).await.map_err(|s| ApiError::from_status(&s))?;
        Ok((1, "ok".into_response()))
    }
    .await;
    shared.answer(started, outcome, IntoResponse::into_response)
}

async fn json_publish(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let started = Instant::now();
    let outcome = async {
        let (parts, body) = admit(&shared, request).await?;
        let mut req = json::parse_body::<json::PublishBody>(&body)?.into_request()?;
        let header_key = idempotency_key(&parts)?;
        if !header_key.is_empty() {
            req.idempotency_key = header_key;
        }
        let res = shared.broker.publish(req).await.map_err(|s| ApiError::from_status(&s))?;
        Ok((1, axum::Json(json::published(&res)).into_response()))
    }
    .await;
    shared.answer(started, outcome, ApiError::into_json_response)
}

/// Each message of a batch is routed or refused on its own, as gRPC
/// `PublishBatch` does: a malformed entry gets its own error result, and the
/// others go to the broker.
async fn json_batch(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let started = Instant::now();
    let outcome = async {
        let (_, body) = admit(&shared, request).await?;
        let (requests, refusals) =
            split_entries(json::parse_body::<json::BatchBody>(&body)?.into_entries(), json::refused);
        let routed = if requests.is_empty() {
            Vec::new()
        } else {
            shared.broker.publish_batch(requests).await.map_err(|s| ApiError::from_status(&s))?
        };
        let results: Vec<PublishResult> = in_entry_order(refusals, routed);
        let accepted =
            results.iter().filter(|r| matches!(r.outcome, Some(publish_result::Outcome::Published(_)))).count();
        Ok((accepted as u64, axum::Json(json::batch_results(&results)).into_response()))
    }
    .await;
    shared.answer(started, outcome, ApiError::into_json_response)
}

/// Changes who is on the gateways' connections. Counted as a control, not as
/// a message published.
async fn json_control(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let started = Instant::now();
    let outcome = async {
        let (_, body) = admit(&shared, request).await?;
        let req = json::parse_body::<json::ControlBody>(&body)?.into_request()?;
        let res = shared.broker.control(req).await.map_err(|s| ApiError::from_status(&s))?;
        shared.metrics.controls.inc();
        Ok((0, axum::Json(json::control_answer(&res)).into_response()))
    }
    .await;
    shared.answer(started, outcome, ApiError::into_json_response)
}

/// Carries out several controls; each malformed one is refused on its own.
async fn json_control_batch(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let started = Instant::now();
    let outcome = async {
        let (_, body) = admit(&shared, request).await?;
        let entries = json::parse_body::<json::ControlBatchBody>(&body)?.into_entries();
        let (requests, refusals) = split_entries(entries, json::control_refused);
        let done = if requests.is_empty() {
            Vec::new()
        } else {
            shared.broker.control_batch(requests).await.map_err(|s| ApiError::from_status(&s))?
        };
        let results = in_entry_order(refusals, done);
        let done = results.iter().filter(|r| matches!(r.outcome, Some(control_result::Outcome::Done(_)))).count();
        shared.metrics.controls.add(done as u64);
        Ok((0, axum::Json(json::control_batch_results(&results)).into_response()))
    }
    .await;
    shared.answer(started, outcome, ApiError::into_json_response)
}

/// The well-formed requests of a batch, to go to the broker together, and
/// for each entry its refusal if it was malformed.
fn split_entries<R, T>(entries: Vec<Result<R, ApiError>>, refused: fn(&ApiError) -> T) -> (Vec<R>, Vec<Option<T>>) {
    let mut requests = Vec::new();
    let mut refusals = Vec::new();
    for entry in entries {
        match entry {
            Ok(req) => {
                requests.push(req);
                refusals.push(None);
            }
            Err(e) => refusals.push(Some(refused(&e))),
        }
    }
    (requests, refusals)
}

/// The broker's results put back among the refusals, in entry order.
fn in_entry_order<T>(refusals: Vec<Option<T>>, results: Vec<T>) -> Vec<T> {
    let mut results = results.into_iter();
    refusals.into_iter().filter_map(|refusal| refusal.or_else(|| results.next())).collect()
}

async fn json_query(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let started = Instant::now();
    let outcome = async {
        let (_, body) = admit(&shared, request).await?;
        let req = json::parse_body::<json::QueryBody>(&body)?.into_request()?;
        ask(&shared, req).await
    }
    .await;
    shared.answer(started, outcome, ApiError::into_json_response)
}

/// Puts a question to the broker. Counted as a query, not as a message published.
async fn ask(shared: &Shared, req: QueryRequest) -> Result<(u64, Response), ApiError> {
    let res = shared.broker.query(req).await.map_err(|s| ApiError::from_status(&s))?;
    shared.metrics.queries.inc();
    Ok((0, axum::Json(json::query_answer(&res)).into_response()))
}

/// A read-only view: the question its path asks, put as `/v1/query` would.
/// The API key is checked before the path.
async fn view(shared: &Shared, request: Request, question: Result<query_request::Question, PathRejection>) -> Response {
    let started = Instant::now();
    let outcome = async {
        admit(shared, request).await?;
        let question = question.map_err(|e| ApiError::bad_request(format!("malformed path: {}", e.body_text())))?;
        ask(shared, QueryRequest { question: Some(question) }).await
    }
    .await;
    shared.answer(started, outcome, ApiError::into_json_response)
}

async fn user_view(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
    request: Request,
) -> Response {
    view(&shared, request, path.map(|Path(user)| query_request::Question::UserConnections(user))).await
}

async fn group_view(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
    request: Request,
) -> Response {
    view(&shared, request, path.map(|Path(group)| query_request::Question::GroupMembers(group))).await
}

async fn channel_view(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
    request: Request,
) -> Response {
    view(&shared, request, path.map(|Path(channel)| query_request::Question::ChannelSubscribers(channel))).await
}

/// What `GET /v1/channels/{channel}/history` takes in its query string.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    #[serde(default)]
    limit: u32,
    since_offset: Option<u64>,
    epoch: Option<String>,
}

async fn channel_history(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
    request: Request,
) -> Response {
    let started = Instant::now();
    let outcome = async {
        admit(&shared, request).await?;
        let Path(channel) = path.map_err(|e| ApiError::bad_request(format!("malformed path: {}", e.body_text())))?;
        let Query(query) =
            query.map_err(|e| ApiError::bad_request(format!("malformed query string: {}", e.body_text())))?;
        let since = match (query.since_offset, query.epoch) {
            (None, None) => None,
            (offset, epoch) => Some(StreamPosition { offset: offset.unwrap_or(0), epoch: epoch.unwrap_or_default() }),
        };
        let res = shared
            .broker
            .history(HistoryRequest { channel, since, limit: query.limit })
            .await
            .map_err(|s| ApiError::from_status(&s))?;
        shared.metrics.queries.inc();
        Ok((0, axum::Json(json::history_answer(&res)).into_response()))
    }
    .await;
    shared.answer(started, outcome, ApiError::into_json_response)
}

async fn connection_view(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<(String, String)>, PathRejection>,
    request: Request,
) -> Response {
    let question = path.map(|Path((worker_id, connection_id))| {
        query_request::Question::Connection(ConnectionAddress { worker_id, connection_id })
    });
    view(&shared, request, question).await
}

async fn totals_view(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    view(&shared, request, Ok(query_request::Question::Totals(Totals {}))).await
}

/// `method`, answering any other method 405 with `Allow: allow` and a JSON
/// reason, counted like any refusal.
fn only(method: MethodRouter<Arc<Shared>>, allow: &'static str) -> MethodRouter<Arc<Shared>> {
    method.fallback(move |State(shared): State<Arc<Shared>>| async move {
        let started = Instant::now();
        let err = ApiError { status: StatusCode::METHOD_NOT_ALLOWED, ..ApiError::bad_request(format!("use {allow}")) };
        ([(header::ALLOW, allow)], shared.answer(started, Err(err), ApiError::into_json_response)).into_response()
    })
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        ..ApiError::bad_request(format!(
            "no such endpoint {:?}: use /, POST /v1/publish, /v1/batch, /v1/control, /v1/control/batch or /v1/query, or GET \
             /v1/users/{{user_id}}, /v1/groups/{{group}}, /v1/channels/{{channel}}[/history], \
             /v1/connections/{{worker_id}}/{{connection_id}} or /v1/totals",
            uri.path()
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use axum::body::Body;
    use herald_client::BrokerSession;
    use herald_proto::v1::{
        BindUser, ConnectionInfo, Content, ControlRequest, ControlResponse, ControlResult, HistoryPublication,
        HistoryResponse, PublishRequest, PublishResponse, QueryResponse, content, control_request, target,
    };
    use serde_json::{Value, json};
    use tonic::{Code, Status};
    use tower::ServiceExt;

    use super::*;

    const KEY: &str = "0123456789abcdef-test";

    /// A broker that records what it is asked and answers from a script.
    #[derive(Default)]
    struct FakeBroker {
        publishes: Mutex<Vec<PublishRequest>>,
        controls: Mutex<Vec<ControlRequest>>,
        queries: Mutex<Vec<QueryRequest>>,
        histories: Mutex<Vec<HistoryRequest>>,
        /// When set, every call is refused with this code and message.
        refusal: Mutex<Option<(Code, &'static str)>>,
    }

    impl FakeBroker {
        fn refuse(&self) -> Result<(), Status> {
            match *self.refusal.lock().unwrap() {
                Some((code, message)) => Err(Status::new(code, message)),
                None => Ok(()),
            }
        }
    }

    #[async_trait::async_trait]
    impl Broker for FakeBroker {
        async fn publish(&self, req: PublishRequest) -> Result<PublishResponse, Status> {
            self.refuse()?;
            self.publishes.lock().unwrap().push(req);
            Ok(PublishResponse { subscribers: 1, ..Default::default() })
        }

        async fn publish_batch(&self, requests: Vec<PublishRequest>) -> Result<Vec<PublishResult>, Status> {
            self.refuse()?;
            let results = requests
                .iter()
                .map(|_| PublishResult {
                    outcome: Some(publish_result::Outcome::Published(PublishResponse::default())),
                })
                .collect();
            self.publishes.lock().unwrap().extend(requests);
            Ok(results)
        }

        async fn control(&self, req: ControlRequest) -> Result<ControlResponse, Status> {
            self.refuse()?;
            self.controls.lock().unwrap().push(req);
            Ok(ControlResponse { connections: 2, missing_workers: vec!["w9".into()] })
        }

        async fn control_batch(&self, requests: Vec<ControlRequest>) -> Result<Vec<ControlResult>, Status> {
            self.refuse()?;
            let results = requests
                .iter()
                .map(|_| ControlResult {
                    outcome: Some(control_result::Outcome::Done(ControlResponse {
                        connections: 1,
                        missing_workers: vec![],
                    })),
                })
                .collect();
            self.controls.lock().unwrap().extend(requests);
            Ok(results)
        }

        async fn query(&self, req: QueryRequest) -> Result<QueryResponse, Status> {
            self.refuse()?;
            self.queries.lock().unwrap().push(req);
            Ok(QueryResponse {
                online: true,
                connections: vec![ConnectionInfo {
                    address: Some(ConnectionAddress { worker_id: "w1".into(), connection_id: "7".into() }),
                    user_id: "ana".into(),
                    groups: vec!["room-1".into()],
                    data: [("k".to_owned(), "v".to_owned())].into(),
                    channels: vec!["chat:a".into()],
                }],
                count: 1,
                users: 0,
                missing_workers: vec![],
            })
        }

        async fn history(&self, req: HistoryRequest) -> Result<HistoryResponse, Status> {
            self.refuse()?;
            self.histories.lock().unwrap().push(req);
            Ok(HistoryResponse {
                publications: vec![HistoryPublication {
                    offset: 8,
                    content: Some(Content { body: Some(content::Body::Binary(vec![0, 255].into())) }),
                    published_at: Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 0 }),
                }],
                position: Some(StreamPosition { offset: 9, epoch: "e1".into() }),
                complete: true,
            })
        }

        async fn report_events(&self, _events: &[herald_proto::v1::ConnectionEvent]) -> Result<(), Status> {
            Err(Status::unimplemented("the HTTP gateway reports no events"))
        }

        async fn call(&self, _req: herald_proto::v1::CallRequest) -> Result<herald_proto::v1::CallAnswer, Status> {
            Err(Status::unimplemented("the HTTP gateway makes no calls"))
        }

        async fn open_session(&self) -> Result<BrokerSession, Status> {
            Err(Status::unimplemented("no sessions in this test"))
        }

        async fn probe(&self) -> bool {
            true
        }
    }

    fn gateway(api_keys: Option<&str>) -> (HttpGateway, Arc<FakeBroker>) {
        let broker = Arc::new(FakeBroker::default());
        let config = HttpConfig { api_keys: ApiKeys::parse(api_keys).unwrap(), ..HttpConfig::default() };
        (HttpGateway::new(config, broker.clone()), broker)
    }

    struct Answer {
        status: StatusCode,
        headers: HeaderMap,
        body: Value,
        text: String,
    }

    async fn send(gateway: &HttpGateway, method: &str, uri: &str, body: &str, key: Option<&str>) -> Answer {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(key) = key {
            request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        let request = request.body(Body::from(body.to_owned())).unwrap();
        let response = gateway.router().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Answer { status, headers, body, text }
    }

    fn the_query_answer() -> Value {
        json!({
            "online": true,
            "connections": [{
                "address": {"worker_id": "w1", "connection_id": "7"},
                "user_id": "ana",
                "groups": ["room-1"],
                "data": {"k": "v"},
                "channels": ["chat:a"],
            }],
            "count": 1,
            "users": 0,
            "missing_workers": [],
        })
    }

    fn question(broker: &FakeBroker) -> query_request::Question {
        broker.queries.lock().unwrap().pop().and_then(|q| q.question).unwrap()
    }

    #[tokio::test]
    async fn a_control_reaches_the_broker_and_answers_what_it_changed() {
        let (gateway, broker) = gateway(None);
        let body = r#"{"bind_user":{"connection":{"worker_id":"w1","connection_id":"7"},"user_id":"ana"}}"#;
        let answer = send(&gateway, "POST", "/v1/control", body, None).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
        assert_eq!(answer.body, json!({"connections": 2, "missing_workers": ["w9"]}));
        let sent = broker.controls.lock().unwrap().pop().unwrap();
        assert_eq!(
            sent.op,
            Some(control_request::Op::BindUser(BindUser {
                connection: Some(ConnectionAddress { worker_id: "w1".into(), connection_id: "7".into() }),
                user_id: "ana".into(),
            }))
        );
        assert_eq!(gateway.shared.metrics.controls.get(), 1);
        assert_eq!(gateway.shared.metrics.messages_published.get(), 0);
    }

    #[tokio::test]
    async fn a_control_batch_sends_the_well_formed_controls_together_and_refuses_each_malformed_one_in_its_place() {
        let (gateway, broker) = gateway(None);
        let body = r#"{"requests":[
            {"dissolve_group":"g"},
            {"bind_user":{"connection":{"worker_id":"w1"},"user_id":"ana"}},
            {"unbind_user":{"worker_id":"w1","connection_id":"7"}}
        ]}"#;
        let answer = send(&gateway, "POST", "/v1/control/batch", body, None).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
        let done = json!({"done": {"connections": 1, "missing_workers": []}});
        assert_eq!(answer.body["results"][0], done);
        assert_eq!(answer.body["results"][1]["error"]["code"], json!(3));
        let reason = answer.body["results"][1]["error"]["message"].as_str().unwrap();
        assert!(reason.starts_with("requests[1]: invalid entry:"), "{reason}");
        assert_eq!(answer.body["results"][2], done);
        assert_eq!(answer.body["results"].as_array().map(Vec::len), Some(3));
        let sent: Vec<_> = broker.controls.lock().unwrap().iter().map(|c| c.op.clone()).collect();
        assert_eq!(
            sent,
            [
                Some(control_request::Op::DissolveGroup("g".into())),
                Some(control_request::Op::UnbindUser(ConnectionAddress {
                    worker_id: "w1".into(),
                    connection_id: "7".into()
                })),
            ]
        );
        assert_eq!(gateway.shared.metrics.controls.get(), 2);

        for body in [r#"{"controls":[]}"#, r#"{"requests":{}}"#, "["] {
            let answer = send(&gateway, "POST", "/v1/control/batch", body, None).await;
            assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}");
        }
        *broker.refusal.lock().unwrap() = Some((Code::Unavailable, "shutting down"));
        let answer =
            send(&gateway, "POST", "/v1/control/batch", r#"{"requests":[{"dissolve_group":"g"}]}"#, None).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{}", answer.text);
    }

    #[tokio::test]
    async fn a_malformed_control_is_400_in_json_and_never_reaches_the_broker() {
        let (gateway, broker) = gateway(None);
        for body in [r#"{}"#, r#"{"dissolve_group":"g","unbind_user":{"worker_id":"w","connection_id":"1"}}"#, "{"] {
            let answer = send(&gateway, "POST", "/v1/control", body, None).await;
            assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(answer.body["error"]["code"], json!(3), "{body}");
            assert_eq!(answer.text.lines().count(), 1, "{body}");
        }
        assert!(broker.controls.lock().unwrap().is_empty());
        assert_eq!(gateway.shared.metrics.controls.get(), 0);
    }

    #[tokio::test]
    async fn broker_refusals_of_controls_and_queries_map_to_http_statuses() {
        let cases = [
            (Code::NotFound, StatusCode::NOT_FOUND, "connection w1/7 is not live"),
            (Code::DeadlineExceeded, StatusCode::GATEWAY_TIMEOUT, "outcome unknown: gateway w2 did not confirm"),
            (Code::Unavailable, StatusCode::SERVICE_UNAVAILABLE, "broker unavailable: shutting down"),
            (Code::InvalidArgument, StatusCode::BAD_REQUEST, "user id \"a b\" is not visible ASCII"),
        ];
        for (code, http, message) in cases {
            let (gateway, broker) = gateway(None);
            let refusal = message.split_once(": ").map_or(message, |(_, m)| m);
            *broker.refusal.lock().unwrap() = Some((code, refusal));
            let control = r#"{"close":{"selection":{"connection":{"worker_id":"w1","connection_id":"7"}}}}"#;
            for (method, uri, body) in [
                ("POST", "/v1/control", control),
                ("POST", "/v1/query", r#"{"user_online":"ana"}"#),
                ("GET", "/v1/totals", ""),
            ] {
                let answer = send(&gateway, method, uri, body, None).await;
                assert_eq!(answer.status, http, "{code:?} {uri}: {}", answer.text);
                assert_eq!(answer.body, json!({"error": {"code": code as i32, "message": message}}), "{uri}");
            }
            assert_eq!(gateway.shared.metrics.controls.get() + gateway.shared.metrics.queries.get(), 0);
        }
    }

    #[tokio::test]
    async fn a_query_answers_with_every_field() {
        let (gateway, broker) = gateway(None);
        let answer = send(&gateway, "POST", "/v1/query", r#"{"group_count":"room-1"}"#, None).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
        assert_eq!(answer.body, the_query_answer());
        assert_eq!(question(&broker), query_request::Question::GroupCount("room-1".into()));
        let answer = send(&gateway, "POST", "/v1/query", r#"{"channel_count":"chat:a"}"#, None).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
        assert_eq!(question(&broker), query_request::Question::ChannelCount("chat:a".into()));
        let answer = send(&gateway, "GET", "/v1/channels/chat:a", "", None).await;
        assert_eq!(answer.body, the_query_answer());
        assert_eq!(question(&broker), query_request::Question::ChannelSubscribers("chat:a".into()));
        let answer = send(&gateway, "POST", "/v1/query", r#"{"totals":{},"user_online":"ana"}"#, None).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST);
        assert_eq!(gateway.shared.metrics.queries.get(), 3);
        assert_eq!(gateway.shared.metrics.messages_published.get(), 0);
    }

    #[tokio::test]
    async fn a_channel_history_is_read_newest_or_after_a_position() {
        let (gateway, broker) = gateway(None);
        let answer =
            send(&gateway, "GET", "/v1/channels/feed:a/history?since_offset=7&epoch=e1&limit=50", "", None).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
        assert_eq!(
            answer.body,
            json!({"publications": [{"offset": 8, "content": {"binary": "AP8="}, "published_at": "2023-11-14T22:13:20Z"}],
                "position": {"offset": 9, "epoch": "e1"}, "complete": true})
        );
        let asked = broker.histories.lock().unwrap().pop().unwrap();
        let since = Some(StreamPosition { offset: 7, epoch: "e1".into() });
        assert_eq!(asked, HistoryRequest { channel: "feed:a".into(), since, limit: 50 });
        send(&gateway, "GET", "/v1/channels/feed:a/history", "", None).await;
        let asked = broker.histories.lock().unwrap().pop().unwrap();
        assert_eq!((asked.since, asked.limit), (None, 0), "no position: the newest, none by default");
        for bad in ["limit=-1", "since_offset=x", "top=3"] {
            let answer = send(&gateway, "GET", &format!("/v1/channels/feed:a/history?{bad}"), "", None).await;
            assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{bad}");
            assert!(answer.text.contains("malformed query string"), "{bad}: {}", answer.text);
        }
        *broker.refusal.lock().unwrap() = Some((Code::FailedPrecondition, "channel \"chat:a\" keeps no history"));
        let answer = send(&gateway, "GET", "/v1/channels/chat:a/history", "", None).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.text);
    }

    #[tokio::test]
    async fn read_only_views_ask_the_question_their_path_names() {
        let (gateway, broker) = gateway(None);
        let cases = [
            ("/v1/users/ana%40example.com", query_request::Question::UserConnections("ana@example.com".into())),
            ("/v1/users/a%2Fb", query_request::Question::UserConnections("a/b".into())),
            ("/v1/groups/room-1", query_request::Question::GroupMembers("room-1".into())),
            (
                "/v1/connections/w1/7",
                query_request::Question::Connection(ConnectionAddress {
                    worker_id: "w1".into(),
                    connection_id: "7".into(),
                }),
            ),
            ("/v1/totals", query_request::Question::Totals(Totals {})),
        ];
        for (uri, expected) in cases {
            let answer = send(&gateway, "GET", uri, "", None).await;
            assert_eq!(answer.status, StatusCode::OK, "{uri}: {}", answer.text);
            assert_eq!(answer.body, the_query_answer(), "{uri}");
            assert_eq!(question(&broker), expected, "{uri}");
        }
        assert_eq!(gateway.shared.metrics.queries.get(), 5);

        let answer = send(&gateway, "GET", "/v1/users/%ff", "", None).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.text);
        assert!(answer.body["error"]["message"].as_str().unwrap().starts_with("malformed path: "), "{}", answer.text);
        for uri in ["/v1/users/", "/v1/users/a/b", "/v1/connections/w1", "/v1/totals/x"] {
            let answer = send(&gateway, "GET", uri, "", None).await;
            assert_eq!(answer.status, StatusCode::NOT_FOUND, "{uri}");
        }
        assert!(broker.queries.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn wrong_methods_are_405_with_allow() {
        let (gateway, _) = gateway(None);
        let cases = [
            ("GET", "/v1/publish", "POST"),
            ("PUT", "/v1/batch", "POST"),
            ("GET", "/v1/control", "POST"),
            ("GET", "/v1/control/batch", "POST"),
            ("DELETE", "/v1/query", "POST"),
            ("POST", "/v1/users/ana", "GET, HEAD"),
            ("DELETE", "/v1/groups/g", "GET, HEAD"),
            ("PUT", "/v1/connections/w1/7", "GET, HEAD"),
            ("POST", "/v1/totals", "GET, HEAD"),
        ];
        for (method, uri, allow) in cases {
            let answer = send(&gateway, method, uri, "{}", None).await;
            assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {uri}");
            assert_eq!(answer.headers[header::ALLOW], allow, "{method} {uri}");
            assert_eq!(answer.body["error"]["message"], json!(format!("use {allow}")), "{method} {uri}");
        }
    }

    #[tokio::test]
    async fn every_endpoint_takes_the_api_key() {
        let (gateway, broker) = gateway(Some(KEY));
        let cases = [
            ("POST", "/v1/publish", r#"{"target":{"broadcast":{}},"content":{"text":"x"}}"#),
            ("POST", "/v1/control", r#"{"dissolve_group":"g"}"#),
            ("POST", "/v1/control/batch", r#"{"requests":[{"dissolve_group":"g"}]}"#),
            ("POST", "/v1/query", r#"{"totals":{}}"#),
            ("GET", "/v1/users/ana", ""),
            ("GET", "/v1/groups/g", ""),
            ("GET", "/v1/channels/chat:a", ""),
            ("GET", "/v1/connections/w1/7", ""),
            ("GET", "/v1/totals", ""),
            // The key is checked before the path.
            ("GET", "/v1/users/%ff", ""),
        ];
        for (method, uri, body) in cases {
            for key in [None, Some("wrong-key-0123456789")] {
                let answer = send(&gateway, method, uri, body, key).await;
                assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{method} {uri}");
                assert_eq!(answer.headers[header::WWW_AUTHENTICATE], "Bearer", "{method} {uri}");
                assert_eq!(answer.body["error"]["code"], json!(16), "{method} {uri}");
            }
        }
        assert!(broker.controls.lock().unwrap().is_empty() && broker.queries.lock().unwrap().is_empty());
        assert!(broker.publishes.lock().unwrap().is_empty());
        assert_eq!(gateway.shared.metrics.auth_failures.get(), 20);
        for (method, uri, body) in &cases[..9] {
            let answer = send(&gateway, method, uri, body, Some(KEY)).await;
            assert_eq!(answer.status, StatusCode::OK, "{method} {uri}: {}", answer.text);
        }
    }

    #[tokio::test]
    async fn a_json_publish_carries_its_target_and_exceptions() {
        let (gateway, broker) = gateway(None);
        let body = r#"{"target":{"group":"room-1","except":[{"worker_id":"w1","connection_id":"17"}]},"content":{"text":"hi"}}"#;
        let answer = send(&gateway, "POST", "/v1/publish", body, None).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
        assert_eq!(answer.body, json!({"subscribers": 1}));
        let target = broker.publishes.lock().unwrap().pop().and_then(|p| p.target).unwrap();
        assert_eq!(target.kind, Some(target::Kind::Group("room-1".into())));
        assert_eq!(target.except, [ConnectionAddress { worker_id: "w1".into(), connection_id: "17".into() }]);
        assert_eq!(gateway.shared.metrics.messages_published.get(), 1);

        let answer = send(&gateway, "POST", "/v1/publish", r#"{"target":{},"content":{"text":"hi"}}"#, None).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            answer.body["error"]["message"],
            "target needs exactly one of broadcast, connection, channel, user or group"
        );
    }

    #[tokio::test]
    async fn an_unknown_endpoint_lists_the_real_ones() {
        let (gateway, _) = gateway(None);
        let answer = send(&gateway, "GET", "/v2/nothing", "", None).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND);
        assert_eq!(answer.text.lines().count(), 1);
        for endpoint in [
            "/v1/publish",
            "/v1/batch",
            "/v1/control",
            "/v1/query",
            "/v1/users/",
            "/v1/groups/",
            "/v1/connections/",
            "/v1/totals",
        ] {
            assert!(answer.text.contains(endpoint), "{endpoint}: {}", answer.text);
        }
    }
}
