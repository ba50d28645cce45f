//! Fuzzes the gateway's WebSocket framing (`herald_gateway_ws`'s wire):
//! whatever bytes a client sends on an open connection, reading them never
//! panics or stalls, and reads them the same whether they arrive at once or
//! cut into reads of any sizes. No data message is over the limit and no
//! control message over 125 bytes; reading ends with the bytes or with a
//! refusal.
//!
//! Input: byte 0 sets the limit (64 × byte + 1), bytes 1 to 3 the sizes of
//! the reads (byte + 1, in turn); the rest is what the client sent.

#![no_main]

use herald_gateway_ws::wire_fuzzing::{Message, Outcome, read_client_bytes};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let [limit, a, b, c, bytes @ ..] = input else { return };
    let max = usize::from(*limit) * 64 + 1;
    let reads = [a, b, c].map(|size| usize::from(*size) + 1);
    let whole = read_client_bytes(bytes, &[], max);
    assert_eq!(read_client_bytes(bytes, &reads, max), whole, "cut into reads of {reads:?}");
    let (last, messages) = whole.split_last().expect("at least one outcome");
    assert!(matches!(last, Outcome::Ended { .. } | Outcome::Refused(_)), "ended with {last:?}");
    for outcome in messages {
        match outcome {
            Outcome::Message(Message::Text(text)) => assert!(text.len() <= max),
            Outcome::Message(Message::Binary(data)) => assert!(data.len() <= max),
            Outcome::Message(Message::Ping(data) | Message::Pong(data)) => assert!(data.len() <= 125),
            Outcome::Message(Message::Close(frame)) => {
                assert!(frame.as_ref().is_none_or(|f| f.reason.len() <= 123), "{frame:?}");
            }
            other => panic!("{other:?} before the end"),
        }
    }
});
