//! One client connection, from the WebSocket handshake to the close frame.
//!
//! A single task owns the socket. It greets the client with its address,
//! then waits on two things: its outbox (frames, written as one batch and one
//! flush, or a request to close: overflow, silence, shutdown) and frames from
//! the client (pings are answered through the outbox; data is ignored from a
//! classic raw client and read as commands from a client-protocol one;
//! anything counts as a sign of life for the heartbeat). Replies to commands
//! go through the outbox, in order with the deliveries. The socket's framing
//! is [`Wire`]'s, which keeps no buffer while the connection is idle.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::Either;
use herald_common::net::ConnectionSlot;
use herald_proto::v1::{Content, content};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_util::sync::CancellationToken;

use crate::close::CloseReason;
use crate::commands::{self, Client};
use crate::connect_hook::{self, Verdict};
use crate::handshake;
use crate::outbox::{Outbox, Taken};
use crate::protocol::{self, BadCommand, Command, CommandKind, Protocol, code};
use crate::registry::Identity;
use crate::shared::Shared;
use crate::wire::{Wire, WireError};

/// How long a closing connection waits for the client's close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// How long a new connection waits for the broker to follow its opening
/// before it is greeted anyway (the broker is slow or being reconnected to).
const ADDRESSABLE_WAIT: Duration = Duration::from_secs(2);

/// Serves one accepted TCP connection until it closes, over TLS when an
/// acceptor is given, holding its place in the process's connection budget.
///
/// The handshakes' state is large and short-lived, so it is boxed and freed
/// once the connection is open, and the open connection's future takes the
/// handshake's place rather than nesting in a future of its own: an idle
/// connection's task then holds only the state of [`serve_open`]. A TLS
/// connection is boxed as a whole, so that its larger state does not enlarge
/// every plain connection's task.
pub(crate) fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    slot: ConnectionSlot,
) -> impl Future<Output = ()> + Send {
    let _ = stream.set_nodelay(true);
    match tls {
        None => {
            let handshake = {
                let shared = shared.clone();
                Box::pin(async move { websocket_handshake(stream, peer, &shared).await })
            };
            Either::Left(handshake.then(move |open| match open {
                Some((ws, identity, protocol)) => {
                    Either::Left(serve_open(ws, identity, protocol, Held { peer, shared, shutdown, _slot: slot }))
                }
                None => Either::Right(std::future::ready(())),
            }))
        }
        Some(acceptor) => {
            Either::Right(Box::pin(serve_tls(stream, acceptor, Held { peer, shared, shutdown, _slot: slot })))
        }
    }
}

/// What an open connection's future holds besides its socket and identity.
struct Held {
    peer: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    /// The connection's place in the process's budget, given back when the
    /// future ends.
    _slot: ConnectionSlot,
}

async fn serve_tls(stream: TcpStream, acceptor: TlsAcceptor, held: Held) {
    let (peer, shared) = (held.peer, &*held.shared);
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
        serve_open(ws, identity, protocol, held).await;
    }
}

/// The WebSocket upgrade ([`handshake`]), within the handshake timeout.
/// A refused request gets its HTTP answer; an accepted one becomes a
/// WebSocket connection, with who is on it.
async fn websocket_handshake<S>(
    mut stream: S,
    peer: SocketAddr,
    shared: &Shared,
) -> Option<(Wire<S>, Box<Identity>, Protocol)>
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
    let mut ws = Wire::new(stream, upgrade.tail, config.max_message_bytes);
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
/// (A plain function around an `async move` block, because an `async fn`
/// stores its arguments twice, and this future is held by every idle
/// connection.)
#[allow(clippy::manual_async_fn, reason = "an async fn would store its arguments twice")]
fn serve_open<S>(mut ws: Wire<S>, identity: Box<Identity>, protocol: Protocol, held: Held) -> impl Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    async move {
        let Held { peer, ref shared, ref shutdown, .. } = held;
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
        // Only what the client protocol's commands need outlives this block:
        // the rest of the identity is not kept.
        let mut client = None;
        let greeted = {
            let Identity { user_id, channels, expires_at, connect_id, groups, headers } = *identity;
            let user_id = user_id.as_deref();
            shared.connect_event(id, peer, headers, protocol, groups);
            let greeting = match protocol {
                Protocol::Raw => {
                    shared.config.greeting.render(&shared.config.worker_id, id, user_id).map(Message::text)
                }
                Protocol::Json => {
                    client = Some(Box::new(Client::new(id, channels, expires_at)));
                    Some(protocol::connected(connect_id, &shared.config.worker_id, id, user_id))
                }
            };
            // Ahead of any delivery already queued: the greeting is the first
            // frame the client reads, written like every other batch.
            match greeting {
                Some(greeting) => outbox.push_first(greeting),
                None => Ok(()),
            }
        };
        let (reason, client_frame) = match greeted {
            Ok(()) => run(&mut ws, &outbox, shared, id, client.as_deref_mut()).await,
            Err(reason) => (reason, None),
        };
        if let Some(client) = client.as_deref_mut() {
            commands::leave_all(shared, client);
        }
        closed_events(shared, id, reason, client_frame.as_ref().map(|f| u16::from(f.code)));
        shared.registry.remove(id);
        shared.metrics.connections.dec();
        shared.metrics.closed(reason);
        if matches!(reason, CloseReason::SlowConsumer | CloseReason::WriteTimeout | CloseReason::Unresponsive) {
            tracing::info!(%peer, connection_id = id, reason = reason.label(), "disconnecting a slow client");
        } else {
            tracing::debug!(%peer, connection_id = id, reason = reason.label(), "connection closed");
        }
        // Boxed: only a closing connection needs the close's state.
        Box::pin(close(&mut ws, reason, outbox.close_text(), client_frame)).await;
    }
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
async fn identify<S>(ws: &mut Wire<S>, identity: Option<Identity>, shared: &Shared) -> Option<Box<Identity>>
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
async fn connect_command<S>(ws: &mut Wire<S>, shared: &Shared) -> Option<(u64, Identity)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let auth = shared.config.client_auth.as_ref()?;
    let first = timeout(shared.config.handshake_timeout, next_data(ws)).await;
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
    close(ws, CloseReason::TokenExpired, Some(close_text(&reason)), None).await;
    None
}

