//! The directory of who is connected: users from JWTs and from backends,
//! groups, kicks, and the queries that answer for the whole cluster, as
//! browsers (headless Chromium), curl, grpcurl and gRPC stubs see them.
//! Cluster tests run their own `nats-server` and brokers.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use herald_proto::v1::broker_service_client::BrokerServiceClient;
use herald_proto::v1::{
    BindUser, ConnectionAddress, ControlRequest, QueryRequest, QueryResponse, Totals, control_request, query_request,
    target,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::browser::BrowserSockets;
use crate::support::{
    Client, Cluster, CurlReply, Herald, PATIENCE, curl_upgrade, get, grpc_client, grpcurl, grpcurl_call,
    parse_json_greeting, post, text_publish, tool, wait_until,
};

const QUIET: Duration = Duration::from_millis(300);
/// The HS256 secret the gateways of these tests trust.
const SECRET: &str = "directory-e2e-secret-0123456789abcdef";
/// A test-only RSA private key (its public half is a fixture of herald-gateway-ws).
const RSA_PRIVATE: &str = include_str!("../../gateway-ws/tests/fixtures/rsa-test-private.pem");
/// A WebSocket gateway that wants a JWT and greets in JSON.
const JWT_GATEWAY: [&str; 6] = ["--client-auth", "jwt", "--jwt-secret", SECRET, "--greeting", "json"];

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs()
}

/// A JWT with `claims`, signed HS256 with `secret`.
fn hs256(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret.as_bytes()))
        .expect("sign a token")
}

/// A good token for `user`, joining `groups`, valid for ten minutes.
fn token(user: &str, groups: &[&str]) -> String {
    hs256(SECRET, &json!({ "sub": user, "groups": groups, "exp": unix_now() + 600 }))
}

/// Connects to `gateway` as `user` (the token in the query string, as browsers send it).
async fn connect_as(gateway: &Herald, user: &str, groups: &[&str]) -> Client {
    let client = Client::connect(&format!("{}/?token={}", gateway.ws_url(), token(user, groups))).await;
    assert_eq!(client.user_id.as_deref(), Some(user), "the JSON greeting names the token's user");
    assert_eq!(client.worker_id, gateway.worker_id());
    client
}

fn address(client: &Client) -> Value {
    json!({ "worker_id": client.worker_id, "connection_id": client.connection_id })
}

/// `(worker_id, connection_id)` of every connection an HTTP query answer lists.
fn listed(answer: &Value) -> BTreeSet<(String, String)> {
    let connections = answer["connections"].as_array().unwrap_or_else(|| panic!("no connections in {answer}"));
    connections
        .iter()
        .map(|c| {
            let field = |name: &str| c["address"][name].as_str().unwrap_or_else(|| panic!("{name} in {c}")).to_owned();
            (field("worker_id"), field("connection_id"))
        })
        .collect()
}

fn addresses<'a>(clients: impl IntoIterator<Item = &'a Client>) -> BTreeSet<(String, String)> {
    clients.into_iter().map(|c| (c.worker_id.clone(), c.connection_id.clone())).collect()
}

/// `POST /v1/query` with `body`; asserts 200 and returns the answer.
fn http_query(http: &Herald, body: &str) -> Value {
    let reply = post(&format!("{}/v1/query", http.http_url()), body);
    assert_eq!(reply.status, 200, "{body}: {}", reply.body);
    reply.json()
}

/// `POST /v1/control` with `body`; asserts 200 and returns the answer.
fn http_control(http: &Herald, body: &str) -> Value {
    let reply = post(&format!("{}/v1/control", http.http_url()), body);
    assert_eq!(reply.status, 200, "{body}: {}", reply.body);
    reply.json()
}

async fn ask(grpc: &mut BrokerServiceClient<Channel>, question: query_request::Question) -> QueryResponse {
    grpc.query(QueryRequest { question: Some(question) }).await.expect("a query is answered").into_inner()
}

fn user_connections(user: &str) -> query_request::Question {
    query_request::Question::UserConnections(user.to_owned())
}

/// The distinct addresses a gRPC query answer lists.
fn listed_addresses(answer: &QueryResponse) -> BTreeSet<(String, String)> {
    let address = |c: &herald_proto::v1::ConnectionInfo| c.address.clone().expect("a listed connection has an address");
    answer.connections.iter().map(address).map(|a| (a.worker_id, a.connection_id)).collect()
}

