//! The interest index: which sessions listen on which channels, and which
//! session holds each worker id. Synchronous and free of I/O, so that it can
//! be checked against a model on its own (see its property test).
//!
//! Each channel's listener list is an immutable `Arc<[L]>`, replaced on
//! change, so that a publish clones one `Arc` under the hub's read lock and
//! delivers with the lock released. Every change that gives a channel its
//! first listener, or takes its last, is reported as an [`Interest`], in the
//! order the changes were made: that is what a federation needs to follow.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use herald_proto::names;

use crate::error::CommandErrorKind;
use crate::federation::Interest;

/// A session's id, unique for the broker's life.
pub(crate) type SessionId = u64;

/// What the index keeps of a listening session.
pub(crate) trait Listener: Clone {
    fn session_id(&self) -> SessionId;
}

/// The listeners of one channel.
pub(crate) type Listeners<L> = Arc<[L]>;

/// Interest changes of one update, in order.
pub(crate) type Changes = Vec<Interest>;

#[derive(Debug)]
pub(crate) struct Index<L> {
    channels: HashMap<String, Listeners<L>>,
    sessions: HashMap<SessionId, Entry<L>>,
    workers: HashMap<String, Holder>,
}

#[derive(Debug)]
struct Entry<L> {
    listener: L,
    /// Every channel the session listens on, its worker channel and its
    /// user and group channels included.
    channels: HashSet<String>,
    /// How many of `channels` are user and group channels, which follow the
    /// gateway's directory and are not counted against the channel limit.
    members: usize,
    worker_id: Option<String>,
}

#[derive(Debug)]
struct Holder {
    session_id: SessionId,
    instance_id: String,
}

/// A session taken out of the index.
#[derive(Debug)]
pub(crate) struct Removed<L> {
    pub(crate) listener: L,
    /// The worker id it held, now free.
    pub(crate) released: Option<String>,
}

impl<L> Default for Index<L> {
    fn default() -> Self {
        Self { channels: HashMap::new(), sessions: HashMap::new(), workers: HashMap::new() }
    }
}

impl<L: Listener> Index<L> {
    /// Adds a session that listens on nothing yet.
    pub(crate) fn insert(&mut self, listener: L) {
        let entry = Entry { listener: listener.clone(), channels: HashSet::new(), members: 0, worker_id: None };
        self.sessions.insert(listener.session_id(), entry);
    }

    /// Takes a session out, with every channel it listened on and the worker
    /// id it held.
    pub(crate) fn remove(&mut self, id: SessionId, changes: &mut Changes) -> Option<Removed<L>> {
        let entry = self.sessions.remove(&id)?;
        for channel in &entry.channels {
            self.unlink(id, channel, changes);
        }
        let released = entry.worker_id.filter(|worker_id| {
            let held = self.workers.get(worker_id).is_some_and(|h| h.session_id == id);
            if held {
                self.workers.remove(worker_id);
            }
            held
        });
        Some(Removed { listener: entry.listener, released })
    }

    /// Refuses a claim that cannot succeed here: a second claim on one
    /// session, or an id held by another instance.
    pub(crate) fn check_claim(
        &self,
        id: SessionId,
        worker_id: &str,
        instance_id: &str,
    ) -> Result<(), CommandErrorKind> {
        let entry = self.sessions.get(&id).ok_or(CommandErrorKind::ShuttingDown)?;
        if let Some(held) = &entry.worker_id {
            return Err(CommandErrorKind::SecondClaim(held.clone()));
        }
        match self.workers.get(worker_id) {
            Some(holder) if holder.instance_id != instance_id => {
                Err(CommandErrorKind::WorkerTaken { worker_id: worker_id.to_owned() })
            }
            _ => Ok(()),
        }
    }

    /// Makes session `id` the holder of `worker_id`, listening on its worker
    /// channel. When a stale session of the same instance held it, that
    /// session is taken out and returned, for the caller to end.
    pub(crate) fn claim(
        &mut self,
        id: SessionId,
        worker_id: &str,
        instance_id: &str,
        changes: &mut Changes,
    ) -> Result<Option<L>, CommandErrorKind> {
        self.check_claim(id, worker_id, instance_id)?;
        // The same gateway process reconnected before its old session was
        // noticed dead: the new session takes over.
        let stale = self.workers.get(worker_id).map(|h| h.session_id);
        let stale = stale.and_then(|stale| self.remove(stale, changes)).map(|removed| removed.listener);
        self.workers.insert(worker_id.to_owned(), Holder { session_id: id, instance_id: instance_id.to_owned() });
        if let Some(entry) = self.sessions.get_mut(&id) {
            entry.worker_id = Some(worker_id.to_owned());
        }
        self.link(id, names::worker_channel(worker_id), changes);
        Ok(stale)
    }

