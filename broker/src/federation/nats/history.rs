//! Channel history in NATS JetStream, shared by every broker of a cluster:
//! one stream per namespace with history (`<PREFIX>_HISTORY_<namespace>`),
//! one subject per channel (`<prefix>_history.<namespace>.<name>`), the
//! namespace's size and lifetime as the stream's per-subject limits.
//!
//! - **Offsets.** Each publication carries its channel offset and epoch in
//!   headers. A broker appends with `Nats-Expected-Last-Subject-Sequence`,
//!   so two brokers appending to one channel at once cannot both take the
//!   same offset: the loser reads the channel's last publication and tries
//!   again. A channel whose subject is empty (never written, or every
//!   publication expired, or the stream was lost) starts a new epoch at 1.
//! - **Delivery.** Every broker reads every stream in stream order and
//!   hands each publication to its own listeners ([`deliver`]), the broker
//!   that appended it included: the order clients see is the stream's, the
//!   same on every broker, and a broker's death loses nothing stored.
//! - **Reads** for recovery get the channel's retained publications with
//!   one batched direct get, from any broker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::datetime::DateTime;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{Config, DiscardPolicy, LastRawMessageErrorKind, StorageType, Stream};
use async_nats::jetstream::{self, consumer};
use herald_common::backoff::Backoff;
use herald_common::namespaces::{HistoryRule, Namespace, Namespaces};
use herald_common::token::random_token;
use herald_proto::names;
use herald_proto::v1::{Content, Event, HistoryPublication, HistoryResponse, StreamPosition};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::federation::{FederationError, Notice};
use crate::history::Read;

const OFFSET: &str = "Herald-Offset";
const EPOCH: &str = "Herald-Epoch";
/// Attempts of one append that lose the race for an offset.
const APPEND_ATTEMPTS: usize = 8;
/// Most channels whose last position a broker remembers for appending.
const MAX_TAILS: usize = 100_000;
/// How long a read waits for the next publication of a channel it walks.
const READ_WAIT: Duration = Duration::from_secs(2);

/// Where the history streams live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryStorage {
    /// On the NATS servers' disks: it survives their restart.
    File,
    /// In their memory: a NATS restart loses it (clients then learn that
    /// they cannot recover: the epoch changes).
    Memory,
}

/// What the history streams are made of.
#[derive(Debug, Clone)]
pub struct HistoryConfig {
    pub namespaces: Namespaces,
    pub storage: HistoryStorage,
    /// Subject prefix of the channels; the history subjects take
    /// `<prefix>_history`.
    pub subject_prefix: String,
    pub replicas: usize,
}

impl HistoryConfig {
    fn subject(&self, channel: &str) -> Option<String> {
        let (namespace, name) = names::client_channel(channel)?;
        Some(format!("{}_history.{namespace}.{name}", self.subject_prefix))
    }

    fn channel(&self, subject: &str) -> Option<String> {
        let rest = subject.strip_prefix(&self.subject_prefix)?.strip_prefix("_history.")?;
        let (namespace, name) = rest.split_once('.')?;
        Some(format!("{namespace}:{name}"))
    }

    fn stream_name(&self, namespace: &str) -> String {
        format!("{}_HISTORY_{namespace}", self.subject_prefix.replace('.', "_").to_uppercase())
    }

    fn stream_config(&self, namespace: &Namespace, rule: &HistoryRule) -> Config {
        Config {
            name: self.stream_name(&namespace.name),
            subjects: vec![format!("{}_history.{}.>", self.subject_prefix, namespace.name)],
            max_messages_per_subject: i64::try_from(rule.size).unwrap_or(i64::MAX),
            max_age: rule.ttl,
            storage: match self.storage {
                HistoryStorage::File => StorageType::File,
                HistoryStorage::Memory => StorageType::Memory,
            },
            discard: DiscardPolicy::Old,
            allow_direct: true,
            num_replicas: self.replicas.max(1),
            ..Config::default()
        }
    }
}

/// The last publication of a channel, as an append continues from it.
#[derive(Debug, Clone)]
struct Tail {
    sequence: u64,
    offset: u64,
    epoch: String,
}

