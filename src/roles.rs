//! Runs each role: binds its listeners (announcing them on stdout), wires
//! the library crates together and shuts them down in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use herald_broker::Hub;
use herald_broker::federation::nats::{NatsConfig, NatsFederation};
use herald_broker::server::ServerOptions;
use herald_broker::tls::ServerTls;
use herald_client::{Broker, RemoteBrokers};
use herald_common::auth::ApiKeys;
use herald_common::net;
use herald_common::tls::{ALPN_HTTP, ALPN_WEBSOCKET};
use herald_gateway_http::HttpGateway;
use herald_gateway_ws::Gateway;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Component};
use crate::cli::{BrokerArgs, BrokerLinkArgs, BrokerOptions, HttpArgs, StandaloneArgs, WsArgs};

fn bind(kind: &str, addr: SocketAddr, reuse_port: bool) -> anyhow::Result<TcpListener> {
    let listener = bind_unannounced(kind, addr, reuse_port)?;
    net::announce(kind, listener.local_addr()?);
    Ok(listener)
}

/// Binds a listener to be announced later, when it is really serving.
fn bind_unannounced(kind: &str, addr: SocketAddr, reuse_port: bool) -> anyhow::Result<TcpListener> {
    net::bind(addr, reuse_port).with_context(|| format!("cannot listen for {kind} on {addr}"))
}

fn remote_brokers(addresses: &str, keys: &ApiKeys, link: &BrokerLinkArgs) -> anyhow::Result<Arc<dyn Broker>> {
    let options = link.remote_options(keys.outgoing())?;
    Ok(Arc::new(RemoteBrokers::parse(addresses, &options)?))
}

/// Publishers would send their keys to this role in clear over the network.
/// That is their side's choice (herald's own roles refuse it unless told),
/// but the operator is told at start.
fn warn_if_keys_travel_in_clear(keys: &ApiKeys, listeners: &[(&str, SocketAddr)], tls: bool) {
    if !keys.is_enabled() || tls {
        return;
    }
    for (what, addr) in listeners.iter().filter(|(_, addr)| !addr.ip().is_loopback()) {
        tracing::warn!(%addr, "{what} send their API key in clear to this plaintext listener; consider --tls-cert");
    }
}

fn server_options(keys: ApiKeys, broker: &BrokerOptions, tls: Option<ServerTls>) -> ServerOptions {
    if let Some(tls) = &tls {
        tracing::info!(client_certificates_required = tls.is_mutual(), "the broker's gRPC port serves TLS");
    }
    ServerOptions { api_keys: keys, max_concurrent_streams: broker.max_concurrent_streams, tls }
}

/// Serves the admin endpoints until `stop`, in the background.
fn spawn_admin(
    addr: SocketAddr,
    components: Vec<Component>,
    stop: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = bind("admin", addr, false)?;
    Ok(tokio::spawn(admin::run(listener, components, stop)))
}

/// Waits for the admin server started by [`spawn_admin`] after stopping it.
async fn stop_admin(stop: CancellationToken, admin: tokio::task::JoinHandle<()>) -> anyhow::Result<()> {
    stop.cancel();
    admin.await.context("admin server task")
}

pub async fn broker(args: BrokerArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let keys = args.auth.keys_for(&[("gRPC publishers", args.listen)])?;
    let tls = args.tls.grpc(&args.client_ca)?;
    warn_if_keys_travel_in_clear(&keys, &[("gRPC publishers", args.listen)], tls.is_some());
    let namespaces = args.namespaces.namespaces()?;
    let limits = args.content.hub_limits(&args.broker, namespaces.clone(), herald_broker::hub::DEFAULT_STARTUP_GRACE);
    let hub = match args.cluster.nats_config(namespaces)? {
        Some(config) => {
            let config = NatsConfig { dedup_window: args.broker.dedup_window, events: limits.events.clone(), ..config };
            let (federation, notices) = NatsFederation::join(config).await?;
            Hub::federated(limits, federation, notices)
        }
        None => Hub::new(limits),
    };
    if let Some(webhook) = args.broker.webhook()? {
        tokio::spawn(webhook.run(hub.clone(), shutdown.clone()));
    }
    let listener = bind("broker", args.listen, false)?;
    let admin_stop = CancellationToken::new();
    let admin = spawn_admin(args.admin_listen, vec![Component::Broker(hub.clone())], admin_stop.clone())?;
    herald_broker::server::serve(listener, hub, server_options(keys, &args.broker, tls), shutdown).await?;
    stop_admin(admin_stop, admin).await
}

