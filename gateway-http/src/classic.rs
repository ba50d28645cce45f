//! The classic query-string API, kept working exactly as the Workerman
//! example had it:
//!
//! - `?content=X` sends X to every connection (channel `broadcast`);
//! - `?to_worker_id=W&to_connection_id=C&content=X` sends X to one connection;
//!
//! and, in GatewayWorker's terms (`sendToUid`, `sendToGroup`):
//!
//! - `?to_uid=U&content=X` sends X to every connection of user U;
//! - `?to_group=G&content=X` sends X to every member of group G;
//! - `?to_channel=C&content=X` publishes X to channel C (for example a client
//!   channel `chat:room-1`, whose client-protocol subscribers get it);
//! - `exclude=W:C,W:C` (with any target) leaves those connections out.
//!
//! Unlike the classic example, malformed requests are refused rather than
//! answered `ok` and dropped (or, worse, broadcast): an empty or missing
//! `content`, only one of the two address parameters, a repeated parameter,
//! bad percent-encoding or non-UTF-8 text are all `400`. Unknown parameters
//! are ignored, as before (cache-busters like `_=123` are common). `+` means
//! a space, as in PHP's `$_GET`.

use herald_proto::names;
use herald_proto::v1::{Broadcast, ConnectionAddress, Content, PublishRequest, Target, content, target};

use crate::error::ApiError;

const CONTENT: &str = "content";
const TO_WORKER_ID: &str = "to_worker_id";
const TO_CONNECTION_ID: &str = "to_connection_id";
const TO_UID: &str = "to_uid";
const TO_GROUP: &str = "to_group";
const TO_CHANNEL: &str = "to_channel";
const EXCLUDE: &str = "exclude";

#[derive(Default)]
struct Params {
    content: Option<String>,
    to_worker_id: Option<String>,
    to_connection_id: Option<String>,
    to_uid: Option<String>,
    to_group: Option<String>,
    to_channel: Option<String>,
    exclude: Option<String>,
}

/// Parses the classic parameters from a query string and, for a form POST,
/// its body, into a publish request.
pub fn parse(query: &str, form: Option<&[u8]>, max_content_bytes: usize) -> Result<PublishRequest, ApiError> {
    let mut params = Params::default();
    collect(query.as_bytes(), &mut params)?;
    if let Some(form) = form {
        collect(form, &mut params)?;
    }
    let content = params.content.ok_or_else(|| ApiError::bad_request("missing parameter 'content'"))?;
    if content.is_empty() {
        return Err(ApiError::bad_request("parameter 'content' is empty"));
    }
    if content.len() > max_content_bytes {
        return Err(ApiError::too_large(format!(
            "content is {} bytes; the limit is {max_content_bytes}",
            content.len()
        )));
    }
    let except = params.exclude.as_deref().map(parse_exclude).transpose()?.unwrap_or_default();
    let named = [
        params.to_uid.is_some(),
        params.to_group.is_some(),
        params.to_channel.is_some(),
        params.to_worker_id.is_some(),
    ];
    if named.iter().filter(|n| **n).count() > 1 {
        return Err(ApiError::bad_request(
            "give one target: to_uid, to_group, to_channel or to_worker_id with to_connection_id",
        ));
    }
    let kind = match (params.to_worker_id, params.to_connection_id) {
        (None, None) => match (params.to_uid, params.to_group, params.to_channel) {
            (Some(uid), _, _) => {
                names::validate_user_id(&uid).map_err(|e| ApiError::bad_request(format!("to_uid: {e}")))?;
                target::Kind::User(uid)
            }
            (None, Some(group), _) => {
                names::validate_group(&group).map_err(|e| ApiError::bad_request(format!("to_group: {e}")))?;
                target::Kind::Group(group)
            }
            (None, None, Some(channel)) => {
                names::validate_channel(&channel).map_err(|e| ApiError::bad_request(format!("to_channel: {e}")))?;
                if names::is_reserved_channel(&channel) {
                    return Err(ApiError::bad_request(format!(
                        "to_channel: {channel:?} is reserved: use to_worker_id, to_uid or to_group"
                    )));
                }
                if !except.is_empty() {
                    return Err(ApiError::bad_request("exclude does not apply to to_channel"));
                }
                target::Kind::Channel(channel)
            }
            (None, None, None) => target::Kind::Broadcast(Broadcast {}),
        },
        (Some(worker_id), Some(connection_id)) => {
            names::validate_worker_id(&worker_id).map_err(|e| ApiError::bad_request(format!("to_worker_id: {e}")))?;
            names::validate_connection_id(&connection_id)
                .map_err(|e| ApiError::bad_request(format!("to_connection_id: {e}")))?;
            target::Kind::Connection(ConnectionAddress { worker_id, connection_id })
        }
        (Some(_), None) | (None, Some(_)) => {
            return Err(ApiError::bad_request(
                "to_worker_id and to_connection_id must be given together (or neither, to broadcast)",
            ));
        }
    };
    Ok(PublishRequest {
        target: Some(Target { kind: Some(kind), except }),
        content: Some(Content { body: Some(content::Body::Text(content)) }),
        idempotency_key: String::new(),
        presence_change: None,
    })
}

