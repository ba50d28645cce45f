//! The grammar of the names in herald's contract: worker ids, connection ids
//! and channel names. They travel unescaped in query strings, greetings and
//! NATS subjects, so each is a short token of URL-safe characters.

use thiserror::Error;

/// Longest worker id or connection id, in bytes.
pub const MAX_ID_LEN: usize = 64;
/// Longest channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 128;
/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;
/// Longest user id or group name, in bytes.
pub const MAX_MEMBER_NAME_LEN: usize = 128;
/// The channel every gateway listens on.
pub const BROADCAST_CHANNEL: &str = "broadcast";
/// Prefix of the channel a gateway listens on for its worker id.
pub const WORKER_CHANNEL_PREFIX: &str = "worker.";
/// Prefix of the channel that carries the messages of one user.
pub const USER_CHANNEL_PREFIX: &str = "user.";
/// Prefix of the channel that carries the messages of one group.
pub const GROUP_CHANNEL_PREFIX: &str = "group.";

/// Why a name was refused. The message names the offending value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} is {len} bytes long; the limit is {max}")]
    TooLong { what: &'static str, len: usize, max: usize },
    #[error("{what} {value:?} has a character outside [A-Za-z0-9._-]")]
    BadCharacter { what: &'static str, value: String },
    #[error("{what} {value:?} has an empty dot-separated part")]
    EmptyPart { what: &'static str, value: String },
    #[error("{what} has a character that is not visible ASCII")]
    NotVisibleAscii { what: &'static str },
    #[error("namespace of {value:?} must be 1 or more characters of [A-Za-z0-9_-] before one ':'")]
    BadNamespace { value: String },
    #[error("channel {value:?} has no namespace: a client channel is <namespace>:<name>")]
    NoNamespace { value: String },
}

fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

fn check_len(what: &'static str, value: &str, max: usize) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::Empty { what });
    }
    if value.len() > max {
        return Err(NameError::TooLong { what, len: value.len(), max });
    }
    Ok(())
}

/// Dot-separated tokens of `[A-Za-z0-9_-]` with no empty part: the shape
/// shared by worker ids and channel names (and valid as NATS subject tokens).
fn check_dotted(what: &'static str, value: &str, max: usize) -> Result<(), NameError> {
    check_len(what, value, max)?;
    if !value.bytes().all(|b| is_token_char(b) || b == b'.') {
        return Err(NameError::BadCharacter { what, value: value.to_owned() });
    }
    if value.split('.').any(str::is_empty) {
        return Err(NameError::EmptyPart { what, value: value.to_owned() });
    }
    Ok(())
}

/// Checks a worker id: 1 to 64 characters of `[A-Za-z0-9._-]`, dots only
/// between other characters.
pub fn validate_worker_id(value: &str) -> Result<(), NameError> {
    check_dotted("worker id", value, MAX_ID_LEN)
}

/// Checks a connection id: 1 to 64 characters of `[A-Za-z0-9._-]`.
pub fn validate_connection_id(value: &str) -> Result<(), NameError> {
    let what = "connection id";
    check_len(what, value, MAX_ID_LEN)?;
    if !value.bytes().all(|b| is_token_char(b) || b == b'.') {
        return Err(NameError::BadCharacter { what, value: value.to_owned() });
    }
    Ok(())
}

/// Checks a channel name: dot-separated tokens of `[A-Za-z0-9_-]`, at most 128
/// characters, optionally after a namespace and a colon (`chat:room-1`, a
/// client channel).
pub fn validate_channel(value: &str) -> Result<(), NameError> {
    let what = "channel";
    match value.split_once(':') {
        None => check_dotted(what, value, MAX_CHANNEL_LEN),
        Some((namespace, name)) => {
            check_len(what, value, MAX_CHANNEL_LEN)?;
            if namespace.is_empty() || !namespace.bytes().all(is_token_char) {
                return Err(NameError::BadNamespace { value: value.to_owned() });
            }
            check_dotted(what, name, MAX_CHANNEL_LEN)
        }
    }
}

/// The namespace and the name of a client channel (`chat:room-1` gives
/// `("chat", "room-1")`); `None` for a channel without a namespace.
pub fn client_channel(channel: &str) -> Option<(&str, &str)> {
    channel.split_once(':')
}

/// Checks a client channel: a channel with a namespace (`chat:room-1`).
pub fn validate_client_channel(value: &str) -> Result<(), NameError> {
    validate_channel(value)?;
    if client_channel(value).is_none() {
        return Err(NameError::NoNamespace { value: value.to_owned() });
    }
    Ok(())
}

/// Checks a namespace name: 1 to 64 characters of `[A-Za-z0-9_-]`.
pub fn validate_namespace(value: &str) -> Result<(), NameError> {
    check_len("namespace", value, MAX_ID_LEN)?;
    if !value.bytes().all(is_token_char) {
        return Err(NameError::BadNamespace { value: value.to_owned() });
    }
    Ok(())
}

/// Checks an idempotency key: 1 to 128 characters of visible ASCII (a UUID,
/// a hash, a request id).
pub fn validate_idempotency_key(value: &str) -> Result<(), NameError> {
    let what = "idempotency key";
    check_len(what, value, MAX_IDEMPOTENCY_KEY_LEN)?;
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(NameError::NotVisibleAscii { what });
    }
    Ok(())
}

/// Checks a user id (a JWT `sub`, or what the backend binds): 1 to 128
/// characters of visible ASCII, so that e-mail addresses, UUIDs and
/// `provider|id` forms all fit.
pub fn validate_user_id(value: &str) -> Result<(), NameError> {
    check_visible("user id", value)
}

/// Checks a group name: 1 to 128 characters of visible ASCII.
pub fn validate_group(value: &str) -> Result<(), NameError> {
    check_visible("group", value)
}

fn check_visible(what: &'static str, value: &str) -> Result<(), NameError> {
    check_len(what, value, MAX_MEMBER_NAME_LEN)?;
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(NameError::NotVisibleAscii { what });
    }
    Ok(())
}

