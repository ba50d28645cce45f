//! The classic example's topology and test session: one broker, two
//! WebSocket gateways, two HTTP gateways, separate processes.

use std::time::Duration;

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Client, Herald, curl, encode, get, post, wait_until};

const QUIET: Duration = Duration::from_millis(300);

struct Topology {
    broker: Herald,
    ws: [Herald; 2],
    http: [Herald; 2],
}

impl Topology {
    fn start() -> Self {
        let broker = Herald::broker(&[]);
        let b = broker.address("broker");
        let ws = [Herald::ws(&b, &[]), Herald::ws(&b, &[])];
        let http = [Herald::http(&b, &[]), Herald::http(&b, &[])];
        Topology { broker, ws, http }
    }

    /// Three clients on each gateway, in the order of the gateways.
    async fn clients(&self) -> Vec<Client> {
        let mut clients = Vec::new();
        for ws in &self.ws {
            for _ in 0..3 {
                clients.push(Client::connect(&ws.ws_url()).await);
            }
        }
        clients
    }
}

#[tokio::test]
async fn a_broadcast_reaches_every_client_on_both_gateways_exactly_once() {
    let t = Topology::start();
    let mut clients = t.clients().await;
    for (i, http) in t.http.iter().enumerate() {
        let reply = get(&format!("{}/?content=hello-{i}", http.http_url()));
        assert_eq!((reply.status, reply.body.as_str()), (200, "ok"));
    }
    for c in &mut clients {
        assert_eq!(c.recv_text().await, "hello-0");
        assert_eq!(c.recv_text().await, "hello-1");
    }
    for c in &mut clients {
        c.expect_silence(QUIET).await;
    }
    assert_eq!(t.broker.metric("herald_broker_published_total{target=\"broadcast\"}"), 2.0);
}

#[tokio::test]
async fn connection_ids_count_up_per_gateway_and_a_targeted_send_reaches_its_connection_only() {
    let t = Topology::start();
    let mut clients = t.clients().await;
    assert_ne!(clients[0].worker_id, clients[3].worker_id);
    // Each gateway numbers its connections from its start time in
    // milliseconds times 1000, plus one, counting up: unique for the
    // gateway's life and beyond a restart (see directory.rs).
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    for gateway in clients.chunks(3) {
        let ids: Vec<u64> = gateway.iter().map(Client::connection_number).collect();
        assert_eq!(ids, [ids[0], ids[0] + 1, ids[0] + 2], "one gateway counts up by one");
        assert_eq!(ids[0] % 1000, 1, "the first id is the start time in ms, times 1000, plus one: {ids:?}");
        let started_ms = u128::from(ids[0] / 1000);
        assert!(started_ms <= now_ms && now_ms - started_ms < 60_000, "started {started_ms}, now {now_ms}");
        assert!(gateway.iter().all(|c| c.worker_id == gateway[0].worker_id));
    }

    for (i, target) in clients.iter().enumerate() {
        let http = &t.http[i % 2];
        let url = format!(
            "{}/?to_worker_id={}&to_connection_id={}&content=for-{i}",
            http.http_url(),
            target.worker_id,
            target.connection_id
        );
        assert_eq!(get(&url).body, "ok");
    }
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.recv_text().await, format!("for-{i}"));
        c.expect_silence(QUIET).await;
    }
}

#[tokio::test]
async fn many_messages_to_one_connection_arrive_in_publish_order() {
    let t = Topology::start();
    let mut client = Client::connect(&t.ws[1].ws_url()).await;
    let mut other = Client::connect(&t.ws[0].ws_url()).await;
    // One curl process, one keep-alive connection, requests strictly in order.
    let urls: Vec<String> = (0..1000)
        .map(|i| {
            format!(
                "{}/?to_worker_id={}&to_connection_id={}&content={i}",
                t.http[0].http_url(),
                client.worker_id,
                client.connection_id
            )
        })
        .collect();
    let args: Vec<&str> = urls.iter().map(String::as_str).collect();
    let reply = curl(&args);
    // curl prints each body followed by its status line.
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.split("\n200").collect::<Vec<_>>(), vec!["ok"; 1000]);
    for i in 0..1000 {
        assert_eq!(client.recv_text().await, i.to_string());
    }
    other.expect_silence(QUIET).await;
}