/// Parses `W:C,W:C` (worker id, colon, connection id; comma-separated).
fn parse_exclude(list: &str) -> Result<Vec<ConnectionAddress>, ApiError> {
    list.split(',')
        .filter(|item| !item.is_empty())
        .map(|item| {
            let (worker_id, connection_id) = item
                .split_once(':')
                .ok_or_else(|| ApiError::bad_request(format!("exclude: {item:?} is not worker_id:connection_id")))?;
            names::validate_worker_id(worker_id).map_err(|e| ApiError::bad_request(format!("exclude: {e}")))?;
            names::validate_connection_id(connection_id).map_err(|e| ApiError::bad_request(format!("exclude: {e}")))?;
            Ok(ConnectionAddress { worker_id: worker_id.to_owned(), connection_id: connection_id.to_owned() })
        })
        .collect()
}

fn collect(input: &[u8], params: &mut Params) -> Result<(), ApiError> {
    for pair in input.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
        let (raw_name, raw_value) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &b""[..]),
        };
        let name = decode(raw_name, "a parameter name")?;
        let slot = match name.as_str() {
            CONTENT => &mut params.content,
            TO_WORKER_ID => &mut params.to_worker_id,
            TO_CONNECTION_ID => &mut params.to_connection_id,
            TO_UID => &mut params.to_uid,
            TO_GROUP => &mut params.to_group,
            TO_CHANNEL => &mut params.to_channel,
            EXCLUDE => &mut params.exclude,
            _ => continue,
        };
        if slot.is_some() {
            return Err(ApiError::bad_request(format!("parameter '{name}' is given more than once")));
        }
        *slot = Some(decode(raw_value, &format!("parameter '{name}'"))?);
    }
    Ok(())
}