/// History kept in JetStream for the whole cluster.
pub struct JetStreamHistory {
    context: jetstream::Context,
    config: HistoryConfig,
    /// Per channel, the lock its appends take turns on and its last
    /// publication, as far as this broker knows.
    tails: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Tail>>>>>,
    /// The streams opened so far, by namespace.
    streams: Mutex<HashMap<String, Stream>>,
}

impl JetStreamHistory {
    /// The history streams on `client`'s NATS, and the tasks that deliver
    /// their publications to this broker (as [`Notice::Event`]s) until `stop`.
    /// `connections` counts the client's (re)connections.
    pub fn start(
        client: async_nats::Client,
        config: HistoryConfig,
        connections: Arc<AtomicU64>,
        notices: mpsc::Sender<Notice>,
        stop: CancellationToken,
    ) -> Self {
        let context = jetstream::new(client);
        for namespace in config.namespaces.iter().filter(|n| n.history.is_some()) {
            let delivery = Delivery {
                context: context.clone(),
                config: config.clone(),
                namespace: namespace.clone(),
                connections: connections.clone(),
                notices: notices.clone(),
            };
            tokio::spawn(delivery.run(stop.clone()));
        }
        Self { context, config, tails: Mutex::default(), streams: Mutex::default() }
    }

    /// Stores `content` as `channel`'s next publication, and says whether it
    /// was a duplicate. A publish retried with the same idempotency `key`
    /// (within JetStream's duplicate window) is stored once: its first
    /// position is returned.
    pub async fn append(
        &self,
        channel: &str,
        rule: &HistoryRule,
        content: &Content,
        key: &str,
    ) -> Result<(StreamPosition, bool), FederationError> {
        let subject = self.subject(channel)?;
        let payload = bytes::Bytes::from(content.encode_to_vec());
        // One append at a time per channel on this broker (other brokers'
        // are kept out by the expected last sequence); channels go in parallel.
        let turn = self.turn(channel);
        let mut tail = turn.lock().await;
        for _ in 0..APPEND_ATTEMPTS {
            if tail.is_none() {
                *tail = self.last(channel, rule).await?;
            }
            let (offset, epoch, expected) = match tail.clone() {
                Some(tail) => (tail.offset + 1, tail.epoch, tail.sequence),
                None => (1, random_token(8), 0),
            };
            let mut publish = PublishMessage::build();
            if !key.is_empty() {
                publish = publish.message_id(key);
            }
            let publish = publish
                .payload(payload.clone())
                .expected_last_subject_sequence(expected)
                .header(OFFSET, offset.to_string().as_str())
                .header(EPOCH, epoch.as_str());
            let acked = match self.context.send_publish(subject.clone(), publish).await {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match acked {
                Ok(ack) if ack.duplicate => {
                    *tail = None;
                    return Ok((self.position_at(channel, rule, ack.sequence).await?, true));
                }
                Ok(ack) => {
                    *tail = Some(Tail { sequence: ack.sequence, offset, epoch: epoch.clone() });
                    return Ok((StreamPosition { offset, epoch }, false));
                }
                // Another broker appended meanwhile, or the channel expired.
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => *tail = None,
                Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                    *tail = None;
                    self.ensure_stream(channel, rule).await?;
                }
                Err(e) => return Err(FederationError(format!("storing a publication of {channel:?}: {e}"))),
            }
        }
        Err(FederationError(format!("storing a publication of {channel:?}: too many concurrent appends, retry")))
    }

    /// The lock `channel`'s appends take turns on, holding its last known
    /// publication. Past `MAX_TAILS` channels, the idle ones are forgotten.
    fn turn(&self, channel: &str) -> Arc<tokio::sync::Mutex<Option<Tail>>> {
        let mut tails = self.tails.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(turn) = tails.get(channel) {
            return turn.clone();
        }
        if tails.len() >= MAX_TAILS {
            tails.retain(|_, turn| Arc::strong_count(turn) > 1);
        }
        tails.entry(channel.to_owned()).or_default().clone()
    }

