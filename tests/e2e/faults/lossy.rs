//! A bad network under load: 2% of the packets every host receives are
//! dropped, and the links from the gateways to their brokers add
//! 50 ms ± 20 ms each way, while a flood of broadcasts, messages to single
//! connections and history publications crosses a two-broker cluster.
//!
//! TCP hides the loss and the jitter from herald, so nothing may be lost:
//! every client gets every message meant for it, once and in order, and
//! the history channel's follower on the far broker gets it whole.

use std::time::{Duration, Instant};

use super::net::Network;
use super::partitions::traffic::{self, Tally, Traffic};
use super::proxy::Proxy;
use crate::follower::Follower;
use crate::support::{Client, Herald};

const HISTORY: [&str; 2] = ["--namespace", "feed:subscribe=anyone,history=10000,history_ttl=2m"];
const FEED: &str = "feed:live";
/// Ticks published while the network is bad, then after it is good again.
const LOSSY_TICKS: u64 = 1500;
const CLEAN_TICKS: u64 = 200;
/// Publications on the history channel meanwhile: each waits for its
/// storage in JetStream, across the lossy network.
const HISTORY_PUBLICATIONS: u64 = 400;
const LOSS_PERCENT: f64 = 2.0;
const LATENCY: Duration = Duration::from_millis(50);
const JITTER: Duration = Duration::from_millis(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_through_2_percent_loss_and_jittery_broker_links_arrives_whole() {
    let Some(net) = Network::new(&["nats", "broker-1", "broker-2", "gateway-1", "gateway-2"]) else { return };
    let Some(nats) = net.host("nats").nats() else { return };
    let nats_url = nats.url();
    let cluster = [&["--nats", &nats_url][..], &HISTORY].concat();
    let brokers = [net.host("broker-1").broker(&cluster), net.host("broker-2").broker(&cluster)];
    // Each gateway reaches its broker through a proxy in the test process,
    // on the bridge's address: the latency goes there.
    let mut proxies = Vec::new();
    for broker in &brokers {
        proxies.push(Proxy::start((net.harness_ip, 0).into(), broker.addr("broker")).await);
    }
    let gateways: Vec<Herald> = ["gateway-1", "gateway-2"]
        .iter()
        .zip(&proxies)
        .map(|(host, proxy)| net.host(host).ws(&proxy.addr().to_string(), &HISTORY))
        .collect();
    assert!(proxies.iter().all(|p| p.connections() >= 1), "every gateway's broker session crosses its proxy");

    let mut clients = Vec::new();
    for gateway in &gateways {
        for _ in 0..2 {
            clients.push(Client::connect(&gateway.ws_url()).await);
        }
    }
    // On the far side: its publications cross NATS and a jittery link.
    let mut follower = Follower::subscribe(&gateways[1].ws_url(), FEED).await;
    let ticks = LOSSY_TICKS + CLEAN_TICKS;
    // A broadcast flood: no message to single connections, whose publishes
    // wait for their gateway's answer across the jittery links.
    let traffic = Traffic::new(&brokers[0].address("broker"), &[], ticks).with_history(FEED, HISTORY_PUBLICATIONS);
    let tallies: Vec<_> = clients.into_iter().map(|client| Tally::follow(client, &traffic)).collect();
    let following = tokio::spawn(async move {
        traffic::follow_until(&mut follower, HISTORY_PUBLICATIONS as usize).await;
        follower
    });

    net.loss(LOSS_PERCENT);
    for proxy in &proxies {
        proxy.latency(LATENCY, JITTER);
    }
    let started = Instant::now();
    let publishing = traffic.start(Duration::from_millis(2));
    traffic.wait_for_tick(LOSSY_TICKS).await;
    net.loss(0.0);
    for proxy in &proxies {
        proxy.latency(Duration::ZERO, Duration::ZERO);
    }
    let fault_ended = Instant::now();
    println!("{LOSSY_TICKS} ticks through the bad network in {:?}", fault_ended - started);
    let published = publishing.await.expect("the publisher");

    let follower = following.await.expect("the follower");
    follower.assert_all(HISTORY_PUBLICATIONS as usize);
    let (deliveries, recovery) = traffic::check_all(tallies, &published, fault_ended, |_| true).await;
    let outcome =
        traffic::outcome("2% loss, 50±20 ms broker links, flood", &deliveries, HISTORY_PUBLICATIONS, recovery);
    outcome.record();
    println!("{} publishes refused", published.refused);
    for gateway in &gateways {
        let disconnects = gateway.metric("herald_ws_broker_disconnects_total");
        assert_eq!(disconnects, 0.0, "TCP carried every broker session through the loss");
    }
    assert_eq!(published.refused, 0, "every publish was taken");
    assert_eq!(outcome.lost, 0, "TCP retransmits what the network dropped");
    assert!(recovery < Duration::from_secs(2), "delivery is prompt once the network is good: {recovery:?}");
}