/// Decodes `application/x-www-form-urlencoded` text: `+` is a space and `%XX`
/// a byte; the result must be UTF-8.
fn decode(raw: &[u8], what: &str) -> Result<String, ApiError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = raw.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
                let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or_else(|| {
                    ApiError::bad_request(format!("{what} has a malformed percent-escape at byte {i}"))
                })?;
                out.push(byte);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| {
        ApiError::bad_request(format!("{what} is not valid UTF-8 (send binary content with POST /v1/publish)"))
    })
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;

    use super::*;

    fn text_of(req: &PublishRequest) -> &str {
        match req.content.as_ref().and_then(|c| c.body.as_ref()) {
            Some(content::Body::Text(t)) => t,
            other => panic!("{other:?}"),
        }
    }

    fn target_of(req: &PublishRequest) -> &target::Kind {
        req.target.as_ref().and_then(|t| t.kind.as_ref()).unwrap()
    }

    #[test]
    fn content_alone_is_a_broadcast() {
        let req = parse("content=hello+world%21", None, 100).unwrap();
        assert_eq!(text_of(&req), "hello world!");
        assert!(matches!(target_of(&req), target::Kind::Broadcast(_)));
    }

    #[test]
    fn both_address_parameters_target_one_connection() {
        let req = parse("to_worker_id=w1&to_connection_id=7&content=hi&_=123", None, 100).unwrap();
        let target::Kind::Connection(addr) = target_of(&req) else { panic!() };
        assert_eq!((addr.worker_id.as_str(), addr.connection_id.as_str()), ("w1", "7"));
        assert_eq!(text_of(&req), "hi");
    }

    #[test]
    fn gatewayworker_style_targets_name_a_user_or_a_group_and_may_exclude_connections() {
        let req = parse("to_uid=ana%40example.com&content=hi", None, 100).unwrap();
        assert_eq!(target_of(&req), &target::Kind::User("ana@example.com".into()));
        let req = parse("to_group=room-1&exclude=w1:7,w2:9&content=hi", None, 100).unwrap();
        assert_eq!(target_of(&req), &target::Kind::Group("room-1".into()));
        let except = &req.target.as_ref().unwrap().except;
        let except: Vec<_> = except.iter().map(|a| (a.worker_id.as_str(), a.connection_id.as_str())).collect();
        assert_eq!(except, [("w1", "7"), ("w2", "9")]);
        let req = parse("to_channel=chat%3Aroom-1&content=hi", None, 100).unwrap();
        assert_eq!(target_of(&req), &target::Kind::Channel("chat:room-1".into()));
    }

    #[test]
    fn a_form_body_counts_like_the_query_string() {
        let req = parse("to_worker_id=w1", Some(b"to_connection_id=2&content=%C3%A9"), 100).unwrap();
        assert_eq!(text_of(&req), "é");
    }

    #[test]
    fn malformed_requests_are_400_with_a_reason() {
        let cases = [
            ("", "missing parameter 'content'"),
            ("content=", "parameter 'content' is empty"),
            ("content=a&content=b", "parameter 'content' is given more than once"),
            ("to_worker_id=w1&content=x", "must be given together"),
            ("to_connection_id=1&content=x", "must be given together"),
            ("content=%zz", "malformed percent-escape"),
            ("content=%4", "malformed percent-escape"),
            ("content=%ff", "not valid UTF-8"),
            ("to_worker_id=a%20b&to_connection_id=1&content=x", "to_worker_id: worker id"),
            ("to_worker_id=w&to_connection_id=&content=x", "to_connection_id: connection id is empty"),
            ("to_uid=a&to_group=g&content=x", "give one target"),
            ("to_uid=a&to_worker_id=w&to_connection_id=1&content=x", "give one target"),
            ("to_uid=a+b&content=x", "to_uid: user id"),
            ("to_group=&content=x", "to_group: group is empty"),
            ("to_channel=a..b&content=x", "to_channel: channel"),
            ("to_channel=chat:a&to_uid=u&content=x", "give one target"),
            ("to_channel=user.ana&content=x", "to_channel: \"user.ana\" is reserved"),
            ("to_channel=chat:a&exclude=w1:7&content=x", "exclude does not apply to to_channel"),
            ("exclude=w1&content=x", "exclude: \"w1\" is not worker_id:connection_id"),
            ("exclude=w..1:2&content=x", "exclude: worker id"),
        ];
        for (query, reason) in cases {
            let err = parse(query, None, 100).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{query}");
            assert!(err.message.contains(reason), "{query}: {}", err.message);
            assert!(!err.message.contains('\n'));
        }
    }

    #[test]
    fn content_over_the_limit_is_413() {
        let err = parse("content=12345", None, 4).unwrap_err();
        assert_eq!(err.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(parse("content=1234", None, 4).is_ok());
    }
}
