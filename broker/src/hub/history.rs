//! Publishing to a client channel that keeps history, and reading it back.
//!
//! A publication is stored and delivered while one lock is held, so that
//! every session receives a channel's publications in offset order, and a
//! read of the history sees every publication that was not delivered to
//! sessions that listened before the read.

use herald_common::namespaces::HistoryRule;
use herald_proto::names;
use herald_proto::v1::{Event, HistoryRequest, HistoryResponse, PublishResponse};

use super::Hub;
use crate::error::PublishError;
use crate::history::Read;

impl Hub {
    /// The history rule of a publish's channel, when it is a client channel
    /// whose namespace keeps history.
    pub(super) fn history_rule(&self, channel: &str) -> Option<HistoryRule> {
        self.shared.limits.namespaces.history_of(channel).copied()
    }

    /// Stores `event` in its channel's history. In a cluster that keeps
    /// history, every broker delivers it from there (this one included);
    /// otherwise it is delivered here, with its position.
    pub(super) async fn publish_to_history(
        &self,
        event: Event,
        rule: &HistoryRule,
        key: &str,
    ) -> Result<PublishResponse, PublishError> {
        let Some(shared) = self.federation().history() else {
            return Ok(self.publish_to_memory(event, rule).await);
        };
        let content = event.content.unwrap_or_default();
        let (position, duplicate) = shared
            .append(&event.channel, rule, &content, key)
            .await
            .map_err(|e| PublishError::HistoryUnavailable(e.0))?;
        if duplicate {
            self.shared.metrics.duplicates.inc();
        } else {
            self.shared.metrics.history_appends.inc();
        }
        Ok(PublishResponse { subscribers: 0, forwarded: !duplicate, duplicate, position: Some(position) })
    }

    /// Stores `event` in this broker's memory and delivers it to the local
    /// sessions listening on its channel, with its position.
    async fn publish_to_memory(&self, mut event: Event, rule: &HistoryRule) -> PublishResponse {
        let _order = self.shared.history_order.lock().await;
        let content = event.content.clone().unwrap_or_default();
        let position = self.shared.history.append(&event.channel, rule, &content);
        self.shared.metrics.history_appends.inc();
        // Read after the append: a session that started listening before it
        // gets the publication live, and one that starts after finds it
        // stored.
        let listeners = self.read().index.listeners(&event.channel);
        event.position = Some(position.clone());
        let subscribers = self.deliver(listeners, event).await;
        PublishResponse { subscribers, forwarded: false, duplicate: false, position: Some(position) }
    }

    /// Reads a client channel's history.
    pub async fn history(&self, req: HistoryRequest) -> Result<HistoryResponse, PublishError> {
        names::validate_client_channel(&req.channel)?;
        self.check_serving(&self.read())?;
        let rule = self.history_rule(&req.channel).ok_or_else(|| PublishError::NoHistory(req.channel.clone()))?;
        let limit = req.limit.min(u32::try_from(rule.size).unwrap_or(u32::MAX));
        self.shared.metrics.history_reads.inc();
        let read = Read { since: req.since, limit };
        match self.federation().history() {
            Some(shared) => {
                shared.read(&req.channel, &rule, &read).await.map_err(|e| PublishError::HistoryUnavailable(e.0))
            }
            None => Ok(self.shared.history.read(&req.channel, &read)),
        }
    }
}
