//! Channel history and recovery: a client that comes back with the position
//! of the last publication it saw gets exactly what it missed, then the live
//! stream, with no gap and no duplicate at the seam, or is told plainly that
//! it cannot; also when the gateway it was on is killed mid-stream.

use std::time::Duration;

use herald_proto::v1::target;
use serde_json::{Value, json};

use crate::protocol_client::ProtocolClient;
use crate::support::{Herald, PATIENCE, get, grpc_client, post, text_publish};

/// `feed:` keeps 100 publications for a minute; `tiny:` keeps 3; `chat:`
/// keeps none.
const NAMESPACES: [&str; 6] = [
    "--namespace",
    "feed:subscribe=anyone,history=100,history_ttl=1m",
    "--namespace",
    "tiny:subscribe=anyone,history=3",
    "--namespace",
    "chat:subscribe=anyone",
];

fn publish(herald: &Herald, channel: &str, text: &str) -> Value {
    let body = json!({ "target": { "channel": channel }, "content": { "text": text } }).to_string();
    let reply = post(&format!("{}/v1/publish", herald.http_url()), &body);
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()
}

/// The text and offset of a publication push.
fn seen(push: &Value) -> (String, u64) {
    let publication = &push["publication"];
    let text = publication["content"]["text"].as_str().unwrap_or_else(|| panic!("a publication: {push}"));
    (text.to_owned(), publication["offset"].as_u64().expect("an offset"))
}

fn texts(publications: &Value) -> Vec<String> {
    let list = publications.as_array().unwrap_or_else(|| panic!("a list of publications: {publications}"));
    list.iter().map(|p| p["content"]["text"].as_str().expect("text content").to_owned()).collect()
}

#[tokio::test]
async fn a_client_that_comes_back_gets_exactly_what_it_missed_then_the_live_stream() {
    let herald = Herald::standalone(&NAMESPACES);
    let url = herald.ws_url();
    let mut first = ProtocolClient::connect(&url).await;
    let reply = first.call("subscribe", json!({ "channel": "feed:news" })).await;
    let subscribed = &reply["subscribed"];
    assert_eq!(subscribed["position"], json!({ "offset": 0, "epoch": "" }), "nothing published yet: {reply}");
    assert_eq!((subscribed["recoverable"].as_bool(), subscribed["recovered"].as_bool()), (Some(true), Some(false)));

    for i in 1..=5 {
        let answer = publish(&herald, "feed:news", &i.to_string());
        assert_eq!(answer["position"]["offset"], i, "the publisher learns where it was stored: {answer}");
    }
    let mut epoch = String::new();
    for i in 1..=5u64 {
        let push = first.push().await;
        assert_eq!(seen(&push), (i.to_string(), i));
        epoch = push["publication"]["epoch"].as_str().expect("an epoch").to_owned();
    }
    assert!(!epoch.is_empty());

    // A client that saw up to 2 comes back: 3..5 in the reply, then live.
    let mut back = ProtocolClient::connect(&url).await;
    let since = json!({ "offset": 2, "epoch": epoch });
    let reply = back.call("subscribe", json!({ "channel": "feed:news", "recover": true, "since": since })).await;
    let subscribed = &reply["subscribed"];
    assert_eq!(subscribed["recovered"], true, "{reply}");
    assert_eq!(texts(&subscribed["publications"]), ["3", "4", "5"]);
    assert_eq!(subscribed["position"], json!({ "offset": 5, "epoch": epoch }));
    publish(&herald, "feed:news", "6");
    assert_eq!(seen(&back.push().await), ("6".to_owned(), 6), "then the live stream, from 6");
    assert_eq!(seen(&first.push().await), ("6".to_owned(), 6));
    back.expect_silence().await;

    // Subscribed before the first publication: all of them.
    let mut from_start = ProtocolClient::connect(&url).await;
    let since = json!({ "offset": 0, "epoch": "" });
    let reply = from_start.call("subscribe", json!({ "channel": "feed:news", "recover": true, "since": since })).await;
    assert_eq!(reply["subscribed"]["recovered"], true, "{reply}");
    assert_eq!(texts(&reply["subscribed"]["publications"]), ["1", "2", "3", "4", "5", "6"]);

    // Another epoch's offsets mean nothing here: told so, with the position.
    let mut stale = ProtocolClient::connect(&url).await;
    let since = json!({ "offset": 3, "epoch": "another-life" });
    let reply = stale.call("subscribe", json!({ "channel": "feed:news", "recover": true, "since": since })).await;
    let subscribed = &reply["subscribed"];
    assert_eq!((subscribed["recovered"].as_bool(), texts(&subscribed["publications"]).len()), (Some(false), 0));
    assert_eq!(subscribed["position"], json!({ "offset": 6, "epoch": epoch }), "{reply}");
}

