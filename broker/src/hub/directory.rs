//! The broker's copy of who is on its gateways' connections: for each
//! session (one gateway), its live connections with their user id, groups
//! and data, and the indexes that answer "where is this user?" and "who is
//! in this group?" without asking anyone.
//!
//! The gateways hold the truth; this copy only follows their reports
//! (`DirectoryReport`), and a gateway that moves to another broker reports
//! everything again there. Every change that gives a session its first
//! connection of a user or group, or takes its last, is returned as a
//! [`MemberChange`], so that the hub routes user and group messages only to
//! the sessions that hold a recipient. Client channel subscriptions are
//! followed the same way: a session listens on a client channel while its
//! gateway holds a subscriber. Synchronous and free of I/O, so that
//! it can be checked against a model (see its property test).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use herald_proto::names;
use herald_proto::v1::{
    ConnectionAddress, ConnectionInfo, ConnectionState, DirectoryChange, SetConnectionData, directory_change,
};

use super::index::SessionId;
use crate::error::CommandErrorKind;

/// Most groups one connection may be in.
pub const MAX_GROUPS_PER_CONNECTION: usize = 64;
/// Most client channels one connection may be subscribed to.
pub const MAX_CHANNELS_PER_CONNECTION: usize = 128;
/// Most entries of one connection's data.
pub const MAX_DATA_ENTRIES: usize = 64;
/// Most bytes of one connection's data, keys and values together.
pub const MAX_DATA_BYTES: usize = 4096;

/// A session gained its first connection of a user or group, or lost its last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MemberChange {
    /// The session now holds a member: it listens on `channel`.
    Gained { session: SessionId, channel: String },
    /// The session holds no member any more.
    Lost { session: SessionId, channel: String },
}

#[derive(Debug, Default)]
pub(crate) struct Directory {
    gateways: HashMap<SessionId, Gateway>,
    /// user id → sessions holding a connection of it, with how many.
    users: HashMap<Arc<str>, HashMap<SessionId, u32>>,
    /// group → sessions holding a member, with how many.
    groups: HashMap<Arc<str>, HashMap<SessionId, u32>>,
    /// client channel → sessions holding a subscriber, with how many.
    channels: HashMap<Arc<str>, HashMap<SessionId, u32>>,
    connections: usize,
}

#[derive(Debug)]
struct Gateway {
    worker_id: String,
    /// Its process's instance id, when it reports disconnect events.
    reporting: Option<String>,
    /// Whether its first report (every live connection) arrived. Until
    /// then its connections are unknown, not absent: answers name it
    /// missing rather than count it empty.
    reported: bool,
    connections: HashMap<String, Connection>,
}

/// A gateway whose session ended, with the connections it had.
#[derive(Debug)]
pub(crate) struct Departed {
    pub(crate) worker_id: String,
    pub(crate) instance_id: String,
    /// Connection ids, with their users.
    pub(crate) connections: Vec<(String, Option<Arc<str>>)>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Connection {
    user: Option<Arc<str>>,
    groups: Vec<Arc<str>>,
    data: BTreeMap<String, String>,
    channels: Vec<Arc<str>>,
}

impl Directory {
    /// Starts following the gateway holding `worker_id` on session
    /// `session`; `reporting` is its process's instance id when it reports
    /// disconnect events.
    pub(crate) fn attach(&mut self, session: SessionId, worker_id: &str, reporting: Option<&str>) {
        self.gateways.entry(session).or_insert_with(|| Gateway {
            worker_id: worker_id.to_owned(),
            reporting: reporting.map(str::to_owned),
            reported: false,
            connections: HashMap::new(),
        });
    }

    /// Forgets a session's gateway and all of its connections; returns
    /// them when the gateway reports disconnects, for the disconnects of a
    /// gateway that does not come back.
    pub(crate) fn detach(&mut self, session: SessionId, changes: &mut Vec<MemberChange>) -> Option<Departed> {
        let gateway = self.gateways.remove(&session)?;
        self.connections -= gateway.connections.len();
        let mut connections = Vec::new();
        for (id, connection) in gateway.connections {
            self.unindex(session, &connection, changes);
            if gateway.reporting.is_some() {
                connections.push((id, connection.user));
            }
        }
        let instance_id = gateway.reporting?;
        Some(Departed { worker_id: gateway.worker_id, instance_id, connections })
    }

