//! Hardening: slow consumers, graceful drains, and refusals under abuse.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use herald_proto::v1::PublishBatchRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Client, Herald, broadcast, get, grpc_client};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_cleanly_and_readers_lose_nothing() {
    let herald = Herald::standalone(&["--outbox-limit-bytes", "1048576", "--write-timeout", "1s"]);
    let mut readers = Vec::new();
    for _ in 0..4 {
        readers.push(Client::connect(&herald.ws_url()).await);
    }
    let mut stalled = Client::connect(&herald.ws_url()).await;
    let first_id = readers[0].connection_number();
    assert_eq!(stalled.connection_number(), first_id + 4);

    // 24 MiB per client: far more than the stalled client's socket buffers
    // and outbox hold. The publisher floods as fast as the readers read,
    // staying at most 64 messages (512 KiB) ahead of the slowest.
    const MESSAGES: usize = 3000;
    const AHEAD: usize = 64;
    let padding = "p".repeat(8 * 1024);
    let progress: Arc<Vec<AtomicUsize>> = Arc::new(readers.iter().map(|_| AtomicUsize::new(0)).collect());
    let reading = readers
        .into_iter()
        .enumerate()
        .map(|(r, mut c)| {
            let progress = progress.clone();
            tokio::spawn(async move {
                for i in 0..MESSAGES {
                    let text = c.recv_text().await;
                    assert!(text.starts_with(&format!("{i}:")), "reader expected message {i}");
                    progress[r].store(i + 1, Ordering::Relaxed);
                }
            })
        })
        .collect::<Vec<_>>();
    let mut grpc = grpc_client(&herald.address("broker")).await;
    for chunk in (0..MESSAGES).collect::<Vec<_>>().chunks(16) {
        while chunk[0] >= progress.iter().map(|p| p.load(Ordering::Relaxed)).min().unwrap_or(0) + AHEAD {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let requests = chunk.iter().map(|i| broadcast(&format!("{i}:{padding}"))).collect();
        grpc.publish_batch(PublishBatchRequest { requests }).await.expect("batch accepted");
    }
    for r in reading {
        r.await.expect("every reader got every message in order");
    }

    crate::support::wait_until("the stalled client is cut off", || {
        herald.metric("herald_ws_connections_closed_total{reason=\"slow_consumer\"}")
            + herald.metric("herald_ws_connections_closed_total{reason=\"write_timeout\"}")
            == 1.0
    });
    // What the stalled client finally reads is a gap-free prefix, then the end.
    let mut next = 0;
    let mut ws = stalled.into_inner();
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(10), futures_util::StreamExt::next(&mut ws)).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                assert!(t.starts_with(&format!("{next}:")), "gap before message {next}");
                next += 1;
            }
            Ok(Some(Ok(Message::Close(frame)))) => break frame.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => break None,
            Err(_) => panic!("the stalled connection was not closed"),
        }
    };
    assert!(next < MESSAGES, "the stalled client cannot have received everything");
    assert!(matches!(end, Some(1008) | None), "closed with 1008 when the close frame fits: {end:?}");
    stalled = Client::connect(&herald.ws_url()).await;
    assert_eq!(stalled.connection_number(), first_id + 5, "the gateway still serves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_gateway_delivers_everything_published_before_the_drain_then_closes_with_1001() {
    let broker = Herald::broker(&[]);
    let address = broker.address("broker");
    let mut gateway = Herald::ws(&address, &[]);
    let mut client = Client::connect(&gateway.ws_url()).await;

    let acked = Arc::new(AtomicI64::new(-1));
    let publisher = {
        let acked = acked.clone();
        let address = address.clone();
        tokio::spawn(async move {
            let mut grpc = grpc_client(&address).await;
            for i in 0.. {
                if grpc.publish(broadcast(&i.to_string())).await.is_err() {
                    break;
                }
                acked.store(i, Ordering::SeqCst);
            }
        })
    };
    for i in 0..200 {
        assert_eq!(client.recv_text().await, i.to_string());
    }
    // Everything acknowledged so far was published before the drain began.
    let published_before_drain = acked.load(Ordering::SeqCst);
    gateway.signal(libc::SIGTERM);

    let mut next = 200;
    let close = loop {
        match client.recv_or_close().await {
            Ok(text) => {
                assert_eq!(text, next.to_string(), "in order, no gaps");
                next += 1;
            }
            Err(code) => break code,
        }
    };
    assert_eq!(close, Some(1001));
    assert!(next > published_before_drain, "received up to {next}, {published_before_drain} was acknowledged first");
    assert!(gateway.wait_exit(Duration::from_secs(10)).success());
    publisher.abort();
}

