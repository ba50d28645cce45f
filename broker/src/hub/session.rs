//! Subscriber sessions: each has a bounded queue of acks and events, a switch
//! that ends it with a final status, and a stream that hands out what is
//! queued before that status. A session lives while its handle or its event
//! stream is held, and leaves the index when both are gone, when it is
//! refused or evicted, or when the broker shuts down.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use herald_proto::v1::{SubscribeRequest, SubscribeResponse};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tonic::Status;

use super::Hub;
use super::index::{Listener, SessionId};
use crate::error::CommandError;

/// The sending side of one session's queue, plus the switch that ends it.
pub(crate) struct Sink {
    pub(super) session_id: SessionId,
    pub(super) tx: mpsc::Sender<SubscribeResponse>,
    end: Mutex<Option<oneshot::Sender<Status>>>,
}

impl Sink {
    /// Ends the session's event stream with `status` (first call wins).
    pub(super) fn end(&self, status: Status) {
        let taken = self.end.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(tx) = taken {
            let _ = tx.send(status);
        }
    }
}

impl Listener for Arc<Sink> {
    fn session_id(&self) -> SessionId {
        self.session_id
    }
}

impl Hub {
    /// Opens a subscriber session. The session lives while either the
    /// returned handle or the event stream is held.
    pub fn open_session(&self) -> (Arc<Session>, SessionEvents) {
        let id = self.shared.next_session_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.shared.limits.session_queue);
        let (end_tx, end_rx) = oneshot::channel();
        let sink = Arc::new(Sink { session_id: id, tx, end: Mutex::new(Some(end_tx)) });
        let mut state = self.write();
        let max = self.shared.limits.max_sessions;
        if state.shutting_down {
            sink.end(Status::unavailable("broker is shutting down"));
        } else if state.index.census().0 >= max {
            sink.end(Status::resource_exhausted(format!("the broker holds its limit of {max} subscriber sessions")));
        } else {
            state.index.insert(sink.clone());
            self.shared.metrics.sessions.inc();
        }
        drop(state);
        let session = Arc::new(Session { hub: self.clone(), id, sink });
        let events =
            SessionEvents { rx, end: Some(end_rx), final_status: None, ended: false, _session: session.clone() };
        (session, events)
    }

    /// Ends every session with `UNAVAILABLE` and refuses new publishes, so that
    /// gateways move to another broker and the gRPC server can drain.
    pub fn shut_down(&self) {
        let sinks: Vec<_> = {
            let mut state = self.write();
            state.shutting_down = true;
            state.index.sessions().cloned().collect()
        };
        for sink in sinks {
            sink.end(Status::unavailable("broker is shutting down"));
            self.close_session(sink.session_id);
        }
        self.shared.backends.shut_down();
        self.federation().leave();
    }

    /// Ends the session `sink` belongs to with `status`.
    pub(super) fn end_session(&self, sink: &Sink, status: Status) {
        sink.end(status);
        self.close_session(sink.session_id);
    }

    /// Takes a session out of the index and gives back its worker id.
    pub(super) fn close_session(&self, id: SessionId) {
        let mut state = self.write();
        let mut changes = Vec::new();
        let Some(removed) = state.index.remove(id, &mut changes) else {
            return;
        };
        // The index dropped every channel of the session, its user and
        // group channels included: the directory's own account of those is
        // not needed.
        let departed = state.directory.detach(id, &mut Vec::new());
        let shutting_down = state.shutting_down;
        self.shared.metrics.sessions.dec();
        self.commit(&state, changes);
        drop(state);
        // A broker shutting down hands its gateways to the others.
        if let Some(departed) = departed.filter(|d| !d.connections.is_empty() && !shutting_down) {
            self.watch_departed(departed);
        }
        self.abandon_controls(id);
        if let Some(worker_id) = removed.released {
            self.federation().release(worker_id);
        }
    }
}

/// A subscriber session: apply commands to it; drop every handle (and its
/// event stream) to end it.
pub struct Session {
    hub: Hub,
    id: SessionId,
    sink: Arc<Sink>,
}

impl Session {
    /// Applies one command. A refused command ends the session: its event
    /// stream yields the refusal as its final status.
    pub async fn apply(&self, req: SubscribeRequest) -> Result<(), CommandError> {
        self.hub.apply(self.id, &self.sink, req).await.inspect_err(|e| {
            tracing::debug!(session = self.id, error = %e, "subscriber command refused");
            self.end(e.clone().into());
        })
    }

    /// Ends the session with `status` as the last item of its event stream.
    pub fn end(&self, status: Status) {
        self.hub.end_session(&self.sink, status);
    }

    /// Resolves once the session's event stream has been dropped.
    pub async fn closed(&self) {
        self.sink.tx.closed().await;
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.hub.close_session(self.id);
    }
}

/// The stream of acks and events of one session. It ends with an error status
/// when the session is refused, evicted or the broker shuts down.
pub struct SessionEvents {
    rx: mpsc::Receiver<SubscribeResponse>,
    end: Option<oneshot::Receiver<Status>>,
    /// The status the session ended with, yielded once the queue is drained.
    final_status: Option<Status>,
    ended: bool,
    _session: Arc<Session>,
}

impl Stream for SessionEvents {
    type Item = Result<SubscribeResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if let Some(end) = self.end.as_mut() {
            match Pin::new(end).poll(cx) {
                Poll::Ready(Ok(status)) => {
                    self.final_status = Some(status);
                    self.end = None;
                }
                Poll::Ready(Err(_)) => self.end = None,
                Poll::Pending => {}
            }
        }
        // Once ended, no new events arrive: hand over what is queued (events
        // published before the end), then the final status.
        if self.final_status.is_some() {
            return match self.rx.try_recv() {
                Ok(item) => Poll::Ready(Some(Ok(item))),
                Err(_) => {
                    self.ended = true;
                    Poll::Ready(self.final_status.take().map(Err))
                }
            };
        }
        self.rx.poll_recv(cx).map(|m| m.map(Ok))
    }
}
