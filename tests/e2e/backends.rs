//! Backends: connection events consumed in groups over gRPC, and clients'
//! calls to the backends serving them, against real `herald` processes.

use std::time::Duration;

use herald_proto::v1::{
    AckEventsRequest, CallAnswer, ConsumeEventsRequest, ConsumedEvent, Content, ServeCallsRequest, ServeCallsStart,
    call_answer, connection_event, content, serve_calls_request,
};
use tokio_stream::StreamExt;
use tokio_tungstenite::tungstenite::Message;
use tonic::Streaming;

use crate::support::*;

const PATIENCE: Duration = Duration::from_secs(10);

/// One instance of a consumer group, reading over gRPC.
struct Instance {
    stream: Streaming<herald_proto::v1::ConsumeEventsResponse>,
    broker: String,
    group: String,
}

impl Instance {
    async fn attach(broker: &str, group: &str) -> Instance {
        let mut client = grpc_client(broker).await;
        let request = ConsumeEventsRequest { group: group.into(), max_unacked: 0 };
        let stream = client.consume_events(request).await.expect("consume events").into_inner();
        Instance { stream, broker: broker.into(), group: group.into() }
    }

    /// The next batch, within the patience.
    async fn batch(&mut self) -> Vec<ConsumedEvent> {
        let next = tokio::time::timeout(PATIENCE, self.stream.next()).await.expect("events in time");
        next.expect("the stream goes on").expect("a batch").events
    }

    /// Events until `n` arrived, acknowledged.
    async fn take(&mut self, n: usize) -> Vec<ConsumedEvent> {
        let mut events = Vec::new();
        while events.len() < n {
            let batch = self.batch().await;
            self.ack(&batch).await;
            events.extend(batch);
        }
        events
    }

    async fn ack(&self, events: &[ConsumedEvent]) {
        let mut client = grpc_client(&self.broker).await;
        let ack_ids = events.iter().map(|e| e.ack_id.clone()).collect();
        client.ack_events(AckEventsRequest { group: self.group.clone(), ack_ids }).await.expect("ack");
    }
}

fn kind(event: &ConsumedEvent) -> &'static str {
    match event.event.as_ref().and_then(|e| e.kind.as_ref()) {
        Some(connection_event::Kind::Connect(_)) => "connect",
        Some(connection_event::Kind::Disconnect(_)) => "disconnect",
        Some(connection_event::Kind::Subscribe(_)) => "subscribe",
        Some(connection_event::Kind::Unsubscribe(_)) => "unsubscribe",
        Some(connection_event::Kind::Message(_)) => "message",
        None => "none",
    }
}

#[tokio::test]
async fn a_connection_s_life_reaches_every_group_once_and_in_order() {
    let herald = Herald::standalone(&["--events", "all", "--event-headers", "user-agent"]);
    let broker = herald.address("broker");
    let mut billing = Instance::attach(&broker, "billing").await;
    let mut audit = Instance::attach(&broker, "audit").await;
    // Attached: the groups exist before the connection does.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut client = Client::connect(&herald.ws_url()).await;
    client.send(Message::text("hello")).await;
    client.send(Message::binary(vec![0u8, 1, 2])).await;
    client.send(Message::Close(None)).await;
    let _ = client.expect_close().await;

    for group in [&mut billing, &mut audit] {
        let events = group.take(4).await;
        let kinds: Vec<&str> = events.iter().map(kind).collect();
        assert_eq!(kinds, ["connect", "message", "message", "disconnect"], "{}", group.group);
        let first = events[0].event.as_ref().unwrap();
        let address = first.connection.as_ref().unwrap();
        assert_eq!(
            (address.worker_id.as_str(), address.connection_id.as_str()),
            (client.worker_id.as_str(), client.connection_id.as_str())
        );
        let Some(connection_event::Kind::Message(text)) = &events[1].event.as_ref().unwrap().kind else { panic!() };
        assert_eq!(text.content, Some(Content { body: Some(content::Body::Text("hello".into())) }));
        let Some(connection_event::Kind::Message(binary)) = &events[2].event.as_ref().unwrap().kind else { panic!() };
        assert_eq!(binary.content, Some(Content { body: Some(content::Body::Binary(vec![0u8, 1, 2].into())) }));
        let Some(connection_event::Kind::Disconnect(gone)) = &events[3].event.as_ref().unwrap().kind else { panic!() };
        assert_eq!(gone.reason, "client_closed");
        assert!(events.iter().all(|e| e.delivery == 1));
    }
}

