//! The WebSocket opening handshake (RFC 6455 §4.2), done by the gateway
//! itself so that every refusal is an HTTP response with a status and a
//! one-line reason (tungstenite's own handshake closes the socket without a
//! word), and so that the origin and capacity checks come before anything
//! else. Once the 101 answer is written, tungstenite takes the socket over
//! for framing.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::client_auth::TokenRejection;
use crate::config::GatewayConfig;
use crate::connect_hook::HookRequest;
use crate::protocol::{Protocol, SUBPROTOCOL};
use crate::registry::Identity;

/// Largest request head accepted, in bytes.
const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most header fields in a request head.
const MAX_HEADERS: usize = 64;
/// The only WebSocket version there is.
const WEBSOCKET_VERSION: &str = "13";

/// A request that may be upgraded.
#[derive(Debug)]
pub(crate) struct Upgrade {
    /// The `Sec-WebSocket-Accept` value that answers the client's key.
    accept: String,
    /// Bytes the client sent after its request head (its first frames).
    pub(crate) tail: Vec<u8>,
    /// Who the client is, from its token (anonymous without client auth);
    /// `None` for a client-protocol client that gives its token in a
    /// `connect` command instead, as its first frame.
    pub(crate) identity: Option<Identity>,
    /// What it speaks: the client protocol when it asked for it.
    pub(crate) protocol: Protocol,
    /// Handshake headers for the connect event (those configured), by
    /// lower-case name.
    pub(crate) event_headers: Vec<(String, String)>,
    /// What the connect hook is asked, when there is one.
    pub(crate) hook: Option<HookRequest>,
}

/// Why a request is not upgraded: the HTTP answer it gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) status: u16,
    pub(crate) reason: String,
    /// Header lines (`Name: value`) the answer carries besides the usual ones.
    headers: Vec<&'static str>,
    /// For a refused token: why, as a metric label.
    pub(crate) token_rejection: Option<&'static str>,
}

impl Refusal {
    pub(crate) fn new(status: u16, reason: impl Into<String>) -> Self {
        Self { status, reason: reason.into(), headers: Vec::new(), token_rejection: None }
    }

    fn unauthorized(label: &'static str, reason: String) -> Self {
        Self {
            token_rejection: Some(label),
            ..Self::new(401, reason).with_header(r#"WWW-Authenticate: Bearer realm="herald""#)
        }
    }

    fn with_header(mut self, header: &'static str) -> Self {
        self.headers.push(header);
        self
    }

    /// The whole HTTP answer: status, headers and the reason as the body.
    fn response(&self) -> String {
        herald_common::http::plain_answer(self.status, &self.reason, &self.headers)
    }
}

/// Reads the request head and decides: upgrade, or refuse. `at_capacity`
/// says whether the gateway holds all the connections it may.
pub(crate) async fn read_request<S>(
    stream: &mut S,
    config: &GatewayConfig,
    at_capacity: bool,
) -> Result<Upgrade, Refusal>
where
    S: AsyncRead + Unpin,
{
    let mut buf = Vec::with_capacity(1024);
    let head_len = loop {
        if let Some(end) = find_head_end(&buf) {
            break end;
        }
        if buf.len() >= MAX_HEAD_BYTES {
            return Err(Refusal::new(431, format!("request head over {MAX_HEAD_BYTES} bytes")));
        }
        let mut chunk = [0u8; 1024];
        let read = stream.read(&mut chunk).await.map_err(|e| Refusal::new(400, format!("reading the request: {e}")))?;
        if read == 0 {
            return Err(Refusal::new(400, "connection closed before the end of the request head"));
        }
        buf.extend_from_slice(&chunk[..read]);
    };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(&buf[..head_len]) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(Refusal::new(400, "malformed HTTP request head")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::new(431, format!("more than {MAX_HEADERS} header fields")));
        }
        Err(e) => return Err(Refusal::new(400, format!("malformed HTTP request: {e}"))),
    }
    let key = check(&request, config, at_capacity)?;
    let protocol = negotiate(&request);
    let identity = authenticate(&request, config, protocol)?;
    let accept = derive_accept_key(key.as_bytes());
    let event_headers =
        joined_headers(&request, |name| config.event_headers.iter().any(|kept| name.eq_ignore_ascii_case(kept)));
    let hook = config.connect_hook.as_ref().map(|_| HookRequest {
        path: request.path.unwrap_or("/").to_owned(),
        headers: joined_headers(&request, |_| true),
        protocol,
    });
    Ok(Upgrade { accept, tail: buf.split_off(head_len), identity, protocol, event_headers, hook })
}