    /// Reads `channel`'s history (see [`Read`]).
    pub async fn read(
        &self,
        channel: &str,
        rule: &HistoryRule,
        read: &Read,
    ) -> Result<HistoryResponse, FederationError> {
        let Some(last) = self.last(channel, rule).await? else {
            return Ok(read.of_nothing());
        };
        let top = StreamPosition { offset: last.offset, epoch: last.epoch.clone() };
        let after = read.after(&top);
        // Walked only when there is something past `after` (nothing is newer
        // than the last publication), and something to learn: publications,
        // or, with `since`, the oldest offset held.
        let (publications, oldest) = match after {
            Some(after) if after < last.offset && (read.limit > 0 || read.since.is_some()) => {
                let (publications, oldest) = self.walk(channel, rule, &last, after, read.limit as usize).await?;
                (publications, oldest.unwrap_or(last.offset + 1))
            }
            _ => (Vec::new(), last.offset + 1),
        };
        Ok(read.answer(top, after, oldest, publications))
    }

    /// The publications of `channel` after offset `after` (at most
    /// `limit`), up to its last one, and the oldest offset the stream holds.
    /// One batched direct get (`$JS.API.DIRECT.GET`, NATS 2.11+) reads the
    /// channel's retained publications, oldest first, in a single exchange:
    /// no consumer is made, so reads cost the server nothing to clean up.
    async fn walk(
        &self,
        channel: &str,
        rule: &HistoryRule,
        last: &Tail,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<HistoryPublication>, Option<u64>), FederationError> {
        let failed = |e: &dyn std::fmt::Display| FederationError(format!("reading the history of {channel:?}: {e}"));
        let namespace = names::client_channel(channel).map(|(namespace, _)| namespace).unwrap_or_default();
        self.stream(channel, rule).await?;
        let client = self.context.client();
        let inbox = client.new_inbox();
        let mut replies = client.subscribe(inbox.clone()).await.map_err(|e| failed(&e))?;
        // A channel's subject is made of name tokens: nothing in it needs
        // escaping in JSON.
        let request =
            format!(r#"{{"seq":1,"next_by_subj":"{}","batch":{}}}"#, self.subject(channel)?, rule.size.max(1));
        let api = format!("$JS.API.DIRECT.GET.{}", self.config.stream_name(namespace));
        client.publish_with_reply(api, inbox, request.into()).await.map_err(|e| failed(&e))?;
        let mut publications = Vec::new();
        let mut oldest = None;
        loop {
            let reply = match tokio::time::timeout(READ_WAIT, replies.next()).await {
                Ok(Some(reply)) => reply,
                Ok(None) | Err(_) => return Err(failed(&"no end of batch from JetStream in time")),
            };
            match reply.status.map(|status| status.as_u16()) {
                // The end of the batch, or nothing (left) on the subject.
                Some(204 | 404) => return Ok((publications, oldest)),
                Some(code) => {
                    return Err(failed(&format!("{code} {}", reply.description.as_deref().unwrap_or(""))));
                }
                None => {}
            }
            let headers = reply.headers.as_ref();
            let sequence: u64 = headers
                .and_then(|h| h.get("Nats-Sequence"))
                .and_then(|v| v.as_str().parse().ok())
                .ok_or_else(|| failed(&"a stored publication without its sequence"))?;
            if let Some((offset, epoch)) = position_of(headers)
                && epoch == last.epoch
            {
                oldest.get_or_insert(offset);
                if offset > after && publications.len() < limit {
                    let published_at = headers
                        .and_then(|h| h.get("Nats-Time-Stamp"))
                        .and_then(|v| async_nats::datetime::parse_rfc3339(v.as_str()).ok())
                        .map(timestamp);
                    publications.push(HistoryPublication {
                        offset,
                        content: Content::decode(reply.payload.clone()).ok(),
                        published_at,
                    });
                }
            }
            if sequence >= last.sequence {
                // Past the last one read before: newer ones are live.
                return Ok((publications, oldest));
            }
        }
    }

    /// The position of the publication stored at `sequence`.
    async fn position_at(
        &self,
        channel: &str,
        rule: &HistoryRule,
        sequence: u64,
    ) -> Result<StreamPosition, FederationError> {
        let stream = self.stream(channel, rule).await?;
        let message = stream
            .get_raw_message(sequence)
            .await
            .map_err(|e| FederationError(format!("reading a publication of {channel:?}: {e}")))?;
        let (offset, epoch) = position_of(Some(&message.headers))
            .ok_or_else(|| FederationError(format!("a publication of {channel:?} has no offset or epoch")))?;
        Ok(StreamPosition { offset, epoch })
    }

    /// The last publication of `channel`, if its subject holds any.
    async fn last(&self, channel: &str, rule: &HistoryRule) -> Result<Option<Tail>, FederationError> {
        let stream = self.stream(channel, rule).await?;
        match stream.get_last_raw_message_by_subject(&self.subject(channel)?).await {
            Ok(message) => {
                let (offset, epoch) = position_of(Some(&message.headers)).ok_or_else(|| {
                    FederationError(format!("the last publication of {channel:?} has no offset or epoch"))
                })?;
                Ok(Some(Tail { sequence: message.sequence, offset, epoch }))
            }
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => {
                // The stream may have been lost with its NATS store: open it
                // anew on the next call.
                self.forget_stream(channel);
                Err(FederationError(format!("reading the last publication of {channel:?}: {e}")))
            }
        }
    }

    /// The stream of `channel`'s namespace, as last opened.
    async fn stream(&self, channel: &str, rule: &HistoryRule) -> Result<Stream, FederationError> {
        let namespace = names::client_channel(channel).map(|(namespace, _)| namespace).unwrap_or_default();
        let opened = self.streams.lock().unwrap_or_else(PoisonError::into_inner).get(namespace).cloned();
        match opened {
            Some(stream) => Ok(stream),
            None => self.ensure_stream(channel, rule).await,
        }
    }

    fn forget_stream(&self, channel: &str) {
        if let Some((namespace, _)) = names::client_channel(channel) {
            self.streams.lock().unwrap_or_else(PoisonError::into_inner).remove(namespace);
        }
    }

    /// Opens the stream of `channel`'s namespace, making it (or bringing its
    /// limits up to date) if needed, and keeps it for the next calls.
    async fn ensure_stream(&self, channel: &str, rule: &HistoryRule) -> Result<Stream, FederationError> {
        let namespace = self
            .config
            .namespaces
            .of(channel)
            .ok_or_else(|| FederationError(format!("{channel:?} is in no configured namespace")))?;
        let failed = |e: &dyn std::fmt::Display| {
            FederationError(format!("opening the history stream of {:?}: {e}", namespace.name))
        };
        let config = self.config.stream_config(namespace, rule);
        let name = config.name.clone();
        self.context.create_or_update_stream(config).await.map_err(|e| failed(&e))?;
        let stream = self.context.get_stream(name).await.map_err(|e| failed(&e))?;
        self.streams.lock().unwrap_or_else(PoisonError::into_inner).insert(namespace.name.clone(), stream.clone());
        Ok(stream)
    }

    fn subject(&self, channel: &str) -> Result<String, FederationError> {
        self.config.subject(channel).ok_or_else(|| FederationError(format!("{channel:?} is not a client channel")))
    }
}

/// The offset and epoch a stored publication carries.
fn position_of(headers: Option<&HeaderMap>) -> Option<(u64, String)> {
    let headers = headers?;
    let offset = headers.get(OFFSET)?.as_str().parse().ok()?;
    Some((offset, headers.get(EPOCH)?.as_str().to_owned()))
}

fn timestamp(at: DateTime) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: at.unix_timestamp(), nanos: i32::try_from(at.nanosecond()).unwrap_or(0) }
}

