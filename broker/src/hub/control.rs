//! Controls and queries. A control goes to the gateways that hold the
//! connections it names, which carry it out and confirm it in a directory
//! report; it is answered once they have (or once the wait is over, naming
//! the gateways that did not). A query is answered from the directory
//! copies, this broker's and, for the whole cluster, the other brokers'.
//! What reaches beyond this broker's gateways goes through the federation:
//! to the one broker serving a worker id, or to all of them.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use herald_proto::v1::{
    ConnectionAddress, ControlRequest, ControlResponse, GatewayControl, QueryRequest, QueryResponse, SubscribeResponse,
    control_request, query_request, subscribe_response,
};
use tokio::sync::{mpsc, oneshot};

use super::Hub;
use super::index::SessionId;
use super::publish::check_live;
use super::session::Sink;
use crate::control::{self, CONTROL_LABELS, OrderKey, Scope};
use crate::error::PublishError;
use crate::federation::{Answer, Ask, AskError, Gathered, user_hash};

/// A control sent to a gateway and not confirmed yet.
pub(super) struct Pending {
    session: SessionId,
    done: oneshot::Sender<u32>,
}

/// Why a gateway did not confirm a control.
#[derive(Debug, thiserror::Error)]
enum Unconfirmed {
    #[error("no answer within {0:?}")]
    TimedOut(std::time::Duration),
    #[error("its session ended")]
    SessionEnded,
}

/// What this broker's gateways made of a control.
#[derive(Debug, Default)]
struct Carried {
    connections: u32,
    /// The worker ids of this broker's gateways whose part this gives.
    given: Vec<String>,
    /// The worker ids of this broker's gateways that did not confirm in
    /// time, or have not reported their connections yet.
    missing: Vec<String>,
}

impl Hub {
    /// Carries out a control on the gateways holding the connections it names.
    pub async fn control(&self, req: ControlRequest) -> Result<ControlResponse, PublishError> {
        let label = control::control_label(&req);
        let result = self.control_checked(req).await;
        match &result {
            Ok(_) => {
                if let Some(i) = CONTROL_LABELS.iter().position(|l| *l == label) {
                    self.shared.metrics.controls[i].inc();
                }
            }
            Err(e) => self.shared.metrics.publish_rejected(e),
        }
        result
    }

    /// Carries out a batch of controls, each on its own: those naming the
    /// same connection, user or group one after the other in batch order,
    /// the rest at the same time. One result per control, in batch order.
    pub async fn control_batch(
        &self,
        requests: Vec<ControlRequest>,
    ) -> Result<Vec<Result<ControlResponse, PublishError>>, PublishError> {
        self.check_batch(requests.len())?;
        self.check_serving(&self.read())?;
        let mut chains: Vec<Vec<(usize, ControlRequest)>> = Vec::new();
        let mut chain_of: HashMap<OrderKey, usize> = HashMap::new();
        for (i, req) in requests.into_iter().enumerate() {
            // A malformed control is refused on its own, in a chain of its own.
            let chain = match control::control_scope(&req) {
                Ok(scope) => *chain_of.entry(scope.order_key()).or_insert_with(|| {
                    chains.push(Vec::new());
                    chains.len() - 1
                }),
                Err(_) => {
                    chains.push(Vec::new());
                    chains.len() - 1
                }
            };
            chains[chain].push((i, req));
        }
        let runs = chains.into_iter().map(|chain| async move {
            let mut done = Vec::with_capacity(chain.len());
            for (i, req) in chain {
                done.push((i, self.control(req).await));
            }
            done
        });
        let mut results: Vec<_> = futures_util::future::join_all(runs).await.into_iter().flatten().collect();
        results.sort_unstable_by_key(|(i, _)| *i);
        Ok(results.into_iter().map(|(_, result)| result).collect())
    }

