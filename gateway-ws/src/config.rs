//! What a gateway is told at start: its worker id, its greeting and its
//! limits, each with a `DEFAULT_*` constant that the command line takes as
//! its default.

use std::sync::Arc;
use std::time::Duration;

use crate::client_auth::ClientAuth;
use herald_common::namespaces::Namespaces;

/// Most connections held at once, by default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;
/// Most distinct client channels with a subscriber on one gateway, by default.
pub const DEFAULT_MAX_CLIENT_CHANNELS: usize = 100_000;
/// Largest message a client may send, in bytes, by default.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Bytes queued for one connection before it is closed as too slow, by default.
pub const DEFAULT_OUTBOX_LIMIT_BYTES: usize = 1024 * 1024;
/// Longest time one batch of frames may take to write, by default.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time a WebSocket handshake may take, by default.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long each shutdown step may take, by default.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often every connection is pinged, by default.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(25);
/// How long past a ping a silent client is kept, by default.
pub const DEFAULT_PONG_TIMEOUT: Duration = Duration::from_secs(10);

/// How a connection is told its address when it opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Greeting {
    /// `Worker ID:{worker_id} Connection ID:{connection_id} connected`
    #[default]
    Text,
    /// `{"type":"connected","worker_id":"…","connection_id":"…","user_id":"…"}`
    /// (`user_id` only when the connection has one).
    Json,
    /// Nothing: the connection says nothing before the backend does (for
    /// echo-style backends built on the event stream).
    None,
}

impl Greeting {
    /// The greeting for one connection. Ids are URL-safe tokens, so they
    /// need no escaping; a user id is visible ASCII, escaped for JSON.
    pub fn render(self, worker_id: &str, connection_id: u64, user_id: Option<&str>) -> Option<String> {
        match self {
            Self::Text => Some(format!("Worker ID:{worker_id} Connection ID:{connection_id} connected")),
            Self::Json => {
                let user = user_id.map(|u| format!(r#","user_id":"{}""#, json_escape(u))).unwrap_or_default();
                Some(format!(
                    r#"{{"type":"connected","worker_id":"{worker_id}","connection_id":"{connection_id}"{user}}}"#
                ))
            }
            Self::None => None,
        }
    }
}

/// Escapes the two characters of visible ASCII that JSON strings cannot hold.
fn json_escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Everything a gateway needs to know.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// This gateway's cluster-unique worker id.
    pub worker_id: String,
    pub greeting: Greeting,
    /// Most connections held at once; more are refused with HTTP 503.
    pub max_connections: usize,
    /// Largest message a client may send, in bytes.
    pub max_message_bytes: usize,
    /// Bytes queued for one connection before it is disconnected as too slow.
    pub outbox_limit_bytes: usize,
    /// Longest time one batch of frames may take to write.
    pub write_timeout: Duration,
    /// Longest time a WebSocket handshake may take.
    pub handshake_timeout: Duration,
    /// How long each shutdown step (broker drain, client close) may take.
    pub drain_timeout: Duration,
    /// Origins allowed to open connections (exact `scheme://host[:port]`);
    /// empty allows any. With a list, a request without an `Origin` header
    /// is refused unless `allow_missing_origin`.
    pub allowed_origins: Vec<String>,
    /// With `allowed_origins`, still accept requests that carry no `Origin`
    /// (non-browser clients, which can send any origin anyway).
    pub allow_missing_origin: bool,
    /// How often every connection is pinged; zero turns heartbeats off.
    pub ping_interval: Duration,
    /// How long past a ping a silent client is kept before it is closed.
    pub pong_timeout: Duration,
    /// Checks a JWT at every handshake when set (`--client-auth jwt`);
    /// connections are anonymous when not.
    pub client_auth: Option<Arc<ClientAuth>>,
    /// The client channel namespaces: who may subscribe and publish. None:
    /// client-protocol connections can subscribe to nothing.
    pub namespaces: Namespaces,
    /// Most distinct client channels with a subscriber on this gateway: each
    /// is interest at the broker and in NATS, so clients may not make them
    /// without bound. A subscription that would open one more is refused (429).
    pub max_client_channels: usize,
    /// Which connection events are reported to the backends.
    pub events: EventKinds,
    /// Handshake headers passed on in connect events (lower-case names).
    pub event_headers: Vec<String>,
    /// Events queued for the broker before new ones are dropped (counted).
    pub event_queue: usize,
    /// The HTTP endpoint that decides who may connect, if any.
    pub connect_hook: Option<ConnectHookConfig>,
    /// How long a client's rpc waits for a backend's answer.
    pub rpc_timeout: Duration,
    /// Most data messages (frames, or commands) a client may send in one
    /// second; past it the connection is closed (1008). 0: no limit.
    pub max_client_messages_per_second: u32,
}

/// Events queued for the broker, by default.
pub const DEFAULT_EVENT_QUEUE: usize = 100_000;
/// How long a client's rpc waits for its answer, by default.
pub const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the connect hook may take, by default.
pub const DEFAULT_CONNECT_HOOK_TIMEOUT: Duration = Duration::from_secs(2);

/// Which connection events a gateway reports to the backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventKinds {
    pub connect: bool,
    pub disconnect: bool,
    pub subscribe: bool,
    pub unsubscribe: bool,
    pub message: bool,
}

