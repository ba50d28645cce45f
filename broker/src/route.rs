//! Turns a `PublishRequest` into a route: the checks the broker makes before
//! routing it, the channel it travels on, and what the receiving gateway does
//! with it. Delivery is decided here, once, from the target; gateways only
//! carry it out. Pure functions, no I/O.

use herald_proto::names::{self, BROADCAST_CHANNEL};
use herald_proto::v1::{
    ConnectionAddress, ConnectionIds, Delivery, Everyone, PublishRequest, content, delivery, target,
};

use crate::error::PublishError;

/// What kind of target a publish named, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    Broadcast,
    Connection,
    Channel,
    User,
    Group,
}

impl TargetKind {
    pub const ALL: [TargetKind; 5] = [Self::Broadcast, Self::Connection, Self::Channel, Self::User, Self::Group];

    pub fn label(self) -> &'static str {
        match self {
            Self::Broadcast => "broadcast",
            Self::Connection => "connection",
            Self::Channel => "channel",
            Self::User => "user",
            Self::Group => "group",
        }
    }
}

/// Most connections one publish may exclude.
pub const MAX_EXCEPT: usize = 1000;

/// Where a valid publish goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub kind: TargetKind,
    pub channel: String,
    /// Size of the content, in bytes.
    pub content_bytes: usize,
    /// What a gateway receiving the event does with it; none for a channel
    /// target, whose events are for the channel's subscriber sessions.
    pub delivery: Option<Delivery>,
}

fn deliver(to: delivery::To, except: &[ConnectionAddress]) -> Option<Delivery> {
    Some(Delivery { to: Some(to), except: except.to_vec() })
}

fn check_except(except: &[ConnectionAddress]) -> Result<(), PublishError> {
    if except.len() > MAX_EXCEPT {
        return Err(PublishError::Invalid(format!(
            "except lists {} connections; the limit is {MAX_EXCEPT}",
            except.len()
        )));
    }
    for address in except {
        names::validate_worker_id(&address.worker_id)?;
        names::validate_connection_id(&address.connection_id)?;
    }
    Ok(())
}

/// The connection a publish is for: the worker id that must be held by a
/// live gateway, and the connection that must be live on it. `None` for
/// every other kind of target.
pub fn target_connection(req: &PublishRequest) -> Option<&ConnectionAddress> {
    match req.target.as_ref()?.kind.as_ref()? {
        target::Kind::Connection(address) => Some(address),
        _ => None,
    }
}