    /// Adds `channels` to session `id`, unless it would then listen on more
    /// than `max` channels (its worker channel counted).
    pub(crate) fn subscribe(
        &mut self,
        id: SessionId,
        channels: &[String],
        max: usize,
        changes: &mut Changes,
    ) -> Result<(), CommandErrorKind> {
        let entry = self.sessions.get(&id).ok_or(CommandErrorKind::ShuttingDown)?;
        let new: HashSet<&String> = channels.iter().filter(|c| !entry.channels.contains(*c)).collect();
        let count = entry.channels.len() - entry.members + new.len();
        if count > max {
            return Err(CommandErrorKind::TooManyChannels { count, max });
        }
        let new: Vec<String> = new.into_iter().cloned().collect();
        for channel in new {
            self.link(id, channel, changes);
        }
        Ok(())
    }

    /// Makes session `id` listen on a user or group channel: its gateway
    /// holds a member.
    pub(crate) fn add_member_channel(&mut self, id: SessionId, channel: String, changes: &mut Changes) {
        let Some(entry) = self.sessions.get_mut(&id) else {
            return;
        };
        if !entry.channels.contains(&channel) {
            entry.members += 1;
            self.link(id, channel, changes);
        }
    }

    /// Stops session `id` listening on a user or group channel: its gateway
    /// holds no member any more.
    pub(crate) fn remove_member_channel(&mut self, id: SessionId, channel: &str, changes: &mut Changes) {
        let Some(entry) = self.sessions.get_mut(&id) else {
            return;
        };
        if entry.channels.remove(channel) {
            entry.members -= 1;
            self.unlink(id, channel, changes);
        }
    }

    /// Removes `channels` from session `id`; worker, user and group
    /// channels stay.
    pub(crate) fn unsubscribe(&mut self, id: SessionId, channels: &[String], changes: &mut Changes) {
        for channel in channels {
            if names::is_reserved_channel(channel) {
                continue;
            }
            let removed = self.sessions.get_mut(&id).is_some_and(|e| e.channels.remove(channel));
            if removed {
                self.unlink(id, channel, changes);
            }
        }
    }

    /// The sessions listening on `channel`.
    #[inline]
    pub(crate) fn listeners(&self, channel: &str) -> Option<Listeners<L>> {
        self.channels.get(channel).cloned()
    }

    /// The session holding `worker_id`.
    pub(crate) fn holder(&self, worker_id: &str) -> Option<&L> {
        let holder = self.workers.get(worker_id)?;
        self.sessions.get(&holder.session_id).map(|e| &e.listener)
    }

    /// A session, by id.
    pub(crate) fn session(&self, id: SessionId) -> Option<&L> {
        self.sessions.get(&id).map(|e| &e.listener)
    }

    pub(crate) fn holds(&self, worker_id: &str) -> bool {
        self.workers.contains_key(worker_id)
    }

    /// Every session.
    pub(crate) fn sessions(&self) -> impl Iterator<Item = &L> {
        self.sessions.values().map(|e| &e.listener)
    }

    /// Counts of sessions, channels with listeners, and held worker ids.
    pub(crate) fn census(&self) -> (usize, usize, usize) {
        (self.sessions.len(), self.channels.len(), self.workers.len())
    }

    fn link(&mut self, id: SessionId, channel: String, changes: &mut Changes) {
        let Some(entry) = self.sessions.get_mut(&id) else {
            return;
        };
        if !entry.channels.insert(channel.clone()) {
            return;
        }
        let listener = entry.listener.clone();
        let list = self.channels.entry(channel.clone()).or_insert_with(|| {
            changes.push(Interest::Add(channel));
            Arc::from(Vec::new())
        });
        let mut grown = Vec::with_capacity(list.len() + 1);
        grown.extend(list.iter().cloned());
        grown.push(listener);
        *list = grown.into();
    }

    /// Drops session `id` from the listeners of `channel`.
    fn unlink(&mut self, id: SessionId, channel: &str, changes: &mut Changes) {
        let Some(list) = self.channels.get_mut(channel) else {
            return;
        };
        let kept: Vec<L> = list.iter().filter(|l| l.session_id() != id).cloned().collect();
        if kept.is_empty() {
            self.channels.remove(channel);
            changes.push(Interest::Remove(channel.to_owned()));
        } else {
            *list = kept.into();
        }
    }
}

#[cfg(test)]
mod properties;
