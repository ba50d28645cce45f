//! The hub as its users see it: sessions, claims, subscriptions, publishes,
//! eviction and shutdown, without sockets.

use std::pin::Pin;
use std::task::Context;

use std::collections::BTreeSet;

use herald_proto::names;
use herald_proto::v1::{
    Ack, BindUser, Broadcast, ClaimWorker, CloseConnections, Closed, ConnectionAddress, ConnectionIds, ConnectionInfo,
    ConnectionState, Content, ControlDone, ControlRequest, ControlResponse, Delivery, DirectoryChange, DirectoryReport,
    Event, Everyone, GatewayControl, PublishRequest, QueryRequest, QueryResponse, Selection, SetConnectionData,
    SubscribeChannels, SubscribeRequest, SubscribeResponse, Target, Totals, UnsubscribeChannels, content,
    control_request, delivery, directory_change, query_request, selection, subscribe_request, subscribe_response,
    target,
};
use tokio_stream::{Stream, StreamExt};
use tonic::Code;

use super::*;
use crate::error::PublishError;

fn text(kind: target::Kind, body: &str) -> PublishRequest {
    PublishRequest {
        target: Some(Target { kind: Some(kind), except: Vec::new() }),
        content: Some(Content { body: Some(content::Body::Text(body.into())) }),
        idempotency_key: String::new(),
        presence_change: None,
    }
}

fn broadcast(body: &str) -> PublishRequest {
    text(target::Kind::Broadcast(Broadcast {}), body)
}

fn to(worker: &str, conn: &str, body: &str) -> PublishRequest {
    text(target::Kind::Connection(ConnectionAddress { worker_id: worker.into(), connection_id: conn.into() }), body)
}

fn claim(request_id: u64, worker: &str, instance: &str) -> SubscribeRequest {
    SubscribeRequest {
        request_id,
        command: Some(subscribe_request::Command::ClaimWorker(ClaimWorker {
            worker_id: worker.into(),
            instance_id: instance.into(),
            reports_disconnects: false,
        })),
    }
}

fn subscribe(request_id: u64, channels: &[&str]) -> SubscribeRequest {
    SubscribeRequest {
        request_id,
        command: Some(subscribe_request::Command::Subscribe(SubscribeChannels {
            channels: channels.iter().map(|c| c.to_string()).collect(),
        })),
    }
}

fn unsubscribe(request_id: u64, channels: &[&str]) -> SubscribeRequest {
    SubscribeRequest {
        request_id,
        command: Some(subscribe_request::Command::Unsubscribe(UnsubscribeChannels {
            channels: channels.iter().map(|c| c.to_string()).collect(),
        })),
    }
}

fn report(request_id: u64, changes: Vec<DirectoryChange>, done: Vec<ControlDone>) -> SubscribeRequest {
    SubscribeRequest {
        request_id,
        command: Some(subscribe_request::Command::Report(DirectoryReport { changes, done })),
    }
}

fn connection_state(user: &str, groups: &[&str]) -> ConnectionState {
    ConnectionState {
        user_id: user.into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        ..Default::default()
    }
}

/// A connection opened, bound to `user` (empty: anonymous) and in `groups`.
fn opened(conn: &str, user: &str, groups: &[&str]) -> DirectoryChange {
    DirectoryChange {
        connection_id: conn.into(),
        change: Some(directory_change::Change::Opened(connection_state(user, groups))),
    }
}

/// What is known of a live connection, replaced.
fn state(conn: &str, user: &str, groups: &[&str]) -> DirectoryChange {
    DirectoryChange {
        connection_id: conn.into(),
        change: Some(directory_change::Change::State(connection_state(user, groups))),
    }
}

fn closed(conn: &str) -> DirectoryChange {
    DirectoryChange { connection_id: conn.into(), change: Some(directory_change::Change::Closed(Closed {})) }
}

fn done(control_id: u64, connections: u32) -> ControlDone {
    ControlDone { control_id, connections }
}

fn addr(worker: &str, conn: &str) -> ConnectionAddress {
    ConnectionAddress { worker_id: worker.into(), connection_id: conn.into() }
}

async fn next(events: &mut SessionEvents) -> SubscribeResponse {
    tokio::time::timeout(Duration::from_secs(1), events.next())
        .await
        .expect("an event in time")
        .expect("stream open")
        .expect("not an error")
}

async fn expect_ack(events: &mut SessionEvents, id: u64) {
    assert_eq!(next(events).await.kind, Some(subscribe_response::Kind::Ack(Ack { request_id: id })));
}

async fn expect_text(events: &mut SessionEvents, body: &str) -> Event {
    match next(events).await.kind {
        Some(subscribe_response::Kind::Event(ev)) => {
            let got = ev.content.as_ref().and_then(|c| c.body.clone());
            assert_eq!(got, Some(content::Body::Text(body.into())));
            ev
        }
        other => panic!("expected event {body:?}, got {other:?}"),
    }
}

async fn expect_control(events: &mut SessionEvents) -> GatewayControl {
    match next(events).await.kind {
        Some(subscribe_response::Kind::Control(control)) => control,
        other => panic!("expected a control, got {other:?}"),
    }
}

fn nothing_pending(events: &mut SessionEvents) -> bool {
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    Pin::new(events).poll_next(&mut cx).is_pending()
}

#[tokio::test]
async fn broadcast_reaches_every_session_on_the_broadcast_channel_once() {
    let hub = Hub::default();
    let (a, mut a_events) = hub.open_session();
    let (b, mut b_events) = hub.open_session();
    let (_idle, mut idle_events) = hub.open_session();
    a.apply(subscribe(1, &["broadcast"])).await.unwrap();
    b.apply(subscribe(1, &["broadcast", "broadcast"])).await.unwrap();
    expect_ack(&mut a_events, 1).await;
    expect_ack(&mut b_events, 1).await;

    let res = hub.publish(broadcast("hello")).await.unwrap();
    assert_eq!(res.subscribers, 2);
    let ev = expect_text(&mut a_events, "hello").await;
    assert_eq!(ev.channel, "broadcast");
    expect_text(&mut b_events, "hello").await;
    assert!(nothing_pending(&mut a_events) && nothing_pending(&mut b_events) && nothing_pending(&mut idle_events));
}

#[tokio::test]
async fn a_connection_target_reaches_only_its_workers_session() {
    let hub = Hub::default();
    let (w1, mut w1_events) = hub.open_session();
    let (w2, mut w2_events) = hub.open_session();
    w1.apply(claim(1, "w1", "i1")).await.unwrap();
    w2.apply(claim(1, "w2", "i2")).await.unwrap();
    w2.apply(report(2, vec![opened("1", "", &[])], vec![])).await.unwrap();
    expect_ack(&mut w1_events, 1).await;
    expect_ack(&mut w2_events, 1).await;
    expect_ack(&mut w2_events, 2).await;

    assert_eq!(hub.publish(to("w2", "1", "for w2")).await.unwrap().subscribers, 1);
    let ev = expect_text(&mut w2_events, "for w2").await;
    assert_eq!(ev.channel, "worker.w2");
    assert!(nothing_pending(&mut w1_events));
}

