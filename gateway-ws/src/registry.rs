//! The gateway's live connections and its directory: who is on each
//! connection (user id, groups, data), the delivery of frames into their
//! outboxes as the broker decided, the controls backends send, and the
//! heartbeat and token-expiry sweeps. No sockets here, so routing and the
//! directory are testable alone.
//!
//! The gateway holds the truth about its connections; its broker keeps a
//! copy. Every change is written, under the same lock as the change itself,
//! to a [`Journal`] that the broker link sends as directory reports, so that
//! the copy sees the changes in the order they were made. A new broker
//! session starts from a snapshot instead.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockWriteGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use herald_proto::v1::{
    ConnectionAddress, ConnectionState, ControlDone, ControlRequest, DirectoryChange, StreamPosition, control_request,
    delivery, directory_change, selection,
};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

use crate::close::CloseReason;
use crate::outbox::Outbox;
use crate::protocol::{self, Protocol};

/// Most groups one connection may be in; joins beyond it are ignored.
pub const MAX_GROUPS_PER_CONNECTION: usize = 64;
/// Most client channels one connection may be subscribed to.
pub const MAX_CHANNELS_PER_CONNECTION: usize = 128;

/// Why a subscription was not changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscriptionError {
    #[error("already subscribed to this channel")]
    AlreadySubscribed,
    #[error("not subscribed to this channel")]
    NotSubscribed,
    #[error("subscribed to {MAX_CHANNELS_PER_CONNECTION} channels already: unsubscribe from one first")]
    TooMany,
    #[error("the connection is closing")]
    Closing,
    #[error("this gateway holds as many client channels as it may: try again later")]
    GatewayFull,
}

/// What carrying out one delivery did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Frames queued on a connection.
    pub queued: u64,
    /// Connection ids that are not live on this gateway.
    pub unknown: u64,
    /// Connections that are closing (overflowed or unresponsive).
    pub closing: u64,
}

/// What a heartbeat sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sweep {
    pub pinged: u64,
    pub unresponsive: u64,
}

/// Who a new connection is, from its token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub user_id: Option<String>,
    pub groups: Vec<String>,
    /// When its token expires, in unix seconds.
    pub expires_at: Option<u64>,
    /// Client channels its token lets it subscribe to (the `channels` claim).
    pub channels: Vec<String>,
    /// The id of the `connect` command that gave the token, when the client
    /// gave it so rather than in the handshake: the greeting answers it.
    pub connect_id: Option<u64>,
    /// The handshake headers passed on in its connect event.
    pub headers: Vec<(String, String)>,
}

impl From<crate::client_auth::Identity> for Identity {
    fn from(verified: crate::client_auth::Identity) -> Self {
        Self {
            user_id: Some(verified.user_id),
            groups: verified.groups,
            expires_at: verified.expires_at,
            channels: verified.channels,
            connect_id: None,
            headers: Vec::new(),
        }
    }
}

/// Directory changes not yet reported to the broker, and the controls
/// carried out since the last report.
#[derive(Debug, Default)]
struct Journal {
    changes: Vec<DirectoryChange>,
    done: Vec<ControlDone>,
}

#[derive(Debug)]
pub struct Registry {
    next_id: AtomicU64,
    state: RwLock<State>,
    /// Woken when something was journaled.
    journaled: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// Every open connection's outbox, apart from its directory entry, so
    /// that a delivery walks a map of pointers, not of whole entries.
    outboxes: Members,
    connections: HashMap<u64, Entry>,
    users: HashMap<Arc<str>, Members>,
    groups: HashMap<Arc<str>, Members>,
    /// Client channel → its subscribers.
    channels: HashMap<Arc<str>, Members>,
    /// Token expiries: (unix seconds, connection id).
    expiries: BTreeSet<(u64, u64)>,
    /// `None` while no broker session follows the directory: the next
    /// session starts from a snapshot, so nothing is journaled meanwhile.
    journal: Option<Journal>,
    /// Changes made so far, journaled or not: a report covers up to a
    /// position, and positions never go back.
    seq: u64,
}

/// The connections of one user or group, with their outboxes, so that a
/// delivery to them needs one lookup.
type Members = HashMap<u64, Arc<Outbox>>;

