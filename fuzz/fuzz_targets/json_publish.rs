//! Fuzzes the `/v1` JSON API: arbitrary bytes as a `POST /v1/publish` body and
//! as a `POST /v1/batch` body. Parsing and conversion must never panic and
//! refuse with a 400 and a one-line reason; every request they produce must either pass
//! `route::resolve` or be refused by it with a typed error.

#![no_main]

use herald_broker::{PublishError, route};
use herald_gateway_http::error::ApiError;
use herald_gateway_http::json::{self, BatchBody, PublishBody};
use herald_proto::v1::PublishRequest;
use libfuzzer_sys::fuzz_target;

const MAX_CONTENT_BYTES: usize = 64;

fn check_refusal(e: &ApiError) {
    assert_eq!(e.status.as_u16(), 400, "unexpected refusal {e:?}");
    assert!(!e.message.contains(['\n', '\r']), "the reason must be one line: {:?}", e.message);
}

fn check_routable(req: &PublishRequest) {
    if let Err(e) = route::resolve(req, MAX_CONTENT_BYTES) {
        assert!(
            matches!(e, PublishError::Invalid(_) | PublishError::BadName(_) | PublishError::TooLarge { .. }),
            "route::resolve refused {req:?} with {e:?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    match json::parse_body::<PublishBody>(data).and_then(PublishBody::into_request) {
        Ok(req) => check_routable(&req),
        Err(e) => check_refusal(&e),
    }
    match json::parse_body::<BatchBody>(data) {
        Ok(batch) => batch.into_entries().iter().for_each(|entry| match entry {
            Ok(req) => check_routable(req),
            Err(e) => check_refusal(e),
        }),
        Err(e) => check_refusal(&e),
    }
});
