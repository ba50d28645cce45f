//! The herald client protocol's JSON form (`proto/herald/v1/client.proto`):
//! reading a client's commands and writing the gateway's replies and pushes.
//! Field names are the `.proto` ones; ids are JSON numbers. Pure functions,
//! no I/O.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use herald_proto::v1::{ChannelPresenceChange, HistoryPublication, StreamPosition, content};
use serde_json::{Map, Value, json};
use tokio_tungstenite::tungstenite::Message;

/// The WebSocket subprotocol a client asks for to speak it.
pub const SUBPROTOCOL: &str = "herald.json.v1";

/// The commands there are, for refusals.
const COMMANDS: &str =
    "connect, subscribe, unsubscribe, publish, refresh, presence, presence_stats, history, send or rpc";

/// Largest command id: ids must survive a JavaScript number.
const MAX_ID: u64 = (1 << 53) - 1;

/// What a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// The classic raw frames: each message's content as it was published.
    Raw,
    /// The client protocol, JSON form.
    Json,
}

/// The documented client error codes (`ClientError.code`).
pub mod code {
    pub const BAD_COMMAND: u32 = 400;
    pub const TOKEN_REFUSED: u32 = 401;
    pub const NOT_ALLOWED: u32 = 403;
    pub const UNKNOWN_NAMESPACE: u32 = 404;
    pub const ALREADY_SUBSCRIBED: u32 = 409;
    pub const NOT_SUBSCRIBED: u32 = 410;
    pub const TOO_LARGE: u32 = 413;
    pub const TOO_MANY_SUBSCRIPTIONS: u32 = 429;
    pub const INTERNAL: u32 = 500;
    pub const UNAVAILABLE: u32 = 503;
    pub const TIMED_OUT: u32 = 504;
}

/// A command a client sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub id: u64,
    pub kind: CommandKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum CommandKind {
    Connect { token: String },
    Subscribe { channel: String, token: Option<String>, recover: Option<StreamPosition> },
    Unsubscribe { channel: String },
    Publish { channel: String, content: content::Body },
    Refresh { token: String },
    Presence { channel: String },
    PresenceStats { channel: String },
    History { channel: String, limit: u32, since: Option<StreamPosition> },
    Send { content: content::Body },
    Rpc { method: String, data: content::Body },
}

/// A frame that is not a command the gateway can run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct BadCommand {
    /// The command's id when it could be read: the refusal is then a reply,
    /// and the connection stays open.
    pub id: Option<u64>,
    pub reason: String,
}

/// What a reply says when its command was carried out.
#[derive(Debug, Clone, PartialEq)]
pub enum Done {
    Subscribed { channel: String, history: Option<Recovery> },
    Unsubscribed { channel: String },
    Published { channel: String },
    Refreshed { expires_at: Option<u64> },
    Presence { channel: String, clients: Vec<Subscriber>, missing_workers: Vec<String> },
    PresenceStats { channel: String, connections: u64, users: u64, missing_workers: Vec<String> },
    History { channel: String, publications: Vec<HistoryPublication>, position: StreamPosition, complete: bool },
    Sent,
    Rpc { data: content::Body },
}

/// What a subscription to a channel with history says of its stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovery {
    /// The channel's position when the subscription took effect.
    pub position: StreamPosition,
    /// Whether the namespace lets a client recover.
    pub recoverable: bool,
    /// Whether `publications` are all that the client missed.
    pub recovered: bool,
    /// The missed publications, oldest first.
    pub publications: Vec<HistoryPublication>,
}

/// One subscriber of a channel, as presence lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscriber {
    pub worker_id: String,
    pub connection_id: String,
    pub user_id: String,
}

