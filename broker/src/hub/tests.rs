//! The hub as its users see it: sessions, claims, subscriptions, publishes,
//! eviction and shutdown, without sockets.

use std::pin::Pin;
use std::task::Context;

use herald_proto::v1::{
    Ack, Broadcast, ClaimWorker, ConnectionAddress, ConnectionIds, Content, Delivery, Event, Everyone, PublishRequest,
    SubscribeChannels, SubscribeRequest, SubscribeResponse, Target, UnsubscribeChannels, content, delivery,
    subscribe_request, subscribe_response, target,
};
use tokio_stream::{Stream, StreamExt};
use tonic::Code;

use super::*;

fn text(kind: target::Kind, body: &str) -> PublishRequest {
    PublishRequest {
        target: Some(Target { kind: Some(kind) }),
        content: Some(Content { body: Some(content::Body::Text(body.into())) }),
        idempotency_key: String::new(),
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
    expect_ack(&mut w1_events, 1).await;
    expect_ack(&mut w2_events, 1).await;

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
    expect_ack(&mut events, 1).await;
    expect_ack(&mut events, 2).await;

    hub.publish(broadcast("all")).await.unwrap();
    let everyone = Delivery { to: Some(delivery::To::Everyone(Everyone {})) };
    assert_eq!(expect_text(&mut events, "all").await.delivery, Some(everyone));

    hub.publish(to("w1", "7", "one")).await.unwrap();
    let seven = Delivery { to: Some(delivery::To::Connections(ConnectionIds { ids: vec!["7".into()] })) };
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
    expect_ack(&mut events, 1).await;
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
    expect_ack(&mut events, 1).await;
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
    expect_ack(&mut events, 1).await;
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
