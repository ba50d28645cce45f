//! Each role's admin endpoints, on a port of their own:
//!
//! - `GET /metrics`: Prometheus text format;
//! - `GET /healthz`: 200 while the process serves;
//! - `GET /readyz`: 200 when the role can do its job (a gateway is linked to a
//!   broker, a broker is connected to its cluster and not shutting down),
//!   else 503 with the reason.

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

/// A role served by this process.
#[derive(Clone)]
pub enum Component {
    Broker(Hub),
    Ws(Gateway),
    Http(HttpGateway),
}

impl Component {
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

/// Serves the admin endpoints for `components` until `shutdown`.
pub async fn run(listener: TcpListener, components: Vec<Component>, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(components);
    herald_common::http::serve(listener, app, HttpServerOptions::default(), None, shutdown).await;
}

async fn metrics(State(components): State<Vec<Component>>) -> impl IntoResponse {
    let mut out = Exposition::new();
    for c in &components {
        c.render(&mut out);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], out.finish())
}

async fn readyz(State(components): State<Vec<Component>>) -> impl IntoResponse {
    let problems: Vec<String> = components.iter().filter_map(|c| c.readiness().err()).collect();
    if problems.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", problems.join("; ")))
    }
}
