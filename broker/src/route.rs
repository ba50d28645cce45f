//! Turns a `PublishRequest` into a route: the checks the broker makes before
//! routing it, the channel it travels on, and what the receiving gateway does
//! with it. Delivery is decided here, once, from the target; gateways only
//! carry it out. Pure functions, no I/O.

use herald_proto::names::{self, BROADCAST_CHANNEL};
use herald_proto::v1::{ConnectionIds, Delivery, Everyone, PublishRequest, content, delivery, target};

use crate::error::PublishError;

/// What kind of target a publish named, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    Broadcast,
    Connection,
    Channel,
}

impl TargetKind {
    pub const ALL: [TargetKind; 3] = [Self::Broadcast, Self::Connection, Self::Channel];

    pub fn label(self) -> &'static str {
        match self {
            Self::Broadcast => "broadcast",
            Self::Connection => "connection",
            Self::Channel => "channel",
        }
    }
}

/// Where a valid publish goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub kind: TargetKind,
    pub channel: String,
    /// Size of the content, in bytes.
    pub content_bytes: usize,
    /// For a connection target: the worker id that must be held by a live gateway.
    pub worker_id: Option<String>,
    /// What a gateway receiving the event does with it; none for a channel
    /// target, whose events are for the channel's subscriber sessions.
    pub delivery: Option<Delivery>,
}

fn deliver(to: delivery::To) -> Option<Delivery> {
    Some(Delivery { to: Some(to) })
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
    let kind = req
        .target
        .as_ref()
        .and_then(|t| t.kind.as_ref())
        .ok_or_else(|| PublishError::Invalid("target is required (broadcast, connection or channel)".into()))?;
    match kind {
        target::Kind::Broadcast(_) => Ok(Route {
            kind: TargetKind::Broadcast,
            channel: BROADCAST_CHANNEL.to_owned(),
            content_bytes: len,
            worker_id: None,
            delivery: deliver(delivery::To::Everyone(Everyone {})),
        }),
        target::Kind::Connection(addr) => {
            names::validate_worker_id(&addr.worker_id)?;
            names::validate_connection_id(&addr.connection_id)?;
            Ok(Route {
                kind: TargetKind::Connection,
                channel: names::worker_channel(&addr.worker_id),
                content_bytes: len,
                worker_id: Some(addr.worker_id.clone()),
                delivery: deliver(delivery::To::Connections(ConnectionIds { ids: vec![addr.connection_id.clone()] })),
            })
        }
        target::Kind::Channel(channel) => {
            names::validate_channel(channel)?;
            if names::is_worker_channel(channel) {
                return Err(PublishError::Invalid(format!(
                    "channel {channel:?} is reserved for worker routing; address the connection instead"
                )));
            }
            Ok(Route {
                kind: TargetKind::Channel,
                channel: channel.clone(),
                content_bytes: len,
                worker_id: None,
                delivery: None,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use herald_proto::v1::{Broadcast, ConnectionAddress, Content, Target};

    use super::*;

    fn req(kind: target::Kind, text: &str) -> PublishRequest {
        PublishRequest {
            target: Some(Target { kind: Some(kind) }),
            content: Some(Content { body: Some(content::Body::Text(text.into())) }),
            idempotency_key: String::new(),
        }
    }

    fn to(worker: &str, conn: &str) -> target::Kind {
        target::Kind::Connection(ConnectionAddress { worker_id: worker.into(), connection_id: conn.into() })
    }

    #[test]
    fn broadcast_travels_on_the_broadcast_channel() {
        let r = resolve(&req(target::Kind::Broadcast(Broadcast {}), "hi"), 10).unwrap();
        assert_eq!((r.kind, r.channel.as_str(), r.worker_id), (TargetKind::Broadcast, "broadcast", None));
    }

    #[test]
    fn a_broadcast_is_delivered_to_everyone_on_each_gateway() {
        let r = resolve(&req(target::Kind::Broadcast(Broadcast {}), "hi"), 10).unwrap();
        assert_eq!(r.delivery, deliver(delivery::To::Everyone(Everyone {})));
    }

    #[test]
    fn a_connection_travels_on_its_worker_channel_to_that_one_connection() {
        let r = resolve(&req(to("w1", "7"), "hi"), 10).unwrap();
        assert_eq!(r.channel, "worker.w1");
        assert_eq!(r.worker_id.as_deref(), Some("w1"));
        assert_eq!(r.delivery, deliver(delivery::To::Connections(ConnectionIds { ids: vec!["7".into()] })));
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
            PublishRequest { idempotency_key: "a key".into(), ..req(to("w", "1"), "x") },
            PublishRequest { idempotency_key: "k".repeat(129), ..req(to("w", "1"), "x") },
        ];
        for c in cases {
            assert_eq!(resolve(&c, 10).unwrap_err().code(), tonic::Code::InvalidArgument, "{c:?}");
        }
    }

    #[test]
    fn content_over_the_limit_is_refused() {
        let err = resolve(&req(target::Kind::Broadcast(Broadcast {}), "12345678901"), 10).unwrap_err();
        assert_eq!(err, PublishError::TooLarge { len: 11, max: 10 });
        assert!(resolve(&req(target::Kind::Broadcast(Broadcast {}), "1234567890"), 10).is_ok());
    }
}
