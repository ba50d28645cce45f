//! The broker's gRPC server: `herald.v1.BrokerService`, server reflection (v1
//! and v1alpha, so any `grpcurl` works without the `.proto`) and the standard
//! `grpc.health.v1` service. Reflection and health stay open when API keys
//! are required, so probes and discovery need no secret. With TLS
//! configured the port speaks only TLS ([`crate::tls`]).

use std::time::Duration;

use herald_common::auth::ApiKeys;
use herald_proto::v1::broker_service_server::BrokerServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::hub::Hub;
use crate::service::{Authorize, BrokerGrpc};
use crate::tls::ServerTls;

/// Why the gRPC server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Largest gRPC message the broker decodes (a full `PublishBatch`), unless
/// the content limit asks for more.
const MAX_DECODING_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// How long calls still open at shutdown may take to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Room for a message's own fields around its content.
const ENVELOPE_BYTES: usize = 1024 * 1024;

/// How the gRPC server admits callers.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Keys publishers and gateways must present; none means no auth.
    pub api_keys: ApiKeys,
    /// Most concurrent calls (streams) on one HTTP/2 connection.
    pub max_concurrent_streams: u32,
    /// Serve TLS (and require client certificates, when mutual) instead of
    /// plaintext.
    pub tls: Option<ServerTls>,
}

/// Most concurrent calls on one HTTP/2 connection, by default.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 1024;

impl Default for ServerOptions {
    fn default() -> Self {
        Self { api_keys: ApiKeys::default(), max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS, tls: None }
    }
}

/// Serves the broker on `listener` until `shutdown` is cancelled. On shutdown
/// every subscriber session is ended with `UNAVAILABLE` (so gateways move on)
/// and in-flight calls are allowed to finish.
pub async fn serve(
    listener: TcpListener,
    hub: Hub,
    options: ServerOptions,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<BrokerServiceServer<BrokerGrpc>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(herald_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(herald_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let max_decoding = MAX_DECODING_MESSAGE_BYTES.max(hub.max_content_bytes().saturating_add(ENVELOPE_BYTES));
    let broker = InterceptedService::new(
        BrokerServiceServer::new(BrokerGrpc::new(hub.clone())).max_decoding_message_size(max_decoding),
        Authorize::new(options.api_keys, hub.clone()),
    );
    let stopped = shutdown.clone();
    let handshakes_hub = hub.clone();
    let drain = async move {
        // The health status follows readiness (a clustered broker without
        // NATS is NOT_SERVING), so publishers' probes move elsewhere.
        let mut ticker = tokio::time::interval(Duration::from_millis(500));
        let mut serving = true;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = ticker.tick() => {
                    let ready = hub.unready_reason().is_none();
                    if ready != serving {
                        serving = ready;
                        if ready {
                            health.set_serving::<BrokerServiceServer<BrokerGrpc>>().await;
                        } else {
                            health.set_not_serving::<BrokerServiceServer<BrokerGrpc>>().await;
                        }
                    }
                }
            }
        }
        health.set_not_serving::<BrokerServiceServer<BrokerGrpc>>().await;
        hub.shut_down();
    };
    let router = Server::builder()
        .max_concurrent_streams(options.max_concurrent_streams)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(broker);
    let server: std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> = match options.tls
    {
        Some(tls) => Box::pin(router.serve_with_incoming_shutdown(tls.incoming(listener, handshakes_hub), drain)),
        None => {
            let incoming =
                TcpIncoming::from(listener).with_nodelay(Some(true)).with_keepalive(Some(Duration::from_secs(30)));
            Box::pin(router.serve_with_incoming_shutdown(incoming, drain))
        }
    };
    // A caller that keeps a stream open (a reflection stream, a backend
    // that ignores the end of its calls) cannot hold the broker up for good.
    let overdue = async {
        stopped.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        served = server => served?,
        () = overdue => tracing::warn!("calls still open {SHUTDOWN_GRACE:?} after shutdown began: cut off"),
    }
    Ok(())
}