/// Validates `req` against the grammar and `max_content_bytes`, and names its channel.
pub fn resolve(req: &PublishRequest, max_content_bytes: usize) -> Result<Route, PublishError> {
    let body = req
        .content
        .as_ref()
        .and_then(|c| c.body.as_ref())
        .ok_or_else(|| PublishError::Invalid("content is required (text or binary)".into()))?;
    let len = match body {
        content::Body::Text(t) => t.len(),
        content::Body::Binary(b) => b.len(),
    };
    if len > max_content_bytes {
        return Err(PublishError::TooLarge { len, max: max_content_bytes });
    }
    if !req.idempotency_key.is_empty() {
        names::validate_idempotency_key(&req.idempotency_key)?;
    }
    let target = req.target.as_ref();
    let kind = target.and_then(|t| t.kind.as_ref()).ok_or_else(|| {
        PublishError::Invalid("target is required (broadcast, connection, user, group or channel)".into())
    })?;
    let except = target.map_or(&[][..], |t| &t.except);
    check_except(except)?;
    if req.presence_change.is_some() && !matches!(kind, target::Kind::Channel(_)) {
        return Err(PublishError::Invalid("a presence change is announced on a client channel".into()));
    }
    let route = |kind, channel, delivery| Route { kind, channel, content_bytes: len, delivery };
    match kind {
        target::Kind::Broadcast(_) => Ok(route(
            TargetKind::Broadcast,
            BROADCAST_CHANNEL.to_owned(),
            deliver(delivery::To::Everyone(Everyone {}), except),
        )),
        target::Kind::Connection(addr) => {
            names::validate_worker_id(&addr.worker_id)?;
            names::validate_connection_id(&addr.connection_id)?;
            let ids = ConnectionIds { ids: vec![addr.connection_id.clone()] };
            Ok(route(
                TargetKind::Connection,
                names::worker_channel(&addr.worker_id),
                deliver(delivery::To::Connections(ids), except),
            ))
        }
        target::Kind::User(user) => {
            names::validate_user_id(user)?;
            Ok(route(TargetKind::User, names::user_channel(user), deliver(delivery::To::User(user.clone()), except)))
        }
        target::Kind::Group(group) => {
            names::validate_group(group)?;
            Ok(route(
                TargetKind::Group,
                names::group_channel(group),
                deliver(delivery::To::Group(group.clone()), except),
            ))
        }
        target::Kind::Channel(channel) => {
            names::validate_channel(channel)?;
            if names::is_reserved_channel(channel) {
                return Err(PublishError::Invalid(format!(
                    "channel {channel:?} is reserved for routing; address a connection, a user or a group instead"
                )));
            }
            let client_channel = names::client_channel(channel).is_some();
            if !except.is_empty() && !client_channel {
                return Err(PublishError::Invalid(
                    "except applies to connections: to client channels (<namespace>:<name>), not to channels of \
                     subscriber sessions"
                        .into(),
                ));
            }
            if let Some(change) = &req.presence_change {
                if !client_channel {
                    return Err(PublishError::Invalid("a presence change is announced on a client channel".into()));
                }
                let address = change.address.as_ref().ok_or_else(|| {
                    PublishError::Invalid("a presence change names the connection that joined or left".into())
                })?;
                names::validate_worker_id(&address.worker_id)?;
                names::validate_connection_id(&address.connection_id)?;
                if !change.user_id.is_empty() {
                    names::validate_user_id(&change.user_id)?;
                }
            }
            Ok(route(TargetKind::Channel, channel.clone(), None))
        }
    }
}

#[cfg(test)]
mod tests {
    use herald_proto::v1::{Broadcast, ChannelPresenceChange, Content, Target};

    use super::*;

    fn req(kind: target::Kind, text: &str) -> PublishRequest {
        PublishRequest {
            target: Some(Target { kind: Some(kind), except: vec![] }),
            content: Some(Content { body: Some(content::Body::Text(text.into())) }),
            idempotency_key: String::new(),
            presence_change: None,
        }
    }

    fn to(worker: &str, conn: &str) -> target::Kind {
        target::Kind::Connection(ConnectionAddress { worker_id: worker.into(), connection_id: conn.into() })
    }

    #[test]
    fn broadcast_travels_on_the_broadcast_channel() {
        let publish = req(target::Kind::Broadcast(Broadcast {}), "hi");
        let r = resolve(&publish, 10).unwrap();
        assert_eq!((r.kind, r.channel.as_str()), (TargetKind::Broadcast, "broadcast"));
        assert_eq!(target_connection(&publish), None);
    }

    #[test]
    fn a_broadcast_is_delivered_to_everyone_on_each_gateway() {
        let r = resolve(&req(target::Kind::Broadcast(Broadcast {}), "hi"), 10).unwrap();
        assert_eq!(r.delivery, deliver(delivery::To::Everyone(Everyone {}), &[]));
    }

    #[test]
    fn a_connection_travels_on_its_worker_channel_to_that_one_connection() {
        let publish = req(to("w1", "7"), "hi");
        let r = resolve(&publish, 10).unwrap();
        assert_eq!(r.channel, "worker.w1");
        assert_eq!(target_connection(&publish).map(|a| a.worker_id.as_str()), Some("w1"));
        assert_eq!(r.delivery, deliver(delivery::To::Connections(ConnectionIds { ids: vec!["7".into()] }), &[]));
    }

    #[test]
    fn users_and_groups_travel_on_their_own_channels_with_their_exceptions() {
        let sender = ConnectionAddress { worker_id: "w1".into(), connection_id: "7".into() };
        let mut user = req(target::Kind::User("ana@example.com".into()), "hi");
        user.target.as_mut().unwrap().except.push(sender.clone());
        let r = resolve(&user, 10).unwrap();
        assert_eq!((r.kind, r.channel.as_str()), (TargetKind::User, "user.ana_40example_2ecom"));
        assert_eq!(r.delivery, deliver(delivery::To::User("ana@example.com".into()), std::slice::from_ref(&sender)));
        let r = resolve(&req(target::Kind::Group("room 1".into()), "hi"), 10);
        assert_eq!(r.unwrap_err().code(), tonic::Code::InvalidArgument);
        let r = resolve(&req(target::Kind::Group("room-1".into()), "hi"), 10).unwrap();
        assert_eq!((r.kind, r.channel.as_str()), (TargetKind::Group, "group.room-1"));
    }

