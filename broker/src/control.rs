//! Checks `ControlRequest`s and `QueryRequest`s, and says where each goes:
//! to the gateway holding one connection, or to every gateway. Pure
//! functions, no I/O.

use herald_proto::names;
use herald_proto::v1::{ConnectionAddress, ControlRequest, QueryRequest, control_request, query_request, selection};

use crate::error::PublishError;

/// Most groups one control may name.
pub const MAX_GROUPS_PER_CONTROL: usize = 64;
/// Longest close reason, in bytes (a close frame holds 123).
pub const MAX_CLOSE_REASON_BYTES: usize = 120;

/// Where a control or a query goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The gateway holding this connection.
    Connection(ConnectionAddress),
    /// Every gateway holding a connection of this user.
    User(String),
    /// Every gateway holding a member of this group.
    Group(String),
    /// Every gateway holding a subscriber of this client channel.
    Channel(String),
    /// Every gateway.
    All,
}

/// What the controls of a batch are ordered by: those with the same key are
/// carried out one after the other, in batch order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum OrderKey {
    Connection { worker_id: String, connection_id: String },
    User(String),
    Group(String),
    Channel(String),
    All,
}

impl Scope {
    pub fn order_key(&self) -> OrderKey {
        match self {
            Scope::Connection(address) => OrderKey::Connection {
                worker_id: address.worker_id.clone(),
                connection_id: address.connection_id.clone(),
            },
            Scope::User(user) => OrderKey::User(user.clone()),
            Scope::Group(group) => OrderKey::Group(group.clone()),
            Scope::Channel(channel) => OrderKey::Channel(channel.clone()),
            Scope::All => OrderKey::All,
        }
    }
}

/// What a control does, for metrics.
pub fn control_label(req: &ControlRequest) -> &'static str {
    match &req.op {
        Some(control_request::Op::BindUser(_)) => "bind_user",
        Some(control_request::Op::UnbindUser(_)) => "unbind_user",
        Some(control_request::Op::JoinGroups(_)) => "join_groups",
        Some(control_request::Op::LeaveGroups(_)) => "leave_groups",
        Some(control_request::Op::DissolveGroup(_)) => "dissolve_group",
        Some(control_request::Op::Close(_)) => "close",
        Some(control_request::Op::SetData(_)) => "set_data",
        None => "none",
    }
}

/// Every label [`control_label`] gives a valid control.
pub const CONTROL_LABELS: [&str; 7] =
    ["bind_user", "unbind_user", "join_groups", "leave_groups", "dissolve_group", "close", "set_data"];

/// Checks a control and says where it goes.
pub fn control_scope(req: &ControlRequest) -> Result<Scope, PublishError> {
    let op = req.op.as_ref().ok_or_else(|| {
        PublishError::Invalid(
            "op is required (bind_user, unbind_user, join_groups, leave_groups, dissolve_group, close or set_data)"
                .into(),
        )
    })?;
    match op {
        control_request::Op::BindUser(bind) => {
            names::validate_user_id(&bind.user_id)?;
            connection(bind.connection.as_ref())
        }
        control_request::Op::UnbindUser(address) => connection(Some(address)),
        control_request::Op::JoinGroups(change) | control_request::Op::LeaveGroups(change) => {
            if change.groups.is_empty() || change.groups.len() > MAX_GROUPS_PER_CONTROL {
                return Err(PublishError::Invalid(format!(
                    "groups lists {} groups; give 1 to {MAX_GROUPS_PER_CONTROL}",
                    change.groups.len()
                )));
            }
            for group in &change.groups {
                names::validate_group(group)?;
            }
            selected(change.selection.as_ref().and_then(|s| s.of.as_ref()))
        }
        control_request::Op::DissolveGroup(group) => {
            names::validate_group(group)?;
            Ok(Scope::Group(group.clone()))
        }
        control_request::Op::Close(close) => {
            if close.reason.len() > MAX_CLOSE_REASON_BYTES {
                return Err(PublishError::Invalid(format!(
                    "close reason is {} bytes; the limit is {MAX_CLOSE_REASON_BYTES}",
                    close.reason.len()
                )));
            }
            selected(close.selection.as_ref().and_then(|s| s.of.as_ref()))
        }
        control_request::Op::SetData(set) => {
            for key in set.values.keys().chain(&set.remove) {
                if key.is_empty() {
                    return Err(PublishError::Invalid("connection data keys cannot be empty".into()));
                }
            }
            crate::hub::check_data(&set.values).map_err(PublishError::Invalid)?;
            connection(set.connection.as_ref())
        }
    }
}

/// Checks a query and says where it goes.
pub fn query_scope(req: &QueryRequest) -> Result<Scope, PublishError> {
    let question = req.question.as_ref().ok_or_else(|| {
        PublishError::Invalid(
            "question is required (user_online, user_connections, group_members, group_count, channel_subscribers, \
             channel_count, totals or connection)"
                .into(),
        )
    })?;
    match question {
        query_request::Question::UserOnline(user) | query_request::Question::UserConnections(user) => {
            names::validate_user_id(user)?;
            Ok(Scope::User(user.clone()))
        }
        query_request::Question::GroupMembers(group) | query_request::Question::GroupCount(group) => {
            names::validate_group(group)?;
            Ok(Scope::Group(group.clone()))
        }
        query_request::Question::ChannelSubscribers(channel) | query_request::Question::ChannelCount(channel) => {
            names::validate_client_channel(channel)?;
            Ok(Scope::Channel(channel.clone()))
        }
        query_request::Question::Totals(_) => Ok(Scope::All),
        query_request::Question::Connection(address) => connection(Some(address)),
    }
}

