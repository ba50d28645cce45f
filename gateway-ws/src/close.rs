//! Why a connection closes, and the close frame each reason sends. One type
//! for every path: the outbox records it when another task asks for a close
//! (overflow, silence, shutdown), the connection's task returns it when the
//! client or the socket ends things, and the metrics count it.

use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// The close code of a connection a backend closed.
pub(crate) const KICKED: u16 = 4000;
/// The close code of a connection whose token expired.
pub(crate) const TOKEN_EXPIRED: u16 = 4001;
/// The close code of a client-protocol connection that sent something that
/// is not a command.
pub(crate) const BAD_COMMAND: u16 = 4002;

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// The client sent a close frame.
    ClientClosed,
    /// The TCP connection ended or failed without a close frame.
    ClientGone,
    /// The client sent a message over the size limit (close code 1009).
    MessageTooBig,
    /// The client broke the WebSocket protocol (close code 1002).
    ProtocolError,
    /// The client sent a text message that is not UTF-8 (close code 1007).
    InvalidPayload,
    /// The outbound queue overflowed (close code 1008).
    SlowConsumer,
    /// A batch of frames could not be written in time (close code 1008).
    WriteTimeout,
    /// The client did not answer pings in time (close code 1008).
    Unresponsive,
    /// The gateway is shutting down (close code 1001).
    Shutdown,
    /// The gateway lost its worker id (close code 1011).
    WorkerIdLost,
    /// A backend closed the connection (close code 4000, with the
    /// backend's reason when it gave one).
    Kicked,
    /// The client's token expired (close code 4001).
    TokenExpired,
    /// A client-protocol connection sent a frame that is not a command
    /// (close code 4002).
    BadCommand,
    /// The client sent more messages in a second than the gateway takes
    /// (close code 1008).
    TooManyMessages,
}

impl CloseReason {
    pub(crate) const ALL: [CloseReason; 14] = [
        Self::ClientClosed,
        Self::ClientGone,
        Self::MessageTooBig,
        Self::ProtocolError,
        Self::InvalidPayload,
        Self::SlowConsumer,
        Self::WriteTimeout,
        Self::Unresponsive,
        Self::Shutdown,
        Self::WorkerIdLost,
        Self::Kicked,
        Self::TokenExpired,
        Self::BadCommand,
        Self::TooManyMessages,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::ClientClosed => "client_closed",
            Self::ClientGone => "client_gone",
            Self::MessageTooBig => "message_too_big",
            Self::ProtocolError => "protocol_error",
            Self::InvalidPayload => "invalid_payload",
            Self::SlowConsumer => "slow_consumer",
            Self::WriteTimeout => "write_timeout",
            Self::Unresponsive => "ping_timeout",
            Self::Shutdown => "shutdown",
            Self::WorkerIdLost => "worker_id_lost",
            Self::Kicked => "closed_by_backend",
            Self::TokenExpired => "token_expired",
            Self::BadCommand => "bad_command",
            Self::TooManyMessages => "too_many_messages",
        }
    }

    /// The close frame herald sends for this reason, if it sends one.
    pub(crate) fn frame(self) -> Option<CloseFrame> {
        let (code, reason) = match self {
            Self::ClientClosed | Self::ClientGone => return None,
            Self::MessageTooBig => (CloseCode::Size, "message too big"),
            Self::ProtocolError => (CloseCode::Protocol, "protocol error"),
            Self::InvalidPayload => (CloseCode::Invalid, "text message is not UTF-8"),
            Self::SlowConsumer => (CloseCode::Policy, "slow consumer: outbound queue overflowed"),
            Self::WriteTimeout => (CloseCode::Policy, "slow consumer: write timed out"),
            Self::Unresponsive => (CloseCode::Policy, "no answer to pings"),
            Self::Shutdown => (CloseCode::Away, "server shutting down"),
            Self::WorkerIdLost => (CloseCode::Error, "gateway lost its worker id"),
            Self::Kicked => (CloseCode::Library(KICKED), "closed by the server"),
            Self::TokenExpired => (CloseCode::Library(TOKEN_EXPIRED), "token expired"),
            Self::BadCommand => (CloseCode::Library(BAD_COMMAND), "not a command"),
            Self::TooManyMessages => (CloseCode::Policy, "too many messages: slow down"),
        };
        Some(CloseFrame { code, reason: reason.into() })
    }
}

impl CloseReason {
    /// Whether frames queued before the close are still written: yes when
    /// the gateway closes in order, no when the client is the problem.
    pub(crate) fn writes_queued(self) -> bool {
        matches!(self, Self::Shutdown | Self::WorkerIdLost | Self::Kicked)
    }
}