    /// Records that the gateway of `session` reported: from its first
    /// report on, its connections are known.
    pub(crate) fn reported(&mut self, session: SessionId) -> Result<(), CommandErrorKind> {
        let gateway = self
            .gateways
            .get_mut(&session)
            .ok_or_else(|| CommandErrorKind::Invalid("claim a worker id before reporting connections".into()))?;
        gateway.reported = true;
        Ok(())
    }

    /// Whether the gateway of `session` has made its first report.
    pub(crate) fn has_reported(&self, session: SessionId) -> bool {
        self.gateways.get(&session).is_some_and(|g| g.reported)
    }

    /// Checks one reported change without applying it.
    pub(crate) fn check(change: &DirectoryChange) -> Result<(), CommandErrorKind> {
        names::validate_connection_id(&change.connection_id)?;
        match &change.change {
            None => Err(CommandErrorKind::Invalid("a directory change needs opened, closed or state".into())),
            Some(directory_change::Change::Closed(_)) => Ok(()),
            Some(directory_change::Change::Opened(state) | directory_change::Change::State(state)) => {
                check_state(state)
            }
        }
    }

    /// Applies one change reported by the gateway of `session` (checked
    /// with [`Directory::check`]).
    pub(crate) fn apply(
        &mut self,
        session: SessionId,
        change: DirectoryChange,
        changes: &mut Vec<MemberChange>,
    ) -> Result<(), CommandErrorKind> {
        let Some(gateway) = self.gateways.get_mut(&session) else {
            return Err(CommandErrorKind::Invalid("claim a worker id before reporting connections".into()));
        };
        let old = match change.change {
            None => return Ok(()),
            Some(directory_change::Change::Closed(_)) => {
                let old = gateway.connections.remove(&change.connection_id);
                if old.is_some() {
                    self.connections -= 1;
                }
                old
            }
            Some(directory_change::Change::Opened(state) | directory_change::Change::State(state)) => {
                let new = Connection::from(state);
                let old = gateway.connections.insert(change.connection_id, new.clone());
                if old.is_none() {
                    self.connections += 1;
                }
                self.index(session, &new, changes);
                old
            }
        };
        if let Some(old) = old {
            self.unindex(session, &old, changes);
        }
        Ok(())
    }

    fn index(&mut self, session: SessionId, connection: &Connection, changes: &mut Vec<MemberChange>) {
        if let Some(user) = &connection.user {
            count_in(&mut self.users, user, session, names::user_channel, changes);
        }
        for group in &connection.groups {
            count_in(&mut self.groups, group, session, names::group_channel, changes);
        }
        for channel in &connection.channels {
            count_in(&mut self.channels, channel, session, str::to_owned, changes);
        }
    }

    fn unindex(&mut self, session: SessionId, connection: &Connection, changes: &mut Vec<MemberChange>) {
        if let Some(user) = &connection.user {
            count_out(&mut self.users, user, session, names::user_channel, changes);
        }
        for group in &connection.groups {
            count_out(&mut self.groups, group, session, names::group_channel, changes);
        }
        for channel in &connection.channels {
            count_out(&mut self.channels, channel, session, str::to_owned, changes);
        }
    }

    /// Whether the gateway of `session` has a live connection `connection_id`.
    pub(crate) fn has_connection(&self, session: SessionId, connection_id: &str) -> bool {
        self.gateways.get(&session).is_some_and(|g| g.connections.contains_key(connection_id))
    }

    /// The sessions holding a connection of `user`.
    pub(crate) fn sessions_of_user(&self, user: &str) -> Vec<SessionId> {
        self.users.get(user).map(|s| s.keys().copied().collect()).unwrap_or_default()
    }

    /// The sessions holding a member of `group`.
    pub(crate) fn sessions_of_group(&self, group: &str) -> Vec<SessionId> {
        self.groups.get(group).map(|s| s.keys().copied().collect()).unwrap_or_default()
    }

    /// The connections of `user`.
    pub(crate) fn user_connections(&self, user: &str) -> Vec<ConnectionInfo> {
        self.collect(self.users.get(user), |c| c.user.as_deref() == Some(user), info)
    }