/// One connection in the directory. Most connections are anonymous and in
/// no group, channel or data: what they are is boxed apart, and absent for
/// them, so that the map of every connection stays small.
#[derive(Debug)]
struct Entry {
    outbox: Arc<Outbox>,
    profile: Option<Box<Profile>>,
    /// Taken out of the directory already (closed by a control, or its
    /// token expired) while its task finishes.
    detached: bool,
}

/// Who a connection is and what it is in.
#[derive(Debug, Default)]
struct Profile {
    user: Option<Arc<str>>,
    groups: Vec<Arc<str>>,
    data: BTreeMap<String, String>,
    channels: Vec<Arc<str>>,
}

/// The profile of a connection that has none.
static ANONYMOUS: Profile = Profile { user: None, groups: Vec::new(), data: BTreeMap::new(), channels: Vec::new() };

/// The first connection id of a gateway process: its start time in
/// milliseconds, times 1000. Ids then count up by one, so a gateway that
/// restarts with the same worker id starts above every id it gave before,
/// unless it gave more than a thousand ids per millisecond of its life, or
/// the clock went back between the two runs.
fn first_connection_id() -> u64 {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
    ms.saturating_mul(1000) + 1
}

impl Default for Registry {
    fn default() -> Self {
        Self::starting_at(first_connection_id())
    }
}

impl Registry {
    /// A registry whose first connection id is `first_id`.
    pub fn starting_at(first_id: u64) -> Self {
        Self { next_id: AtomicU64::new(first_id), state: RwLock::default(), journaled: Notify::new() }
    }