/// How often a delivery checks that its consumer outlived the connection.
const RECONNECT_CHECK: Duration = Duration::from_millis(250);

/// Delivers one namespace's publications to this broker, in stream order,
/// from the end of the stream when the broker starts; after an outage,
/// from where it stopped (or from the start of a stream made anew).
struct Delivery {
    context: jetstream::Context,
    config: HistoryConfig,
    namespace: Namespace,
    /// The NATS client's (re)connections so far.
    connections: Arc<AtomicU64>,
    notices: mpsc::Sender<Notice>,
}

/// Where a delivery stands: the stream's creation time, and the next
/// sequence to deliver.
struct Resume {
    created: String,
    next: u64,
}

impl Delivery {
    async fn run(self, stop: CancellationToken) {
        let Some(rule) = self.namespace.history else {
            return;
        };
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut resume: Option<Resume> = None;
        while !stop.is_cancelled() {
            let connection = self.connections.load(Ordering::Relaxed);
            match self.consume(&rule, &mut resume, connection, &stop).await {
                Ok(()) => backoff.reset(),
                Err(e) => tracing::debug!(namespace = %self.namespace.name, error = %e, "history delivery interrupted"),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    /// Reads the stream from `resume` until the connection is made again or
    /// the reading fails.
    async fn consume(
        &self,
        rule: &HistoryRule,
        resume: &mut Option<Resume>,
        connection: u64,
        stop: &CancellationToken,
    ) -> Result<(), FederationError> {
        let failed = |e: &dyn std::fmt::Display| FederationError(e.to_string());
        let config = self.config.stream_config(&self.namespace, rule);
        let name = config.name.clone();
        self.context.create_or_update_stream(config).await.map_err(|e| failed(&e))?;
        let mut stream = self.context.get_stream(name).await.map_err(|e| failed(&e))?;
        let info = stream.info().await.map_err(|e| failed(&e))?;
        let created = info.created.to_string();
        let next = match resume.take() {
            Some(was) if was.created == created => was.next,
            // Made anew (its store was lost): all of it is new.
            Some(_) => 1,
            None => info.state.last_sequence + 1,
        };
        *resume = Some(Resume { created: created.clone(), next });
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: next },
                ..Default::default()
            })
            .await
            .map_err(|e| failed(&e))?;
        let mut messages = consumer.messages().await.map_err(|e| failed(&e))?;
        let mut check = tokio::time::interval(RECONNECT_CHECK);
        loop {
            let message = tokio::select! {
                () = stop.cancelled() => return Ok(()),
                _ = check.tick() => {
                    if self.connections.load(Ordering::Relaxed) != connection {
                        return Ok(());
                    }
                    continue;
                }
                message = messages.next() => message,
            };
            let message = match message {
                Some(Ok(message)) => message,
                Some(Err(e)) => return Err(failed(&e)),
                None => return Err(failed(&"the stream's messages ended")),
            };
            let Ok(info) = message.info() else {
                continue;
            };
            let (sequence, published) = (info.stream_sequence, info.published);
            *resume = Some(Resume { created: created.clone(), next: sequence + 1 });
            let headers = message.headers.as_ref();
            let notice = match event_of(&self.config, &message.subject, headers, &message.payload, published) {
                Some(event) => Notice::Event(event),
                None => Notice::Undecodable,
            };
            if self.notices.send(notice).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// The event of a stored publication, for local listeners.
fn event_of(
    config: &HistoryConfig,
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: &bytes::Bytes,
    published: DateTime,
) -> Option<Event> {
    let channel = config.channel(subject)?;
    let (offset, epoch) = position_of(headers)?;
    let content = Content::decode(payload.clone()).ok()?;
    Some(Event {
        channel,
        target: None,
        content: Some(content),
        published_at: Some(timestamp(published)),
        delivery: None,
        position: Some(StreamPosition { offset, epoch }),
        presence_change: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> HistoryConfig {
        HistoryConfig {
            namespaces: Namespaces::parse(["feed:history=10"]).unwrap(),
            storage: HistoryStorage::File,
            subject_prefix: "herald.ch".into(),
            replicas: 1,
        }
    }

    #[test]
    fn a_channel_has_a_subject_in_its_namespace_s_stream_and_back() {
        let config = config();
        assert_eq!(config.subject("feed:room.1").as_deref(), Some("herald.ch_history.feed.room.1"));
        assert_eq!(config.channel("herald.ch_history.feed.room.1").as_deref(), Some("feed:room.1"));
        assert_eq!(config.channel("herald.ch.feed.room"), None);
        assert_eq!(config.stream_name("feed"), "HERALD_CH_HISTORY_feed");
        let namespace = config.namespaces.of("feed:a").unwrap();
        let stream = config.stream_config(namespace, &namespace.history.unwrap());
        assert_eq!(stream.subjects, ["herald.ch_history.feed.>"]);
        assert_eq!(stream.max_messages_per_subject, 10);
    }
}