    /// The members of `group`.
    pub(crate) fn group_members(&self, group: &str) -> Vec<ConnectionInfo> {
        self.collect(self.groups.get(group), |c| c.groups.iter().any(|g| &**g == group), info)
    }

    /// The subscribers of client channel `channel`: their addresses and
    /// user ids only, as presence needs (a channel may have many).
    pub(crate) fn channel_subscribers(&self, channel: &str) -> Vec<ConnectionInfo> {
        let subscribed = |c: &Connection| c.channels.iter().any(|s| &**s == channel);
        self.collect(self.channels.get(channel), subscribed, |worker_id, connection_id, connection| ConnectionInfo {
            address: Some(ConnectionAddress {
                worker_id: worker_id.to_owned(),
                connection_id: connection_id.to_owned(),
            }),
            user_id: connection.user.as_deref().unwrap_or_default().to_owned(),
            ..ConnectionInfo::default()
        })
    }

    /// How many connections are subscribed to `channel`, and the user ids
    /// among them (each once).
    pub(crate) fn channel_count(&self, channel: &str) -> (u64, Vec<&str>) {
        let Some(sessions) = self.channels.get(channel) else {
            return (0, Vec::new());
        };
        let count = sessions.values().map(|n| u64::from(*n)).sum();
        let mut users: Vec<&str> = sessions
            .keys()
            .filter_map(|session| self.gateways.get(session))
            .flat_map(|g| g.connections.values())
            .filter(|c| c.channels.iter().any(|s| &**s == channel))
            .filter_map(|c| c.user.as_deref())
            .collect();
        users.sort_unstable();
        users.dedup();
        (count, users)
    }

    /// How many connections are in `group`.
    pub(crate) fn group_count(&self, group: &str) -> u64 {
        self.groups.get(group).map_or(0, |s| s.values().map(|n| u64::from(*n)).sum())
    }

