//! What one broker asks another, and the answer: a control or a query for
//! the gateways the other broker serves, or a publish to one of their
//! connections that must say whether the connection is live. These travel
//! between brokers only, so they are defined here rather than in the public
//! `herald.v1` contract; they are protobuf all the same, so that brokers of
//! neighbouring versions understand each other.

use std::collections::HashSet;

use herald_proto::v1::{ControlRequest, ControlResponse, Event, QueryRequest, QueryResponse};

/// A question for another broker. Exactly one field is set.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ask {
    #[prost(message, optional, tag = "1")]
    pub control: Option<ControlRequest>,
    #[prost(message, optional, tag = "2")]
    pub query: Option<QueryRequest>,
    /// A publish to one connection of a gateway the other broker serves.
    #[prost(message, optional, tag = "3")]
    pub event: Option<Event>,
}

/// One broker's answer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Answer {
    /// The gRPC status code of a refusal (0 when answered).
    #[prost(uint32, tag = "1")]
    pub code: u32,
    /// The refusal's one-line reason.
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(message, optional, tag = "3")]
    pub control: Option<ControlResponse>,
    #[prost(message, optional, tag = "4")]
    pub query: Option<QueryResponse>,
    /// For an event: how many sessions it was handed to.
    #[prost(uint32, tag = "5")]
    pub delivered: u32,
    /// The worker ids whose part this answer gives. A worker id one answer
    /// gives is not missing, even if the asker's view of the leases still
    /// puts it on a broker that did not answer (it just moved).
    #[prost(string, repeated, tag = "6")]
    pub workers: Vec<String>,
    /// For a totals query: a hash of each distinct user id (see
    /// [`user_hash`]), so that a user connected through several brokers is
    /// counted once.
    #[prost(fixed64, repeated, tag = "7")]
    pub user_hashes: Vec<u64>,
    /// The worker ids whose lease the answering broker holds but whose part
    /// it cannot give (their gateway has not reported its connections yet,
    /// or did not confirm a control in time).
    #[prost(string, repeated, tag = "8")]
    pub missing: Vec<String>,
    /// The answering broker's id: its answer accounts for every worker id
    /// it leases, so a lease it has just let go of is not waited for.
    #[prost(string, tag = "9")]
    pub broker_id: String,
}

/// The answers of every other broker, and which gateways they should have covered.
#[derive(Debug, Default)]
pub struct Gathered {
    pub answers: Vec<Answer>,
    /// The worker ids held through other brokers (by live lease), each with
    /// the id of the broker holding it.
    pub expected: Vec<(String, String)>,
}

impl Gathered {
    /// The expected worker ids whose broker did not answer and whose part
    /// no other answer gave.
    pub fn unanswered(&self) -> impl Iterator<Item = &str> {
        let answered: HashSet<&str> = self.answers.iter().map(|a| a.broker_id.as_str()).collect();
        let given: HashSet<&str> = self.answers.iter().flat_map(|a| a.workers.iter().map(String::as_str)).collect();
        self.expected
            .iter()
            .filter(move |(worker, broker)| !answered.contains(broker.as_str()) && !given.contains(worker.as_str()))
            .map(|(w, _)| w.as_str())
    }
}

/// A hash of a user id that every broker computes alike (FNV-1a, 64 bits):
/// `std`'s hashers are seeded per process or may change between releases.
pub fn user_hash(user: &str) -> u64 {
    user.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, b| (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_workers_of_brokers_that_did_not_answer_and_no_answer_gave_are_unanswered() {
        let expected = |w: &str, b: &str| (w.to_owned(), b.to_owned());
        let gathered = Gathered {
            answers: vec![Answer {
                broker_id: "b1".into(),
                workers: vec!["w1".into(), "moved".into()],
                ..Answer::default()
            }],
            expected: vec![expected("w1", "b1"), expected("gone", "b1"), expected("w2", "b2"), expected("moved", "b2")],
        };
        assert_eq!(gathered.unanswered().collect::<Vec<_>>(), ["w2"]);
    }

    #[test]
    fn user_hashes_are_stable_across_processes() {
        assert_eq!(user_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(user_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(user_hash("ana"), user_hash("anb"));
    }
}
