//! Fuzzes the `/v1` JSON API: arbitrary bytes as a `POST /v1/publish`,
//! `/v1/batch`, `/v1/control` and `/v1/query` body. Parsing and conversion
//! must never panic and refuse with a 400 and a one-line reason; every
//! request they produce must either pass the broker's checks
//! (`route::resolve`, `control::control_scope`, `control::query_scope`) or be
//! refused by them with a typed error.

#![no_main]

use herald_broker::{PublishError, control, route};
use herald_gateway_http::error::ApiError;
use herald_gateway_http::json::{self, BatchBody, ControlBody, PublishBody, QueryBody};
use herald_proto::v1::PublishRequest;
use libfuzzer_sys::fuzz_target;

const MAX_CONTENT_BYTES: usize = 64;

fn check_refusal(e: &ApiError) {
    assert_eq!(e.status.as_u16(), 400, "unexpected refusal {e:?}");
    assert!(!e.message.contains(['\n', '\r']), "the reason must be one line: {:?}", e.message);
}

fn check_checked<T>(checked: Result<T, PublishError>, what: &dyn std::fmt::Debug) {
    if let Err(e) = checked {
        assert!(
            matches!(e, PublishError::Invalid(_) | PublishError::BadName(_) | PublishError::TooLarge { .. }),
            "the broker refused {what:?} with {e:?}"
        );
    }
}

fn check_routable(req: &PublishRequest) {
    check_checked(route::resolve(req, MAX_CONTENT_BYTES), req);
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
    match json::parse_body::<ControlBody>(data).and_then(ControlBody::into_request) {
        Ok(req) => check_checked(control::control_scope(&req), &req),
        Err(e) => check_refusal(&e),
    }
    match json::parse_body::<QueryBody>(data).and_then(QueryBody::into_request) {
        Ok(req) => check_checked(control::query_scope(&req), &req),
        Err(e) => check_refusal(&e),
    }
});