/// Opens a raw TCP connection to `addr`.
async fn raw(addr: std::net::SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.expect("connect")
}

/// Reads what the server sends until it closes or `within` passes.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()?;
    Some(seen)
}

#[tokio::test]
async fn malformed_websocket_frames_close_that_client_with_1002_and_nobody_else() {
    let herald = Herald::standalone(&[]);
    let mut bystander = Client::connect(&herald.ws_url()).await;
    let mut oversized_ping = b"\x89\xfe\x01\x00\x00\x00\x00\x00".to_vec();
    oversized_ping.extend_from_slice(&[0u8; 256]);
    for garbage in [
        &b"\x81\x05hello"[..],            // unmasked client frame
        &b"\x83\x80\x00\x00\x00\x00"[..], // reserved opcode 3
        &b"\xf1\x80\x00\x00\x00\x00"[..], // reserved bits set
        &oversized_ping[..],              // control frames stop at 125 bytes
    ] {
        let client = Client::connect(&herald.ws_url()).await;
        let mut ws = client.into_inner();
        let tcp = match ws.get_mut() {
            tokio_tungstenite::MaybeTlsStream::Plain(tcp) => tcp,
            _ => unreachable!("plain ws://"),
        };
        tcp.write_all(garbage).await.unwrap();
        let seen = read_until_closed(tcp, Duration::from_secs(5)).await.expect("the server closes the connection");
        // A close frame: 0x88, length, then the code 1002 in big-endian.
        assert!(seen.windows(2).any(|w| w == [0x03, 0xea]), "close 1002 for {garbage:?}, got {seen:?}");
    }
    assert_eq!(herald.metric("herald_ws_connections_closed_total{reason=\"protocol_error\"}"), 4.0);
    assert_eq!(get(&format!("{}/?content=unharmed", herald.http_url())).body, "ok");
    assert_eq!(bystander.recv_text().await, "unharmed");
}

