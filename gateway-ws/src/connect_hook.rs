//! The connect hook: an HTTP endpoint of the backend that decides, for each
//! new connection, whether it may open and who is on it (user id, groups,
//! channels), for teams that do not issue JWTs.
//!
//! The gateway POSTs the handshake as JSON:
//! `{"remote_address": "…", "path": "/?…", "headers": {"cookie": "…"}, "client_protocol": ""}`.
//! A 2xx answer lets the connection in, with what its JSON body says:
//! `{"user_id": "…", "groups": ["…"], "channels": ["…"]}` (each optional; an
//! empty body is anonymous). A 401 or 403 refuses it with that status and
//! the body's first line. Anything else (an error status, a malformed
//! body, no answer within the timeout, nobody listening) means the hook is
//! down, and the gateway's policy decides: refuse with 503 (the default), or
//! let the connection in anonymous.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use bytes::Bytes;
use herald_common::http_client::HttpPoster;
use herald_proto::names;
use serde_json::{Value, json};

use crate::config::{ConnectHookConfig, HookDown};
use crate::handshake::Refusal;
use crate::protocol::{Protocol, SUBPROTOCOL};
use crate::registry::Identity;

/// What the hook is told of a handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HookRequest {
    pub(crate) path: String,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) protocol: Protocol,
}

/// The hook's verdict.
#[derive(Debug)]
pub(crate) enum Verdict {
    Accepted(Identity),
    Refused(Refusal),
    /// The hook is down: the policy decided.
    Down {
        reason: String,
        outcome: Result<Identity, Refusal>,
    },
}

/// Asks the hook about one handshake.
pub(crate) async fn ask(
    poster: &HttpPoster,
    config: &ConnectHookConfig,
    peer: SocketAddr,
    request: HookRequest,
) -> Verdict {
    let headers: BTreeMap<String, String> = request.headers.into_iter().collect();
    let body = json!({
        "remote_address": peer.to_string(),
        "path": request.path,
        "headers": headers,
        "client_protocol": match request.protocol { Protocol::Raw => "", Protocol::Json => SUBPROTOCOL },
    });
    let answer = poster.post(Bytes::from(body.to_string()), &[], config.timeout).await;
    let reason = match answer {
        Ok(answer) if (200..300).contains(&answer.status) => match identity(&answer.body) {
            Ok(identity) => return Verdict::Accepted(identity),
            Err(reason) => format!("the connect hook's answer is malformed: {reason}"),
        },
        Ok(answer) if matches!(answer.status, 401 | 403) => {
            let text = String::from_utf8_lossy(&answer.body);
            let line = text.lines().next().unwrap_or_default().trim();
            let line = if line.is_empty() { "refused by the connect hook" } else { line };
            let line: String = line.chars().take(200).collect();
            return Verdict::Refused(Refusal::new(answer.status, line));
        }
        Ok(answer) => format!("the connect hook answered {}", answer.status),
        Err(e) => format!("the connect hook could not be asked: {e}"),
    };
    let outcome = match config.when_down {
        HookDown::Refuse => Err(Refusal::new(503, "the server cannot check connections right now: retry later")),
        HookDown::Anonymous => Ok(Identity::default()),
    };
    Verdict::Down { reason, outcome }
}

/// The identity a 2xx answer gives.
fn identity(body: &[u8]) -> Result<Identity, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Identity::default());
    }
    let Value::Object(mut fields) = serde_json::from_slice(body).map_err(|e| e.to_string())? else {
        return Err("not a JSON object".into());
    };
    let user_id = match fields.remove("user_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(u)) if u.is_empty() => None,
        Some(Value::String(u)) => {
            names::validate_user_id(&u).map_err(|e| format!("user_id: {e}"))?;
            Some(u)
        }
        Some(_) => return Err("user_id must be a string".into()),
    };
    let list = |value: Option<Value>, field: &str| -> Result<Vec<String>, String> {
        match value {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|item| match item {
                    Value::String(s) => Ok(s),
                    _ => Err(format!("{field} must be strings")),
                })
                .collect(),
            Some(_) => Err(format!("{field} must be a list")),
        }
    };
    let groups = list(fields.remove("groups"), "groups")?;
    for group in &groups {
        names::validate_group(group).map_err(|e| format!("groups: {e}"))?;
    }
    let channels = list(fields.remove("channels"), "channels")?;
    Ok(Identity { user_id, groups, channels, ..Identity::default() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_2xx_body_says_who_is_connecting() {
        let who = identity(br#"{"user_id":"ana","groups":["admins"],"channels":["chat:a"]}"#).unwrap();
        assert_eq!(who.user_id.as_deref(), Some("ana"));
        assert_eq!(who.groups, ["admins"]);
        assert_eq!(who.channels, ["chat:a"]);
        assert_eq!(identity(b"").unwrap(), Identity::default());
        assert_eq!(identity(b"{}").unwrap(), Identity::default());
    }

    #[test]
    fn a_malformed_body_is_not_taken_for_an_identity() {
        for bad in [&b"[1]"[..], b"{\"user_id\":5}", b"{\"groups\":\"a\"}", b"{\"groups\":[\"a b\"]}", b"nope"] {
            assert!(identity(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
