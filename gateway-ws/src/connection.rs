//! One client connection, from the WebSocket handshake to the close frame.
//!
//! A single task owns the socket. It greets the client with its address,
//! then waits on two things: its outbox (frames, written as one batch and one
//! flush, or a request to close: overflow, silence, shutdown) and frames from
//! the client (pings are answered by tungstenite; data is ignored from a
//! classic raw client and read as commands from a client-protocol one;
//! anything counts as a sign of life for the heartbeat). Replies to commands
//! go through the outbox, in order with the deliveries.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use herald_common::net::ConnectionSlot;
use herald_proto::v1::{Content, content};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::sync::CancellationToken;

use crate::close::CloseReason;
use crate::commands::{self, Client};
use crate::connect_hook::{self, Verdict};
use crate::handshake;
use crate::outbox::Outbox;
use crate::protocol::{self, BadCommand, Command, CommandKind, Protocol, code};
use crate::registry::Identity;
use crate::shared::Shared;

/// How long a closing connection waits for the client's close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// How long a new connection waits for the broker to follow its opening
/// before it is greeted anyway (the broker is slow or being reconnected to).
const ADDRESSABLE_WAIT: Duration = Duration::from_secs(2);

/// Serves one accepted TCP connection until it closes, over TLS when an
/// acceptor is given, holding its place in the process's connection budget.
///
/// The handshakes' state is large and short-lived, so it is boxed and freed
/// once the connection is open: an idle connection's task then holds only the
/// small state of [`serve_open`]. A TLS connection is boxed as a whole, so
/// that its larger state does not enlarge every plain connection's task.
pub(crate) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    slot: ConnectionSlot,
) {
    let _ = stream.set_nodelay(true);
    match tls {
        None => serve_plain(stream, peer, &shared, &shutdown).await,
        Some(acceptor) => Box::pin(serve_tls(stream, acceptor, peer, &shared, &shutdown)).await,
    }
    // Held by this future itself, not by a wrapping one: a future awaited
    // from inside another is stored twice, which idle connections would pay
    // for.
    drop(slot);
}

async fn serve_plain(stream: TcpStream, peer: SocketAddr, shared: &Shared, shutdown: &CancellationToken) {
    if let Some((ws, identity, protocol)) = Box::pin(websocket_handshake(stream, peer, shared)).await {
        serve_open(ws, identity, protocol, peer, shared, shutdown).await;
    }
}

async fn serve_tls(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    peer: SocketAddr,
    shared: &Shared,
    shutdown: &CancellationToken,
) {
    let stream = match timeout(shared.config.handshake_timeout, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            shared.metrics.handshakes_failed.inc();
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            shared.metrics.handshakes_failed.inc();
            return;
        }
    };
    if let Some((ws, identity, protocol)) = Box::pin(websocket_handshake(stream, peer, shared)).await {
        serve_open(ws, identity, protocol, peer, shared, shutdown).await;
    }
}

/// The WebSocket upgrade ([`handshake`]), within the handshake timeout.
/// A refused request gets its HTTP answer; an accepted one becomes a
/// WebSocket stream, with who is on it.
async fn websocket_handshake<S>(
    mut stream: S,
    peer: SocketAddr,
    shared: &Shared,
) -> Option<(Box<WebSocketStream<S>>, Box<Identity>, Protocol)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let config = &shared.config;
    let at_capacity = shared.registry.len() >= config.max_connections;
    let upgraded = timeout(config.handshake_timeout, async {
        let checked = match handshake::read_request(&mut stream, config, at_capacity).await {
            Ok(mut upgrade) => match upgrade.hook.take() {
                Some(request) => consult_hook(shared, peer, request).await.map(|identity| {
                    upgrade.identity = Some(identity);
                    upgrade
                }),
                None => Ok(upgrade),
            },
            Err(refusal) => Err(refusal),
        };
        match checked {
            Ok(upgrade) => handshake::accept(&mut stream, &upgrade).await.map(|()| upgrade).map_err(|e| e.to_string()),
            Err(refusal) => {
                if let Some(rejection) = refusal.token_rejection {
                    shared.metrics.token_refused(rejection);
                }
                handshake::refuse(&mut stream, &refusal).await;
                Err(format!("refused with {}: {}", refusal.status, refusal.reason))
            }
        }
    })
    .await;
    let upgrade = match upgraded {
        Ok(Ok(upgrade)) => upgrade,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "WebSocket handshake failed");
            shared.metrics.handshakes_failed.inc();
            return None;
        }
        Err(_) => {
            tracing::debug!(%peer, "WebSocket handshake timed out");
            shared.metrics.handshakes_failed.inc();
            return None;
        }
    };
    let ws = if upgrade.tail.is_empty() {
        WebSocketStream::from_raw_socket(stream, Role::Server, Some(config.websocket())).await
    } else {
        WebSocketStream::from_partially_read(stream, upgrade.tail, Role::Server, Some(config.websocket())).await
    };
    // Boxed: a pointer is all the connection's task then carries around.
    let mut ws = Box::new(ws);
    let mut identity = identify(&mut ws, upgrade.identity, shared).await?;
    identity.headers = upgrade.event_headers;
    Some((ws, identity, upgrade.protocol))
}

