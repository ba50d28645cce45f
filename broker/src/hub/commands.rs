//! The commands of a subscriber session: claim a worker id, subscribe to
//! channels, unsubscribe from them. Each accepted command is acknowledged in
//! the session's queue, behind every event queued before it; a refused one
//! is returned as an error (and the session ends with it).

use herald_proto::names;
use herald_proto::v1::{
    Ack, ClaimWorker, DirectoryReport, SubscribeRequest, SubscribeResponse, subscribe_request, subscribe_response,
};
use tonic::Status;

use super::Hub;
use super::directory::Directory;
use super::index::SessionId;
use super::session::Sink;
use crate::error::{CommandError, CommandErrorKind};
use crate::federation::{ClaimError, Interest};

impl Hub {
    pub(super) async fn apply(&self, id: SessionId, sink: &Sink, req: SubscribeRequest) -> Result<(), CommandError> {
        let request_id = req.request_id;
        let err = |kind| CommandError { request_id, kind };
        let command = req.command.ok_or_else(|| err(CommandErrorKind::Invalid("command is required".into())))?;
        if let Some(reason) = self.federation().unready_reason() {
            return Err(err(CommandErrorKind::ClusterUnavailable(reason.to_owned())));
        }
        let needs_sync = match command {
            subscribe_request::Command::ClaimWorker(claim) => {
                self.claim(id, claim).await.map_err(err)?;
                true
            }
            subscribe_request::Command::Subscribe(sub) => {
                for channel in &sub.channels {
                    names::validate_channel(channel).map_err(|e| err(e.into()))?;
                    if names::is_reserved_channel(channel) {
                        return Err(err(CommandErrorKind::Invalid(format!(
                            "channel {channel:?} is reserved: worker channels come with a claim, user and group \
                             channels with a directory report"
                        ))));
                    }
                }
                let mut state = self.write();
                let mut changes = Vec::new();
                let max = self.shared.limits.max_channels_per_session;
                state.index.subscribe(id, &sub.channels, max, &mut changes).map_err(err)?;
                self.commit(&state, changes);
                true
            }
            subscribe_request::Command::Unsubscribe(unsub) => {
                let mut state = self.write();
                let mut changes = Vec::new();
                state.index.unsubscribe(id, &unsub.channels, &mut changes);
                self.commit(&state, changes);
                false
            }
            subscribe_request::Command::Report(report) => {
                self.report(id, report).await.map_err(err)?;
                false
            }
        };
        // Acknowledge only once the federation has the new interest: from the
        // ack on, events published on any broker arrive.
        if needs_sync {
            self.federation().sync().await.map_err(|e| err(CommandErrorKind::ClusterUnavailable(e.0)))?;
        }
        let ack = SubscribeResponse { kind: Some(subscribe_response::Kind::Ack(Ack { request_id })) };
        if sink.tx.try_send(ack).is_err() {
            tracing::debug!(session = id, request_id, "ack not queued: session queue full or closed");
        }
        Ok(())
    }

    /// Follows a gateway's directory report: its connections, users and
    /// groups, and the user and group channels its session listens on.
    /// The controls it confirms are completed once the new interest has
    /// reached the federation, so that what is published after a control's
    /// answer reaches the connections it changed.
    async fn report(&self, id: SessionId, report: DirectoryReport) -> Result<(), CommandErrorKind> {
        for change in &report.changes {
            Directory::check(change)?;
        }
        let gained = {
            let mut state = self.write();
            state.directory.reported(id)?;
            let mut members = Vec::new();
            for change in report.changes {
                state.directory.apply(id, change, &mut members)?;
            }
            let mut changes = Vec::new();
            Self::follow_members(&mut state, members, &mut changes);
            let gained = changes.iter().any(|c| matches!(c, Interest::Add(_)));
            self.commit(&state, changes);
            gained
        };
        if gained {
            self.federation().sync().await.map_err(|e| CommandErrorKind::ClusterUnavailable(e.0))?;
        }
        self.confirm(id, report.done.into_iter().map(|d| (d.control_id, d.connections)));
        Ok(())
    }

    /// Makes session `id` the holder of a worker id: checked here first, then
    /// leased from the federation, then recorded (checked again, as the
    /// lease took a while).
    async fn claim(&self, id: SessionId, claim: ClaimWorker) -> Result<(), CommandErrorKind> {
        names::validate_worker_id(&claim.worker_id)?;
        if claim.instance_id.is_empty() {
            return Err(CommandErrorKind::Invalid("instance_id is required".into()));
        }
        let refused = |e: CommandErrorKind| {
            if matches!(e, CommandErrorKind::WorkerTaken { .. }) {
                self.shared.metrics.claims_refused.inc();
            }
            e
        };
        self.read().index.check_claim(id, &claim.worker_id, &claim.instance_id).map_err(refused)?;
        self.federation().claim(&claim.worker_id, &claim.instance_id).await.map_err(|e| match e {
            ClaimError::Taken => refused(CommandErrorKind::WorkerTaken { worker_id: claim.worker_id.clone() }),
            ClaimError::Unavailable(reason) => CommandErrorKind::ClusterUnavailable(reason),
        })?;
        let mut state = self.write();
        let mut changes = Vec::new();
        let stale = match state.index.claim(id, &claim.worker_id, &claim.instance_id, &mut changes) {
            Ok(stale) => stale,
            Err(e) => {
                drop(state);
                self.federation().release(claim.worker_id);
                return Err(e);
            }
        };
        let watch = claim.reports_disconnects.then_some(claim.instance_id.as_str());
        state.directory.attach(id, &claim.worker_id, watch);
        if let Some(stale) = &stale {
            state.directory.detach(stale.session_id, &mut Vec::new());
            stale.end(Status::aborted(format!(
                "worker id {:?} was claimed again by a newer session of the same instance",
                claim.worker_id
            )));
            self.shared.metrics.sessions.dec();
        }
        self.commit(&state, changes);
        drop(state);
        if let Some(stale) = stale {
            self.abandon_controls(stale.session_id);
        }
        Ok(())
    }
}
