//! Fuzzes the broker's protobuf decode paths and what follows them: arbitrary
//! bytes decoded as `PublishRequest`, `PublishBatchRequest` and
//! `SubscribeRequest`, validated by `route::resolve`, and fed to a `Hub` with a
//! few subscriber sessions. Nothing may panic, and the hub must stay coherent:
//! its publish agrees with `route::resolve`, every accepted command is acked
//! and every refused one ends its session with the refusal's code, a publish
//! reports exactly the events the sessions receive, and once every session is
//! dropped the hub holds nothing.
//!
//! Besides decoding the whole input as each message type, the input is read as
//! a script: a tag byte (sessions 0..3, or 3 for a publish) followed by one
//! length-delimited message, repeated until the bytes stop decoding.

#![no_main]

use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll, Waker};

use herald_broker::hub::{Session, SessionEvents};
use herald_broker::{Hub, HubLimits, PublishError, route};
use herald_proto::v1::{PublishBatchRequest, PublishRequest, SubscribeRequest, subscribe_response};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tokio::runtime::{Builder, Runtime};
use tokio_stream::Stream;
use tonic::Code;

const MAX_CONTENT_BYTES: usize = 16;
const SESSIONS: usize = 3;

static RUNTIME: LazyLock<Runtime> =
    LazyLock::new(|| Builder::new_current_thread().enable_time().build().expect("a tokio runtime"));

/// What one session's event stream yielded, read without waiting.
#[derive(Default)]
struct Drained {
    acks: Vec<u64>,
    events: u32,
    end: Option<Code>,
}

struct Subscriber {
    session: Arc<Session>,
    events: SessionEvents,
}

impl Subscriber {
    fn open(hub: &Hub) -> Self {
        let (session, events) = hub.open_session();
        Self { session, events }
    }

    fn drain(&mut self) -> Drained {
        let mut cx = Context::from_waker(Waker::noop());
        let mut out = Drained::default();
        loop {
            match Pin::new(&mut self.events).poll_next(&mut cx) {
                Poll::Ready(Some(Ok(response))) => match response.kind {
                    Some(subscribe_response::Kind::Ack(ack)) => out.acks.push(ack.request_id),
                    Some(subscribe_response::Kind::Event(_)) => out.events += 1,
                    Some(subscribe_response::Kind::Control(_)) => panic!("no control was asked for"),
                    None => panic!("the hub queued a response without a kind"),
                },
                Poll::Ready(Some(Err(status))) => out.end = Some(status.code()),
                Poll::Ready(None) | Poll::Pending => return out,
            }
        }
    }
}

struct Harness {
    hub: Hub,
    subscribers: Vec<Subscriber>,
}

impl Harness {
    fn new() -> Self {
        let limits = HubLimits { max_content_bytes: MAX_CONTENT_BYTES, max_batch: 8, ..HubLimits::default() };
        let hub = Hub::new(limits);
        let subscribers = (0..SESSIONS).map(|_| Subscriber::open(&hub)).collect();
        Self { hub, subscribers }
    }

    /// Drains every session, replaces the ones that ended, and returns what
    /// each yielded.
    fn drain_all(&mut self) -> Vec<Drained> {
        let hub = &self.hub;
        self.subscribers
            .iter_mut()
            .map(|s| {
                let drained = s.drain();
                if drained.end.is_some() {
                    *s = Subscriber::open(hub);
                }
                drained
            })
            .collect()
    }

    async fn command(&mut self, index: usize, req: SubscribeRequest) {
        let request_id = req.request_id;
        let result = self.subscribers[index].session.apply(req).await;
        let drained = self.drain_all();
        let own = &drained[index];
        match result {
            Ok(()) => {
                assert_eq!(own.acks, [request_id], "an accepted command is acked once");
                assert_eq!(own.end, None, "an accepted command keeps its session");
            }
            Err(e) => {
                assert!(own.acks.is_empty(), "a refused command is not acked");
                assert_eq!(own.end, Some(e.code()), "a refused command ends its session with its code");
            }
        }
        assert!(drained.iter().all(|d| d.events == 0), "a command published an event");
    }

    async fn publish(&mut self, req: PublishRequest) {
        let resolved = route::resolve(&req, MAX_CONTENT_BYTES);
        let held = resolved
            .as_ref()
            .ok()
            .and_then(|_| route::target_connection(&req))
            .map(|address| self.hub.worker_is_held(&address.worker_id));
        let result = self.hub.publish(req).await;
        let delivered: u32 = self.drain_all().iter().map(|d| d.events).sum();
        match (resolved, result) {
            (Err(expected), Err(got)) => assert_eq!(expected, got, "the hub and route::resolve disagree"),
            (Ok(_), Err(PublishError::UnknownWorker(_))) => assert_eq!(held, Some(false)),
            (Ok(_), Err(PublishError::UnknownConnection { .. } | PublishError::GatewayReconnecting(_))) => {
                assert_eq!(held, Some(true))
            }
            (Ok(_), Ok(res)) => {
                assert_ne!(held, Some(false), "published to an unheld worker");
                assert_eq!(res.subscribers, delivered, "subscribers does not count the events delivered");
            }
            (resolved, result) => panic!("route::resolve gave {resolved:?} but the hub {result:?}"),
        }
    }

    async fn publish_batch(&mut self, requests: Vec<PublishRequest>) {
        let len = requests.len();
        let results = self.hub.publish_batch(requests).await;
        let delivered: u32 = self.drain_all().iter().map(|d| d.events).sum();
        match results {
            Ok(results) => {
                assert_eq!(results.len(), len, "one result per request");
                let reported: u32 = results.iter().flatten().map(|r| r.subscribers).sum();
                assert_eq!(reported, delivered, "subscribers does not count the events delivered");
            }
            Err(e) => assert!(matches!(e, PublishError::BatchTooLarge { .. }), "batch refused with {e:?}"),
        }
    }

    fn finish(self) {
        let hub = self.hub;
        drop(self.subscribers);
        assert_eq!(hub.census(), (0, 0, 0), "sessions left state behind");
    }
}

fuzz_target!(|data: &[u8]| {
    let publish = PublishRequest::decode(data).ok();
    let batch = PublishBatchRequest::decode(data).ok();
    let subscribe = SubscribeRequest::decode(data).ok();
    // Unconstrained: the drains poll many times without yielding, which
    // tokio's cooperative budget would otherwise turn into spurious `Pending`s.
    RUNTIME.block_on(tokio::task::unconstrained(async {
        let mut harness = Harness::new();
        if let Some(req) = subscribe {
            harness.command(0, req).await;
        }
        if let Some(req) = publish {
            harness.publish(req).await;
        }
        if let Some(batch) = batch {
            harness.publish_batch(batch.requests).await;
        }
        let mut script = data;
        while let Some((&tag, rest)) = script.split_first() {
            script = rest;
            let index = usize::from(tag) % (SESSIONS + 1);
            if index == SESSIONS {
                let Ok(req) = PublishRequest::decode_length_delimited(&mut script) else { break };
                harness.publish(req).await;
            } else {
                let Ok(req) = SubscribeRequest::decode_length_delimited(&mut script) else { break };
                harness.command(index, req).await;
            }
        }
        harness.finish();
    }));
});