#[tokio::test]
async fn what_a_channel_no_longer_holds_cannot_be_recovered_and_history_is_read_by_subscribers_and_backends() {
    let herald = Herald::standalone(&NAMESPACES);
    let url = herald.ws_url();
    let mut client = ProtocolClient::connect(&url).await;
    client.call("subscribe", json!({ "channel": "tiny:a" })).await;
    for i in 1..=5 {
        publish(&herald, "tiny:a", &i.to_string());
    }
    let mut epoch = String::new();
    for i in 1..=5u64 {
        let push = client.push().await;
        assert_eq!(seen(&push).1, i);
        epoch = push["publication"]["epoch"].as_str().expect("an epoch").to_owned();
    }
    let mut late = ProtocolClient::connect(&url).await;
    let since = json!({ "offset": 1, "epoch": epoch });
    let reply = late.call("subscribe", json!({ "channel": "tiny:a", "recover": true, "since": since })).await;
    assert_eq!(reply["subscribed"]["recovered"], false, "2 is gone (3 kept): {reply}");
    let since = json!({ "offset": 2, "epoch": epoch });
    let reply = client.call("history", json!({ "channel": "tiny:a", "since": since, "limit": 10 })).await;
    assert_eq!(texts(&reply["history"]["publications"]), ["3", "4", "5"], "{reply}");
    assert_eq!(reply["history"]["complete"], true);
    let reply = client.call("history", json!({ "channel": "tiny:a", "limit": 2 })).await;
    assert_eq!(texts(&reply["history"]["publications"]), ["4", "5"], "the newest: {reply}");

    // Refusals: not subscribed, no history in the namespace.
    let mut outsider = ProtocolClient::connect(&url).await;
    let reply = outsider.call("history", json!({ "channel": "tiny:a", "limit": 2 })).await;
    assert_eq!(reply["error"]["code"], 403, "{reply}");
    outsider.call("subscribe", json!({ "channel": "chat:a" })).await;
    let reply = outsider.call("history", json!({ "channel": "chat:a" })).await;
    assert_eq!(reply["error"]["code"], 403, "{reply}");
    assert_eq!(reply["error"]["message"], "this namespace keeps no history");
    let reply = outsider.call("history", json!({ "channel": "tiny:a", "since": 3 })).await;
    assert_eq!(reply["error"]["code"], 400, "{reply}");
    let reply = outsider.call("presence_stats", json!({ "channel": "chat:a" })).await;
    assert!(reply.get("error").is_some(), "the connection is still served after refusals: {reply}");

    // Backends read it over HTTP (and gRPC: the same call underneath).
    let history =
        get(&format!("{}/v1/channels/tiny:a/history?since_offset=3&epoch={epoch}&limit=10", herald.http_url()));
    assert_eq!(history.status, 200, "{}", history.body);
    assert_eq!(texts(&history.json()["publications"]), ["4", "5"]);
    let refused = get(&format!("{}/v1/channels/chat:a/history", herald.http_url()));
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(refused.body.contains("keeps no history"), "{}", refused.body);
    let mut grpc = grpc_client(&herald.address("broker")).await;
    let request = herald_proto::v1::HistoryRequest { channel: "feed:none".into(), since: None, limit: 5 };
    let answer = grpc.history(request).await.expect("a history read").into_inner();
    assert_eq!((answer.publications.len(), answer.position.map(|p| p.offset)), (0, Some(0)));
}

/// A browser's gateway dies mid-stream; it reconnects to another gateway of
/// the same broker with its last position and ends with every message,
/// in order, once.
#[tokio::test]
async fn a_client_of_a_killed_gateway_recovers_everything_on_another_gateway() {
    const MESSAGES: usize = 2000;
    let namespaces = ["--namespace", "feed:subscribe=anyone,history=5000,history_ttl=1m"];
    let broker = Herald::broker(&namespaces);
    let brokers = broker.address("broker");
    let mut doomed = Herald::ws(&brokers, &namespaces);
    let survivor = Herald::ws(&brokers, &namespaces);

    let mut client = ProtocolClient::connect(&doomed.ws_url()).await;
    client.call("subscribe", json!({ "channel": "feed:live" })).await;
    let publisher = tokio::spawn({
        let brokers = brokers.clone();
        async move {
            let mut grpc = grpc_client(&brokers).await;
            for i in 1..=MESSAGES {
                let request = text_publish(target::Kind::Channel("feed:live".into()), &i.to_string());
                grpc.publish(request).await.expect("a publish");
                if i % 100 == 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    });

    let mut received = Vec::new();
    let mut position = json!({ "offset": 0, "epoch": "" });
    while received.len() < MESSAGES / 4 {
        let push = client.push().await;
        received.push(seen(&push).0);
        position = json!({ "offset": push["publication"]["offset"], "epoch": push["publication"]["epoch"] });
    }
    doomed.kill();

    let mut client = ProtocolClient::connect(&survivor.ws_url()).await;
    let reply = client.call("subscribe", json!({ "channel": "feed:live", "recover": true, "since": position })).await;
    assert_eq!(reply["subscribed"]["recovered"], true, "{reply}");
    received.extend(texts(&reply["subscribed"]["publications"]));
    let deadline = tokio::time::Instant::now() + PATIENCE * 4;
    while received.len() < MESSAGES && tokio::time::Instant::now() < deadline {
        received.push(seen(&client.push().await).0);
    }
    publisher.await.expect("the publisher");
    let expected: Vec<String> = (1..=MESSAGES).map(|i| i.to_string()).collect();
    assert!(received == expected, "every message once, in order ({} received)", received.len());
    client.expect_silence().await;
}
