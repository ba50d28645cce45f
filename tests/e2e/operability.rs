//! Operability: metrics after a known workload, checked with the Prometheus
//! project's own parser, and readiness that follows each dependency.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::{Client, Herald, get, run_python, tool, wait_until};

/// Every sample of `/metrics`, as parsed by `prometheus_client`.
fn scrape(herald: &Herald) -> HashMap<String, f64> {
    let url = format!("http://{}/metrics", herald.addr("admin"));
    run_python("check_exposition.py", &[&url])
        .lines()
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(k, v)| (k.replace("{}", ""), v.parse().expect("a number")))
        .collect()
}

#[tokio::test]
async fn metrics_count_a_known_workload_exactly() {
    if tool("python-prometheus").is_none() {
        return;
    }
    let herald = Herald::standalone(&[]);
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(Client::connect(&herald.ws_url()).await);
    }
    let base = herald.http_url();
    for i in 0..5 {
        assert_eq!(get(&format!("{base}/?content=b{i}")).status, 200);
    }
    let (w, c) = (clients[0].worker_id.clone(), clients[0].connection_id.clone());
    for i in 0..2 {
        assert_eq!(get(&format!("{base}/?to_worker_id={w}&to_connection_id={c}&content=t{i}")).status, 200);
    }
    assert_eq!(get(&format!("{base}/?nothing=here")).status, 400);
    assert_eq!(get(&format!("{base}/?to_worker_id=ghost&to_connection_id=1&content=x")).status, 404);
    for (i, client) in clients.iter_mut().enumerate() {
        let expected = if i == 0 { 7 } else { 5 };
        for _ in 0..expected {
            client.recv_text().await;
        }
    }
    // Greetings are written like every other frame, and counted with them.
    let greetings: usize = clients
        .iter()
        .map(|c| format!("Worker ID:{} Connection ID:{} connected", c.worker_id, c.connection_id).len())
        .sum();
    clients.pop().unwrap().send(tokio_tungstenite::tungstenite::Message::Close(None)).await;
    wait_until("the closed client is counted", || herald.metric("herald_ws_connections") == 2.0);

    let m = scrape(&herald);
    let expect = [
        ("herald_broker_published_total{target=\"broadcast\"}", 5.0),
        ("herald_broker_published_total{target=\"connection\"}", 2.0),
        ("herald_broker_publish_rejected_total{reason=\"unknown_worker\"}", 1.0),
        ("herald_broker_published_bytes_total", 14.0),
        ("herald_broker_events_delivered_total", 7.0),
        ("herald_broker_sessions", 1.0),
        ("herald_broker_workers", 1.0),
        ("herald_ws_connections", 2.0),
        ("herald_ws_connections_opened_total", 3.0),
        ("herald_ws_connections_closed_total{reason=\"client_closed\"}", 1.0),
        ("herald_ws_frames_queued_total", 17.0),
        ("herald_ws_sent_bytes_total", 34.0 + greetings as f64),
        ("herald_ws_broker_linked", 1.0),
        ("herald_http_requests_total{outcome=\"ok\"}", 7.0),
        ("herald_http_requests_total{outcome=\"client_error\"}", 2.0),
        ("herald_http_messages_published_total", 7.0),
        ("herald_http_request_duration_seconds_count", 9.0),
    ];
    for (name, value) in expect {
        assert_eq!(m.get(name), Some(&value), "{name}");
    }
    let latencies = m["herald_ws_delivery_latency_seconds_count"];
    assert!((1.0..=17.0).contains(&latencies), "one observation per write: {latencies}");
    assert!(m["herald_ws_delivery_latency_seconds_sum"] < latencies, "each delivery well under a second");
}

