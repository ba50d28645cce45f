use std::time::Duration;

use proptest::prelude::*;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncWriteExt, DuplexStream, duplex};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::*;

const MAX: usize = 64 * 1024;

/// A masked client frame, as a browser sends it.
fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    frame::tests::client_frame(first, payload, [0x37, 0xFA, 0x21, 0x3D])
}

fn wire(buffer: usize) -> (Wire<DuplexStream>, DuplexStream) {
    let (server, client) = duplex(buffer);
    (Wire::new(server, Vec::new(), MAX), client)
}

async fn next(wire: &mut Wire<DuplexStream>) -> Option<Result<Message, WireError>> {
    tokio::time::timeout(Duration::from_secs(5), wire.next()).await.expect("a message in time")
}

#[tokio::test]
async fn a_message_cut_anywhere_is_read_whole_and_nothing_is_kept_after_it() {
    let frame = client_frame(0x81, "a message cut at every byte".as_bytes());
    for cut in 1..frame.len() {
        let (mut wire, mut client) = wire(1024);
        client.write_all(&frame[..cut]).await.unwrap();
        let early = tokio::time::timeout(Duration::from_millis(20), wire.next()).await;
        assert!(early.is_err(), "no message from {cut} bytes");
        assert!(wire.inbound.is_some(), "the {cut} bytes are kept");
        client.write_all(&frame[cut..]).await.unwrap();
        assert_eq!(next(&mut wire).await.unwrap().unwrap(), Message::text("a message cut at every byte"));
        assert!(wire.inbound.is_none(), "an idle connection keeps nothing (cut at {cut})");
    }
}

#[tokio::test]
async fn a_header_declaring_a_large_frame_holds_only_the_bytes_sent() {
    let frame = client_frame(0x82, &vec![7; MAX]);
    // At once, and with the header itself cut in two.
    for first in [12, 2] {
        let (mut wire, mut client) = wire(1024);
        client.write_all(&frame[..first]).await.unwrap();
        let _ = tokio::time::timeout(Duration::from_millis(20), wire.next()).await;
        client.write_all(&frame[first..14]).await.unwrap();
        let early = tokio::time::timeout(Duration::from_millis(20), wire.next()).await;
        assert!(early.is_err(), "no message from 14 bytes");
        let kept = wire.inbound.as_ref().expect("the bytes are kept").bytes.capacity();
        assert!(kept <= 64, "14 bytes sent, {kept} held: a declared length is not reserved");
    }
}

#[tokio::test]
async fn frames_that_arrive_together_come_out_one_by_one() {
    let (mut wire, mut client) = wire(4096);
    let mut bytes = client_frame(0x81, b"one");
    bytes.extend(client_frame(0x82, &[2; 300]));
    bytes.extend(client_frame(0x89, b"ping"));
    bytes.extend(client_frame(0x81, b"four"));
    client.write_all(&bytes).await.unwrap();
    assert_eq!(next(&mut wire).await.unwrap().unwrap(), Message::text("one"));
    assert_eq!(next(&mut wire).await.unwrap().unwrap(), Message::binary(vec![2; 300]));
    assert_eq!(next(&mut wire).await.unwrap().unwrap(), Message::Ping(Bytes::from_static(b"ping")));
    assert_eq!(next(&mut wire).await.unwrap().unwrap(), Message::text("four"));
    assert!(wire.inbound.is_none());
}

#[tokio::test]
async fn a_fragmented_message_is_assembled_around_a_control_frame() {
    let (mut wire, mut client) = wire(4096);
    let mut bytes = client_frame(0x01, "frag".as_bytes());
    bytes.extend(client_frame(0x8A, b"pong"));
    bytes.extend(client_frame(0x00, "ment".as_bytes()));
    client.write_all(&bytes).await.unwrap();
    assert_eq!(next(&mut wire).await.unwrap().unwrap(), Message::Pong(Bytes::from_static(b"pong")));
    let early = tokio::time::timeout(Duration::from_millis(20), wire.next()).await;
    assert!(early.is_err(), "the message is not over yet");
    client.write_all(&client_frame(0x80, "ed".as_bytes())).await.unwrap();
    assert_eq!(next(&mut wire).await.unwrap().unwrap(), Message::text("fragmented"));
    assert!(wire.inbound.is_none());
}

