//! Idempotency keys shared by all brokers: a JetStream key-value bucket
//! whose entries live for the de-duplication window. A key is recorded with
//! a create, which only one broker can win; a create that finds the key
//! says the publish is a duplicate.

use std::sync::Arc;

use async_nats::jetstream::kv::{self, Store};
use tokio::sync::Mutex;

use super::NatsConfig;
use crate::federation::FederationError;

/// The idempotency-key bucket of one broker's NATS connection.
pub(super) struct Dedup {
    client: async_nats::Client,
    config: kv::Config,
    /// The bucket, opened (or created) on first use, and again after a
    /// failure (NATS restarted, the bucket was lost).
    store: Arc<Mutex<Option<Store>>>,
}

impl Dedup {
    pub(super) fn new(client: async_nats::Client, config: &NatsConfig) -> Self {
        let config = kv::Config {
            bucket: config.dedup_bucket.clone(),
            description: "herald idempotency keys of recent publishes".to_owned(),
            history: 1,
            max_age: config.dedup_window,
            num_replicas: config.kv_replicas,
            ..kv::Config::default()
        };
        Self { client, config, store: Arc::default() }
    }

    /// Records `key` for `broker_id`: true when no broker had it within the
    /// window.
    pub(super) async fn first_use(&self, key: &str, broker_id: &str) -> Result<bool, FederationError> {
        let store = self.store().await?;
        match store.create(bucket_key(key), broker_id.to_owned().into()).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => {
                *self.store.lock().await = None;
                Err(FederationError(format!("recording the idempotency key: {e}")))
            }
        }
    }

    /// Forgets `key`, in the background: its publish was not routed.
    pub(super) fn forget(&self, key: &str) {
        let key = bucket_key(key);
        let slot = self.store.clone();
        tokio::spawn(async move {
            let store = slot.lock().await.clone();
            if let Some(store) = store
                && let Err(e) = store.purge(&key).await
            {
                tracing::debug!(error = %e, "could not forget an idempotency key");
            }
        });
    }

    async fn store(&self) -> Result<Store, FederationError> {
        let mut slot = self.store.lock().await;
        if let Some(store) = slot.as_ref() {
            return Ok(store.clone());
        }
        let jetstream = async_nats::jetstream::new(self.client.clone());
        let store = match jetstream.get_key_value(&self.config.bucket).await {
            Ok(store) => store,
            Err(_) => jetstream
                .create_key_value(self.config.clone())
                .await
                .map_err(|e| FederationError(format!("opening the idempotency-key bucket: {e}")))?,
        };
        *slot = Some(store.clone());
        Ok(store)
    }
}

/// An idempotency key as a bucket key (`[0-9a-f]` only, whatever the key).
fn bucket_key(key: &str) -> String {
    key.bytes().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_become_hex_bucket_keys() {
        assert_eq!(bucket_key("a b/é"), "6120622fc3a9");
    }
}
