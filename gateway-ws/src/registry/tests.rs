use std::collections::HashSet;

use herald_proto::v1::{
    BindUser, CloseConnections, ConnectionIds, Everyone, GroupChange, Selection, SetConnectionData,
};

use super::*;

const ME: &str = "w1";

fn outbox(limit: usize) -> Arc<Outbox> {
    Arc::new(Outbox::new(limit, 0))
}

fn anonymous() -> Identity {
    Identity::default()
}

fn user(name: &str, groups: &[&str]) -> Identity {
    Identity {
        user_id: Some(name.into()),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        ..Identity::default()
    }
}

fn everyone() -> delivery::To {
    delivery::To::Everyone(Everyone {})
}

fn connections(ids: &[&str]) -> delivery::To {
    delivery::To::Connections(ConnectionIds { ids: ids.iter().map(|id| id.to_string()).collect() })
}

fn drain(outbox: &Outbox) -> Result<Vec<Message>, CloseReason> {
    outbox.take().map(|(batch, _)| batch.into())
}

fn nobody() -> HashSet<u64> {
    HashSet::new()
}

fn address(id: u64) -> ConnectionAddress {
    ConnectionAddress { worker_id: ME.into(), connection_id: id.to_string() }
}

fn of_connection(id: u64) -> Option<Selection> {
    Some(Selection { of: Some(selection::Of::Connection(address(id))) })
}

fn of_user(user: &str) -> Option<Selection> {
    Some(Selection { of: Some(selection::Of::User(user.into())) })
}

fn control(op: control_request::Op) -> ControlRequest {
    ControlRequest { op: Some(op) }
}

#[test]
fn ids_are_never_reused() {
    let registry = Registry::default();
    let (a, _) = registry.register(outbox(1024), &anonymous());
    registry.remove(a);
    let (b, _) = registry.register(outbox(1024), &anonymous());
    assert_ne!(a, b);
    assert_eq!(registry.len(), 1);
}

#[test]
fn a_restarted_gateway_starts_above_every_id_it_gave_before() {
    let before = Registry::default();
    let (last, _) = before.register(outbox(1024), &anonymous());
    std::thread::sleep(std::time::Duration::from_millis(2));
    let after = Registry::default();
    let (first, _) = after.register(outbox(1024), &anonymous());
    assert!(first > last, "{first} after a restart is not above {last}");
}

#[test]
fn everyone_means_every_connection_once() {
    let registry = Registry::default();
    let boxes: Vec<_> = (0..3).map(|_| outbox(1024)).collect();
    for b in &boxes {
        registry.register(b.clone(), &anonymous());
    }
    let outcome = registry.deliver(&everyone(), &nobody(), Message::text("all"), 0);
    assert_eq!(outcome, Outcome { queued: 3, ..Outcome::default() });
    for b in &boxes {
        assert_eq!(drain(b), Ok(vec![Message::text("all")]));
    }
}

#[test]
fn named_connections_get_the_frame_and_no_other_does() {
    let registry = Registry::default();
    let (a, b, c) = (outbox(1024), outbox(1024), outbox(1024));
    registry.register(a.clone(), &anonymous());
    let b_id = registry.register(b.clone(), &anonymous()).0.to_string();
    let c_id = registry.register(c.clone(), &anonymous()).0.to_string();
    let outcome = registry.deliver(&connections(&[&b_id, &c_id]), &nobody(), Message::text("b and c"), 0);
    assert_eq!(outcome, Outcome { queued: 2, ..Outcome::default() });
    assert_eq!(drain(&a), Ok(vec![]));
    assert_eq!(drain(&b), Ok(vec![Message::text("b and c")]));
    assert_eq!(drain(&c), Ok(vec![Message::text("b and c")]));
}

#[test]
fn unknown_or_malformed_connection_ids_are_counted() {
    let registry = Registry::default();
    registry.register(outbox(1024), &anonymous());
    let outcome = registry.deliver(&connections(&["99", "x", "", "-1"]), &nobody(), Message::text("?"), 0);
    assert_eq!(outcome, Outcome { unknown: 4, ..Outcome::default() });
}

#[test]
fn a_user_target_reaches_every_connection_of_that_user_and_no_other() {
    let registry = Registry::default();
    let (tab1, tab2, other, anon) = (outbox(1024), outbox(1024), outbox(1024), outbox(1024));
    registry.register(tab1.clone(), &user("ana", &[]));
    registry.register(tab2.clone(), &user("ana", &[]));
    registry.register(other.clone(), &user("bob", &[]));
    registry.register(anon.clone(), &anonymous());
    let outcome = registry.deliver(&delivery::To::User("ana".into()), &nobody(), Message::text("hi ana"), 0);
    assert_eq!(outcome.queued, 2);
    assert_eq!(drain(&tab1), Ok(vec![Message::text("hi ana")]));
    assert_eq!(drain(&tab2), Ok(vec![Message::text("hi ana")]));
    assert_eq!(drain(&other), Ok(vec![]));
    assert_eq!(drain(&anon), Ok(vec![]));
}

