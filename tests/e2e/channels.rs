//! Client channels over herald's client protocol (`herald.json.v1`): a
//! browser in headless Chromium and tokio-tungstenite clients subscribe,
//! publish and are refused, in a standalone herald and across brokers, while
//! classic raw clients on the same gateways see nothing of it.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::browser::BrowserSockets;
use crate::protocol_client::{ProtocolClient, QUIET};
use crate::support::{Client, Cluster, Herald, PATIENCE, get, grpcurl_call, post, tool};

/// The HS256 secret of the gateways that check tokens here.
const SECRET: &str = "channels-e2e-secret-0123456789abcdef";

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_secs()
}

fn signed(claims: &Value) -> String {
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    jsonwebtoken::encode(&header, claims, &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes())).expect("sign")
}

/// Anyone may subscribe to `chat:` and its subscribers may publish; `news:`
/// is for connections with a user id, and only backends publish there.
const NAMESPACES: [&str; 4] = ["--namespace", "chat:subscribe=anyone,publish=subscribers", "--namespace", "news"];

fn publication(channel: &str, text: &str) -> Value {
    json!({ "publication": { "channel": channel, "content": { "text": text } } })
}

fn publish_json(channel: &str, text: &str) -> String {
    json!({ "target": { "channel": channel }, "content": { "text": text } }).to_string()
}