#[tokio::test]
async fn readiness_follows_each_dependency() {
    let mut broker = Herald::broker(&[]);
    let address = broker.address("broker");
    let gateway = Herald::ws(&address, &[]);
    let http = Herald::http(&address, &[]);
    let readyz = |h: &Herald| get(&format!("http://{}/readyz", h.addr("admin")));
    let healthz = |h: &Herald| get(&format!("http://{}/healthz", h.addr("admin")));
    http.wait_ready();
    assert_eq!(readyz(&broker).status, 200);

    broker.kill();
    wait_until("the ws gateway is not ready", || readyz(&gateway).status == 503);
    wait_until("the http gateway is not ready", || readyz(&http).status == 503);
    assert!(readyz(&gateway).body.contains("not linked to a broker"), "{}", readyz(&gateway).body);
    assert!(readyz(&http).body.contains("no broker answers"), "{}", readyz(&http).body);
    assert_eq!(healthz(&gateway).status, 200, "alive, just not ready");
    assert_eq!(healthz(&http).status, 200);

    let _broker =
        Herald::start(&["broker", "--listen", &address, "--admin-listen", "127.0.0.1:0"], &["broker", "admin"]);
    gateway.wait_ready();
    http.wait_ready();
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test]
async fn the_status_page_shows_live_figures_that_match_the_metrics() {
    if tool("python-selenium").is_none() || tool("chromium").is_none() || tool("chromedriver").is_none() {
        return;
    }
    let herald = Herald::standalone(&[]);
    let mut clients = Vec::new();
    for _ in 0..2 {
        clients.push(Client::connect(&herald.ws_url()).await);
    }
    for i in 0..3 {
        assert_eq!(get(&format!("{}/?content=before-{i}", herald.http_url())).body, "ok");
    }
    // The clients keep reading, so the writes the page measures really happen.
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                for _ in 0..18 {
                    c.recv_text().await;
                }
            })
        })
        .collect();

    let dir = crate::support::TempDir::new("status");
    let screenshot = dir.path().join("status.png");
    let status_url = format!("http://{}/status", herald.addr("admin"));
    let http_url = herald.http_url();
    let shot = screenshot.to_str().unwrap().to_owned();
    let printed = tokio::task::spawn_blocking(move || {
        run_python(
            "status_page.py",
            &[
                "--status-url",
                &status_url,
                "--http-url",
                &http_url,
                "--screenshot",
                &shot,
                "--connections",
                "2",
                "--published-before",
                "3",
                "--publish",
                "15",
            ],
        )
    })
    .await
    .unwrap();
    for r in readers {
        r.await.unwrap();
    }

    let png = std::fs::read(&screenshot).expect("the screenshot was written");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000, "a real screenshot: {} bytes", png.len());
    let shown: serde_json::Value = serde_json::from_str(printed.lines().last().unwrap()).unwrap();
    let figure = |name: &str| shown[name].as_str().unwrap().parse::<f64>().unwrap();
    assert_eq!(figure("connections"), herald.metric("herald_ws_connections"));
    assert_eq!(figure("published-total"), herald.metric("herald_broker_published_total{target=\"broadcast\"}"));
    assert_eq!(figure("delivered-total"), herald.metric("herald_ws_frames_queued_total"));
    assert!(figure("latency-p99") >= figure("latency-p50"));
}

#[tokio::test]
async fn logs_are_json_lines_with_no_line_per_message_at_info_and_lifecycle_at_debug() {
    let mut lines_at = Vec::new();
    for level in ["info", "debug"] {
        let herald = Herald::standalone_with_env(&["--log-format", "json"], &[("RUST_LOG", level)]);
        let mut client = Client::connect(&herald.ws_url()).await;
        for i in 0..100 {
            assert_eq!(get(&format!("{}/?content=m{i}", herald.http_url())).body, "ok");
        }
        for _ in 0..100 {
            client.recv_text().await;
        }
        drop(client);
        wait_until("the close is seen", || herald.metric("herald_ws_connections") == 0.0);
        let log = herald.log_text();
        let lines: Vec<serde_json::Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
            .collect();
        assert!(lines.iter().all(|l| l["level"].is_string() && l["timestamp"].is_string()));
        lines_at.push(lines);
    }
    let (info, debug) = (&lines_at[0], &lines_at[1]);
    assert!(info.len() < 10, "100 messages must not log 100 lines at info: {info:#?}");
    let messages = |lines: &[serde_json::Value]| -> Vec<String> {
        lines.iter().map(|l| l["fields"]["message"].as_str().unwrap_or_default().to_owned()).collect()
    };
    let debug_messages = messages(debug);
    assert!(debug_messages.iter().any(|m| m == "connection opened"), "{debug_messages:?}");
    assert!(debug_messages.iter().any(|m| m == "connection closed"), "{debug_messages:?}");
    assert!(!messages(info).iter().any(|m| m == "connection opened"));
}

#[test]
fn the_binary_needs_nothing_beside_it_and_runs_from_any_directory() {
    let elsewhere = crate::support::TempDir::new("cwd");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("--version")
        .current_dir(elsewhere.path())
        .output()
        .expect("run herald");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("herald "), "{out:?}");
}
