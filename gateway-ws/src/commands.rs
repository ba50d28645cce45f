//! A client-protocol connection's commands, carried out: subscriptions
//! checked against the namespaces and kept in the registry (answered once the
//! broker follows them, so that every publication after the answer arrives),
//! publications handed to the broker, presence asked of the broker (which
//! answers for the whole cluster from its directory), history read from the
//! broker, and token refreshes. Every refusal is a reply with a code; only a
//! frame that is not a command at all ends the connection.
//!
//! A subscription holds its channel's publications aside until its reply is
//! queued. On a channel with history the reply carries the channel's
//! position (and, when the client recovers, what it missed), and the held
//! publications at or before that position are dropped: the client sees the
//! stream once, in order, across the seam.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use herald_client::Broker;
use herald_common::namespaces::{HistoryRule, Namespace};
use herald_proto::names;
use herald_proto::v1::{CallRequest, call_answer};
use herald_proto::v1::{
    ChannelPresenceChange, ConnectionAddress, Content, HistoryRequest, HistoryResponse, PublishRequest, QueryRequest,
    StreamPosition, Target, content, query_request, target,
};
use tokio_tungstenite::tungstenite::Message;
use tonic::Code;

use crate::client_auth::{TokenRejection, unix_now};
use crate::close::CloseReason;
use crate::outbox::Outbox;
use crate::protocol::{self, Command, CommandKind, Done, Recovery, Subscriber, code};
use crate::registry::SubscriptionError;
use crate::shared::Shared;
use herald_common::namespaces::{PublishRule, SubscribeRule};

/// How long a subscription waits for the broker to follow it before it is
/// answered anyway (the broker is slow or being reconnected to).
const FOLLOW_WAIT: Duration = Duration::from_secs(2);
/// Most rpcs of one connection waiting for their answers at once.
const MAX_RPCS_IN_FLIGHT: usize = 64;
/// Most subscribers a presence answer lists; past it, presence_stats counts them.
const MAX_PRESENCE: usize = 1000;

/// A client-protocol connection, as its commands need it.
pub(crate) struct Client {
    pub(crate) id: u64,
    /// The client channels its token lists (for `subscribe=listed` namespaces).
    pub(crate) listed: Vec<String>,
    /// When its token expires (unix seconds).
    pub(crate) expires_at: Option<u64>,
    /// The channels it joined in namespaces that announce joins and
    /// leaves: each gets a leave when the connection ends.
    pub(crate) announced: Vec<String>,
    /// Its rpcs waiting for their answers (made at its first rpc).
    rpcs: Option<Arc<AtomicUsize>>,
}

impl Client {
    pub(crate) fn new(id: u64, listed: Vec<String>, expires_at: Option<u64>) -> Self {
        Self { id, listed, expires_at, announced: Vec::new(), rpcs: None }
    }
}

/// A refused command: its reply's code and reason.
struct Refused(u32, String);

impl Refused {
    fn new(code: u32, reason: impl Into<String>) -> Self {
        Self(code, reason.into())
    }
}

/// A broker's refusal, as the client's code: a malformed request, a
/// channel without history, content over the limit; anything else is the
/// broker being unavailable.
impl From<tonic::Status> for Refused {
    fn from(status: tonic::Status) -> Self {
        let code = match status.code() {
            Code::InvalidArgument => code::BAD_COMMAND,
            Code::FailedPrecondition => code::NOT_ALLOWED,
            Code::ResourceExhausted => code::TOO_LARGE,
            _ => code::UNAVAILABLE,
        };
        Self(code, status.message().to_owned())
    }
}

impl From<TokenRejection> for Refused {
    fn from(rejection: TokenRejection) -> Self {
        Self(code::TOKEN_REFUSED, rejection.to_string())
    }
}

/// Announces that the connection left every channel it joined: it is
/// closing.
pub(crate) fn leave_all(shared: &Shared, client: &mut Client) {
    for channel in std::mem::take(&mut client.announced) {
        announce(shared, client.id, channel, false);
    }
}