    async fn control_checked(&self, req: ControlRequest) -> Result<ControlResponse, PublishError> {
        let scope = control::control_scope(&req)?;
        self.check_serving(&self.read())?;
        let timeout = self.shared.limits.answer_timeout;
        if let Scope::Connection(address) = &scope {
            if let Some(connections) = self.control_connection_here(address, &req).await? {
                return Ok(ControlResponse { connections, missing_workers: Vec::new() });
            }
            if !self.federation().held_elsewhere(&address.worker_id) {
                return Err(PublishError::UnknownWorker(address.worker_id.clone()));
            }
            let ask = Ask { control: Some(req), ..Ask::default() };
            let answer = self.ask_worker(&address.worker_id, &ask).await?;
            return Ok(answer.control.unwrap_or_default());
        }
        let ask = Ask { control: Some(req.clone()), ..Ask::default() };
        let (here, gathered) =
            tokio::join!(self.control_wide_here(&scope, &req), self.federation().ask_all(&ask, timeout));
        let gathered = gathered.map_err(|e| PublishError::ClusterUnavailable(e.0))?;
        let mut connections = here.connections;
        let mut missing = here.missing;
        let mut given = here.given;
        missing.extend(gathered.unanswered().map(str::to_owned));
        for answer in gathered.answers.into_iter().filter(|a| a.code == 0) {
            let response = answer.control.unwrap_or_default();
            connections += response.connections;
            missing.extend(response.missing_workers);
            given.extend(answer.workers);
        }
        Ok(ControlResponse { connections, missing_workers: self.still_missing(missing, &given) })
    }

    /// Answers a question about the connections of the cluster.
    pub async fn query(&self, req: QueryRequest) -> Result<QueryResponse, PublishError> {
        let result = self.query_checked(req).await;
        match &result {
            Ok(_) => self.shared.metrics.queries.inc(),
            Err(e) => self.shared.metrics.publish_rejected(e),
        }
        result
    }

    async fn query_checked(&self, req: QueryRequest) -> Result<QueryResponse, PublishError> {
        let scope = control::query_scope(&req)?;
        self.check_serving(&self.read())?;
        if let Scope::Connection(address) = &scope {
            if self.worker_is_held(&address.worker_id) {
                return Ok(self.query_here(&req).query.unwrap_or_default());
            }
            if !self.federation().held_elsewhere(&address.worker_id) {
                return Ok(QueryResponse::default());
            }
            let answer = self.ask_worker(&address.worker_id, &Ask { query: Some(req), ..Ask::default() }).await?;
            return Ok(answer.query.unwrap_or_default());
        }
        let ask = Ask { query: Some(req.clone()), ..Ask::default() };
        let gathered = self.federation().ask_all(&ask, self.shared.limits.answer_timeout).await;
        let gathered = gathered.map_err(|e| PublishError::ClusterUnavailable(e.0))?;
        let here = self.query_here(&req);
        Ok(self.merge_queries(here, gathered))
    }

    /// Asks the broker serving `worker_id`; its refusal becomes ours.
    pub(super) async fn ask_worker(&self, worker_id: &str, ask: &Ask) -> Result<Answer, PublishError> {
        let timeout = self.shared.limits.answer_timeout;
        let answer = self.federation().ask_worker(worker_id, ask, timeout).await.map_err(|e| match e {
            AskError::TimedOut(waited) => PublishError::NotConfirmed {
                worker_id: worker_id.to_owned(),
                why: format!("no answer within {waited:?}"),
            },
            AskError::Unavailable(reason) => PublishError::ClusterUnavailable(reason),
        })?;
        if answer.code != 0 {
            let code = tonic::Code::from_i32(i32::try_from(answer.code).unwrap_or(2));
            return Err(PublishError::Remote { code, message: answer.message });
        }
        Ok(answer)
    }

    /// Carries out a control on one connection of a gateway of this
    /// broker; `None` when no gateway of this broker holds its worker id.
    async fn control_connection_here(
        &self,
        address: &ConnectionAddress,
        req: &ControlRequest,
    ) -> Result<Option<u32>, PublishError> {
        let sink = {
            let state = self.read();
            let Some(sink) = state.index.holder(&address.worker_id).cloned() else {
                return Ok(None);
            };
            check_live(&state, address)?;
            if let Some(control_request::Op::SetData(set)) = &req.op {
                state
                    .directory
                    .check_data_change(sink.session_id, &address.connection_id, set)
                    .map_err(PublishError::Invalid)?;
            }
            sink
        };
        let confirmed = self.send_control(&sink, req.clone()).await;
        confirmed.map(Some).map_err(|unconfirmed| PublishError::NotConfirmed {
            worker_id: address.worker_id.clone(),
            why: unconfirmed.to_string(),
        })
    }

