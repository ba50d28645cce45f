//! herald's HTTP gateway: turns HTTP requests into broker publishes.
//!
//! - `GET|POST /?content=…[&to_worker_id=…&to_connection_id=…]`: the classic
//!   API ([`classic`]), answering `ok`;
//! - `POST /v1/publish` and `POST /v1/batch`: the JSON API ([`json`]).
//!
//! Failures are never answered `ok`: 400 for malformed input, 401 without an
//! accepted API key (when keys are configured), 404 for an unknown worker,
//! 413 for oversized content or bodies, 503 when no broker can be reached
//! ([`error`]).

pub mod classic;
pub mod error;
pub mod json;
mod metrics;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use bytes::Bytes;
use herald_client::Broker;
use herald_common::auth::ApiKeys;
use herald_common::http::HttpServerOptions;
use herald_common::metrics::Exposition;
use herald_proto::v1::{PublishResult, publish_result};
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
            .route("/v1/publish", post(json_publish))
            .route("/v1/batch", post(json_batch))
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
    /// Counts and answers a publish request that started at `started`: on
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

/// What every publish request goes through: the API key, on the headers
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
        // Entries go to the broker together; each refused one keeps its
        // place among their results.
        let mut requests = Vec::new();
        let mut refusals = Vec::new();
        for entry in json::parse_body::<json::BatchBody>(&body)?.into_entries() {
            match entry {
                Ok(req) => {
                    requests.push(req);
                    refusals.push(None);
                }
                Err(e) => refusals.push(Some(json::refused(&e))),
            }
        }
        let mut routed = if requests.is_empty() {
            Vec::new()
        } else {
            shared.broker.publish_batch(requests).await.map_err(|s| ApiError::from_status(&s))?
        }
        .into_iter();
        let results: Vec<PublishResult> =
            refusals.into_iter().filter_map(|refusal| refusal.or_else(|| routed.next())).collect();
        let accepted =
            results.iter().filter(|r| matches!(r.outcome, Some(publish_result::Outcome::Published(_)))).count();
        Ok((accepted as u64, axum::Json(json::batch_results(&results)).into_response()))
    }
    .await;
    shared.answer(started, outcome, ApiError::into_json_response)
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        ..ApiError::bad_request(format!("no such endpoint {:?}: use /, /v1/publish or /v1/batch", uri.path()))
    }
}