/// Tells a channel's subscribers, across the cluster, that connection `id`
/// joined or left it. In the background: a command's reply does not wait
/// for it, and a failure is only logged (joins and leaves are best effort).
fn announce(shared: &Shared, id: u64, channel: String, joined: bool) {
    let Some(broker) = shared.broker.get().cloned() else {
        return;
    };
    let address = ConnectionAddress { worker_id: shared.config.worker_id.clone(), connection_id: id.to_string() };
    let user_id = shared.registry.user_of(id).map(|u| u.to_string()).unwrap_or_default();
    let request = PublishRequest {
        target: Some(Target { kind: Some(target::Kind::Channel(channel)), except: Vec::new() }),
        content: Some(Content { body: Some(content::Body::Text(String::new())) }),
        idempotency_key: String::new(),
        presence_change: Some(ChannelPresenceChange { joined, address: Some(address), user_id }),
    };
    tokio::spawn(async move {
        if let Err(status) = broker.publish(request).await {
            tracing::debug!(reason = status.message(), joined, "a join or leave was not announced");
        }
    });
}

/// Carries out one command and queues its reply on `outbox`; fails when
/// the outbox closed meanwhile.
pub(crate) async fn run(
    shared: &Shared,
    client: &mut Client,
    outbox: &Outbox,
    command: Command,
) -> Result<(), CloseReason> {
    let result = match command.kind {
        CommandKind::Connect { .. } => Err(Refused::new(code::BAD_COMMAND, "already connected")),
        CommandKind::Subscribe { channel, token, recover } => {
            return subscribe(shared, client, outbox, command.id, channel, token, recover).await;
        }
        CommandKind::Unsubscribe { channel } => {
            let result = unsubscribe(shared, client, outbox, channel).await;
            if let Ok(Done::Unsubscribed { channel }) = &result {
                shared.unsubscribe_event(client.id, channel);
                if let Some(i) = client.announced.iter().position(|c| c == channel) {
                    announce(shared, client.id, client.announced.swap_remove(i), false);
                }
            }
            result
        }
        CommandKind::Publish { channel, content } => publish(shared, client, channel, content).await,
        CommandKind::Refresh { token } => refresh(shared, client, &token),
        CommandKind::Presence { channel } => presence(shared, client, channel, false).await,
        CommandKind::PresenceStats { channel } => presence(shared, client, channel, true).await,
        CommandKind::History { channel, limit, since } => history(shared, client, channel, limit, since).await,
        CommandKind::Send { content } => send(shared, client, content),
        CommandKind::Rpc { method, data } => return start_rpc(shared, client, outbox, command.id, method, data),
    };
    outbox.push(answer(shared, command.id, result), 0)
}

/// The reply to a command, counted.
fn answer(shared: &Shared, id: u64, result: Result<Done, Refused>) -> Message {
    match result {
        Ok(done) => {
            shared.metrics.commands_done.inc();
            protocol::reply(id, &done)
        }
        Err(Refused(code, reason)) => {
            shared.metrics.commands_refused.inc();
            protocol::refusal(id, code, &reason)
        }
    }
}

/// The namespace rules of a client channel, after checking its name.
fn namespace_of<'a>(shared: &'a Shared, channel: &str) -> Result<&'a Namespace, Refused> {
    names::validate_client_channel(channel).map_err(|e| Refused::new(code::BAD_COMMAND, e.to_string()))?;
    shared.config.namespaces.of(channel).ok_or_else(|| {
        let namespace = names::client_channel(channel).map_or(channel, |(namespace, _)| namespace);
        Refused::new(code::UNKNOWN_NAMESPACE, format!("no namespace {namespace:?} on this gateway"))
    })
}

/// Subscribes, holding the channel's publications aside until the reply is
/// queued (see the module's doc).
async fn subscribe(
    shared: &Shared,
    client: &mut Client,
    outbox: &Outbox,
    id: u64,
    channel: String,
    token: Option<String>,
    recover: Option<StreamPosition>,
) -> Result<(), CloseReason> {
    // A stale stream's client subscribes again while still subscribed, to
    // recover what it missed.
    let again = outbox.is_stale(&channel);
    outbox.hold(&channel);
    match subscribed(shared, client, &channel, token, recover, again).await {
        Ok(history) => {
            let position = history.as_ref().map(|h| h.position.clone());
            let reply = answer(shared, id, Ok(Done::Subscribed { channel: channel.clone(), history }));
            let released = outbox.release(&channel, reply, position.as_ref());
            if !again {
                shared.subscribe_event(client.id, &channel);
            }
            if !again && shared.config.namespaces.of(&channel).is_some_and(|n| n.join_leave) {
                client.announced.push(channel.clone());
                announce(shared, client.id, channel, true);
            }
            released
        }
        Err(refused) => {
            outbox.forget(&channel, again);
            outbox.push(answer(shared, id, Err(refused)), 0)
        }
    }
}

