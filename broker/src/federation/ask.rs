//! What one broker asks another, and the answer: a control or a query for
//! the gateways the other broker serves, or a publish to one of their
//! connections that must say whether the connection is live. These travel
//! between brokers only, so they are defined here rather than in the public
//! `herald.v1` contract; they are protobuf all the same, so that brokers of
//! neighbouring versions understand each other.

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
    /// The worker ids whose part this answer covers.
    #[prost(string, repeated, tag = "6")]
    pub workers: Vec<String>,
    /// For a totals query: a hash of each distinct user id (see
    /// [`user_hash`]), so that a user connected through several brokers is
    /// counted once.
    #[prost(fixed64, repeated, tag = "7")]
    pub user_hashes: Vec<u64>,
}

/// The answers of every other broker, and which gateways they should have covered.
#[derive(Debug, Default)]
pub struct Gathered {
    pub answers: Vec<Answer>,
    /// The worker ids held through other brokers (by live lease): those the
    /// answers should cover.
    pub expected_workers: Vec<String>,
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
    fn user_hashes_are_stable_across_processes() {
        assert_eq!(user_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(user_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(user_hash("ana"), user_hash("anb"));
    }
}