    /// Resolves once something was journaled since the last call.
    pub async fn changed(&self) {
        self.journaled.notified().await;
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a connection and gives it an id never used before by this
    /// gateway. Returns the id and, when a broker session follows the
    /// directory, the journal position the broker must have acknowledged
    /// before the connection can be addressed.
    pub fn register(&self, outbox: Arc<Outbox>, identity: &Identity) -> (u64, Option<u64>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut state = self.write();
        let mut entry = Entry { outbox, profile: None, detached: false };
        if let Some(user) = identity.user_id.as_deref() {
            entry.profile_mut().user = Some(Arc::from(user));
        }
        entry.join(&identity.groups);
        state.index(id, &entry);
        if let Some(expires_at) = identity.expires_at {
            state.expiries.insert((expires_at, id));
        }
        let change = directory_change::Change::Opened(entry.snapshot());
        state.outboxes.insert(id, entry.outbox.clone());
        state.connections.insert(id, entry);
        let seq = state.journal(id, change);
        drop(state);
        if seq.is_some() {
            self.journaled.notify_one();
        }
        (id, seq)
    }

    /// Takes a closed connection out.
    pub fn remove(&self, id: u64) {
        let mut state = self.write();
        let journaled = state.detach(id);
        state.connections.remove(&id);
        state.outboxes.remove(&id);
        drop(state);
        if journaled {
            self.journaled.notify_one();
        }
    }

    pub fn len(&self) -> usize {
        self.read().connections.len()
    }

    /// Counts of distinct users, of groups with a member and of client
    /// channels with a subscriber.
    pub fn census(&self) -> (usize, usize, usize) {
        let state = self.read();
        (state.users.len(), state.groups.len(), state.channels.len())
    }

    /// Subscribes connection `id` to a client channel, unless that would
    /// make more than `max_channels` channels with a subscriber here.
    /// Returns the journal position the broker must have acknowledged before
    /// the subscription is in effect across the cluster, when a broker
    /// session follows.
    pub fn subscribe(&self, id: u64, channel: &str, max_channels: usize) -> Result<Option<u64>, SubscriptionError> {
        self.change_subscription(id, channel, Some(max_channels))
    }

    /// Unsubscribes connection `id` from a client channel; as
    /// [`Registry::subscribe`].
    pub fn unsubscribe(&self, id: u64, channel: &str) -> Result<Option<u64>, SubscriptionError> {
        self.change_subscription(id, channel, None)
    }

    /// The user id of connection `id`, if it has one.
    pub fn user_of(&self, id: u64) -> Option<Arc<str>> {
        self.read().connections.get(&id).and_then(|e| e.profile().user.clone())
    }

    /// The outbox of connection `id`, while it is open.
    pub fn outbox(&self, id: u64) -> Option<Arc<Outbox>> {
        self.read().outboxes.get(&id).cloned()
    }

    /// The client channels connection `id` is subscribed to.
    pub fn channels_of(&self, id: u64) -> Vec<Arc<str>> {
        self.read().connections.get(&id).map(|e| e.profile().channels.clone()).unwrap_or_default()
    }

    /// Moves connection `id`'s token expiry (a refreshed token) from
    /// `old` to `new`; returns false when the connection is closing.
    pub fn refresh(&self, id: u64, old: Option<u64>, new: Option<u64>) -> bool {
        let mut state = self.write();
        if state.connections.get(&id).is_none_or(|e| e.detached) {
            return false;
        }
        if let Some(old) = old {
            state.expiries.remove(&(old, id));
        }
        if let Some(new) = new {
            state.expiries.insert((new, id));
        }
        true
    }

    /// Whether connection `id` is subscribed to `channel`.
    pub fn has_subscribers(&self, channel: &str) -> bool {
        self.read().channels.contains_key(channel)
    }

    pub fn is_subscribed(&self, id: u64, channel: &str) -> bool {
        self.read().channels.get(channel).is_some_and(|members| members.contains_key(&id))
    }

    /// Subscribes (with the gateway's channel limit) or unsubscribes (`None`).
    fn change_subscription(
        &self,
        id: u64,
        channel: &str,
        max_channels: Option<usize>,
    ) -> Result<Option<u64>, SubscriptionError> {
        let subscribe = max_channels.is_some();
        let mut state = self.write();
        if let Some(max) = max_channels
            && state.channels.len() >= max
            && !state.channels.contains_key(channel)
        {
            return Err(SubscriptionError::GatewayFull);
        }
        let entry = state.connections.get_mut(&id).filter(|e| !e.detached).ok_or(SubscriptionError::Closing)?;
        let channels = &entry.profile().channels;
        let position = channels.iter().position(|c| **c == *channel);
        match (subscribe, position) {
            (true, Some(_)) => return Err(SubscriptionError::AlreadySubscribed),
            (true, None) if channels.len() >= MAX_CHANNELS_PER_CONNECTION => {
                return Err(SubscriptionError::TooMany);
            }
            (true, None) => entry.profile_mut().channels.push(Arc::from(channel)),
            (false, None) => return Err(SubscriptionError::NotSubscribed),
            (false, Some(i)) => {
                entry.profile_mut().channels.swap_remove(i);
                entry.tidy();
            }
        }
        let outbox = entry.outbox.clone();
        let snapshot = entry.snapshot();
        if subscribe {
            state.channels.entry(Arc::from(channel)).or_default().insert(id, outbox);
        } else {
            remove_member(&mut state.channels, channel, id);
        }
        let seq = state.journal(id, directory_change::Change::State(snapshot));
        drop(state);
        if seq.is_some() {
            self.journaled.notify_one();
        }
        Ok(seq)
    }

    /// Starts journaling for a new broker session: every live connection,
    /// as opened, and the journal position it covers.
    pub fn snapshot(&self) -> (Vec<DirectoryChange>, u64) {
        let mut state = self.write();
        let changes = state
            .connections
            .iter()
            .filter(|(_, e)| !e.detached)
            .map(|(id, e)| change(*id, directory_change::Change::Opened(e.snapshot())))
            .collect();
        state.journal = Some(Journal::default());
        (changes, state.seq)
    }

    /// Stops journaling: the broker session ended.
    pub fn unfollow(&self) {
        self.write().journal = None;
    }

    /// Takes what was journaled since the last call, with the journal
    /// position it reaches; `None` when there is nothing.
    pub fn take_journal(&self) -> Option<(Vec<DirectoryChange>, Vec<ControlDone>, u64)> {
        let mut state = self.write();
        let seq = state.seq;
        let journal = state.journal.as_mut()?;
        if journal.changes.is_empty() && journal.done.is_empty() {
            return None;
        }
        Some((std::mem::take(&mut journal.changes), std::mem::take(&mut journal.done), seq))
    }

    /// Carries out a control for this gateway (`worker_id`), journals its
    /// changes and its confirmation, and returns how many connections it
    /// applied to.
    pub fn apply_control(&self, worker_id: &str, control_id: u64, request: ControlRequest) -> u32 {
        let mut state = self.write();
        let mine = |a: &ConnectionAddress| a.worker_id == worker_id;
        let applied = match request.op {
            None => 0,
            Some(control_request::Op::BindUser(bind)) => {
                let target = bind.connection.filter(mine).and_then(|a| a.connection_id.parse().ok());
                state.edit(target, |e| e.profile_mut().user = Some(Arc::from(bind.user_id.as_str())))
            }
            Some(control_request::Op::UnbindUser(address)) => {
                let target = Some(address).filter(mine).and_then(|a| a.connection_id.parse().ok());
                state.edit(target, |e| e.profile_mut().user = None)
            }
            Some(control_request::Op::JoinGroups(change)) => {
                let ids = state.selected(change.selection.and_then(|s| s.of), worker_id);
                state.edit_all(&ids, |e| e.join(&change.groups))
            }
            Some(control_request::Op::LeaveGroups(change)) => {
                let ids = state.selected(change.selection.and_then(|s| s.of), worker_id);
                let groups: HashSet<String> = change.groups.into_iter().collect();
                state.edit_all(&ids, |e| e.profile_mut().groups.retain(|g| !groups.contains(&**g)))
            }
            Some(control_request::Op::DissolveGroup(group)) => {
                let ids: Vec<u64> =
                    state.groups.get(group.as_str()).map(|m| m.keys().copied().collect()).unwrap_or_default();
                state.edit_all(&ids, |e| e.profile_mut().groups.retain(|g| **g != *group))
            }
            Some(control_request::Op::Close(close)) => {
                let ids = state.selected(close.selection.and_then(|s| s.of), worker_id);
                let text = (!close.reason.is_empty()).then(|| Box::<str>::from(close.reason.as_str()));
                for id in &ids {
                    if let Some(entry) = state.connections.get(id) {
                        entry.outbox.close_with(CloseReason::Kicked, text.clone());
                    }
                    state.detach(*id);
                }
                u32::try_from(ids.len()).unwrap_or(u32::MAX)
            }
            Some(control_request::Op::SetData(set)) => {
                let target = set.connection.filter(mine).and_then(|a| a.connection_id.parse().ok());
                state.edit(target, |e| {
                    let data = &mut e.profile_mut().data;
                    if set.replace {
                        data.clear();
                    }
                    for key in &set.remove {
                        data.remove(key);
                    }
                    data.extend(set.values);
                })
            }
        };
        if let Some(journal) = state.journal.as_mut() {
            journal.done.push(ControlDone { control_id, connections: applied });
            drop(state);
            self.journaled.notify_one();
        }
        applied
    }

    /// Closes the connections whose token expired by `now` (unix seconds);
    /// returns how many.
    pub fn expire(&self, now: u64) -> usize {
        let mut state = self.write();
        let mut expired = Vec::new();
        while let Some(&(at, id)) = state.expiries.first() {
            if at > now {
                break;
            }
            state.expiries.pop_first();
            expired.push(id);
        }
        let mut journaled = false;
        for id in &expired {
            if let Some(entry) = state.connections.get(id) {
                entry.outbox.close(CloseReason::TokenExpired);
            }
            journaled |= state.detach(*id);
        }
        drop(state);
        if journaled {
            self.journaled.notify_one();
        }
        expired.len()
    }

    /// Queues `frame` (published at `published_us`, unix µs) on the
    /// connections `to` names, as the broker decided, except `except` (the
    /// connection ids of this gateway the publisher left out). The payload
    /// is shared, not copied.
    pub fn deliver(&self, to: &delivery::To, except: &HashSet<u64>, frame: Message, published_us: u64) -> Outcome {
        let state = self.read();
        let mut fan = Fan { except, published_us, wrap: true, publication: None, outcome: Outcome::default() };
        match to {
            delivery::To::Everyone(_) => fan.out(state.outboxes.iter().map(|(id, outbox)| (*id, outbox)), frame),
            delivery::To::User(user) => {
                if let Some(members) = state.users.get(user.as_str()) {
                    fan.out(members.iter().map(|(id, outbox)| (*id, outbox)), frame);
                }
            }
            delivery::To::Group(group) => {
                if let Some(members) = state.groups.get(group.as_str()) {
                    fan.out(members.iter().map(|(id, outbox)| (*id, outbox)), frame);
                }
            }
            delivery::To::Connections(connections) => {
                let unknown = std::cell::Cell::new(0);
                let live = connections.ids.iter().filter_map(|connection_id| {
                    let found = connection_id.parse::<u64>().ok().and_then(|id| Some((id, state.outboxes.get(&id)?)));
                    if found.is_none() {
                        unknown.set(unknown.get() + 1);
                    }
                    found
                });
                fan.out(live, frame);
                fan.outcome.unknown += unknown.get();
            }
        }
        fan.outcome
    }

    /// Queues `frame` (a publication at `position`, none without history,
    /// in the client protocol) on the subscribers of client channel
    /// `channel`, except `except` (connection ids of this gateway).
    pub fn deliver_to_channel(
        &self,
        channel: &str,
        except: &HashSet<u64>,
        position: Option<&StreamPosition>,
        frame: Message,
        published_us: u64,
    ) -> Outcome {
        let state = self.read();
        let mut fan = Fan {
            except,
            published_us,
            wrap: false,
            publication: Some((channel, position)),
            outcome: Outcome::default(),
        };
        if let Some(members) = state.channels.get(channel) {
            fan.out(members.iter().map(|(id, outbox)| (*id, outbox)), frame);
        }
        fan.outcome
    }

    /// Closes every connection for `reason`.
    pub fn close_all(&self, reason: CloseReason) {
        for outbox in self.read().outboxes.values() {
            outbox.close(reason);
        }
    }

    /// Bytes queued on all connections together.
    pub fn queued_bytes(&self) -> usize {
        self.read().outboxes.values().map(|o| o.queued_bytes()).sum()
    }

    /// Pings every connection heard from since `silent_since_ms`, and closes
    /// the others as unresponsive.
    pub fn heartbeat(&self, silent_since_ms: u64) -> Sweep {
        let state = self.read();
        let mut sweep = Sweep::default();
        for outbox in state.outboxes.values() {
            if outbox.last_heard() < silent_since_ms {
                outbox.close(CloseReason::Unresponsive);
                sweep.unresponsive += 1;
            } else if outbox.push(Message::Ping(Default::default()), 0).is_ok() {
                sweep.pinged += 1;
            }
        }
        sweep
    }
}

impl State {
    /// Journals a change of connection `id`; returns its position when a
    /// broker session follows the directory.
    fn journal(&mut self, id: u64, what: directory_change::Change) -> Option<u64> {
        self.seq += 1;
        let journal = self.journal.as_mut()?;
        journal.changes.push(change(id, what));
        Some(self.seq)
    }

