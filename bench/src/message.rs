//! The benchmark message: what publishers put in a payload, what clients
//! parse back, and the clock both sides stamp it with.
//!
//! A payload is `<seq>:<sent_ns>:<target>:` padded with `x` to the requested
//! size. `seq` counts messages per target (a broadcast's target is everyone,
//! so every client sees 0, 1, 2, …), `sent_ns` is `CLOCK_MONOTONIC` in
//! nanoseconds when the publisher hands the message to herald, and `target` is
//! `*` for a broadcast or `<worker_id>/<connection_id>` for one connection.
//! `CLOCK_MONOTONIC` is one system-wide clock on Linux, so the publisher and
//! the client processes on this machine compare stamps directly.

use rustix::time::{ClockId, clock_gettime};

/// The target field of a broadcast.
pub const BROADCAST: &str = "*";

/// The target field of a message to client channel `channel`: the channel
/// with its namespace colon made a `~`, as `:` ends the field.
pub fn channel_label(channel: &str) -> String {
    channel.replace(':', "~")
}

/// The payload inside a client-protocol push (a publication or a direct
/// message): the bytes of its `"text"` value. Benchmark payloads hold no
/// character JSON escapes, so no unescaping is needed.
pub fn pushed_text(push: &[u8]) -> Option<&[u8]> {
    const KEY: &[u8] = b"\"text\":\"";
    let start = push.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let len = push[start..].iter().position(|&b| b == b'"')?;
    Some(&push[start..start + len])
}

/// Nanoseconds of `CLOCK_MONOTONIC`.
pub fn now_ns() -> u64 {
    let ts = clock_gettime(ClockId::Monotonic);
    // The monotonic clock counts from boot: never negative.
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A payload for message `seq` to `target`, stamped now, padded to `size` bytes
/// (longer when the header alone does not fit).
pub fn encode(seq: u64, target: &str, size: usize) -> String {
    let mut payload = format!("{seq}:{}:{target}:", now_ns());
    let pad = size.saturating_sub(payload.len());
    payload.extend(std::iter::repeat_n('x', pad));
    payload
}

/// The header of a received payload.
#[derive(Debug, PartialEq, Eq)]
pub struct Header<'a> {
    pub seq: u64,
    pub sent_ns: u64,
    pub target: &'a [u8],
}

/// Parses the header of `payload`; `None` when it is not a benchmark message.
pub fn parse(payload: &[u8]) -> Option<Header<'_>> {
    let (seq, rest) = number(payload)?;
    let (sent_ns, rest) = number(rest)?;
    let end = rest.iter().position(|&b| b == b':')?;
    Some(Header { seq, sent_ns, target: &rest[..end] })
}

/// Reads decimal digits up to a `:` and returns the number and what follows the `:`.
fn number(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut value: u64 = 0;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'0'..=b'9' => value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?,
            b':' if i > 0 => return Some((value, &bytes[i + 1..])),
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_round_trips_and_is_padded_to_size() {
        let payload = encode(42, "gw0/17", 64);
        assert_eq!(payload.len(), 64);
        assert!(payload.ends_with('x'));
        let header = parse(payload.as_bytes()).unwrap();
        assert_eq!(header.seq, 42);
        assert_eq!(header.target, b"gw0/17");
        assert!(header.sent_ns <= now_ns());
    }

    #[test]
    fn a_header_longer_than_the_size_is_kept_whole() {
        let payload = encode(1, BROADCAST, 4);
        assert_eq!(parse(payload.as_bytes()).unwrap().target, b"*");
    }

    #[test]
    fn a_pushed_payload_is_found_in_its_json() {
        let payload = encode(3, &channel_label("bench:all"), 40);
        let push = format!(r#"{{"publication":{{"channel":"bench:all","content":{{"text":"{payload}"}}}}}}"#);
        let inner = pushed_text(push.as_bytes()).unwrap();
        assert_eq!(parse(inner).unwrap().target, b"bench~all");
        assert_eq!(pushed_text(br#"{"id":1,"subscribed":{"channel":"bench:all"}}"#), None);
    }

    #[test]
    fn other_payloads_are_not_benchmark_messages() {
        assert_eq!(parse(b"Worker ID:w Connection ID:1 connected"), None);
        assert_eq!(parse(b"12:34"), None);
        assert_eq!(parse(b":1:*:"), None);
        assert_eq!(parse(b"99999999999999999999999:1:*:"), None);
    }
}
