//! Hardening: slow consumers, graceful drains, and refusals under abuse.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use herald_proto::v1::PublishBatchRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Client, Herald, broadcast, grpc_client};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_cleanly_and_readers_lose_nothing() {
    let herald = Herald::standalone(&["--outbox-limit-bytes", "1048576", "--write-timeout", "1s"]);
    let mut readers = Vec::new();
    for _ in 0..4 {
        readers.push(Client::connect(&herald.ws_url()).await);
    }
    let mut stalled = Client::connect(&herald.ws_url()).await;

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
    assert_eq!(stalled.connection_id, "6", "the gateway still serves");
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