impl EventKinds {
    pub const ALL: Self = Self { connect: true, disconnect: true, subscribe: true, unsubscribe: true, message: true };

    /// Parses `all`, `none`, or a comma-separated list of
    /// `connect,disconnect,subscribe,unsubscribe,message`.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut kinds = Self::default();
        for word in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word {
                "all" => kinds = Self::ALL,
                "none" => {}
                "connect" => kinds.connect = true,
                "disconnect" => kinds.disconnect = true,
                "subscribe" => kinds.subscribe = true,
                "unsubscribe" => kinds.unsubscribe = true,
                "message" => kinds.message = true,
                other => {
                    return Err(format!(
                        "unknown event {other:?}: use all, none, or connect,disconnect,subscribe,unsubscribe,message"
                    ));
                }
            }
        }
        Ok(kinds)
    }

    pub fn any(self) -> bool {
        self != Self::default()
    }
}

/// What to do with a connection when the connect hook cannot be asked
/// (unreachable, timed out, or answering other than 2xx, 401 or 403).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HookDown {
    /// Refuse it with HTTP 503.
    #[default]
    Refuse,
    /// Let it in, anonymous.
    Anonymous,
}

/// The connect hook: an HTTP endpoint asked about every new connection.
#[derive(Debug, Clone)]
pub struct ConnectHookConfig {
    /// `http[s]://host[:port]/path`.
    pub url: String,
    /// Whom an `https://` hook's certificate must chain to.
    pub trust: herald_common::http_client::Trust,
    pub timeout: Duration,
    pub when_down: HookDown,
}

impl GatewayConfig {
    pub fn new(worker_id: String) -> Self {
        Self {
            worker_id,
            greeting: Greeting::Text,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            outbox_limit_bytes: DEFAULT_OUTBOX_LIMIT_BYTES,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            allowed_origins: Vec::new(),
            allow_missing_origin: false,
            ping_interval: DEFAULT_PING_INTERVAL,
            pong_timeout: DEFAULT_PONG_TIMEOUT,
            client_auth: None,
            namespaces: Namespaces::default(),
            max_client_channels: DEFAULT_MAX_CLIENT_CHANNELS,
            events: EventKinds::default(),
            event_headers: Vec::new(),
            event_queue: DEFAULT_EVENT_QUEUE,
            connect_hook: None,
            rpc_timeout: DEFAULT_RPC_TIMEOUT,
            max_client_messages_per_second: 0,
        }
    }

    /// The configuration with its values brought within working bounds, and
    /// empty origins dropped.
    pub(crate) fn normalized(mut self) -> Self {
        self.allowed_origins =
            self.allowed_origins.iter().map(|o| o.trim().to_owned()).filter(|o| !o.is_empty()).collect();
        self.event_headers =
            self.event_headers.iter().map(|h| h.trim().to_ascii_lowercase()).filter(|h| !h.is_empty()).collect();
        self.event_queue = self.event_queue.max(1);
        self
    }

    /// Whether a browser page from `origin` may connect.
    pub(crate) fn origin_allowed(&self, origin: &str) -> bool {
        self.allowed_origins.is_empty()
            || self.allowed_origins.iter().any(|allowed| allowed.eq_ignore_ascii_case(origin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greetings_carry_the_address_in_the_classic_text_or_json() {
        assert_eq!(Greeting::Text.render("w1", 7, Some("ana")).unwrap(), "Worker ID:w1 Connection ID:7 connected");
        assert_eq!(
            Greeting::Json.render("w1", 7, None).unwrap(),
            r#"{"type":"connected","worker_id":"w1","connection_id":"7"}"#
        );
        assert_eq!(
            Greeting::Json.render("w1", 7, Some(r#"a"b\c"#)).unwrap(),
            r#"{"type":"connected","worker_id":"w1","connection_id":"7","user_id":"a\"b\\c"}"#
        );
        assert_eq!(Greeting::None.render("w1", 7, None), None);
    }

    #[test]
    fn event_kinds_are_all_none_or_a_list() {
        assert_eq!(EventKinds::parse("all").unwrap(), EventKinds::ALL);
        assert!(!EventKinds::parse("none").unwrap().any());
        let some = EventKinds::parse("connect, message").unwrap();
        assert!(some.connect && some.message && !some.disconnect);
        assert!(EventKinds::parse("connect,typo").unwrap_err().contains("typo"));
    }

    #[test]
    fn origins_are_checked_only_when_an_allow_list_is_set() {
        let mut config = GatewayConfig::new("w".into());
        assert!(config.origin_allowed("https://evil.example"));
        config.allowed_origins = vec!["https://app.example".into()];
        assert!(config.origin_allowed("https://APP.example"));
        assert!(!config.origin_allowed("https://evil.example"));
    }

    #[test]
    fn normalizing_trims_origins() {
        let config =
            GatewayConfig { allowed_origins: vec![" https://a ".into(), "".into()], ..GatewayConfig::new("w".into()) }
                .normalized();
        assert_eq!(config.allowed_origins, ["https://a"]);
    }
}
