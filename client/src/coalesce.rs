//! Turns concurrent single publishes into `PublishBatch` calls.
//!
//! One task takes whatever publishes are waiting (never waiting for more),
//! so a lone publish goes out at once and, under load, one call carries
//! many. Each publisher's messages keep their order, as a batch is routed in
//! order. The task ends when the brokers' client is dropped.

use std::future::Future;
use std::sync::{Arc, Weak};

use herald_proto::v1::{PublishRequest, PublishResponse, PublishResult, publish_result};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tonic::{Code, Status};

/// Batches in flight at once from one publisher process.
const BATCHES_IN_FLIGHT: usize = 4;
/// Most single publishes sent in one batch.
const MAX_COALESCED: usize = 100;
/// Single publishes waiting for a batch before callers wait.
const QUEUE: usize = 16 * 1024;

/// A single publish waiting for its batch.
pub(crate) struct Pending {
    pub(crate) req: PublishRequest,
    pub(crate) reply: oneshot::Sender<Result<PublishResponse, Status>>,
}

/// Where coalesced publishes go.
pub(crate) trait Publisher: Send + Sync + 'static {
    /// Routes one message on its own.
    fn publish_one(&self, req: PublishRequest) -> impl Future<Output = Result<PublishResponse, Status>> + Send;
    /// Routes several messages in order, one result per message.
    fn publish_batch(
        &self,
        requests: &[PublishRequest],
    ) -> impl Future<Output = Result<Vec<PublishResult>, Status>> + Send;
}

/// Starts the coalescing task for `remote`; returns where publishes go.
pub(crate) fn start<P: Publisher>(remote: Weak<P>) -> mpsc::Sender<Pending> {
    let (tx, mut rx) = mpsc::channel::<Pending>(QUEUE);
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
        while let Some(first) = rx.recv().await {
            // Waiting for a slot lets more publishes join this batch.
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let mut batch = vec![first];
            while batch.len() < MAX_COALESCED {
                match rx.try_recv() {
                    Ok(pending) => batch.push(pending),
                    Err(_) => break,
                }
            }
            let Some(remote) = remote.upgrade() else { return };
            tokio::spawn(async move {
                send(remote.as_ref(), batch).await;
                drop(slot);
            });
        }
    });
    tx
}

/// Sends one coalesced batch and answers each of its publishers.
async fn send<P: Publisher>(remote: &P, batch: Vec<Pending>) {
    if let [_] = batch.as_slice() {
        for Pending { req, reply } in batch {
            let _ = reply.send(remote.publish_one(req).await);
        }
        return;
    }
    let (requests, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.req, p.reply)).unzip();
    match remote.publish_batch(&requests).await {
        Ok(results) if results.len() == replies.len() => {
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(match result.outcome {
                    Some(publish_result::Outcome::Published(published)) => Ok(published),
                    Some(publish_result::Outcome::Error(e)) => {
                        let code = Code::from_i32(i32::try_from(e.code).unwrap_or(Code::Unknown as i32));
                        Err(Status::new(code, e.message))
                    }
                    None => Err(Status::internal("broker sent an empty batch result")),
                });
            }
        }
        // A broker whose --max-batch is below ours refuses the whole batch:
        // send the messages one by one instead.
        Err(status) if status.code() == Code::ResourceExhausted => {
            for (req, reply) in requests.into_iter().zip(replies) {
                let _ = reply.send(remote.publish_one(req).await);
            }
        }
        Ok(_) => {
            let status = Status::internal("broker answered a batch with the wrong number of results");
            for reply in replies {
                let _ = reply.send(Err(status.clone()));
            }
        }
        Err(status) => {
            for reply in replies {
                let _ = reply.send(Err(status.clone()));
            }
        }
    }
}
