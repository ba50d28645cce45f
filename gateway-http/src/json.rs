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
    Broadcast, ConnectionAddress, Content, PublishRequest, PublishResponse, PublishResult, Target, content,
    publish_result, target,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::ApiError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishBody {
    target: TargetBody,
    content: ContentBody,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchBody {
    requests: Vec<PublishBody>,
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
        Ok(PublishRequest { target: Some(Target { kind: Some(kind) }), content: Some(Content { body: Some(body) }) })
    }
}

impl BatchBody {
    pub fn into_requests(self) -> Result<Vec<PublishRequest>, ApiError> {
        self.requests
            .into_iter()
            .enumerate()
            .map(|(i, body)| {
                body.into_request().map_err(|e| ApiError { message: format!("requests[{i}]: {}", e.message), ..e })
            })
            .collect()
    }
}

pub fn published(res: &PublishResponse) -> Value {
    json!({ "subscribers": res.subscribers })
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
    fn a_bad_batch_item_is_named_by_its_index() {
        let body = r#"{"requests":[{"target":{"broadcast":{}},"content":{"text":"a"}},{"target":{"broadcast":{}},"content":{"binary":"%"}}]}"#;
        let err = parse_body::<BatchBody>(body.as_bytes()).unwrap().into_requests().unwrap_err();
        assert!(err.message.starts_with("requests[1]: "), "{}", err.message);
    }
}