/// Reads one text frame as a command.
pub fn parse(text: &str) -> Result<Command, BadCommand> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| BadCommand { id: None, reason: format!("not JSON: {e}") })?;
    let Value::Object(mut fields) = value else {
        return Err(BadCommand { id: None, reason: "a command is a JSON object".into() });
    };
    let id = match fields.remove("id") {
        Some(Value::Number(n)) => n.as_u64().filter(|id| (1..=MAX_ID).contains(id)),
        Some(Value::String(s)) => s.parse().ok().filter(|id| (1..=MAX_ID).contains(id)),
        _ => None,
    }
    .ok_or_else(|| BadCommand { id: None, reason: format!("id must be a whole number from 1 to {MAX_ID}") })?;
    let refuse = |reason: String| BadCommand { id: Some(id), reason };
    let mut commands = fields.into_iter();
    let (Some((name, body)), None) = (commands.next(), commands.next()) else {
        return Err(refuse(format!("give exactly one command: {COMMANDS}")));
    };
    let Value::Object(mut body) = body else {
        // Quoted: a client's key may hold a line break, and a reason is one line.
        return Err(refuse(format!("{name:?} takes an object")));
    };
    let kind = match name.as_str() {
        "subscribe" => {
            let channel = string(&mut body, "channel").map_err(refuse)?;
            let token = optional_string(&mut body, "token").map_err(refuse)?;
            let recover = match body.remove("recover") {
                None | Some(Value::Null | Value::Bool(false)) => false,
                Some(Value::Bool(true)) => true,
                Some(_) => return Err(refuse("recover must be true or false".into())),
            };
            let since = position(body.remove("since")).map_err(refuse)?;
            let recover = match (recover, since) {
                (true, since) => Some(since.unwrap_or_default()),
                (false, None) => None,
                (false, Some(_)) => return Err(refuse("since goes with recover: true".into())),
            };
            CommandKind::Subscribe { channel, token, recover }
        }
        "connect" => CommandKind::Connect { token: string(&mut body, "token").map_err(refuse)? },
        "unsubscribe" => CommandKind::Unsubscribe { channel: string(&mut body, "channel").map_err(refuse)? },
        "publish" => CommandKind::Publish {
            channel: string(&mut body, "channel").map_err(refuse)?,
            content: content_body(body.remove("content")).map_err(refuse)?,
        },
        "refresh" => CommandKind::Refresh { token: string(&mut body, "token").map_err(refuse)? },
        "presence" => CommandKind::Presence { channel: string(&mut body, "channel").map_err(refuse)? },
        "presence_stats" => CommandKind::PresenceStats { channel: string(&mut body, "channel").map_err(refuse)? },
        "history" => CommandKind::History {
            channel: string(&mut body, "channel").map_err(refuse)?,
            limit: match body.remove("limit") {
                None | Some(Value::Null) => 0,
                Some(value) => number(&value)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| refuse("limit must be a whole number".into()))?,
            },
            since: position(body.remove("since")).map_err(refuse)?,
        },
        "send" => CommandKind::Send { content: content_body(body.remove("content")).map_err(refuse)? },
        "rpc" => CommandKind::Rpc {
            method: string(&mut body, "method").map_err(refuse)?,
            data: content_body(body.remove("data")).map_err(|e| refuse(e.replacen("content", "data", 2)))?,
        },
        other => return Err(refuse(format!("unknown command {other:?}: use {COMMANDS}"))),
    };
    if let Some(extra) = body.keys().next() {
        return Err(refuse(format!("{name} has no field {extra:?}")));
    }
    Ok(Command { id, kind })
}

fn string(body: &mut Map<String, Value>, field: &str) -> Result<String, String> {
    optional_string(body, field)?.ok_or_else(|| format!("{field} is required"))
}

fn optional_string(body: &mut Map<String, Value>, field: &str) -> Result<Option<String>, String> {
    match body.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("{field} must be a string")),
    }
}

/// A whole number, given as a JSON number or a string of digits (the
/// protobuf JSON form of 64-bit integers).
fn number(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// `{"offset": <n>, "epoch": "…"}`, both optional.
fn position(value: Option<Value>) -> Result<Option<StreamPosition>, String> {
    let mut fields = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(fields)) => fields,
        Some(_) => return Err(r#"since is {"offset": <n>, "epoch": "…"}"#.into()),
    };
    let offset = match fields.remove("offset") {
        None | Some(Value::Null) => 0,
        Some(value) => number(&value).ok_or("since.offset must be a whole number")?,
    };
    let epoch = optional_string(&mut fields, "epoch").map_err(|e| format!("since.{e}"))?.unwrap_or_default();
    if let Some(extra) = fields.keys().next() {
        return Err(format!("since has no field {extra:?}"));
    }
    Ok(Some(StreamPosition { offset, epoch }))
}