pub async fn ws(args: WsArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let broker = remote_brokers(&args.brokers, &args.key.keys()?, &args.link)?;
    let tls = args.tls.acceptor(ALPN_WEBSOCKET)?;
    let gateway = Gateway::new(args.ws.gateway_config(args.namespaces.namespaces()?)?)?;
    let listener = bind_unannounced("ws", args.listen, args.reuse_port)?;
    let address = listener.local_addr()?;
    let admin_stop = CancellationToken::new();
    let admin = spawn_admin(args.admin_listen, vec![Component::Ws(gateway.clone())], admin_stop.clone())?;
    let mut run = tokio::spawn(gateway.clone().run(listener, tls, broker, shutdown));
    // Claim first, announce after: a gateway whose worker id is refused
    // exits without having said that it listens.
    let result = tokio::select! {
        ended = &mut run => ended,
        () = gateway.claim_settled() => {
            net::announce("ws", address);
            net::say(&format!("herald: worker id {}", gateway.worker_id()));
            run.await
        }
    };
    stop_admin(admin_stop, admin).await?;
    Ok(result.context("gateway task")??)
}

pub async fn http(args: HttpArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let keys = args.auth.keys_for(&[("HTTP publishers", args.listen)])?;
    let broker = remote_brokers(&args.brokers, &keys, &args.link)?;
    let tls = args.tls.acceptor(ALPN_HTTP)?;
    warn_if_keys_travel_in_clear(&keys, &[("HTTP publishers", args.listen)], tls.is_some());
    let http = HttpGateway::new(args.content.http_config(&args.http, keys), broker);
    let listener = bind("http", args.listen, false)?;
    let admin_stop = CancellationToken::new();
    let admin = spawn_admin(args.admin_listen, vec![Component::Http(http.clone())], admin_stop.clone())?;
    http.run(listener, tls, shutdown).await;
    stop_admin(admin_stop, admin).await
}

/// All three roles in one process. The gateways reach the broker in-process;
/// the broker's gRPC port is served too, for other gateways and publishers.
/// On shutdown the gateways drain first, then the broker.
pub async fn standalone(args: StandaloneArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let keys = args.auth.keys_for(&[("gRPC publishers", args.broker_listen), ("HTTP publishers", args.http_listen)])?;
    let namespaces = args.namespaces.namespaces()?;
    let hub = Hub::new(args.content.hub_limits(&args.broker, namespaces.clone(), Duration::ZERO));
    if let Some(webhook) = args.broker.webhook()? {
        tokio::spawn(webhook.run(hub.clone(), shutdown.clone()));
    }
    let local: Arc<dyn Broker> = Arc::new(hub.clone());
    let gateway = Gateway::new(args.ws.gateway_config(namespaces)?)?;
    let http = HttpGateway::new(args.content.http_config(&args.http, keys.clone()), local.clone());
    let ws_tls = args.tls.acceptor(ALPN_WEBSOCKET)?;
    let http_tls = args.tls.acceptor(ALPN_HTTP)?;
    let grpc_tls = args.tls.grpc(&args.client_ca)?;
    let listeners = [("gRPC publishers", args.broker_listen), ("HTTP publishers", args.http_listen)];
    warn_if_keys_travel_in_clear(&keys, &listeners, grpc_tls.is_some());

    let broker_listener = bind("broker", args.broker_listen, false)?;
    let ws_listener = bind("ws", args.ws_listen, false)?;
    let http_listener = bind("http", args.http_listen, false)?;
    net::say(&format!("herald: worker id {}", gateway.worker_id()));
    let components =
        vec![Component::Broker(hub.clone()), Component::Ws(gateway.clone()), Component::Http(http.clone())];
    let admin_stop = CancellationToken::new();
    let admin = spawn_admin(args.admin_listen, components, admin_stop.clone())?;

    let broker_stop = CancellationToken::new();
    let options = server_options(keys, &args.broker, grpc_tls);
    let broker = tokio::spawn(herald_broker::server::serve(broker_listener, hub, options, broker_stop.clone()));
    let gateways = async {
        let (ws, ()) = tokio::join!(
            gateway.run(ws_listener, ws_tls, local, shutdown.clone()),
            http.run(http_listener, http_tls, shutdown.clone())
        );
        // Whichever gateway ended, the others follow.
        shutdown.cancel();
        ws
    };
    let result = gateways.await;
    broker_stop.cancel();
    broker.await.context("broker task")??;
    stop_admin(admin_stop, admin).await?;
    Ok(result?)
}