    fn index(&mut self, id: u64, entry: &Entry) {
        let profile = entry.profile();
        if let Some(user) = &profile.user {
            self.users.entry(user.clone()).or_default().insert(id, entry.outbox.clone());
        }
        for group in &profile.groups {
            self.groups.entry(group.clone()).or_default().insert(id, entry.outbox.clone());
        }
    }

    fn unindex(&mut self, id: u64, user: Option<&Arc<str>>, groups: &[Arc<str>]) {
        if let Some(user) = user {
            remove_member(&mut self.users, user, id);
        }
        for group in groups {
            remove_member(&mut self.groups, group, id);
        }
    }

    /// Takes connection `id` out of the directory (not out of delivery:
    /// its outbox still takes frames until its task ends). Returns whether
    /// the change was journaled.
    fn detach(&mut self, id: u64) -> bool {
        let Some(entry) = self.connections.get_mut(&id) else {
            return false;
        };
        if entry.detached {
            return false;
        }
        entry.detached = true;
        let Profile { user, groups, channels, .. } = entry.profile.take().map(|p| *p).unwrap_or_default();
        self.unindex(id, user.as_ref(), &groups);
        for channel in &channels {
            remove_member(&mut self.channels, channel, id);
        }
        self.journal(id, directory_change::Change::Closed(herald_proto::v1::Closed {})).is_some()
    }

