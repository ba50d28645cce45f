//! Who logged-in clients are: each gets an HS256 JWT (signed here, as a
//! backend would) whose `sub` is a user id of its own and whose `groups`
//! claim lists the groups it joins on connect. herald checks the token at the
//! handshake (`--client-auth jwt`); the client accepts messages addressed to
//! its user id and groups as well as its own connection and broadcasts.
//!
//! User ids and group names end up in the target field of a benchmark
//! payload (`seq:sent_ns:target:`), so they never hold a `:`.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use jsonwebtoken::{EncodingKey, Header};
use serde::{Deserialize, Serialize};

/// The HS256 secret tokens are signed with unless `--jwt-secret` says
/// otherwise (herald wants at least 32 bytes).
pub const DEFAULT_SECRET: &str = "herald-bench-hs256-secret-for-benchmarks-only";

/// How long a token stays valid: longer than any run.
const TOKEN_LIFETIME_SECS: u64 = 24 * 3600;

/// One logged-in client: its token and what the token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientIdentity {
    pub user: String,
    pub groups: Vec<String>,
    pub token: String,
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    groups: &'a [String],
    exp: u64,
}

/// The user id of client `i`.
pub fn user_id(i: usize) -> String {
    format!("u{i}")
}

/// Group `k` of a pool.
pub fn group_name(k: usize) -> String {
    format!("g{k}")
}

/// `per_connection` distinct groups for client `i`, drawn in turn from a pool
/// of `pool` groups, so that every group gets about the same number of
/// members (`connections × per_connection / pool`). A pool smaller than
/// `per_connection` is widened to it.
pub fn rotating_groups(i: usize, per_connection: usize, pool: usize) -> Vec<String> {
    let pool = pool.max(per_connection).max(1);
    (0..per_connection).map(|k| group_name((i * per_connection + k) % pool)).collect()
}

/// Signs a token for `user` in `groups`, valid for a day.
pub fn sign(secret: &str, user: &str, groups: &[String]) -> anyhow::Result<String> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).context("the clock is before 1970")?.as_secs();
    let claims = Claims { sub: user, groups, exp: now + TOKEN_LIFETIME_SECS };
    jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(secret.as_bytes()))
        .context("signing a client token")
}

/// `count` clients, client `i` being user [`user_id`]`(i)` in `groups_of(i)`.
pub fn clients(
    count: usize,
    secret: &str,
    groups_of: impl Fn(usize) -> Vec<String>,
) -> anyhow::Result<Vec<ClientIdentity>> {
    (0..count)
        .map(|i| {
            let user = user_id(i);
            let groups = groups_of(i);
            let token = sign(secret, &user, &groups)?;
            Ok(ClientIdentity { user, groups, token })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{DecodingKey, Validation};

    use super::*;

    #[test]
    fn tokens_carry_the_user_and_groups_and_verify_with_the_secret() {
        let clients = clients(2, DEFAULT_SECRET, |i| rotating_groups(i, 3, 10)).unwrap();
        assert_eq!(clients[1].user, "u1");
        assert_eq!(clients[1].groups, ["g3", "g4", "g5"]);
        let claims = jsonwebtoken::decode::<serde_json::Value>(
            &clients[1].token,
            &DecodingKey::from_secret(DEFAULT_SECRET.as_bytes()),
            &Validation::new(jsonwebtoken::Algorithm::HS256),
        )
        .unwrap()
        .claims;
        assert_eq!(claims["sub"], "u1");
        assert_eq!(claims["groups"], serde_json::json!(["g3", "g4", "g5"]));
        assert!(claims["exp"].as_u64().unwrap() > 1_700_000_000);
        let wrong = DecodingKey::from_secret(b"another secret, thirty-two bytes long");
        let checked = jsonwebtoken::decode::<serde_json::Value>(
            &clients[1].token,
            &wrong,
            &Validation::new(jsonwebtoken::Algorithm::HS256),
        );
        assert!(checked.is_err());
    }

    #[test]
    fn rotating_groups_are_distinct_and_evenly_filled() {
        let mut members = std::collections::HashMap::new();
        for i in 0..1000 {
            let groups = rotating_groups(i, 3, 100);
            let distinct: std::collections::HashSet<_> = groups.iter().collect();
            assert_eq!(distinct.len(), 3, "{groups:?}");
            for g in groups {
                *members.entry(g).or_insert(0) += 1;
            }
        }
        assert_eq!(members.len(), 100);
        assert!(members.values().all(|&n| n == 30), "{members:?}");
        assert_eq!(rotating_groups(5, 2, 1), ["g0", "g1"], "a pool smaller than the groups is widened");
        assert!(rotating_groups(5, 0, 10).is_empty());
    }

    #[test]
    fn names_never_hold_a_colon() {
        assert!(!user_id(7).contains(':') && !group_name(7).contains(':'));
    }
}
