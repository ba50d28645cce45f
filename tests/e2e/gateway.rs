//! The WebSocket gateway as a client sees it: standalone mode, pings,
//! greetings, limits and shutdown.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Client, Herald, curl_upgrade, get};

#[tokio::test]
async fn standalone_runs_the_classic_session_in_one_process() {
    let herald = Herald::standalone(&[]);
    let mut a = Client::connect(&herald.ws_url()).await;
    let mut b = Client::connect(&herald.ws_url()).await;
    assert_eq!(a.worker_id, herald.worker_id());
    assert_eq!(b.connection_number(), a.connection_number() + 1, "ids count up");

    assert_eq!(get(&format!("{}/?content=hello", herald.http_url())).body, "ok");
    assert_eq!(a.recv_text().await, "hello");
    assert_eq!(b.recv_text().await, "hello");

    let url = format!(
        "{}/?to_worker_id={}&to_connection_id={}&content=just+b",
        herald.http_url(),
        b.worker_id,
        b.connection_id
    );
    assert_eq!(get(&url).body, "ok");
    assert_eq!(b.recv_text().await, "just b");
    a.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn pings_are_answered_and_client_messages_are_ignored() {
    let herald = Herald::standalone(&[]);
    let mut client = Client::connect(&herald.ws_url()).await;
    client.send(Message::text("clients cannot publish")).await;
    let mut ws = client.into_inner();
    ws.send(Message::Ping(b"are you there".to_vec().into())).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(reply, Message::Pong(b"are you there".to_vec().into()));
    assert_eq!(herald.metric("herald_ws_client_messages_ignored_total"), 1.0);
}

#[tokio::test]
async fn the_json_greeting_carries_the_same_address() {
    let herald = Herald::standalone(&["--greeting", "json"]);
    let (mut ws, _) = tokio_tungstenite::connect_async(herald.ws_url()).await.unwrap();
    let greeting = ws.next().await.unwrap().unwrap().into_text().unwrap();
    let json: serde_json::Value = serde_json::from_str(&greeting).unwrap();
    assert_eq!(json["type"], "connected");
    assert_eq!(json["worker_id"], herald.worker_id());
    let connection_id = json["connection_id"].as_str().expect("connection_id is a string");
    assert!(connection_id.parse::<u64>().is_ok(), "{greeting}");
    assert!(json.get("user_id").is_none(), "an anonymous connection has no user_id: {greeting}");

    // It is the address the gateway delivers to.
    let url = format!(
        "{}/?to_worker_id={}&to_connection_id={connection_id}&content=to+that+address",
        herald.http_url(),
        herald.worker_id()
    );
    assert_eq!(get(&url).body, "ok");
    let delivered = ws.next().await.unwrap().unwrap().into_text().unwrap();
    assert_eq!(delivered.as_str(), "to that address");
}

#[tokio::test]
async fn a_client_message_over_the_limit_is_closed_with_1009() {
    let herald = Herald::standalone(&["--max-client-message-bytes", "1024"]);
    let mut client = Client::connect(&herald.ws_url()).await;
    client.send(Message::text("x".repeat(2048))).await;
    assert_eq!(client.expect_close().await, Some(1009));
}

#[tokio::test]
async fn connections_over_the_limit_are_refused_with_503_before_the_upgrade() {
    let herald = Herald::standalone(&["--max-connections", "2"]);
    let _a = Client::connect(&herald.ws_url()).await;
    let _b = Client::connect(&herald.ws_url()).await;
    let refused = tokio_tungstenite::connect_async(herald.ws_url()).await.unwrap_err();
    match refused {
        tokio_tungstenite::tungstenite::Error::Http(response) => assert_eq!(response.status(), 503),
        other => panic!("expected an HTTP 503 refusal, got {other:?}"),
    }
    let upgrade = curl_upgrade(&format!("http://{}/", herald.addr("ws")), &[]);
    assert_eq!(upgrade.status, 503);
    assert_eq!(upgrade.body.trim(), "too many connections on this gateway");
}

#[tokio::test]
async fn sigterm_closes_clients_with_1001_and_exits_cleanly() {
    let mut herald = Herald::standalone(&[]);
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(Client::connect(&herald.ws_url()).await);
    }
    herald.signal(libc::SIGTERM);
    for c in &mut clients {
        assert_eq!(c.expect_close().await, Some(1001));
    }
    let status = herald.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn clients_that_answer_pings_stay_and_silent_ones_are_closed() {
    let herald = Herald::standalone(&["--ping-interval", "200ms", "--pong-timeout", "200ms"]);
    let mut answering = Client::connect(&herald.ws_url()).await;
    let mut silent = Client::connect(&herald.ws_url()).await;
    // Reading lets tungstenite answer the server's pings; the silent client is never polled.
    answering.expect_silence(Duration::from_millis(1500)).await;
    assert_eq!(herald.metric("herald_ws_connections_closed_total{reason=\"ping_timeout\"}"), 1.0);
    assert_eq!(herald.metric("herald_ws_connections"), 1.0);
    assert!(herald.metric("herald_ws_pings_sent_total") >= 4.0);
    assert_eq!(silent.expect_close().await, Some(1008));
    assert_eq!(get(&format!("{}/?content=still+here", herald.http_url())).body, "ok");
    assert_eq!(answering.recv_text().await, "still here");
}