#[test]
fn a_group_target_skips_the_excepted_sender() {
    let registry = Registry::default();
    let (sender, peer) = (outbox(1024), outbox(1024));
    let (sender_id, _) = registry.register(sender.clone(), &user("ana", &["room"]));
    registry.register(peer.clone(), &user("bob", &["room"]));
    let except = HashSet::from([sender_id]);
    let outcome = registry.deliver(&delivery::To::Group("room".into()), &except, Message::text("hello room"), 0);
    assert_eq!(outcome.queued, 1);
    assert_eq!(drain(&sender), Ok(vec![]));
    assert_eq!(drain(&peer), Ok(vec![Message::text("hello room")]));
}

#[test]
fn binding_joining_and_leaving_move_a_connection_between_targets() {
    let registry = Registry::default();
    let conn = outbox(1024);
    let (id, _) = registry.register(conn.clone(), &anonymous());
    let bind =
        control(control_request::Op::BindUser(BindUser { connection: Some(address(id)), user_id: "ana".into() }));
    assert_eq!(registry.apply_control(ME, 1, bind), 1);
    let join =
        control(control_request::Op::JoinGroups(GroupChange { selection: of_user("ana"), groups: vec!["g".into()] }));
    assert_eq!(registry.apply_control(ME, 2, join), 1);
    assert_eq!(registry.deliver(&delivery::To::User("ana".into()), &nobody(), Message::text("u"), 0).queued, 1);
    assert_eq!(registry.deliver(&delivery::To::Group("g".into()), &nobody(), Message::text("g"), 0).queued, 1);
    let leave = control(control_request::Op::LeaveGroups(GroupChange {
        selection: of_connection(id),
        groups: vec!["g".into()],
    }));
    assert_eq!(registry.apply_control(ME, 3, leave), 1);
    assert_eq!(registry.apply_control(ME, 4, control(control_request::Op::UnbindUser(address(id)))), 1);
    assert_eq!(registry.deliver(&delivery::To::User("ana".into()), &nobody(), Message::text("u"), 0).queued, 0);
    assert_eq!(registry.deliver(&delivery::To::Group("g".into()), &nobody(), Message::text("g"), 0).queued, 0);
    assert_eq!(registry.census(), (0, 0, 0));
    assert_eq!(drain(&conn), Ok(vec![Message::text("u"), Message::text("g")]));
}

#[test]
fn controls_for_another_worker_or_a_dead_connection_apply_to_nothing() {
    let registry = Registry::default();
    let (id, _) = registry.register(outbox(1024), &anonymous());
    let elsewhere = ConnectionAddress { worker_id: "w2".into(), connection_id: id.to_string() };
    let bind = control(control_request::Op::BindUser(BindUser { connection: Some(elsewhere), user_id: "ana".into() }));
    assert_eq!(registry.apply_control(ME, 1, bind), 0);
    registry.remove(id);
    let bind =
        control(control_request::Op::BindUser(BindUser { connection: Some(address(id)), user_id: "ana".into() }));
    assert_eq!(registry.apply_control(ME, 2, bind), 0);
}

#[test]
fn dissolving_a_group_empties_it() {
    let registry = Registry::default();
    for name in ["a", "b", "c"] {
        registry.register(outbox(1024), &user(name, &["room", "other"]));
    }
    assert_eq!(registry.apply_control(ME, 1, control(control_request::Op::DissolveGroup("room".into()))), 3);
    assert_eq!(registry.deliver(&delivery::To::Group("room".into()), &nobody(), Message::text("x"), 0).queued, 0);
    assert_eq!(registry.deliver(&delivery::To::Group("other".into()), &nobody(), Message::text("x"), 0).queued, 3);
}

#[test]
fn closing_a_user_closes_every_connection_of_it_with_the_reason() {
    let registry = Registry::default();
    let (tab1, tab2, other) = (outbox(1024), outbox(1024), outbox(1024));
    registry.register(tab1.clone(), &user("ana", &[]));
    registry.register(tab2.clone(), &user("ana", &[]));
    registry.register(other.clone(), &user("bob", &[]));
    let kick =
        control(control_request::Op::Close(CloseConnections { selection: of_user("ana"), reason: "banned".into() }));
    assert_eq!(registry.apply_control(ME, 1, kick), 2);
    assert_eq!(drain(&tab1), Err(CloseReason::Kicked));
    assert_eq!(tab2.close_text().as_deref(), Some("banned"));
    assert_eq!(drain(&other), Ok(vec![]));
    assert_eq!(registry.census(), (1, 0, 0), "kicked connections leave the directory at once");
}