#[tokio::test]
async fn an_unacknowledged_event_is_delivered_again_and_instances_share_a_group() {
    let herald = Herald::standalone(&["--events", "connect", "--event-ack-wait", "1s"]);
    let broker = herald.address("broker");
    let mut first = Instance::attach(&broker, "workers").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _client = Client::connect(&herald.ws_url()).await;
    let delivered = first.batch().await;
    assert_eq!(delivered.len(), 1);
    // Not acknowledged: after the ack wait it comes again, counted.
    let again = first.batch().await;
    assert_eq!(again[0].event.as_ref().unwrap().id, delivered[0].event.as_ref().unwrap().id);
    assert_eq!(again[0].delivery, 2);
    first.ack(&again).await;

    // A second instance of the group: each new event goes to one of them.
    let mut second = Instance::attach(&broker, "workers").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(Client::connect(&herald.ws_url()).await);
    }
    let mut seen = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while seen.len() < 20 && tokio::time::Instant::now() < deadline {
        tokio::select! {
            Some(Ok(batch)) = first.stream.next() => {
                first.ack(&batch.events).await;
                for e in batch.events { assert!(seen.insert(e.event.unwrap().id), "seen twice"); }
            }
            Some(Ok(batch)) = second.stream.next() => {
                second.ack(&batch.events).await;
                for e in batch.events { assert!(seen.insert(e.event.unwrap().id), "seen twice"); }
            }
        }
    }
    assert_eq!(seen.len(), 20);
}

#[tokio::test]
async fn a_malformed_group_or_ack_is_refused_with_invalid_argument() {
    let herald = Herald::standalone(&[]);
    let mut client = grpc_client(&herald.address("broker")).await;
    let refused = client.consume_events(ConsumeEventsRequest { group: "a b".into(), max_unacked: 0 }).await;
    assert_eq!(refused.err().map(|s| s.code()), Some(tonic::Code::InvalidArgument));
    let refused = client.ack_events(AckEventsRequest { group: "g".into(), ack_ids: vec!["bad id".into()] }).await;
    assert_eq!(refused.err().map(|s| s.code()), Some(tonic::Code::InvalidArgument));
}

