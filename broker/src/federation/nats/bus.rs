//! The message bus between brokers: one NATS subscription per channel that
//! has a local listener, added and dropped as interest comes and goes, and
//! the decoding of what arrives. Questions for this broker's gateways
//! arrive here too: on one subject per worker id it serves, and on one
//! subject every broker listens on; each is answered on its reply subject.
//!
//! One task owns the subscriptions and applies interest changes in the order
//! the hub made them. A `Sync` request is answered once every earlier change
//! has reached the NATS server, so a subscriber's ack means "events published
//! anywhere in the cluster from now on reach you".

use async_nats::{Client, Subscriber};
use herald_proto::names;
use herald_proto::v1::Event;
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::{StreamExt, StreamMap};
use tokio_util::sync::CancellationToken;

use crate::federation::{Answer, Ask, FederationError, Interest, Notice};

/// What the bus task is asked to do, in order.
#[derive(Debug)]
pub(super) enum Change {
    /// Follow a change of this broker's interest.
    Interest(Interest),
    /// Answer once every earlier change has reached the NATS server.
    Sync(oneshot::Sender<Result<(), FederationError>>),
}

/// The NATS subject a channel travels on.
pub(super) fn subject(prefix: &str, channel: &str) -> String {
    format!("{prefix}.{channel}")
}

/// The NATS subject of questions for the gateway holding `worker_id`. Its
/// first token differs from the channels' (`herald.ch_ask` next to
/// `herald.ch`), so that no channel name can reach it.
pub(super) fn ask_worker_subject(prefix: &str, worker_id: &str) -> String {
    format!("{prefix}_ask.worker.{worker_id}")
}

/// The NATS subject of questions for every broker.
pub(super) fn ask_all_subject(prefix: &str) -> String {
    format!("{prefix}_ask.all")
}

/// What a subscription carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Feed {
    /// Events of a channel.
    Channel(String),
    /// Questions for the gateway holding a worker id.
    Worker(String),
    /// Questions for every broker.
    All,
}

/// Applies interest changes and forwards incoming events to the hub until
/// `stop` or until the hub goes away.
pub(super) async fn run(
    client: Client,
    broker_id: String,
    prefix: String,
    mut changes: mpsc::UnboundedReceiver<Change>,
    notices: mpsc::Sender<Notice>,
    stop: CancellationToken,
) {
    let mut subscriptions: StreamMap<Feed, Subscriber> = StreamMap::new();
    let mut failed_since_sync: Option<String> = None;
    match client.subscribe(ask_all_subject(&prefix)).await {
        Ok(subscriber) => {
            subscriptions.insert(Feed::All, subscriber);
        }
        Err(e) => failed_since_sync = Some(format!("subscribing to the questions for every broker: {e}")),
    }
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            change = changes.recv() => match change {
                None => return,
                Some(Change::Interest(Interest::Add(channel))) => {
                    let mut feeds = vec![(subject(&prefix, &channel), Feed::Channel(channel.clone()))];
                    if let Some(worker_id) = channel.strip_prefix(names::WORKER_CHANNEL_PREFIX) {
                        feeds.push((ask_worker_subject(&prefix, worker_id), Feed::Worker(worker_id.to_owned())));
                    }
                    for (subject, feed) in feeds {
                        match client.subscribe(subject).await {
                            Ok(subscriber) => {
                                subscriptions.insert(feed, subscriber);
                            }
                            Err(e) => {
                                tracing::warn!(channel, error = %e, "cannot subscribe to the cluster bus");
                                failed_since_sync = Some(format!("subscribing to {channel:?}: {e}"));
                            }
                        }
                    }
                }
                Some(Change::Interest(Interest::Remove(channel))) => {
                    // Dropping the subscriber unsubscribes.
                    if let Some(worker_id) = channel.strip_prefix(names::WORKER_CHANNEL_PREFIX) {
                        subscriptions.remove(&Feed::Worker(worker_id.to_owned()));
                    }
                    subscriptions.remove(&Feed::Channel(channel));
                }
                Some(Change::Sync(done)) => {
                    let result = match failed_since_sync.take() {
                        Some(failure) => Err(FederationError(failure)),
                        None => match tokio::time::timeout(std::time::Duration::from_secs(2), client.flush()).await {
                            Ok(Ok(())) => Ok(()),
                            Ok(Err(e)) => Err(FederationError(format!("flushing to NATS: {e}"))),
                            Err(_) => Err(FederationError("NATS did not answer within 2s".to_owned())),
                        },
                    };
                    let _ = done.send(result);
                }
            },
            Some((feed, message)) = subscriptions.next() => {
                let notice = match feed {
                    Feed::Channel(channel) => match Event::decode(message.payload) {
                        Ok(event) => Notice::Event(event),
                        Err(e) => {
                            tracing::warn!(channel, error = %e, "undecodable event on the cluster bus");
                            Notice::Undecodable
                        }
                    },
                    Feed::Worker(_) | Feed::All => match (Ask::decode(message.payload), message.reply) {
                        (Ok(ask), Some(reply_to)) => {
                            let (reply, answer) = oneshot::channel();
                            tokio::spawn(send_answer(client.clone(), broker_id.clone(), reply_to.to_string(), answer));
                            Notice::Ask { ask, reply }
                        }
                        (Ok(_), None) => {
                            tracing::warn!("a question on the cluster bus without a reply subject");
                            Notice::Undecodable
                        }
                        (Err(e), _) => {
                            tracing::warn!(error = %e, "undecodable question on the cluster bus");
                            Notice::Undecodable
                        }
                    },
                };
                if notices.send(notice).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Publishes the hub's answer to a question on the asker's reply subject,
/// signed with this broker's id.
async fn send_answer(client: Client, broker_id: String, reply_to: String, answer: oneshot::Receiver<Answer>) {
    let Ok(mut answer) = answer.await else {
        return;
    };
    answer.broker_id = broker_id;
    if let Err(e) = client.publish(reply_to, answer.encode_to_vec().into()).await {
        tracing::debug!(error = %e, "answer to another broker not sent");
    }
}