#[test]
fn connection_data_is_set_removed_and_replaced() {
    let registry = Registry::default();
    registry.snapshot();
    let (id, _) = registry.register(outbox(1024), &anonymous());
    let set = |values: &[(&str, &str)], remove: &[&str], replace: bool| {
        control(control_request::Op::SetData(SetConnectionData {
            connection: Some(address(id)),
            values: values.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            remove: remove.iter().map(|k| k.to_string()).collect(),
            replace,
        }))
    };
    registry.apply_control(ME, 1, set(&[("a", "1"), ("b", "2")], &[], false));
    registry.apply_control(ME, 2, set(&[("c", "3")], &["a"], false));
    let (changes, _, _) = registry.take_journal().unwrap();
    let last = changes.last().unwrap().change.clone();
    let Some(directory_change::Change::State(state)) = last else { panic!("{last:?}") };
    assert_eq!(state.data, [("b".to_owned(), "2".to_owned()), ("c".to_owned(), "3".to_owned())].into());
    registry.apply_control(ME, 3, set(&[("z", "9")], &[], true));
    let (changes, _, _) = registry.take_journal().unwrap();
    let Some(directory_change::Change::State(state)) = changes[0].change.clone() else { panic!() };
    assert_eq!(state.data, [("z".to_owned(), "9".to_owned())].into());
}

#[test]
fn the_journal_reports_changes_in_order_with_the_controls_they_carried_out() {
    let registry = Registry::default();
    let (before, seq) = registry.register(outbox(1024), &user("ana", &["g"]));
    assert_eq!(seq, None, "nothing is journaled while no broker session follows");
    let (snapshot, at) = registry.snapshot();
    assert_eq!(snapshot.len(), 1);
    assert_eq!(snapshot[0].connection_id, before.to_string());
    let (id, seq) = registry.register(outbox(1024), &anonymous());
    assert_eq!(seq, Some(at + 1));
    registry.apply_control(ME, 7, control(control_request::Op::UnbindUser(address(before))));
    registry.remove(id);
    let (changes, done, upto) = registry.take_journal().unwrap();
    let kinds: Vec<_> = changes
        .iter()
        .map(|c| match c.change {
            Some(directory_change::Change::Opened(_)) => "opened",
            Some(directory_change::Change::State(_)) => "state",
            Some(directory_change::Change::Closed(_)) => "closed",
            None => "none",
        })
        .collect();
    assert_eq!(kinds, ["opened", "state", "closed"]);
    assert_eq!(done, [ControlDone { control_id: 7, connections: 1 }]);
    assert_eq!(upto, at + 3);
    assert!(registry.take_journal().is_none());
    registry.unfollow();
    registry.register(outbox(1024), &anonymous());
    assert!(registry.take_journal().is_none());
}

#[test]
fn expired_tokens_close_their_connections() {
    let registry = Registry::default();
    let soon = Identity { expires_at: Some(100), ..user("ana", &["g"]) };
    let later = Identity { expires_at: Some(200), ..user("bob", &[]) };
    let (a, b) = (outbox(1024), outbox(1024));
    registry.register(a.clone(), &soon);
    registry.register(b.clone(), &later);
    assert_eq!(registry.expire(99), 0);
    assert_eq!(registry.expire(150), 1);
    assert_eq!(drain(&a), Err(CloseReason::TokenExpired));
    assert_eq!(drain(&b), Ok(vec![]));
    assert_eq!(registry.census(), (1, 0, 0));
}

#[test]
fn a_full_connection_overflows_without_affecting_the_others() {
    let registry = Registry::default();
    let small = outbox(4);
    let big = outbox(1024);
    registry.register(small.clone(), &anonymous());
    registry.register(big.clone(), &anonymous());
    let outcome = registry.deliver(&everyone(), &nobody(), Message::text("12345"), 0);
    assert_eq!(outcome, Outcome { queued: 1, closing: 1, ..Outcome::default() });
    assert_eq!(drain(&big), Ok(vec![Message::text("12345")]));
    assert_eq!(drain(&small), Err(CloseReason::SlowConsumer));
}

