//! Fuzzes the classic query-string API: arbitrary bytes become a content limit,
//! a query string and (optionally) a form body for `classic::parse`. It must
//! never panic, must refuse with a one-line 400 or 413, and whatever it accepts
//! the broker's own validator (`route::resolve`) must accept too.
//!
//! Input layout: byte 0 is the content limit; the rest is the query string,
//! then, after the first NUL byte if there is one, the form body.

#![no_main]

use herald_broker::route;
use herald_gateway_http::classic;
use herald_proto::names;
use herald_proto::v1::{content, target};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&limit, rest)) = data.split_first() else {
        return;
    };
    let max_content_bytes = usize::from(limit);
    let (query, form) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let query = String::from_utf8_lossy(query);
    match classic::parse(&query, form, max_content_bytes) {
        Ok(req) => {
            let route = route::resolve(&req, max_content_bytes)
                .unwrap_or_else(|e| panic!("classic::parse accepted {req:?} but route::resolve refused it: {e}"));
            let Some(content::Body::Text(text)) = req.content.as_ref().and_then(|c| c.body.as_ref()) else {
                panic!("the classic API publishes text, got {req:?}");
            };
            assert!(!text.is_empty() && text.len() <= max_content_bytes);
            match req.target.as_ref().and_then(|t| t.kind.as_ref()) {
                Some(target::Kind::Broadcast(_)) => assert_eq!(route.channel, "broadcast"),
                Some(target::Kind::Connection(addr)) => {
                    assert_eq!(route.channel, names::worker_channel(&addr.worker_id));
                    assert_eq!(route::target_connection(&req), Some(addr));
                }
                Some(target::Kind::Channel(channel)) => assert_eq!(route.channel, *channel),
                Some(target::Kind::User(user)) => assert_eq!(route.channel, names::user_channel(user)),
                Some(target::Kind::Group(group)) => assert_eq!(route.channel, names::group_channel(group)),
                other => {
                    panic!("the classic API targets broadcast, a connection, a user, a group or a channel: {other:?}")
                }
            }
        }
        Err(e) => {
            assert!(matches!(e.status.as_u16(), 400 | 413), "unexpected status {}", e.status);
            assert!(!e.message.contains('\n'), "reason is not one line: {:?}", e.message);
        }
    }
});
