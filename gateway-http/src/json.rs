//! The `/v1` JSON API. Request bodies follow the protobuf JSON mapping of
//! `herald.v1.PublishRequest`, `PublishBatchRequest`, `ControlRequest` and
//! `QueryRequest` (field names in snake_case, `binary` content in base64), so
//! the JSON and gRPC APIs stay one contract. A target, an op, a question and
//! a selection each name exactly one of their kinds.
//!
//! `POST /v1/publish` (a target: `broadcast`, `connection`, `channel`, `user`
//! or `group`, with an optional `except` list of connections):
//!
//! ```json
//! {"target": {"broadcast": {}}, "content": {"text": "hello"}}
//! {"target": {"connection": {"worker_id": "w1", "connection_id": "7"}}, "content": {"binary": "AAEC"}}
//! {"target": {"group": "room-1", "except": [{"worker_id": "w1", "connection_id": "17"}]}, "content": {"text": "hi"}}
//! ```
//!
//! `POST /v1/batch`: `{"requests": [ …publish bodies… ]}`.
//!
//! `POST /v1/control`, one op of `bind_user`, `unbind_user`, `join_groups`,
//! `leave_groups`, `dissolve_group`, `close` or `set_data`, answered
//! `{"connections": N, "missing_workers": […]}`:
//!
//! ```json
//! {"bind_user": {"connection": {"worker_id": "w1", "connection_id": "7"}, "user_id": "ana"}}
//! {"unbind_user": {"worker_id": "w1", "connection_id": "7"}}
//! {"join_groups": {"selection": {"user": "ana"}, "groups": ["room-1"]}}
//! {"leave_groups": {"selection": {"connection": {"worker_id": "w1", "connection_id": "7"}}, "groups": ["room-1"]}}
//! {"dissolve_group": "room-1"}
//! {"close": {"selection": {"user": "ana"}, "reason": "bye"}}
//! {"set_data": {"connection": {"worker_id": "w1", "connection_id": "7"}, "values": {"k": "v"}, "remove": ["k2"], "replace": false}}
//! ```
//!
//! `POST /v1/query`, one question of `user_online`, `user_connections`,
//! `group_members`, `group_count`, `totals` or `connection`:
//!
//! ```json
//! {"user_connections": "ana"}
//! {"totals": {}}
//! {"connection": {"worker_id": "w1", "connection_id": "7"}}
//! ```
//!
//! answered with every field of `herald.v1.QueryResponse` present
//! ([`query_answer`]), `count` and `users` as JSON numbers:
//!
//! ```json
//! {"online": true, "connections": [{"address": {"worker_id": "w1", "connection_id": "7"},
//!   "user_id": "ana", "groups": ["room-1"], "data": {"k": "v"}, "channels": []}], "count": 1, "users": 0,
//!   "missing_workers": []}
//! ```

use std::collections::{BTreeMap, HashMap};

use base64::Engine;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use bytes::Bytes;
use herald_proto::v1::{
    BindUser, Broadcast, CloseConnections, ConnectionAddress, ConnectionInfo, Content, ControlRequest, ControlResponse,
    ControlResult, GroupChange, HistoryResponse, PublishError, PublishRequest, PublishResponse, PublishResult,
    QueryRequest, QueryResponse, Selection, SetConnectionData, StreamPosition, Target, Totals, content,
    control_request, control_result, publish_result, query_request, selection, target,
};
use serde::Deserialize;
use serde::de::DeserializeOwned;
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

/// `herald.v1.Target`: exactly one kind, and connections to leave out.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetBody {
    broadcast: Option<EmptyObject>,
    connection: Option<ConnectionBody>,
    channel: Option<String>,
    user: Option<String>,
    group: Option<String>,
    #[serde(default)]
    except: Vec<ConnectionBody>,
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

impl From<ConnectionBody> for ConnectionAddress {
    fn from(c: ConnectionBody) -> Self {
        ConnectionAddress { worker_id: c.worker_id, connection_id: c.connection_id }
    }
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

/// A batch of controls, each checked on its own like the entries of a
/// [`BatchBody`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlBatchBody {
    requests: Vec<Value>,
}

