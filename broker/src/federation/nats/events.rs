//! The event log of a cluster, in NATS JetStream: connection events outlive
//! the broker that took them, and every broker serves every group.
//!
//! One stream (`<PREFIX>_EVENTS`, subjects `<prefix>_events.<kind>`) holds
//! the events, within the retention (a count and an age, the oldest
//! discarded first), with the event id as `Nats-Msg-Id` so that a retried
//! report is stored once. Each consumer group is a durable pull consumer of
//! that stream, created on first use and delivering what is stored from
//! then on; every broker with instances of a group pulls from the same
//! consumer, so JetStream shares the group's events among them and
//! redelivers what is not acknowledged within the ack wait. An ack id is
//! the delivery's JetStream ack subject, so any broker can acknowledge it.
//!
//! The stream and consumers are made when first needed, and made again
//! after an error (a NATS restarted with memory storage lost them).
//!
//! Overflow: past the retention the stream discards its oldest events. A
//! group that had not acknowledged them lost them; [`JetStreamEvents::watch`]
//! counts those, for each group consumed on this broker, from the group's
//! ack floor and the stream's first sequence.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{Config, DiscardPolicy, StorageType, Stream};
use async_nats::jetstream::{self, Message as JetStreamMessage};
use async_trait::async_trait;
use herald_proto::v1::{ConnectionEvent, ConsumedEvent};
use prost::Message;
use tokio::sync::Mutex;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use super::history::HistoryStorage;
use crate::backends::log::{EventLog, LogError};
use crate::backends::{LogConfig, kind_name};

/// Unacknowledged deliveries a group may have in the whole cluster.
const MAX_ACK_PENDING: i64 = 1_000_000;
/// How long one wait for a group's next event lasts, at most.
const LONGEST_WAIT: Duration = Duration::from_secs(1);
/// How often the groups are checked for events the stream discarded.
const WATCH_EVERY: Duration = Duration::from_secs(5);

/// What the event stream is made of.
#[derive(Debug, Clone)]
pub struct EventsConfig {
    pub log: LogConfig,
    pub storage: HistoryStorage,
    /// Subject prefix of the channels; event subjects take `<prefix>_events`.
    pub subject_prefix: String,
    pub replicas: usize,
}

impl EventsConfig {
    fn stream_name(&self) -> String {
        format!("{}_EVENTS", self.subject_prefix.replace('.', "_").to_uppercase())
    }

    fn subject(&self, event: &ConnectionEvent) -> String {
        format!("{}_events.{}", self.subject_prefix, kind_name(event))
    }

    fn stream_config(&self) -> Config {
        Config {
            name: self.stream_name(),
            subjects: vec![format!("{}_events.>", self.subject_prefix)],
            max_messages: i64::try_from(self.log.retention).unwrap_or(i64::MAX),
            max_age: self.log.max_age,
            discard: DiscardPolicy::Old,
            duplicate_window: Duration::from_secs(120),
            storage: match self.storage {
                HistoryStorage::File => StorageType::File,
                HistoryStorage::Memory => StorageType::Memory,
            },
            num_replicas: self.replicas.max(1),
            ..Config::default()
        }
    }

    fn consumer_config(&self, group: &str) -> pull::Config {
        pull::Config {
            durable_name: Some(group.to_owned()),
            deliver_policy: DeliverPolicy::New,
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.log.ack_wait,
            max_ack_pending: MAX_ACK_PENDING,
            ..pull::Config::default()
        }
    }

    /// Whether `ack_id` is a JetStream ack subject of `group` on the event
    /// stream: nothing else is ever published on a backend's word.
    fn is_ack_of(&self, ack_id: &str, group: &str) -> bool {
        let tokens: Vec<&str> = ack_id.split('.').collect();
        let stream = self.stream_name();
        tokens.len() >= 9
            && tokens[0] == "$JS"
            && tokens[1] == "ACK"
            && tokens.windows(2).any(|pair| pair[0] == stream && pair[1] == group)
            && tokens.iter().all(|t| !t.is_empty() && *t != "*" && *t != ">")
    }
}

/// The event log of a NATS cluster.
pub struct JetStreamEvents {
    context: jetstream::Context,
    config: EventsConfig,
    stream: Mutex<Option<Stream>>,
    consumers: Mutex<HashMap<String, PullConsumer>>,
    /// Per group: events lost to the retention, and the stream sequence
    /// counted up to.
    dropped: std::sync::Mutex<HashMap<String, (u64, u64)>>,
}

