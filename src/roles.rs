//! Runs each role: binds its listeners (announcing them on stdout), wires
//! the library crates together and shuts them down in order.

use std::net::SocketAddr;

use anyhow::Context;
use herald_broker::client::{RemoteBrokers, RemoteOptions};
use herald_broker::{BrokerClient, Hub};
use herald_common::net;
use herald_gateway_http::HttpGateway;
use herald_gateway_ws::Gateway;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Component};
use crate::cli::{BrokerArgs, HttpArgs, StandaloneArgs, WsArgs};

fn bind(kind: &str, addr: SocketAddr, reuse_port: bool) -> anyhow::Result<TcpListener> {
    let listener = net::bind(addr, reuse_port).with_context(|| format!("cannot listen for {kind} on {addr}"))?;
    net::announce(kind, listener.local_addr()?);
    Ok(listener)
}

fn remote_brokers(addresses: &str) -> anyhow::Result<BrokerClient> {
    Ok(BrokerClient::Remote(RemoteBrokers::parse(addresses, &RemoteOptions::default())?))
}

/// Serves the admin endpoints until `stop`, in the background.
fn spawn_admin(
    addr: SocketAddr,
    components: Vec<Component>,
    stop: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    let listener = bind("admin", addr, false)?;
    Ok(tokio::spawn(admin::run(listener, components, stop)))
}

/// Waits for the admin server started by [`spawn_admin`] after stopping it.
async fn stop_admin(
    stop: CancellationToken,
    admin: tokio::task::JoinHandle<std::io::Result<()>>,
) -> anyhow::Result<()> {
    stop.cancel();
    admin.await.context("admin server task")?.context("admin server")
}

pub async fn broker(args: BrokerArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let hub = Hub::new(args.content.hub_limits(&args.broker));
    let listener = bind("broker", args.listen, false)?;
    let admin_stop = CancellationToken::new();
    let admin = spawn_admin(args.admin_listen, vec![Component::Broker(hub.clone())], admin_stop.clone())?;
    herald_broker::server::serve(listener, hub, shutdown).await?;
    stop_admin(admin_stop, admin).await
}

pub async fn ws(args: WsArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let broker = remote_brokers(&args.brokers)?;
    let gateway = Gateway::new(args.ws.gateway_config())?;
    let listener = bind("ws", args.listen, args.reuse_port)?;
    println!("herald: worker id {}", gateway.worker_id());
    let admin_stop = CancellationToken::new();
    let admin = spawn_admin(args.admin_listen, vec![Component::Ws(gateway.clone())], admin_stop.clone())?;
    let result = gateway.run(listener, broker, shutdown).await;
    stop_admin(admin_stop, admin).await?;
    Ok(result?)
}

pub async fn http(args: HttpArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let broker = remote_brokers(&args.brokers)?;
    let http = HttpGateway::new(args.content.http_config(&args.http), broker);
    let listener = bind("http", args.listen, false)?;
    let admin_stop = CancellationToken::new();
    let admin = spawn_admin(args.admin_listen, vec![Component::Http(http.clone())], admin_stop.clone())?;
    http.run(listener, shutdown).await.context("HTTP server")?;
    stop_admin(admin_stop, admin).await
}

/// All three roles in one process. The gateways reach the broker in-process;
/// the broker's gRPC port is served too, for other gateways and publishers.
/// On shutdown the gateways drain first, then the broker.
pub async fn standalone(args: StandaloneArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let hub = Hub::new(args.content.hub_limits(&args.broker));
    let local = BrokerClient::Local(hub.clone());
    let gateway = Gateway::new(args.ws.gateway_config())?;
    let http = HttpGateway::new(args.content.http_config(&args.http), local.clone());

    let broker_listener = bind("broker", args.broker_listen, false)?;
    let ws_listener = bind("ws", args.ws_listen, false)?;
    let http_listener = bind("http", args.http_listen, false)?;
    println!("herald: worker id {}", gateway.worker_id());
    let components =
        vec![Component::Broker(hub.clone()), Component::Ws(gateway.clone()), Component::Http(http.clone())];
    let admin_stop = CancellationToken::new();
    let admin = spawn_admin(args.admin_listen, components, admin_stop.clone())?;

    let broker_stop = CancellationToken::new();
    let broker = tokio::spawn(herald_broker::server::serve(broker_listener, hub, broker_stop.clone()));
    let gateways = async {
        let (ws, http) =
            tokio::join!(gateway.run(ws_listener, local, shutdown.clone()), http.run(http_listener, shutdown.clone()));
        // Whichever gateway ended, the others follow.
        shutdown.cancel();
        ws?;
        http.context("HTTP server")
    };
    let result = gateways.await;
    broker_stop.cancel();
    broker.await.context("broker task")??;
    stop_admin(admin_stop, admin).await?;
    result
}
