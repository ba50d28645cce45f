//! Clients nobody on this project wrote: grpcurl with server reflection only
//! (no `.proto` at hand), Python grpcio stubs generated from `proto/`, and
//! headless Chromium running the classic example's JavaScript while curl
//! publishes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::{Client, GrpcurlReply, Herald, grpcurl, grpcurl_call, run_python, tool};

const QUIET: Duration = Duration::from_millis(300);

/// `grpcurl -plaintext -d JSON BROKER herald.v1.BrokerService/Publish`.
fn grpcurl_publish(bin: &Path, broker: &str, request: &str) -> GrpcurlReply {
    grpcurl_call(bin, broker, "Publish", request)
}

#[test]
fn grpcurl_lists_describes_and_health_checks_the_broker_through_reflection_alone() {
    let Some(grpcurl_bin) = tool("grpcurl") else { return };
    let broker = Herald::broker(&[]);
    let address = broker.address("broker");

    let list = grpcurl(&grpcurl_bin, &[&address, "list"]);
    assert!(list.success, "{}", list.stderr);
    let services: Vec<&str> = list.stdout.lines().collect();
    assert!(services.contains(&"herald.v1.BrokerService"), "{services:?}");
    assert!(services.contains(&"grpc.health.v1.Health"), "{services:?}");

    let describe = grpcurl(&grpcurl_bin, &[&address, "describe", "herald.v1.BrokerService"]);
    assert!(describe.success, "{}", describe.stderr);
    for rpc in [
        "rpc Publish ( .herald.v1.PublishRequest ) returns ( .herald.v1.PublishResponse );",
        "rpc PublishBatch ( .herald.v1.PublishBatchRequest ) returns ( .herald.v1.PublishBatchResponse );",
        "rpc Subscribe ( stream .herald.v1.SubscribeRequest ) returns ( stream .herald.v1.SubscribeResponse );",
    ] {
        assert!(describe.stdout.contains(rpc), "describe lacks {rpc:?}:\n{}", describe.stdout);
    }
    assert!(
        describe.stdout.contains("// Publish routes one message to its target."),
        "the proto's comments travel too"
    );

    let overall = grpcurl(&grpcurl_bin, &[&address, "grpc.health.v1.Health/Check"]);
    assert_eq!(overall.json()["status"], "SERVING");
    let service = grpcurl(
        &grpcurl_bin,
        &["-d", r#"{"service":"herald.v1.BrokerService"}"#, &address, "grpc.health.v1.Health/Check"],
    );
    assert_eq!(service.json()["status"], "SERVING");
}

#[tokio::test]
async fn grpcurl_publishes_reach_websocket_clients_of_a_gateway() {
    let Some(grpcurl_bin) = tool("grpcurl") else { return };
    let broker = Herald::broker(&[]);
    let address = broker.address("broker");
    let ws = Herald::ws(&address, &[]);
    let mut target = Client::connect(&ws.ws_url()).await;
    let mut other = Client::connect(&ws.ws_url()).await;

    let to_one = format!(
        r#"{{"target":{{"connection":{{"worker_id":"{}","connection_id":"{}"}}}},"content":{{"text":"from grpcurl"}}}}"#,
        target.worker_id, target.connection_id
    );
    let reply = grpcurl_publish(&grpcurl_bin, &address, &to_one);
    assert_eq!(reply.json()["subscribers"], 1, "handed to the one gateway holding the worker id");
    assert_eq!(target.recv_text().await, "from grpcurl");
    other.expect_silence(QUIET).await;

    let to_all = r#"{"target":{"broadcast":{}},"content":{"text":"everyone, from grpcurl"}}"#;
    assert_eq!(grpcurl_publish(&grpcurl_bin, &address, to_all).json()["subscribers"], 1);
    assert_eq!(target.recv_text().await, "everyone, from grpcurl");
    assert_eq!(other.recv_text().await, "everyone, from grpcurl");
    target.expect_silence(QUIET).await;
    other.expect_silence(QUIET).await;
}

#[test]
fn a_grpcurl_publish_to_an_unknown_worker_fails_with_not_found() {
    let Some(grpcurl_bin) = tool("grpcurl") else { return };
    let broker = Herald::broker(&[]);
    let request = r#"{"target":{"connection":{"worker_id":"nobody","connection_id":"1"}},"content":{"text":"lost"}}"#;
    let reply = grpcurl_publish(&grpcurl_bin, &broker.address("broker"), request);
    assert!(!reply.success, "a publish nobody can receive is an error, not a success: {}", reply.stdout);
    assert!(reply.stderr.contains("Code: NotFound"), "{}", reply.stderr);
    assert!(reply.stderr.contains(r#"no live gateway holds worker id "nobody""#), "{}", reply.stderr);
}

#[tokio::test]
async fn python_grpcio_stubs_generated_from_the_proto_drive_every_broker_rpc() {
    if tool("python-grpc").is_none() {
        return;
    }
    let broker = Herald::broker(&[]);
    let address = broker.address("broker");
    let ws = Herald::ws(&address, &[]);
    let mut client = Client::connect(&ws.ws_url()).await;

    let out = run_python(
        "grpc_stubs.py",
        &["--broker", &address, "--worker-id", &client.worker_id, "--connection-id", &client.connection_id],
    );
    assert!(out.contains("grpc_stubs: all checks passed"), "{out}");

    // What the script published to every gateway and to this client, in order.
    for expected in ["py-broadcast", "batch-1", "hello from python grpcio"] {
        assert_eq!(client.recv_text().await, expected);
    }
    client.expect_silence(QUIET).await;
    assert_eq!(broker.metric("herald_broker_worker_claims_refused_total"), 1.0);
    assert_eq!(broker.metric("herald_broker_controls_total{op=\"bind_user\"}"), 1.0);
    assert_eq!(broker.metric("herald_broker_queries_total"), 5.0);
    assert_eq!(broker.metric("herald_broker_published_total{target=\"user\"}"), 1.0);
}

/// Headless Chromium driven through chromedriver by Selenium
/// (tests/python/browser_alerts.py), with curl to publish.
struct Browser {
    chromium: PathBuf,
    chromedriver: PathBuf,
}

impl Browser {
    fn find() -> Option<Browser> {
        let (Some(_), Some(_), Some(chromium), Some(chromedriver)) =
            (tool("python-selenium"), tool("curl"), tool("chromium"), tool("chromedriver"))
        else {
            return None;
        };
        Some(Browser { chromium, chromedriver })
    }

    /// Runs the classic Channel example's snippet against `ws_url` while curl publishes through
    /// `http_url`: a broadcast, then a send to the browser's own connection.
    fn run_classic_example_session(&self, ws_url: &str, http_url: &str) {
        let chromium = self.chromium.to_string_lossy();
        let chromedriver = self.chromedriver.to_string_lossy();
        let out = run_python(
            "browser_alerts.py",
            &["--ws-url", ws_url, "--http-url", http_url, "--chromium", &chromium, "--chromedriver", &chromedriver],
        );
        assert!(out.contains("browser_alerts: all checks passed"), "{out}");
    }
}

#[test]
fn the_classic_example_javascript_in_chromium_alerts_curl_publishes_on_the_classic_topology() {
    let Some(browser) = Browser::find() else { return };
    let broker = Herald::broker(&[]);
    let address = broker.address("broker");
    let ws = Herald::ws(&address, &[]);
    let http = Herald::http(&address, &[]);
    browser.run_classic_example_session(&ws.ws_url(), &http.http_url());
    assert_eq!(broker.metric("herald_broker_published_total{target=\"broadcast\"}"), 1.0);
    assert_eq!(ws.metric("herald_ws_connections_opened_total"), 1.0);
}

#[test]
fn the_classic_example_javascript_in_chromium_alerts_curl_publishes_on_a_standalone_herald() {
    let Some(browser) = Browser::find() else { return };
    let herald = Herald::standalone(&[]);
    browser.run_classic_example_session(&herald.ws_url(), &herald.http_url());
    assert_eq!(herald.metric("herald_broker_published_total{target=\"broadcast\"}"), 1.0);
    assert_eq!(herald.metric("herald_ws_connections_opened_total"), 1.0);
}