/// Asks the connect hook who is connecting; a refusal is the handshake's
/// answer.
async fn consult_hook(
    shared: &Shared,
    peer: SocketAddr,
    request: crate::connect_hook::HookRequest,
) -> Result<Identity, handshake::Refusal> {
    let (Some(poster), Some(config)) = (&shared.connect_hook, &shared.config.connect_hook) else {
        return Ok(Identity::default());
    };
    match connect_hook::ask(poster, config, peer, request).await {
        Verdict::Accepted(identity) => {
            shared.metrics.hook_accepted.inc();
            Ok(identity)
        }
        Verdict::Refused(refusal) => {
            shared.metrics.hook_refused.inc();
            Err(refusal)
        }
        Verdict::Down { reason, outcome } => {
            shared.metrics.hook_down.inc();
            tracing::warn!(%peer, %reason, "connect hook down");
            outcome
        }
    }
}

/// An open connection: greeting, then the delivery loop, then the close.
async fn serve_open<S>(
    mut ws: Box<WebSocketStream<S>>,
    identity: Box<Identity>,
    protocol: Protocol,
    peer: SocketAddr,
    shared: &Shared,
    shutdown: &CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (config, metrics, registry) = (&shared.config, &shared.metrics, &shared.registry);
    let outbox = Arc::new(Outbox::new(config.outbox_limit_bytes, shared.now_ms()).speaking(protocol));
    let (id, journaled) = registry.register(outbox.clone(), &identity);
    // Shutdown closes every registered outbox after cancelling `shutdown`:
    // checking after registering means no connection is missed.
    if shutdown.is_cancelled() {
        outbox.close(shared.close_reason());
    }
    metrics.connections.inc();
    metrics.connections_opened.inc();
    tracing::debug!(%peer, connection_id = id, "connection opened");

    // The client learns its address from the greeting and may hand it to a
    // backend at once: the broker must know the connection by then.
    if let Some(position) = journaled {
        Box::pin(addressable(shared, position)).await;
    }
    // Only the greeting and, for the client protocol, what its commands
    // need outlive this block: the rest of the identity is not kept.
    let (greeting, mut client) = {
        let Identity { user_id, channels, expires_at, connect_id, groups, headers } = *identity;
        let user_id = user_id.as_deref();
        shared.connect_event(id, peer, headers, protocol, groups);
        match protocol {
            Protocol::Raw => {
                (shared.config.greeting.render(&shared.config.worker_id, id, user_id).map(Message::text), None)
            }
            Protocol::Json => {
                let client = Client::new(id, channels, expires_at);
                (Some(protocol::connected(connect_id, &shared.config.worker_id, id, user_id)), Some(Box::new(client)))
            }
        }
    };
    let greeted = match greeting {
        Some(greeting) => match timeout(shared.config.write_timeout, ws.send(greeting)).await {
            Ok(Ok(())) => None,
            Ok(Err(_)) => Some(CloseReason::ClientGone),
            Err(_) => Some(CloseReason::WriteTimeout),
        },
        None => None,
    };
    let (reason, client_code) = match greeted {
        None => run(&mut ws, &outbox, shared, id, client.as_deref_mut()).await,
        Some(reason) => (reason, None),
    };
    if let Some(client) = client.as_deref_mut() {
        commands::leave_all(shared, client);
    }
    closed_events(shared, id, reason, client_code);
    shared.registry.remove(id);
    shared.metrics.connections.dec();
    shared.metrics.closed(reason);
    if matches!(reason, CloseReason::SlowConsumer | CloseReason::WriteTimeout | CloseReason::Unresponsive) {
        tracing::info!(%peer, connection_id = id, reason = reason.label(), "disconnecting a slow client");
    } else {
        tracing::debug!(%peer, connection_id = id, reason = reason.label(), "connection closed");
    }
    close(&mut ws, reason, outbox.close_text()).await;
}

/// The events of a closing connection: it leaves its channels, then
/// disconnects.
fn closed_events(shared: &Shared, id: u64, reason: CloseReason, client_code: Option<u16>) {
    let kinds = shared.events.kinds();
    if !kinds.unsubscribe && !kinds.disconnect {
        return;
    }
    if kinds.unsubscribe {
        for channel in shared.registry.channels_of(id) {
            shared.unsubscribe_event(id, &channel);
        }
    }
    shared.disconnect_event(id, reason, client_code);
}