/// The client's next message that is not a ping or a pong.
async fn next_data<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut Wire<S>) -> Option<Result<Message, WireError>> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => return other,
        }
    }
}

/// Waits (a bounded time) until the broker has followed the directory
/// journal up to `position`.
async fn addressable(shared: &Shared, position: u64) {
    shared.followed.wait(position, ADDRESSABLE_WAIT).await;
}

/// The delivery loop, until the connection ends: why, with the client's
/// close frame when it sent one.
///
/// Every idle connection's task waits here, so what it holds while it waits
/// is kept small: one poll wakes it for the outbox or the client, and writes
/// a batch at once when the client takes it; only a write that stalls or a
/// command carries more state, boxed. (A plain function around an `async
/// move` block, because an `async fn` stores its arguments twice.)
#[allow(clippy::manual_async_fn, reason = "an async fn would store its arguments twice")]
fn run<'a, S: AsyncRead + AsyncWrite + Unpin>(
    ws: &'a mut Wire<S>,
    outbox: &'a Outbox,
    shared: &'a Shared,
    id: u64,
    mut client: Option<&'a mut Client>,
) -> impl Future<Output = Ended> + 'a {
    async move {
        let mut reads_first = false;
        loop {
            let woken = poll_fn(|cx| {
                // Turn about, so that neither side can starve the other.
                reads_first = !reads_first;
                if reads_first && let Poll::Ready(incoming) = ws.poll_next(cx) {
                    return Poll::Ready(Woken::Incoming(incoming));
                }
                if outbox.poll_ready(cx).is_ready() {
                    return Poll::Ready(write_at_once(cx, ws, outbox));
                }
                if !reads_first && let Poll::Ready(incoming) = ws.poll_next(cx) {
                    return Poll::Ready(Woken::Incoming(incoming));
                }
                Poll::Pending
            })
            .await;
            let rest = match woken {
                Woken::Wrote(taken) => match written(shared, taken) {
                    Some(ended) => return ended,
                    None => continue,
                },
                Woken::Stalled { batch, progress, taken } => {
                    Either::Left(Box::pin(finish_write(ws, batch, progress, taken, outbox, shared)))
                }
                Woken::Ended(reason) => return (reason, None),
                Woken::Incoming(incoming) => {
                    outbox.heard(shared.now_ms());
                    let command = match received(shared, outbox, id, client.is_some(), incoming) {
                        Received::Handled => continue,
                        Received::Ended(reason, code) => return (reason, code),
                        Received::Command(command) => command,
                    };
                    let Some(client) = client.as_deref_mut() else { continue };
                    Either::Right(Box::pin(async move {
                        commands::run(shared, client, outbox, command).await.err().map(|reason| (reason, None))
                    }))
                }
            };
            if let Some(ended) = rest.await {
                return ended;
            }
        }
    }
}

/// Why a connection ended, with the client's close frame when it sent one.
type Ended = (CloseReason, Option<CloseFrame>);

/// Counts a batch written; the connection ends when its outbox asked for it
/// after the batch.
fn written(shared: &Shared, taken: Taken) -> Option<Ended> {
    shared.metrics.written(taken);
    // At shutdown the broker link drained first: what was queued was
    // published before the drain began, and is now written.
    taken.then_close.map(|reason| (reason, None))
}

/// Finishes a write that stalled: within the write timeout, and ended
/// early by an overflow of the outbox meanwhile.
async fn finish_write<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut Wire<S>,
    mut batch: VecDeque<Message>,
    mut progress: usize,
    taken: Taken,
    outbox: &Outbox,
    shared: &Shared,
) -> Option<Ended> {
    tokio::select! {
        result = poll_fn(|cx| ws.poll_send(cx, &mut batch, &mut progress)) => match result {
            Ok(()) => written(shared, taken),
            Err(_) => Some((CloseReason::ClientGone, None)),
        },
        () = tokio::time::sleep(shared.config.write_timeout) => Some((CloseReason::WriteTimeout, None)),
        reason = outbox.abandoned_wait() => Some((reason, None)),
    }
}

