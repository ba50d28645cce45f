//! The directory against a model made of plain maps and sets: random
//! sequences of claims, opened and closed connections, binds, unbinds,
//! group joins and leaves, client channel subscriptions, data changes,
//! malformed reports and lost gateways over a few sessions, worker ids,
//! connection ids, users, groups and channels. After every step the
//! directory must answer every question as the model does; and the member
//! changes it reported, replayed in order, must give each session exactly
//! the user, group and client channels of the connections it holds, with no
//! redundant change.

use std::collections::{BTreeMap, BTreeSet};

use herald_proto::names::{group_channel, user_channel};
use herald_proto::v1::Closed;
use proptest::prelude::*;

use super::*;

const SESSIONS: SessionId = 3;
const WORKERS: [&str; 3] = ["w1", "w2", "w3"];
const CONNECTIONS: [&str; 6] = ["1", "2", "3", "a", "b.c", "x-y"];
/// User ids and groups with characters a channel name cannot hold.
const USERS: [&str; 3] = ["ana", "bob@example.com", "c.d"];
const GROUPS: [&str; 3] = ["g1", "room:2", "a.b"];
const DATA: [&[(&str, &str)]; 3] = [&[], &[("k", "v")], &[("k", "w"), ("room", "1")]];
const CHANNELS: [&str; 3] = ["chat:a", "chat:b.c", "news:x"];

#[derive(Debug, Clone)]
enum Op {
    /// A gateway claims a worker id on a session (taking it over from a
    /// stale session that held it, as the hub does).
    Attach {
        session: SessionId,
        worker: usize,
    },
    /// The session ends: its gateway is lost.
    Detach {
        session: SessionId,
    },
    /// A connection opens (or an id is reopened), possibly with repeated groups.
    Open {
        session: SessionId,
        conn: usize,
        user: Option<usize>,
        groups: Vec<usize>,
        data: usize,
    },
    Close {
        session: SessionId,
        conn: usize,
    },
    /// A state change binding the connection to a user.
    Bind {
        session: SessionId,
        conn: usize,
        user: usize,
    },
    /// A state change with an empty user id.
    Unbind {
        session: SessionId,
        conn: usize,
    },
    /// A state change listing the groups held plus `groups` (repeats kept).
    Join {
        session: SessionId,
        conn: usize,
        groups: Vec<usize>,
    },
    /// A state change listing the groups held minus `groups`.
    Leave {
        session: SessionId,
        conn: usize,
        groups: Vec<usize>,
    },
    /// A state change listing the channels held plus (`subscribe`) or minus
    /// `channels`.
    Subscribe {
        session: SessionId,
        conn: usize,
        channels: Vec<usize>,
        subscribe: bool,
    },
    /// A state change of the data only.
    SetData {
        session: SessionId,
        conn: usize,
        data: usize,
    },
    /// A change that [`Directory::check`] must refuse.
    Malformed {
        conn: usize,
        how: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let session = 1..=SESSIONS;
    let conn = 0..CONNECTIONS.len();
    let groups = prop::collection::vec(0..GROUPS.len(), 0..=4);
    prop_oneof![
        2 => (session.clone(), 0..WORKERS.len()).prop_map(|(session, worker)| Op::Attach { session, worker }),
        1 => session.clone().prop_map(|session| Op::Detach { session }),
        5 => (session.clone(), conn.clone(), prop::option::of(0..USERS.len()), groups.clone(), 0..DATA.len())
            .prop_map(|(session, conn, user, groups, data)| Op::Open { session, conn, user, groups, data }),
        3 => (session.clone(), conn.clone()).prop_map(|(session, conn)| Op::Close { session, conn }),
        3 => (session.clone(), conn.clone(), 0..USERS.len())
            .prop_map(|(session, conn, user)| Op::Bind { session, conn, user }),
        2 => (session.clone(), conn.clone()).prop_map(|(session, conn)| Op::Unbind { session, conn }),
        3 => (session.clone(), conn.clone(), groups.clone())
            .prop_map(|(session, conn, groups)| Op::Join { session, conn, groups }),
        2 => (session.clone(), conn.clone(), groups).prop_map(|(session, conn, groups)| Op::Leave { session, conn, groups }),
        3 => (session.clone(), conn.clone(), prop::collection::vec(0..CHANNELS.len(), 0..=3), any::<bool>())
            .prop_map(|(session, conn, channels, subscribe)| Op::Subscribe { session, conn, channels, subscribe }),
        2 => (session, conn.clone(), 0..DATA.len()).prop_map(|(session, conn, data)| Op::SetData { session, conn, data }),
        1 => (conn, 0..7usize).prop_map(|(conn, how)| Op::Malformed { conn, how }),
    ]
}

#[derive(Debug, Default, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Conn {
    user: Option<String>,
    groups: BTreeSet<String>,
    data: BTreeMap<String, String>,
    channels: BTreeSet<String>,
}