#[tokio::test]
async fn events_carry_the_delivery_the_broker_decided_for_their_target() {
    let hub = Hub::default();
    let (gateway, mut events) = hub.open_session();
    gateway.apply(claim(1, "w1", "i1")).await.unwrap();
    gateway.apply(subscribe(2, &["broadcast", "news"])).await.unwrap();
    gateway.apply(report(3, vec![opened("7", "", &[])], vec![])).await.unwrap();
    expect_ack(&mut events, 1).await;
    expect_ack(&mut events, 2).await;
    expect_ack(&mut events, 3).await;

    hub.publish(broadcast("all")).await.unwrap();
    let everyone = Delivery { to: Some(delivery::To::Everyone(Everyone {})), except: Vec::new() };
    assert_eq!(expect_text(&mut events, "all").await.delivery, Some(everyone));

    hub.publish(to("w1", "7", "one")).await.unwrap();
    let seven =
        Delivery { to: Some(delivery::To::Connections(ConnectionIds { ids: vec!["7".into()] })), except: Vec::new() };
    assert_eq!(expect_text(&mut events, "one").await.delivery, Some(seven));

    hub.publish(text(target::Kind::Channel("news".into()), "for subscribers")).await.unwrap();
    assert_eq!(expect_text(&mut events, "for subscribers").await.delivery, None);
}

#[tokio::test]
async fn publishing_to_an_unheld_worker_is_not_found() {
    let hub = Hub::default();
    let err = hub.publish(to("ghost", "1", "x")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.to_string(), "no live gateway holds worker id \"ghost\"");
}

#[tokio::test]
async fn a_worker_id_held_by_another_instance_is_refused_and_ends_the_session() {
    let hub = Hub::default();
    let (first, _first_events) = hub.open_session();
    first.apply(claim(1, "w1", "instance-a")).await.unwrap();
    let (second, mut second_events) = hub.open_session();
    let err = second.apply(claim(7, "w1", "instance-b")).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let status = second_events.next().await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert!(status.message().contains("request 7"), "{}", status.message());
    assert!(second_events.next().await.is_none());
    assert!(hub.worker_is_held("w1"));
}

#[tokio::test]
async fn the_same_instance_takes_its_worker_id_back_from_a_stale_session() {
    let hub = Hub::default();
    let (stale, mut stale_events) = hub.open_session();
    stale.apply(claim(1, "w1", "instance-a")).await.unwrap();
    expect_ack(&mut stale_events, 1).await;
    let (fresh, mut fresh_events) = hub.open_session();
    fresh.apply(claim(1, "w1", "instance-a")).await.unwrap();
    assert_eq!(stale_events.next().await.unwrap().unwrap_err().code(), Code::Aborted);
    expect_ack(&mut fresh_events, 1).await;
    fresh.apply(report(2, vec![opened("3", "", &[])], vec![])).await.unwrap();
    expect_ack(&mut fresh_events, 2).await;
    hub.publish(to("w1", "3", "after takeover")).await.unwrap();
    expect_text(&mut fresh_events, "after takeover").await;
}

#[tokio::test]
async fn a_worker_id_is_released_when_its_session_ends() {
    let hub = Hub::default();
    let (s, events) = hub.open_session();
    s.apply(claim(1, "w1", "i")).await.unwrap();
    drop(s);
    assert!(hub.worker_is_held("w1"), "the event stream still holds the session");
    drop(events);
    assert!(!hub.worker_is_held("w1"));
    assert_eq!(hub.census(), (0, 0, 0));
}