/// The request's headers whose names `keep` takes, by lower-case name, in
/// the order they first appear; a repeated header's values are joined with
/// ", ", as HTTP allows.
fn joined_headers(request: &httparse::Request<'_, '_>, keep: impl Fn(&str) -> bool) -> Vec<(String, String)> {
    let mut joined: Vec<(String, String)> = Vec::new();
    for header in request.headers.iter().filter(|h| keep(h.name)) {
        let name = header.name.to_ascii_lowercase();
        let value = String::from_utf8_lossy(header.value);
        match joined.iter_mut().find(|(seen, _)| *seen == name) {
            Some((_, values)) => {
                values.push_str(", ");
                values.push_str(&value);
            }
            None => joined.push((name, value.into_owned())),
        }
    }
    joined
}

/// The client protocol when the client lists it in `Sec-WebSocket-Protocol`;
/// the raw classic frames otherwise (other subprotocols are not spoken, and
/// the answer then names none, as RFC 6455 §4.2.2 allows).
fn negotiate(request: &httparse::Request<'_, '_>) -> Protocol {
    let asked = request
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-protocol"))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == SUBPROTOCOL);
    if asked { Protocol::Json } else { Protocol::Raw }
}

/// Who the client is: with client auth on, the token it gives as
/// `Authorization: Bearer <jwt>` or, for browsers (which cannot set
/// headers on a WebSocket), as `?token=<jwt>`, checked; without, nobody.
/// A client speaking the client protocol may give none here and send it in
/// a `connect` command (`None`), keeping it out of URLs and logs.
fn authenticate(
    request: &httparse::Request<'_, '_>,
    config: &GatewayConfig,
    protocol: Protocol,
) -> Result<Option<Identity>, Refusal> {
    let Some(auth) = &config.client_auth else {
        return Ok(Some(Identity::default()));
    };
    let header = request
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("authorization"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .and_then(herald_common::auth::bearer_token)
        .map(str::to_owned);
    let token = header.or_else(|| query_param(request.path.unwrap_or("/"), "token"));
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        if protocol == Protocol::Json {
            return Ok(None);
        }
        return Err(Refusal::unauthorized(
            "missing",
            "a token is required: send 'Authorization: Bearer <jwt>' or connect with ?token=<jwt>".into(),
        ));
    };
    match auth.verify(&token, crate::client_auth::unix_now()) {
        Ok(identity) => Ok(Some(identity.into())),
        Err(rejection) => Err(Refusal::unauthorized(rejection.label(), rejection.to_string())),
    }
}

/// Every metric label of a refused token.
pub(crate) const TOKEN_REFUSALS: [&str; TokenRejection::LABELS.len() + 1] = {
    let mut labels = ["missing"; TokenRejection::LABELS.len() + 1];
    let mut i = 0;
    while i < TokenRejection::LABELS.len() {
        labels[i + 1] = TokenRejection::LABELS[i];
        i += 1;
    }
    labels
};

