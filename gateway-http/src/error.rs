//! HTTP errors: a status and a one-line reason, rendered as plain text for
//! the classic API and as JSON for the `/v1` API.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tonic::Code;

/// A refused HTTP request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: StatusCode,
    /// The gRPC code the broker would give for the same refusal.
    pub code: Code,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, code: Code::InvalidArgument, message: one_line(&message.into()) }
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: Code::ResourceExhausted,
            message: one_line(&message.into()),
        }
    }

    pub fn request_timeout(message: impl Into<String>) -> Self {
        Self { status: StatusCode::REQUEST_TIMEOUT, code: Code::DeadlineExceeded, message: one_line(&message.into()) }
    }

    /// Translates a broker refusal into the HTTP status a caller expects:
    /// 503 when the message was not routed (retrying is safe), 504 when the
    /// outcome is unknown (it may have been routed: retry with the same
    /// idempotency key).
    pub fn from_status(status: &tonic::Status) -> Self {
        let http = match status.code() {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => StatusCode::BAD_REQUEST,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::ResourceExhausted => StatusCode::PAYLOAD_TOO_LARGE,
            Code::Unavailable | Code::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        };
        let message = match http {
            StatusCode::SERVICE_UNAVAILABLE => format!("broker unavailable: {}", status.message()),
            StatusCode::GATEWAY_TIMEOUT => format!("outcome unknown: {}", status.message()),
            StatusCode::BAD_GATEWAY => format!("broker error ({:?}): {}", status.code(), status.message()),
            _ => status.message().to_owned(),
        };
        Self { status: http, code: status.code(), message: one_line(&message) }
    }

    /// The JSON form: `{"error":{"code":<gRPC code>,"message":"…"}}`.
    pub fn json_body(&self) -> serde_json::Value {
        serde_json::json!({ "error": { "code": self.code as i32, "message": self.message } })
    }

    pub fn into_json_response(self) -> Response {
        with_close(self.status, (self.status, axum::Json(self.json_body())).into_response())
    }
}

/// Plain text, for the classic API.
impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status;
        with_close(status, (status, format!("{}\n", self.message)).into_response())
    }
}

/// A request whose body was not read whole leaves the connection unusable:
/// say so, so that the client does not send another request on it.
fn with_close(status: StatusCode, response: Response) -> Response {
    if status == StatusCode::REQUEST_TIMEOUT {
        ([(axum::http::header::CONNECTION, "close")], response).into_response()
    } else {
        response
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\r', '\n'], " ")
}

#[cfg(test)]
mod tests {
    use tonic::Status;

    use super::*;

    #[test]
    fn broker_codes_map_to_the_http_statuses_publishers_expect() {
        let cases = [
            (Status::invalid_argument("x"), StatusCode::BAD_REQUEST),
            (Status::not_found("x"), StatusCode::NOT_FOUND),
            (Status::resource_exhausted("x"), StatusCode::PAYLOAD_TOO_LARGE),
            (Status::unavailable("x"), StatusCode::SERVICE_UNAVAILABLE),
            (Status::deadline_exceeded("x"), StatusCode::GATEWAY_TIMEOUT),
            (Status::internal("x"), StatusCode::BAD_GATEWAY),
        ];
        for (status, http) in cases {
            assert_eq!(ApiError::from_status(&status).status, http, "{status:?}");
        }
    }

    #[test]
    fn reasons_stay_on_one_line() {
        assert_eq!(ApiError::from_status(&Status::not_found("a\nb")).message, "a b");
        assert_eq!(ApiError::bad_request("unknown variant `a\r\nb`").message, "unknown variant `a  b`");
    }
}