/// The channel on which the gateways holding a connection of `user_id` listen.
pub fn user_channel(user_id: &str) -> String {
    member_channel(USER_CHANNEL_PREFIX, user_id)
}

/// The channel on which the gateways holding a member of `group` listen.
pub fn group_channel(group: &str) -> String {
    member_channel(GROUP_CHANNEL_PREFIX, group)
}

/// `prefix` and `name` made into one channel token: `[A-Za-z0-9-]` stay,
/// every other byte becomes `_` and two hex digits. One name gives one
/// channel and two names never share one, and the result is a valid NATS
/// subject token whatever the name holds.
fn member_channel(prefix: &str, name: &str) -> String {
    let mut channel = String::with_capacity(prefix.len() + name.len() * 2);
    channel.push_str(prefix);
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            channel.push(char::from(b));
        } else {
            channel.push('_');
            channel.push(char::from(HEX[usize::from(b >> 4)]));
            channel.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
    channel
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Whether `channel` is reserved for routing (worker, user and group
/// channels): publishers address a connection, a user or a group instead.
pub fn is_reserved_channel(channel: &str) -> bool {
    [WORKER_CHANNEL_PREFIX, USER_CHANNEL_PREFIX, GROUP_CHANNEL_PREFIX].iter().any(|p| channel.starts_with(p))
}

/// The channel on which the gateway holding `worker_id` listens.
/// The id of a connection's disconnect event: the same whether the gateway
/// reports it or a broker reports it for a gateway that went away, so that
/// it is stored once.
pub fn disconnect_event_id(worker_id: &str, instance_id: &str, connection_id: &str) -> String {
    format!("{worker_id}.{instance_id}.closed.{connection_id}")
}

pub fn worker_channel(worker_id: &str) -> String {
    format!("{WORKER_CHANNEL_PREFIX}{worker_id}")
}

/// Whether `channel` is a worker channel, which only a worker claim may
/// subscribe to and only a connection target may publish on.
pub fn is_worker_channel(channel: &str) -> bool {
    channel.starts_with(WORKER_CHANNEL_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_ids_are_url_safe_dotted_tokens() {
        for ok in ["0", "w1", "eu-west.gw_3", "A.b.C"] {
            assert_eq!(validate_worker_id(ok), Ok(()), "{ok}");
        }
        for bad in ["", ".w", "w.", "a..b", "a b", "a/b", "é", "a%20"] {
            assert!(validate_worker_id(bad).is_err(), "{bad}");
        }
        assert!(matches!(validate_worker_id(&"x".repeat(65)), Err(NameError::TooLong { len: 65, .. })));
    }

    #[test]
    fn connection_ids_allow_any_url_safe_token() {
        assert_eq!(validate_connection_id("1"), Ok(()));
        assert_eq!(validate_connection_id(".a..b."), Ok(()));
        assert!(validate_connection_id("").is_err());
        assert!(validate_connection_id("1 2").is_err());
    }

    #[test]
    fn channels_are_dotted_tokens_up_to_128_bytes() {
        assert_eq!(validate_channel("broadcast"), Ok(()));
        assert_eq!(validate_channel("room.42.chat"), Ok(()));
        assert!(validate_channel("room..42").is_err());
        assert!(validate_channel("room/42").is_err());
        assert!(validate_channel(&"c".repeat(129)).is_err());
    }

    #[test]
    fn a_client_channel_has_one_namespace_before_a_colon() {
        assert_eq!(validate_channel("chat:room-1.a"), Ok(()));
        assert_eq!(client_channel("chat:room-1.a"), Some(("chat", "room-1.a")));
        assert_eq!(client_channel("room"), None);
        for bad in [":room", "chat:", "chat:a:b", "ch.at:room", "chat:room..1", "c h:room"] {
            assert!(validate_channel(bad).is_err(), "{bad}");
        }
        assert!(validate_channel(&format!("chat:{}", "c".repeat(124))).is_err(), "the whole name counts");
        assert_eq!(validate_client_channel("chat:a"), Ok(()));
        assert_eq!(validate_client_channel("chat"), Err(NameError::NoNamespace { value: "chat".into() }));
        assert!(validate_client_channel("chat:a..b").is_err());
        assert_eq!(validate_namespace("chat_2-x"), Ok(()));
        assert!(validate_namespace("chat:").is_err());
    }

    #[test]
    fn user_ids_and_groups_are_visible_ascii() {
        for ok in ["42", "ana@example.com", "auth0|5f1c", "room:1/a"] {
            assert_eq!(validate_user_id(ok), Ok(()), "{ok}");
            assert_eq!(validate_group(ok), Ok(()), "{ok}");
        }
        for bad in ["", "a b", "é", "tab\there"] {
            assert!(validate_user_id(bad).is_err(), "{bad}");
        }
        assert!(validate_group(&"g".repeat(129)).is_err());
    }

    #[test]
    fn member_channels_are_single_valid_tokens_and_never_collide() {
        assert_eq!(user_channel("ana-1"), "user.ana-1");
        assert_eq!(user_channel("a.b"), "user.a_2eb");
        assert_eq!(group_channel("a_2eb"), "group.a_5f2eb");
        let names = ["a.b", "a_2eb", "a_b", "a*b", "a>b", "A.B", "x"];
        let channels: std::collections::HashSet<_> = names.iter().map(|n| user_channel(n)).collect();
        assert_eq!(channels.len(), names.len());
        for c in &channels {
            assert_eq!(validate_channel(c), Ok(()), "{c}");
            assert_eq!(c.matches('.').count(), 1, "{c}");
        }
        assert!(is_reserved_channel("user.x") && is_reserved_channel("group.x") && is_reserved_channel("worker.x"));
        assert!(!is_reserved_channel("users.x"));
    }

    #[test]
    fn worker_channels_are_recognised() {
        assert_eq!(worker_channel("w1"), "worker.w1");
        assert!(is_worker_channel("worker.w1"));
        assert!(!is_worker_channel("workers"));
    }
}
