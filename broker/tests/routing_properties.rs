//! Property tests of the routing core: random sequences of operations over a
//! few sessions, channels and worker ids (open a session, claim a worker id,
//! subscribe, unsubscribe, publish to broadcast, a channel or a connection,
//! drop a session) run against a `Hub` and against a model made of plain sets
//! and maps, and every session's stream must yield exactly what the model
//! says: each event once, only to its listeners, in publish order, counted
//! right in `PublishResponse.subscribers`. Worker ids are held by at most one
//! live session, and a hub whose sessions are all gone holds nothing.

use std::collections::{BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use herald_broker::Hub;
use herald_broker::hub::{Session, SessionEvents};
use herald_proto::names;
use herald_proto::v1::{
    Broadcast, ClaimWorker, ConnectionAddress, ConnectionState, Content, DirectoryChange, DirectoryReport,
    PublishRequest, SubscribeChannels, SubscribeRequest, Target, UnsubscribeChannels, content, directory_change,
    subscribe_request, subscribe_response, target,
};
use proptest::prelude::*;
use tokio_stream::Stream;
use tonic::Code;

const SESSIONS: usize = 4;
const CHANNELS: [&str; 3] = ["broadcast", "news", "sport"];
const WORKERS: [&str; 2] = ["w1", "w2"];
const INSTANCES: [&str; 2] = ["instance-a", "instance-b"];

#[derive(Debug, Clone)]
enum Op {
    Open(usize),
    Claim {
        session: usize,
        worker: usize,
        instance: usize,
    },
    Subscribe {
        session: usize,
        channels: Vec<usize>,
    },
    Unsubscribe {
        session: usize,
        channels: Vec<usize>,
    },
    /// Subscribes to a worker channel, which the hub refuses.
    SubscribeReserved(usize),
    Broadcast,
    PublishChannel(usize),
    PublishConnection(usize),
    Drain(usize),
    Drop(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let session = 0..SESSIONS;
    let channels = prop::collection::vec(0..CHANNELS.len(), 0..=CHANNELS.len());
    prop_oneof![
        3 => session.clone().prop_map(Op::Open),
        3 => (session.clone(), 0..WORKERS.len(), 0..INSTANCES.len())
            .prop_map(|(session, worker, instance)| Op::Claim { session, worker, instance }),
        3 => (session.clone(), channels.clone()).prop_map(|(session, channels)| Op::Subscribe { session, channels }),
        2 => (session.clone(), channels).prop_map(|(session, channels)| Op::Unsubscribe { session, channels }),
        1 => session.clone().prop_map(Op::SubscribeReserved),
        2 => Just(Op::Broadcast),
        3 => (0..CHANNELS.len()).prop_map(Op::PublishChannel),
        3 => (0..WORKERS.len()).prop_map(Op::PublishConnection),
        2 => session.clone().prop_map(Op::Drain),
        1 => session.prop_map(Op::Drop),
    ]
}

/// One item of a session's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    Ack(u64),
    Event { channel: String, body: String },
}

/// Reads everything a session's stream has ready, without waiting: its items
/// and, if it ended, its final status code.
fn drain(events: &mut SessionEvents) -> (Vec<Item>, Option<Code>) {
    let mut cx = Context::from_waker(Waker::noop());
    let mut items = Vec::new();
    let mut end = None;
    loop {
        match Pin::new(&mut *events).poll_next(&mut cx) {
            Poll::Ready(Some(Ok(response))) => items.push(match response.kind {
                Some(subscribe_response::Kind::Ack(ack)) => Item::Ack(ack.request_id),
                Some(subscribe_response::Kind::Control(control)) => panic!("no control was sent: {control:?}"),
                Some(subscribe_response::Kind::Event(event)) => {
                    let body = match event.content.and_then(|c| c.body) {
                        Some(content::Body::Text(text)) => text,
                        other => panic!("published text, got {other:?}"),
                    };
                    Item::Event { channel: event.channel, body }
                }
                None => panic!("a response without a kind"),
            }),
            Poll::Ready(Some(Err(status))) => end = Some(status.code()),
            Poll::Ready(None) | Poll::Pending => return (items, end),
        }
    }
}

fn command(request_id: u64, command: subscribe_request::Command) -> SubscribeRequest {
    SubscribeRequest { request_id, command: Some(command) }
}

fn names_of(channels: &[usize]) -> Vec<String> {
    channels.iter().map(|&c| CHANNELS[c].to_owned()).collect()
}

/// A live session and what the model expects of it.
struct Live {
    session: Arc<Session>,
    events: SessionEvents,
    /// Channels subscribed to (the worker channel is not among them).
    channels: BTreeSet<String>,
    worker: Option<&'static str>,
    /// What its stream should yield next, in order.
    expected: Vec<Item>,
}

struct Model {
    hub: Hub,
    sessions: Vec<Option<Live>>,
    /// Worker id → the session holding it and the instance that claimed it.
    workers: HashMap<&'static str, (usize, &'static str)>,
    next_request_id: u64,
    next_body: u64,
}

