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

use crate::federation::{FederationError, Interest, Notice};

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

/// Applies interest changes and forwards incoming events to the hub until
/// `stop` or until the hub goes away.
pub(super) async fn run(
    client: Client,
    prefix: String,
    mut changes: mpsc::UnboundedReceiver<Change>,
    notices: mpsc::Sender<Notice>,
    stop: CancellationToken,
) {
    let mut subscriptions: StreamMap<String, Subscriber> = StreamMap::new();
    let mut failed_since_sync: Option<String> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            change = changes.recv() => match change {
                None => return,
                Some(Change::Interest(Interest::Add(channel))) => match client.subscribe(subject(&prefix, &channel)).await {
                    Ok(subscriber) => {
                        subscriptions.insert(channel, subscriber);
                    }
                    Err(e) => {
                        tracing::warn!(channel, error = %e, "cannot subscribe to the cluster bus");
                        failed_since_sync = Some(format!("subscribing to {channel:?}: {e}"));
                    }
                },
                Some(Change::Interest(Interest::Remove(channel))) => {
                    // Dropping the subscriber unsubscribes.
                    subscriptions.remove(&channel);
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
            Some((channel, message)) = subscriptions.next() => {
                let notice = match Event::decode(message.payload) {
                    Ok(event) => Notice::Event(event),
                    Err(e) => {
                        tracing::warn!(channel, error = %e, "undecodable event on the cluster bus");
                        Notice::Undecodable
                    }
                };
                if notices.send(notice).await.is_err() {
                    return;
                }
            }
        }
    }
}