impl JetStreamEvents {
    pub fn new(client: async_nats::Client, config: EventsConfig) -> Self {
        Self {
            context: jetstream::new(client),
            config,
            stream: Mutex::default(),
            consumers: Mutex::default(),
            dropped: std::sync::Mutex::default(),
        }
    }

    /// Counts, every few seconds until `stop`, the events the stream
    /// discarded before the groups consumed here acknowledged them.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(WATCH_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let consumers: Vec<(String, PullConsumer)> =
                self.consumers.lock().await.iter().map(|(g, c)| (g.clone(), c.clone())).collect();
            if consumers.is_empty() {
                continue;
            }
            let Some(stream) = self.stream.lock().await.clone() else { continue };
            let Ok(stream_info) = stream.get_info().await else { continue };
            let first = stream_info.state.first_sequence;
            for (group, consumer) in consumers {
                let Ok(info) = consumer.get_info().await else { continue };
                let floor = info.ack_floor.stream_sequence;
                let mut dropped = self.dropped.lock().unwrap_or_else(PoisonError::into_inner);
                let (count, upto) = dropped.entry(group).or_insert((0, floor));
                let gone_upto = first.saturating_sub(1);
                if gone_upto > (*upto).max(floor) {
                    *count += gone_upto - (*upto).max(floor);
                }
                *upto = (*upto).max(gone_upto);
            }
        }
    }

    async fn stream(&self) -> Result<Stream, LogError> {
        let mut stream = self.stream.lock().await;
        if let Some(stream) = stream.as_ref() {
            return Ok(stream.clone());
        }
        let made = self.context.get_or_create_stream(self.config.stream_config()).await.map_err(unavailable)?;
        *stream = Some(made.clone());
        Ok(made)
    }

    async fn consumer(&self, group: &str) -> Result<PullConsumer, LogError> {
        if let Some(consumer) = self.consumers.lock().await.get(group) {
            return Ok(consumer.clone());
        }
        let stream = self.stream().await?;
        let consumer: PullConsumer =
            stream.get_or_create_consumer(group, self.config.consumer_config(group)).await.map_err(unavailable)?;
        // Losses are counted from here on: from the group's ack floor.
        let floor = consumer.get_info().await.map_err(unavailable)?.ack_floor.stream_sequence;
        self.dropped.lock().unwrap_or_else(PoisonError::into_inner).entry(group.to_owned()).or_insert((0, floor));
        self.consumers.lock().await.insert(group.to_owned(), consumer.clone());
        Ok(consumer)
    }

    /// Forgets the stream and consumers after an error: they are made again
    /// on next use.
    async fn reset(&self) {
        *self.stream.lock().await = None;
        self.consumers.lock().await.clear();
    }

    async fn take(
        &self,
        consumer: &PullConsumer,
        max: usize,
        wait: Option<Duration>,
    ) -> Result<Vec<ConsumedEvent>, LogError> {
        let mut messages = match wait {
            None => consumer.fetch().max_messages(max).messages().await.map_err(unavailable)?,
            Some(wait) => consumer.batch().max_messages(max).expires(wait).messages().await.map_err(unavailable)?,
        };
        let mut taken = Vec::new();
        while let Some(message) = messages.next().await {
            let message = message.map_err(unavailable)?;
            match consumed(&message) {
                Some(event) => taken.push(event),
                None => {
                    // Not an event of ours: acknowledged, so that it is not delivered forever.
                    tracing::warn!(subject = %message.subject, "undecodable message on the event stream");
                    let _ = message.ack().await;
                }
            }
        }
        Ok(taken)
    }

    async fn publish_acks(&self, ack_ids: &[String], payload: &'static [u8]) -> Result<(), LogError> {
        let client = self.context.client();
        for ack_id in ack_ids {
            client.publish(ack_id.clone(), payload.into()).await.map_err(unavailable)?;
        }
        client.flush().await.map_err(unavailable)
    }
}

fn unavailable(error: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(error.to_string())
}