#[test]
fn the_heartbeat_pings_live_clients_and_closes_silent_ones() {
    let registry = Registry::default();
    let live = outbox(1024);
    let silent = outbox(1024);
    live.heard(5_000);
    silent.heard(1_000);
    registry.register(live.clone(), &anonymous());
    registry.register(silent.clone(), &anonymous());
    assert_eq!(registry.heartbeat(2_000), Sweep { pinged: 1, unresponsive: 1 });
    assert_eq!(drain(&live), Ok(vec![Message::Ping(Default::default())]));
    assert_eq!(drain(&silent), Err(CloseReason::Unresponsive));
}

fn json_outbox() -> Arc<Outbox> {
    Arc::new(Outbox::new(1024, 0).speaking(Protocol::Json))
}

#[test]
fn a_subscription_is_journaled_indexed_and_taken_back() {
    let registry = Registry::default();
    let (id, _) = registry.register(json_outbox(), &anonymous());
    registry.snapshot();
    assert_eq!(registry.subscribe(id, "chat:a", 100), Ok(Some(2)));
    assert_eq!(registry.subscribe(id, "chat:a", 100), Err(SubscriptionError::AlreadySubscribed));
    assert!(registry.is_subscribed(id, "chat:a"));
    assert_eq!(registry.census(), (0, 0, 1));
    let (changes, _, _) = registry.take_journal().unwrap();
    let Some(directory_change::Change::State(state)) = &changes[0].change else { panic!("{changes:?}") };
    assert_eq!(state.channels, ["chat:a"]);

    assert_eq!(registry.unsubscribe(id, "chat:b"), Err(SubscriptionError::NotSubscribed));
    assert_eq!(registry.unsubscribe(id, "chat:a"), Ok(Some(3)));
    assert!(!registry.is_subscribed(id, "chat:a"));
    assert_eq!(registry.census(), (0, 0, 0));
}

#[test]
fn subscriptions_are_bounded_and_leave_with_their_connection() {
    let registry = Registry::default();
    let (id, _) = registry.register(json_outbox(), &anonymous());
    for i in 0..MAX_CHANNELS_PER_CONNECTION {
        assert_eq!(registry.subscribe(id, &format!("chat:{i}"), 1000), Ok(None), "no broker follows: no position");
    }
    assert_eq!(registry.subscribe(id, "chat:one-more", 1000), Err(SubscriptionError::TooMany));
    registry.remove(id);
    assert_eq!(registry.census(), (0, 0, 0));
    assert_eq!(registry.subscribe(id, "chat:a", 100), Err(SubscriptionError::Closing));
}

#[test]
fn a_channel_publication_reaches_its_subscribers_only() {
    let registry = Registry::default();
    let (a, b) = (json_outbox(), json_outbox());
    let (a_id, _) = registry.register(a.clone(), &anonymous());
    registry.register(b.clone(), &anonymous());
    registry.subscribe(a_id, "chat:a", 100).unwrap();
    let outcome = registry.deliver_to_channel("chat:a", &HashSet::new(), None, Message::text("pub"), 0);
    assert_eq!(outcome.queued, 1);
    assert_eq!(drain(&a).unwrap(), [Message::text("pub")]);
    assert!(drain(&b).unwrap().is_empty());
    assert_eq!(registry.deliver_to_channel("chat:none", &HashSet::new(), None, Message::text("x"), 0).queued, 0);
}

#[test]
fn a_direct_message_is_wrapped_for_client_protocol_connections_and_raw_for_the_others() {
    let registry = Registry::default();
    let (raw, json) = (outbox(1024), json_outbox());
    registry.register(raw.clone(), &anonymous());
    registry.register(json.clone(), &anonymous());
    let outcome = registry.deliver(&everyone(), &nobody(), Message::text("hi"), 0);
    assert_eq!(outcome.queued, 2);
    assert_eq!(drain(&raw).unwrap(), [Message::text("hi")]);
    assert_eq!(drain(&json).unwrap(), [Message::text(r#"{"message":{"content":{"text":"hi"}}}"#)]);
}

#[test]
fn a_gateway_opens_no_client_channel_past_its_limit_but_joins_those_it_has() {
    let registry = Registry::default();
    let (a, _) = registry.register(json_outbox(), &anonymous());
    let (b, _) = registry.register(json_outbox(), &anonymous());
    assert_eq!(registry.subscribe(a, "chat:1", 2), Ok(None));
    assert_eq!(registry.subscribe(a, "chat:2", 2), Ok(None));
    assert_eq!(registry.subscribe(b, "chat:3", 2), Err(SubscriptionError::GatewayFull));
    assert_eq!(registry.subscribe(b, "chat:1", 2), Ok(None), "an open channel takes more subscribers");
    registry.unsubscribe(a, "chat:2").unwrap();
    assert_eq!(registry.subscribe(b, "chat:3", 2), Ok(None), "room again once one closed");
}
