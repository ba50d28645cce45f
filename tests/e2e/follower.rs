//! A client that follows a channel with history across failures, and a
//! publisher of numbered messages: what the history and fault tests use to
//! show that nothing is lost, duplicated or reordered.

use std::time::Duration;

use herald_proto::v1::target;
use serde_json::{Value, json};

use crate::protocol_client::ProtocolClient;
use crate::support::{PATIENCE, grpc_client, text_publish};

/// The text and offset of a publication push.
pub fn seen(push: &Value) -> (String, u64) {
    let publication = &push["publication"];
    let text = publication["content"]["text"].as_str().unwrap_or_else(|| panic!("a publication: {push}"));
    (text.to_owned(), publication["offset"].as_u64().expect("an offset"))
}

/// A client following a channel with history: it counts what arrives,
/// remembers the last position, and subscribes again with recover when its
/// gateway tells it to, or when it moves to another gateway.
pub struct Follower {
    pub client: ProtocolClient,
    channel: String,
    pub received: Vec<String>,
    position: Value,
    /// Whether every recovery so far got everything back.
    pub recovered: Vec<bool>,
}

impl Follower {
    pub async fn subscribe(url: &str, channel: &str) -> Follower {
        let mut client = ProtocolClient::connect(url).await;
        let reply = client.call("subscribe", json!({ "channel": channel })).await;
        let position = reply["subscribed"]["position"].clone();
        assert!(position.is_object(), "a channel with history has a position: {reply}");
        Follower { client, channel: channel.to_owned(), received: Vec::new(), position, recovered: Vec::new() }
    }

    /// Goes on from where it was, on a new connection to `url`.
    pub async fn move_to(&mut self, url: &str) {
        self.client = ProtocolClient::connect(url).await;
        self.recover().await;
    }

    pub async fn recover(&mut self) {
        let body = json!({ "channel": self.channel, "recover": true, "since": self.position });
        let reply = self.client.call("subscribe", body).await;
        let subscribed = &reply["subscribed"];
        self.recovered.push(subscribed["recovered"] == true);
        for publication in subscribed["publications"].as_array().into_iter().flatten() {
            self.take(&json!({ "publication": publication }));
        }
        if subscribed["recovered"] != true {
            self.position = subscribed["position"].clone();
        }
    }

    pub fn take(&mut self, push: &Value) {
        self.received.push(seen(push).0);
        let publication = &push["publication"];
        self.position = json!({ "offset": publication["offset"], "epoch": publication["epoch"] });
    }

    /// Reads until `count` publications arrived in all.
    pub async fn follow_until(&mut self, count: usize) {
        let deadline = tokio::time::Instant::now() + PATIENCE * 6;
        while self.received.len() < count {
            assert!(tokio::time::Instant::now() < deadline, "only {} of {count} arrived", self.received.len());
            let push = self.client.push().await;
            if push["unsubscribed"]["resubscribe"] == true {
                self.recover().await;
            } else {
                self.take(&push);
            }
        }
    }

    /// Asserts that `1..=count` arrived, each once, in order.
    pub fn assert_all(&self, count: usize) {
        let expected: Vec<String> = (1..=count).map(|i| i.to_string()).collect();
        let duplicates = self.received.len().saturating_sub(count);
        assert!(
            self.received == expected,
            "every message once, in order: {} received, {duplicates} extra, first difference at {:?}",
            self.received.len(),
            self.received.iter().zip(&expected).position(|(a, b)| a != b)
        );
    }
}

/// Publishes `1..=count` to `channel` through `broker`, each with an
/// idempotency key and retried until taken, a little at a time.
pub fn publish_numbers(broker: String, channel: &'static str, count: usize) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut grpc = grpc_client(&broker).await;
        for i in 1..=count {
            let mut request = text_publish(target::Kind::Channel(channel.into()), &i.to_string());
            request.idempotency_key = format!("{channel}-{i}");
            let deadline = tokio::time::Instant::now() + PATIENCE * 3;
            while let Err(status) = grpc.publish(request.clone()).await {
                assert!(tokio::time::Instant::now() < deadline, "publish {i} refused for too long: {status}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if i % 100 == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    })
}
