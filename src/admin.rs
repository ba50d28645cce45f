//! Each role's admin endpoints, on a port of their own:
//!
//! - `GET /metrics`: Prometheus text format;
//! - `GET /healthz`: 200 while the process serves;
//! - `GET /` or `/status`: a live status page for people (it reads `/metrics`);
//! - `GET /readyz`: 200 when the role can do its job (a gateway is linked to a
//!   broker, a broker is connected to its cluster and not shutting down),
//!   else 503 with the reason.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use herald_broker::Hub;
use herald_common::http::HttpServerOptions;
use herald_common::metrics::Exposition;
use herald_gateway_http::HttpGateway;
use herald_gateway_ws::Gateway;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Most connections the admin endpoints serve at once (probes and scrapers);
/// they live on the descriptors kept free from clients.
const MAX_CONNECTIONS: usize = 64;

/// A role served by this process.
#[derive(Clone)]
pub enum Component {
    Broker(Hub),
    Ws(Gateway),
    Http(HttpGateway),
}

impl Component {
    fn role(&self) -> &'static str {
        match self {
            Self::Broker(_) => "broker",
            Self::Ws(_) => "ws",
            Self::Http(_) => "http",
        }
    }

    fn render(&self, out: &mut Exposition) {
        match self {
            Self::Broker(hub) => hub.render_metrics(out),
            Self::Ws(gateway) => gateway.render_metrics(out),
            Self::Http(http) => http.render_metrics(out),
        }
    }

    fn readiness(&self) -> Result<(), String> {
        match self {
            Self::Broker(hub) => hub.unready_reason().map_or(Ok(()), |reason| Err(format!("broker: {reason}"))),
            Self::Ws(gateway) if !gateway.is_linked() => {
                Err(format!("ws gateway {}: not linked to a broker", gateway.worker_id()))
            }
            Self::Http(http) if !http.is_ready() => Err("http gateway: no broker answers its health check".into()),
            _ => Ok(()),
        }
    }
}

/// What the admin endpoints serve.
#[derive(Clone)]
struct Admin {
    components: Vec<Component>,
    started_unix_seconds: f64,
}

/// Serves the admin endpoints for `components` until `shutdown`.
pub async fn run(listener: TcpListener, components: Vec<Component>, shutdown: CancellationToken) {
    let started_unix_seconds = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/", get(status_page))
        .route("/status", get(status_page))
        .with_state(Admin { components, started_unix_seconds });
    let options =
        HttpServerOptions { max_connections: MAX_CONNECTIONS, client_facing: false, ..HttpServerOptions::default() };
    herald_common::http::serve(listener, app, options, None, shutdown).await;
}

/// The live status page: a self-contained HTML page that reads `/metrics`.
async fn status_page() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], include_str!("status.html"))
}

async fn metrics(State(admin): State<Admin>) -> impl IntoResponse {
    let mut out = Exposition::new();
    let roles: Vec<&str> = admin.components.iter().map(Component::role).collect();
    out.info(
        "herald_build_info",
        "The herald version and the roles this process runs.",
        &[("version", env!("CARGO_PKG_VERSION")), ("roles", &roles.join(","))],
    );
    out.gauge(
        "herald_process_start_time_seconds",
        "When this process started, in Unix seconds.",
        admin.started_unix_seconds,
    );
    for c in &admin.components {
        c.render(&mut out);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], out.finish())
}

async fn readyz(State(admin): State<Admin>) -> impl IntoResponse {
    let problems: Vec<String> = admin.components.iter().filter_map(|c| c.readiness().err()).collect();
    if problems.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", problems.join("; ")))
    }
}