impl Model {
    fn new() -> Self {
        Self {
            hub: Hub::default(),
            sessions: (0..SESSIONS).map(|_| None).collect(),
            workers: HashMap::new(),
            next_request_id: 0,
            next_body: 0,
        }
    }

    fn request_id(&mut self) -> u64 {
        self.next_request_id += 1;
        self.next_request_id
    }

    /// Checks that session `index` yielded what was expected and is still live.
    fn check_live(&mut self, index: usize) {
        let Some(live) = self.sessions[index].as_mut() else { return };
        let (items, end) = drain(&mut live.events);
        assert_eq!(items, live.expected, "session {index} yielded other items than expected");
        assert_eq!(end, None, "session {index} ended unexpectedly");
        live.expected.clear();
    }

    /// Removes session `index` from the model, releasing its worker id.
    fn remove(&mut self, index: usize) -> Option<Live> {
        let live = self.sessions[index].take()?;
        if let Some(worker) = live.worker
            && self.workers.get(worker).is_some_and(|&(holder, _)| holder == index)
        {
            self.workers.remove(worker);
        }
        Some(live)
    }

    /// Checks that the hub ended session `index` with `code`, after yielding
    /// everything queued before, and forgets it.
    fn ended(&mut self, index: usize, code: Code) {
        let Some(mut live) = self.remove(index) else { return };
        let (items, end) = drain(&mut live.events);
        assert_eq!(items, live.expected, "ended session {index} yielded other items than expected");
        assert_eq!(end, Some(code), "session {index} ended with another status");
    }

    async fn apply(&mut self, op: Op) {
        match op {
            Op::Open(index) => {
                if self.sessions[index].is_none() {
                    let (session, events) = self.hub.open_session();
                    let live = Live { session, events, channels: BTreeSet::new(), worker: None, expected: Vec::new() };
                    self.sessions[index] = Some(live);
                }
            }
            Op::Claim { session, worker, instance } => self.claim(session, WORKERS[worker], INSTANCES[instance]).await,
            Op::Subscribe { session, channels } => {
                let request_id = self.request_id();
                let Some(live) = self.sessions[session].as_mut() else { return };
                let channels = names_of(&channels);
                let cmd = subscribe_request::Command::Subscribe(SubscribeChannels { channels: channels.clone() });
                live.session.apply(command(request_id, cmd)).await.expect("a valid subscribe is accepted");
                live.channels.extend(channels);
                live.expected.push(Item::Ack(request_id));
            }
            Op::Unsubscribe { session, channels } => {
                let request_id = self.request_id();
                let Some(live) = self.sessions[session].as_mut() else { return };
                let channels = names_of(&channels);
                let cmd = subscribe_request::Command::Unsubscribe(UnsubscribeChannels { channels: channels.clone() });
                live.session.apply(command(request_id, cmd)).await.expect("an unsubscribe is accepted");
                for channel in &channels {
                    live.channels.remove(channel);
                }
                live.expected.push(Item::Ack(request_id));
            }
            Op::SubscribeReserved(session) => {
                let request_id = self.request_id();
                let Some(live) = self.sessions[session].as_mut() else { return };
                let channels = vec!["news".to_owned(), names::worker_channel(WORKERS[0])];
                let cmd = subscribe_request::Command::Subscribe(SubscribeChannels { channels });
                let err = live.session.apply(command(request_id, cmd)).await.expect_err("worker channels are reserved");
                assert_eq!(err.code(), Code::InvalidArgument);
                self.ended(session, Code::InvalidArgument);
            }
            Op::Broadcast => self.publish(target::Kind::Broadcast(Broadcast {})).await,
            Op::PublishChannel(channel) => self.publish(target::Kind::Channel(CHANNELS[channel].to_owned())).await,
            Op::PublishConnection(worker) => {
                let address =
                    ConnectionAddress { worker_id: WORKERS[worker].to_owned(), connection_id: "1".to_owned() };
                self.publish(target::Kind::Connection(address)).await;
            }
            Op::Drain(session) => self.check_live(session),
            Op::Drop(session) => {
                self.check_live(session);
                drop(self.remove(session));
            }
        }
    }