/// A JetStream delivery as a group's event.
fn consumed(message: &JetStreamMessage) -> Option<ConsumedEvent> {
    let event = ConnectionEvent::decode(message.payload.clone()).ok()?;
    let delivery = message.info().ok().map_or(1, |info| u32::try_from(info.delivered).unwrap_or(u32::MAX));
    let ack_id = message.reply.as_ref()?.to_string();
    Some(ConsumedEvent { event: Some(event), ack_id, delivery })
}

#[async_trait]
impl EventLog for JetStreamEvents {
    async fn store(&self, events: &[ConnectionEvent]) -> Result<(), LogError> {
        self.stream().await?;
        let mut acks: Vec<PublishAckFuture> = Vec::with_capacity(events.len());
        for event in events {
            let publish = PublishMessage::build().message_id(event.id.as_str()).payload(event.encode_to_vec().into());
            match self.context.send_publish(self.config.subject(event), publish).await {
                Ok(ack) => acks.push(ack),
                Err(e) => {
                    self.reset().await;
                    return Err(unavailable(e));
                }
            }
        }
        for ack in acks {
            if let Err(e) = ack.await {
                self.reset().await;
                return Err(unavailable(e));
            }
        }
        Ok(())
    }

    async fn open(&self, group: &str) -> Result<(), LogError> {
        self.consumer(group).await.map(drop)
    }

    async fn pull(&self, group: &str, max: usize, wait: Duration) -> Result<Vec<ConsumedEvent>, LogError> {
        let consumer = self.consumer(group).await?;
        let outcome = async {
            let taken = self.take(&consumer, max, None).await?;
            if !taken.is_empty() || wait.is_zero() {
                return Ok(taken);
            }
            // Nothing now: wait for the next one, then take what came with it.
            let mut taken = self.take(&consumer, 1, Some(wait.min(LONGEST_WAIT))).await?;
            if !taken.is_empty() && max > 1 {
                taken.extend(self.take(&consumer, max - 1, None).await?);
            }
            Ok(taken)
        }
        .await;
        if outcome.is_err() {
            self.reset().await;
        }
        outcome
    }

    async fn ack(&self, group: &str, ack_ids: &[String]) -> Result<(), LogError> {
        if let Some(bad) = ack_ids.iter().find(|id| !self.config.is_ack_of(id, group)) {
            return Err(LogError::Invalid(format!("ack id {bad:?} is not a delivery of group {group:?}")));
        }
        self.publish_acks(ack_ids, b"+ACK").await
    }

    async fn release(&self, group: &str, ack_ids: &[String]) {
        let ours: Vec<String> = ack_ids.iter().filter(|id| self.config.is_ack_of(id, group)).cloned().collect();
        if let Err(e) = self.publish_acks(&ours, b"-NAK").await {
            tracing::debug!(error = %e, "handing deliveries back failed: they come back after the ack wait");
        }
    }

    fn dropped(&self) -> Vec<(String, u64)> {
        let dropped = self.dropped.lock().unwrap_or_else(PoisonError::into_inner);
        dropped.iter().map(|(group, (count, _))| (group.clone(), *count)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> EventsConfig {
        EventsConfig {
            log: LogConfig::default(),
            storage: HistoryStorage::File,
            subject_prefix: "herald.ch".into(),
            replicas: 1,
        }
    }

    #[test]
    fn only_ack_subjects_of_the_group_on_the_event_stream_are_published() {
        let config = config();
        assert_eq!(config.stream_name(), "HERALD_CH_EVENTS");
        assert!(config.is_ack_of("$JS.ACK.HERALD_CH_EVENTS.billing.1.42.7.1700000000000000000.0", "billing"));
        assert!(config.is_ack_of("$JS.ACK.dom.hash.HERALD_CH_EVENTS.billing.1.42.7.17000.0.tok", "billing"));
        for bad in [
            "$JS.ACK.HERALD_CH_EVENTS.audit.1.42.7.1700000000000000000.0",
            "$JS.ACK.OTHER.billing.1.42.7.1700000000000000000.0",
            "herald.ch.broadcast",
            "$JS.ACK.HERALD_CH_EVENTS.billing.*.42.7.17.0",
            "$JS.API.STREAM.DELETE.HERALD_CH_EVENTS.billing.x.y.z",
        ] {
            assert!(!config.is_ack_of(bad, "billing"), "{bad}");
        }
    }
}