/// `herald.v1.ControlRequest`: exactly one op.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlBody {
    bind_user: Option<BindUserBody>,
    unbind_user: Option<ConnectionBody>,
    join_groups: Option<GroupChangeBody>,
    leave_groups: Option<GroupChangeBody>,
    dissolve_group: Option<String>,
    close: Option<CloseBody>,
    set_data: Option<SetDataBody>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BindUserBody {
    connection: ConnectionBody,
    user_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupChangeBody {
    selection: SelectionBody,
    groups: Vec<String>,
}

/// `herald.v1.Selection`: exactly one of a connection or a user.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SelectionBody {
    connection: Option<ConnectionBody>,
    user: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CloseBody {
    selection: SelectionBody,
    #[serde(default)]
    reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetDataBody {
    connection: ConnectionBody,
    #[serde(default)]
    values: HashMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
    #[serde(default)]
    replace: bool,
}

/// `herald.v1.QueryRequest`: exactly one question.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryBody {
    user_online: Option<String>,
    user_connections: Option<String>,
    group_members: Option<String>,
    group_count: Option<String>,
    channel_subscribers: Option<String>,
    channel_count: Option<String>,
    totals: Option<EmptyObject>,
    connection: Option<ConnectionBody>,
}

const TARGET_KINDS: &str = "target needs exactly one of broadcast, connection, channel, user or group";
const CONTROL_OPS: &str =
    "control needs exactly one of bind_user, unbind_user, join_groups, leave_groups, dissolve_group, close or set_data";
const QUERY_QUESTIONS: &str = "query needs exactly one of user_online, user_connections, group_members, group_count, channel_subscribers, \
     channel_count, totals or connection";
const SELECTION_KINDS: &str = "selection needs exactly one of connection or user";

/// The one entry of `given` (the fields that were set, by name), or a
/// refusal saying `needs` (and which fields were set, when too many were).
fn exactly_one<T>(needs: &str, given: Vec<(&'static str, T)>) -> Result<T, ApiError> {
    if given.len() > 1 {
        let names: Vec<&str> = given.iter().map(|(name, _)| *name).collect();
        return Err(ApiError::bad_request(format!("{needs}; got {}", names.join(", "))));
    }
    given.into_iter().next().map(|(_, one)| one).ok_or_else(|| ApiError::bad_request(needs))
}

/// Pushes `(name, convert(value))` onto `given` when the field is set.
fn offer<F, T>(given: &mut Vec<(&'static str, T)>, name: &'static str, field: Option<F>, convert: impl FnOnce(F) -> T) {
    if let Some(value) = field {
        given.push((name, convert(value)));
    }
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

impl TargetBody {
    fn into_target(self) -> Result<Target, ApiError> {
        let mut given = Vec::new();
        offer(&mut given, "broadcast", self.broadcast, |EmptyObject {}| target::Kind::Broadcast(Broadcast {}));
        offer(&mut given, "connection", self.connection, |c| target::Kind::Connection(c.into()));
        offer(&mut given, "channel", self.channel, target::Kind::Channel);
        offer(&mut given, "user", self.user, target::Kind::User);
        offer(&mut given, "group", self.group, target::Kind::Group);
        let kind = exactly_one(TARGET_KINDS, given)?;
        Ok(Target { kind: Some(kind), except: self.except.into_iter().map(Into::into).collect() })
    }
}

impl PublishBody {
    pub fn into_request(self) -> Result<PublishRequest, ApiError> {
        let target = self.target.into_target()?;
        let body = match self.content {
            ContentBody::Text(text) => content::Body::Text(text),
            ContentBody::Binary(b64) => content::Body::Binary(Bytes::from(decode_base64(&b64)?)),
        };
        Ok(PublishRequest {
            target: Some(target),
            content: Some(Content { body: Some(body) }),
            idempotency_key: self.idempotency_key,
            presence_change: None,
        })
    }
}

impl BatchBody {
    /// Each entry as a request, or the reason it is refused (naming its index).
    pub fn into_entries(self) -> Vec<Result<PublishRequest, ApiError>> {
        entries(self.requests, PublishBody::into_request)
    }
}

impl ControlBatchBody {
    /// Each entry as a control, or the reason it is refused (naming its index).
    pub fn into_entries(self) -> Vec<Result<ControlRequest, ApiError>> {
        entries(self.requests, ControlBody::into_request)
    }
}

fn entries<B: DeserializeOwned, R>(
    values: Vec<Value>,
    into_request: impl Fn(B) -> Result<R, ApiError>,
) -> Vec<Result<R, ApiError>> {
    values
        .into_iter()
        .enumerate()
        .map(|(i, entry)| {
            serde_json::from_value::<B>(entry)
                .map_err(|e| ApiError::bad_request(format!("invalid entry: {e}")))
                .and_then(&into_request)
                .map_err(|e| ApiError { message: format!("requests[{i}]: {}", e.message), ..e })
        })
        .collect()
}

impl SelectionBody {
    fn into_selection(self) -> Result<Selection, ApiError> {
        let mut given = Vec::new();
        offer(&mut given, "connection", self.connection, |c| selection::Of::Connection(c.into()));
        offer(&mut given, "user", self.user, selection::Of::User);
        Ok(Selection { of: Some(exactly_one(SELECTION_KINDS, given)?) })
    }
}

impl GroupChangeBody {
    fn into_change(self) -> Result<GroupChange, ApiError> {
        Ok(GroupChange { selection: Some(self.selection.into_selection()?), groups: self.groups })
    }
}

impl ControlBody {
    pub fn into_request(self) -> Result<ControlRequest, ApiError> {
        use control_request::Op;
        let mut given: Vec<(&'static str, Result<Op, ApiError>)> = Vec::new();
        offer(&mut given, "bind_user", self.bind_user, |b| {
            Ok(Op::BindUser(BindUser { connection: Some(b.connection.into()), user_id: b.user_id }))
        });
        offer(&mut given, "unbind_user", self.unbind_user, |c| Ok(Op::UnbindUser(c.into())));
        offer(&mut given, "join_groups", self.join_groups, |g| Ok(Op::JoinGroups(g.into_change()?)));
        offer(&mut given, "leave_groups", self.leave_groups, |g| Ok(Op::LeaveGroups(g.into_change()?)));
        offer(&mut given, "dissolve_group", self.dissolve_group, |g| Ok(Op::DissolveGroup(g)));
        offer(&mut given, "close", self.close, |c| {
            Ok(Op::Close(CloseConnections { selection: Some(c.selection.into_selection()?), reason: c.reason }))
        });
        offer(&mut given, "set_data", self.set_data, |d| {
            Ok(Op::SetData(SetConnectionData {
                connection: Some(d.connection.into()),
                values: d.values,
                remove: d.remove,
                replace: d.replace,
            }))
        });
        Ok(ControlRequest { op: Some(exactly_one(CONTROL_OPS, given)??) })
    }
}

impl QueryBody {
    pub fn into_request(self) -> Result<QueryRequest, ApiError> {
        use query_request::Question;
        let mut given = Vec::new();
        offer(&mut given, "user_online", self.user_online, Question::UserOnline);
        offer(&mut given, "user_connections", self.user_connections, Question::UserConnections);
        offer(&mut given, "group_members", self.group_members, Question::GroupMembers);
        offer(&mut given, "group_count", self.group_count, Question::GroupCount);
        offer(&mut given, "channel_subscribers", self.channel_subscribers, Question::ChannelSubscribers);
        offer(&mut given, "channel_count", self.channel_count, Question::ChannelCount);
        offer(&mut given, "totals", self.totals, |EmptyObject {}| Question::Totals(Totals {}));
        offer(&mut given, "connection", self.connection, |c| Question::Connection(c.into()));
        Ok(QueryRequest { question: Some(exactly_one(QUERY_QUESTIONS, given)?) })
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
    if let Some(position) = &res.position {
        fields.insert("position".into(), position_json(position));
    }
    Value::Object(fields)
}

fn position_json(position: &StreamPosition) -> Value {
    json!({ "offset": position.offset, "epoch": position.epoch })
}

/// The JSON form of `herald.v1.HistoryResponse`: publications oldest first,
/// each with its offset, content (`text`, or `binary` in base64) and
/// storage time (RFC 3339), then the channel's position and whether the
/// publications are all there were after `since`.
pub fn history_answer(res: &HistoryResponse) -> Value {
    let publications: Vec<Value> = res
        .publications
        .iter()
        .map(|p| {
            let content = match p.content.as_ref().and_then(|c| c.body.as_ref()) {
                Some(content::Body::Text(text)) => json!({ "text": text }),
                Some(content::Body::Binary(bytes)) => {
                    json!({ "binary": base64::engine::general_purpose::STANDARD.encode(bytes) })
                }
                None => Value::Null,
            };
            let published_at = p.published_at.map(|t| t.to_string()).unwrap_or_default();
            json!({ "offset": p.offset, "content": content, "published_at": published_at })
        })
        .collect();
    json!({
        "publications": publications,
        "position": position_json(&res.position.clone().unwrap_or_default()),
        "complete": res.complete,
    })
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

/// A control of a batch refused before it reached the broker.
pub fn control_refused(e: &ApiError) -> ControlResult {
    ControlResult {
        outcome: Some(control_result::Outcome::Error(PublishError { code: e.code as u32, message: e.message.clone() })),
    }
}

/// `{"results": [{"done": {…}} or {"error": {"code": …, "message": …}}, …]}`,
/// each `done` as [`control_answer`] gives it.
pub fn control_batch_results(results: &[ControlResult]) -> Value {
    let results: Vec<Value> = results
        .iter()
        .map(|r| match &r.outcome {
            Some(control_result::Outcome::Done(done)) => json!({ "done": control_answer(done) }),
            Some(control_result::Outcome::Error(e)) => json!({ "error": { "code": e.code, "message": e.message } }),
            None => json!({}),
        })
        .collect();
    json!({ "results": results })
}

/// The JSON form of `herald.v1.ControlResponse`, both fields always there:
/// `{"connections": N, "missing_workers": […]}`.
pub fn control_answer(res: &ControlResponse) -> Value {
    json!({ "connections": res.connections, "missing_workers": res.missing_workers })
}

/// The JSON form of `herald.v1.QueryResponse` with every field there
/// whatever the question (`count` and `users` as JSON numbers, not the
/// mapping's strings), and each connection's data sorted by key.
pub fn query_answer(res: &QueryResponse) -> Value {
    let connections: Vec<Value> = res.connections.iter().map(connection_info).collect();
    json!({
        "online": res.online,
        "connections": connections,
        "count": res.count,
        "users": res.users,
        "missing_workers": res.missing_workers,
    })
}

fn connection_info(info: &ConnectionInfo) -> Value {
    let address = info.address.clone().unwrap_or_default();
    let data: BTreeMap<&str, &str> = info.data.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let data: serde_json::Map<String, Value> = data.into_iter().map(|(k, v)| (k.to_owned(), v.into())).collect();
    json!({
        "address": { "worker_id": address.worker_id, "connection_id": address.connection_id },
        "user_id": info.user_id,
        "groups": info.groups,
        "data": data,
        "channels": info.channels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: &str) -> Result<PublishRequest, ApiError> {
        parse_body::<PublishBody>(json.as_bytes())?.into_request()
    }

    fn control(json: &str) -> Result<ControlRequest, ApiError> {
        parse_body::<ControlBody>(json.as_bytes())?.into_request()
    }

    fn query(json: &str) -> Result<QueryRequest, ApiError> {
        parse_body::<QueryBody>(json.as_bytes())?.into_request()
    }

    fn addr(worker_id: &str, connection_id: &str) -> ConnectionAddress {
        ConnectionAddress { worker_id: worker_id.into(), connection_id: connection_id.into() }
    }

    fn op(op: control_request::Op) -> ControlRequest {
        ControlRequest { op: Some(op) }
    }

    fn of_user(user: &str) -> Option<Selection> {
        Some(Selection { of: Some(selection::Of::User(user.into())) })
    }

    fn of_connection(worker_id: &str, connection_id: &str) -> Option<Selection> {
        Some(Selection { of: Some(selection::Of::Connection(addr(worker_id, connection_id))) })
    }

    fn assert_400_one_line(err: &ApiError, body: &str) {
        assert_eq!(err.status, axum::http::StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(err.code, tonic::Code::InvalidArgument, "{body}");
        assert!(!err.message.contains(['\n', '\r']), "{body}: {}", err.message);
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
    fn a_target_names_a_user_or_a_group_and_may_leave_connections_out() {
        let req = request(r#"{"target":{"user":"ana@example.com"},"content":{"text":"hi"}}"#).unwrap();
        assert_eq!(
            req.target.unwrap(),
            Target { kind: Some(target::Kind::User("ana@example.com".into())), except: vec![] }
        );
        let req = request(
            r#"{"target":{"group":"room-1","except":[{"worker_id":"w1","connection_id":"17"},
                {"worker_id":"w2","connection_id":"3"}]},"content":{"text":"hi"}}"#,
        )
        .unwrap();
        let target = req.target.unwrap();
        assert_eq!(target.kind, Some(target::Kind::Group("room-1".into())));
        assert_eq!(target.except, [addr("w1", "17"), addr("w2", "3")]);
        let req = request(r#"{"target":{"except":[],"broadcast":{}},"content":{"text":"hi"}}"#).unwrap();
        assert!(matches!(req.target.unwrap().kind, Some(target::Kind::Broadcast(_))));
    }

    #[test]
    fn a_target_with_no_kind_or_two_is_refused() {
        for (body, reason) in [
            (r#"{"target":{},"content":{"text":"x"}}"#, TARGET_KINDS.to_owned()),
            (
                r#"{"target":{"except":[{"worker_id":"w","connection_id":"1"}]},"content":{"text":"x"}}"#,
                TARGET_KINDS.into(),
            ),
            (
                r#"{"target":{"user":"a","group":"g"},"content":{"text":"x"}}"#,
                format!("{TARGET_KINDS}; got user, group"),
            ),
            (
                r#"{"target":{"broadcast":{},"channel":"news","user":"a"},"content":{"text":"x"}}"#,
                format!("{TARGET_KINDS}; got broadcast, channel, user"),
            ),
        ] {
            let err = request(body).unwrap_err();
            assert_eq!(err.status, axum::http::StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(err.message, reason, "{body}");
        }
        assert_eq!(TARGET_KINDS, "target needs exactly one of broadcast, connection, channel, user or group");
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
            r#"{"target":{"user":7},"content":{"text":"x"}}"#,
            r#"{"target":{"group":"g","except":[{"worker_id":"w"}]},"content":{"text":"x"}}"#,
            r#"{"target":{"group":"g","except":{"worker_id":"w","connection_id":"1"}},"content":{"text":"x"}}"#,
            r#"{"target":{"group":"g","except":[{"worker_id":"w","connection_id":"1","x":0}]},"content":{"text":"x"}}"#,
            r#"{"target":{"group":"g","user":"u"},"content":{"text":"x"}}"#,
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

    #[test]
    fn every_control_op_follows_the_protobuf_json_mapping() {
        use control_request::Op;
        let c = r#"{"worker_id":"w1","connection_id":"7"}"#;
        let cases = [
            (
                format!(r#"{{"bind_user":{{"connection":{c},"user_id":"ana"}}}}"#),
                op(Op::BindUser(BindUser { connection: Some(addr("w1", "7")), user_id: "ana".into() })),
            ),
            (format!(r#"{{"unbind_user":{c}}}"#), op(Op::UnbindUser(addr("w1", "7")))),
            (
                format!(r#"{{"join_groups":{{"selection":{{"connection":{c}}},"groups":["g","h"]}}}}"#),
                op(Op::JoinGroups(GroupChange {
                    selection: of_connection("w1", "7"),
                    groups: vec!["g".into(), "h".into()],
                })),
            ),
            (
                r#"{"leave_groups":{"groups":["g"],"selection":{"user":"ana"}}}"#.to_owned(),
                op(Op::LeaveGroups(GroupChange { selection: of_user("ana"), groups: vec!["g".into()] })),
            ),
            (r#"{"dissolve_group":"g"}"#.to_owned(), op(Op::DissolveGroup("g".into()))),
            (
                r#"{"close":{"selection":{"user":"ana"},"reason":"bye"}}"#.to_owned(),
                op(Op::Close(CloseConnections { selection: of_user("ana"), reason: "bye".into() })),
            ),
            (
                format!(r#"{{"close":{{"selection":{{"connection":{c}}}}}}}"#),
                op(Op::Close(CloseConnections { selection: of_connection("w1", "7"), reason: String::new() })),
            ),
            (
                format!(r#"{{"set_data":{{"connection":{c},"values":{{"k":"v"}},"remove":["k2"],"replace":true}}}}"#),
                op(Op::SetData(SetConnectionData {
                    connection: Some(addr("w1", "7")),
                    values: [("k".to_owned(), "v".to_owned())].into(),
                    remove: vec!["k2".into()],
                    replace: true,
                })),
            ),
            (
                format!(r#"{{"set_data":{{"connection":{c}}}}}"#),
                op(Op::SetData(SetConnectionData { connection: Some(addr("w1", "7")), ..Default::default() })),
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(control(&body).unwrap(), expected, "{body}");
        }
    }

    #[test]
    fn malformed_controls_are_400_with_a_one_line_reason() {
        let c = r#"{"worker_id":"w1","connection_id":"7"}"#;
        let cases = [
            ("".to_owned(), "invalid JSON body"),
            ("[]".to_owned(), "invalid JSON body"),
            ("{}".to_owned(), CONTROL_OPS),
            (r#"{"kick":{}}"#.to_owned(), "unknown field `kick`"),
            (r#"{"dissolve_group":"g","close":{"selection":{"user":"a"}}}"#.to_owned(), "; got dissolve_group, close"),
            (r#"{"dissolve_group":"g","dissolve_group":"h"}"#.to_owned(), "duplicate field `dissolve_group`"),
            (r#"{"dissolve_group":7}"#.to_owned(), "invalid type: integer `7`, expected a string"),
            (r#"{"join_groups":{"groups":["g"]}}"#.to_owned(), "missing field `selection`"),
            (r#"{"join_groups":{"selection":{},"groups":["g"]}}"#.to_owned(), SELECTION_KINDS),
            (
                format!(r#"{{"join_groups":{{"selection":{{"user":"a","connection":{c}}},"groups":["g"]}}}}"#),
                "; got connection, user",
            ),
            (r#"{"join_groups":{"selection":{"user":"a"}}}"#.to_owned(), "missing field `groups`"),
            (r#"{"join_groups":{"selection":{"user":"a"},"groups":"g"}}"#.to_owned(), "invalid type: string"),
            (r#"{"leave_groups":{"selection":{"uid":"a"},"groups":["g"]}}"#.to_owned(), "unknown field `uid`"),
            (r#"{"close":{"reason":"bye"}}"#.to_owned(), "missing field `selection`"),
            (r#"{"close":{"selection":{"user":"a"},"code":4000}}"#.to_owned(), "unknown field `code`"),
            (
                r#"{"bind_user":{"connection":{"worker_id":"w1"},"user_id":"a"}}"#.to_owned(),
                "missing field `connection_id`",
            ),
            (format!(r#"{{"bind_user":{{"connection":{c}}}}}"#), "missing field `user_id`"),
            (r#"{"unbind_user":"w1:7"}"#.to_owned(), "invalid type: string"),
            (format!(r#"{{"set_data":{{"connection":{c},"values":{{"k":1}}}}}}"#), "invalid type: integer `1`"),
            (format!(r#"{{"set_data":{{"connection":{c},"replace":"yes"}}}}"#), "invalid type: string"),
            (r#"{"set_data":{"values":{}}}"#.to_owned(), "missing field `connection`"),
            ("{\"a\nb\":1}".to_owned(), "invalid JSON body"),
        ];
        for (body, reason) in cases {
            let err = control(&body).unwrap_err();
            assert_400_one_line(&err, &body);
            assert!(err.message.contains(reason), "{body}: {}", err.message);
        }
    }

    #[test]
    fn every_query_question_follows_the_protobuf_json_mapping() {
        use query_request::Question;
        let cases = [
            (r#"{"user_online":"ana"}"#, Question::UserOnline("ana".into())),
            (r#"{"user_connections":"ana"}"#, Question::UserConnections("ana".into())),
            (r#"{"group_members":"g"}"#, Question::GroupMembers("g".into())),
            (r#"{"group_count":"g"}"#, Question::GroupCount("g".into())),
            (r#"{"totals":{}}"#, Question::Totals(Totals {})),
            (r#"{"connection":{"worker_id":"w1","connection_id":"7"}}"#, Question::Connection(addr("w1", "7"))),
        ];
        for (body, expected) in cases {
            assert_eq!(query(body).unwrap(), QueryRequest { question: Some(expected) }, "{body}");
        }
    }

    #[test]
    fn malformed_queries_are_400_with_a_one_line_reason() {
        let cases = [
            ("", "invalid JSON body"),
            ("{}", QUERY_QUESTIONS),
            (r#"{"online":"ana"}"#, "unknown field `online`"),
            (r#"{"user_online":"ana","group_count":"g"}"#, "; got user_online, group_count"),
            (r#"{"user_online":["ana"]}"#, "invalid type: sequence"),
            (r#"{"totals":{"x":1}}"#, "unknown field `x`"),
            (r#"{"totals":true}"#, "invalid type: boolean"),
            (r#"{"connection":{"worker_id":"w1"}}"#, "missing field `connection_id`"),
            (r#"{"connection":{"worker_id":"w1","connection_id":7}}"#, "invalid type: integer"),
        ];
        for (body, reason) in cases {
            let err = query(body).unwrap_err();
            assert_400_one_line(&err, body);
            assert!(err.message.contains(reason), "{body}: {}", err.message);
        }
    }

    #[test]
    fn answers_have_every_field_whatever_the_question() {
        let answer = query_answer(&QueryResponse::default());
        assert_eq!(answer, json!({"online": false, "connections": [], "count": 0, "users": 0, "missing_workers": []}));
        let answer = query_answer(&QueryResponse {
            online: true,
            connections: vec![ConnectionInfo {
                address: Some(addr("w1", "7")),
                user_id: "ana".into(),
                groups: vec!["g".into()],
                data: [("b".to_owned(), "2".to_owned()), ("a".to_owned(), "1".to_owned())].into(),
                channels: vec!["chat:a".into()],
            }],
            count: u64::MAX,
            users: 1,
            missing_workers: vec!["w9".into()],
        });
        assert_eq!(
            answer.to_string(),
            r#"{"connections":[{"address":{"connection_id":"7","worker_id":"w1"},"channels":["chat:a"],"data":{"a":"1","b":"2"},"groups":["g"],"user_id":"ana"}],"count":18446744073709551615,"missing_workers":["w9"],"online":true,"users":1}"#
        );
        assert_eq!(control_answer(&ControlResponse::default()), json!({"connections": 0, "missing_workers": []}));
    }
}