/// What woke a connection's task.
enum Woken {
    /// The outbox's frames were written at once.
    Wrote(Taken),
    /// The outbox's frames are being written, `progress` bytes of the first
    /// one so far, and the client is not taking more yet.
    Stalled { batch: VecDeque<Message>, progress: usize, taken: Taken },
    /// The outbox closed with nothing left to write.
    Ended(CloseReason),
    /// The client sent something, or its side ended.
    Incoming(Option<Result<Message, WireError>>),
}

/// Takes what the outbox holds and writes as much as the socket takes now.
fn write_at_once<S: AsyncRead + AsyncWrite + Unpin>(
    cx: &mut std::task::Context<'_>,
    ws: &mut Wire<S>,
    outbox: &Outbox,
) -> Woken {
    // A batch lives for one write: an idle connection keeps no queue.
    let (mut batch, taken) = match outbox.take() {
        Ok(taken) => taken,
        Err(reason) => return Woken::Ended(reason),
    };
    let mut progress = 0;
    match ws.poll_send(cx, &mut batch, &mut progress) {
        Poll::Ready(Ok(())) => Woken::Wrote(taken),
        Poll::Ready(Err(_)) => Woken::Ended(CloseReason::ClientGone),
        Poll::Pending => Woken::Stalled { batch, progress, taken },
    }
}

/// What a frame from the client asks of its connection.
enum Received {
    Handled,
    Ended(CloseReason, Option<CloseFrame>),
    /// A client-protocol command to run.
    Command(Command),
}

/// Reads one frame from the client (`None`: its side ended). Pings are
/// answered through the outbox; a classic raw client's data goes to the
/// backends; a client-protocol connection's is a command.
fn received(
    shared: &Shared,
    outbox: &Outbox,
    id: u64,
    speaks_protocol: bool,
    incoming: Option<Result<Message, WireError>>,
) -> Received {
    let ended = |reason| Received::Ended(reason, None);
    match incoming {
        None => ended(CloseReason::ClientGone),
        Some(Ok(Message::Close(frame))) => Received::Ended(CloseReason::ClientClosed, frame),
        Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
            shared.metrics.bytes_received.add(message.len() as u64);
            let limit = shared.config.max_client_messages_per_second;
            if limit > 0 && !outbox.admit_message(shared.now_ms(), limit) {
                return ended(CloseReason::TooManyMessages);
            }
            if !speaks_protocol {
                raw_message(shared, id, message);
                return Received::Handled;
            }
            match command(&message) {
                Ok(command) => Received::Command(command),
                Err(BadCommand { id: Some(id), reason }) => {
                    shared.metrics.commands_refused.inc();
                    match outbox.push(protocol::refusal(id, code::BAD_COMMAND, &reason), 0) {
                        Ok(()) => Received::Handled,
                        Err(reason) => ended(reason),
                    }
                }
                Err(BadCommand { id: None, reason }) => {
                    outbox.close_with(CloseReason::BadCommand, Some(close_text(&reason)));
                    ended(CloseReason::BadCommand)
                }
            }
        }
        Some(Ok(Message::Ping(payload))) => match outbox.push(Message::Pong(payload), 0) {
            Ok(()) => Received::Handled,
            Err(reason) => ended(reason),
        },
        Some(Ok(_)) => Received::Handled,
        Some(Err(WireError::MessageTooBig)) => ended(CloseReason::MessageTooBig),
        Some(Err(WireError::InvalidUtf8)) => ended(CloseReason::InvalidPayload),
        Some(Err(WireError::Protocol(_))) => ended(CloseReason::ProtocolError),
        Some(Err(WireError::Io(_))) => ended(CloseReason::ClientGone),
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

/// Sends herald's close frame (if the reason has one, with `text` when a
/// backend gave one), or answers the client's own close frame by echoing
/// it (`client_frame`), and waits briefly for the client's, so the client reads
/// the close code before the TCP close.
async fn close<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut Wire<S>,
    reason: CloseReason,
    text: Option<Box<str>>,
    client_frame: Option<CloseFrame>,
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
            None if reason == CloseReason::ClientClosed => {
                let _ = ws.close(client_frame).await;
                return;
            }
            None => return,
        }
        while let Some(Ok(message)) = ws.next().await {
            if matches!(message, Message::Close(_)) {
                return;
            }
        }
    };
    let _ = timeout(CLOSE_LINGER, linger).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Gateway, GatewayConfig};

    /// Every idle connection holds this future for its whole life: the
    /// handshakes' large state, a stalled write's and a command's must stay
    /// boxed away from it (328 bytes on Rust 1.95; 960 before the connection
    /// framed its own frames).
    #[tokio::test]
    async fn an_open_connection_task_stays_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let gateway = Gateway::new(GatewayConfig::new("w".into())).unwrap();
        let slot = herald_common::net::connection_slot().unwrap();
        let task = serve(stream, peer, None, gateway.shared.clone(), CancellationToken::new(), slot);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 384, "the connection task's state is {size} bytes");
    }
}