#[derive(Debug, Default)]
struct Model {
    /// Session → the worker id its gateway claimed.
    workers: BTreeMap<SessionId, String>,
    /// The sessions whose gateway has made a report since its claim.
    reported: BTreeSet<SessionId>,
    /// (session, connection id) → what its gateway reported of it.
    conns: BTreeMap<(SessionId, String), Conn>,
}

/// What a query tells of one connection, in a comparable form.
type Seen = (String, String, Conn);

impl Model {
    /// A claim: the stale session it takes the worker id over from, if any.
    fn attach(&mut self, session: SessionId, worker: &str) -> Option<SessionId> {
        if self.workers.contains_key(&session) {
            return None;
        }
        let stale = self.workers.iter().find(|(_, w)| *w == worker).map(|(s, _)| *s);
        if let Some(stale) = stale {
            self.detach(stale);
        }
        self.workers.insert(session, worker.to_owned());
        stale
    }

    fn detach(&mut self, session: SessionId) {
        self.workers.remove(&session);
        self.reported.remove(&session);
        self.conns.retain(|(s, _), _| *s != session);
    }

    fn state_of(&self, session: SessionId, conn: &str) -> Conn {
        self.conns.get(&(session, conn.to_owned())).cloned().unwrap_or_default()
    }

    fn seen(&self, selected: impl Fn(&Conn) -> bool) -> BTreeSet<Seen> {
        self.conns
            .iter()
            .filter(|(_, c)| selected(c))
            .map(|((s, id), c)| (self.workers[s].clone(), id.clone(), c.clone()))
            .collect()
    }

    fn sessions_where(&self, selected: impl Fn(&Conn) -> bool) -> BTreeSet<SessionId> {
        self.conns.iter().filter(|(_, c)| selected(c)).map(|((s, _), _)| *s).collect()
    }

    /// The user and group channels session `session` must listen on.
    fn channels(&self, session: SessionId) -> BTreeSet<String> {
        let mut channels = BTreeSet::new();
        for ((s, _), c) in &self.conns {
            if *s == session {
                channels.extend(c.user.iter().map(|u| user_channel(u)));
                channels.extend(c.groups.iter().map(|g| group_channel(g)));
                channels.extend(c.channels.iter().cloned());
            }
        }
        channels
    }
}

fn state(
    user: Option<&str>,
    groups: Vec<&str>,
    data: &BTreeMap<String, String>,
    channels: &BTreeSet<String>,
) -> ConnectionState {
    ConnectionState {
        user_id: user.unwrap_or_default().to_owned(),
        groups: groups.into_iter().map(str::to_owned).collect(),
        data: data.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        channels: channels.iter().cloned().collect(),
    }
}