#[tokio::test]
async fn a_browser_subscribes_publishes_and_gets_a_channel_s_publications_from_every_api() {
    let (Some(browser_tools), Some(grpcurl_bin)) = (BrowserSockets::tools(), tool("grpcurl")) else { return };
    let herald = Herald::standalone(&NAMESPACES);
    let url = herald.ws_url();
    let mut browser =
        BrowserSockets::open_speaking(&browser_tools, &[("classic", url.clone())], &[("app", url.clone())]);
    let connected: Value = serde_json::from_str(&browser.greetings["app"]).expect("a JSON push");
    assert!(connected["connected"]["connection_id"].is_string(), "{connected}");
    assert!(browser.greetings["classic"].starts_with("Worker ID:"), "the raw greeting, unchanged");

    browser.send("app", r#"{"id":1,"subscribe":{"channel":"chat:room-1"}}"#);
    browser.wait(&[("app", 2)]);
    let http = herald.http_url();
    assert_eq!(post(&format!("{http}/v1/publish"), &publish_json("chat:room-1", "from the JSON API")).status, 200);
    browser.wait(&[("app", 3)]);
    assert_eq!(get(&format!("{http}/?to_channel=chat%3Aroom-1&content=from+the+query+string")).body, "ok");
    browser.wait(&[("app", 4)]);
    let grpc =
        grpcurl_call(&grpcurl_bin, &herald.address("broker"), "Publish", &publish_json("chat:room-1", "from gRPC"));
    assert!(grpc.success, "{}", grpc.stderr);
    browser.wait(&[("app", 5)]);
    assert_eq!(get(&format!("{http}/?content=to+everyone")).body, "ok");
    browser.wait(&[("app", 6), ("classic", 2)]);
    browser.send("app", r#"{"id":2,"publish":{"channel":"chat:room-1","content":{"text":"from the browser"}}}"#);
    browser.wait(&[("app", 8)]);
    // Refused commands get replies, and the connection stays open.
    for command in [
        r#"{"id":3,"subscribe":{"channel":"news:today"}}"#,
        r#"{"id":4,"subscribe":{"channel":"sports:final"}}"#,
        r#"{"id":5,"subscribe":{"channel":"chat:room-1"}}"#,
        r#"{"id":6,"subscribe":{}}"#,
        r#"{"id":7,"publish":{"channel":"chat:lobby","content":{"text":"not subscribed"}}}"#,
    ] {
        browser.send("app", command);
    }
    let report = browser.wait(&[("app", 13)]);

    let app = &report["app"];
    assert_eq!(app["protocol"], "herald.json.v1");
    assert_eq!(app["state"], 1, "still open: {app}");
    let messages: Vec<Value> = app["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| serde_json::from_str(m.as_str().expect("text")).expect("JSON"))
        .collect();
    let codes: Vec<Value> = messages[8..].iter().map(|m| m["error"]["code"].clone()).collect();
    assert_eq!(
        messages[1..8],
        [
            json!({"id": 1, "subscribed": {"channel": "chat:room-1"}}),
            publication("chat:room-1", "from the JSON API"),
            publication("chat:room-1", "from the query string"),
            publication("chat:room-1", "from gRPC"),
            json!({"message": {"content": {"text": "to everyone"}}}),
            json!({"id": 2, "published": {"channel": "chat:room-1"}}),
            publication("chat:room-1", "from the browser"),
        ]
    );
    assert_eq!(codes, [json!(403), json!(404), json!(409), json!(400), json!(403)], "{messages:?}");
    let classic = &report["classic"];
    assert_eq!(classic["protocol"], "");
    assert_eq!(classic["messages"][1], "to everyone");
    assert_eq!(classic["messages"].as_array().map(Vec::len), Some(2), "nothing of the channel: {classic}");
    assert_eq!(herald.metric("herald_ws_client_commands_total{outcome=\"refused\"}"), 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_channel_reaches_its_subscribers_on_every_gateway_and_only_gateways_that_have_one() {
    let Some(cluster) = Cluster::start(2, &[]) else { return };
    let gateway_a = Herald::ws(&cluster.address(0), &NAMESPACES);
    let gateway_b = Herald::ws(&cluster.address(1), &NAMESPACES);
    let gateway_c = Herald::ws(&cluster.address(1), &NAMESPACES);
    let http = Herald::http(&cluster.address(0), &[]);
    let mut ana = ProtocolClient::connect(&gateway_a.ws_url()).await;
    let mut bob = ProtocolClient::connect(&gateway_b.ws_url()).await;
    let mut cy = ProtocolClient::connect(&gateway_c.ws_url()).await;
    let mut classic = Client::connect(&gateway_b.ws_url()).await;
    assert_ne!(ana.worker_id, bob.worker_id);

    for client in [&mut ana, &mut bob] {
        let reply = client.call("subscribe", json!({ "channel": "chat:room-1" })).await;
        assert_eq!(reply["subscribed"]["channel"], "chat:room-1", "{reply}");
    }
    // Once subscribed is answered, a publish through the other broker arrives.
    let published = post(&format!("{}/v1/publish", http.http_url()), &publish_json("chat:room-1", "hello room"));
    assert_eq!(published.status, 200, "{}", published.body);
    assert_eq!(ana.push().await, publication("chat:room-1", "hello room"));
    assert_eq!(bob.push().await, publication("chat:room-1", "hello room"));

    // A client on one gateway publishes; the subscriber on the other broker's gateway gets it.
    let reply = bob.call("publish", json!({ "channel": "chat:room-1", "content": { "binary": "AAH/" } })).await;
    assert_eq!(reply["published"]["channel"], "chat:room-1", "{reply}");
    let binary = json!({ "publication": { "channel": "chat:room-1", "content": { "binary": "AAH/" } } });
    assert_eq!(ana.push().await, binary);
    assert_eq!(bob.push().await, binary);

    // Unsubscribed, Ana gets nothing more.
    assert_eq!(
        ana.call("unsubscribe", json!({ "channel": "chat:room-1" })).await["unsubscribed"]["channel"],
        "chat:room-1"
    );
    let reply = ana.call("unsubscribe", json!({ "channel": "chat:room-1" })).await;
    assert_eq!(reply["error"]["code"], 410, "{reply}");
    let published = post(&format!("{}/v1/publish", http.http_url()), &publish_json("chat:room-1", "after"));
    assert_eq!(published.status, 200);
    assert_eq!(bob.push().await, publication("chat:room-1", "after"));
    ana.expect_silence().await;
    cy.expect_silence().await;
    classic.expect_silence(QUIET).await;

    // Only the gateways with a subscriber received the channel's events.
    let channel_events = "herald_ws_broker_events_total{delivery=\"channel\"}";
    assert_eq!(gateway_b.metric(channel_events), 3.0);
    assert_eq!(gateway_a.metric(channel_events), 2.0, "none after Ana left");
    assert_eq!(gateway_c.metric(channel_events), 0.0, "gateway C holds no subscriber");
}

#[tokio::test]
async fn frames_that_are_not_commands_close_the_connection_with_4002_and_the_reason() {
    let herald = Herald::standalone(&NAMESPACES);
    for (frame, reason) in [
        ("hello", "not JSON"),
        (r#"{"subscribe":{"channel":"chat:a"}}"#, "id must be a whole number"),
        (r#"{"id":0,"subscribe":{"channel":"chat:a"}}"#, "id must be a whole number"),
    ] {
        let mut client = ProtocolClient::connect(&herald.ws_url()).await;
        client.send_text(frame).await;
        let closed = tokio::time::timeout(PATIENCE, client.ws.next()).await.expect("a close in time");
        let Some(Ok(Message::Close(Some(close)))) = closed else { panic!("{frame}: expected a close, got {closed:?}") };
        assert_eq!(u16::from(close.code), 4002, "{frame}");
        assert!(close.reason.contains(reason), "{frame}: {}", close.reason);
    }
    let mut client = ProtocolClient::connect(&herald.ws_url()).await;
    client.ws.send(Message::binary(vec![1u8, 2])).await.expect("send");
    let closed = tokio::time::timeout(PATIENCE, client.ws.next()).await.expect("a close in time");
    assert!(matches!(closed, Some(Ok(Message::Close(Some(ref c)))) if u16::from(c.code) == 4002), "{closed:?}");
    assert_eq!(herald.metric("herald_ws_connections_closed_total{reason=\"bad_command\"}"), 4.0);
}

/// The gateway frames connections itself: a command sent in fragments with
/// a ping between them is read whole, and the ping is answered first.
#[tokio::test]
async fn a_command_fragmented_around_a_ping_is_answered_and_so_is_the_ping() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

    let herald = Herald::standalone(&NAMESPACES);
    let mut client = ProtocolClient::connect(&herald.ws_url()).await;
    let command = r#"{"id":7,"subscribe":{"channel":"chat:fragments"}}"#;
    let (first, rest) = command.split_at(10);
    let (middle, last) = rest.split_at(20);
    let frames = [
        Message::Frame(Frame::message(first.as_bytes().to_vec(), OpCode::Data(Data::Text), false)),
        Message::Ping(b"are you there".to_vec().into()),
        Message::Frame(Frame::message(middle.as_bytes().to_vec(), OpCode::Data(Data::Continue), false)),
        Message::Frame(Frame::message(last.as_bytes().to_vec(), OpCode::Data(Data::Continue), true)),
    ];
    for frame in frames {
        client.ws.feed(frame).await.expect("send");
    }
    client.ws.flush().await.expect("flush");
    let pong = tokio::time::timeout(PATIENCE, client.ws.next()).await.expect("a pong in time");
    assert!(matches!(pong, Some(Ok(Message::Pong(ref p))) if &p[..] == b"are you there"), "{pong:?}");
    let reply = client.read().await;
    assert_eq!(reply["id"], 7, "{reply}");
    assert!(reply.get("subscribed").is_some(), "{reply}");
}

#[tokio::test]
async fn without_namespaces_a_gateway_offers_no_channel_and_a_namespace_that_checks_tokens_needs_client_auth() {
    let herald = Herald::standalone(&[]);
    let mut client = ProtocolClient::connect(&herald.ws_url()).await;
    let reply = client.call("subscribe", json!({ "channel": "chat:a" })).await;
    assert_eq!(reply["error"]["code"], 404, "{reply}");
    let reply = client.call("subscribe", json!({ "channel": "chat" })).await;
    assert_eq!(reply["error"]["code"], 400, "a channel without a namespace: {reply}");

    for (namespace, expected) in [
        ("secret:subscribe=token", "namespace \"secret\" checks tokens: it needs --client-auth jwt"),
        ("chat:subscribe=everyone", "unknown option \"subscribe=everyone\""),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["standalone", "--namespace", namespace])
            .output()
            .expect("run herald");
        assert!(!out.status.success(), "{namespace}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{namespace}: {stderr}");
    }
}

#[tokio::test]
async fn namespaces_admit_users_listed_channels_and_subscription_tokens_and_a_refresh_keeps_the_connection() {
    let herald = Herald::standalone(&[
        "--client-auth",
        "jwt",
        "--jwt-secret",
        SECRET,
        "--namespace",
        "news",
        "--namespace",
        "team:subscribe=listed",
        "--namespace",
        "secret:subscribe=token",
    ]);
    let token = signed(&json!({ "sub": "ana", "exp": unix_now() + 2, "channels": ["team:red"] }));
    let mut ana = ProtocolClient::connect_with(&herald.ws_url(), Some(&token)).await;
    let mut code = async |channel: &str, token: Option<String>| {
        let reply = ana.call("subscribe", json!({ "channel": channel, "token": token })).await;
        if reply.get("subscribed").is_some() { 200 } else { reply["error"]["code"].as_u64().unwrap_or(0) }
    };
    assert_eq!(code("news:today", None).await, 200, "ana has a user id");
    assert_eq!(code("team:red", None).await, 200, "her token lists it");
    assert_eq!(code("team:blue", None).await, 403, "her token does not list it");
    assert_eq!(code("secret:plans", None).await, 403, "no subscription token");
    let other_user = signed(&json!({ "sub": "bob", "channel": "secret:plans" }));
    assert_eq!(code("secret:plans", Some(other_user)).await, 401);
    let other_channel = signed(&json!({ "sub": "ana", "channel": "secret:other" }));
    assert_eq!(code("secret:plans", Some(other_channel)).await, 401);
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({ "sub": "ana", "channel": "secret:plans" }),
        &jsonwebtoken::EncodingKey::from_secret(b"not-the-gateway-secret-0123456789abcdef"),
    )
    .expect("sign");
    assert_eq!(code("secret:plans", Some(forged)).await, 401);
    let granted = signed(&json!({ "sub": "ana", "channel": "secret:plans", "exp": unix_now() + 60 }));
    assert_eq!(code("secret:plans", Some(granted)).await, 200);

    // A refreshed token moves the expiry: the connection outlives the first token.
    let refused = ana.call("refresh", json!({ "token": signed(&json!({ "sub": "bob" })) })).await;
    assert_eq!(refused["error"]["code"], 401, "{refused}");
    let later = unix_now() + 60;
    let refreshed = ana.call("refresh", json!({ "token": signed(&json!({ "sub": "ana", "exp": later })) })).await;
    assert_eq!(refreshed, json!({ "id": refreshed["id"], "refreshed": { "expires_at": later } }));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let published = get(&format!("{}/?to_channel=secret%3Aplans&content=still+here", herald.http_url()));
    assert_eq!(published.body, "ok");
    assert_eq!(ana.push().await, publication("secret:plans", "still here"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_the_same_seen_from_two_gateways_on_two_brokers() {
    let Some(cluster) = Cluster::start(2, &[]) else { return };
    let args = [
        "--client-auth",
        "jwt",
        "--jwt-secret",
        SECRET,
        "--namespace",
        "room:presence=on",
        "--namespace",
        "chat:subscribe=anyone",
    ];
    let gateway_a = Herald::ws(&cluster.address(0), &args);
    let gateway_b = Herald::ws(&cluster.address(1), &args);
    let http = Herald::http(&cluster.address(0), &[]);
    let token = |user: &str| signed(&json!({ "sub": user, "exp": unix_now() + 60 }));
    let mut ana = ProtocolClient::connect_with(&gateway_a.ws_url(), Some(&token("ana"))).await;
    let mut bob = ProtocolClient::connect_with(&gateway_b.ws_url(), Some(&token("bob"))).await;
    let mut ana_again = ProtocolClient::connect_with(&gateway_b.ws_url(), Some(&token("ana"))).await;
    let mut cy = ProtocolClient::connect_with(&gateway_a.ws_url(), Some(&token("cy"))).await;
    for client in [&mut ana, &mut bob, &mut ana_again] {
        let reply = client.call("subscribe", json!({ "channel": "room:x" })).await;
        assert_eq!(reply["subscribed"]["channel"], "room:x", "{reply}");
    }

    let users = |reply: &Value| {
        let mut users: Vec<String> = reply["presence"]["clients"]
            .as_array()
            .unwrap_or_else(|| panic!("a presence answer: {reply}"))
            .iter()
            .map(|c| c["user_id"].as_str().unwrap_or_default().to_owned())
            .collect();
        users.sort();
        users
    };
    let from_a = ana.call("presence", json!({ "channel": "room:x" })).await;
    let from_b = bob.call("presence", json!({ "channel": "room:x" })).await;
    assert_eq!(users(&from_a), ["ana", "ana", "bob"], "{from_a}");
    assert_eq!(users(&from_b), users(&from_a), "{from_b}");
    assert_eq!(from_a["presence"]["missing_workers"], json!([]));
    let stats = bob.call("presence_stats", json!({ "channel": "room:x" })).await;
    assert_eq!(
        stats["presence_stats"],
        json!({ "channel": "room:x", "connections": 3, "users": 2, "missing_workers": [] })
    );
    let view = get(&format!("{}/v1/channels/room:x", http.http_url())).json();
    assert_eq!(view["count"], 3, "{view}");

    // Leaving shows at once, from either side.
    assert!(ana_again.call("unsubscribe", json!({ "channel": "room:x" })).await.get("unsubscribed").is_some());
    assert_eq!(users(&ana.call("presence", json!({ "channel": "room:x" })).await), ["ana", "bob"]);

    // Only subscribers ask, and only where the namespace has presence on.
    let refused = cy.call("presence", json!({ "channel": "room:x" })).await;
    assert_eq!(refused["error"]["code"], 403, "{refused}");
    assert!(cy.call("subscribe", json!({ "channel": "chat:y" })).await.get("subscribed").is_some());
    let refused = cy.call("presence_stats", json!({ "channel": "chat:y" })).await;
    assert_eq!(refused["error"]["message"], "presence is off in this namespace", "{refused}");
}

#[tokio::test]
async fn a_gateway_opens_no_more_client_channels_than_its_limit() {
    let mut args = NAMESPACES.to_vec();
    args.extend(["--max-client-channels", "1"]);
    let herald = Herald::standalone(&args);
    let mut ana = ProtocolClient::connect(&herald.ws_url()).await;
    let mut bob = ProtocolClient::connect(&herald.ws_url()).await;
    assert!(ana.call("subscribe", json!({ "channel": "chat:a" })).await.get("subscribed").is_some());
    let refused = bob.call("subscribe", json!({ "channel": "chat:b" })).await;
    assert_eq!(refused["error"]["code"], 429, "{refused}");
    assert!(bob.call("subscribe", json!({ "channel": "chat:a" })).await.get("subscribed").is_some());
}

#[tokio::test]
async fn subscribers_see_who_joins_and_leaves_and_a_backend_can_leave_one_out() {
    let herald = Herald::standalone(&[
        "--namespace",
        "room:subscribe=anyone,join_leave=on",
        "--namespace",
        "quiet:subscribe=anyone",
    ]);
    let url = herald.ws_url();
    let mut ana = ProtocolClient::connect(&url).await;
    ana.call("subscribe", json!({ "channel": "room:a" })).await;
    let own = ana.push().await;
    assert_eq!(own["join"]["info"]["connection_id"], json!(ana.connection_id), "a subscriber sees its own join: {own}");

    let mut bob = ProtocolClient::connect(&url).await;
    bob.call("subscribe", json!({ "channel": "room:a" })).await;
    let info = json!({ "worker_id": bob.worker_id, "connection_id": bob.connection_id, "user_id": "" });
    assert_eq!(ana.push().await, json!({ "join": { "channel": "room:a", "info": info } }));
    assert_eq!(bob.push().await["join"]["info"], info);

    // A backend sends to the channel but not to ana.
    let body = json!({
        "target": { "channel": "room:a", "except": [{ "worker_id": ana.worker_id, "connection_id": ana.connection_id }] },
        "content": { "text": "not for ana" },
    });
    let reply = post(&format!("{}/v1/publish", herald.http_url()), &body.to_string());
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(bob.push().await, publication("room:a", "not for ana"));

    bob.call("unsubscribe", json!({ "channel": "room:a" })).await;
    assert_eq!(ana.push().await, json!({ "leave": { "channel": "room:a", "info": info } }));
    let mut cid = ProtocolClient::connect(&url).await;
    cid.call("subscribe", json!({ "channel": "room:a" })).await;
    assert!(ana.push().await.get("join").is_some());
    drop(cid);
    let leave = ana.push().await;
    assert_eq!(leave["leave"]["channel"], "room:a", "a closed connection leaves: {leave}");

    // A namespace without join_leave announces nothing.
    ana.call("subscribe", json!({ "channel": "quiet:a" })).await;
    let mut dan = ProtocolClient::connect(&url).await;
    dan.call("subscribe", json!({ "channel": "quiet:a" })).await;
    ana.expect_silence().await;
}

#[tokio::test]
async fn a_client_may_keep_its_token_out_of_the_url_and_connect_with_a_command() {
    let herald = Herald::standalone(&["--client-auth", "jwt", "--jwt-secret", SECRET, "--namespace", "news"]);
    let url = herald.ws_url();
    let token = signed(&json!({ "sub": "ana", "exp": unix_now() + 60 }));
    let (mut ana, reply) = ProtocolClient::connect_by_command(&url, &token).await;
    assert_eq!(reply["id"], 1, "the connect command is answered: {reply}");
    assert_eq!(reply["connected"]["user_id"], "ana", "{reply}");
    let subscribed = ana.call("subscribe", json!({ "channel": "news:today" })).await;
    assert!(subscribed.get("subscribed").is_some(), "a users-only namespace admits the token's user: {subscribed}");
    let again = ana.call("connect", json!({ "token": token })).await;
    assert_eq!(again["error"]["code"], 400, "{again}");

    let (mut forged, reply) = ProtocolClient::connect_by_command(&url, "not.a.jwt").await;
    assert_eq!(reply["error"]["code"], 401, "{reply}");
    assert_eq!(forged.closed().await.map(|(code, _)| code), Some(4001));

    let mut early = {
        let mut request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url.as_str())
            .expect("a WebSocket URL");
        request.headers_mut().insert("sec-websocket-protocol", "herald.json.v1".parse().expect("a header value"));
        tokio_tungstenite::connect_async(request).await.expect("the handshake is accepted without a token").0
    };
    early.send(Message::text(r#"{"id":5,"subscribe":{"channel":"news:today"}}"#)).await.expect("send");
    let refusal = early.next().await.expect("a reply").expect("a frame");
    let refusal: Value = serde_json::from_str(refusal.to_text().expect("text")).expect("JSON");
    assert_eq!((refusal["id"].as_u64(), refusal["error"]["code"].as_u64()), (Some(5), Some(401)), "{refusal}");
    assert_eq!(refusal["error"]["message"], "connect with a token first");
    match early.next().await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 4001),
        other => panic!("expected a 4001 close, got {other:?}"),
    }
}
