//! Several brokers bridged by NATS: exactly-once delivery across brokers,
//! cluster-wide worker ids, failover of gateways and publishers, and NATS
//! outages. Each test runs its own `nats-server`.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use tokio::task::block_in_place;

use crate::faults::proxy::Proxy;
use crate::support::{Client, Herald, Nats, PATIENCE, broadcast, get, grpc_client, wait_until};

const QUIET: Duration = Duration::from_millis(300);

/// Three brokers on one NATS.
fn brokers(nats: &Nats) -> Vec<Herald> {
    let brokers: Vec<_> = (0..3).map(|_| Herald::broker(&["--nats", &nats.url()])).collect();
    for b in &brokers {
        b.wait_ready();
    }
    brokers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_on_every_broker_reach_every_gateways_clients_exactly_once() {
    let Some(nats) = Nats::start() else { return };
    let brokers = brokers(&nats);
    let gateways: Vec<_> = brokers.iter().map(|b| Herald::ws(&b.address("broker"), &[])).collect();
    let https: Vec<_> = brokers.iter().map(|b| Herald::http(&b.address("broker"), &[])).collect();
    let mut clients = Vec::new();
    for g in &gateways {
        for _ in 0..2 {
            clients.push(Client::connect(&g.ws_url()).await);
        }
    }

    for (i, http) in https.iter().enumerate() {
        assert_eq!(get(&format!("{}/?content=from-broker-{i}", http.http_url())).body, "ok");
    }
    for c in &mut clients {
        for i in 0..3 {
            assert_eq!(c.recv_text().await, format!("from-broker-{i}"));
        }
    }
    // Every client addressed from every broker, gateways spread over all three.
    for (i, http) in https.iter().enumerate() {
        for target in &clients {
            let url = format!(
                "{}/?to_worker_id={}&to_connection_id={}&content=to-{}-{}-via-{i}",
                http.http_url(),
                target.worker_id,
                target.connection_id,
                target.worker_id,
                target.connection_id
            );
            assert_eq!(get(&url).body, "ok");
        }
    }
    for c in &mut clients {
        for i in 0..3 {
            assert_eq!(c.recv_text().await, format!("to-{}-{}-via-{i}", c.worker_id, c.connection_id));
        }
        c.expect_silence(QUIET).await;
    }
    let forwarded: f64 = brokers.iter().map(|b| b.metric("herald_broker_cluster_events_forwarded_total")).sum();
    assert!(forwarded >= 3.0, "broadcasts crossed the bus: {forwarded}");
}

#[tokio::test]
async fn a_worker_id_is_unique_across_the_cluster() {
    let Some(nats) = Nats::start() else { return };
    let brokers = brokers(&nats);
    let first = Herald::ws(&brokers[0].address("broker"), &["--worker-id", "shared-id"]);
    let mut second = Herald::ws_refused(&brokers[1].address("broker"), "shared-id");
    assert!(!second.wait_exit(Duration::from_secs(10)).success());
    assert!(!second.announced("ws"), "a refused gateway never says it listens");
    assert!(second.log_text().contains("worker id \"shared-id\" is held by another live gateway"));

    // A publish on the third broker still finds the first holder.
    let http = Herald::http(&brokers[2].address("broker"), &[]);
    let mut client = Client::connect(&first.ws_url()).await;
    let url =
        format!("{}/?to_worker_id=shared-id&to_connection_id={}&content=mine", http.http_url(), client.connection_id);
    assert_eq!(get(&url).body, "ok");
    assert_eq!(client.recv_text().await, "mine");
    assert_eq!(get(&format!("{}/?to_worker_id=nobody&to_connection_id=1&content=x", http.http_url())).status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_broker_under_a_publish_stream_fails_its_gateways_over_with_bounded_loss() {
    let Some(nats) = Nats::start() else { return };
    let mut brokers = brokers(&nats);
    let addrs: Vec<String> = brokers.iter().map(|b| b.address("broker")).collect();
    let moving = Herald::ws(&format!("{},{},{}", addrs[0], addrs[1], addrs[2]), &[]);
    let staying = Herald::ws(&format!("{},{}", addrs[1], addrs[2]), &[]);
    let http = Herald::http(&format!("{},{}", addrs[0], addrs[2]), &[]);
    let mut on_moving = Client::connect(&moving.ws_url()).await;
    let mut on_staying = Client::connect(&staying.ws_url()).await;

    // A steady stream of broadcasts through the last broker, which stays up.
    let published = Arc::new(AtomicI64::new(-1));
    let stream = {
        let (published, addr) = (published.clone(), addrs[2].clone());
        tokio::spawn(async move {
            let mut grpc = grpc_client(&addr).await;
            for i in 0..1500 {
                grpc.publish(broadcast(&i.to_string())).await.expect("the stream's broker stays up");
                published.store(i, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    wait_until("the stream is flowing", || published.load(Ordering::SeqCst) >= 300);
    let killed_at = Instant::now();
    brokers[0].kill();
    wait_until("the moving gateway relinks", || {
        moving.metric("herald_ws_broker_linked") == 1.0 && moving.metric("herald_ws_broker_disconnects_total") == 1.0
    });
    let failover = killed_at.elapsed();
    // The HTTP gateway's first broker is gone: it fails over too.
    assert_eq!(get(&format!("{}/?content=after-the-kill", http.http_url())).body, "ok");
    stream.await.unwrap();

    let receive_all = |mut c: Client| async move {
        let mut seen = Vec::new();
        loop {
            let text = c.recv_text().await;
            if text == "after-the-kill" {
                continue;
            }
            let i: i64 = text.parse().unwrap();
            seen.push(i);
            if i == 1499 {
                return seen;
            }
        }
    };
    let moved = receive_all(on_moving).await;
    let stayed = receive_all(on_staying).await;
    assert_eq!(stayed, (0..1500).collect::<Vec<_>>(), "a gateway on a live broker loses nothing");
    assert!(moved.windows(2).all(|w| w[0] < w[1]), "in order, no duplicates");
    let lost = 1500 - moved.len();
    println!("failover took {failover:?}; the moving gateway's client missed {lost} of 1500 messages");
    assert!(failover < Duration::from_secs(2), "failover within 2s: {failover:?}");
    assert!(lost <= 1000, "the loss is bounded by the switch: {lost}");

    // The dead broker comes back on its port and rejoins.
    brokers[0] = Herald::start(
        &["broker", "--listen", &addrs[0], "--admin-listen", "127.0.0.1:0", "--nats", &nats.url()],
        &["broker", "admin"],
    );
    brokers[0].wait_ready();
    on_moving = Client::connect(&moving.ws_url()).await;
    on_staying = Client::connect(&staying.ws_url()).await;
    let mut grpc = grpc_client(&addrs[0]).await;
    grpc.publish(broadcast("via the rejoined broker")).await.unwrap();
    assert_eq!(on_moving.recv_text().await, "via the rejoined broker");
    assert_eq!(on_staying.recv_text().await, "via the rejoined broker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_nats_brokers_are_not_ready_and_refuse_then_recover_by_themselves() {
    let Some(mut nats) = Nats::start() else { return };
    let brokers = brokers(&nats);
    let gateway = Herald::ws(&brokers[0].address("broker"), &[]);
    let http = Herald::http(&brokers[1].address("broker"), &[]);
    let mut client = Client::connect(&gateway.ws_url()).await;
    assert_eq!(get(&format!("{}/?content=before", http.http_url())).body, "ok");
    assert_eq!(client.recv_text().await, "before");

    nats.kill();
    let readyz = format!("http://{}/readyz", brokers[1].addr("admin"));
    wait_until("brokers notice NATS is gone", || get(&readyz).status == 503);
    assert!(get(&readyz).body.contains("not connected to NATS"), "{}", get(&readyz).body);
    let refused = get(&format!("{}/?content=during", http.http_url()));
    assert_eq!(refused.status, 503, "never ok without the cluster: {}", refused.body);
    let mut grpc = grpc_client(&brokers[2].address("broker")).await;
    assert_eq!(grpc.publish(broadcast("during")).await.unwrap_err().code(), tonic::Code::Unavailable);

    nats.restart();
    for b in &brokers {
        b.wait_ready();
    }
    gateway.wait_ready();
    wait_until("publishes flow again", || get(&format!("{}/?content=after", http.http_url())).body == "ok");
    let mut last = client.recv_text().await;
    while last != "after" {
        last = client.recv_text().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_used_on_one_broker_is_a_duplicate_on_every_other() {
    let Some(nats) = Nats::start() else { return };
    let brokers = brokers(&nats);
    let gateway = Herald::ws(&brokers[0].address("broker"), &[]);
    let mut client = Client::connect(&gateway.ws_url()).await;
    let mut keyed = broadcast("once across the cluster");
    keyed.idempotency_key = "payment-7".into();
    let mut answers = Vec::new();
    for broker in &brokers {
        let mut grpc = grpc_client(&broker.address("broker")).await;
        answers.push(grpc.publish(keyed.clone()).await.expect("routed or a duplicate").into_inner());
    }
    assert!(!answers[0].duplicate, "the first use is routed: {:?}", answers[0]);
    assert!(answers[1].duplicate && answers[2].duplicate, "later uses anywhere are duplicates: {answers:?}");
    let mut grpc = grpc_client(&brokers[2].address("broker")).await;
    grpc.publish(broadcast("marker")).await.unwrap();
    assert_eq!(client.recv_text().await, "once across the cluster");
    assert_eq!(client.recv_text().await, "marker", "and delivered once");
}

#[test]
fn a_nats_server_too_old_for_cluster_mode_is_refused_at_start_in_one_line() {
    let Some(old) = Nats::start_tool("debian-nats-server") else { return };
    let mut broker = Herald::start(
        &["broker", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--nats", &old.url()],
        &[],
    );
    assert!(!broker.wait_exit(Duration::from_secs(15)).success(), "a broker cannot work with NATS 2.9");
    let log = broker.log_text();
    let errors: Vec<_> = log.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "one line: {log}");
    assert!(errors[0].contains("2.9.") && errors[0].contains("needs NATS 2.10 or newer"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_works_on_the_oldest_nats_it_supports() {
    let Some(nats) = Nats::start_tool("nats-server-oldest") else { return };
    let brokers: Vec<_> = (0..2).map(|_| Herald::broker(&["--nats", &nats.url()])).collect();
    for b in &brokers {
        b.wait_ready();
    }
    let gateway = Herald::ws(&brokers[0].address("broker"), &["--worker-id", "old-nats"]);
    let mut client = Client::connect(&gateway.ws_url()).await;
    let mut grpc = grpc_client(&brokers[1].address("broker")).await;
    let mut keyed = broadcast("across brokers on the oldest NATS");
    keyed.idempotency_key = "k".into();
    assert!(!grpc.publish(keyed.clone()).await.unwrap().into_inner().duplicate);
    assert!(grpc.publish(keyed).await.unwrap().into_inner().duplicate);
    assert_eq!(client.recv_text().await, "across brokers on the oldest NATS");
    let mut second = Herald::ws_refused(&brokers[1].address("broker"), "old-nats");
    assert!(!second.wait_exit(Duration::from_secs(10)).success(), "worker-id leases hold on the oldest NATS too");
}

/// Two brokers, each reaching NATS through a proxy of its own that the test
/// can cut, and a gateway with a client on the second one.
struct Apart {
    proxies: [Proxy; 2],
    brokers: Vec<Herald>,
    _gateway: Herald,
    client: Client,
}

impl Apart {
    async fn start(nats: &Nats, rejoin_wait: &str) -> Apart {
        let proxies = [
            Proxy::start(([127, 0, 0, 1], 0).into(), nats.address()).await,
            Proxy::start(([127, 0, 0, 1], 0).into(), nats.address()).await,
        ];
        let brokers: Vec<_> = proxies
            .iter()
            .map(|p| Herald::broker(&["--nats", &format!("nats://{}", p.addr()), "--rejoin-wait", rejoin_wait]))
            .collect();
        block_in_place(|| {
            for b in &brokers {
                b.wait_ready();
            }
            wait_until("each broker hears the other on the roll call", || {
                brokers.iter().all(|b| b.metric("herald_broker_cluster_peers") == 1.0)
            });
        });
        let gateway = Herald::ws(&brokers[1].address("broker"), &[]);
        let client = Client::connect(&gateway.ws_url()).await;
        Apart { proxies, brokers, _gateway: gateway, client }
    }

    /// Both brokers lose NATS; the first gets it back, the second not yet.
    fn first_back_alone(&self) {
        for proxy in &self.proxies {
            proxy.cut();
        }
        block_in_place(|| {
            wait_until("both brokers notice NATS is gone", || {
                self.brokers.iter().all(|b| b.metric("herald_broker_cluster_ready") == 0.0)
            });
            self.proxies[0].heal();
            self.brokers[0].wait_ready();
        });
    }
}

/// NATS goes away for two brokers and comes back to one first. Had that one
/// forwarded a broadcast then, NATS would have had nobody to give it to
/// (the other broker's subscriptions come back with its connection), and
/// no flush would have told. So it refuses publishes bound for the cluster
/// with UNAVAILABLE, saying why, until the other broker is back; then a
/// retried publish reaches the other broker's clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_back_on_nats_first_forwards_nothing_until_the_others_are_back() {
    let Some(nats) = Nats::start() else { return };
    let mut apart = Apart::start(&nats, "1m").await;
    let mut grpc = grpc_client(&apart.brokers[0].address("broker")).await;
    grpc.publish(broadcast("before")).await.expect("a publish with both brokers on NATS");
    assert_eq!(apart.client.recv_text().await, "before");

    apart.first_back_alone();
    for _ in 0..3 {
        let refused = grpc.publish(broadcast("early")).await.expect_err("the other broker is not back");
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
        assert!(refused.message().contains("1 other broker(s) to be back on NATS"), "{}", refused.message());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(apart.brokers[0].metric("herald_broker_cluster_peers_awaited"), 1.0);

    apart.proxies[1].heal();
    let began = Instant::now();
    while let Err(refused) = grpc.publish(broadcast("after")).await {
        assert!(began.elapsed() < PATIENCE, "still refused once the other broker is back: {refused:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(apart.client.recv_text().await, "after", "nothing refused arrives, and what was taken does");
    assert_eq!(apart.brokers[0].metric("herald_broker_cluster_peers_awaited"), 0.0);
}

/// A broker that does not come back to NATS does not hold the others up
/// for longer than the rejoin wait: it is presumed gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_stays_away_is_presumed_gone_after_the_rejoin_wait() {
    let Some(nats) = Nats::start() else { return };
    let apart = Apart::start(&nats, "2s").await;
    let mut grpc = grpc_client(&apart.brokers[0].address("broker")).await;

    apart.first_back_alone();
    let back = Instant::now();
    let refused = grpc.publish(broadcast("early")).await.expect_err("waiting for the other broker");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    while grpc.publish(broadcast("later")).await.is_err() {
        assert!(back.elapsed() < PATIENCE, "refused for longer than the rejoin wait");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let waited = back.elapsed();
    assert!(waited <= Duration::from_secs(3), "taken {waited:?} after the broker was back, with a 2 s rejoin wait");
    assert_eq!(apart.brokers[0].metric("herald_broker_cluster_peers_awaited"), 0.0);
}