/// A backend serving `method`: answers each call with its data reversed.
async fn serve_reversed(broker: &str, method: &str) -> tokio::task::JoinHandle<()> {
    let mut client = grpc_client(broker).await;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let start = ServeCallsRequest {
        kind: Some(serve_calls_request::Kind::Start(ServeCallsStart { methods: vec![method.into()] })),
    };
    tx.send(start).await.unwrap();
    let mut calls = client.serve_calls(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    tokio::spawn(async move {
        while let Some(Ok(call)) = calls.next().await {
            let data = match call.call.and_then(|c| c.data).and_then(|d| d.body) {
                Some(content::Body::Text(text)) => text.chars().rev().collect::<String>(),
                _ => String::new(),
            };
            let answer = CallAnswer {
                call_id: call.call_id,
                result: Some(call_answer::Result::Data(Content { body: Some(content::Body::Text(data)) })),
            };
            let _ = tx.send(ServeCallsRequest { kind: Some(serve_calls_request::Kind::Answer(answer)) }).await;
        }
    })
}

#[tokio::test]
async fn a_client_rpc_is_answered_by_a_backend_and_refused_when_none_serves_it() {
    let herald = Herald::standalone(&[]);
    let backend = serve_reversed(&herald.address("broker"), "text.reverse").await;
    let mut client = crate::protocol_client::ProtocolClient::connect(&herald.ws_url()).await;
    let answer = client.call("rpc", serde_json::json!({"method": "text.reverse", "data": {"text": "herald"}})).await;
    assert_eq!(answer["rpc"]["data"]["text"], "dlareh", "{answer}");
    let refused = client.call("rpc", serde_json::json!({"method": "nobody.home", "data": {"text": "x"}})).await;
    assert_eq!(refused["error"]["code"], 404, "{refused}");
    backend.abort();
}

fn disconnect(event: &ConsumedEvent) -> Option<(String, herald_proto::v1::DisconnectEvent)> {
    let event = event.event.as_ref()?;
    match &event.kind {
        Some(connection_event::Kind::Disconnect(d)) => {
            Some((event.connection.as_ref()?.connection_id.clone(), d.clone()))
        }
        _ => None,
    }
}

#[tokio::test]
async fn a_killed_gateway_s_connections_are_reported_lost_and_a_stopped_one_s_once() {
    use herald_proto::v1::DisconnectCause;
    let broker = Herald::broker(&["--gateway-lost-grace", "1s"]);
    let address = broker.address("broker");
    let mut audit = Instance::attach(&address, "audit").await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Killed: nobody on the gateway says goodbye, the broker does.
    let mut gateway = Herald::ws(&address, &["--events", "connect,disconnect"]);
    let client = Client::connect(&gateway.ws_url()).await;
    assert_eq!(kind(&audit.take(1).await[0]), "connect");
    gateway.kill();
    let gone = audit.take(1).await;
    let (connection_id, event) = disconnect(&gone[0]).expect("a disconnect");
    assert_eq!(connection_id, client.connection_id);
    assert_eq!(event.cause(), DisconnectCause::GatewayLost);

    // Stopped: the gateway reports its clients' disconnects itself, and
    // the broker's later account of them is not stored again.
    let mut gateway = Herald::ws(&address, &["--events", "connect,disconnect"]);
    let client = Client::connect(&gateway.ws_url()).await;
    assert_eq!(kind(&audit.take(1).await[0]), "connect");
    gateway.signal(libc::SIGTERM);
    gateway.wait_exit(PATIENCE);
    let gone = audit.take(1).await;
    let (connection_id, event) = disconnect(&gone[0]).expect("a disconnect");
    assert_eq!((connection_id, event.cause()), (client.connection_id.clone(), DisconnectCause::GatewayShutdown));
    assert_eq!(event.code, 1001);
    let extra = tokio::time::timeout(Duration::from_secs(3), audit.stream.next()).await;
    assert!(extra.is_err(), "nothing more after the grace: {extra:?}");
}

#[tokio::test]
async fn in_a_cluster_events_and_calls_cross_brokers() {
    let Some(cluster) = Cluster::start(2, &[]) else {
        return;
    };
    // The gateway reports to broker 0; the group consumes on broker 1,
    // where the backend serving calls is attached too.
    let gateway = Herald::ws(&cluster.address(0), &["--events", "all"]);
    let mut group = Instance::attach(&cluster.address(1), "audit").await;
    let backend = serve_reversed(&cluster.address(1), "text.reverse").await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut client = crate::protocol_client::ProtocolClient::connect(&gateway.ws_url()).await;
    let sent = client.call("send", serde_json::json!({"content": {"text": "to the backends"}})).await;
    assert!(sent.get("sent").is_some(), "{sent}");
    let events = group.take(2).await;
    assert_eq!(events.iter().map(kind).collect::<Vec<_>>(), ["connect", "message"]);

    let answer = client.call("rpc", serde_json::json!({"method": "text.reverse", "data": {"text": "nats"}})).await;
    assert_eq!(answer["rpc"]["data"]["text"], "stan", "{answer}");
    let refused = client.call("rpc", serde_json::json!({"method": "nobody.home", "data": {"text": "x"}})).await;
    assert_eq!(refused["error"]["code"], 404, "{refused}");
    backend.abort();
}

/// A group that does not keep up loses its oldest events past the
/// retention, counted; the gateways are never held up by it.
#[tokio::test]
async fn a_group_that_falls_behind_the_retention_loses_its_oldest_counted() {
    let Some(cluster) = Cluster::start(1, &["--event-retention", "5"]) else {
        return;
    };
    let standalone = Herald::standalone(&["--events", "connect", "--event-retention", "5"]);
    let gateway = Herald::ws(&cluster.address(0), &["--events", "connect"]);
    for (broker, ws_url, metrics) in [
        (standalone.address("broker"), standalone.ws_url(), &standalone),
        (cluster.address(0), gateway.ws_url(), &cluster.brokers[0]),
    ] {
        // Attached, then never acknowledging: it holds one, the rest wait.
        let mut client = grpc_client(&broker).await;
        let request = ConsumeEventsRequest { group: "laggard".into(), max_unacked: 1 };
        let mut stream = client.consume_events(request).await.expect("consume").into_inner();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut clients = Vec::new();
        for _ in 0..20 {
            clients.push(Client::connect(&ws_url).await);
        }
        let first = tokio::time::timeout(PATIENCE, stream.next()).await.expect("a first event");
        assert!(first.is_some());
        wait_until("the lost events are counted", || {
            let text = metrics.metrics();
            let sample = text.lines().find_map(|l| l.strip_prefix(r#"herald_events_dropped_total{group="laggard"} "#));
            sample.and_then(|v| v.trim().parse::<f64>().ok()).is_some_and(|n| n >= 10.0)
        });
    }
}

/// A backend that answers `slow` after `delay`, and `fast` at once.
async fn serve_slow_and_fast(broker: &str, delay: Duration) {
    let mut client = grpc_client(broker).await;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let start = ServeCallsRequest {
        kind: Some(serve_calls_request::Kind::Start(ServeCallsStart { methods: vec!["slow".into(), "fast".into()] })),
    };
    tx.send(start).await.unwrap();
    let mut calls = client.serve_calls(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    tokio::spawn(async move {
        while let Some(Ok(call)) = calls.next().await {
            let method = call.call.map(|c| c.method).unwrap_or_default();
            let tx = tx.clone();
            tokio::spawn(async move {
                if method == "slow" {
                    tokio::time::sleep(delay).await;
                }
                let answer = CallAnswer {
                    call_id: call.call_id,
                    result: Some(call_answer::Result::Data(Content { body: Some(content::Body::Text(method)) })),
                };
                let _ = tx.send(ServeCallsRequest { kind: Some(serve_calls_request::Kind::Answer(answer)) }).await;
            });
        }
    });
}

#[tokio::test]
async fn a_slow_rpc_holds_up_nothing_else_on_its_connection() {
    let herald = Herald::standalone(&[]);
    serve_slow_and_fast(&herald.address("broker"), Duration::from_secs(2)).await;
    let mut client = crate::protocol_client::ProtocolClient::connect(&herald.ws_url()).await;
    let started = std::time::Instant::now();
    client.send_text(r#"{"id":1,"rpc":{"method":"slow","data":{"text":""}}}"#).await;
    let fast = client.call("rpc", serde_json::json!({"method": "fast", "data": {"text": ""}})).await;
    assert_eq!(fast["rpc"]["data"]["text"], "fast", "{fast}");
    assert!(started.elapsed() < Duration::from_secs(1), "the fast rpc waited {:?}", started.elapsed());
    let slow = client.read().await;
    assert_eq!(
        (slow["id"].clone(), slow["rpc"]["data"]["text"].clone()),
        (serde_json::json!(1), serde_json::json!("slow"))
    );
}

// Multi-threaded: the clients' connections must answer the server's
// goodbye while the test waits for the process to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_stops_promptly_with_backends_attached() {
    let mut herald = Herald::standalone(&[]);
    let broker = herald.address("broker");
    let mut instance = Instance::attach(&broker, "audit").await;
    serve_slow_and_fast(&broker, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    herald.signal(libc::SIGTERM);
    herald.wait_exit(PATIENCE);
    assert!(started.elapsed() < Duration::from_secs(5), "stopping took {:?}", started.elapsed());
    let ended = tokio::time::timeout(PATIENCE, instance.stream.next()).await.expect("the stream ends");
    assert!(!matches!(ended, Some(Ok(_))), "{ended:?}");
}

#[tokio::test]
async fn a_client_sending_more_messages_a_second_than_allowed_is_closed_and_its_disconnect_says_why() {
    use herald_proto::v1::DisconnectCause;
    let herald = Herald::standalone(&["--events", "disconnect", "--max-client-messages-per-second", "20"]);
    let mut audit = Instance::attach(&herald.address("broker"), "audit").await;
    // Within the limit: nothing happens.
    let mut calm = Client::connect(&herald.ws_url()).await;
    for _ in 0..10 {
        calm.send(Message::text("tick")).await;
    }
    calm.expect_silence(Duration::from_millis(300)).await;
    // Past it: closed with 1008.
    let mut flood = Client::connect(&herald.ws_url()).await;
    for _ in 0..100 {
        flood.send(Message::text("flood")).await;
    }
    let frame = flood.expect_close_frame().await.expect("a close frame");
    assert_eq!(frame.0, 1008, "{frame:?}");
    let gone = audit.take(1).await;
    let (connection_id, event) = disconnect(&gone[0]).expect("a disconnect");
    assert_eq!((connection_id, event.cause()), (flood.connection_id.clone(), DisconnectCause::RateLimited));
}