#[tokio::test]
async fn text_and_binary_content_arrive_as_text_and_binary_frames() {
    let t = Topology::start();
    let mut client = Client::connect(&t.ws[0].ws_url()).await;
    let url = format!("{}/v1/publish", t.http[1].http_url());
    let binary = format!(
        r#"{{"target":{{"connection":{{"worker_id":"{}","connection_id":"{}"}}}},"content":{{"binary":"AAEC/w=="}}}}"#,
        client.worker_id, client.connection_id
    );
    let reply = post(&url, &binary);
    assert_eq!((reply.status, reply.body.as_str()), (200, r#"{"subscribers":1}"#));
    assert_eq!(client.recv().await, Message::binary(vec![0u8, 1, 2, 255]));

    let text = r#"{"target":{"broadcast":{}},"content":{"text":"héllo ✓"}}"#;
    assert_eq!(post(&url, text).status, 200);
    assert_eq!(client.recv().await, Message::text("héllo ✓"));

    let classic = get(&format!("{}/?content={}", t.http[0].http_url(), encode("a+b & ç")));
    assert_eq!(classic.body, "ok");
    assert_eq!(client.recv_text().await, "a+b & ç");
}

#[tokio::test]
async fn a_batch_routes_each_message_and_reports_each_outcome() {
    let t = Topology::start();
    let mut client = Client::connect(&t.ws[0].ws_url()).await;
    let body = format!(
        r#"{{"requests":[
            {{"target":{{"broadcast":{{}}}},"content":{{"text":"one"}}}},
            {{"target":{{"connection":{{"worker_id":"nobody","connection_id":"1"}}}},"content":{{"text":"lost"}}}},
            {{"target":{{"connection":{{"worker_id":"{}","connection_id":"{}"}}}},"content":{{"text":"two"}}}}
        ]}}"#,
        client.worker_id, client.connection_id
    );
    let reply = post(&format!("{}/v1/batch", t.http[0].http_url()), &body);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let json: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(json["results"][0]["published"]["subscribers"], 2);
    assert_eq!(json["results"][1]["error"]["code"], 5, "NOT_FOUND");
    assert_eq!(json["results"][2]["published"]["subscribers"], 1);
    assert_eq!(client.recv_text().await, "one");
    assert_eq!(client.recv_text().await, "two");
}

#[tokio::test]
async fn a_gateway_survives_a_broker_restart_and_its_clients_keep_receiving() {
    let mut broker = Herald::broker(&[]);
    let address = broker.address("broker");
    let ws = Herald::ws(&address, &[]);
    let http = Herald::http(&address, &[]);
    let mut client = Client::connect(&ws.ws_url()).await;
    assert_eq!(get(&format!("{}/?content=before", http.http_url())).body, "ok");
    assert_eq!(client.recv_text().await, "before");

    broker.kill();
    wait_until("the gateway notices", || ws.metric("herald_ws_broker_linked") == 0.0);
    let down = get(&format!("{}/?content=while-down", http.http_url()));
    assert_eq!(down.status, 503, "a publisher that cannot reach a broker gets an error: {}", down.body);

    // Restarted with its default startup grace: until its gateways have had
    // the time to come back, a publish is refused rather than taken as routed
    // to nobody.
    let restarted =
        Herald::start(&["broker", "--listen", &address, "--admin-listen", "127.0.0.1:0"], &["broker", "admin"]);
    let early = get(&format!("{}/?content=too-early", http.http_url()));
    assert_eq!(early.status, 503, "{}", early.body);
    assert!(early.body.contains("broker is starting"), "{}", early.body);
    ws.wait_ready();
    restarted.wait_ready();
    assert_eq!(get(&format!("{}/?content=after", http.http_url())).body, "ok");
    assert_eq!(client.recv_text().await, "after", "same connection, no reconnect");
    assert_eq!(ws.metric("herald_ws_broker_disconnects_total"), 1.0);
    assert_eq!(ws.metric("herald_ws_connections_opened_total"), 1.0);
    // The gateway told the new broker about the connection it kept: it is
    // still addressable by the address it was greeted with.
    let url = format!(
        "{}/?to_worker_id={}&to_connection_id={}&content=still+you",
        http.http_url(),
        client.worker_id,
        client.connection_id
    );
    assert_eq!(get(&url).body, "ok");
    assert_eq!(client.recv_text().await, "still you");
    let view = get(&format!("{}/v1/connections/{}/{}", http.http_url(), client.worker_id, client.connection_id));
    assert_eq!(view.json()["online"], true, "{}", view.body);
}