/// Who is on a new connection: from its handshake, or, for a client that
/// kept its token out of the handshake, from its `connect` command (whose
/// id the identity keeps, for the greeting to answer). `None` when the
/// connect was refused.
async fn identify<S>(ws: &mut WebSocketStream<S>, identity: Option<Identity>, shared: &Shared) -> Option<Box<Identity>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match identity {
        Some(identity) => Some(Box::new(identity)),
        None => connect_command(ws, shared)
            .await
            .map(|(id, identity)| Box::new(Identity { connect_id: Some(id), ..identity })),
    }
}

/// The first frame of a client-protocol connection that opened without a
/// token where tokens are checked: it must be `connect {token}`, within the
/// handshake timeout. Returns the command's id and who the token says the
/// client is; otherwise refuses it (a 401 reply when the frame had an id)
/// and closes with 4001.
async fn connect_command<S>(ws: &mut WebSocketStream<S>, shared: &Shared) -> Option<(u64, Identity)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let auth = shared.config.client_auth.as_ref()?;
    let first = timeout(shared.config.handshake_timeout, ws.next()).await;
    let (id, reason) = match first {
        Ok(Some(Ok(Message::Text(text)))) => match protocol::parse(&text) {
            Ok(Command { id, kind: CommandKind::Connect { token } }) => {
                match auth.verify(&token, crate::client_auth::unix_now()) {
                    Ok(identity) => return Some((id, identity.into())),
                    Err(rejection) => {
                        shared.metrics.token_refused(rejection.label());
                        (Some(id), rejection.to_string())
                    }
                }
            }
            Ok(Command { id, .. }) => (Some(id), "connect with a token first".to_owned()),
            Err(BadCommand { id, reason }) => (id, reason),
        },
        Ok(_) => (None, "connect with a token first".to_owned()),
        Err(_) => (None, format!("no connect command within {:?}", shared.config.handshake_timeout)),
    };
    shared.metrics.handshakes_failed.inc();
    if let Some(id) = id {
        let _ =
            timeout(shared.config.write_timeout, ws.send(protocol::refusal(id, code::TOKEN_REFUSED, &reason))).await;
    }
    close(ws, CloseReason::TokenExpired, Some(close_text(&reason))).await;
    None
}

/// Waits (a bounded time) until the broker has followed the directory
/// journal up to `position`.
async fn addressable(shared: &Shared, position: u64) {
    shared.followed.wait(position, ADDRESSABLE_WAIT).await;
}

/// The delivery loop, until the connection ends: why, with the code of the
/// client's close frame when it sent one.
async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    outbox: &Outbox,
    shared: &Shared,
    id: u64,
    mut client: Option<&mut Client>,
) -> (CloseReason, Option<u16>) {
    let mut batch = VecDeque::new();
    loop {
        tokio::select! {
            () = outbox.ready() => {
                let taken = match outbox.take(&mut batch) {
                    Ok(taken) => taken,
                    Err(reason) => return (reason, None),
                };
                match write_within(shared.config.write_timeout, ws, &mut batch, outbox).await {
                    Written::Done(Ok(())) => shared.metrics.written(taken),
                    Written::Done(Err(_)) => return (CloseReason::ClientGone, None),
                    Written::TimedOut => return (CloseReason::WriteTimeout, None),
                    Written::Abandoned(reason) => return (reason, None),
                }
                // At shutdown the broker link drained first: what was queued
                // was published before the drain began, and is now written.
                if let Some(reason) = taken.then_close {
                    return (reason, None);
                }
            }
            incoming = ws.next() => {
                outbox.heard(shared.now_ms());
                match incoming {
                None => return (CloseReason::ClientGone, None),
                Some(Ok(Message::Close(frame))) => {
                    return (CloseReason::ClientClosed, frame.map(|f| u16::from(f.code)));
                }
                Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                    shared.metrics.bytes_received.add(message.len() as u64);
                    let limit = shared.config.max_client_messages_per_second;
                    if limit > 0 && !outbox.admit_message(shared.now_ms(), limit) {
                        return (CloseReason::TooManyMessages, None);
                    }
                    let Some(client) = client.as_deref_mut() else {
                        raw_message(shared, id, message);
                        continue;
                    };
                    let replied = match command(&message) {
                        // Boxed: a command's state would otherwise enlarge every connection's task.
                        Ok(command) => Box::pin(commands::run(shared, client, outbox, command)).await,
                        Err(BadCommand { id: Some(id), reason }) => {
                            shared.metrics.commands_refused.inc();
                            outbox.push(protocol::refusal(id, code::BAD_COMMAND, &reason), 0)
                        }
                        Err(BadCommand { id: None, reason }) => {
                            outbox.close_with(CloseReason::BadCommand, Some(close_text(&reason)));
                            return (CloseReason::BadCommand, None);
                        }
                    };
                    if let Err(reason) = replied {
                        return (reason, None);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. }))) => return (CloseReason::MessageTooBig, None),
                Some(Err(WsError::Utf8(_))) => return (CloseReason::InvalidPayload, None),
                Some(Err(WsError::Protocol(_))) => return (CloseReason::ProtocolError, None),
                Some(Err(_)) => return (CloseReason::ClientGone, None),
                }
            }
        }
    }
}