    /// Carries out a user- or group-wide control on every gateway of this
    /// broker that holds a selected connection.
    async fn control_wide_here(&self, scope: &Scope, req: &ControlRequest) -> Carried {
        let (given, unreported, targets) = {
            let state = self.read();
            let sessions = match scope {
                Scope::User(user) => state.directory.sessions_of_user(user),
                Scope::Group(group) => state.directory.sessions_of_group(group),
                Scope::Connection(_) | Scope::Channel(_) | Scope::All => Vec::new(),
            };
            let targets: Vec<(Arc<Sink>, String)> = sessions
                .into_iter()
                .filter_map(|id| {
                    let worker = state.directory.worker_of(id)?.to_owned();
                    state.index.session(id).map(|sink| (sink.clone(), worker))
                })
                .collect();
            let given = state.directory.workers().map(str::to_owned).collect();
            (given, state.directory.unreported_workers().map(str::to_owned).collect(), targets)
        };
        let sent = targets.iter().map(|(sink, _)| self.send_control(sink, req.clone()));
        let confirmed = futures_util::future::join_all(sent).await;
        let mut carried = Carried { given, missing: unreported, ..Carried::default() };
        for ((_, worker), confirmed) in targets.into_iter().zip(confirmed) {
            match confirmed {
                Ok(n) => carried.connections += n,
                Err(_) => {
                    carried.given.retain(|w| *w != worker);
                    carried.missing.push(worker);
                }
            }
        }
        carried
    }

    /// Hands a control to a session's gateway and waits for its
    /// confirmation: the number of connections it applied to.
    async fn send_control(&self, sink: &Arc<Sink>, request: ControlRequest) -> Result<u32, Unconfirmed> {
        let timeout = self.shared.limits.answer_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let control_id = self.shared.next_control_id.fetch_add(1, Ordering::Relaxed);
        let (done, confirmed) = oneshot::channel();
        self.pending().insert(control_id, Pending { session: sink.session_id, done });
        let control = GatewayControl { control_id, request: Some(request) };
        let msg = SubscribeResponse { kind: Some(subscribe_response::Kind::Control(control)) };
        let answered = match sink.tx.send_timeout(msg, timeout).await {
            Ok(()) => match tokio::time::timeout_at(deadline, confirmed).await {
                Ok(Ok(connections)) => Ok(connections),
                Ok(Err(_)) => Err(Unconfirmed::SessionEnded),
                Err(_) => Err(Unconfirmed::TimedOut(timeout)),
            },
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => Err(Unconfirmed::TimedOut(timeout)),
            Err(mpsc::error::SendTimeoutError::Closed(_)) => Err(Unconfirmed::SessionEnded),
        };
        if answered.is_err() {
            self.pending().remove(&control_id);
        }
        answered
    }

    /// Completes the controls a gateway confirmed.
    pub(super) fn confirm(&self, session: SessionId, done: impl IntoIterator<Item = (u64, u32)>) {
        let mut pending = self.pending();
        for (control_id, connections) in done {
            if pending.get(&control_id).is_some_and(|p| p.session == session)
                && let Some(p) = pending.remove(&control_id)
            {
                let _ = p.done.send(connections);
            }
        }
    }