/// The percent-decoded value of parameter `name` in a request target's query.
fn query_param(target: &str, name: &str) -> Option<String> {
    let query = target.split_once('?')?.1;
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then(|| percent_decode(value))
    })
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push(u8::try_from(hi * 16 + lo).unwrap_or(b'?'));
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Checks an upgrade request; returns its `Sec-WebSocket-Key`.
fn check(request: &httparse::Request<'_, '_>, config: &GatewayConfig, at_capacity: bool) -> Result<String, Refusal> {
    let values = |name: &str| -> Vec<&str> {
        request
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| std::str::from_utf8(h.value).unwrap_or("\u{fffd}").trim())
            .collect()
    };
    let has_token = |name: &str, token: &str| {
        values(name).iter().flat_map(|v| v.split(',')).any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if request.method != Some("GET") {
        return Err(Refusal::new(405, "a WebSocket upgrade is a GET request").with_header("Allow: GET"));
    }
    if request.version != Some(1) {
        return Err(Refusal::new(400, "a WebSocket upgrade needs HTTP/1.1"));
    }
    if !has_token("upgrade", "websocket") {
        return Err(Refusal::new(426, "this is a WebSocket endpoint: send 'Upgrade: websocket'")
            .with_header("Upgrade: websocket")
            .with_header("Connection: Upgrade"));
    }
    if !has_token("connection", "upgrade") {
        return Err(Refusal::new(400, "'Connection: Upgrade' is missing"));
    }
    if values("sec-websocket-version") != [WEBSOCKET_VERSION] {
        return Err(Refusal::new(426, "unsupported WebSocket version: use 13").with_header("Sec-WebSocket-Version: 13"));
    }
    let key = match values("sec-websocket-key")[..] {
        [key] if STANDARD.decode(key).is_ok_and(|k| k.len() == 16) => key.to_owned(),
        [] => return Err(Refusal::new(400, "'Sec-WebSocket-Key' is missing")),
        _ => return Err(Refusal::new(400, "'Sec-WebSocket-Key' is not one base64-encoded 16-byte value")),
    };
    match values("origin")[..] {
        [] if !config.allowed_origins.is_empty() && !config.allow_missing_origin => {
            return Err(Refusal::new(403, "an Origin header is required"));
        }
        [] => {}
        [origin] if !config.origin_allowed(origin) => return Err(Refusal::new(403, "origin not allowed")),
        [_] => {}
        _ => return Err(Refusal::new(400, "more than one Origin header")),
    }
    if at_capacity {
        return Err(Refusal::new(503, "too many connections on this gateway"));
    }
    Ok(key)
}

/// Where the request head ends (just past its blank line), if it has.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Writes the 101 answer that completes an upgrade.
pub(crate) async fn accept<S: AsyncWrite + Unpin>(stream: &mut S, upgrade: &Upgrade) -> std::io::Result<()> {
    let subprotocol = match upgrade.protocol {
        Protocol::Json => format!("Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n"),
        Protocol::Raw => String::new(),
    };
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {}\r\n{subprotocol}\r\n",
        upgrade.accept
    );
    stream.write_all(response.as_bytes()).await?;
    stream.flush().await
}