#[tokio::test]
async fn a_session_claims_one_worker_id_only() {
    let hub = Hub::default();
    let (s, _events) = hub.open_session();
    s.apply(claim(1, "w1", "i")).await.unwrap();
    assert_eq!(s.apply(claim(2, "w2", "i")).await.unwrap_err().code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn worker_channels_cannot_be_subscribed_or_published_directly() {
    let hub = Hub::default();
    let (s, _events) = hub.open_session();
    assert_eq!(s.apply(subscribe(1, &["worker.w1"])).await.unwrap_err().code(), Code::InvalidArgument);
    let err = hub.publish(text(target::Kind::Channel("worker.w1".into()), "x")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn unsubscribed_channels_stop_delivering() {
    let hub = Hub::default();
    let (s, mut events) = hub.open_session();
    s.apply(subscribe(1, &["news", "sport"])).await.unwrap();
    s.apply(unsubscribe(2, &["news", "never-subscribed"])).await.unwrap();
    expect_ack(&mut events, 1).await;
    expect_ack(&mut events, 2).await;
    assert_eq!(hub.publish(text(target::Kind::Channel("news".into()), "n")).await.unwrap().subscribers, 0);
    assert_eq!(hub.publish(text(target::Kind::Channel("sport".into()), "s")).await.unwrap().subscribers, 1);
    expect_text(&mut events, "s").await;
}

#[tokio::test]
async fn sessions_over_the_limit_are_refused() {
    let hub = Hub::new(HubLimits { max_sessions: 1, ..HubLimits::default() });
    let (_first, _first_events) = hub.open_session();
    let (_second, mut second_events) = hub.open_session();
    assert_eq!(second_events.next().await.unwrap().unwrap_err().code(), Code::ResourceExhausted);
    assert_eq!(hub.census().0, 1);
}

#[tokio::test]
async fn channel_limit_per_session_is_enforced() {
    let hub = Hub::new(HubLimits { max_channels_per_session: 2, ..HubLimits::default() });
    let (s, _events) = hub.open_session();
    s.apply(subscribe(1, &["a", "b"])).await.unwrap();
    let err = s.apply(subscribe(2, &["c"])).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
}

#[tokio::test]
async fn events_to_one_session_keep_publish_order() {
    let hub = Hub::default();
    let (s, mut events) = hub.open_session();
    s.apply(claim(1, "w1", "i")).await.unwrap();
    s.apply(report(2, vec![opened("1", "", &[])], vec![])).await.unwrap();
    expect_ack(&mut events, 1).await;
    expect_ack(&mut events, 2).await;
    for i in 0..1000 {
        hub.publish(to("w1", "1", &i.to_string())).await.unwrap();
    }
    for i in 0..1000 {
        expect_text(&mut events, &i.to_string()).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_session_that_stops_reading_is_evicted_after_the_grace_period() {
    let limits = HubLimits { session_queue: 2, slow_session_grace: Duration::from_millis(100), ..HubLimits::default() };
    let hub = Hub::new(limits);
    let (reader, mut reader_events) = hub.open_session();
    let (stuck, mut stuck_events) = hub.open_session();
    reader.apply(subscribe(1, &["broadcast"])).await.unwrap();
    stuck.apply(subscribe(1, &["broadcast"])).await.unwrap();
    expect_ack(&mut reader_events, 1).await;
    let drain = tokio::spawn(async move {
        let mut got = 0;
        while let Some(Ok(_)) = reader_events.next().await {
            got += 1;
            if got == 3 {
                break;
            }
        }
        got
    });
    for i in 0..3 {
        hub.publish(broadcast(&i.to_string())).await.unwrap();
    }
    assert_eq!(drain.await.unwrap(), 3);
    assert_eq!(hub.shared.metrics.sessions_evicted.get(), 1);
    let mut last = None;
    while let Some(item) = stuck_events.next().await {
        last = Some(item);
    }
    assert_eq!(last.unwrap().unwrap_err().code(), Code::ResourceExhausted);
    drop(stuck);
    assert_eq!(hub.census().0, 1);
}

#[tokio::test]
async fn shutting_down_delivers_queued_events_then_ends_sessions_and_refuses_publishes() {
    let hub = Hub::default();
    let (s, mut events) = hub.open_session();
    s.apply(subscribe(1, &["broadcast"])).await.unwrap();
    expect_ack(&mut events, 1).await;
    hub.publish(broadcast("queued before the shutdown")).await.unwrap();
    hub.shut_down();
    expect_text(&mut events, "queued before the shutdown").await;
    assert_eq!(events.next().await.unwrap().unwrap_err().code(), Code::Unavailable);
    assert_eq!(hub.publish(broadcast("late")).await.unwrap_err().code(), Code::Unavailable);
    let (_late, mut late_events) = hub.open_session();
    assert_eq!(late_events.next().await.unwrap().unwrap_err().code(), Code::Unavailable);
}

#[tokio::test]
async fn batches_route_each_message_and_report_each_outcome() {
    let hub = Hub::new(HubLimits { max_batch: 3, ..HubLimits::default() });
    let results = hub.publish_batch(vec![broadcast("a"), to("ghost", "1", "b")]).await.unwrap();
    assert!(results[0].is_ok());
    assert_eq!(results[1].as_ref().unwrap_err().code(), Code::NotFound);
    let too_many = vec![broadcast("a"), broadcast("b"), broadcast("c"), broadcast("d")];
    assert_eq!(hub.publish_batch(too_many).await.unwrap_err().code(), Code::ResourceExhausted);
}

#[tokio::test(start_paused = true)]
async fn a_starting_broker_refuses_publishes_until_its_gateways_had_the_grace_to_return() {
    let hub = Hub::new(HubLimits { startup_grace: Duration::from_secs(3), ..HubLimits::default() });
    let (gateway, mut events) = hub.open_session();
    gateway.apply(subscribe(1, &["broadcast"])).await.unwrap();
    expect_ack(&mut events, 1).await;
    let err = hub.publish(broadcast("too early")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.to_string().contains("starting"), "{err}");
    assert!(hub.unready_reason().is_some_and(|r| r.contains("starting")));
    tokio::time::advance(Duration::from_secs(3)).await;
    assert_eq!(hub.unready_reason(), None);
    assert_eq!(hub.publish(broadcast("now")).await.unwrap().subscribers, 1);
    expect_text(&mut events, "now").await;
}

fn keyed(mut req: PublishRequest, key: &str) -> PublishRequest {
    req.idempotency_key = key.into();
    req
}

#[tokio::test]
async fn a_retry_with_the_same_idempotency_key_is_answered_as_a_duplicate_and_not_routed() {
    let hub = Hub::default();
    let (s, mut events) = hub.open_session();
    s.apply(claim(1, "w1", "i")).await.unwrap();
    s.apply(report(2, vec![opened("1", "", &[])], vec![])).await.unwrap();
    expect_ack(&mut events, 1).await;
    expect_ack(&mut events, 2).await;
    let first = hub.publish(keyed(to("w1", "1", "once"), "k-1")).await.unwrap();
    assert_eq!((first.subscribers, first.duplicate), (1, false));
    let retry = hub.publish(keyed(to("w1", "1", "once"), "k-1")).await.unwrap();
    assert_eq!((retry.subscribers, retry.duplicate), (0, true));
    expect_text(&mut events, "once").await;
    assert!(nothing_pending(&mut events));
    assert_eq!(hub.shared.metrics.duplicates.get(), 1);
    let other = hub.publish(keyed(to("w1", "1", "another"), "k-2")).await.unwrap();
    assert!(!other.duplicate);
}

#[tokio::test]
async fn a_refused_publish_does_not_use_up_its_idempotency_key() {
    let hub = Hub::default();
    let refused = hub.publish(keyed(to("ghost", "1", "x"), "k-1")).await.unwrap_err();
    assert_eq!(refused.code(), Code::NotFound);
    let (s, mut events) = hub.open_session();
    s.apply(claim(1, "ghost", "i")).await.unwrap();
    s.apply(report(2, vec![opened("1", "", &[])], vec![])).await.unwrap();
    expect_ack(&mut events, 1).await;
    expect_ack(&mut events, 2).await;
    let retried = hub.publish(keyed(to("ghost", "1", "x"), "k-1")).await.unwrap();
    assert_eq!((retried.subscribers, retried.duplicate), (1, false));
    let bad = hub.publish(keyed(broadcast("x"), "not visible\u{7f}")).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn a_retry_while_its_first_attempt_is_still_on_its_way_is_told_to_retry_not_that_it_is_a_duplicate() {
    let limits = HubLimits { session_queue: 1, slow_session_grace: Duration::from_secs(30), ..HubLimits::default() };
    let hub = Hub::new(limits);
    let (slow, mut events) = hub.open_session();
    slow.apply(subscribe(1, &["broadcast"])).await.unwrap();
    // The ack fills the one-event queue: the keyed publish waits for room.
    let first = tokio::spawn({
        let hub = hub.clone();
        async move { hub.publish(keyed(broadcast("once"), "k-1")).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let overtaking = hub.publish(keyed(broadcast("once"), "k-1")).await.unwrap_err();
    assert_eq!(overtaking.code(), Code::Unavailable, "{overtaking}");
    expect_ack(&mut events, 1).await;
    assert!(!first.await.unwrap().unwrap().duplicate);
    expect_text(&mut events, "once").await;
    assert!(hub.publish(keyed(broadcast("once"), "k-1")).await.unwrap().duplicate, "routed now: a duplicate");
    assert!(nothing_pending(&mut events));
}

// Gateways simulated by hand: a gateway is a session that claims a worker
// id, reports its connections, and answers each control it is handed with a
// report confirming it.

/// A gateway holding `worker` with `connections` (id, user, groups) open,
/// its claim (request 1) and first report (request 2) acknowledged.
async fn gateway(hub: &Hub, worker: &str, connections: &[(&str, &str, &[&str])]) -> (Arc<Session>, SessionEvents) {
    let (session, mut events) = hub.open_session();
    session.apply(claim(1, worker, &format!("{worker}-instance"))).await.unwrap();
    expect_ack(&mut events, 1).await;
    let opens = connections.iter().map(|(id, user, groups)| opened(id, user, groups)).collect();
    session.apply(report(2, opens, vec![])).await.unwrap();
    expect_ack(&mut events, 2).await;
    (session, events)
}

fn with_except(mut req: PublishRequest, except: &[ConnectionAddress]) -> PublishRequest {
    req.target.as_mut().unwrap().except = except.to_vec();
    req
}

fn to_user(user: &str, body: &str) -> PublishRequest {
    text(target::Kind::User(user.into()), body)
}

fn to_group(group: &str, body: &str) -> PublishRequest {
    text(target::Kind::Group(group.into()), body)
}

fn bind_user(worker: &str, conn: &str, user: &str) -> ControlRequest {
    ControlRequest {
        op: Some(control_request::Op::BindUser(BindUser {
            connection: Some(addr(worker, conn)),
            user_id: user.into(),
        })),
    }
}

fn close_user(user: &str) -> ControlRequest {
    ControlRequest {
        op: Some(control_request::Op::Close(CloseConnections {
            selection: Some(Selection { of: Some(selection::Of::User(user.into())) }),
            reason: "bye".into(),
        })),
    }
}

/// Runs a control in the background, as a backend calling the broker would.
fn spawn_control(hub: &Hub, req: ControlRequest) -> tokio::task::JoinHandle<Result<ControlResponse, PublishError>> {
    let hub = hub.clone();
    tokio::spawn(async move { hub.control(req).await })
}

async fn ask(hub: &Hub, question: query_request::Question) -> QueryResponse {
    let answer = hub.query(QueryRequest { question: Some(question) }).await.unwrap();
    assert!(answer.missing_workers.is_empty(), "a single broker answers for every gateway: {answer:?}");
    answer
}

/// The (worker id, connection id) of each connection of an answer, each once.
fn addresses(answer: &QueryResponse) -> BTreeSet<(String, String)> {
    let all: Vec<_> = answer
        .connections
        .iter()
        .map(|c| c.address.clone().unwrap_or_default())
        .map(|a| (a.worker_id, a.connection_id))
        .collect();
    let set: BTreeSet<_> = all.iter().cloned().collect();
    assert_eq!(set.len(), all.len(), "a connection listed twice: {all:?}");
    set
}

fn pairs(list: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    list.iter().map(|(w, c)| (w.to_string(), c.to_string())).collect()
}

#[tokio::test]
async fn a_user_target_reaches_only_the_gateways_holding_a_connection_of_that_user() {
    let hub = Hub::new(HubLimits::default());
    let (_w1, mut w1_events) = gateway(&hub, "w1", &[("1", "ana", &[]), ("2", "bob", &[])]).await;
    let (_w2, mut w2_events) = gateway(&hub, "w2", &[("1", "bob", &[]), ("2", "", &[])]).await;
    let (_w3, mut w3_events) = gateway(&hub, "w3", &[]).await;

    let sender = addr("w1", "9");
    let res = hub.publish(with_except(to_user("ana", "for ana"), std::slice::from_ref(&sender))).await.unwrap();
    assert_eq!(res.subscribers, 1);
    let ev = expect_text(&mut w1_events, "for ana").await;
    assert_eq!(ev.channel, names::user_channel("ana"));
    assert_eq!(ev.delivery, Some(Delivery { to: Some(delivery::To::User("ana".into())), except: vec![sender] }));
    assert!(nothing_pending(&mut w2_events) && nothing_pending(&mut w3_events));

    assert_eq!(hub.publish(to_user("bob", "for bob")).await.unwrap().subscribers, 2);
    expect_text(&mut w1_events, "for bob").await;
    expect_text(&mut w2_events, "for bob").await;
    assert!(nothing_pending(&mut w3_events));

    assert_eq!(hub.publish(to_user("carol", "for nobody")).await.unwrap().subscribers, 0, "no gateway holds carol");
    assert!(nothing_pending(&mut w1_events) && nothing_pending(&mut w2_events) && nothing_pending(&mut w3_events));
}

#[tokio::test]
async fn a_user_bound_later_is_reached_and_one_unbound_is_not() {
    let hub = Hub::new(HubLimits::default());
    let (w1, mut w1_events) = gateway(&hub, "w1", &[("1", "", &[])]).await;
    assert_eq!(hub.publish(to_user("ana", "too early")).await.unwrap().subscribers, 0);

    w1.apply(report(3, vec![state("1", "ana", &[])], vec![])).await.unwrap();
    expect_ack(&mut w1_events, 3).await;
    assert_eq!(hub.publish(to_user("ana", "bound")).await.unwrap().subscribers, 1);
    expect_text(&mut w1_events, "bound").await;

    w1.apply(report(4, vec![state("1", "", &[])], vec![])).await.unwrap();
    expect_ack(&mut w1_events, 4).await;
    assert_eq!(hub.publish(to_user("ana", "unbound")).await.unwrap().subscribers, 0);
    assert!(nothing_pending(&mut w1_events));
}

#[tokio::test]
async fn a_group_target_reaches_the_gateways_holding_a_member_until_its_last_member_leaves() {
    let hub = Hub::new(HubLimits::default());
    let (w1, mut w1_events) = gateway(&hub, "w1", &[("1", "", &["room"]), ("2", "ana", &["room", "lobby"])]).await;
    let (_w2, mut w2_events) = gateway(&hub, "w2", &[("1", "", &["lobby"])]).await;

    let sender = addr("w1", "1");
    let res = hub.publish(with_except(to_group("room", "hi room"), std::slice::from_ref(&sender))).await.unwrap();
    assert_eq!(res.subscribers, 1);
    let ev = expect_text(&mut w1_events, "hi room").await;
    assert_eq!(ev.channel, names::group_channel("room"));
    assert_eq!(ev.delivery, Some(Delivery { to: Some(delivery::To::Group("room".into())), except: vec![sender] }));
    assert!(nothing_pending(&mut w2_events));
    assert_eq!(hub.publish(to_group("lobby", "hi lobby")).await.unwrap().subscribers, 2);
    expect_text(&mut w1_events, "hi lobby").await;
    expect_text(&mut w2_events, "hi lobby").await;

    // Connection 2 leaves the room: connection 1 is still in it.
    w1.apply(report(3, vec![state("2", "ana", &["lobby"])], vec![])).await.unwrap();
    expect_ack(&mut w1_events, 3).await;
    assert_eq!(hub.publish(to_group("room", "still one")).await.unwrap().subscribers, 1);
    expect_text(&mut w1_events, "still one").await;

    // The last member closes: the gateway no longer gets the room's events.
    w1.apply(report(4, vec![closed("1")], vec![])).await.unwrap();
    expect_ack(&mut w1_events, 4).await;
    assert_eq!(hub.publish(to_group("room", "nobody left")).await.unwrap().subscribers, 0);
    assert!(nothing_pending(&mut w1_events) && nothing_pending(&mut w2_events));
    assert_eq!(hub.publish(to_group("lobby", "lobby still")).await.unwrap().subscribers, 2);
}

#[tokio::test]
async fn a_group_listed_twice_in_a_state_is_one_membership() {
    let hub = Hub::new(HubLimits::default());
    let (w1, mut w1_events) = gateway(&hub, "w1", &[("1", "", &["room", "room"])]).await;
    let count = ask(&hub, query_request::Question::GroupCount("room".into())).await;
    assert_eq!(count.count, 1);
    w1.apply(report(3, vec![state("1", "", &[])], vec![])).await.unwrap();
    expect_ack(&mut w1_events, 3).await;
    assert_eq!(hub.publish(to_group("room", "left")).await.unwrap().subscribers, 0);
    assert_eq!(ask(&hub, query_request::Question::GroupCount("room".into())).await.count, 0);
}

#[tokio::test]
async fn a_connection_target_is_refused_not_found_unless_its_gateway_reported_it_live() {
    let hub = Hub::new(HubLimits::default());
    let (w1, mut w1_events) = gateway(&hub, "w1", &[("1", "", &[])]).await;

    assert_eq!(hub.publish(to("w1", "1", "live")).await.unwrap().subscribers, 1);
    expect_text(&mut w1_events, "live").await;

    let never = hub.publish(to("w1", "2", "never reported")).await.unwrap_err();
    assert_eq!(never, PublishError::UnknownConnection { worker_id: "w1".into(), connection_id: "2".into() });
    assert_eq!(never.code(), Code::NotFound);

    w1.apply(report(3, vec![closed("1")], vec![])).await.unwrap();
    expect_ack(&mut w1_events, 3).await;
    let gone = hub.publish(to("w1", "1", "closed")).await.unwrap_err();
    assert_eq!(gone, PublishError::UnknownConnection { worker_id: "w1".into(), connection_id: "1".into() });
    assert!(nothing_pending(&mut w1_events));

    w1.apply(report(4, vec![opened("2", "", &[])], vec![])).await.unwrap();
    expect_ack(&mut w1_events, 4).await;
    assert_eq!(hub.publish(to("w1", "2", "opened now")).await.unwrap().subscribers, 1);
    expect_text(&mut w1_events, "opened now").await;
}

#[tokio::test]
async fn a_gateway_that_takes_its_worker_id_back_starts_with_no_connections_until_it_reports_them() {
    let hub = Hub::new(HubLimits::default());
    let (_stale, mut stale_events) = gateway(&hub, "w1", &[("1", "ana", &["room"])]).await;
    let (fresh, mut fresh_events) = hub.open_session();
    fresh.apply(claim(1, "w1", "w1-instance")).await.unwrap();
    expect_ack(&mut fresh_events, 1).await;
    assert_eq!(stale_events.next().await.unwrap().unwrap_err().code(), Code::Aborted);

    // Until it reports, its connections are unknown, not absent.
    let refused = hub.publish(to("w1", "1", "x")).await.unwrap_err();
    assert_eq!(refused, PublishError::GatewayReconnecting("w1".into()));
    assert_eq!(refused.code(), Code::Unavailable, "retrying is safe");
    assert_eq!(hub.publish(to_user("ana", "x")).await.unwrap().subscribers, 0);
    let question = Some(query_request::Question::UserOnline("ana".into()));
    let online = hub.query(QueryRequest { question }).await.unwrap();
    assert!(!online.online);
    assert_eq!(online.missing_workers, ["w1"], "the gateway that has not reported is named");

    fresh.apply(report(2, vec![opened("1", "ana", &["room"])], vec![])).await.unwrap();
    expect_ack(&mut fresh_events, 2).await;
    assert_eq!(hub.publish(to_user("ana", "again")).await.unwrap().subscribers, 1);
    expect_text(&mut fresh_events, "again").await;
    assert_eq!(hub.publish(to_group("room", "again")).await.unwrap().subscribers, 1);
    expect_text(&mut fresh_events, "again").await;
}

#[tokio::test]
async fn a_control_on_a_connection_goes_to_its_gateway_and_answers_with_what_the_gateway_confirmed() {
    let hub = Hub::new(HubLimits::default());
    let (w1, mut w1_events) = gateway(&hub, "w1", &[("1", "", &[])]).await;
    let (_w2, mut w2_events) = gateway(&hub, "w2", &[("1", "", &[])]).await;

    let bind = bind_user("w1", "1", "ana");
    let answer = spawn_control(&hub, bind.clone());
    let control = expect_control(&mut w1_events).await;
    assert_eq!(control.request, Some(bind));
    assert!(nothing_pending(&mut w2_events), "the other gateway holds no connection w1/1");

    w1.apply(report(3, vec![state("1", "ana", &[])], vec![done(control.control_id, 1)])).await.unwrap();
    let answer = answer.await.unwrap().unwrap();
    assert_eq!(answer, ControlResponse { connections: 1, missing_workers: vec![] });
    expect_ack(&mut w1_events, 3).await;

    // In effect once answered: a publish made now reaches the bound user.
    assert_eq!(hub.publish(to_user("ana", "bound")).await.unwrap().subscribers, 1);
    expect_text(&mut w1_events, "bound").await;
}

#[tokio::test]
async fn a_control_batch_runs_controls_on_one_connection_in_order_and_the_rest_together() {
    let hub = Hub::new(HubLimits { max_batch: 5, ..HubLimits::default() });
    let (w1, mut events) = gateway(&hub, "w1", &[("1", "", &[]), ("2", "", &[])]).await;
    let batch = vec![
        bind_user("w1", "1", "ana"),
        bind_user("w1", "2", "bob"),
        bind_user("w1", "1", "carl"),
        bind_user("w1", "9", "dan"),
        ControlRequest { op: None },
    ];
    let answer = {
        let hub = hub.clone();
        tokio::spawn(async move { hub.control_batch(batch).await })
    };

    let first = expect_control(&mut events).await;
    let second = expect_control(&mut events).await;
    assert_eq!(first.request, Some(bind_user("w1", "1", "ana")));
    assert_eq!(second.request, Some(bind_user("w1", "2", "bob")), "another connection's control runs alongside");
    assert!(nothing_pending(&mut events), "the second control on w1/1 waits for the first to be confirmed");

    let confirmed = vec![done(first.control_id, 1), done(second.control_id, 1)];
    w1.apply(report(3, vec![state("1", "ana", &[]), state("2", "bob", &[])], confirmed)).await.unwrap();
    expect_ack(&mut events, 3).await;
    let third = expect_control(&mut events).await;
    assert_eq!(third.request, Some(bind_user("w1", "1", "carl")));
    w1.apply(report(4, vec![state("1", "carl", &[])], vec![done(third.control_id, 1)])).await.unwrap();

    let results = answer.await.unwrap().unwrap();
    let codes: Vec<Code> = results.iter().map(|r| r.as_ref().map_or_else(PublishError::code, |_| Code::Ok)).collect();
    assert_eq!(codes, [Code::Ok, Code::Ok, Code::Ok, Code::NotFound, Code::InvalidArgument]);
    assert_eq!(results[0], Ok(ControlResponse { connections: 1, missing_workers: vec![] }));
    assert!(ask(&hub, query_request::Question::UserOnline("carl".into())).await.online);
    assert!(!ask(&hub, query_request::Question::UserOnline("ana".into())).await.online);

    let too_many = vec![close_user("ana"); 6];
    assert_eq!(hub.control_batch(too_many).await.unwrap_err().code(), Code::ResourceExhausted);
    assert_eq!(hub.control_batch(Vec::new()).await.unwrap(), Vec::new());
}

#[tokio::test]
async fn a_client_channel_s_subscribers_are_counted_once_per_user_and_listed_across_gateways() {
    let hub = Hub::new(HubLimits::default());
    let subscribed = |conn: &str, user: &str, channels: &[&str]| DirectoryChange {
        connection_id: conn.into(),
        change: Some(directory_change::Change::Opened(ConnectionState {
            user_id: user.into(),
            channels: channels.iter().map(|c| c.to_string()).collect(),
            ..ConnectionState::default()
        })),
    };
    let mut gateways = Vec::new();
    for (worker, changes) in [
        ("w1", vec![subscribed("1", "ana", &["chat:a"]), subscribed("2", "", &["chat:a", "chat:b"])]),
        ("w2", vec![subscribed("1", "ana", &["chat:a"]), subscribed("2", "bob", &["chat:b"])]),
    ] {
        let (session, mut events) = hub.open_session();
        session.apply(claim(1, worker, "i")).await.unwrap();
        session.apply(report(2, changes, vec![])).await.unwrap();
        expect_ack(&mut events, 1).await;
        expect_ack(&mut events, 2).await;
        gateways.push((session, events));
    }
    use query_request::Question;
    let subscribers = ask(&hub, Question::ChannelSubscribers("chat:a".into())).await;
    assert_eq!(addresses(&subscribers), pairs(&[("w1", "1"), ("w1", "2"), ("w2", "1")]));
    let count = ask(&hub, Question::ChannelCount("chat:a".into())).await;
    assert_eq!((count.count, count.users), (3, 1), "ana twice and an anonymous connection");
    let count = ask(&hub, Question::ChannelCount("chat:b".into())).await;
    assert_eq!((count.count, count.users), (2, 1));
    assert_eq!(ask(&hub, Question::ChannelCount("chat:none".into())).await.count, 0);
    let err = hub.query(QueryRequest { question: Some(Question::ChannelCount("news".into())) }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "not a client channel: {err}");
}

#[tokio::test]
async fn a_control_on_a_connection_that_is_not_live_is_not_found_and_reaches_no_gateway() {
    let hub = Hub::new(HubLimits::default());
    let (w1, mut w1_events) = gateway(&hub, "w1", &[("1", "", &[])]).await;

    let err = hub.control(bind_user("w1", "9", "ana")).await.unwrap_err();
    assert_eq!(err, PublishError::UnknownConnection { worker_id: "w1".into(), connection_id: "9".into() });
    assert_eq!(err.code(), Code::NotFound);
    let err = hub.control(bind_user("w9", "1", "ana")).await.unwrap_err();
    assert_eq!(err, PublishError::UnknownWorker("w9".into()));

    w1.apply(report(3, vec![closed("1")], vec![])).await.unwrap();
    expect_ack(&mut w1_events, 3).await;
    let err = hub.control(bind_user("w1", "1", "ana")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    assert!(nothing_pending(&mut w1_events));
}

#[tokio::test]
async fn a_set_data_control_that_would_overflow_the_connections_data_is_refused_before_the_gateway_sees_it() {
    let hub = Hub::new(HubLimits::default());
    let (w1, mut w1_events) = gateway(&hub, "w1", &[]).await;
    let full = DirectoryChange {
        connection_id: "1".into(),
        change: Some(directory_change::Change::Opened(ConnectionState {
            data: [("a".to_owned(), "x".repeat(3000))].into(),
            ..ConnectionState::default()
        })),
    };
    w1.apply(report(3, vec![full], vec![])).await.unwrap();
    expect_ack(&mut w1_events, 3).await;
    let set = |replace| ControlRequest {
        op: Some(control_request::Op::SetData(SetConnectionData {
            connection: Some(addr("w1", "1")),
            values: [("b".to_owned(), "y".repeat(2000))].into(),
            remove: vec![],
            replace,
        })),
    };
    let err = hub.control(set(false)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(nothing_pending(&mut w1_events));

    // Replacing the data instead fits.
    let answer = spawn_control(&hub, set(true));
    let control = expect_control(&mut w1_events).await;
    w1.apply(report(4, vec![], vec![done(control.control_id, 1)])).await.unwrap();
    assert_eq!(answer.await.unwrap().unwrap().connections, 1);
}

#[tokio::test]
async fn a_control_the_gateway_never_confirms_is_deadline_exceeded_after_the_answer_timeout() {
    let timeout = Duration::from_millis(200);
    let hub = Hub::new(HubLimits { answer_timeout: timeout, ..HubLimits::default() });
    let (w1, mut w1_events) = gateway(&hub, "w1", &[("1", "", &[])]).await;

    let started = std::time::Instant::now();
    let answer = spawn_control(&hub, bind_user("w1", "1", "ana"));
    let control = expect_control(&mut w1_events).await;
    let err = answer.await.unwrap().unwrap_err();
    assert!(started.elapsed() >= timeout, "answered after {:?}", started.elapsed());
    assert_eq!(
        err,
        PublishError::NotConfirmed { worker_id: "w1".into(), why: format!("no answer within {timeout:?}") }
    );
    assert_eq!(err.code(), Code::DeadlineExceeded);

    // A confirmation that comes too late changes nothing and is no error.
    w1.apply(report(3, vec![state("1", "ana", &[])], vec![done(control.control_id, 1)])).await.unwrap();
    expect_ack(&mut w1_events, 3).await;
}

#[tokio::test]
async fn a_control_on_a_connection_whose_gateway_session_ends_while_it_is_pending_answers_at_once() {
    let hub = Hub::new(HubLimits { answer_timeout: Duration::from_secs(30), ..HubLimits::default() });
    let (w1, mut w1_events) = gateway(&hub, "w1", &[("1", "", &[])]).await;
    let answer = spawn_control(&hub, bind_user("w1", "1", "ana"));
    expect_control(&mut w1_events).await;
    drop((w1, w1_events));
    let err =
        tokio::time::timeout(Duration::from_secs(2), answer).await.expect("answered at once").unwrap().unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
}

#[tokio::test]
async fn a_wide_control_pending_on_a_gateway_whose_session_ends_answers_at_once_naming_its_worker() {
    let hub = Hub::new(HubLimits { answer_timeout: Duration::from_secs(30), ..HubLimits::default() });
    let (w1, mut w1_events) = gateway(&hub, "w1", &[("1", "ana", &[])]).await;
    let (w2, mut w2_events) = gateway(&hub, "w2", &[("1", "ana", &[])]).await;

    let answer = spawn_control(&hub, close_user("ana"));
    expect_control(&mut w1_events).await;
    let control = expect_control(&mut w2_events).await;
    w2.apply(report(3, vec![closed("1")], vec![done(control.control_id, 1)])).await.unwrap();
    drop((w1, w1_events));

    let answer =
        tokio::time::timeout(Duration::from_secs(2), answer).await.expect("answered at once").unwrap().unwrap();
    assert_eq!(answer, ControlResponse { connections: 1, missing_workers: vec!["w1".into()] });
}

#[tokio::test]
async fn a_control_pending_on_a_session_taken_over_by_its_own_instance_answers_at_once() {
    let hub = Hub::new(HubLimits { answer_timeout: Duration::from_secs(30), ..HubLimits::default() });
    let (_stale, mut stale_events) = gateway(&hub, "w1", &[("1", "", &[])]).await;
    let answer = spawn_control(&hub, bind_user("w1", "1", "ana"));
    expect_control(&mut stale_events).await;

    // The gateway reconnected before its old session was noticed dead.
    let (fresh, mut fresh_events) = hub.open_session();
    fresh.apply(claim(1, "w1", "w1-instance")).await.unwrap();
    expect_ack(&mut fresh_events, 1).await;
    assert_eq!(stale_events.next().await.unwrap().unwrap_err().code(), Code::Aborted);

    // The old session will never confirm: its control is answered now, not
    // after the 30 s answer timeout.
    let answered = tokio::time::timeout(Duration::from_secs(2), answer).await;
    let err = answered.expect("a control pending on a session taken over answers at once").unwrap().unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
}

#[tokio::test]
async fn a_user_wide_close_goes_to_every_gateway_holding_the_user_and_sums_what_they_confirmed() {
    let hub = Hub::new(HubLimits::default());
    let (w1, mut w1_events) = gateway(&hub, "w1", &[("1", "ana", &[]), ("2", "ana", &[]), ("3", "bob", &[])]).await;
    let (w2, mut w2_events) = gateway(&hub, "w2", &[("1", "ana", &[])]).await;
    let (_w3, mut w3_events) = gateway(&hub, "w3", &[("1", "bob", &[])]).await;

    let close = close_user("ana");
    let answer = spawn_control(&hub, close.clone());
    let on_w1 = expect_control(&mut w1_events).await;
    let on_w2 = expect_control(&mut w2_events).await;
    assert_eq!(on_w1.request.as_ref(), Some(&close));
    assert_eq!(on_w2.request.as_ref(), Some(&close));
    assert_ne!(on_w1.control_id, on_w2.control_id, "each gateway confirms its own control");
    assert!(nothing_pending(&mut w3_events), "w3 holds no connection of ana");

    w1.apply(report(4, vec![closed("1"), closed("2")], vec![done(on_w1.control_id, 2)])).await.unwrap();
    w2.apply(report(4, vec![closed("1")], vec![done(on_w2.control_id, 1)])).await.unwrap();
    let answer = answer.await.unwrap().unwrap();
    assert_eq!(answer, ControlResponse { connections: 3, missing_workers: vec![] });

    assert!(!ask(&hub, query_request::Question::UserOnline("ana".into())).await.online);
    assert_eq!(hub.publish(to_user("ana", "gone")).await.unwrap().subscribers, 0);
    assert_eq!(hub.publish(to_user("bob", "still here")).await.unwrap().subscribers, 2);
}

#[tokio::test]
async fn a_wide_control_names_the_gateways_that_did_not_confirm_in_time() {
    let timeout = Duration::from_millis(200);
    let hub = Hub::new(HubLimits { answer_timeout: timeout, ..HubLimits::default() });
    let (w1, mut w1_events) = gateway(&hub, "w1", &[("1", "ana", &[])]).await;
    let (_w2, mut w2_events) = gateway(&hub, "w2", &[("1", "ana", &[])]).await;

    let answer = spawn_control(&hub, close_user("ana"));
    let control = expect_control(&mut w1_events).await;
    expect_control(&mut w2_events).await;
    w1.apply(report(3, vec![closed("1")], vec![done(control.control_id, 1)])).await.unwrap();
    let answer = answer.await.unwrap().unwrap();
    assert_eq!(answer, ControlResponse { connections: 1, missing_workers: vec!["w2".into()] });

    // No gateway holds carol: nothing to wait for.
    let none = hub.control(close_user("carol")).await.unwrap();
    assert_eq!(none, ControlResponse { connections: 0, missing_workers: vec![] });
}

#[tokio::test]
async fn queries_answer_from_what_the_gateways_reported_and_forget_a_gateway_whose_session_ended() {
    let hub = Hub::new(HubLimits::default());
    let (w1, w1_events) =
        gateway(&hub, "w1", &[("1", "ana", &["room"]), ("2", "bob", &["room"]), ("3", "", &[])]).await;
    let (w2, w2_events) = gateway(&hub, "w2", &[("1", "ana", &["lobby"])]).await;
    w1.apply(report(
        3,
        vec![DirectoryChange {
            connection_id: "1".into(),
            change: Some(directory_change::Change::State(ConnectionState {
                user_id: "ana".into(),
                groups: vec!["room".into()],
                data: [("k".to_owned(), "v".to_owned())].into(),
                channels: vec!["chat:a".into()],
            })),
        }],
        vec![],
    ))
    .await
    .unwrap();
    use query_request::Question;

    assert!(ask(&hub, Question::UserOnline("ana".into())).await.online);
    assert!(!ask(&hub, Question::UserOnline("carol".into())).await.online);
    let ana = ask(&hub, Question::UserConnections("ana".into())).await;
    assert!(ana.online);
    assert_eq!(ana.count, 2);
    assert_eq!(addresses(&ana), pairs(&[("w1", "1"), ("w2", "1")]));
    let room = ask(&hub, Question::GroupMembers("room".into())).await;
    assert_eq!(room.count, 2);
    assert_eq!(addresses(&room), pairs(&[("w1", "1"), ("w1", "2")]));
    assert_eq!(ask(&hub, Question::GroupCount("room".into())).await.count, 2);
    assert_eq!(ask(&hub, Question::GroupCount("lobby".into())).await.count, 1);
    assert_eq!(ask(&hub, Question::GroupCount("nowhere".into())).await.count, 0);
    let totals = ask(&hub, Question::Totals(Totals {})).await;
    assert_eq!((totals.count, totals.users), (4, 2), "ana on two gateways is one user");
    let one = ask(&hub, Question::Connection(addr("w1", "1"))).await;
    assert_eq!((one.online, one.count), (true, 1));
    assert_eq!(
        one.connections,
        vec![ConnectionInfo {
            address: Some(addr("w1", "1")),
            user_id: "ana".into(),
            groups: vec!["room".into()],
            data: [("k".to_owned(), "v".to_owned())].into(),
            channels: vec!["chat:a".into()],
        }]
    );
    let unknown = ask(&hub, Question::Connection(addr("w1", "9"))).await;
    assert_eq!((unknown.online, unknown.count, unknown.connections.len()), (false, 0, 0));

    drop((w2, w2_events));
    let ana = ask(&hub, Question::UserConnections("ana".into())).await;
    assert_eq!((ana.count, addresses(&ana)), (1, pairs(&[("w1", "1")])));
    assert_eq!(ask(&hub, Question::GroupCount("lobby".into())).await.count, 0);
    assert!(ask(&hub, Question::GroupMembers("lobby".into())).await.connections.is_empty());
    let totals = ask(&hub, Question::Totals(Totals {})).await;
    assert_eq!((totals.count, totals.users), (3, 2));
    assert!(!ask(&hub, Question::Connection(addr("w2", "1"))).await.online);

    drop((w1, w1_events));
    assert!(!ask(&hub, Question::UserOnline("ana".into())).await.online);
    let totals = ask(&hub, Question::Totals(Totals {})).await;
    assert_eq!((totals.count, totals.users), (0, 0));
    assert!(ask(&hub, Question::GroupMembers("room".into())).await.connections.is_empty());
    assert_eq!(hub.census(), (0, 0, 0), "no session, channel or worker id left");
}

#[tokio::test]
async fn a_report_before_claiming_a_worker_id_ends_the_session_with_invalid_argument() {
    let hub = Hub::new(HubLimits::default());
    let (s, mut events) = hub.open_session();
    let err = s.apply(report(5, vec![opened("1", "ana", &[])], vec![])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let status = events.next().await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("request 5"), "{}", status.message());
    assert!(events.next().await.is_none());
    assert!(!ask(&hub, query_request::Question::UserOnline("ana".into())).await.online);
}

#[tokio::test]
async fn a_report_with_a_malformed_change_is_refused_and_ends_the_session() {
    let hub = Hub::new(HubLimits::default());
    let with_state = |state: ConnectionState| DirectoryChange {
        connection_id: "1".into(),
        change: Some(directory_change::Change::Opened(state)),
    };
    let malformed = [
        ("a bad connection id", opened("a b", "", &[])),
        ("an empty connection id", closed("")),
        ("a user id with a space", opened("1", "a b", &[])),
        (
            "65 groups",
            with_state(ConnectionState {
                groups: (0..65).map(|i| format!("g{i}")).collect(),
                ..ConnectionState::default()
            }),
        ),
        ("a group with a tab", opened("1", "", &["a\tb"])),
        (
            "data over 4 KiB",
            with_state(ConnectionState {
                data: [("k".to_owned(), "v".repeat(4096))].into(),
                ..ConnectionState::default()
            }),
        ),
        (
            "129 channels",
            with_state(ConnectionState {
                channels: (0..129).map(|i| format!("chat:{i}")).collect(),
                ..ConnectionState::default()
            }),
        ),
        (
            "a channel without a namespace",
            with_state(ConnectionState { channels: vec!["news".into()], ..ConnectionState::default() }),
        ),
        ("no change", DirectoryChange { connection_id: "1".into(), change: None }),
    ];
    for (what, change) in malformed {
        let (s, mut events) = hub.open_session();
        s.apply(claim(1, "w1", "i")).await.unwrap();
        expect_ack(&mut events, 1).await;
        // The whole report is refused, the good change before the bad one too,
        // and nothing of the session's directory stays.
        let err = s.apply(report(2, vec![opened("ok", "ana", &[]), change], vec![])).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err}");
        assert_eq!(events.next().await.unwrap().unwrap_err().code(), Code::InvalidArgument, "{what}");
        assert!(!hub.worker_is_held("w1"), "{what}: the session ended");
        assert!(!ask(&hub, query_request::Question::UserOnline("ana".into())).await.online, "{what}");
    }

    // At the limits, accepted.
    let at_limits = with_state(ConnectionState {
        user_id: "ana".into(),
        groups: (0..64).map(|i| format!("g{i}")).collect(),
        data: [("k".to_owned(), "v".repeat(4095))].into(),
        channels: (0..128).map(|i| format!("chat:{i}")).collect(),
    });
    let (s, mut events) = hub.open_session();
    s.apply(claim(1, "w1", "i")).await.unwrap();
    s.apply(report(2, vec![at_limits], vec![])).await.unwrap();
    expect_ack(&mut events, 1).await;
    expect_ack(&mut events, 2).await;
    assert_eq!(ask(&hub, query_request::Question::GroupCount("g63".into())).await.count, 1);
}

#[tokio::test]
async fn user_and_group_channels_cannot_be_subscribed_to_directly() {
    let hub = Hub::new(HubLimits::default());
    for channel in ["user.x", "group.x"] {
        let (s, mut events) = hub.open_session();
        let err = s.apply(subscribe(1, &["news", channel])).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{channel}");
        assert_eq!(events.next().await.unwrap().unwrap_err().code(), Code::InvalidArgument);
        let err = hub.publish(text(target::Kind::Channel(channel.into()), "x")).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{channel}");
    }
}

#[tokio::test]
async fn a_gateway_cannot_unsubscribe_from_the_channels_of_the_users_it_holds() {
    let hub = Hub::new(HubLimits::default());
    let (w1, mut w1_events) = gateway(&hub, "w1", &[("1", "x", &["y"])]).await;
    w1.apply(unsubscribe(3, &["user.x", "group.y"])).await.unwrap();
    expect_ack(&mut w1_events, 3).await;
    assert_eq!(hub.publish(to_user("x", "still")).await.unwrap().subscribers, 1);
    expect_text(&mut w1_events, "still").await;
    assert_eq!(hub.publish(to_group("y", "still")).await.unwrap().subscribers, 1);
    expect_text(&mut w1_events, "still").await;
}

#[tokio::test]
async fn user_and_group_channels_do_not_count_against_a_sessions_channel_limit() {
    let hub = Hub::new(HubLimits { max_channels_per_session: 2, ..HubLimits::default() });
    let many: Vec<(String, String)> = (0..10).map(|i| (i.to_string(), format!("user-{i}"))).collect();
    let connections: Vec<(&str, &str, &[&str])> =
        many.iter().map(|(id, user)| (id.as_str(), user.as_str(), &["room"][..])).collect();
    let (w1, mut w1_events) = gateway(&hub, "w1", &connections).await;
    w1.apply(subscribe(3, &["broadcast"])).await.unwrap();
    expect_ack(&mut w1_events, 3).await;
    assert_eq!(w1.apply(subscribe(4, &["news"])).await.unwrap_err().code(), Code::ResourceExhausted);
}
