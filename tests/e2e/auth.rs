//! API keys for publishers and gateways, origin checks for browsers, and the
//! refusal to expose an unauthenticated publish API beyond loopback.

use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tonic::Code;

use crate::support::{Client, Herald, broadcast, curl, get, grpc_client, wait_until};

const KEY: &str = "test-key-0123456789abcdef";

fn with_key<T>(body: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(body);
    request.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
    request
}

#[tokio::test]
async fn the_broker_refuses_calls_without_its_key_and_accepts_gateways_and_publishers_with_it() {
    let broker = Herald::broker(&["--api-key", KEY]);
    let address = broker.address("broker");
    let mut grpc = grpc_client(&address).await;

    let status = grpc.publish(broadcast("no key")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("authorization: Bearer"), "{}", status.message());
    let status = grpc.publish(with_key(broadcast("wrong"), "wrong-key-0123456789abcdef")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // A gateway with the wrong key never links; with the right one it does.
    let wrong = Herald::start(
        &["ws", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--broker", &address],
        &["ws", "admin"],
    );
    let gateway = Herald::ws(&address, &["--api-key", KEY]);
    let mut client = Client::connect(&gateway.ws_url()).await;
    let reply = grpc.publish(with_key(broadcast("with key"), KEY)).await.unwrap().into_inner();
    assert_eq!(reply.subscribers, 1);
    assert_eq!(client.recv_text().await, "with key");
    assert_eq!(wrong.metric("herald_ws_broker_linked"), 0.0);
    assert!(broker.metric("herald_broker_auth_failures_total") >= 3.0);

    // Health and reflection stay open for probes.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Channel::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap(),
    );
    let serving = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(serving.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
}

#[tokio::test]
async fn http_publishers_need_a_bearer_key_when_one_is_configured() {
    let broker = Herald::broker(&["--api-key", KEY]);
    let address = broker.address("broker");
    let gateway = Herald::ws(&address, &["--api-key", KEY]);
    let http = Herald::http(&address, &["--api-key", KEY]);
    let mut client = Client::connect(&gateway.ws_url()).await;
    let url = format!("{}/?content=secret", http.http_url());

    let refused = get(&url);
    assert_eq!(refused.status, 401);
    assert_eq!(refused.body.trim(), "missing or invalid API key: send 'Authorization: Bearer <key>'");
    let challenge = curl(&["-D", "-", &url]);
    assert!(challenge.body.to_ascii_lowercase().contains("www-authenticate: bearer"), "{}", challenge.body);
    assert_eq!(curl(&["-H", "Authorization: Bearer wrong-key-0123456789abcdef", &url]).status, 401);
    let json = curl(&[
        "-d",
        r#"{"target":{"broadcast":{}},"content":{"text":"x"}}"#,
        &format!("{}/v1/publish", http.http_url()),
    ]);
    assert_eq!(json.status, 401);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&json.body).unwrap()["error"]["code"], 16);

    let accepted = curl(&["-H", &format!("Authorization: Bearer {KEY}"), &url]);
    assert_eq!((accepted.status, accepted.body.as_str()), (200, "ok"));
    assert_eq!(client.recv_text().await, "secret");
    assert_eq!(http.metric("herald_http_auth_failures_total"), 4.0);
}

#[tokio::test]
async fn keys_can_be_rotated_by_listing_several() {
    let old = "old-key-0123456789abcdef";
    let both = format!("{KEY},{old}");
    let herald = Herald::standalone(&["--api-key", &both]);
    let mut client = Client::connect(&herald.ws_url()).await;
    for key in [KEY, old] {
        let reply =
            curl(&["-H", &format!("Authorization: Bearer {key}"), &format!("{}/?content={key}", herald.http_url())]);
        assert_eq!(reply.status, 200);
        assert_eq!(client.recv_text().await, key);
    }
}

#[test]
fn an_unauthenticated_publish_api_is_not_exposed_beyond_loopback_by_accident() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["http", "--listen", "0.0.0.0:0", "--admin-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refusing to listen for HTTP publishers on 0.0.0.0:0 without an API key"), "{stderr}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["broker", "--listen", "0.0.0.0:0", "--admin-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-unauthenticated"));

    let opted_in = Herald::start(
        &["http", "--listen", "0.0.0.0:0", "--admin-listen", "127.0.0.1:0", "--allow-unauthenticated"],
        &["http", "admin"],
    );
    assert!(opted_in.addr("http").ip().is_unspecified());
}

#[tokio::test]
async fn browsers_from_origins_outside_the_allow_list_are_refused_with_403() {
    let herald = Herald::standalone(&["--allowed-origins", "https://app.example,https://admin.example"]);
    let connect = |origin: Option<&'static str>| {
        let mut request = herald.ws_url().into_client_request().unwrap();
        if let Some(origin) = origin {
            request.headers_mut().insert("origin", origin.parse().unwrap());
        }
        tokio_tungstenite::connect_async(request)
    };
    match connect(Some("https://evil.example")).await.unwrap_err() {
        tokio_tungstenite::tungstenite::Error::Http(response) => assert_eq!(response.status(), 403),
        other => panic!("expected 403, got {other:?}"),
    }
    let allowed = connect(Some("https://admin.example")).await.expect("an allowed origin connects");
    // With an allow list, no Origin is refused too (--allow-missing-origin
    // lets non-browser clients in; see attacks.rs).
    match connect(None).await.unwrap_err() {
        tokio_tungstenite::tungstenite::Error::Http(response) => assert_eq!(response.status(), 403),
        other => panic!("expected 403, got {other:?}"),
    }
    wait_until("one connection", || herald.metric("herald_ws_connections") == 1.0);
    assert_eq!(herald.metric("herald_ws_handshakes_failed_total"), 2.0);
    drop(allowed);
}