/// Checks and makes a subscription; on a channel with history, reads its
/// position (and what the client missed, when it recovers).
async fn subscribed(
    shared: &Shared,
    client: &Client,
    channel: &str,
    token: Option<String>,
    recover: Option<StreamPosition>,
    again: bool,
) -> Result<Option<Recovery>, Refused> {
    let namespace = namespace_of(shared, channel)?;
    let user = shared.registry.user_of(client.id);
    match namespace.subscribe {
        SubscribeRule::Anyone => {}
        SubscribeRule::Users if user.is_some() => {}
        SubscribeRule::Users => {
            return Err(Refused::new(code::NOT_ALLOWED, "this namespace is for connections with a user id"));
        }
        SubscribeRule::Listed if client.listed.iter().any(|c| c == channel) => {}
        SubscribeRule::Listed => {
            return Err(Refused::new(code::NOT_ALLOWED, "the connection's token does not list this channel"));
        }
        SubscribeRule::Token => {
            let Some(token) = token else {
                return Err(Refused::new(code::NOT_ALLOWED, "this namespace needs a subscription token"));
            };
            let auth = shared.config.client_auth.as_ref().ok_or_else(|| {
                Refused::new(code::UNAVAILABLE, "this gateway has no keys to check subscription tokens")
            })?;
            auth.verify_subscription(&token, channel, user.as_deref(), unix_now())?;
        }
    }
    let journaled = if again {
        None
    } else {
        shared
            .registry
            .subscribe(client.id, channel, shared.config.max_client_channels)
            .map_err(subscription_refused)?
    };
    if let Some(journaled) = journaled {
        shared.followed.wait(journaled, FOLLOW_WAIT).await;
    }
    let Some(rule) = namespace.history else {
        return Ok(None);
    };
    // Read once the broker follows the subscription: what is published
    // from then on arrives live, and what came before is in the read.
    match recovery(shared, channel, &rule, recover).await {
        Ok(recovery) => Ok(Some(recovery)),
        Err(refused) if again => Err(refused),
        Err(refused) => {
            let _ = shared.registry.unsubscribe(client.id, channel);
            Err(refused)
        }
    }
}

/// Where a channel with history stands, and what a recovering client missed.
async fn recovery(
    shared: &Shared,
    channel: &str,
    rule: &HistoryRule,
    recover: Option<StreamPosition>,
) -> Result<Recovery, Refused> {
    let since = recover.filter(|_| rule.recover);
    let asked = since.is_some();
    let limit = if asked { u32::try_from(rule.size).unwrap_or(u32::MAX) } else { 0 };
    let read = read_history(shared, HistoryRequest { channel: channel.to_owned(), since, limit }).await?;
    let recovered = asked && read.complete;
    Ok(Recovery {
        position: read.position.unwrap_or_default(),
        recoverable: rule.recover,
        recovered,
        publications: if recovered { read.publications } else { Vec::new() },
    })
}

async fn read_history(shared: &Shared, req: HistoryRequest) -> Result<HistoryResponse, Refused> {
    let broker = broker(shared)?;
    Ok(broker.history(req).await?)
}

/// A channel's history, for a subscriber of it.
async fn history(
    shared: &Shared,
    client: &Client,
    channel: String,
    limit: u32,
    since: Option<StreamPosition>,
) -> Result<Done, Refused> {
    let namespace = namespace_of(shared, &channel)?;
    if namespace.history.is_none() {
        return Err(Refused::new(code::NOT_ALLOWED, "this namespace keeps no history"));
    }
    if !shared.registry.is_subscribed(client.id, &channel) {
        return Err(Refused::new(code::NOT_ALLOWED, "subscribe to the channel before reading its history"));
    }
    let read = read_history(shared, HistoryRequest { channel: channel.clone(), since, limit }).await?;
    Ok(Done::History {
        channel,
        publications: read.publications,
        position: read.position.unwrap_or_default(),
        complete: read.complete,
    })
}