#[tokio::test]
async fn a_body_claiming_a_gibibyte_is_refused_at_once_and_an_endless_one_once_over_the_limit() {
    let herald = Herald::standalone(&[]);
    let addr = herald.addr("http");
    let mut claim = raw(addr).await;
    claim
        .write_all(b"POST /v1/publish HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\nContent-Length: 1073741824\r\n\r\n{")
        .await
        .unwrap();
    let mut reply = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), claim.read_exact(&mut reply))
        .await
        .expect("an answer without the body")
        .unwrap();
    assert_eq!(&reply, b"HTTP/1.1 413");

    let (mut reader, mut endless) = raw(addr).await.into_split();
    endless.write_all(b"POST /v1/publish HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n").await.unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, "z".repeat(64 * 1024));
    let mut sent = 0usize;
    let mut answer = [0u8; 12];
    let status = loop {
        tokio::select! {
            read = reader.read(&mut answer) => break read.map(|n| answer[..n].to_vec()),
            wrote = endless.write_all(chunk.as_bytes()) => {
                if wrote.is_err() {
                    break Ok(Vec::new());
                }
                sent += chunk.len();
                assert!(sent < 64 << 20, "still reading after 64 MiB");
            }
        }
    };
    let status = status.unwrap_or_default();
    assert!(status.is_empty() || status.starts_with(b"HTTP/1.1 413"), "{}", String::from_utf8_lossy(&status));
    // What was written includes what the kernel's send and receive buffers
    // absorbed on top of the 4 MiB read (tcp_wmem and tcp_rmem allow 4 and
    // 32 MiB here), but not a byte more.
    assert!(sent <= 44 << 20, "refused near the 4 MiB limit, not after {sent} bytes");
    assert_eq!(get(&format!("{}/?content=fine", herald.http_url())).status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_slowloris_connections_neither_starve_nor_outlive_their_timeouts() {
    let herald = Herald::standalone(&["--header-read-timeout", "3s", "--handshake-timeout", "3s"]);
    let mut slow = Vec::with_capacity(10_000);
    for i in 0..10_000 {
        let (addr, head) = if i % 2 == 0 {
            (herald.addr("http"), &b"GET /?content=x HTTP/1.1\r\nHost: h\r\n"[..])
        } else {
            (herald.addr("ws"), &b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n"[..])
        };
        let mut stream = raw(addr).await;
        stream.write_all(head).await.unwrap();
        slow.push(stream);
    }
    // Everybody else is still served promptly.
    let started = std::time::Instant::now();
    let mut client = Client::connect(&herald.ws_url()).await;
    assert_eq!(get(&format!("{}/?content=served", herald.http_url())).body, "ok");
    assert_eq!(client.recv_text().await, "served");
    assert!(started.elapsed() < Duration::from_secs(2), "served in {:?}", started.elapsed());

    // And every slow connection is dropped by its timeout.
    let deadline = Duration::from_secs(20);
    let closed = futures_util::future::join_all(
        slow.iter_mut().map(|s| async move { read_until_closed(s, deadline).await.is_some() }),
    )
    .await;
    assert_eq!(closed.iter().filter(|c| **c).count(), 10_000);
}

#[tokio::test]
async fn broker_limits_answer_with_resource_exhausted() {
    use herald_proto::v1::{SubscribeChannels, SubscribeRequest, subscribe_request};
    use tokio_stream::StreamExt;

    let broker =
        Herald::broker(&["--max-content-bytes", "1024", "--max-channels-per-session", "2", "--max-sessions", "2"]);
    let mut grpc = grpc_client(&broker.address("broker")).await;

    let status = grpc.publish(broadcast(&"x".repeat(1025))).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert_eq!(status.message(), "content is 1025 bytes; the limit is 1024");

    let subscribe = |request_id, channels: &[&str]| SubscribeRequest {
        request_id,
        command: Some(subscribe_request::Command::Subscribe(SubscribeChannels {
            channels: channels.iter().map(|c| c.to_string()).collect(),
        })),
    };
    let commands = tokio_stream::iter(vec![subscribe(1, &["a", "b"]), subscribe(2, &["c"])]);
    let mut events = grpc.subscribe(commands).await.unwrap().into_inner();
    assert!(events.next().await.unwrap().is_ok(), "the first two channels are acknowledged");
    let status = events.next().await.unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert_eq!(status.message(), "request 2: session would listen on 3 channels; the limit is 2");

    let mut open = Vec::new();
    for _ in 0..2 {
        let mut events = grpc.subscribe(tokio_stream::iter(vec![subscribe(1, &["a"])])).await.unwrap().into_inner();
        assert!(events.next().await.unwrap().is_ok());
        open.push(events);
    }
    let mut third = grpc.subscribe(tokio_stream::iter(vec![subscribe(1, &["a"])])).await.unwrap().into_inner();
    let status = third.next().await.unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(status.message().contains("limit of 2 subscriber sessions"), "{}", status.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_closed_as_a_slow_consumer_when_its_queue_overflows_not_at_the_write_timeout() {
    let herald = Herald::standalone(&["--outbox-limit-bytes", "262144", "--write-timeout", "30s"]);
    let _never_reads = Client::connect(&herald.ws_url()).await;
    let mut grpc = grpc_client(&herald.address("broker")).await;
    let padding = "p".repeat(32 * 1024);
    let started = std::time::Instant::now();
    for chunk in 0..64 {
        let requests = (0..16).map(|i| broadcast(&format!("{chunk}-{i}:{padding}"))).collect();
        grpc.publish_batch(PublishBatchRequest { requests }).await.expect("batch accepted");
        if herald.metric("herald_ws_connections") == 0.0 {
            break;
        }
    }
    crate::support::wait_until("the client is closed", || herald.metric("herald_ws_connections") == 0.0);
    assert!(started.elapsed() < Duration::from_secs(10), "well before the 30 s write timeout: {:?}", started.elapsed());
    assert_eq!(herald.metric("herald_ws_connections_closed_total{reason=\"slow_consumer\"}"), 1.0);
    assert_eq!(herald.metric("herald_ws_connections_closed_total{reason=\"write_timeout\"}"), 0.0);
}