    /// Forgets the controls a closed session will never confirm, so that
    /// their callers learn it at once.
    pub(super) fn abandon_controls(&self, session: SessionId) {
        self.pending().retain(|_, p| p.session != session);
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, Pending>> {
        self.shared.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// This broker's part of the answer to a query.
    fn query_here(&self, req: &QueryRequest) -> Answer {
        let state = self.read();
        let directory = &state.directory;
        let mut response = QueryResponse::default();
        let mut user_hashes = Vec::new();
        match &req.question {
            Some(query_request::Question::UserOnline(user)) => response.online = directory.user_online(user),
            Some(query_request::Question::UserConnections(user)) => {
                response.connections = directory.user_connections(user);
                response.online = !response.connections.is_empty();
                response.count = response.connections.len() as u64;
            }
            Some(query_request::Question::GroupMembers(group)) => {
                response.connections = directory.group_members(group);
                response.count = response.connections.len() as u64;
            }
            Some(query_request::Question::GroupCount(group)) => response.count = directory.group_count(group),
            Some(query_request::Question::ChannelSubscribers(channel)) => {
                response.connections = directory.channel_subscribers(channel);
                response.count = response.connections.len() as u64;
            }
            Some(query_request::Question::ChannelCount(channel)) => {
                let (count, users) = directory.channel_count(channel);
                response.count = count;
                user_hashes = users.into_iter().map(user_hash).collect();
                response.users = user_hashes.len() as u64;
            }
            Some(query_request::Question::Totals(_)) => {
                let (connections, users) = directory.totals();
                response.count = connections;
                user_hashes = users.map(user_hash).collect();
                response.users = user_hashes.len() as u64;
            }
            Some(query_request::Question::Connection(address)) => {
                if let Some(info) = directory.connection(address) {
                    response.online = true;
                    response.count = 1;
                    response.connections.push(info);
                }
            }
            None => {}
        }
        let workers = directory.workers().map(str::to_owned).collect();
        let missing = directory.unreported_workers().map(str::to_owned).collect();
        Answer { query: Some(response), user_hashes, workers, missing, ..Answer::default() }
    }

    fn merge_queries(&self, here: Answer, gathered: Gathered) -> QueryResponse {
        let mut merged = here.query.unwrap_or_default();
        let mut users: HashSet<u64> = here.user_hashes.into_iter().collect();
        let mut missing = here.missing;
        let mut given = here.workers;
        missing.extend(gathered.unanswered().map(str::to_owned));
        for answer in gathered.answers.into_iter().filter(|a| a.code == 0) {
            let part = answer.query.unwrap_or_default();
            merged.online |= part.online;
            merged.count += part.count;
            merged.connections.extend(part.connections);
            users.extend(answer.user_hashes);
            missing.extend(answer.missing);
            given.extend(answer.workers);
        }
        if !users.is_empty() {
            merged.users = users.len() as u64;
        }
        merged.missing_workers = self.still_missing(missing, &given);
        merged
    }

    /// The worker ids of `missing` whose part no answer gave (a gateway
    /// that moved between brokers can be both), sorted, once each, and
    /// counted when there are any.
    fn still_missing(&self, mut missing: Vec<String>, given: &[String]) -> Vec<String> {
        let given: HashSet<&String> = given.iter().collect();
        missing.retain(|w| !given.contains(w));
        missing.sort();
        missing.dedup();
        if !missing.is_empty() {
            self.shared.metrics.answers_incomplete.inc();
        }
        missing
    }

    /// Answers what another broker asks of this one's gateways.
    pub(super) async fn answer(&self, ask: Ask) -> Answer {
        self.shared.metrics.cluster_asks_answered.inc();
        let refused = |e: PublishError| Answer { code: e.code() as u32, message: e.to_string(), ..Answer::default() };
        if let Some(event) = ask.event {
            return match self.deliver_to_connection_here(event).await {
                Ok(delivered) => Answer { delivered, ..Answer::default() },
                Err(e) => refused(e),
            };
        }
        if let Some(query) = ask.query {
            return self.query_here(&query);
        }
        let Some(req) = ask.control else {
            return refused(PublishError::Invalid("the ask names nothing to do".into()));
        };
        let scope = match control::control_scope(&req) {
            Ok(scope) => scope,
            Err(e) => return refused(e),
        };
        match scope {
            Scope::Connection(address) => match self.control_connection_here(&address, &req).await {
                Ok(Some(connections)) => Answer {
                    control: Some(ControlResponse { connections, missing_workers: Vec::new() }),
                    ..Answer::default()
                },
                Ok(None) => refused(PublishError::UnknownWorker(address.worker_id)),
                Err(e) => refused(e),
            },
            scope => {
                let carried = self.control_wide_here(&scope, &req).await;
                Answer {
                    control: Some(ControlResponse {
                        connections: carried.connections,
                        missing_workers: carried.missing,
                    }),
                    workers: carried.given,
                    ..Answer::default()
                }
            }
        }
    }
}
