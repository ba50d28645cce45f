//! herald's `BrokerService/Query`, `Control`, `ControlBatch` and a unary
//! `Publish`, as the query, churn, users-idle and recover scenarios call
//! them: one broker, the API key when
//! herald wants one, and the requests they send, built in one place.

use herald_proto::v1::broker_service_client::BrokerServiceClient;
use herald_proto::v1::{
    ConnectionAddress, ControlBatchRequest, ControlRequest, ControlResponse, GroupChange, PublishRequest,
    PublishResponse, QueryRequest, QueryResponse, Selection, Totals, control_request, control_result, query_request,
    selection,
};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

use crate::procs::Endpoints;
use crate::publishers::{self, Address, address};
use crate::stats::Latency;

/// A client of one broker, on an HTTP/2 connection of its own (clones share it).
#[derive(Clone)]
pub struct Rpc {
    client: BrokerServiceClient<Channel>,
    authorization: Option<MetadataValue<Ascii>>,
}

impl Rpc {
    /// Connects to broker `index` of `endpoints`.
    pub async fn connect(endpoints: &Endpoints, index: usize) -> anyhow::Result<Self> {
        let brokers = endpoints.grpc()?;
        let addr = brokers[index % brokers.len()];
        Ok(Self {
            client: publishers::broker_client(addr).await?,
            authorization: publishers::authorization(endpoints)?,
        })
    }

    pub async fn query(&mut self, question: query_request::Question) -> Result<QueryResponse, tonic::Status> {
        let request = QueryRequest { question: Some(question) };
        Ok(self.client.query(publishers::authorized(request, &self.authorization)).await?.into_inner())
    }

    pub async fn control(&mut self, op: control_request::Op) -> Result<ControlResponse, tonic::Status> {
        let request = ControlRequest { op: Some(op) };
        Ok(self.client.control(publishers::authorized(request, &self.authorization)).await?.into_inner())
    }

    /// Several controls in one `ControlBatch`: each one's answer, or the
    /// reason it was refused.
    pub async fn control_batch(
        &mut self,
        ops: Vec<control_request::Op>,
    ) -> Result<Vec<Result<ControlResponse, String>>, tonic::Status> {
        let requests = ops.into_iter().map(|op| ControlRequest { op: Some(op) }).collect();
        let request = publishers::authorized(ControlBatchRequest { requests }, &self.authorization);
        let results = self.client.control_batch(request).await?.into_inner().results;
        Ok(results
            .into_iter()
            .map(|r| match r.outcome {
                Some(control_result::Outcome::Done(done)) => Ok(done),
                Some(control_result::Outcome::Error(e)) => Err(format!("code {}: {}", e.code, e.message)),
                None => Err("a result with no outcome".to_owned()),
            })
            .collect())
    }

    pub async fn publish(&mut self, request: PublishRequest) -> Result<PublishResponse, tonic::Status> {
        Ok(self.client.publish(publishers::authorized(request, &self.authorization)).await?.into_inner())
    }

    /// Connections and distinct users in the cluster.
    pub async fn totals(&mut self) -> Result<(u64, u64), tonic::Status> {
        let answer = self.query(query_request::Question::Totals(Totals {})).await?;
        Ok((answer.count, answer.users))
    }
}

/// `<worker_id>/<connection_id>` of a protobuf address.
pub fn joined(address: &ConnectionAddress) -> String {
    format!("{}/{}", address.worker_id, address.connection_id)
}

/// Puts one connection in `group` (`join`) or takes it out.
pub fn group_change(to: &Address, group: &str, join: bool) -> control_request::Op {
    let change = GroupChange {
        selection: Some(Selection { of: Some(selection::Of::Connection(address(to))) }),
        groups: vec![group.to_owned()],
    };
    if join { control_request::Op::JoinGroups(change) } else { control_request::Op::LeaveGroups(change) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_changes_select_one_connection() {
        let to = Address::parse("gw0/7").unwrap();
        let control_request::Op::JoinGroups(change) = group_change(&to, "g1", true) else { panic!("not a join") };
        assert_eq!(change.groups, ["g1"]);
        let Some(selection::Of::Connection(address)) = change.selection.unwrap().of else { panic!("no connection") };
        assert_eq!(joined(&address), "gw0/7");
        assert!(matches!(group_change(&to, "g1", false), control_request::Op::LeaveGroups(_)));
    }
}

/// What a set of callers' RPCs came to.
#[derive(Debug, Default)]
pub struct Calls {
    pub answered: u64,
    pub errors: u64,
    /// Answers that were not what the caller knew they must be.
    pub wrong: u64,
    pub first_error: Option<String>,
    pub latency: Latency,
}

impl Calls {
    /// Adds another caller's calls to these.
    pub fn merge(&mut self, other: Calls) {
        self.answered += other.answered;
        self.errors += other.errors;
        self.wrong += other.wrong;
        self.latency.merge(&other.latency);
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}
