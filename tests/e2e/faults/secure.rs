//! Secrets between hosts: a gateway on one host sends its API key to a
//! broker on another only over TLS, and a mutual-TLS broker takes only the
//! callers whose certificates its CA signed. (On loopback, `tls.rs` shows
//! each refusal; here the links cross a real network.)

use super::net::Network;
use crate::support::{Client, curl, wait_until};
use crate::tls::Pki;

const KEY: &str = "a-test-api-key-between-hosts";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn between_hosts_the_api_key_travels_only_over_mutual_tls() {
    let Some(net) = Network::new(&["broker", "gateway", "http", "intruder"]) else { return };
    let pki = Pki::generate();
    let ca = pki.path("ca.pem");
    let broker_ip = net.host("broker").ip.to_string();
    let (cert, key) = pki.issue_for("broker", &[&broker_ip], true, (2020, 2090));
    let tls = ["--api-key", KEY, "--tls-cert", &cert, "--tls-key", &key, "--tls-client-ca", &ca];
    let broker = net.host("broker").broker(&tls);
    let brokers = broker.address("broker");

    // Without TLS the gateway refuses to start: nothing reaches the broker.
    let plaintext = net
        .host("gateway")
        .command(env!("CARGO_BIN_EXE_herald"))
        .args(["ws", "--listen", &net.host("gateway").addr(0).to_string(), "--api-key", KEY, "--broker", &brokers])
        .output()
        .expect("run herald");
    let stderr = String::from_utf8_lossy(&plaintext.stderr);
    assert!(!plaintext.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("refusing to send the API key in clear to broker {brokers}")), "{stderr}");
    assert_eq!(broker.metric("herald_broker_tls_handshake_failures_total"), 0.0, "not a byte was sent");

    // With its certificate, over TLS, it links and serves.
    let identity = |name: &str| pki.issue_for(name, &[name], true, (2020, 2090));
    let (gateway_cert, gateway_key) = identity("gateway");
    let link = ["--api-key", KEY, "--broker-ca", &ca, "--broker-cert", &gateway_cert, "--broker-key", &gateway_key];
    let gateway = net.host("gateway").ws(&brokers, &link);
    let (http_cert, http_key) = identity("http");
    let http_listen = net.host("http").addr(0).to_string();
    let mut http_args = vec!["http", "--listen", &http_listen, "--admin-listen", &http_listen, "--broker", &brokers];
    http_args.extend(["--api-key", KEY, "--broker-ca", &ca, "--broker-cert", &http_cert, "--broker-key", &http_key]);
    let http = net.host("http").herald(&http_args, &["http", "admin"]);

    let mut client = Client::connect(&gateway.ws_url()).await;
    let url = format!("http://{}/?content=across+hosts", http.addr("http"));
    let bearer = format!("Authorization: Bearer {KEY}");
    let reply = curl(&["-H", &bearer, &url]);
    assert_eq!((reply.status, reply.body.as_str()), (200, "ok"));
    assert_eq!(client.recv_text().await, "across hosts");
    assert_eq!(curl(&[&url]).status, 401, "a publisher without the key is refused");

    // A gateway whose certificate the broker's CA did not sign gets nowhere.
    let (stranger_cert, stranger_key) = pki.issue_for("intruder", &["intruder"], false, (2020, 2090));
    let stranger =
        ["--api-key", KEY, "--broker-ca", &ca, "--broker-cert", &stranger_cert, "--broker-key", &stranger_key];
    let intruder_listen = net.host("intruder").addr(0).to_string();
    let mut args = vec!["ws", "--listen", &intruder_listen, "--admin-listen", &intruder_listen, "--broker", &brokers];
    args.extend(stranger);
    let intruder = net.host("intruder").herald(&args, &["admin"]);
    wait_until("the broker refuses the intruder's handshakes", || {
        broker.metric("herald_broker_tls_handshake_failures_total") >= 1.0
    });
    assert_eq!(intruder.metric("herald_ws_broker_linked"), 0.0);
    assert_eq!(broker.metric("herald_broker_sessions"), 1.0, "only the trusted gateway holds a session");
}