/// A classic raw client's frame: a message event for the backends, when
/// they take them.
fn raw_message(shared: &Shared, id: u64, message: Message) {
    let body = match message {
        Message::Text(text) => content::Body::Text(text.as_str().to_owned()),
        Message::Binary(bytes) => content::Body::Binary(bytes),
        _ => return,
    };
    if !shared.message_event(id, Content { body: Some(body) }) {
        shared.metrics.client_messages_ignored.inc();
    }
}

/// A client-protocol frame read as a command: commands are text frames.
fn command(message: &Message) -> Result<Command, BadCommand> {
    match message {
        Message::Text(text) => protocol::parse(text),
        _ => Err(BadCommand { id: None, reason: "commands are JSON text frames, not binary ones".into() }),
    }
}

/// A close frame's text: at most 120 bytes of `reason`, cut at a character.
fn close_text(reason: &str) -> Box<str> {
    let mut end = reason.len().min(120);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].into()
}

/// How a write of one batch ended.
enum Written {
    Done(Result<(), WsError>),
    TimedOut,
    /// The outbox closed for good while the write waited on the client
    /// (it overflowed): the connection ends now, not at the write timeout.
    Abandoned(CloseReason),
}

/// Writes `batch` within `limit`. Most writes complete at once, so the timer
/// is only set for a write that has to wait for the client; while it waits,
/// an overflow of the outbox ends it.
async fn write_within<S: AsyncRead + AsyncWrite + Unpin>(
    limit: Duration,
    ws: &mut WebSocketStream<S>,
    batch: &mut VecDeque<Message>,
    outbox: &Outbox,
) -> Written {
    let mut write = std::pin::pin!(write_batch(ws, batch));
    if let Poll::Ready(result) = poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
        return Written::Done(result);
    }
    // Boxed: the timer and the select are only needed by a write that waits,
    // and idle connections would otherwise carry them in their state.
    Box::pin(wait_for_write(write, limit, outbox)).await
}

/// Waits for a write that did not complete at once: its end, the time
/// limit, or the outbox overflowing meanwhile.
async fn wait_for_write(
    write: std::pin::Pin<&mut impl Future<Output = Result<(), WsError>>>,
    limit: Duration,
    outbox: &Outbox,
) -> Written {
    tokio::select! {
        result = write => Written::Done(result),
        () = tokio::time::sleep(limit) => Written::TimedOut,
        reason = outbox.abandoned_wait() => Written::Abandoned(reason),
    }
}

async fn write_batch<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    batch: &mut VecDeque<Message>,
) -> Result<(), WsError> {
    while let Some(frame) = batch.pop_front() {
        ws.feed(frame).await?;
    }
    ws.flush().await
}

/// Sends herald's close frame (if the reason has one, with `text` when a
/// backend gave one) and waits briefly for the client's, so the client
/// reads the close code before the TCP close.
async fn close<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    reason: CloseReason,
    text: Option<Box<str>>,
) {
    let linger = async {
        match reason.frame() {
            Some(mut frame) => {
                if let Some(text) = text {
                    frame.reason = String::from(text).into();
                }
                if ws.close(Some(frame)).await.is_err() {
                    return;
                }
            }
            // Flushes tungstenite's automatic reply to the client's close.
            None if reason == CloseReason::ClientClosed => {
                let _ = ws.flush().await;
            }
            None => return,
        }
        while let Some(Ok(_)) = ws.next().await {}
    };
    let _ = timeout(CLOSE_LINGER, linger).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Gateway, GatewayConfig};

    /// Every idle connection holds this future for its whole life: the
    /// handshakes' large state must stay boxed away from it.
    #[tokio::test]
    async fn an_open_connection_task_stays_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let gateway = Gateway::new(GatewayConfig::new("w".into())).unwrap();
        let slot = herald_common::net::connection_slot().unwrap();
        let task = serve(stream, peer, None, gateway.shared.clone(), CancellationToken::new(), slot);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 1024, "the connection task's state is {size} bytes");
    }
}
