//! Why the broker refuses a publish or a subscriber command, as typed errors
//! that map onto gRPC status codes.

use herald_proto::names::NameError;
use herald_proto::v1::{
    ControlResponse, ControlResult, PublishError as PublishErrorMessage, PublishResponse, PublishResult,
    control_result, publish_result,
};
use tonic::{Code, Status};

/// A publish, control or query the broker refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    BadName(#[from] NameError),
    #[error("no live gateway holds worker id {0:?}")]
    UnknownWorker(String),
    #[error("gateway {0:?} is reconnecting and has not reported its connections yet: retry")]
    GatewayReconnecting(String),
    #[error("connection {connection_id:?} is not live on worker {worker_id:?}")]
    UnknownConnection { worker_id: String, connection_id: String },
    #[error("gateway {worker_id:?} did not confirm ({why}): the change may or may not have been made")]
    NotConfirmed { worker_id: String, why: String },
    #[error("{message}")]
    Remote { code: Code, message: String },
    #[error("content is {len} bytes; the limit is {max}")]
    TooLarge { len: usize, max: usize },
    #[error("batch has {len} entries; the limit is {max}")]
    BatchTooLarge { len: usize, max: usize },
    #[error("broker is shutting down")]
    ShuttingDown,
    #[error("broker is starting: it takes publishes once its gateways have had {grace:?} to reconnect")]
    Starting { grace: std::time::Duration },
    #[error("broker cluster unavailable: {0}")]
    ClusterUnavailable(String),
    #[error("a publish with this idempotency key is still on its way: retry with the same key")]
    KeyInFlight,
    #[error("channel {0:?} keeps no history: its namespace has none on this broker")]
    NoHistory(String),
    #[error("channel history unavailable: {0}")]
    HistoryUnavailable(String),
}

impl PublishError {
    pub fn code(&self) -> Code {
        match self {
            Self::Invalid(_) | Self::BadName(_) => Code::InvalidArgument,
            Self::UnknownWorker(_) | Self::UnknownConnection { .. } => Code::NotFound,
            Self::NotConfirmed { .. } => Code::DeadlineExceeded,
            Self::NoHistory(_) => Code::FailedPrecondition,
            Self::Remote { code, .. } => *code,
            Self::TooLarge { .. } | Self::BatchTooLarge { .. } => Code::ResourceExhausted,
            Self::ShuttingDown
            | Self::Starting { .. }
            | Self::ClusterUnavailable(_)
            | Self::KeyInFlight
            | Self::GatewayReconnecting(_)
            | Self::HistoryUnavailable(_) => Code::Unavailable,
        }
    }
}

impl From<PublishError> for Status {
    fn from(e: PublishError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

/// The wire form of one batch item's outcome.
pub(crate) fn publish_result(r: Result<PublishResponse, PublishError>) -> PublishResult {
    PublishResult {
        outcome: Some(match r {
            Ok(published) => publish_result::Outcome::Published(published),
            Err(e) => {
                publish_result::Outcome::Error(PublishErrorMessage { code: e.code() as u32, message: e.to_string() })
            }
        }),
    }
}

/// The wire form of one control's outcome in a batch.
pub(crate) fn control_result(r: Result<ControlResponse, PublishError>) -> ControlResult {
    ControlResult {
        outcome: Some(match r {
            Ok(done) => control_result::Outcome::Done(done),
            Err(e) => {
                control_result::Outcome::Error(PublishErrorMessage { code: e.code() as u32, message: e.to_string() })
            }
        }),
    }
}

/// Why a subscriber command was refused. A refused command ends its session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandErrorKind {
    #[error("worker id {worker_id:?} is held by another live gateway")]
    WorkerTaken { worker_id: String },
    #[error("this session already holds worker id {0:?}; a session claims one worker id")]
    SecondClaim(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    BadName(#[from] NameError),
    #[error("session would listen on {count} channels; the limit is {max}")]
    TooManyChannels { count: usize, max: usize },
    #[error("broker is shutting down")]
    ShuttingDown,
    #[error("broker cluster unavailable: {0}")]
    ClusterUnavailable(String),
}

/// A refused command and the request id it came with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("request {request_id}: {kind}")]
pub struct CommandError {
    pub request_id: u64,
    pub kind: CommandErrorKind,
}

impl CommandError {
    pub fn code(&self) -> Code {
        match self.kind {
            CommandErrorKind::WorkerTaken { .. } => Code::AlreadyExists,
            CommandErrorKind::SecondClaim(_) => Code::FailedPrecondition,
            CommandErrorKind::Invalid(_) | CommandErrorKind::BadName(_) => Code::InvalidArgument,
            CommandErrorKind::TooManyChannels { .. } => Code::ResourceExhausted,
            CommandErrorKind::ShuttingDown | CommandErrorKind::ClusterUnavailable(_) => Code::Unavailable,
        }
    }
}

impl From<CommandError> for Status {
    fn from(e: CommandError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}
