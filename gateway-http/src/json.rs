//! The `/v1` JSON API. Request bodies follow the protobuf JSON mapping of
//! `herald.v1.PublishRequest` and `herald.v1.PublishBatchRequest` (field
//! names in snake_case, `binary` content in base64), so the JSON and gRPC
//! APIs stay one contract:
//!
//! ```json
//! {"target": {"broadcast": {}}, "content": {"text": "hello"}}
//! {"target": {"connection": {"worker_id": "w1", "connection_id": "7"}}, "content": {"binary": "AAEC"}}
//! {"requests": [ …publish bodies… ]}
//! ```

use base64::Engine;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use bytes::Bytes;
use herald_proto::v1::{
    Broadcast, ConnectionAddress, Content, PublishError, PublishRequest, PublishResponse, PublishResult, Target,
    content, publish_result, target,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::ApiError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishBody {
    target: TargetBody,
    content: ContentBody,
    #[serde(default)]
    idempotency_key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum TargetBody {
    Broadcast(EmptyObject),
    Connection(ConnectionBody),
    Channel(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmptyObject {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectionBody {
    worker_id: String,
    connection_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum ContentBody {
    Text(String),
    /// Base64, standard or URL-safe alphabet, padded or not (as the protobuf JSON mapping allows).
    Binary(String),
}

/// A batch: each entry is checked on its own, so one malformed entry does
/// not refuse the others.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchBody {
    requests: Vec<Value>,
}

const LENIENT: GeneralPurposeConfig =
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);

fn decode_base64(s: &str) -> Result<Vec<u8>, ApiError> {
    GeneralPurpose::new(&alphabet::STANDARD, LENIENT)
        .decode(s)
        .or_else(|_| GeneralPurpose::new(&alphabet::URL_SAFE, LENIENT).decode(s))
        .map_err(|e| ApiError::bad_request(format!("content.binary is not base64: {e}")))
}

/// Parses a JSON body, reporting where it went wrong in one line.
pub fn parse_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

impl PublishBody {
    pub fn into_request(self) -> Result<PublishRequest, ApiError> {
        let kind = match self.target {
            TargetBody::Broadcast(EmptyObject {}) => target::Kind::Broadcast(Broadcast {}),
            TargetBody::Connection(c) => {
                target::Kind::Connection(ConnectionAddress { worker_id: c.worker_id, connection_id: c.connection_id })
            }
            TargetBody::Channel(name) => target::Kind::Channel(name),
        };
        let body = match self.content {
            ContentBody::Text(text) => content::Body::Text(text),
            ContentBody::Binary(b64) => content::Body::Binary(Bytes::from(decode_base64(&b64)?)),
        };
        Ok(PublishRequest {
            target: Some(Target { kind: Some(kind) }),
            content: Some(Content { body: Some(body) }),
            idempotency_key: self.idempotency_key,
        })
    }
}

impl BatchBody {
    /// Each entry as a request, or the reason it is refused (naming its index).
    pub fn into_entries(self) -> Vec<Result<PublishRequest, ApiError>> {
        self.requests
            .into_iter()
            .enumerate()
            .map(|(i, entry)| {
                serde_json::from_value::<PublishBody>(entry)
                    .map_err(|e| ApiError::bad_request(format!("invalid entry: {e}")))
                    .and_then(PublishBody::into_request)
                    .map_err(|e| ApiError { message: format!("requests[{i}]: {}", e.message), ..e })
            })
            .collect()
    }
}

/// The JSON form of a publish's outcome, mirroring `herald.v1.PublishResponse`
/// in the protobuf JSON mapping (false fields left out), except that
/// `subscribers` is always there. It counts the subscriber sessions
/// (gateways, mostly) of the broker that took the publish, not WebSocket
/// clients; `"forwarded": true` says the message also went to the other
/// brokers of a cluster, whose sessions are not counted; `"duplicate": true`
/// says its idempotency key was already used, so it was not routed again.
pub fn published(res: &PublishResponse) -> Value {
    let mut fields = serde_json::Map::new();
    fields.insert("subscribers".into(), res.subscribers.into());
    if res.forwarded {
        fields.insert("forwarded".into(), true.into());
    }
    if res.duplicate {
        fields.insert("duplicate".into(), true.into());
    }
    Value::Object(fields)
}

/// A batch entry refused before it reached the broker, as a batch result.
pub fn refused(e: &ApiError) -> PublishResult {
    PublishResult {
        outcome: Some(publish_result::Outcome::Error(PublishError { code: e.code as u32, message: e.message.clone() })),
    }
}

pub fn batch_results(results: &[PublishResult]) -> Value {
    let results: Vec<Value> = results
        .iter()
        .map(|r| match &r.outcome {
            Some(publish_result::Outcome::Published(p)) => json!({ "published": published(p) }),
            Some(publish_result::Outcome::Error(e)) => json!({ "error": { "code": e.code, "message": e.message } }),
            None => json!({}),
        })
        .collect();
    json!({ "results": results })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: &str) -> Result<PublishRequest, ApiError> {
        parse_body::<PublishBody>(json.as_bytes())?.into_request()
    }

    #[test]
    fn bodies_follow_the_protobuf_json_mapping() {
        let req = request(r#"{"target":{"broadcast":{}},"content":{"text":"hi"}}"#).unwrap();
        assert!(matches!(req.target.unwrap().kind, Some(target::Kind::Broadcast(_))));
        let req =
            request(r#"{"target":{"connection":{"worker_id":"w","connection_id":"1"}},"content":{"binary":"AAEC/w"}}"#)
                .unwrap();
        assert_eq!(req.content.unwrap().body, Some(content::Body::Binary(Bytes::from_static(&[0, 1, 2, 255]))));
        let req = request(r#"{"target":{"channel":"news"},"content":{"binary":"_w=="}}"#).unwrap();
        assert_eq!(req.content.unwrap().body, Some(content::Body::Binary(Bytes::from_static(&[255]))));
    }

    #[test]
    fn malformed_bodies_are_400_with_a_one_line_reason() {
        for body in [
            "",
            "{",
            r#"{"target":{"broadcast":{}}}"#,
            r#"{"target":{"everyone":{}},"content":{"text":"x"}}"#,
            r#"{"target":{"broadcast":{}},"content":{"text":"x"},"extra":1}"#,
            r#"{"target":{"broadcast":{}},"content":{"binary":"not base64!"}}"#,
            r#"{"target":{"broadcast":{"x":1}},"content":{"text":"x"}}"#,
            "{\"target\":{\"a\\nb\":{}},\"content\":{\"text\":\"x\"}}",
        ] {
            let err = request(body).unwrap_err();
            assert_eq!(err.status, axum::http::StatusCode::BAD_REQUEST, "{body}");
            assert!(!err.message.contains('\n'), "{}", err.message);
        }
    }

    #[test]
    fn each_batch_entry_is_checked_on_its_own_and_a_bad_one_is_named_by_its_index() {
        let body = r#"{"requests":[{"target":{"broadcast":{}},"content":{"text":"a"}},
            {"target":{"broadcast":{}},"content":{"binary":"%"}}, {"target":{},"content":{"text":"b"}},
            {"content":{"text":"c"}}, {"target":{"broadcast":{}},"content":{}}, 7]}"#;
        let entries = parse_body::<BatchBody>(body.as_bytes()).unwrap().into_entries();
        assert_eq!(entries.len(), 6);
        assert!(entries[0].is_ok());
        for (i, entry) in entries.iter().enumerate().skip(1) {
            let err = entry.as_ref().unwrap_err();
            assert!(err.message.starts_with(&format!("requests[{i}]: ")), "{}", err.message);
            assert_eq!(err.status, axum::http::StatusCode::BAD_REQUEST);
        }
    }
}
