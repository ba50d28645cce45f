//! A WebSocket client speaking herald's client protocol (`herald.json.v1`),
//! for the tests of client channels and their history.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::support::PATIENCE;

/// How long "nothing arrives" is watched for.
pub const QUIET: Duration = Duration::from_millis(300);

/// A client speaking the client protocol: commands with ids, replies matched
/// to them, pushes kept in order.
pub struct ProtocolClient {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub worker_id: String,
    pub connection_id: String,
    next_id: u64,
    pushes: VecDeque<Value>,
}

impl ProtocolClient {
    /// Connects asking for `herald.json.v1` and reads the `connected` push.
    pub async fn connect(url: &str) -> ProtocolClient {
        Self::connect_with(url, None).await
    }

    /// Connects without a token in the handshake and sends it in a
    /// `connect` command (id 1) instead; returns the client and the
    /// command's reply (`connected`, or an error before the close).
    pub async fn connect_by_command(url: &str, token: &str) -> (ProtocolClient, Value) {
        let mut request = url.into_client_request().expect("a WebSocket URL");
        request.headers_mut().insert("sec-websocket-protocol", "herald.json.v1".parse().expect("a header value"));
        let (ws, _) = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(request))
            .await
            .expect("connect in time")
            .expect("WebSocket handshake");
        let mut client = ProtocolClient {
            ws,
            worker_id: String::new(),
            connection_id: String::new(),
            next_id: 1,
            pushes: VecDeque::new(),
        };
        let reply = client.call("connect", json!({ "token": token })).await;
        if let Some(connected) = reply.get("connected") {
            client.worker_id = connected["worker_id"].as_str().unwrap_or_default().to_owned();
            client.connection_id = connected["connection_id"].as_str().unwrap_or_default().to_owned();
        }
        (client, reply)
    }

    /// The close code and reason the gateway ends the connection with.
    pub async fn closed(&mut self) -> Option<(u16, String)> {
        loop {
            match tokio::time::timeout(PATIENCE, self.ws.next()).await.expect("a close in time") {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| (u16::from(f.code), f.reason.to_string())),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// Connects with `Authorization: Bearer <token>` when given.
    pub async fn connect_with(url: &str, token: Option<&str>) -> ProtocolClient {
        let mut request = url.into_client_request().expect("a WebSocket URL");
        request.headers_mut().insert("sec-websocket-protocol", "herald.json.v1".parse().expect("a header value"));
        if let Some(token) = token {
            request.headers_mut().insert("authorization", format!("Bearer {token}").parse().expect("a header value"));
        }
        let (ws, response) = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(request))
            .await
            .expect("connect in time")
            .expect("WebSocket handshake");
        assert_eq!(response.headers()["sec-websocket-protocol"], "herald.json.v1");
        let mut client = ProtocolClient {
            ws,
            worker_id: String::new(),
            connection_id: String::new(),
            next_id: 1,
            pushes: VecDeque::new(),
        };
        let connected = client.read().await;
        client.worker_id = connected["connected"]["worker_id"].as_str().expect("a connected push").to_owned();
        client.connection_id = connected["connected"]["connection_id"].as_str().expect("a connection id").to_owned();
        client
    }

    pub async fn read(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(PATIENCE, self.ws.next()).await.expect("a message in time");
            match message {
                Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).expect("JSON from the gateway"),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    /// Sends `{"id": N, name: body}` and returns its reply; pushes that
    /// arrive first are kept for [`ProtocolClient::push`].
    pub async fn call(&mut self, name: &str, body: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send_text(&json!({ "id": id, name: body }).to_string()).await;
        loop {
            let message = self.read().await;
            if message["id"] == json!(id) {
                return message;
            }
            assert!(message.get("id").is_none(), "a reply to another command: {message}");
            self.pushes.push_back(message);
        }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send a command");
    }

    /// The next push.
    pub async fn push(&mut self) -> Value {
        match self.pushes.pop_front() {
            Some(push) => push,
            None => self.read().await,
        }
    }

    /// Asserts that nothing arrives within `QUIET`.
    pub async fn expect_silence(&mut self) {
        assert_eq!(self.pushes.pop_front(), None);
        if let Ok(Some(Ok(message))) = tokio::time::timeout(QUIET, self.ws.next()).await {
            panic!("expected nothing, got {message:?}");
        }
    }
}