/// Unsubscribes; answered, like a subscription, once the broker follows
/// it: from the reply on, presence no longer lists the connection.
async fn unsubscribe(shared: &Shared, client: &Client, outbox: &Outbox, channel: String) -> Result<Done, Refused> {
    names::validate_channel(&channel).map_err(|e| Refused::new(code::BAD_COMMAND, e.to_string()))?;
    let journaled = shared.registry.unsubscribe(client.id, &channel).map_err(subscription_refused)?;
    outbox.forget(&channel, false);
    if let Some(journaled) = journaled {
        shared.followed.wait(journaled, FOLLOW_WAIT).await;
    }
    Ok(Done::Unsubscribed { channel })
}

/// Hands a client's message to the backends, as a message event.
fn send(shared: &Shared, client: &Client, body: content::Body) -> Result<Done, Refused> {
    if !shared.events.kinds().message {
        return Err(Refused::new(code::NOT_ALLOWED, "this gateway passes no messages to backends"));
    }
    if shared.message_event(client.id, Content { body: Some(body) }) {
        Ok(Done::Sent)
    } else {
        Err(Refused::new(code::UNAVAILABLE, "the backends are not taking messages now: retry later"))
    }
}

/// Starts a call to a backend: its reply is queued when the backend
/// answers, and meanwhile the connection goes on (deliveries, other
/// commands, its close). At most [`MAX_RPCS_IN_FLIGHT`] at once.
fn start_rpc(
    shared: &Shared,
    client: &mut Client,
    outbox: &Outbox,
    id: u64,
    method: String,
    data: content::Body,
) -> Result<(), CloseReason> {
    let in_flight = client.rpcs.get_or_insert_with(Arc::default).clone();
    let request = match call_request(shared, client, method, data) {
        Ok(_) if in_flight.load(Ordering::Relaxed) >= MAX_RPCS_IN_FLIGHT => Err(Refused::new(
            code::TOO_MANY_SUBSCRIPTIONS,
            format!("{MAX_RPCS_IN_FLIGHT} rpcs are waiting for their answers already: wait for one"),
        )),
        outcome => outcome,
    };
    let request = match request {
        Ok(request) => request,
        Err(refused) => return outbox.push(answer(shared, id, Err(refused)), 0),
    };
    let (Some(outbox), Some(shared)) = (shared.registry.outbox(client.id), shared.this.upgrade()) else {
        return Err(CloseReason::ClientGone);
    };
    in_flight.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(async move {
        let result = rpc(&shared, request).await;
        // A connection closed meanwhile drops the answer.
        let _ = outbox.push(answer(&shared, id, result), 0);
        in_flight.fetch_sub(1, Ordering::Relaxed);
    });
    Ok(())
}

/// The call a client's rpc makes.
fn call_request(shared: &Shared, client: &Client, method: String, data: content::Body) -> Result<CallRequest, Refused> {
    names::validate_channel(&method).map_err(|e| Refused::new(code::BAD_COMMAND, format!("method: {e}")))?;
    broker(shared)?;
    Ok(CallRequest {
        method,
        data: Some(Content { body: Some(data) }),
        connection: Some(ConnectionAddress {
            worker_id: shared.config.worker_id.clone(),
            connection_id: client.id.to_string(),
        }),
        user_id: shared.registry.user_of(client.id).map(|u| u.to_string()).unwrap_or_default(),
        timeout_ms: u32::try_from(shared.config.rpc_timeout.as_millis()).unwrap_or(u32::MAX),
    })
}

/// Asks a backend serving the call's method, and answers with its answer.
async fn rpc(shared: &Shared, request: CallRequest) -> Result<Done, Refused> {
    let answer = broker(shared)?.call(request).await.map_err(|status| match status.code() {
        Code::NotFound => Refused::new(code::UNKNOWN_NAMESPACE, status.message()),
        Code::DeadlineExceeded => Refused::new(code::TIMED_OUT, status.message()),
        _ => Refused::from(status),
    })?;
    match answer.result {
        Some(call_answer::Result::Data(Content { body: Some(data) })) => Ok(Done::Rpc { data }),
        Some(call_answer::Result::Error(error)) => {
            let code = match error.code {
                c @ (400..=599 | 1000..) => c,
                _ => code::INTERNAL,
            };
            Err(Refused::new(code, error.message))
        }
        _ => Err(Refused::new(code::INTERNAL, "the backend answered without data")),
    }
}