    /// Whether `user` has a connection here.
    pub(crate) fn user_online(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// One connection, by address.
    pub(crate) fn connection(&self, address: &ConnectionAddress) -> Option<ConnectionInfo> {
        self.gateways.values().filter(|g| g.worker_id == address.worker_id).find_map(|g| {
            g.connections.get(&address.connection_id).map(|c| info(&g.worker_id, &address.connection_id, c))
        })
    }

    /// Connections here, and the distinct user ids among them.
    pub(crate) fn totals(&self) -> (u64, impl Iterator<Item = &str>) {
        (self.connections as u64, self.users.keys().map(|u| &**u))
    }

    /// The worker id of the gateway on `session`.
    pub(crate) fn worker_of(&self, session: SessionId) -> Option<&str> {
        self.gateways.get(&session).map(|g| g.worker_id.as_str())
    }

    /// Checks that `set` leaves a connection's data within the limits.
    pub(crate) fn check_data_change(
        &self,
        session: SessionId,
        connection_id: &str,
        set: &SetConnectionData,
    ) -> Result<(), String> {
        let mut data = match self.gateways.get(&session).and_then(|g| g.connections.get(connection_id)) {
            Some(connection) if !set.replace => connection.data.clone(),
            _ => BTreeMap::new(),
        };
        for key in &set.remove {
            data.remove(key);
        }
        data.extend(set.values.iter().map(|(k, v)| (k.clone(), v.clone())));
        check_data(&data)
    }

    /// Counts of connections, distinct users and groups with a member.
    pub(crate) fn census(&self) -> (usize, usize, usize) {
        (self.connections, self.users.len(), self.groups.len())
    }

    /// The worker ids of the gateways whose connections are known here.
    pub(crate) fn workers(&self) -> impl Iterator<Item = &str> {
        self.gateways.values().filter(|g| g.reported).map(|g| g.worker_id.as_str())
    }

    /// The worker ids of the gateways that claimed their id here but have
    /// not reported their connections yet.
    pub(crate) fn unreported_workers(&self) -> impl Iterator<Item = &str> {
        self.gateways.values().filter(|g| !g.reported).map(|g| g.worker_id.as_str())
    }

    /// What `describe` says of each connection that is `selected`, on the
    /// gateways of `sessions`.
    fn collect(
        &self,
        sessions: Option<&HashMap<SessionId, u32>>,
        selected: impl Fn(&Connection) -> bool,
        describe: impl Fn(&str, &str, &Connection) -> ConnectionInfo,
    ) -> Vec<ConnectionInfo> {
        let Some(sessions) = sessions else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for session in sessions.keys() {
            let Some(gateway) = self.gateways.get(session) else {
                continue;
            };
            for (id, connection) in &gateway.connections {
                if selected(connection) {
                    found.push(describe(&gateway.worker_id, id, connection));
                }
            }
        }
        found
    }
}

fn check_state(state: &ConnectionState) -> Result<(), CommandErrorKind> {
    if !state.user_id.is_empty() {
        names::validate_user_id(&state.user_id)?;
    }
    if state.groups.len() > MAX_GROUPS_PER_CONNECTION {
        return Err(CommandErrorKind::Invalid(format!(
            "a connection is in {} groups; the limit is {MAX_GROUPS_PER_CONNECTION}",
            state.groups.len()
        )));
    }
    for group in &state.groups {
        names::validate_group(group)?;
    }
    if state.channels.len() > MAX_CHANNELS_PER_CONNECTION {
        return Err(CommandErrorKind::Invalid(format!(
            "a connection is subscribed to {} channels; the limit is {MAX_CHANNELS_PER_CONNECTION}",
            state.channels.len()
        )));
    }
    for channel in &state.channels {
        names::validate_client_channel(channel)?;
    }
    check_data(&state.data).map_err(CommandErrorKind::Invalid)
}

/// Checks a connection's data against the limits; the error is one line.
pub(crate) fn check_data<'a>(data: impl IntoIterator<Item = (&'a String, &'a String)>) -> Result<(), String> {
    let (entries, bytes) = data.into_iter().fold((0, 0), |(n, bytes), (k, v)| (n + 1, bytes + k.len() + v.len()));
    if entries > MAX_DATA_ENTRIES {
        return Err(format!("connection data has {entries} entries; the limit is {MAX_DATA_ENTRIES}"));
    }
    if bytes > MAX_DATA_BYTES {
        return Err(format!("connection data is {bytes} bytes; the limit is {MAX_DATA_BYTES}"));
    }
    Ok(())
}

impl From<ConnectionState> for Connection {
    fn from(state: ConnectionState) -> Self {
        let user = (!state.user_id.is_empty()).then(|| Arc::from(state.user_id));
        let mut seen = HashSet::new();
        let groups = state.groups.into_iter().filter(|g| seen.insert(g.clone())).map(Arc::from).collect();
        seen.clear();
        let channels = state.channels.into_iter().filter(|c| seen.insert(c.clone())).map(Arc::from).collect();
        Self { user, groups, data: state.data.into_iter().collect(), channels }
    }
}

fn info(worker_id: &str, connection_id: &str, connection: &Connection) -> ConnectionInfo {
    ConnectionInfo {
        address: Some(ConnectionAddress { worker_id: worker_id.to_owned(), connection_id: connection_id.to_owned() }),
        user_id: connection.user.as_deref().unwrap_or_default().to_owned(),
        groups: connection.groups.iter().map(|g| g.to_string()).collect(),
        data: connection.data.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        channels: connection.channels.iter().map(|c| c.to_string()).collect(),
    }
}

fn count_in(
    index: &mut HashMap<Arc<str>, HashMap<SessionId, u32>>,
    name: &Arc<str>,
    session: SessionId,
    channel: fn(&str) -> String,
    changes: &mut Vec<MemberChange>,
) {
    let count = index.entry(name.clone()).or_default().entry(session).or_insert(0);
    *count += 1;
    if *count == 1 {
        changes.push(MemberChange::Gained { session, channel: channel(name) });
    }
}

fn count_out(
    index: &mut HashMap<Arc<str>, HashMap<SessionId, u32>>,
    name: &str,
    session: SessionId,
    channel: fn(&str) -> String,
    changes: &mut Vec<MemberChange>,
) {
    let Some(sessions) = index.get_mut(name) else {
        return;
    };
    let Some(count) = sessions.get_mut(&session) else {
        return;
    };
    *count -= 1;
    if *count == 0 {
        sessions.remove(&session);
        changes.push(MemberChange::Lost { session, channel: channel(name) });
        if sessions.is_empty() {
            index.remove(name);
        }
    }
}

#[cfg(test)]
mod properties;