    #[test]
    fn a_channel_is_for_its_subscriber_sessions_not_for_gateways() {
        let r = resolve(&req(target::Kind::Channel("news".into()), "hi"), 10).unwrap();
        assert_eq!((r.kind, r.channel.as_str(), r.delivery), (TargetKind::Channel, "news", None));
    }

    #[test]
    fn malformed_requests_are_invalid_arguments() {
        let no_target = PublishRequest { target: None, ..req(to("w", "1"), "x") };
        let no_content = PublishRequest { content: None, ..req(to("w", "1"), "x") };
        let cases = [
            no_target,
            no_content,
            req(to("w 1", "1"), "x"),
            req(to("w1", ""), "x"),
            req(target::Kind::Channel("a..b".into()), "x"),
            req(target::Kind::Channel("worker.w1".into()), "x"),
            req(target::Kind::Channel("user.x".into()), "x"),
            req(target::Kind::User(String::new()), "x"),
            req(target::Kind::Group("a\tb".into()), "x"),
            PublishRequest {
                target: Some(Target {
                    kind: Some(target::Kind::Channel("news".into())),
                    except: vec![ConnectionAddress { worker_id: "w".into(), connection_id: "1".into() }],
                }),
                ..req(to("w", "1"), "x")
            },
            PublishRequest {
                target: Some(Target {
                    kind: Some(target::Kind::Broadcast(Broadcast {})),
                    except: vec![ConnectionAddress { worker_id: "w".into(), connection_id: String::new() }],
                }),
                ..req(to("w", "1"), "x")
            },
            PublishRequest {
                presence_change: Some(ChannelPresenceChange { joined: true, address: None, user_id: String::new() }),
                ..req(target::Kind::Channel("chat:a".into()), "")
            },
            PublishRequest {
                presence_change: Some(ChannelPresenceChange {
                    joined: true,
                    address: Some(w1()),
                    user_id: String::new(),
                }),
                ..req(target::Kind::Channel("news".into()), "")
            },
            PublishRequest {
                presence_change: Some(ChannelPresenceChange {
                    joined: true,
                    address: Some(w1()),
                    user_id: String::new(),
                }),
                ..req(target::Kind::Broadcast(Broadcast {}), "")
            },
            PublishRequest { idempotency_key: "a key".into(), ..req(to("w", "1"), "x") },
            PublishRequest { idempotency_key: "k".repeat(129), ..req(to("w", "1"), "x") },
        ];
        for c in cases {
            assert_eq!(resolve(&c, 10).unwrap_err().code(), tonic::Code::InvalidArgument, "{c:?}");
        }
    }

    fn w1() -> ConnectionAddress {
        ConnectionAddress { worker_id: "w1".into(), connection_id: "1".into() }
    }

    #[test]
    fn a_client_channel_takes_exceptions_and_presence_changes() {
        let mut publish = req(target::Kind::Channel("chat:a".into()), "x");
        publish.target.as_mut().unwrap().except.push(w1());
        assert_eq!(resolve(&publish, 10).unwrap().channel, "chat:a");
        let change = ChannelPresenceChange { joined: false, address: Some(w1()), user_id: "ana".into() };
        let publish =
            PublishRequest { presence_change: Some(change), ..req(target::Kind::Channel("chat:a".into()), "") };
        assert_eq!(resolve(&publish, 10).unwrap().kind, TargetKind::Channel);
    }

    #[test]
    fn content_over_the_limit_is_refused() {
        let err = resolve(&req(target::Kind::Broadcast(Broadcast {}), "12345678901"), 10).unwrap_err();
        assert_eq!(err, PublishError::TooLarge { len: 11, max: 10 });
        assert!(resolve(&req(target::Kind::Broadcast(Broadcast {}), "1234567890"), 10).is_ok());
    }
}