#[tokio::test]
async fn a_second_gateway_claiming_a_live_worker_id_is_refused_and_exits() {
    let broker = Herald::broker(&[]);
    let b = broker.address("broker");
    let first = Herald::ws(&b, &["--worker-id", "gw-1"]);
    let mut second = Herald::ws_refused(&b, "gw-1");
    let status = second.wait_exit(Duration::from_secs(10));
    assert!(!status.success(), "the duplicate gateway must exit non-zero");
    let log = second.log_text();
    assert!(log.contains("worker id \"gw-1\" is held by another live gateway"), "{log}");
    assert_eq!(log.matches("is held by another live gateway").count(), 1, "said once: {log}");
    assert!(!second.announced("ws"), "claim first, announce after: a refused gateway never says it listens");

    // The first holder is untouched and still the only destination.
    let http = Herald::http(&b, &[]);
    let mut client = Client::connect(&first.ws_url()).await;
    assert_eq!(client.worker_id, "gw-1");
    let url =
        format!("{}/?to_worker_id=gw-1&to_connection_id={}&content=still-mine", http.http_url(), client.connection_id);
    assert_eq!(get(&url).body, "ok");
    assert_eq!(client.recv_text().await, "still-mine");
    assert_eq!(broker.metric("herald_broker_worker_claims_refused_total"), 1.0);
}