#[tokio::test]
async fn a_message_larger_than_a_read_is_read_whole() {
    let (mut wire, mut client) = wire(256 * 1024);
    let payload: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
    client.write_all(&client_frame(0x82, &payload)).await.unwrap();
    assert_eq!(next(&mut wire).await.unwrap().unwrap(), Message::binary(payload));
    assert!(wire.inbound.is_none());
}

#[tokio::test]
async fn what_breaks_the_protocol_or_the_limits_is_an_error() {
    let cases: [(&str, Vec<u8>); 5] = [
        ("over the limit", client_frame(0x82, &vec![0; MAX + 1])),
        ("not UTF-8", client_frame(0x81, &[0xC3, 0x28])),
        ("continuation of nothing", client_frame(0x80, b"x")),
        ("a new message inside a fragmented one", [client_frame(0x01, b"a"), client_frame(0x81, b"b")].concat()),
        ("fragments over the limit", [client_frame(0x02, &vec![0; MAX]), client_frame(0x80, b"x")].concat()),
    ];
    for (what, bytes) in cases {
        let (mut wire, mut client) = wire(256 * 1024);
        client.write_all(&bytes).await.unwrap();
        let error = next(&mut wire).await.unwrap().expect_err(what);
        let expected = match what {
            "over the limit" | "fragments over the limit" => matches!(error, WireError::MessageTooBig),
            "not UTF-8" => matches!(error, WireError::InvalidUtf8),
            _ => matches!(error, WireError::Protocol(_)),
        };
        assert!(expected, "{what}: {error}");
    }
}

#[tokio::test]
async fn text_split_inside_a_character_across_fragments_is_valid() {
    let (mut wire, mut client) = wire(4096);
    let text = "é";
    let bytes = [client_frame(0x01, &text.as_bytes()[..1]), client_frame(0x80, &text.as_bytes()[1..])].concat();
    client.write_all(&bytes).await.unwrap();
    assert_eq!(next(&mut wire).await.unwrap().unwrap(), Message::text(text));
}

#[tokio::test]
async fn the_end_of_the_tcp_connection_ends_the_messages() {
    let (mut wire, client) = wire(1024);
    drop(client);
    assert!(next(&mut wire).await.is_none());
}

#[tokio::test]
async fn what_the_upgrade_read_past_its_request_is_read_first() {
    let (server, _client) = duplex(1024);
    let mut wire = Wire::new(server, client_frame(0x81, b"early"), MAX);
    assert_eq!(next(&mut wire).await.unwrap().unwrap(), Message::text("early"));
}