    /// The live connections `of` selects on this gateway (`worker_id`).
    fn selected(&self, of: Option<selection::Of>, worker_id: &str) -> Vec<u64> {
        match of {
            Some(selection::Of::Connection(address)) if address.worker_id == worker_id => address
                .connection_id
                .parse()
                .ok()
                .filter(|id| self.connections.get(id).is_some_and(|e| !e.detached))
                .into_iter()
                .collect(),
            Some(selection::Of::User(user)) => {
                self.users.get(user.as_str()).map(|m| m.keys().copied().collect()).unwrap_or_default()
            }
            Some(selection::Of::Connection(_)) | None => Vec::new(),
        }
    }

    /// Changes connection `id` (when live) with `edit`, keeping the indexes
    /// and the journal in step. Returns 1 when it was changed, else 0.
    fn edit(&mut self, id: Option<u64>, edit: impl FnOnce(&mut Entry)) -> u32 {
        let Some(id) = id else {
            return 0;
        };
        let Some(mut entry) = self.connections.remove(&id) else {
            return 0;
        };
        if entry.detached {
            self.connections.insert(id, entry);
            return 0;
        }
        let profile = entry.profile();
        self.unindex(id, profile.user.as_ref(), &profile.groups);
        edit(&mut entry);
        entry.tidy();
        self.index(id, &entry);
        let snapshot = entry.snapshot();
        self.connections.insert(id, entry);
        self.journal(id, directory_change::Change::State(snapshot));
        1
    }