/// A gateway takes clients only once its worker id is its own: one whose
/// claim is refused never greets a client with an id another gateway
/// holds, however early the client knocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_refused_its_worker_id_never_greets_a_client() {
    let broker = Herald::broker(&[]);
    let b = broker.address("broker");
    let _first = Herald::ws(&b, &["--worker-id", "gw-1"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let url = format!("ws://127.0.0.1:{port}/");
    let knocking = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let knocker = {
        let (url, knocking) = (url.clone(), knocking.clone());
        tokio::spawn(async move {
            let (mut attempts, mut greeted) = (0u32, Vec::new());
            while knocking.load(std::sync::atomic::Ordering::Relaxed) {
                attempts += 1;
                let attempt = tokio::time::timeout(Duration::from_millis(200), tokio_tungstenite::connect_async(&url));
                if let Ok(Ok((mut ws, _))) = attempt.await
                    && let Ok(Some(Ok(greeting))) = tokio::time::timeout(Duration::from_millis(200), ws.next()).await
                {
                    greeted.push(greeting.to_string());
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            (attempts, greeted)
        })
    };
    let listen = format!("127.0.0.1:{port}");
    let args = ["ws", "--listen", &listen, "--admin-listen", "127.0.0.1:0", "--broker", &b, "--worker-id", "gw-1"];
    let mut second = Herald::start(&args, &["admin"]);
    let status = tokio::task::block_in_place(|| second.wait_exit(Duration::from_secs(10)));
    assert!(!status.success(), "the duplicate gateway exits");
    knocking.store(false, std::sync::atomic::Ordering::Relaxed);
    let (attempts, greeted) = knocker.await.expect("the knocker");
    assert!(attempts > 1, "clients knocked while the refused gateway ran");
    assert!(greeted.is_empty(), "a refused gateway greeted clients: {greeted:?}");
}

#[tokio::test]
async fn every_bad_publish_gets_its_status_and_a_one_line_reason() {
    let t = Topology::start();
    let base = t.http[0].http_url();
    let worker = t.ws[0].worker_id();
    let cases: Vec<(String, u16, &str)> = vec![
        (format!("{base}/"), 400, "missing parameter 'content'"),
        (format!("{base}/?content="), 400, "parameter 'content' is empty"),
        (format!("{base}/?content=a&content=b"), 400, "given more than once"),
        (format!("{base}/?content=%zz"), 400, "malformed percent-escape"),
        (format!("{base}/?content=%C3%28"), 400, "not valid UTF-8"),
        (format!("{base}/?to_worker_id={worker}&content=half"), 400, "must be given together"),
        (format!("{base}/?to_connection_id=1&content=half"), 400, "must be given together"),
        (format!("{base}/?to_worker_id=bad%20id&to_connection_id=1&content=x"), 400, "character outside"),
        (format!("{base}/?to_worker_id=nobody&to_connection_id=1&content=x"), 404, "no live gateway holds worker id"),
        (format!("{base}/nowhere?content=x"), 404, "no such endpoint"),
    ];
    for (url, status, reason) in cases {
        let reply = get(&url);
        assert_eq!(reply.status, status, "{url}: {}", reply.body);
        assert!(reply.body.contains(reason), "{url}: {}", reply.body);
        assert_eq!(reply.body.trim_end().lines().count(), 1, "{url}: one line");
    }

    let too_long = "x".repeat(64 * 1024 + 1);
    let reply = curl(&["-X", "POST", "--data-urlencode", &format!("content={too_long}"), &format!("{base}/")]);
    assert_eq!(reply.status, 413, "{}", reply.body);
    let huge_body = format!(r#"{{"target":{{"broadcast":{{}}}},"content":{{"text":"{}"}}}}"#, "y".repeat(5 << 20));
    let body_file = crate::support::TempDir::new("body");
    let path = body_file.path().join("body.json");
    std::fs::write(&path, huge_body).unwrap();
    let reply = curl(&["-X", "POST", "--data-binary", &format!("@{}", path.display()), &format!("{base}/v1/publish")]);
    assert_eq!(reply.status, 413, "{}", reply.body);

    let reply = curl(&["-X", "PUT", &format!("{base}/?content=x")]);
    assert_eq!(reply.status, 405);
    let reply = post(&format!("{base}/v1/publish"), r#"{"target":{"broadcast":{}}}"#);
    assert_eq!(reply.status, 400);
    assert!(reply.body.contains("missing field `content`"), "{}", reply.body);

    // No broker at all: 503, never `ok`.
    let orphan = Herald::http("127.0.0.1:1", &[]);
    let reply = get(&format!("{}/?content=x", orphan.http_url()));
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert!(reply.body.starts_with("broker unavailable"), "{}", reply.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_each_keep_their_order_through_the_http_gateway() {
    let t = Topology::start();
    let mut client = Client::connect(&t.ws[0].ws_url()).await;
    const PUBLISHERS: usize = 8;
    const EACH: usize = 200;
    let base = t.http[1].http_url();
    // Eight curl processes at once, each one keep-alive connection in order:
    // the gateway batches their publishes together.
    let curls: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let urls: Vec<String> = (0..EACH).map(|i| format!("{base}/?content=p{p}-{i}")).collect();
            std::thread::spawn(move || {
                let args: Vec<&str> = urls.iter().map(String::as_str).collect();
                curl(&args)
            })
        })
        .collect();
    for c in curls {
        let reply = c.join().unwrap();
        assert_eq!(reply.body.split("\n200").filter(|b| *b == "ok").count(), EACH);
    }
    let mut next = [0usize; PUBLISHERS];
    for _ in 0..PUBLISHERS * EACH {
        let text = client.recv_text().await;
        let (p, i) = text.strip_prefix('p').and_then(|r| r.split_once('-')).unwrap();
        let (p, i): (usize, usize) = (p.parse().unwrap(), i.parse().unwrap());
        assert_eq!(i, next[p], "publisher {p} out of order");
        next[p] += 1;
    }
    client.expect_silence(QUIET).await;
}
