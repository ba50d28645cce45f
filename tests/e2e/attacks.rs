//! The attacks of the adversarial round, each performed against the real
//! binary from outside, as an attacker would: what was sent, and the answer
//! herald owes it. Every refusal is a status (or close code) with a one-line
//! reason, nothing wedges, and nothing is delivered twice.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const KEY: &str = "attack-round-key-0123456789";

/// One HTTP answer, as read off a raw socket.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: String,
}

/// Reads one answer: its head, then the body its `content-length` announces.
/// `None` when nothing complete arrived within `within`.
async fn read_answer(stream: &mut TcpStream, within: Duration) -> Option<Answer> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&seen[..end]).to_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if seen.len() >= end + 4 + length {
                    return Some((end, length));
                }
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    };
    let (end, length) = tokio::time::timeout(within, read).await.ok()??;
    let head = String::from_utf8_lossy(&seen[..end]).into_owned();
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let body = String::from_utf8_lossy(&seen[end + 4..end + 4 + length]).into_owned();
    Some(Answer { status, head, body })
}

/// Sends `request` on a fresh connection to `addr` and reads the answer.
async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> Answer {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("send");
    read_answer(&mut stream, Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("no answer to {:?}", String::from_utf8_lossy(request)))
}

/// A refusal is a status and one line of reason.
fn assert_refused(answer: &Answer, status: u16, what: &str) {
    assert_eq!(answer.status, status, "{what}: {answer:?}");
    let reason = answer.body.strip_suffix('\n').unwrap_or(&answer.body);
    assert!(!reason.is_empty() && !reason.contains('\n'), "{what}: a one-line reason, got {:?}", answer.body);
}