    fn edit_all(&mut self, ids: &[u64], edit: impl Fn(&mut Entry)) -> u32 {
        ids.iter().map(|id| self.edit(Some(*id), &edit)).sum()
    }
}

impl Entry {
    fn profile(&self) -> &Profile {
        self.profile.as_deref().unwrap_or(&ANONYMOUS)
    }

    fn profile_mut(&mut self) -> &mut Profile {
        self.profile.get_or_insert_default()
    }

    /// Frees the profile once there is nothing in it.
    fn tidy(&mut self) {
        if self.profile.as_deref().is_some_and(Profile::is_empty) {
            self.profile = None;
        }
    }

    /// Puts the connection in `groups`, each once, up to
    /// [`MAX_GROUPS_PER_CONNECTION`].
    fn join(&mut self, groups: &[String]) {
        for group in groups {
            let joined = &self.profile().groups;
            if joined.len() < MAX_GROUPS_PER_CONNECTION && !joined.iter().any(|g| **g == **group) {
                self.profile_mut().groups.push(Arc::from(group.as_str()));
            }
        }
    }

    fn snapshot(&self) -> ConnectionState {
        let profile = self.profile();
        ConnectionState {
            user_id: profile.user.as_deref().unwrap_or_default().to_owned(),
            groups: profile.groups.iter().map(|g| g.to_string()).collect(),
            data: profile.data.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            channels: profile.channels.iter().map(|c| c.to_string()).collect(),
        }
    }
}

impl Profile {
    fn is_empty(&self) -> bool {
        self.user.is_none() && self.groups.is_empty() && self.data.is_empty() && self.channels.is_empty()
    }
}

/// One delivery to many outboxes.
struct Fan<'a> {
    except: &'a HashSet<u64>,
    published_us: u64,
    /// Whether the frame is a raw one, which connections speaking the
    /// client protocol get wrapped as a direct message.
    wrap: bool,
    /// The channel and offset of a publication, which a subscription being
    /// set up holds aside.
    publication: Option<(&'a str, Option<&'a StreamPosition>)>,
    outcome: Outcome,
}

impl Fan<'_> {
    /// Queues `frame` on every outbox of `to` but the excepted ones. The
    /// last one takes the frame itself: a clone of a payload read off the
    /// wire costs an allocation, and most deliveries have one recipient.
    fn out<'o>(&mut self, to: impl Iterator<Item = (u64, &'o Arc<Outbox>)>, frame: Message) {
        let mut to = to.peekable();
        let mut frame = Some(frame);
        // Made once, for the first recipient that speaks the client protocol.
        let mut wrapped: Option<Option<Message>> = None;
        while let Some((id, outbox)) = to.next() {
            if !self.except.is_empty() && self.except.contains(&id) {
                continue;
            }
            let this = if self.wrap && outbox.protocol() == Protocol::Json {
                wrapped.get_or_insert_with(|| frame.as_ref().and_then(protocol::direct)).clone()
            } else if to.peek().is_none() {
                frame.take()
            } else {
                frame.clone()
            };
            let Some(this) = this else {
                continue;
            };
            let pushed = match self.publication {
                Some((channel, position)) => outbox.push_publication(channel, position, this, self.published_us),
                None => outbox.push(this, self.published_us),
            };
            match pushed {
                Ok(()) => self.outcome.queued += 1,
                Err(_) => self.outcome.closing += 1,
            }
        }
    }
}

fn change(id: u64, what: directory_change::Change) -> DirectoryChange {
    DirectoryChange { connection_id: id.to_string(), change: Some(what) }
}

fn remove_member(index: &mut HashMap<Arc<str>, Members>, name: &str, id: u64) {
    if let Some(members) = index.get_mut(name) {
        members.remove(&id);
        if members.is_empty() {
            index.remove(name);
        }
    }
}

#[cfg(test)]
mod tests;