    async fn claim(&mut self, index: usize, worker: &'static str, instance: &'static str) {
        let request_id = self.request_id();
        let Some(live) = self.sessions[index].as_ref() else { return };
        let already_held = live.worker;
        let cmd = subscribe_request::Command::ClaimWorker(ClaimWorker {
            worker_id: worker.to_owned(),
            instance_id: instance.to_owned(),
            reports_disconnects: false,
        });
        let result = live.session.apply(command(request_id, cmd)).await.map_err(|e| e.code());
        if already_held.is_some() {
            assert_eq!(result, Err(Code::FailedPrecondition), "a session claims one worker id");
            self.ended(index, Code::FailedPrecondition);
            return;
        }
        match self.workers.get(worker).copied() {
            Some((_, held_by)) if held_by != instance => {
                assert_eq!(result, Err(Code::AlreadyExists), "{worker} is held by another instance");
                self.ended(index, Code::AlreadyExists);
            }
            holder => {
                assert_eq!(result, Ok(()), "claim of {worker} by {instance}");
                if let Some((stale, _)) = holder {
                    self.ended(stale, Code::Aborted);
                }
                self.workers.insert(worker, (index, instance));
                // The gateway reports its one connection, "1", as live.
                let report_id = self.request_id();
                let live = self.sessions[index].as_mut().expect("the claiming session is live");
                live.worker = Some(worker);
                live.expected.push(Item::Ack(request_id));
                let opened = DirectoryChange {
                    connection_id: "1".to_owned(),
                    change: Some(directory_change::Change::Opened(ConnectionState::default())),
                };
                let report =
                    subscribe_request::Command::Report(DirectoryReport { changes: vec![opened], done: vec![] });
                let reported = live.session.apply(command(report_id, report)).await.map_err(|e| e.code());
                assert_eq!(reported, Ok(()), "report of {worker}'s connection");
                live.expected.push(Item::Ack(report_id));
            }
        }
    }

    async fn publish(&mut self, kind: target::Kind) {
        self.next_body += 1;
        let body = format!("m{}", self.next_body);
        let (channel, recipients): (String, Vec<usize>) = match &kind {
            target::Kind::Connection(address) => {
                let worker = address.worker_id.as_str();
                let holder = self.workers.get(worker).map(|&(holder, _)| holder);
                (names::worker_channel(worker), holder.into_iter().collect())
            }
            target::Kind::Broadcast(_) => {
                (names::BROADCAST_CHANNEL.to_owned(), self.listeners(names::BROADCAST_CHANNEL))
            }
            target::Kind::Channel(channel) => (channel.clone(), self.listeners(channel)),
            target::Kind::User(_) | target::Kind::Group(_) => unreachable!("the model publishes no user or group"),
        };
        let unheld_worker = matches!(&kind, target::Kind::Connection(_)) && recipients.is_empty();
        let req = PublishRequest {
            target: Some(Target { kind: Some(kind), except: vec![] }),
            content: Some(Content { body: Some(content::Body::Text(body.clone())) }),
            idempotency_key: String::new(),
            presence_change: None,
        };
        let result = self.hub.publish(req).await;
        if unheld_worker {
            assert_eq!(result.map_err(|e| e.code()), Err(Code::NotFound), "publish to an unheld worker");
            return;
        }
        let response = result.expect("a valid publish is routed");
        assert_eq!(response.subscribers as usize, recipients.len(), "subscribers of a publish on {channel}");
        for index in recipients {
            let live = self.sessions[index].as_mut().expect("recipients are live");
            live.expected.push(Item::Event { channel: channel.clone(), body: body.clone() });
        }
    }

    /// Live sessions subscribed to `channel`.
    fn listeners(&self, channel: &str) -> Vec<usize> {
        (0..SESSIONS)
            .filter(|&i| self.sessions[i].as_ref().is_some_and(|live| live.channels.contains(channel)))
            .collect()
    }

    /// Checks the hub's census and worker ids against the model.
    fn check_invariants(&self) {
        let live: Vec<&Live> = self.sessions.iter().flatten().collect();
        let mut channels: BTreeSet<String> = live.iter().flat_map(|l| l.channels.iter().cloned()).collect();
        channels.extend(self.workers.keys().map(|w| names::worker_channel(w)));
        assert_eq!(self.hub.census(), (live.len(), channels.len(), self.workers.len()), "census");
        for worker in WORKERS {
            let holders = live.iter().filter(|l| l.worker == Some(worker)).count();
            assert!(holders <= 1, "{worker} is held by {holders} live sessions");
            assert_eq!(self.hub.worker_is_held(worker), self.workers.contains_key(worker), "{worker} held");
        }
    }

    /// Checks every live session, drops them all, and checks the hub is empty.
    fn finish(mut self) {
        for index in 0..SESSIONS {
            self.check_live(index);
            drop(self.remove(index));
        }
        assert_eq!(self.hub.census(), (0, 0, 0), "the hub holds state of dropped sessions");
        assert!(WORKERS.iter().all(|w| !self.hub.worker_is_held(w)));
    }
}

fn run(ops: Vec<Op>) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a tokio runtime");
    // Unconstrained: the drains poll many times without yielding, which
    // tokio's cooperative budget would otherwise turn into spurious `Pending`s.
    runtime.block_on(tokio::task::unconstrained(async {
        let mut model = Model::new();
        for op in ops {
            model.apply(op).await;
            model.check_invariants();
        }
        model.finish();
    }));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn the_hub_routes_like_a_model_of_sets_and_maps(ops in prop::collection::vec(op(), 1..80)) {
        run(ops);
    }
}