/// Writes a refusal, then shuts the sending side so the client reads it whole.
pub(crate) async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, refusal: &Refusal) {
    if stream.write_all(refusal.response().as_bytes()).await.is_ok() {
        let _ = stream.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client_auth::{ClientAuth, ClientAuthConfig};

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    async fn decide(head: &str, config: &GatewayConfig) -> Result<Upgrade, Refusal> {
        read_request(&mut head.as_bytes(), config, false).await
    }

    fn upgrade_request(extra: &str) -> String {
        format!(
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n{extra}\r\n"
        )
    }

    #[tokio::test]
    async fn the_headers_passed_on_are_chosen_by_name_and_a_repeated_one_is_joined() {
        let config = GatewayConfig { event_headers: vec!["x-multi".into()], ..GatewayConfig::new("w".into()) };
        let upgrade = decide(&upgrade_request("X-Multi: a\r\nUser-Agent: t\r\nx-multi: b\r\n"), &config).await.unwrap();
        assert_eq!(upgrade.event_headers, [("x-multi".to_owned(), "a, b".to_owned())]);
        assert!(upgrade.hook.is_none(), "no hook, nothing gathered for it");
    }

    #[tokio::test]
    async fn a_proper_upgrade_is_accepted_with_the_rfc_accept_key() {
        let upgrade = decide(&(upgrade_request("") + "early"), &GatewayConfig::new("w".into())).await.unwrap();
        assert_eq!(upgrade.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", "RFC 6455's own example");
        assert_eq!(upgrade.tail, b"early");
        assert_eq!(upgrade.protocol, Protocol::Raw);
    }

    #[tokio::test]
    async fn the_client_protocol_is_spoken_when_asked_for_among_others() {
        let config = GatewayConfig::new("w".into());
        let asked = upgrade_request("Sec-WebSocket-Protocol: chat, herald.json.v1\r\n");
        let upgrade = decide(&asked, &config).await.unwrap();
        assert_eq!(upgrade.protocol, Protocol::Json);
        let mut answer = Vec::new();
        accept(&mut answer, &upgrade).await.unwrap();
        let answer = String::from_utf8(answer).unwrap();
        assert!(answer.contains("\r\nSec-WebSocket-Protocol: herald.json.v1\r\n"), "{answer}");
        let other = decide(&upgrade_request("Sec-WebSocket-Protocol: mqtt\r\n"), &config).await.unwrap();
        assert_eq!(other.protocol, Protocol::Raw);
        let mut answer = Vec::new();
        accept(&mut answer, &other).await.unwrap();
        assert!(!String::from_utf8(answer).unwrap().contains("Sec-WebSocket-Protocol"), "no subprotocol named");
    }

    #[tokio::test]
    async fn each_malformed_upgrade_gets_its_status_and_reason() {
        let config = GatewayConfig::new("w".into());
        let cases = [
            (upgrade_request("").replace("GET", "POST"), 405),
            (upgrade_request("").replace("HTTP/1.1", "HTTP/1.0"), 400),
            (upgrade_request("").replace("Upgrade: websocket\r\n", ""), 426),
            (upgrade_request("").replace("keep-alive, Upgrade", "keep-alive"), 400),
            (upgrade_request("").replace("Version: 13", "Version: 8"), 426),
            (upgrade_request("").replace(&format!("Sec-WebSocket-Key: {KEY}\r\n"), ""), 400),
            (upgrade_request("").replace(KEY, "not-a-key"), 400),
            (upgrade_request(&format!("Sec-WebSocket-Key: {KEY}\r\n")), 400),
            ("GET /\r\n\r\n".to_owned(), 400),
            (upgrade_request(&"X-Filler: y\r\n".repeat(MAX_HEADERS)), 431),
            (upgrade_request(&format!("X-Big: {}\r\n", "y".repeat(MAX_HEAD_BYTES))), 431),
        ];
        for (head, status) in cases {
            let refusal = decide(&head, &config).await.unwrap_err();
            assert_eq!(refusal.status, status, "{head:?}: {refusal:?}");
            let response = refusal.response();
            assert!(response.ends_with(&format!("\r\n\r\n{}\n", refusal.reason)), "{response}");
            assert!(!refusal.reason.contains('\n'));
        }
        let refusal = decide(&upgrade_request("").replace("Version: 13", "Version: 8"), &config).await.unwrap_err();
        assert!(refusal.response().contains("\r\nSec-WebSocket-Version: 13\r\n"));
    }

    #[tokio::test]
    async fn with_an_allow_list_the_origin_must_be_there_once_and_allowed() {
        let config =
            GatewayConfig { allowed_origins: vec!["https://app.example".into()], ..GatewayConfig::new("w".into()) };
        let origin = |o: &str| format!("Origin: {o}\r\n");
        assert!(decide(&upgrade_request(&origin("https://app.example")), &config).await.is_ok());
        let status = |r: Result<Upgrade, Refusal>| r.unwrap_err().status;
        assert_eq!(status(decide(&upgrade_request(&origin("https://evil.example")), &config).await), 403);
        assert_eq!(status(decide(&upgrade_request(""), &config).await), 403);
        let twice = origin("https://app.example") + &origin("https://evil.example");
        assert_eq!(status(decide(&upgrade_request(&twice), &config).await), 400);
        let lenient = GatewayConfig { allow_missing_origin: true, ..config };
        assert!(decide(&upgrade_request(""), &lenient).await.is_ok(), "non-browser clients, when allowed");
    }

    fn with_jwt_auth() -> GatewayConfig {
        let auth = ClientAuthConfig { hs256_secrets: vec![SECRET.into()], ..ClientAuthConfig::default() };
        GatewayConfig {
            client_auth: Some(std::sync::Arc::new(ClientAuth::new(auth).unwrap())),
            ..GatewayConfig::new("w".into())
        }
    }

    const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";

    fn token(claims: &serde_json::Value) -> String {
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), claims, &key).unwrap()
    }

    #[tokio::test]
    async fn with_client_auth_a_token_in_the_header_or_the_query_says_who_connects() {
        let config = with_jwt_auth();
        let jwt = token(&serde_json::json!({"sub": "ana", "groups": ["room"], "exp": 4_000_000_000u64}));
        let by_header = decide(&upgrade_request(&format!("Authorization: Bearer {jwt}\r\n")), &config).await.unwrap();
        let identity = by_header.identity.unwrap();
        assert_eq!(identity.user_id.as_deref(), Some("ana"));
        assert_eq!(identity.groups, ["room"]);
        assert_eq!(identity.expires_at, Some(4_000_000_000));
        let by_query = upgrade_request("").replace("GET / ", &format!("GET /?x=1&token={jwt} "));
        assert_eq!(decide(&by_query, &config).await.unwrap().identity.unwrap().user_id.as_deref(), Some("ana"));
        let speaking = upgrade_request("Sec-WebSocket-Protocol: herald.json.v1\r\n");
        assert_eq!(decide(&speaking, &config).await.unwrap().identity, None, "the client protocol may connect later");
    }

    #[tokio::test]
    async fn with_client_auth_a_missing_or_bad_token_is_refused_with_401_and_a_reason() {
        let config = with_jwt_auth();
        let expired = token(&serde_json::json!({"sub": "ana", "exp": 1}));
        let cases = [
            (upgrade_request(""), "missing"),
            (upgrade_request("Authorization: Bearer not.a.jwt\r\n"), "malformed"),
            (upgrade_request(&format!("Authorization: Bearer {expired}\r\n")), "expired"),
        ];
        for (head, label) in cases {
            let refusal = decide(&head, &config).await.unwrap_err();
            assert_eq!((refusal.status, refusal.token_rejection), (401, Some(label)), "{refusal:?}");
            assert!(refusal.response().contains("WWW-Authenticate: Bearer"), "{}", refusal.response());
        }
        assert!(TOKEN_REFUSALS.contains(&"missing") && TOKEN_REFUSALS.contains(&"bad_signature"));
    }

    #[tokio::test]
    async fn without_client_auth_connections_stay_anonymous() {
        let upgrade = decide(&upgrade_request(""), &GatewayConfig::new("w".into())).await.unwrap();
        assert_eq!(upgrade.identity, Some(Identity::default()));
    }

    #[test]
    fn query_parameters_are_percent_decoded() {
        assert_eq!(query_param("/?a=1&token=x%2Ey+z", "token").as_deref(), Some("x.y z"));
        assert_eq!(query_param("/?tokens=1", "token"), None);
        assert_eq!(query_param("/", "token"), None);
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[tokio::test]
    async fn a_full_gateway_answers_503() {
        let refusal =
            read_request(&mut upgrade_request("").as_bytes(), &GatewayConfig::new("w".into()), true).await.unwrap_err();
        assert_eq!(refusal.status, 503);
    }
}