/// The broker, once the gateway runs.
fn broker(shared: &Shared) -> Result<&Arc<dyn Broker>, Refused> {
    shared.broker.get().ok_or_else(|| Refused::new(code::UNAVAILABLE, "the gateway is starting"))
}

fn subscription_refused(e: SubscriptionError) -> Refused {
    let code = match e {
        SubscriptionError::AlreadySubscribed => code::ALREADY_SUBSCRIBED,
        SubscriptionError::NotSubscribed => code::NOT_SUBSCRIBED,
        SubscriptionError::TooMany | SubscriptionError::GatewayFull => code::TOO_MANY_SUBSCRIPTIONS,
        SubscriptionError::Closing => code::UNAVAILABLE,
    };
    Refused::new(code, e.to_string())
}

async fn publish(shared: &Shared, client: &Client, channel: String, body: content::Body) -> Result<Done, Refused> {
    let namespace = namespace_of(shared, &channel)?;
    match namespace.publish {
        PublishRule::Nobody => {
            return Err(Refused::new(code::NOT_ALLOWED, "clients may not publish to this namespace"));
        }
        PublishRule::Subscribers if !shared.registry.is_subscribed(client.id, &channel) => {
            return Err(Refused::new(code::NOT_ALLOWED, "subscribe to the channel before publishing to it"));
        }
        PublishRule::Subscribers => {}
    }
    let broker = broker(shared)?;
    let request = PublishRequest {
        target: Some(Target { kind: Some(target::Kind::Channel(channel.clone())), except: Vec::new() }),
        content: Some(Content { body: Some(body) }),
        idempotency_key: String::new(),
        presence_change: None,
    };
    broker.publish(request).await?;
    Ok(Done::Published { channel })
}

/// Who is subscribed to a channel (`stats`: how many), across the cluster,
/// for a subscriber of it in a namespace with presence on.
async fn presence(shared: &Shared, client: &Client, channel: String, stats: bool) -> Result<Done, Refused> {
    let namespace = namespace_of(shared, &channel)?;
    if !namespace.presence {
        return Err(Refused::new(code::NOT_ALLOWED, "presence is off in this namespace"));
    }
    if !shared.registry.is_subscribed(client.id, &channel) {
        return Err(Refused::new(code::NOT_ALLOWED, "subscribe to the channel before asking who is there"));
    }
    let broker = broker(shared)?;
    let question = if stats {
        query_request::Question::ChannelCount(channel.clone())
    } else {
        query_request::Question::ChannelSubscribers(channel.clone())
    };
    let answer = broker
        .query(QueryRequest { question: Some(question) })
        .await
        .map_err(|status| Refused::new(code::UNAVAILABLE, status.message()))?;
    if stats {
        return Ok(Done::PresenceStats {
            channel,
            connections: answer.count,
            users: answer.users,
            missing_workers: answer.missing_workers,
        });
    }
    if answer.connections.len() > MAX_PRESENCE {
        return Err(Refused::new(
            code::TOO_LARGE,
            format!("{} subscribers, more than {MAX_PRESENCE}: ask presence_stats", answer.connections.len()),
        ));
    }
    let clients = answer
        .connections
        .into_iter()
        .map(|info| {
            let address = info.address.unwrap_or_default();
            Subscriber { worker_id: address.worker_id, connection_id: address.connection_id, user_id: info.user_id }
        })
        .collect();
    Ok(Done::Presence { channel, clients, missing_workers: answer.missing_workers })
}

fn refresh(shared: &Shared, client: &mut Client, token: &str) -> Result<Done, Refused> {
    let auth = shared
        .config
        .client_auth
        .as_ref()
        .ok_or_else(|| Refused::new(code::BAD_COMMAND, "this gateway does not check tokens: nothing to refresh"))?;
    let identity = auth.verify(token, unix_now())?;
    if shared.registry.user_of(client.id).as_deref() != Some(identity.user_id.as_str()) {
        return Err(Refused::new(code::TOKEN_REFUSED, "a refreshed token must be for the connection's user"));
    }
    if !shared.registry.refresh(client.id, client.expires_at, identity.expires_at) {
        return Err(Refused::new(code::UNAVAILABLE, "the connection is closing"));
    }
    client.expires_at = identity.expires_at;
    client.listed = identity.channels;
    Ok(Done::Refreshed { expires_at: identity.expires_at })
}
