//! The message bus between brokers: one NATS subscription per channel that
//! has a local listener, added and dropped as interest comes and goes, and
//! the decoding of what arrives.
//!
//! One task owns the subscriptions and applies interest changes in the order
//! the hub made them. A `Sync` request is answered once every earlier change
//! has reached the NATS server, so a subscriber's ack means "events published
//! anywhere in the cluster from now on reach you".

use async_nats::{Client, Subscriber};
use herald_proto::v1::Event;
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::{StreamExt, StreamMap};
use tokio_util::sync::CancellationToken;

use super::ClusterNotice;

/// A change of this broker's interest in a channel.
#[derive(Debug)]
pub enum Interest {
    /// The channel has its first local listener.
    Add(String),
    /// The channel lost its last local listener.
    Remove(String),
    /// Answer once every earlier change has reached the NATS server.
    Sync(oneshot::Sender<Result<(), String>>),
}

/// The NATS subject a channel travels on.
pub fn subject(prefix: &str, channel: &str) -> String {
    format!("{prefix}.{channel}")
}

/// Applies interest changes and forwards incoming events to the hub until
/// `stop` or until the hub goes away.
pub async fn run(
    client: Client,
    prefix: String,
    mut interest: mpsc::UnboundedReceiver<Interest>,
    notices: mpsc::Sender<ClusterNotice>,
    stop: CancellationToken,
) {
    let mut subscriptions: StreamMap<String, Subscriber> = StreamMap::new();
    let mut failed_since_sync: Option<String> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            change = interest.recv() => match change {
                None => return,
                Some(Interest::Add(channel)) => match client.subscribe(subject(&prefix, &channel)).await {
                    Ok(subscriber) => {
                        subscriptions.insert(channel, subscriber);
                    }
                    Err(e) => {
                        tracing::warn!(channel, error = %e, "cannot subscribe to the cluster bus");
                        failed_since_sync = Some(format!("subscribing to {channel:?}: {e}"));
                    }
                },
                Some(Interest::Remove(channel)) => {
                    // Dropping the subscriber unsubscribes.
                    subscriptions.remove(&channel);
                }
                Some(Interest::Sync(done)) => {
                    let result = match failed_since_sync.take() {
                        Some(failure) => Err(failure),
                        None => match tokio::time::timeout(std::time::Duration::from_secs(2), client.flush()).await {
                            Ok(Ok(())) => Ok(()),
                            Ok(Err(e)) => Err(format!("flushing to NATS: {e}")),
                            Err(_) => Err("NATS did not answer within 2s".to_owned()),
                        },
                    };
                    let _ = done.send(result);
                }
            },
            Some((channel, message)) = subscriptions.next() => {
                let notice = match Event::decode(message.payload) {
                    Ok(event) => ClusterNotice::Event(event),
                    Err(e) => {
                        tracing::warn!(channel, error = %e, "undecodable event on the cluster bus");
                        ClusterNotice::Undecodable
                    }
                };
                if notices.send(notice).await.is_err() {
                    return;
                }
            }
        }
    }
}