/// `{"text": "…"}` or `{"binary": "<base64>"}`.
fn content_body(value: Option<Value>) -> Result<content::Body, String> {
    let Some(Value::Object(content)) = value else {
        return Err(r#"content is required: {"text": "…"} or {"binary": "<base64>"}"#.into());
    };
    let mut fields = content.into_iter();
    match (fields.next(), fields.next()) {
        (Some((kind, Value::String(s))), None) if kind == "text" => Ok(content::Body::Text(s)),
        (Some((kind, Value::String(s))), None) if kind == "binary" => STANDARD
            .decode(s)
            .map(|bytes| content::Body::Binary(bytes.into()))
            .map_err(|e| format!("content.binary is not base64: {e}")),
        _ => Err(r#"content is one of {"text": "…"} or {"binary": "<base64>"}"#.into()),
    }
}

/// The reply to a command that was carried out.
pub fn reply(id: u64, done: &Done) -> Message {
    let body = match done {
        Done::Subscribed { channel, history: None } => json!({ "subscribed": { "channel": channel } }),
        Done::Subscribed { channel, history: Some(history) } => json!({ "subscribed": {
            "channel": channel,
            "position": position_json(&history.position),
            "recoverable": history.recoverable,
            "recovered": history.recovered,
            "publications": publications_json(channel, &history.publications, &history.position.epoch),
        }}),
        Done::Unsubscribed { channel } => json!({ "unsubscribed": { "channel": channel } }),
        Done::Published { channel } => json!({ "published": { "channel": channel } }),
        Done::Refreshed { expires_at } => json!({ "refreshed": { "expires_at": expires_at.unwrap_or(0) } }),
        Done::Presence { channel, clients, missing_workers } => {
            let clients: Vec<Value> = clients
                .iter()
                .map(|c| json!({ "worker_id": c.worker_id, "connection_id": c.connection_id, "user_id": c.user_id }))
                .collect();
            json!({ "presence": { "channel": channel, "clients": clients, "missing_workers": missing_workers } })
        }
        Done::PresenceStats { channel, connections, users, missing_workers } => json!({ "presence_stats": {
            "channel": channel, "connections": connections, "users": users, "missing_workers": missing_workers,
        }}),
        Done::History { channel, publications, position, complete } => json!({ "history": {
            "channel": channel,
            "publications": publications_json(channel, publications, &position.epoch),
            "position": position_json(position),
            "complete": complete,
        }}),
        Done::Sent => json!({ "sent": {} }),
        Done::Rpc { data } => json!({ "rpc": { "data": content_json(data) } }),
    };
    with_id(id, body)
}

/// The reply to a refused command.
pub fn refusal(id: u64, code: u32, message: &str) -> Message {
    with_id(id, json!({ "error": { "code": code, "message": message } }))
}

fn with_id(id: u64, mut body: Value) -> Message {
    if let Value::Object(fields) = &mut body {
        fields.insert("id".into(), id.into());
    }
    Message::text(body.to_string())
}

/// The first message of a connection: its address. A push, or the reply
/// to its `connect` command (`reply_to`).
pub fn connected(reply_to: Option<u64>, worker_id: &str, connection_id: u64, user_id: Option<&str>) -> Message {
    let body = json!({ "connected": {
        "worker_id": worker_id,
        "connection_id": connection_id.to_string(),
        "user_id": user_id.unwrap_or_default(),
    }});
    match reply_to {
        Some(id) => with_id(id, body),
        None => Message::text(body.to_string()),
    }
}

/// A publication to `channel`, for its subscribers, with its place in the
/// channel's history when it has one.
pub fn publication(channel: &str, body: &content::Body, position: Option<&StreamPosition>) -> Message {
    Message::text(json!({ "publication": publication_json(channel, body, position) }).to_string())
}

fn publication_json(channel: &str, body: &content::Body, position: Option<&StreamPosition>) -> Value {
    let mut publication = json!({ "channel": channel, "content": content_json(body) });
    if let (Some(position), Value::Object(fields)) = (position, &mut publication) {
        fields.insert("offset".into(), position.offset.into());
        fields.insert("epoch".into(), position.epoch.clone().into());
    }
    publication
}

fn publications_json(channel: &str, publications: &[HistoryPublication], epoch: &str) -> Vec<Value> {
    publications
        .iter()
        .filter_map(|p| {
            let body = p.content.as_ref()?.body.as_ref()?;
            let position = StreamPosition { offset: p.offset, epoch: epoch.to_owned() };
            Some(publication_json(channel, body, Some(&position)))
        })
        .collect()
}

fn position_json(position: &StreamPosition) -> Value {
    json!({ "offset": position.offset, "epoch": position.epoch })
}

/// A join or leave push for the subscribers of `channel`.
pub fn presence_change(channel: &str, change: &ChannelPresenceChange) -> Message {
    let address = change.address.clone().unwrap_or_default();
    let kind = if change.joined { "join" } else { "leave" };
    let info =
        json!({ "worker_id": address.worker_id, "connection_id": address.connection_id, "user_id": change.user_id });
    Message::text(json!({ kind: { "channel": channel, "info": info } }).to_string())
}

/// The push that ends delivery of a channel whose stream went stale: the
/// client must subscribe again, recovering from its last position.
pub fn resubscribe(channel: &str) -> Message {
    let push = json!({ "unsubscribed": {
        "channel": channel,
        "resubscribe": true,
        "reason": "a publication was missed: subscribe again with recover",
    }});
    Message::text(push.to_string())
}

/// A message sent to connections directly, for those speaking the client
/// protocol, from the raw frame the others get.
pub fn direct(raw: &Message) -> Option<Message> {
    let content = match raw {
        Message::Text(text) => json!({ "text": text.as_str() }),
        Message::Binary(bytes) => json!({ "binary": STANDARD.encode(bytes) }),
        _ => return None,
    };
    Some(Message::text(json!({ "message": { "content": content } }).to_string()))
}

fn content_json(body: &content::Body) -> Value {
    match body {
        content::Body::Text(text) => json!({ "text": text }),
        content::Body::Binary(bytes) => json!({ "binary": STANDARD.encode(bytes) }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(message: &Message) -> Value {
        serde_json::from_str(message.to_text().unwrap()).unwrap()
    }

    #[test]
    fn commands_are_read_with_their_id() {
        let c = parse(r#"{"id":1,"subscribe":{"channel":"chat:a"}}"#).unwrap();
        assert_eq!(
            c,
            Command { id: 1, kind: CommandKind::Subscribe { channel: "chat:a".into(), token: None, recover: None } }
        );
        let c = parse(r#"{"id":"2","subscribe":{"channel":"chat:a","token":"t"}}"#).unwrap();
        assert_eq!(c.kind, CommandKind::Subscribe { channel: "chat:a".into(), token: Some("t".into()), recover: None });
        let c = parse(r#"{"id":2,"subscribe":{"channel":"f:a","recover":true,"since":{"offset":"9","epoch":"e"}}}"#);
        let since = StreamPosition { offset: 9, epoch: "e".into() };
        assert_eq!(
            c.unwrap().kind,
            CommandKind::Subscribe { channel: "f:a".into(), token: None, recover: Some(since) }
        );
        let c = parse(r#"{"id":2,"subscribe":{"channel":"f:a","recover":true}}"#).unwrap();
        let from_the_start = Some(StreamPosition::default());
        assert_eq!(c.kind, CommandKind::Subscribe { channel: "f:a".into(), token: None, recover: from_the_start });
        let c = parse(r#"{"id":8,"history":{"channel":"f:a","limit":10,"since":{"offset":3,"epoch":"e"}}}"#).unwrap();
        let since = Some(StreamPosition { offset: 3, epoch: "e".into() });
        assert_eq!(c.kind, CommandKind::History { channel: "f:a".into(), limit: 10, since });
        let c = parse(r#"{"id":3,"publish":{"channel":"chat:a","content":{"binary":"aGk="}}}"#).unwrap();
        assert_eq!(
            c.kind,
            CommandKind::Publish { channel: "chat:a".into(), content: content::Body::Binary("hi".into()) }
        );
        let c = parse(r#"{"unsubscribe":{"channel":"chat:a"},"id":4}"#).unwrap();
        assert_eq!(c, Command { id: 4, kind: CommandKind::Unsubscribe { channel: "chat:a".into() } });
        assert_eq!(
            parse(r#"{"id":5,"refresh":{"token":"t"}}"#).unwrap().kind,
            CommandKind::Refresh { token: "t".into() }
        );
        let c = parse(r#"{"id":9,"connect":{"token":"t"}}"#).unwrap();
        assert_eq!(c, Command { id: 9, kind: CommandKind::Connect { token: "t".into() } });
        assert_eq!(text(&connected(Some(9), "w1", 42, None))["id"], 9, "connected answers a connect");
        let c = parse(r#"{"id":6,"presence":{"channel":"chat:a"}}"#).unwrap();
        assert_eq!(c.kind, CommandKind::Presence { channel: "chat:a".into() });
        let c = parse(r#"{"id":7,"presence_stats":{"channel":"chat:a"}}"#).unwrap();
        assert_eq!(c.kind, CommandKind::PresenceStats { channel: "chat:a".into() });
        let c = parse(r#"{"id":10,"send":{"content":{"text":"hello"}}}"#).unwrap();
        assert_eq!(c.kind, CommandKind::Send { content: content::Body::Text("hello".into()) });
        let c = parse(r#"{"id":11,"rpc":{"method":"profile.get","data":{"text":"{}"}}}"#).unwrap();
        assert_eq!(c.kind, CommandKind::Rpc { method: "profile.get".into(), data: content::Body::Text("{}".into()) });
        let missing = parse(r#"{"id":12,"rpc":{"method":"m"}}"#).unwrap_err();
        assert!(missing.reason.starts_with("data is required"), "{}", missing.reason);
    }

    #[test]
    fn send_and_rpc_replies_carry_what_was_done() {
        assert_eq!(text(&reply(3, &Done::Sent)), json!({ "id": 3, "sent": {} }));
        let answered = reply(4, &Done::Rpc { data: content::Body::Binary(vec![1, 2].into()) });
        assert_eq!(text(&answered), json!({ "id": 4, "rpc": { "data": { "binary": "AQI=" } } }));
    }

    #[test]
    fn a_frame_without_a_readable_id_cannot_be_answered() {
        for bad in [
            "hello",
            "[1]",
            r#"{"subscribe":{"channel":"c:a"}}"#,
            r#"{"id":0,"subscribe":{}}"#,
            r#"{"id":-1}"#,
            r#"{"id":9007199254740992}"#,
        ] {
            assert_eq!(parse(bad).unwrap_err().id, None, "{bad}");
        }
    }

    #[test]
    fn a_malformed_command_with_an_id_is_refused_by_a_reply() {
        let cases = [
            (r#"{"id":7}"#, "give exactly one command"),
            (r#"{"id":7,"subscribe":{},"unsubscribe":{}}"#, "give exactly one command"),
            (r#"{"id":7,"subscribe":"chat:a"}"#, "\"subscribe\" takes an object"),
            (r#"{"id":7,"a\nb":2}"#, "\"a\\nb\" takes an object"),
            (r#"{"id":7,"subscribe":{}}"#, "channel is required"),
            (r#"{"id":7,"subscribe":{"channel":1}}"#, "channel must be a string"),
            (r#"{"id":7,"subscribe":{"channel":"c:a","offset":3}}"#, "subscribe has no field \"offset\""),
            (r#"{"id":7,"publish":{"channel":"c:a"}}"#, "content is required"),
            (r#"{"id":7,"publish":{"channel":"c:a","content":{"binary":"!!"}}}"#, "not base64"),
            (r#"{"id":7,"publish":{"channel":"c:a","content":{"text":"a","binary":""}}}"#, "content is one of"),
            (r#"{"id":7,"history":{"channel":"c:a","limit":-1}}"#, "limit must be a whole number"),
            (r#"{"id":7,"history":{"channel":"c:a","since":3}}"#, "since is {"),
            (r#"{"id":7,"history":{"channel":"c:a","since":{"offset":1.5}}}"#, "since.offset must be a whole number"),
            (r#"{"id":7,"history":{"channel":"c:a","since":{"epoch":1}}}"#, "since.epoch must be a string"),
            (r#"{"id":7,"history":{"channel":"c:a","since":{"top":1}}}"#, "since has no field \"top\""),
            (r#"{"id":7,"subscribe":{"channel":"c:a","recover":"yes"}}"#, "recover must be true or false"),
            (r#"{"id":7,"subscribe":{"channel":"c:a","since":{"offset":1}}}"#, "since goes with recover: true"),
            (r#"{"id":7,"unknown":{}}"#, "unknown command \"unknown\": use connect, subscribe"),
        ];
        for (frame, reason) in cases {
            let e = parse(frame).unwrap_err();
            assert_eq!(e.id, Some(7), "{frame}");
            assert!(e.reason.contains(reason), "{frame}: {}", e.reason);
            assert!(!e.reason.contains('\n'), "{frame}: the reason is not one line");
        }
    }

    #[test]
    fn replies_and_pushes_are_json_with_the_proto_field_names() {
        let done = reply(3, &Done::Subscribed { channel: "chat:a".into(), history: None });
        assert_eq!(text(&done), json!({"id": 3, "subscribed": {"channel": "chat:a"}}));
        assert_eq!(
            text(&refusal(4, code::NOT_ALLOWED, "no")),
            json!({"id": 4, "error": {"code": 403, "message": "no"}})
        );
        let ana = Subscriber { worker_id: "w1".into(), connection_id: "7".into(), user_id: "ana".into() };
        let presence =
            Done::Presence { channel: "chat:a".into(), clients: vec![ana], missing_workers: vec!["w9".into()] };
        assert_eq!(
            text(&reply(5, &presence)),
            json!({"id": 5, "presence": {"channel": "chat:a", "missing_workers": ["w9"],
                "clients": [{"worker_id": "w1", "connection_id": "7", "user_id": "ana"}]}})
        );
        let stats = Done::PresenceStats { channel: "chat:a".into(), connections: 3, users: 2, missing_workers: vec![] };
        assert_eq!(
            text(&reply(6, &stats)),
            json!({"id": 6, "presence_stats": {"channel": "chat:a", "connections": 3, "users": 2, "missing_workers": []}})
        );
        assert_eq!(
            text(&connected(None, "w1", 42, Some("ana"))),
            json!({"connected": {"worker_id": "w1", "connection_id": "42", "user_id": "ana"}})
        );
        let p = publication("chat:a", &content::Body::Text("hi \"you\"".into()), None);
        assert_eq!(text(&p), json!({"publication": {"channel": "chat:a", "content": {"text": "hi \"you\""}}}));
        let d = direct(&Message::Binary(vec![0u8, 255].into())).unwrap();
        assert_eq!(text(&d), json!({"message": {"content": {"binary": "AP8="}}}));
        assert_eq!(direct(&Message::Ping(Default::default())), None);
    }

    #[test]
    fn publications_with_history_carry_their_offset_and_epoch() {
        let at = |offset| StreamPosition { offset, epoch: "e1".into() };
        let p = publication("feed:a", &content::Body::Text("x".into()), Some(&at(7)));
        assert_eq!(
            text(&p),
            json!({"publication": {"channel": "feed:a", "content": {"text": "x"}, "offset": 7, "epoch": "e1"}})
        );
        let stored = |offset: u64| HistoryPublication {
            offset,
            content: Some(herald_proto::v1::Content { body: Some(content::Body::Text(offset.to_string())) }),
            published_at: None,
        };
        let recovery = Recovery { position: at(9), recoverable: true, recovered: true, publications: vec![stored(9)] };
        let done = Done::Subscribed { channel: "feed:a".into(), history: Some(recovery) };
        assert_eq!(
            text(&reply(2, &done)),
            json!({"id": 2, "subscribed": {"channel": "feed:a", "position": {"offset": 9, "epoch": "e1"},
                "recoverable": true, "recovered": true, "publications": [
                    {"channel": "feed:a", "content": {"text": "9"}, "offset": 9, "epoch": "e1"}]}})
        );
        let done =
            Done::History { channel: "feed:a".into(), publications: vec![stored(8)], position: at(9), complete: false };
        assert_eq!(
            text(&reply(3, &done)),
            json!({"id": 3, "history": {"channel": "feed:a", "position": {"offset": 9, "epoch": "e1"},
                "complete": false, "publications": [
                    {"channel": "feed:a", "content": {"text": "8"}, "offset": 8, "epoch": "e1"}]}})
        );
    }
}
