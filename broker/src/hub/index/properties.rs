//! The interest index against a model made of plain maps and sets: random
//! sequences of inserts, removals, claims, subscribes and unsubscribes over a
//! few sessions, channels and worker ids. After every step the index must
//! agree with the model on each channel's listeners, each worker id's holder,
//! and every outcome; and the interest changes it reported, replayed in
//! order, must give exactly the channels that have listeners, with no
//! redundant change.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

const SESSIONS: u64 = 4;
const CHANNELS: [&str; 3] = ["broadcast", "news", "sport"];
const WORKERS: [&str; 2] = ["w1", "w2"];
const INSTANCES: [&str; 2] = ["instance-a", "instance-b"];
const MAX_CHANNELS: usize = 3;

impl Listener for SessionId {
    fn session_id(&self) -> SessionId {
        *self
    }
}

#[derive(Debug, Clone)]
enum Op {
    Insert(SessionId),
    Remove(SessionId),
    Claim {
        session: SessionId,
        worker: usize,
        instance: usize,
    },
    Subscribe {
        session: SessionId,
        channels: Vec<usize>,
    },
    /// Unsubscribes from channels and from a worker channel, which stays.
    Unsubscribe {
        session: SessionId,
        channels: Vec<usize>,
        worker: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let session = 0..SESSIONS;
    let channels = prop::collection::vec(0..CHANNELS.len(), 0..=CHANNELS.len());
    prop_oneof![
        3 => session.clone().prop_map(Op::Insert),
        2 => session.clone().prop_map(Op::Remove),
        3 => (session.clone(), 0..WORKERS.len(), 0..INSTANCES.len())
            .prop_map(|(session, worker, instance)| Op::Claim { session, worker, instance }),
        4 => (session.clone(), channels.clone()).prop_map(|(session, channels)| Op::Subscribe { session, channels }),
        2 => (session, channels, 0..WORKERS.len())
            .prop_map(|(session, channels, worker)| Op::Unsubscribe { session, channels, worker }),
    ]
}

#[derive(Debug, Default)]
struct Model {
    /// Session → the channels it listens on (worker channel included).
    sessions: BTreeMap<SessionId, BTreeSet<String>>,
    /// Worker id → (holding session, instance).
    workers: BTreeMap<String, (SessionId, String)>,
}

impl Model {
    fn worker_of(&self, session: SessionId) -> Option<String> {
        self.workers.iter().find(|(_, (s, _))| *s == session).map(|(w, _)| w.clone())
    }

    fn remove(&mut self, session: SessionId) -> Option<Option<String>> {
        self.sessions.remove(&session)?;
        let released = self.worker_of(session);
        if let Some(worker) = &released {
            self.workers.remove(worker);
        }
        Some(released)
    }

    /// The claim's outcome: the stale session taken over, if any.
    fn claim(&mut self, session: SessionId, worker: &str, instance: &str) -> Result<Option<SessionId>, ()> {
        if !self.sessions.contains_key(&session) || self.worker_of(session).is_some() {
            return Err(());
        }
        let stale = match self.workers.get(worker) {
            Some((_, held_by)) if held_by != instance => return Err(()),
            Some((stale, _)) => Some(*stale),
            None => None,
        };
        if let Some(stale) = stale {
            self.remove(stale);
        }
        self.workers.insert(worker.to_owned(), (session, instance.to_owned()));
        self.sessions.entry(session).or_default().insert(names::worker_channel(worker));
        Ok(stale)
    }

    fn subscribe(&mut self, session: SessionId, channels: &[String]) -> Result<(), ()> {
        let held = self.sessions.get_mut(&session).ok_or(())?;
        let new: BTreeSet<&String> = channels.iter().filter(|c| !held.contains(*c)).collect();
        if held.len() + new.len() > MAX_CHANNELS {
            return Err(());
        }
        held.extend(new.into_iter().cloned());
        Ok(())
    }

    fn listeners(&self, channel: &str) -> BTreeSet<SessionId> {
        self.sessions.iter().filter(|(_, channels)| channels.contains(channel)).map(|(s, _)| *s).collect()
    }