fn group_count(group: &str) -> query_request::Question {
    query_request::Question::GroupCount(group.to_owned())
}

fn totals() -> query_request::Question {
    query_request::Question::Totals(Totals {})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_message_reaches_each_of_the_users_browser_sockets_on_every_gateway_once_and_only_their_gateways() {
    let (Some(browser_tools), Some(grpcurl_bin)) = (BrowserSockets::tools(), tool("grpcurl")) else { return };
    let Some(cluster) = Cluster::start(3, &[]) else { return };
    let gateway_a = Herald::ws(&cluster.address(0), &JWT_GATEWAY);
    let gateway_b = Herald::ws(&cluster.address(1), &JWT_GATEWAY);
    let gateway_c = Herald::ws(&cluster.address(2), &JWT_GATEWAY);
    let http = Herald::http(&cluster.address(2), &[]);
    let (ana, bob) = (token("ana", &[]), token("bob", &[]));

    // Ana has two tabs open, one on each of two gateways; Bob has one
    // beside Ana's first, and one on a gateway where Ana is not.
    let mut browser = BrowserSockets::open(
        &browser_tools,
        &[
            ("ana-a", format!("{}/?token={ana}", gateway_a.ws_url())),
            ("ana-b", format!("{}/?token={ana}", gateway_b.ws_url())),
            ("bob-a", format!("{}/?token={bob}", gateway_a.ws_url())),
            ("bob-c", format!("{}/?token={bob}", gateway_c.ws_url())),
        ],
    );
    let mut anas = BTreeSet::new();
    for (name, gateway, user) in [
        ("ana-a", &gateway_a, "ana"),
        ("ana-b", &gateway_b, "ana"),
        ("bob-a", &gateway_a, "bob"),
        ("bob-c", &gateway_c, "bob"),
    ] {
        let (worker_id, connection_id, user_id) = parse_json_greeting(&browser.greetings[name]);
        assert_eq!((worker_id.as_str(), user_id.as_deref()), (gateway.worker_id(), Some(user)), "{name}");
        if user == "ana" {
            anas.insert((worker_id, connection_id));
        }
    }
    let view = get(&format!("{}/v1/users/ana", http.http_url()));
    assert_eq!(view.status, 200, "{}", view.body);
    assert_eq!(listed(&view.json()), anas, "the directory lists both of Ana's tabs: {}", view.body);

    let by_curl =
        post(&format!("{}/v1/publish", http.http_url()), r#"{"target":{"user":"ana"},"content":{"text":"from curl"}}"#);
    assert_eq!(by_curl.status, 200, "{}", by_curl.body);
    let by_grpcurl = grpcurl_call(
        &grpcurl_bin,
        &cluster.address(2),
        "Publish",
        r#"{"target":{"user":"ana"},"content":{"text":"from grpcurl"}}"#,
    );
    assert!(by_grpcurl.success, "{}", by_grpcurl.stderr);

    let report = browser.wait(&[("ana-a", 3), ("ana-b", 3), ("bob-a", 1), ("bob-c", 1)]);
    for name in ["ana-a", "ana-b"] {
        let greeting = &browser.greetings[name];
        assert_eq!(report[name]["messages"], json!([greeting, "from curl", "from grpcurl"]), "{name}: {report}");
    }
    for name in ["bob-a", "bob-c"] {
        assert_eq!(
            report[name]["messages"].as_array().map(Vec::len),
            Some(1),
            "{name} got only its greeting: {report}"
        );
    }
    for name in ["ana-a", "ana-b", "bob-a", "bob-c"] {
        assert_eq!(report[name]["state"], 1, "{name} is still open: {report}");
    }

    // The broker resolved the target once: the events went to the gateways
    // holding Ana, never to the one holding only Bob.
    let user_events = "herald_ws_broker_events_total{delivery=\"user\"}";
    assert_eq!(gateway_a.metric(user_events), 2.0);
    assert_eq!(gateway_b.metric(user_events), 2.0);
    assert_eq!(gateway_c.metric(user_events), 0.0, "gateway C holds no connection of Ana's");
    assert_eq!(cluster.brokers[2].metric("herald_broker_published_total{target=\"user\"}"), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_send_excluding_the_sender_reaches_every_other_member_once_and_not_the_sender() {
    let Some(cluster) = Cluster::start(2, &[]) else { return };
    let gateway_a = Herald::ws(&cluster.address(0), &JWT_GATEWAY);
    let gateway_b = Herald::ws(&cluster.address(1), &JWT_GATEWAY);
    let http = Herald::http(&cluster.address(1), &[]);
    // Ana and Bob join "room" by their tokens, Cy by a backend's control;
    // Dan is in another group.
    let mut ana = connect_as(&gateway_a, "ana", &["room"]).await;
    let mut dan = connect_as(&gateway_a, "dan", &["lobby"]).await;
    let mut bob = connect_as(&gateway_b, "bob", &["room"]).await;
    let mut cy = connect_as(&gateway_b, "cy", &[]).await;
    let joined = http_control(&http, r#"{"join_groups":{"selection":{"user":"cy"},"groups":["room"]}}"#);
    assert_eq!(joined, json!({"connections": 1, "missing_workers": []}));
    let members = get(&format!("{}/v1/groups/room", http.http_url())).json();
    assert_eq!(listed(&members), addresses([&ana, &bob, &cy]), "{members}");

    // Ana writes to the room: everyone in it but her gets it.
    let url = format!(
        "{}/?to_group=room&exclude={}:{}&content=hi+from+ana",
        http.http_url(),
        ana.worker_id,
        ana.connection_id
    );
    assert_eq!(get(&url).body, "ok");
    // Bob, on the other broker's gateway, writes too.
    let url = format!(
        "{}/?to_group=room&exclude={}:{}&content=hi+from+bob",
        http.http_url(),
        bob.worker_id,
        bob.connection_id
    );
    assert_eq!(get(&url).body, "ok");

    assert_eq!(bob.recv_text().await, "hi from ana");
    assert_eq!(cy.recv_text().await, "hi from ana");
    assert_eq!(cy.recv_text().await, "hi from bob");
    assert_eq!(ana.recv_text().await, "hi from bob", "the sender never gets her own message");
    for client in [&mut ana, &mut bob, &mut cy, &mut dan] {
        client.expect_silence(QUIET).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kick_closes_every_connection_of_the_user_on_every_gateway_with_4000_and_the_reason() {
    let Some(cluster) = Cluster::start(2, &[]) else { return };
    let gateway_a = Herald::ws(&cluster.address(0), &JWT_GATEWAY);
    let gateway_b = Herald::ws(&cluster.address(1), &JWT_GATEWAY);
    let http = Herald::http(&cluster.address(0), &[]);
    let mut anas = vec![
        connect_as(&gateway_a, "ana", &[]).await,
        connect_as(&gateway_b, "ana", &[]).await,
        Client::connect_with_token(&gateway_b.ws_url(), &token("ana", &["room"])).await,
    ];
    let mut bob = connect_as(&gateway_a, "bob", &["room"]).await;
    assert_eq!(http_query(&http, r#"{"user_online":"ana"}"#)["online"], true);

    let kicked = http_control(&http, r#"{"close":{"selection":{"user":"ana"},"reason":"account suspended"}}"#);
    assert_eq!(kicked, json!({"connections": 3, "missing_workers": []}));
    for ana in &mut anas {
        assert_eq!(ana.expect_close_frame().await, Some((4000, "account suspended".to_owned())));
    }

    assert_eq!(http_query(&http, r#"{"user_online":"ana"}"#)["online"], false);
    let view = get(&format!("{}/v1/users/ana", http.http_url())).json();
    assert_eq!((view["count"].clone(), view["connections"].clone()), (json!(0), json!([])), "{view}");
    let totals = get(&format!("{}/v1/totals", http.http_url())).json();
    assert_eq!((totals["count"].clone(), totals["users"].clone()), (json!(1), json!(1)), "{totals}");
    assert_eq!(http_query(&http, r#"{"group_count":"room"}"#)["count"], 1, "Ana's membership went with her");

    // Bob was left alone.
    assert_eq!(get(&format!("{}/?content=still+here", http.http_url())).body, "ok");
    assert_eq!(bob.recv_text().await, "still here");
    let kicks = "herald_ws_connections_closed_total{reason=\"closed_by_backend\"}";
    assert_eq!(gateway_a.metric(kicks) + gateway_b.metric(kicks), 3.0);
    assert_eq!(cluster.brokers[0].metric("herald_broker_controls_total{op=\"close\"}"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateways_connections_leave_the_cluster_s_answers_within_a_second() {
    let Some(cluster) = Cluster::start(3, &[]) else { return };
    let gateway_a = Herald::ws(&cluster.address(0), &JWT_GATEWAY);
    let mut gateway_b = Herald::ws(&cluster.address(1), &JWT_GATEWAY);
    let mut clients = Vec::new();
    for user in ["ana", "bob"] {
        clients.push(connect_as(&gateway_a, user, &["room"]).await);
    }
    for user in ["cy", "dan", "eve"] {
        clients.push(connect_as(&gateway_b, user, &["room"]).await);
    }
    let mut grpc = grpc_client(&cluster.address(2)).await;
    assert_eq!(ask(&mut grpc, group_count("room")).await.count, 5);
    let before = ask(&mut grpc, totals()).await;
    assert_eq!((before.count, before.users, before.missing_workers.len()), (5, 5, 0), "{before:?}");

    // Ask at once, and every millisecond for 150 ms, each question on its own.
    gateway_b.kill();
    let killed = Instant::now();
    let mut asks = tokio::task::JoinSet::new();
    for i in 0..150 {
        let mut grpc = grpc.clone();
        asks.spawn(async move {
            tokio::time::sleep(Duration::from_millis(i)).await;
            let asked = Instant::now();
            let (room, all) = (ask(&mut grpc, group_count("room")).await, ask(&mut grpc, totals()).await);
            (asked.elapsed(), room, all)
        });
    }
    for (took, room, all) in asks.join_all().await {
        assert!(took < Duration::from_secs(1), "answered after {took:?}: {room:?} {all:?}");
        assert!(
            room.missing_workers.is_empty() && all.missing_workers.is_empty(),
            "a dead gateway is gone, not missing: {room:?} {all:?}"
        );
        assert!(
            [(5, 5, 5), (2, 2, 2)].contains(&(room.count, all.count, all.users)),
            "before its end, or after it: {room:?} {all:?}"
        );
    }
    let (room, all) = (ask(&mut grpc, group_count("room")).await, ask(&mut grpc, totals()).await);
    let after = killed.elapsed();
    assert_eq!((room.count, all.count, all.users), (2, 2, 2), "{after:?} after the kill: {room:?} {all:?}");
    assert!(after < Duration::from_secs(1), "the dead gateway's connections left the answers after {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_fails_over_to_another_broker_is_counted_again_and_never_twice() {
    let Some(mut cluster) = Cluster::start(3, &["--answer-timeout", "500ms"]) else { return };
    let brokers = format!("{},{}", cluster.address(0), cluster.address(1));
    let moving = Herald::ws(&brokers, &JWT_GATEWAY);
    let staying = Herald::ws(&cluster.address(1), &JWT_GATEWAY);
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(connect_as(&moving, "ana", &["room"]).await);
    }
    clients.push(connect_as(&staying, "ana", &["room"]).await);
    let everyone = addresses(&clients);
    let mut grpc = grpc_client(&cluster.address(2)).await;
    let before = ask(&mut grpc, user_connections("ana")).await;
    assert_eq!((before.count, before.missing_workers.len()), (4, 0), "{before:?}");

    // Ask through the third broker every 2 ms, each question on its own,
    // while the moving gateway's broker dies and the gateway links to the
    // other one.
    let stop = Arc::new(AtomicBool::new(false));
    let asking = {
        let (stop, grpc) = (stop.clone(), grpc.clone());
        tokio::spawn(async move {
            let mut asks = tokio::task::JoinSet::new();
            while !stop.load(Ordering::SeqCst) {
                let mut grpc = grpc.clone();
                asks.spawn(async move {
                    let user = ask(&mut grpc, user_connections("ana")).await;
                    let room = ask(&mut grpc, group_count("room")).await;
                    (user, room)
                });
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            asks.join_all().await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    cluster.brokers[0].kill();
    wait_until("the moving gateway relinks through the other broker", || {
        moving.metric("herald_ws_broker_linked") == 1.0 && moving.metric("herald_ws_broker_disconnects_total") == 1.0
    });
    let relinked = Instant::now();
    let mut last = ask(&mut grpc, user_connections("ana")).await;
    while (last.count, last.missing_workers.len()) != (4, 0) && relinked.elapsed() < PATIENCE {
        tokio::time::sleep(Duration::from_millis(10)).await;
        last = ask(&mut grpc, user_connections("ana")).await;
    }
    assert_eq!((last.count, listed_addresses(&last)), (4, everyone), "its connections are back: {last:?}");
    assert_eq!(ask(&mut grpc, group_count("room")).await.count, 4);
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    let seen = asking.await.unwrap();

    // Every answer on the way was whole, or named the moving gateway as
    // missing and counted the others' connections: never one twice.
    let partial = |missing: &[String], count: u64| count == 1 && missing == [moving.worker_id()];
    for (user, room) in &seen {
        let listed = listed_addresses(user);
        assert!(
            listed.len() == user.connections.len() && user.count == user.connections.len() as u64,
            "user_connections listed a connection twice: {user:?}"
        );
        assert!(
            (user.count == 4 && user.missing_workers.is_empty()) || partial(&user.missing_workers, user.count),
            "user_connections during the failover: {user:?}"
        );
        assert!(
            (room.count == 4 && room.missing_workers.is_empty()) || partial(&room.missing_workers, room.count),
            "group_count during the failover: {room:?}"
        );
    }
    let incomplete = seen.iter().filter(|(user, _)| !user.missing_workers.is_empty()).count();
    println!("{} answers during the failover, {incomplete} naming the moving gateway missing", seen.len());

    // And the connections never noticed: a message to Ana reaches each once.
    grpc.publish(text_publish(target::Kind::User("ana".into()), "after the failover")).await.unwrap();
    for client in &mut clients {
        assert_eq!(client.recv_text().await, "after the failover");
        client.expect_silence(QUIET).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_broker_s_gateways_are_named_missing_within_the_answer_timeout() {
    let Some(cluster) = Cluster::start(3, &["--answer-timeout", "500ms"]) else { return };
    let gateway_a = Herald::ws(&cluster.address(0), &JWT_GATEWAY);
    let gateway_b = Herald::ws(&cluster.address(1), &JWT_GATEWAY);
    let http = Herald::http(&cluster.address(2), &[]);
    let _clients = [
        connect_as(&gateway_a, "ana", &["room"]).await,
        connect_as(&gateway_a, "bob", &["room"]).await,
        connect_as(&gateway_b, "cy", &["room"]).await,
    ];
    let complete = http_query(&http, r#"{"totals":{}}"#);
    assert_eq!((complete["count"].clone(), complete["missing_workers"].clone()), (json!(3), json!([])), "{complete}");

    struct Thaw<'a>(&'a Herald);
    impl Drop for Thaw<'_> {
        fn drop(&mut self) {
            self.0.signal(libc::SIGCONT);
        }
    }
    cluster.brokers[1].signal(libc::SIGSTOP);
    let thaw = Thaw(&cluster.brokers[1]);
    for question in [r#"{"totals":{}}"#, r#"{"group_count":"room"}"#, r#"{"user_online":"cy"}"#] {
        let asked = Instant::now();
        let partial = http_query(&http, question);
        let took = asked.elapsed();
        assert!(took < Duration::from_millis(1500), "{question} answered after {took:?}: the timeout is 500ms");
        assert_eq!(partial["missing_workers"], json!([gateway_b.worker_id()]), "{question}: {partial}");
        match question {
            r#"{"user_online":"cy"}"# => assert_eq!(partial["online"], false, "{partial}"),
            _ => assert_eq!(partial["count"], 2, "{question}: {partial}"),
        }
    }
    drop(thaw);
    wait_until("the thawed broker answers again", || {
        let answer = http_query(&http, r#"{"totals":{}}"#);
        answer["count"] == 3 && answer["missing_workers"] == json!([])
    });
}

/// A WebSocket upgrade by curl, with `headers`; the answer's head and body.
fn upgrade(url: &str, headers: &[&str]) -> (u16, String, String) {
    let mut args = vec!["-D", "-"];
    for header in headers {
        args.extend(["-H", header]);
    }
    let CurlReply { status, body } = curl_upgrade(url, &args);
    let (head, body) = body.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head in {body:?}"));
    (status, head.to_owned(), body.to_owned())
}

#[tokio::test]
async fn bad_expired_wrongly_signed_foreign_and_missing_tokens_are_refused_with_401_a_reason_and_a_count() {
    let herald = Herald::standalone(&JWT_GATEWAY);
    let url = format!("http://{}/", herald.addr("ws"));
    let good = json!({ "sub": "ana", "exp": unix_now() + 600 });
    let expired = hs256(SECRET, &json!({ "sub": "ana", "exp": unix_now() - 60 }));
    let wrong_secret = hs256("another-secret-another-secret-another", &good);
    let rs256 = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &good,
        &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
    )
    .unwrap();
    let bearer = |token: &str| format!("Authorization: Bearer {token}");
    let cases = [
        (
            "missing",
            url.clone(),
            None,
            "a token is required: send 'Authorization: Bearer <jwt>' or connect with ?token=<jwt>",
        ),
        ("malformed", format!("{url}?token=not-a-jwt"), None, "malformed token: not three dot-separated parts"),
        ("expired", url.clone(), Some(bearer(&expired)), "token has expired"),
        (
            "bad_signature",
            format!("{url}?token={wrong_secret}"),
            None,
            "token signature does not match any trusted key",
        ),
        ("unsupported_algorithm", url.clone(), Some(bearer(&rs256)), "token algorithm \"RS256\" is not accepted"),
    ];
    for (label, url, header, reason) in &cases {
        let headers: Vec<&str> = header.iter().map(String::as_str).collect();
        let (status, head, body) = upgrade(url, &headers);
        assert_eq!(status, 401, "{label}: {head}\n{body}");
        assert!(head.to_ascii_lowercase().contains("\r\nwww-authenticate: bearer"), "{label}: {head}");
        assert_eq!(body.trim_end(), *reason, "{label}");
        assert_eq!(body.trim_end().lines().count(), 1, "{label}: one line");
    }
    for (label, ..) in &cases {
        assert_eq!(herald.metric(&format!("herald_ws_tokens_refused_total{{reason=\"{label}\"}}")), 1.0, "{label}");
    }
    for label in ["not_yet_valid", "wrong_audience", "wrong_issuer", "bad_subject", "bad_groups"] {
        assert_eq!(herald.metric(&format!("herald_ws_tokens_refused_total{{reason=\"{label}\"}}")), 0.0, "{label}");
    }
    assert_eq!(herald.metric("herald_ws_connections_opened_total"), 0.0);

    // A good token, either way, gets in as its subject.
    let by_header = Client::connect_with_token(&herald.ws_url(), &hs256(SECRET, &good)).await;
    let by_query = Client::connect(&format!("{}/?token={}", herald.ws_url(), hs256(SECRET, &good))).await;
    assert_eq!((by_header.user_id.as_deref(), by_query.user_id.as_deref()), (Some("ana"), Some("ana")));
    assert_eq!(herald.metric("herald_ws_connections_opened_total"), 2.0);
}

#[tokio::test]
async fn a_connection_whose_token_expires_is_closed_with_4001() {
    let herald = Herald::standalone(&JWT_GATEWAY);
    let short_lived = hs256(SECRET, &json!({ "sub": "ana", "exp": unix_now() + 2 }));
    let mut ana = Client::connect_with_token(&herald.ws_url(), &short_lived).await;
    let connected = Instant::now();
    assert_eq!(http_query(&herald, r#"{"user_online":"ana"}"#)["online"], true);

    assert_eq!(ana.expect_close_frame().await, Some((4001, "token expired".to_owned())));
    let lasted = connected.elapsed();
    assert!(lasted < Duration::from_millis(3500), "closed {lasted:?} after connecting with 2 s left");
    assert_eq!(herald.metric("herald_ws_connections_closed_total{reason=\"token_expired\"}"), 1.0);
    assert_eq!(http_query(&herald, r#"{"user_online":"ana"}"#)["online"], false);
}

#[tokio::test]
async fn connection_ids_never_repeat_across_restarts_of_a_gateway_with_a_fixed_worker_id() {
    let broker = Herald::broker(&[]);
    let address = broker.address("broker");
    let http = Herald::http(&address, &[]);
    let mut gateway = Herald::ws(&address, &["--worker-id", "steady"]);
    let mut before = Client::connect(&gateway.ws_url()).await;
    gateway.signal(libc::SIGTERM);
    assert_eq!(before.expect_close().await, Some(1001));
    assert!(gateway.wait_exit(PATIENCE).success());

    let gateway = Herald::ws(&address, &["--worker-id", "steady"]);
    let mut after = Client::connect(&gateway.ws_url()).await;
    assert_eq!(after.worker_id, before.worker_id);
    assert!(
        after.connection_number() > before.connection_number(),
        "{} after the restart, {} before",
        after.connection_id,
        before.connection_id
    );

    let to = |client: &Client, content: &str| {
        get(&format!(
            "{}/?to_worker_id=steady&to_connection_id={}&content={content}",
            http.http_url(),
            client.connection_id
        ))
    };
    let stale = to(&before, "for+the+old+connection");
    assert_eq!(stale.status, 404, "the old id is not live: {}", stale.body);
    assert!(stale.body.contains("not live"), "{}", stale.body);
    let mut grpc = grpc_client(&address).await;
    let old = ConnectionAddress { worker_id: "steady".into(), connection_id: before.connection_id.clone() };
    let status = grpc.publish(text_publish(target::Kind::Connection(old), "old")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert_eq!(to(&after, "for+the+new+one").body, "ok");
    assert_eq!(after.recv_text().await, "for the new one");
    after.expect_silence(QUIET).await;
}

#[tokio::test]
async fn grpcurl_binds_a_user_with_control_and_finds_them_with_query_through_reflection_alone() {
    let Some(grpcurl_bin) = tool("grpcurl") else { return };
    let herald = Herald::standalone(&[]);
    let broker = herald.address("broker");
    let mut client = Client::connect(&herald.ws_url()).await;
    assert_eq!(client.user_id, None, "anonymous");

    let describe = grpcurl(&grpcurl_bin, &[&broker, "describe", "herald.v1.BrokerService"]);
    for rpc in [
        "rpc Control ( .herald.v1.ControlRequest ) returns ( .herald.v1.ControlResponse );",
        "rpc Query ( .herald.v1.QueryRequest ) returns ( .herald.v1.QueryResponse );",
    ] {
        assert!(describe.stdout.contains(rpc), "describe lacks {rpc:?}:\n{}{}", describe.stdout, describe.stderr);
    }
    let online = |bin| grpcurl_call(bin, &broker, "Query", r#"{"user_online":"ana"}"#).json();
    assert_eq!(online(&grpcurl_bin), json!({}), "not online yet (false is left out of proto JSON)");

    let bind = json!({ "bind_user": { "connection": address(&client), "user_id": "ana" } }).to_string();
    assert_eq!(grpcurl_call(&grpcurl_bin, &broker, "Control", &bind).json(), json!({ "connections": 1 }));
    assert_eq!(online(&grpcurl_bin), json!({ "online": true }));
    let found = grpcurl_call(&grpcurl_bin, &broker, "Query", r#"{"user_connections":"ana"}"#).json();
    assert_eq!(
        found,
        json!({
            "online": true,
            "connections": [{
                "address": { "workerId": client.worker_id, "connectionId": client.connection_id },
                "userId": "ana",
            }],
            "count": "1",
        })
    );
    let publish =
        grpcurl_call(&grpcurl_bin, &broker, "Publish", r#"{"target":{"user":"ana"},"content":{"text":"hi ana"}}"#);
    assert!(publish.success, "{}", publish.stderr);
    assert_eq!(client.recv_text().await, "hi ana");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_batch_from_grpcurl_and_curl_does_what_each_control_would_in_order_per_connection() {
    let Some(grpcurl_bin) = tool("grpcurl") else { return };
    let Some(cluster) = Cluster::start(2, &[]) else { return };
    let gateway_a = Herald::ws(&cluster.address(0), &["--greeting", "json"]);
    let gateway_b = Herald::ws(&cluster.address(1), &["--greeting", "json"]);
    let http = Herald::http(&cluster.address(1), &[]);
    let mut x = Client::connect(&gateway_a.ws_url()).await;
    let mut y = Client::connect(&gateway_b.ws_url()).await;
    let ghost = json!({ "worker_id": x.worker_id, "connection_id": "1" });

    // Through broker 0: Y is on the other broker's gateway, joins and then
    // leaves the team in that order; a control on a dead connection is
    // refused on its own.
    let batch = json!({ "requests": [
        { "bind_user": { "connection": address(&x), "user_id": "eve" } },
        { "join_groups": { "selection": { "connection": address(&x) }, "groups": ["team"] } },
        { "bind_user": { "connection": address(&y), "user_id": "finn" } },
        { "join_groups": { "selection": { "connection": address(&y) }, "groups": ["team"] } },
        { "leave_groups": { "selection": { "connection": address(&y) }, "groups": ["team"] } },
        { "bind_user": { "connection": ghost, "user_id": "ghost" } },
    ]});
    let answer = grpcurl_call(&grpcurl_bin, &cluster.address(0), "ControlBatch", &batch.to_string()).json();
    let results = answer["results"].as_array().cloned().unwrap_or_default();
    assert_eq!(results.len(), 6, "{answer}");
    for done in &results[..5] {
        assert_eq!(done, &json!({ "done": { "connections": 1 } }), "{answer}");
    }
    assert_eq!(results[5]["error"]["code"], 5, "NOT_FOUND: {answer}");
    let members = get(&format!("{}/v1/groups/team", http.http_url())).json();
    assert_eq!(listed(&members), addresses([&x]), "{members}");
    assert_eq!(http_query(&http, r#"{"user_online":"finn"}"#)["online"], true);

    // Through the HTTP gateway: a malformed entry keeps its place among the results.
    let batch = json!({ "requests": [
        { "bind_user": { "connection": address(&y), "user_id": "gil" } },
        { "close": { "selection": { "user": "eve" }, "reason": "batch kick" } },
        { "bind_user": { "user_id": "nobody" } },
    ]})
    .to_string();
    let reply = post(&format!("{}/v1/control/batch", http.http_url()), &batch);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let answer = reply.json();
    let done = json!({ "done": { "connections": 1, "missing_workers": [] } });
    assert_eq!((&answer["results"][0], &answer["results"][1]), (&done, &done), "{answer}");
    assert_eq!(answer["results"][2]["error"]["code"], 3, "{answer}");
    assert_eq!(x.expect_close_frame().await, Some((4000, "batch kick".to_owned())));
    let to_gil = format!("{}/?to_uid=gil&content=hi+gil", http.http_url());
    assert_eq!(get(&to_gil).body, "ok");
    assert_eq!(y.recv_text().await, "hi gil");
    assert_eq!(cluster.brokers[0].metric("herald_broker_controls_total{op=\"join_groups\"}"), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_is_in_effect_once_answered_so_a_publish_to_the_user_just_bound_always_arrives() {
    let Some(cluster) = Cluster::start(3, &[]) else { return };
    let gateway = Herald::ws(&cluster.address(0), &[]);
    let mut client = Client::connect(&gateway.ws_url()).await;
    let mut grpcs = Vec::new();
    for i in 0..3 {
        grpcs.push(grpc_client(&cluster.address(i)).await);
    }
    let here = ConnectionAddress { worker_id: client.worker_id.clone(), connection_id: client.connection_id.clone() };
    // The connection moves from user to user: each bind is asked of one
    // broker and the publish that follows its answer of another, at once.
    for i in 0..20 {
        let bind = ControlRequest {
            op: Some(control_request::Op::BindUser(BindUser {
                connection: Some(here.clone()),
                user_id: format!("user-{i}"),
            })),
        };
        let answer = grpcs[(i + 1) % 3].control(bind).await.expect("the control is answered").into_inner();
        assert_eq!(answer.connections, 1, "{answer:?}");
        let to_user = text_publish(target::Kind::User(format!("user-{i}")), &format!("to user-{i}"));
        grpcs[(i + 2) % 3].publish(to_user).await.expect("routed");
        if i > 0 {
            let to_previous = text_publish(target::Kind::User(format!("user-{}", i - 1)), "to a user it left");
            grpcs[i % 3].publish(to_previous).await.expect("routed");
        }
    }
    for i in 0..20 {
        assert_eq!(client.recv_text().await, format!("to user-{i}"));
    }
    client.expect_silence(QUIET).await;
}
