//! Channel history and recovery: a client that comes back with the position
//! of the last publication it saw gets exactly what it missed, then the live
//! stream, with no gap and no duplicate at the seam, or is told plainly that
//! it cannot; also when the gateway it was on is killed mid-stream.

use serde_json::{Value, json};

use crate::follower::{Follower, publish_numbers, seen};
use crate::protocol_client::ProtocolClient;
use crate::support::{Cluster, Herald, PATIENCE, get, grpc_client, post};

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

    let mut follower = Follower::subscribe(&doomed.ws_url(), "feed:live").await;
    let publisher = publish_numbers(brokers, "feed:live", MESSAGES);
    follower.follow_until(MESSAGES / 4).await;
    doomed.kill();
    follower.move_to(&survivor.ws_url()).await;
    follower.follow_until(MESSAGES).await;
    publisher.await.expect("the publisher");
    assert_eq!(follower.recovered, [true]);
    follower.assert_all(MESSAGES);
    follower.client.expect_silence().await;
}

/// In a 3-broker cluster the history lives in JetStream: the broker that a
/// client's gateway is linked to is killed mid-stream, the gateway fails
/// over, and reads back what was stored meanwhile. The client misses nothing.
#[tokio::test]
async fn a_broker_killed_mid_stream_loses_nothing_on_a_history_channel() {
    const MESSAGES: usize = 2000;
    let namespaces = ["--namespace", "feed:subscribe=anyone,history=5000,history_ttl=1m"];
    let Some(mut cluster) = Cluster::start(3, &namespaces) else {
        return;
    };
    let gateway = Herald::ws(&format!("{},{}", cluster.address(0), cluster.address(1)), &namespaces);
    let linked = (0..2).find(|i| cluster.brokers[*i].metric("herald_broker_sessions") == 1.0).expect("a linked broker");

    let mut follower = Follower::subscribe(&gateway.ws_url(), "feed:live").await;
    let publisher = publish_numbers(cluster.address(2), "feed:live", MESSAGES);
    follower.follow_until(MESSAGES / 4).await;
    cluster.brokers[linked].kill();
    follower.follow_until(MESSAGES).await;
    publisher.await.expect("the publisher");
    follower.assert_all(MESSAGES);
    assert!(follower.recovered.iter().all(|r| *r), "any resubscription recovered: {:?}", follower.recovered);
    assert!(gateway.metric("herald_ws_broker_disconnects_total") >= 1.0);
    follower.client.expect_silence().await;
}

/// NATS restarts mid-stream. With file storage (the default) the history
/// survives and nothing is lost; with memory storage it is lost, and a
/// client learns that it cannot recover (the epoch changed).
#[tokio::test]
async fn nats_restarted_mid_stream_loses_nothing_with_file_storage_and_says_so_with_memory() {
    const MESSAGES: usize = 1000;
    for storage in ["file", "memory"] {
        let namespaces =
            ["--namespace", "feed:subscribe=anyone,history=5000,history_ttl=1m", "--history-storage", storage];
        let Some(mut cluster) = Cluster::start(2, &namespaces) else {
            return;
        };
        let gateway = Herald::ws(&cluster.address(0), &namespaces[..2]);
        let mut follower = Follower::subscribe(&gateway.ws_url(), "feed:live").await;
        let publisher = publish_numbers(cluster.address(1), "feed:live", MESSAGES);
        follower.follow_until(MESSAGES / 4).await;
        cluster.nats.restart();
        if storage == "file" {
            follower.follow_until(MESSAGES).await;
            publisher.await.expect("the publisher");
            follower.assert_all(MESSAGES);
            assert!(follower.recovered.iter().all(|r| *r), "{:?}", follower.recovered);
        } else {
            // The stream starts again: offsets from 1 in a new epoch. The
            // client is told to resubscribe, and that it cannot recover.
            let deadline = tokio::time::Instant::now() + PATIENCE * 6;
            while follower.recovered.is_empty() {
                assert!(tokio::time::Instant::now() < deadline, "the client was never told of the lost stream");
                let push = follower.client.push().await;
                if push["unsubscribed"]["resubscribe"] == true {
                    follower.recover().await;
                } else {
                    follower.take(&push);
                }
            }
            assert_eq!(follower.recovered, [false], "a lost stream is not recovered");
            publisher.await.expect("the publisher");
        }
    }
}