#[tokio::test]
async fn a_body_that_never_comes_is_408_and_without_a_key_401_on_the_headers_alone() {
    let herald = Herald::standalone(&["--api-key", KEY, "--request-timeout", "1s"]);
    let addr = herald.addr("http");
    let started = Instant::now();
    let mut keyless = TcpStream::connect(addr).await.unwrap();
    keyless.write_all(b"POST /v1/publish HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\n").await.unwrap();
    let answer = read_answer(&mut keyless, Duration::from_secs(5)).await.expect("an answer without the body");
    assert_refused(&answer, 401, "no key, slow body");
    assert!(started.elapsed() < Duration::from_millis(900), "before the body deadline: {:?}", started.elapsed());

    let mut slow = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/publish HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 100000\r\n\r\n{{"
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    let answer = read_answer(&mut slow, Duration::from_secs(5)).await.expect("an answer at the deadline");
    assert_refused(&answer, 408, "a body that never comes");
    assert!(answer.head.to_lowercase().contains("connection: close"), "{}", answer.head);
    assert_eq!(herald.metric("herald_http_body_timeouts_total"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_held_slow_bodies_under_a_low_descriptor_limit_leave_publishing_and_readiness_answering() {
    let herald = Herald::start_with_open_files(
        &Herald::standalone_args(&["--request-timeout", "4s"]),
        &STANDALONE_LISTENERS,
        256,
    );
    herald.wait_ready();
    let head =
        b"POST /v1/publish HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n";
    let mut held = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let mut stream = TcpStream::connect(herald.addr("http")).await.expect("the kernel queues the connection");
        let _ = stream.write_all(head).await;
        held.push(stream);
    }

    let started = Instant::now();
    let ready = curl(&["-s", &format!("http://{}/readyz", herald.addr("admin"))]);
    assert_eq!(ready.status, 200, "the admin port lives on the reserved descriptors: {}", ready.body);
    let publish = get(&format!("{}/?content=during", herald.http_url()));
    assert!(
        publish.status == 200 || (publish.status == 503 && publish.body.contains("too many connections")),
        "a publish is answered, not hung: {publish:?}"
    );
    let mut grpc = grpc_client(&herald.address("broker")).await;
    grpc.publish(broadcast("over gRPC meanwhile")).await.expect("another listener still publishes");
    assert!(started.elapsed() < Duration::from_secs(3), "answered promptly: {:?}", started.elapsed());

    let answers = futures_util::future::join_all(
        held.iter_mut().map(|s| async move { read_answer(s, Duration::from_secs(20)).await.map(|a| a.status) }),
    )
    .await;
    let count = |status| answers.iter().filter(|a| **a == Some(status)).count();
    assert_eq!(count(408) + count(503), 1000, "every held socket is answered: {answers:?}");
    assert!(count(408) > 0 && count(503) > 0, "408: {}, 503: {}", count(408), count(503));
    wait_until("publishing over HTTP again", || get(&format!("{}/?content=after", herald.http_url())).status == 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_caught_in_a_paused_broker_is_504_and_its_retry_with_the_same_key_arrives_once() {
    let broker = Herald::broker(&[]);
    let address = broker.address("broker");
    let ws = Herald::ws(&address, &[]);
    let http = Herald::http(&address, &[]);
    let mut client = Client::connect(&ws.ws_url()).await;
    assert_eq!(get(&format!("{}/?content=warm", http.http_url())).body, "ok");
    assert_eq!(client.recv_text().await, "warm");

    let url = format!("{}/v1/publish", http.http_url());
    let body = r#"{"target":{"broadcast":{}},"content":{"text":"once"},"idempotency_key":"order-42"}"#;
    broker.signal(libc::SIGSTOP);
    let paused = post(&url, body);
    broker.signal(libc::SIGCONT);
    assert_eq!(paused.status, 504, "{}", paused.body);
    assert!(paused.body.contains("outcome unknown") && paused.body.contains("idempotency key"), "{}", paused.body);

    // The publisher retries, as the 504 says, with the same key: by JSON
    // and by the classic API's header. The message arrives once.
    wait_until("the broker serves again", || {
        let retry = post(&url, body);
        assert_ne!(retry.status, 504, "{}", retry.body);
        retry.status == 200
    });
    let classic = curl(&["-H", "Idempotency-Key: order-42", &format!("{}/?content=once", http.http_url())]);
    assert_eq!((classic.status, classic.body.as_str()), (200, "ok"));
    assert_eq!(get(&format!("{}/?content=marker", http.http_url())).body, "ok");
    let mut seen = Vec::new();
    loop {
        let text = client.recv_text().await;
        if text == "marker" {
            break;
        }
        seen.push(text);
    }
    assert_eq!(seen, ["once"], "exactly once, whichever attempt carried it");
    let again = post(&url, body);
    assert_eq!(again.json()["duplicate"], true, "{}", again.body);
    assert!(broker.metric("herald_broker_publish_duplicates_total") >= 2.0);
}

#[tokio::test]
async fn a_batch_routes_its_good_entries_and_refuses_each_bad_one_on_its_own() {
    let herald = Herald::standalone(&[]);
    let mut client = Client::connect(&herald.ws_url()).await;
    let body = r#"{"requests":[
        {"target":{"broadcast":{}},"content":{"text":"first"}},
        {"target":{"broadcast":{}},"content":{"binary":"not base64!"}},
        {"content":{"text":"no target"}},
        {"target":{},"content":{"text":"empty target"}},
        {"target":{"broadcast":{}},"content":{}},
        {"target":{"broadcast":{}},"content":{"text":"last"}}
    ]}"#;
    let reply = post(&format!("{}/v1/batch", herald.http_url()), body);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let results = reply.json()["results"].as_array().cloned().expect("results");
    assert_eq!(results.len(), 6);
    for (i, result) in results.iter().enumerate() {
        if i == 0 || i == 5 {
            assert_eq!(result["published"]["subscribers"], 1, "{result}");
        } else {
            assert_eq!(result["error"]["code"], 3, "INVALID_ARGUMENT for entry {i}: {result}");
            let message = result["error"]["message"].as_str().unwrap_or_default();
            assert!(message.starts_with(&format!("requests[{i}]: ")), "{message}");
        }
    }
    assert_eq!(client.recv_text().await, "first");
    assert_eq!(client.recv_text().await, "last");
}

#[test]
fn grpc_strings_that_are_not_utf8_are_invalid_arguments() {
    let herald = Herald::standalone(&[]);
    // Hand-encoded PublishRequests whose channel, worker id or text holds
    // the bytes 0xff 0xfe (or 0xff), which no UTF-8 string contains.
    let payloads = [
        ("channel", "0a041a02fffe12030a0178"),
        ("worker_id", "0a0812060a01ff12013112030a0178"),
        ("text", "0a020a0012030a01ff"),
    ];
    for (field, payload) in payloads {
        let out = run_python("raw_grpc.py", &[&herald.address("broker"), "/herald.v1.BrokerService/Publish", payload]);
        assert!(out.starts_with("INVALID_ARGUMENT"), "{field}: {out}");
    }
}

#[tokio::test]
async fn content_over_the_limit_is_413_even_when_it_cannot_fit_in_a_request_line() {
    let herald = Herald::standalone(&[]);
    let request = format!("GET /?content={} HTTP/1.1\r\nHost: h\r\n\r\n", "a".repeat(70_000));
    let answer = exchange(herald.addr("http"), request.as_bytes()).await;
    assert_refused(&answer, 413, "a 70,000-byte request line");
    assert!(answer.body.contains("POST"), "says how to send it: {}", answer.body);
    let over = get(&format!("{}/?content={}", herald.http_url(), "a".repeat(64 * 1024 + 1)));
    assert_eq!(over.status, 413, "{}", over.body);
}

#[tokio::test]
async fn requests_refused_before_any_handler_still_get_a_status_and_a_reason() {
    let herald = Herald::standalone(&[]);
    let http = herald.addr("http");
    let many_headers: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let cases: [(&str, Vec<u8>, u16, &str); 6] = [
        ("HTTP/0.9", b"GET /?content=x\r\n\r\n".to_vec(), 400, "malformed"),
        (
            "a negative Content-Length",
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -5\r\n\r\n".to_vec(),
            400,
            "malformed",
        ),
        (
            "two different Content-Lengths",
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".to_vec(),
            400,
            "malformed",
        ),
        (
            "too many headers",
            format!("GET /?content=x HTTP/1.1\r\nHost: h\r\n{many_headers}\r\n").into_bytes(),
            431,
            "header fields",
        ),
        (
            "Content-Length and Transfer-Encoding together",
            b"POST /?content=x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                .to_vec(),
            400,
            "Transfer-Encoding",
        ),
        (
            "a request line over the URI limit",
            format!("GET /?q={} HTTP/1.1\r\n\r\n", "b".repeat(70_000)).into_bytes(),
            413,
            "POST",
        ),
    ];
    for (what, request, status, reason) in cases {
        let answer = exchange(http, &request).await;
        assert_refused(&answer, status, what);
        assert!(answer.body.contains(reason), "{what}: {:?}", answer.body);
    }
    assert_eq!(get(&format!("{}/?content=fine", herald.http_url())).status, 200);
}

#[tokio::test]
async fn bad_websocket_handshakes_get_an_http_answer_with_a_reason() {
    let herald = Herald::standalone(&[]);
    let ws = herald.addr("ws");
    let upgrade = |extra: &str, version: &str, key: &str| {
        format!(
            "GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: {version}\r\n{key}{extra}\r\n"
        )
    };
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let cases = [
        ("no key", upgrade("", "13", ""), 400),
        ("a key that is not 16 bytes", upgrade("", "13", "Sec-WebSocket-Key: c2hvcnQ=\r\n"), 400),
        ("version 8", upgrade("", "8", key), 426),
        ("POST", upgrade("", "13", key).replacen("GET", "POST", 1), 405),
        ("no Upgrade", "GET / HTTP/1.1\r\nHost: h\r\n\r\n".to_owned(), 426),
    ];
    for (what, request, status) in cases {
        let answer = exchange(ws, request.as_bytes()).await;
        assert_refused(&answer, status, what);
        if what == "version 8" {
            assert!(answer.head.contains("Sec-WebSocket-Version: 13"), "{}", answer.head);
        }
    }
    assert_eq!(herald.metric("herald_ws_handshakes_failed_total"), 5.0);
}

#[tokio::test]
async fn with_an_origin_allow_list_a_missing_or_doubled_origin_is_refused() {
    let herald = Herald::standalone(&["--allowed-origins", "https://app.example"]);
    let request = |origins: &str| {
        format!(
            "GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{origins}\r\n"
        )
    };
    let ws = herald.addr("ws");
    assert_refused(&exchange(ws, request("").as_bytes()).await, 403, "no Origin");
    let doubled = "Origin: https://app.example\r\nOrigin: https://evil.example\r\n";
    assert_refused(&exchange(ws, request(doubled).as_bytes()).await, 400, "two Origins");
    let allowed = exchange(ws, request("Origin: https://app.example\r\n").as_bytes()).await;
    assert_eq!(allowed.status, 101, "{allowed:?}");

    let lenient = Herald::standalone(&["--allowed-origins", "https://app.example", "--allow-missing-origin"]);
    assert_eq!(
        exchange(lenient.addr("ws"), request("").as_bytes()).await.status,
        101,
        "non-browser clients, if allowed"
    );
}

#[tokio::test]
async fn a_text_frame_that_is_not_utf8_closes_that_client_with_1007() {
    let herald = Herald::standalone(&[]);
    let client = Client::connect(&herald.ws_url()).await;
    let mut ws = client.into_inner();
    let tcp = match ws.get_mut() {
        tokio_tungstenite::MaybeTlsStream::Plain(tcp) => tcp,
        _ => unreachable!("plain ws://"),
    };
    // A masked text frame (mask 0) holding 0xff 0xfe.
    tcp.write_all(b"\x81\x82\x00\x00\x00\x00\xff\xfe").await.unwrap();
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut seen)).await;
    // A close frame: 0x88, length, then the code 1007 in big-endian.
    assert!(seen.windows(2).any(|w| w == [0x03, 0xef]), "close 1007, got {seen:?}");
    assert_eq!(herald.metric("herald_ws_connections_closed_total{reason=\"invalid_payload\"}"), 1.0);
}
