//! Fuzzes the names grammar (`herald_proto::names`) against an independent
//! statement of it: worker ids and channels are dot-separated tokens of
//! `[A-Za-z0-9_-]` with no empty part (at most 64 and 128 bytes; a channel
//! may start with a namespace of such characters and a colon), connection
//! ids are 1 to 64 bytes of `[A-Za-z0-9._-]`. Each validator must accept
//! exactly what the grammar allows, refuse with a one-line reason, and the
//! worker channel of a valid worker id must be a valid, reserved channel.

#![no_main]

use herald_proto::names::{self, MAX_CHANNEL_LEN, MAX_ID_LEN, NameError};
use libfuzzer_sys::fuzz_target;

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

fn dotted_tokens(s: &str, max: usize) -> bool {
    (1..=max).contains(&s.len()) && s.split('.').all(|part| !part.is_empty() && part.chars().all(is_token_char))
}

/// A channel: dotted tokens, or a namespace of tokens characters, one `:`
/// and dotted tokens (a client channel), at most 128 bytes in all.
fn channel(s: &str) -> bool {
    match s.split_once(':') {
        None => dotted_tokens(s, MAX_CHANNEL_LEN),
        Some((namespace, name)) => {
            s.len() <= MAX_CHANNEL_LEN
                && !namespace.is_empty()
                && namespace.chars().all(is_token_char)
                && dotted_tokens(name, MAX_CHANNEL_LEN)
        }
    }
}

fn url_safe_token(s: &str, max: usize) -> bool {
    (1..=max).contains(&s.len()) && s.chars().all(|c| is_token_char(c) || c == '.')
}

fn check(what: &str, s: &str, result: Result<(), NameError>, allowed: bool) {
    match result {
        Ok(()) => assert!(allowed, "{what} {s:?} validated but is outside the grammar"),
        Err(e) => {
            assert!(!allowed, "{what} {s:?} is in the grammar but was refused: {e}");
            let reason = e.to_string();
            assert!(!reason.contains(['\n', '\r']), "reason is not one line: {reason:?}");
        }
    }
}

fuzz_target!(|s: &str| {
    check("worker id", s, names::validate_worker_id(s), dotted_tokens(s, MAX_ID_LEN));
    check("connection id", s, names::validate_connection_id(s), url_safe_token(s, MAX_ID_LEN));
    check("channel", s, names::validate_channel(s), channel(s));
    if names::validate_worker_id(s).is_ok() {
        let channel = names::worker_channel(s);
        assert_eq!(names::validate_channel(&channel), Ok(()), "worker channel {channel:?} is not a valid channel");
        assert!(names::is_worker_channel(&channel));
    }
    if names::is_worker_channel(s) {
        assert!(s.starts_with(names::WORKER_CHANNEL_PREFIX));
    }
});