/// tungstenite, as a client, reads what the server writes and is read by it.
#[tokio::test]
async fn a_tungstenite_client_and_the_wire_understand_each_other() {
    // A small pipe: writes are partial, and resumed mid-header and mid-payload.
    let (server, client) = duplex(7);
    let mut wire = Wire::new(server, Vec::new(), MAX);
    let mut client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
    let big = "x".repeat(70_000);
    let mut batch: VecDeque<Message> = [
        Message::text("hello"),
        Message::binary(vec![9; 300]),
        Message::Ping(Bytes::new()),
        Message::text(big.clone()),
    ]
    .into();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(client.next().await.unwrap().unwrap());
        }
        client.send(Message::text("from the client")).await.unwrap();
        client.send(Message::binary(vec![1; 20_000])).await.unwrap();
        (got, client)
    });
    wire.send_batch(&mut batch).await.unwrap();
    assert!(batch.is_empty());
    assert_eq!(next(&mut wire).await.unwrap().unwrap(), Message::Pong(Bytes::new()), "the client's answer to the ping");
    assert_eq!(next(&mut wire).await.unwrap().unwrap(), Message::text("from the client"));
    assert_eq!(next(&mut wire).await.unwrap().unwrap(), Message::binary(vec![1; 20_000]));
    let (got, mut client) = reader.await.unwrap();
    assert_eq!(
        got,
        [Message::text("hello"), Message::binary(vec![9; 300]), Message::Ping(Bytes::new()), Message::text(big)]
    );

    let frame = CloseFrame { code: CloseCode::Away, reason: "going away".into() };
    let closing = tokio::spawn(async move { client.next().await });
    wire.close(Some(frame.clone())).await.unwrap();
    let received = closing.await.unwrap().unwrap().unwrap();
    assert_eq!(received, Message::Close(Some(frame)));
}

#[tokio::test]
async fn a_client_close_frame_is_read_with_its_code() {
    let (mut wire, mut client) = wire(1024);
    client.write_all(&client_frame(0x88, &[&4000u16.to_be_bytes()[..], b"bye"].concat())).await.unwrap();
    let Message::Close(Some(frame)) = next(&mut wire).await.unwrap().unwrap() else { panic!("a close frame") };
    assert_eq!((u16::from(frame.code), frame.reason.as_str()), (4000, "bye"));
}

/// A message as a client sends it: its frames (fragmented into `pieces`
/// when it is data), and what the server should read.
fn frames_of(message: &Message, pieces: usize) -> Vec<u8> {
    let (opcode, payload): (u8, &[u8]) = match message {
        Message::Text(text) => (0x1, text.as_bytes()),
        Message::Binary(bytes) => (0x2, bytes),
        Message::Ping(bytes) => return client_frame(0x89, bytes),
        _ => unreachable!("only data and pings are generated"),
    };
    let size = payload.len().div_ceil(pieces.max(1)).max(1);
    let chunks: Vec<&[u8]> = if payload.is_empty() { vec![&[]] } else { payload.chunks(size).collect() };
    let last = chunks.len() - 1;
    chunks
        .iter()
        .enumerate()
        .flat_map(|(i, chunk)| {
            let op = if i == 0 { opcode } else { 0x0 };
            let fin = if i == last { 0x80 } else { 0 };
            client_frame(fin | op, chunk)
        })
        .collect()
}

fn any_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        ".{0,300}".prop_map(Message::text),
        proptest::collection::vec(any::<u8>(), 0..MAX).prop_map(Message::binary),
        proptest::collection::vec(any::<u8>(), 0..125).prop_map(|p| Message::Ping(p.into())),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// However the bytes are cut into reads and messages into fragments,
    /// the same messages come out, and nothing is kept afterwards.
    #[test]
    fn any_messages_cut_any_way_come_out_whole(
        messages in proptest::collection::vec((any_message(), 1usize..5), 1..12),
        cuts in proptest::collection::vec(1usize..20_000, 1..40),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let bytes: Vec<u8> = messages.iter().flat_map(|(m, pieces)| frames_of(m, *pieces)).collect();
            let (mut wire, mut client) = wire(1 << 20);
            let writer = tokio::spawn(async move {
                let mut at = 0;
                for cut in cuts.iter().cycle() {
                    if at == bytes.len() {
                        break;
                    }
                    let end = (at + cut).min(bytes.len());
                    client.write_all(&bytes[at..end]).await.unwrap();
                    tokio::task::yield_now().await;
                    at = end;
                }
                client
            });
            for (message, _) in &messages {
                assert_eq!(&next(&mut wire).await.unwrap().unwrap(), message);
            }
            let _client = writer.await.unwrap();
            assert!(wire.inbound.is_none(), "nothing is kept once every message is read");
        });
    }
}
