//! Calls from clients to the backends serving them (`Call` / `ServeCalls`).
//!
//! Backends attached to this broker register the methods they serve; a call
//! goes to one of them, round robin, and waits for its answer within the
//! call's timeout. A call no local backend serves is handed to the cluster
//! (another broker's backend) by the caller, [`super::Backends::call`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use herald_proto::v1::{CallAnswer, CallRequest, ServeCallsResponse};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

/// Calls queued for one backend before it counts as busy.
pub(crate) const BACKEND_QUEUE: usize = 4096;

/// Why a call got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallFailure {
    #[error("{0}")]
    Invalid(String),
    #[error("no backend serves method {0:?}")]
    NoBackend(String),
    #[error("no backend answered method {method:?} within {timeout:?}")]
    TimedOut { method: String, timeout: Duration },
    #[error("the backend serving method {0:?} went away before answering")]
    BackendGone(String),
    #[error("{0}")]
    Unavailable(String),
}

impl From<CallFailure> for Status {
    fn from(failure: CallFailure) -> Self {
        let code = match &failure {
            CallFailure::Invalid(_) => Code::InvalidArgument,
            CallFailure::NoBackend(_) => Code::NotFound,
            CallFailure::TimedOut { .. } => Code::DeadlineExceeded,
            CallFailure::BackendGone(_) | CallFailure::Unavailable(_) => Code::Unavailable,
        };
        Status::new(code, failure.to_string())
    }
}

/// The backends serving calls on this broker.
#[derive(Default)]
pub(crate) struct Calls {
    state: Mutex<Servers>,
    next_call: AtomicU64,
    /// Cancelled when the broker shuts down: backends' streams end.
    closing: CancellationToken,
}

#[derive(Default)]
struct Servers {
    next_server: u64,
    servers: HashMap<u64, Server>,
    by_method: HashMap<String, Vec<u64>>,
    turn: usize,
}

struct Server {
    tx: mpsc::Sender<Result<ServeCallsResponse, Status>>,
    methods: Vec<String>,
    waiting: HashMap<u64, oneshot::Sender<CallAnswer>>,
}

/// A backend's registration; unregisters it when dropped.
pub(crate) struct Registration {
    calls: Arc<Calls>,
    id: u64,
}

impl Calls {
    /// Whether a backend on this broker serves `method`.
    pub(crate) fn serves(&self, method: &str) -> bool {
        self.state().by_method.contains_key(method)
    }

    /// Registers a backend for `methods`; calls reach it through `tx`.
    /// Returns its registration and the methods this broker newly serves.
    pub(crate) fn register(
        self: &Arc<Self>,
        methods: Vec<String>,
        tx: mpsc::Sender<Result<ServeCallsResponse, Status>>,
    ) -> (Registration, Vec<String>) {
        let mut state = self.state();
        state.next_server += 1;
        let id = state.next_server;
        let mut new = Vec::new();
        for method in &methods {
            let servers = state.by_method.entry(method.clone()).or_default();
            if servers.is_empty() {
                new.push(method.clone());
            }
            servers.push(id);
        }
        state.servers.insert(id, Server { tx, methods, waiting: HashMap::new() });
        (Registration { calls: self.clone(), id }, new)
    }

    /// Ends every backend's stream (their unanswered calls fail at once):
    /// the broker is shutting down.
    pub(crate) fn close_all(&self) {
        self.closing.cancel();
        self.state().servers.clear();
    }

    /// Resolves when the broker shuts down.
    pub(crate) fn closing(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.closing.clone().cancelled_owned()
    }

    /// Hands a backend's answer to its caller; false for a call that is not
    /// waiting (it timed out, or never was).
    pub(crate) fn answer(&self, registration: &Registration, answer: CallAnswer) -> bool {
        let waiting = self.state().servers.get_mut(&registration.id).and_then(|s| s.waiting.remove(&answer.call_id));
        waiting.is_some_and(|tx| tx.send(answer).is_ok())
    }

    /// Asks a backend on this broker; `NoBackend` when none serves the method.
    pub(crate) async fn call(&self, request: CallRequest, timeout: Duration) -> Result<CallAnswer, CallFailure> {
        let method = request.method.clone();
        let call_id = self.next_call.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        let server = {
            let mut state = self.state();
            let Some(candidates) = state.by_method.get(&method).filter(|c| !c.is_empty()).cloned() else {
                return Err(CallFailure::NoBackend(method));
            };
            state.turn = state.turn.wrapping_add(1);
            let start = state.turn;
            let mut chosen = None;
            for k in 0..candidates.len() {
                let id = candidates[(start + k) % candidates.len()];
                let Some(server) = state.servers.get_mut(&id) else { continue };
                if server.tx.try_send(Ok(ServeCallsResponse { call_id, call: Some(request.clone()) })).is_ok() {
                    chosen = Some(id);
                    break;
                }
            }
            let Some(id) = chosen else {
                return Err(CallFailure::Unavailable(format!("every backend serving {method:?} is busy")));
            };
            if let Some(server) = state.servers.get_mut(&id) {
                server.waiting.insert(call_id, tx);
            }
            id
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(CallFailure::BackendGone(method)),
            Err(_) => {
                if let Some(server) = self.state().servers.get_mut(&server) {
                    server.waiting.remove(&call_id);
                }
                Err(CallFailure::TimedOut { method, timeout })
            }
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Servers> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Registration {
    /// Unregisters the backend; returns the methods this broker no longer
    /// serves. Its unanswered calls fail at once.
    pub(crate) fn end(self) -> Vec<String> {
        let mut state = self.calls.state();
        let Some(server) = state.servers.remove(&self.id) else {
            return Vec::new();
        };
        let mut gone = Vec::new();
        for method in server.methods {
            if let Some(servers) = state.by_method.get_mut(&method) {
                servers.retain(|id| *id != self.id);
                if servers.is_empty() {
                    state.by_method.remove(&method);
                    gone.push(method);
                }
            }
        }
        gone
    }
}