fn connection(address: Option<&ConnectionAddress>) -> Result<Scope, PublishError> {
    let address = address.ok_or_else(|| PublishError::Invalid("connection is required".into()))?;
    names::validate_worker_id(&address.worker_id)?;
    names::validate_connection_id(&address.connection_id)?;
    Ok(Scope::Connection(address.clone()))
}

fn selected(of: Option<&selection::Of>) -> Result<Scope, PublishError> {
    match of {
        Some(selection::Of::Connection(address)) => connection(Some(address)),
        Some(selection::Of::User(user)) => {
            names::validate_user_id(user)?;
            Ok(Scope::User(user.clone()))
        }
        None => Err(PublishError::Invalid("selection is required (connection or user)".into())),
    }
}

#[cfg(test)]
mod tests {
    use herald_proto::v1::{BindUser, CloseConnections, GroupChange, Selection, SetConnectionData, Totals};

    use super::*;

    fn addr(w: &str, c: &str) -> ConnectionAddress {
        ConnectionAddress { worker_id: w.into(), connection_id: c.into() }
    }

    fn op(op: control_request::Op) -> ControlRequest {
        ControlRequest { op: Some(op) }
    }

    fn of_user(user: &str) -> Option<Selection> {
        Some(Selection { of: Some(selection::Of::User(user.into())) })
    }

    #[test]
    fn connection_controls_go_to_the_gateway_holding_the_connection() {
        let bind =
            op(control_request::Op::BindUser(BindUser { connection: Some(addr("w1", "9")), user_id: "ana".into() }));
        assert_eq!(control_scope(&bind), Ok(Scope::Connection(addr("w1", "9"))));
        let set = op(control_request::Op::SetData(SetConnectionData {
            connection: Some(addr("w1", "9")),
            values: [("k".to_owned(), "v".to_owned())].into(),
            ..Default::default()
        }));
        assert_eq!(control_scope(&set), Ok(Scope::Connection(addr("w1", "9"))));
    }

    #[test]
    fn user_and_group_wide_controls_go_to_every_gateway_holding_them() {
        let join =
            op(control_request::Op::JoinGroups(GroupChange { selection: of_user("ana"), groups: vec!["g".into()] }));
        assert_eq!(control_scope(&join), Ok(Scope::User("ana".into())));
        let kick = op(control_request::Op::Close(CloseConnections { selection: of_user("ana"), reason: "bye".into() }));
        assert_eq!(control_scope(&kick), Ok(Scope::User("ana".into())));
        assert_eq!(control_scope(&op(control_request::Op::DissolveGroup("g".into()))), Ok(Scope::Group("g".into())));
    }

    #[test]
    fn malformed_controls_and_queries_are_invalid_arguments() {
        let controls = [
            ControlRequest { op: None },
            op(control_request::Op::BindUser(BindUser { connection: None, user_id: "ana".into() })),
            op(control_request::Op::BindUser(BindUser { connection: Some(addr("w1", "9")), user_id: "a b".into() })),
            op(control_request::Op::UnbindUser(addr("w 1", "9"))),
            op(control_request::Op::JoinGroups(GroupChange { selection: of_user("ana"), groups: vec![] })),
            op(control_request::Op::JoinGroups(GroupChange { selection: None, groups: vec!["g".into()] })),
            op(control_request::Op::LeaveGroups(GroupChange { selection: of_user("ana"), groups: vec!["".into()] })),
            op(control_request::Op::Close(CloseConnections { selection: of_user("ana"), reason: "x".repeat(121) })),
            op(control_request::Op::SetData(SetConnectionData {
                connection: Some(addr("w1", "9")),
                values: [(String::new(), "v".to_owned())].into(),
                ..Default::default()
            })),
            op(control_request::Op::SetData(SetConnectionData {
                connection: Some(addr("w1", "9")),
                values: [("k".to_owned(), "v".repeat(5000))].into(),
                ..Default::default()
            })),
        ];
        for c in controls {
            assert_eq!(control_scope(&c).unwrap_err().code(), tonic::Code::InvalidArgument, "{c:?}");
        }
        let queries = [
            QueryRequest { question: None },
            QueryRequest { question: Some(query_request::Question::UserOnline(String::new())) },
            QueryRequest { question: Some(query_request::Question::GroupCount("a b".into())) },
        ];
        for q in queries {
            assert_eq!(query_scope(&q).unwrap_err().code(), tonic::Code::InvalidArgument, "{q:?}");
        }
        let totals = QueryRequest { question: Some(query_request::Question::Totals(Totals {})) };
        assert_eq!(query_scope(&totals), Ok(Scope::All));
    }
}