    fn channels_with_listeners(&self) -> BTreeSet<String> {
        self.sessions.values().flatten().cloned().collect()
    }
}

fn names_of(channels: &[usize]) -> Vec<String> {
    channels.iter().map(|&c| CHANNELS[c].to_owned()).collect()
}

/// Replays `changes` onto `interest`, refusing a redundant one.
fn replay(interest: &mut BTreeSet<String>, changes: Changes) -> Result<(), TestCaseError> {
    for change in changes {
        match change {
            Interest::Add(channel) => prop_assert!(interest.insert(channel.clone()), "added twice: {channel}"),
            Interest::Remove(channel) => prop_assert!(interest.remove(&channel), "removed unheld: {channel}"),
        }
    }
    Ok(())
}

fn check(index: &Index<SessionId>, model: &Model, interest: &BTreeSet<String>) -> Result<(), TestCaseError> {
    let mut all_channels: Vec<String> = CHANNELS.iter().map(|c| c.to_string()).collect();
    all_channels.extend(WORKERS.iter().map(|w| names::worker_channel(w)));
    for channel in &all_channels {
        let got: BTreeSet<SessionId> = index.listeners(channel).iter().flat_map(|l| l.iter().copied()).collect();
        prop_assert_eq!(&got, &model.listeners(channel), "listeners of {}", channel);
        let listed = index.listeners(channel).map_or(0, |l| l.len());
        prop_assert_eq!(listed, got.len(), "each listener once on {}", channel);
    }
    for worker in WORKERS {
        prop_assert_eq!(index.holds(worker), model.workers.contains_key(worker));
        prop_assert_eq!(index.holder(worker).copied(), model.workers.get(worker).map(|(s, _)| *s));
    }
    prop_assert_eq!(interest, &model.channels_with_listeners());
    let census = (model.sessions.len(), model.channels_with_listeners().len(), model.workers.len());
    prop_assert_eq!(index.census(), census);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_index_agrees_with_the_model(ops in prop::collection::vec(op(), 1..80)) {
        let mut index = Index::<SessionId>::default();
        let mut model = Model::default();
        let mut interest = BTreeSet::new();
        for op in ops {
            let mut changes = Vec::new();
            match op {
                Op::Insert(session) => {
                    if let std::collections::btree_map::Entry::Vacant(entry) = model.sessions.entry(session) {
                        index.insert(session);
                        entry.insert(BTreeSet::new());
                    }
                }
                Op::Remove(session) => {
                    let removed = index.remove(session, &mut changes);
                    let expected = model.remove(session);
                    prop_assert_eq!(removed.as_ref().map(|r| r.listener), expected.as_ref().map(|_| session));
                    prop_assert_eq!(removed.and_then(|r| r.released), expected.flatten());
                }
                Op::Claim { session, worker, instance } => {
                    let (worker, instance) = (WORKERS[worker], INSTANCES[instance]);
                    let got = index.claim(session, worker, instance, &mut changes);
                    let expected = model.claim(session, worker, instance);
                    prop_assert_eq!(got.is_ok(), expected.is_ok(), "claim {} by {}: {:?}", worker, session, got);
                    if let (Ok(got), Ok(expected)) = (got, expected) {
                        prop_assert_eq!(got, expected, "the stale session taken over");
                    }
                }
                Op::Subscribe { session, channels } => {
                    let channels = names_of(&channels);
                    let got = index.subscribe(session, &channels, MAX_CHANNELS, &mut changes);
                    let expected = model.subscribe(session, &channels);
                    prop_assert_eq!(got.is_ok(), expected.is_ok(), "subscribe {:?}: {:?}", channels, got);
                }
                Op::Unsubscribe { session, channels, worker } => {
                    let mut channels = names_of(&channels);
                    channels.push(names::worker_channel(WORKERS[worker]));
                    index.unsubscribe(session, &channels, &mut changes);
                    if let Some(held) = model.sessions.get_mut(&session) {
                        for channel in channels.iter().filter(|c| !names::is_worker_channel(c)) {
                            held.remove(channel);
                        }
                    }
                }
            }
            replay(&mut interest, changes)?;
            check(&index, &model, &interest)?;
        }
        for session in 0..SESSIONS {
            let mut changes = Vec::new();
            index.remove(session, &mut changes);
            replay(&mut interest, changes)?;
        }
        prop_assert_eq!(index.census(), (0, 0, 0));
        prop_assert!(interest.is_empty(), "interest left: {:?}", interest);
    }
}