fn data(i: usize) -> BTreeMap<String, String> {
    DATA[i].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn opened(conn: &str, state: ConnectionState) -> DirectoryChange {
    DirectoryChange { connection_id: conn.to_owned(), change: Some(directory_change::Change::Opened(state)) }
}

fn changed(conn: &str, state: ConnectionState) -> DirectoryChange {
    DirectoryChange { connection_id: conn.to_owned(), change: Some(directory_change::Change::State(state)) }
}

fn closed(conn: &str) -> DirectoryChange {
    DirectoryChange { connection_id: conn.to_owned(), change: Some(directory_change::Change::Closed(Closed {})) }
}

fn malformed(conn: &str, how: usize) -> DirectoryChange {
    let mut good = ConnectionState::default();
    match how {
        0 => return closed(""),
        1 => return opened("a b", good),
        2 => good.user_id = "a b".into(),
        3 => good.groups = (0..=MAX_GROUPS_PER_CONNECTION).map(|i| format!("g{i}")).collect(),
        4 => good.data = [("k".to_owned(), "v".repeat(MAX_DATA_BYTES))].into(),
        5 => good.channels = vec!["news".into()],
        _ => return DirectoryChange { connection_id: conn.to_owned(), change: None },
    }
    changed(conn, good)
}

/// A reported connection in the model's terms; `None` if it lists a group twice.
fn seen(info: &ConnectionInfo) -> Option<Seen> {
    let address = info.address.clone().unwrap_or_default();
    let groups: BTreeSet<String> = info.groups.iter().cloned().collect();
    if groups.len() != info.groups.len() {
        return None;
    }
    let user = (!info.user_id.is_empty()).then(|| info.user_id.clone());
    let data = info.data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let channels = info.channels.iter().cloned().collect();
    Some((address.worker_id, address.connection_id, Conn { user, groups, data, channels }))
}

/// The connections of a query answer, each once, each group once.
fn seen_all(infos: &[ConnectionInfo]) -> Result<BTreeSet<Seen>, TestCaseError> {
    let mut all = BTreeSet::new();
    for info in infos {
        let one = seen(info);
        prop_assert!(one.is_some(), "a group listed twice: {:?}", info);
        prop_assert!(all.insert(one.unwrap()), "a connection listed twice: {:?}", info);
    }
    Ok(all)
}

/// Replays member changes onto each session's channels, refusing a
/// redundant one.
fn replay(
    interest: &mut BTreeMap<SessionId, BTreeSet<String>>,
    changes: Vec<MemberChange>,
) -> Result<(), TestCaseError> {
    for change in changes {
        match change {
            MemberChange::Gained { session, channel } => {
                let fresh = interest.entry(session).or_default().insert(channel.clone());
                prop_assert!(fresh, "session {} gained {} twice", session, channel);
            }
            MemberChange::Lost { session, channel } => {
                let held = interest.entry(session).or_default().remove(&channel);
                prop_assert!(held, "session {} lost {}, which it did not hold", session, channel);
            }
        }
    }
    Ok(())
}

fn check(
    directory: &Directory,
    model: &Model,
    interest: &BTreeMap<SessionId, BTreeSet<String>>,
) -> Result<(), TestCaseError> {
    for user in USERS {
        let has = |c: &Conn| c.user.as_deref() == Some(user);
        let expected = model.seen(has);
        prop_assert_eq!(directory.user_online(user), !expected.is_empty(), "user_online({})", user);
        prop_assert_eq!(seen_all(&directory.user_connections(user))?, expected, "user_connections({})", user);
        let sessions: Vec<SessionId> = directory.sessions_of_user(user);
        let set: BTreeSet<SessionId> = sessions.iter().copied().collect();
        prop_assert_eq!(set.len(), sessions.len(), "sessions_of_user({}) lists one twice", user);
        prop_assert_eq!(set, model.sessions_where(has), "sessions_of_user({})", user);
    }
    for group in GROUPS {
        let has = |c: &Conn| c.groups.contains(group);
        let expected = model.seen(has);
        prop_assert_eq!(directory.group_count(group), expected.len() as u64, "group_count({})", group);
        prop_assert_eq!(seen_all(&directory.group_members(group))?, expected, "group_members({})", group);
        let sessions: Vec<SessionId> = directory.sessions_of_group(group);
        let set: BTreeSet<SessionId> = sessions.iter().copied().collect();
        prop_assert_eq!(set.len(), sessions.len(), "sessions_of_group({}) lists one twice", group);
        prop_assert_eq!(set, model.sessions_where(has), "sessions_of_group({})", group);
    }
    for channel in CHANNELS {
        let has = |c: &Conn| c.channels.contains(channel);
        // Presence lists an address and a user id only.
        let brief = |c: &Conn| Conn { user: c.user.clone(), ..Conn::default() };
        let expected: BTreeSet<Seen> = model.seen(has).into_iter().map(|(w, id, c)| (w, id, brief(&c))).collect();
        prop_assert_eq!(
            seen_all(&directory.channel_subscribers(channel))?,
            expected.clone(),
            "presence of {}",
            channel
        );
        let users: BTreeSet<&str> = expected.iter().filter_map(|(_, _, c)| c.user.as_deref()).collect();
        let (count, listed) = directory.channel_count(channel);
        prop_assert_eq!(count, expected.len() as u64, "channel_count({})", channel);
        prop_assert_eq!(listed.into_iter().collect::<BTreeSet<_>>(), users, "the users of {}", channel);
    }
    for worker in WORKERS {
        for conn in CONNECTIONS {
            let address = ConnectionAddress { worker_id: worker.into(), connection_id: conn.into() };
            let got = directory.connection(&address).map(|info| seen(&info));
            let expected = model.seen(|_| true).into_iter().find(|(w, c, _)| w == worker && c == conn);
            prop_assert_eq!(got, expected.map(Some), "connection({}, {})", worker, conn);
        }
    }
    for session in 1..=SESSIONS {
        for conn in CONNECTIONS {
            let expected = model.conns.contains_key(&(session, conn.to_owned()));
            prop_assert_eq!(directory.has_connection(session, conn), expected, "has_connection({}, {})", session, conn);
        }
        prop_assert_eq!(directory.worker_of(session), model.workers.get(&session).map(String::as_str));
        let held = interest.get(&session).cloned().unwrap_or_default();
        prop_assert_eq!(held, model.channels(session), "the channels of session {}", session);
    }
    let workers: BTreeSet<&str> = directory.workers().collect();
    let unreported: BTreeSet<&str> = directory.unreported_workers().collect();
    let (known, unknown): (BTreeMap<_, _>, BTreeMap<_, _>) =
        model.workers.iter().partition(|(session, _)| model.reported.contains(session));
    prop_assert_eq!(workers, known.values().map(|w| w.as_str()).collect::<BTreeSet<_>>(), "reported workers");
    prop_assert_eq!(unreported, unknown.values().map(|w| w.as_str()).collect::<BTreeSet<_>>(), "unreported workers");
    let users: BTreeSet<String> = model.conns.values().filter_map(|c| c.user.clone()).collect();
    let groups: BTreeSet<String> = model.conns.values().flat_map(|c| c.groups.iter().cloned()).collect();
    let (count, listed) = directory.totals();
    let listed: Vec<&str> = listed.collect();
    let distinct: BTreeSet<String> = listed.iter().map(|u| u.to_string()).collect();
    prop_assert_eq!(count, model.conns.len() as u64, "totals: connections");
    prop_assert_eq!(distinct.len(), listed.len(), "totals lists a user twice");
    prop_assert_eq!(&distinct, &users, "totals: users");
    prop_assert_eq!(directory.census(), (model.conns.len(), users.len(), groups.len()));
    Ok(())
}

/// Applies one reported change to the directory and the model: refused
/// exactly when the session's gateway has not claimed a worker id.
fn report(
    directory: &mut Directory,
    model: &mut Model,
    session: SessionId,
    change: DirectoryChange,
    changes: &mut Vec<MemberChange>,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(Directory::check(&change), Ok(()), "a well-formed change: {:?}", change);
    let key = (session, change.connection_id.clone());
    // Every change arrives in a report, and a report marks its gateway's
    // connections known.
    prop_assert_eq!(directory.reported(session).is_ok(), model.workers.contains_key(&session));
    if model.workers.contains_key(&session) {
        model.reported.insert(session);
    }
    let got = directory.apply(session, change.clone(), changes);
    prop_assert_eq!(got.is_ok(), model.workers.contains_key(&session), "apply {:?} on {}: {:?}", change, session, got);
    if got.is_err() {
        prop_assert!(changes.is_empty(), "a refused change changed members: {:?}", changes);
        return Ok(());
    }
    match change.change {
        Some(directory_change::Change::Closed(_)) => {
            model.conns.remove(&key);
        }
        Some(directory_change::Change::Opened(state) | directory_change::Change::State(state)) => {
            let user = (!state.user_id.is_empty()).then_some(state.user_id);
            let conn = Conn {
                user,
                groups: state.groups.into_iter().collect(),
                data: state.data.into_iter().collect(),
                channels: state.channels.into_iter().collect(),
            };
            model.conns.insert(key, conn);
        }
        None => {}
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_directory_answers_as_the_model_and_its_member_changes_give_each_session_its_channels(
        ops in prop::collection::vec(op(), 1..100),
    ) {
        let mut directory = Directory::default();
        let mut model = Model::default();
        let mut interest: BTreeMap<SessionId, BTreeSet<String>> = BTreeMap::new();
        for op in ops {
            let mut changes = Vec::new();
            match op {
                Op::Attach { session, worker } => {
                    let worker = WORKERS[worker];
                    // As the hub does: a claim takes the worker id over from a
                    // stale session holding it. (The hub refuses a second claim
                    // on a session; the directory keeps the first one.)
                    if let Some(stale) = model.attach(session, worker) {
                        directory.detach(stale, &mut Vec::new());
                        interest.remove(&stale);
                    }
                    directory.attach(session, worker, None);
                }
                Op::Detach { session } => {
                    directory.detach(session, &mut changes);
                    // The hub drops the session's channels with the session; the
                    // directory's Lost changes must take away exactly those too.
                    let mut after = interest.clone();
                    replay(&mut after, std::mem::take(&mut changes))?;
                    prop_assert!(after.get(&session).is_none_or(BTreeSet::is_empty), "left after detach: {:?}", after);
                    interest.remove(&session);
                    model.detach(session);
                }
                Op::Open { session, conn, user, groups, data: d } => {
                    let groups = groups.into_iter().map(|g| GROUPS[g]).collect();
                    let change =
                        opened(CONNECTIONS[conn], state(user.map(|u| USERS[u]), groups, &data(d), &BTreeSet::new()));
                    report(&mut directory, &mut model, session, change, &mut changes)?;
                }
                Op::Close { session, conn } => {
                    report(&mut directory, &mut model, session, closed(CONNECTIONS[conn]), &mut changes)?;
                }
                Op::Bind { session, conn, user } => {
                    let now = model.state_of(session, CONNECTIONS[conn]);
                    let groups = now.groups.iter().map(String::as_str).collect();
                    let change = changed(CONNECTIONS[conn], state(Some(USERS[user]), groups, &now.data, &now.channels));
                    report(&mut directory, &mut model, session, change, &mut changes)?;
                }
                Op::Unbind { session, conn } => {
                    let now = model.state_of(session, CONNECTIONS[conn]);
                    let groups = now.groups.iter().map(String::as_str).collect();
                    let change = changed(CONNECTIONS[conn], state(None, groups, &now.data, &now.channels));
                    report(&mut directory, &mut model, session, change, &mut changes)?;
                }
                Op::Join { session, conn, groups } => {
                    let now = model.state_of(session, CONNECTIONS[conn]);
                    let listed = now.groups.iter().map(String::as_str).chain(groups.iter().map(|&g| GROUPS[g])).collect();
                    let change = changed(CONNECTIONS[conn], state(now.user.as_deref(), listed, &now.data, &now.channels));
                    report(&mut directory, &mut model, session, change, &mut changes)?;
                }
                Op::Leave { session, conn, groups } => {
                    let now = model.state_of(session, CONNECTIONS[conn]);
                    let leaving: BTreeSet<&str> = groups.iter().map(|&g| GROUPS[g]).collect();
                    let kept = now.groups.iter().map(String::as_str).filter(|g| !leaving.contains(g)).collect();
                    let change = changed(CONNECTIONS[conn], state(now.user.as_deref(), kept, &now.data, &now.channels));
                    report(&mut directory, &mut model, session, change, &mut changes)?;
                }
                Op::SetData { session, conn, data: d } => {
                    let now = model.state_of(session, CONNECTIONS[conn]);
                    let groups = now.groups.iter().map(String::as_str).collect();
                    let change = changed(CONNECTIONS[conn], state(now.user.as_deref(), groups, &data(d), &now.channels));
                    report(&mut directory, &mut model, session, change, &mut changes)?;
                }
                Op::Subscribe { session, conn, channels, subscribe } => {
                    let now = model.state_of(session, CONNECTIONS[conn]);
                    let named: BTreeSet<String> = channels.iter().map(|&c| CHANNELS[c].to_owned()).collect();
                    let held = if subscribe {
                        now.channels.union(&named).cloned().collect()
                    } else {
                        now.channels.difference(&named).cloned().collect()
                    };
                    let groups = now.groups.iter().map(String::as_str).collect();
                    let change = changed(CONNECTIONS[conn], state(now.user.as_deref(), groups, &now.data, &held));
                    report(&mut directory, &mut model, session, change, &mut changes)?;
                }
                Op::Malformed { conn, how } => {
                    let change = malformed(CONNECTIONS[conn], how);
                    prop_assert!(Directory::check(&change).is_err(), "accepted: {:?}", change);
                }
            }
            replay(&mut interest, changes)?;
            check(&directory, &model, &interest)?;
        }
        for session in 1..=SESSIONS {
            let mut changes = Vec::new();
            directory.detach(session, &mut changes);
            replay(&mut interest, changes)?;
        }
        prop_assert_eq!(directory.census(), (0, 0, 0));
        prop_assert!(interest.values().all(BTreeSet::is_empty), "channels left: {:?}", interest);
    }
}
