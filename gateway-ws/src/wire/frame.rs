//! WebSocket frames as bytes (RFC 6455 §5), without I/O: reading a client
//! frame's header, unmasking its payload, and writing a server frame's
//! header. Everything a client controls is checked here, so that the reader
//! in [`super`] only moves bytes.

use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::WireError;

/// The longest header the server writes (it never masks).
pub(crate) const MAX_SERVER_HEADER_BYTES: usize = 10;
/// Control frames carry at most this much (§5.5).
const MAX_CONTROL_PAYLOAD: u64 = 125;

/// A frame's opcode (§5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    fn parse(bits: u8) -> Result<Self, WireError> {
        Ok(match bits {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return Err(WireError::Protocol("unknown opcode")),
        })
    }

    fn bits(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    pub(crate) fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// A client frame's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub fin: bool,
    pub opcode: OpCode,
    pub mask: [u8; 4],
    /// Bytes of the header itself.
    pub header_len: usize,
    /// Bytes of the payload that follows it.
    pub payload_len: usize,
}

impl Header {
    /// Bytes of the whole frame.
    pub(crate) fn frame_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// Reads the header at the start of `bytes`: `None` while it has not all
/// arrived. A frame whose payload is over `max_payload` is refused before
/// any of it is read, and so is anything a client must not send: reserved
/// bits (no extension is negotiated), unknown opcodes, unmasked frames, and
/// control frames that are fragmented or longer than 125 bytes.
pub(crate) fn parse_header(bytes: &[u8], max_payload: usize) -> Result<Option<Header>, WireError> {
    let [first, second, ..] = *bytes else { return Ok(None) };
    if first & 0x70 != 0 {
        return Err(WireError::Protocol("reserved bits set"));
    }
    let fin = first & 0x80 != 0;
    let opcode = OpCode::parse(first & 0x0F)?;
    if second & 0x80 == 0 {
        return Err(WireError::Protocol("client frame not masked"));
    }
    let (len, len_bytes) = match second & 0x7F {
        126 => match bytes.get(2..4) {
            Some(len) => (u64::from(u16::from_be_bytes([len[0], len[1]])), 2),
            None => return Ok(None),
        },
        127 => match bytes.get(2..10).and_then(|len| <[u8; 8]>::try_from(len).ok()) {
            Some(len) => (u64::from_be_bytes(len), 8),
            None => return Ok(None),
        },
        len => (u64::from(len), 0),
    };
    if opcode.is_control() && (!fin || len > MAX_CONTROL_PAYLOAD) {
        return Err(WireError::Protocol("fragmented or oversized control frame"));
    }
    if len >> 63 != 0 {
        return Err(WireError::Protocol("frame length has its top bit set"));
    }
    let payload_len = match usize::try_from(len) {
        Ok(len) if len <= max_payload => len,
        _ => return Err(WireError::MessageTooBig),
    };
    let header_len = 2 + len_bytes + 4;
    let Some(mask) = bytes.get(2 + len_bytes..header_len).and_then(|mask| <[u8; 4]>::try_from(mask).ok()) else {
        return Ok(None);
    };
    Ok(Some(Header { fin, opcode, mask, header_len, payload_len }))
}

/// The payload of `frame` (header included, wholly arrived), unmasked.
pub(crate) fn unmask(frame: &[u8], header: &Header) -> Vec<u8> {
    let mut payload = frame[header.header_len..header.frame_len()].to_vec();
    for (byte, key) in payload.iter_mut().zip(header.mask.iter().cycle()) {
        *byte ^= key;
    }
    payload
}

/// A close frame's payload as the client sent it (§5.5.1): nothing, or a
/// code and a UTF-8 reason. A code a client may not send is read as a
/// protocol error (1002), as tungstenite did.
pub(crate) fn close_frame(payload: Vec<u8>) -> Result<Option<CloseFrame>, WireError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(WireError::Protocol("close frame with a 1-byte payload")),
        _ => {
            let code = CloseCode::from(u16::from_be_bytes([payload[0], payload[1]]));
            let reason = String::from_utf8(payload[2..].to_vec()).map_err(|_| WireError::InvalidUtf8)?;
            if code.is_allowed() {
                Ok(Some(CloseFrame { code, reason: reason.into() }))
            } else {
                Ok(Some(CloseFrame { code: CloseCode::Protocol, reason: "Protocol violation".into() }))
            }
        }
    }
}

/// The opcode bits and payload `message` is written with. A close message
/// becomes a frame first ([`close_payload`]), since its payload is not
/// stored as bytes.
pub(crate) fn outgoing(message: &Message) -> (u8, &[u8]) {
    match message {
        Message::Text(text) => (OpCode::Text.bits(), text.as_bytes()),
        Message::Binary(bytes) => (OpCode::Binary.bits(), bytes),
        Message::Ping(bytes) => (OpCode::Ping.bits(), bytes),
        Message::Pong(bytes) => (OpCode::Pong.bits(), bytes),
        Message::Close(_) => (OpCode::Close.bits(), &[]),
        Message::Frame(frame) => (u8::from(frame.header().opcode), frame.payload()),
    }
}

/// A close message as a frame whose payload [`outgoing`] can write.
pub(crate) fn close_message(frame: Option<CloseFrame>) -> Message {
    Message::Frame(Frame::close(frame))
}

/// Writes the header of a final, unmasked frame into `out`; returns its
/// length.
pub(crate) fn write_header(out: &mut [u8; MAX_SERVER_HEADER_BYTES], opcode: u8, payload_len: usize) -> usize {
    out[0] = 0x80 | opcode;
    match payload_len {
        0..=125 => {
            // The match arm bounds it below 126.
            out[1] = payload_len as u8;
            2
        }
        126..=0xFFFF => {
            out[1] = 126;
            out[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
            4
        }
        _ => {
            out[1] = 127;
            out[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
            10
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A masked client frame, as a browser sends it.
    pub(crate) fn client_frame(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut frame = vec![first];
        match payload.len() {
            len @ 0..=125 => frame.push(0x80 | len as u8),
            len @ 126..=0xFFFF => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, k)| b ^ k));
        frame
    }

    #[test]
    fn a_masked_text_frame_is_read_and_unmasked() {
        let frame = client_frame(0x81, b"hello", [1, 2, 3, 4]);
        let header = parse_header(&frame, 1024).unwrap().unwrap();
        assert_eq!((header.fin, header.opcode, header.header_len, header.payload_len), (true, OpCode::Text, 6, 5));
        assert_eq!(unmask(&frame, &header), b"hello");
    }

    #[test]
    fn a_header_is_incomplete_until_its_mask_has_arrived() {
        let frame = client_frame(0x82, &[7; 300], [9, 9, 9, 9]);
        for cut in 0..8 {
            assert_eq!(parse_header(&frame[..cut], 1024).unwrap(), None, "{cut} bytes");
        }
        let header = parse_header(&frame[..8], 1024).unwrap().unwrap();
        assert_eq!((header.header_len, header.payload_len), (8, 300));
    }

    #[test]
    fn every_length_encoding_is_read() {
        for len in [0, 125, 126, 65_535, 65_536] {
            let frame = client_frame(0x82, &vec![1; len], [0; 4]);
            let header = parse_header(&frame, 1 << 20).unwrap().unwrap();
            assert_eq!(header.payload_len, len);
            assert_eq!(header.frame_len(), frame.len());
        }
    }

    #[test]
    fn what_a_client_must_not_send_is_a_protocol_error() {
        let bad: [(&str, Vec<u8>); 5] = [
            ("reserved bit", client_frame(0xC1, b"x", [0; 4])),
            ("unknown opcode", client_frame(0x83, b"x", [0; 4])),
            ("unmasked", vec![0x81, 0x01, b'x']),
            ("fragmented ping", client_frame(0x09, b"x", [0; 4])),
            ("long ping", client_frame(0x89, &[0; 126], [0; 4])),
        ];
        for (what, frame) in bad {
            assert!(matches!(parse_header(&frame, 1024), Err(WireError::Protocol(_))), "{what}");
        }
        let mut huge = vec![0x82, 0x80 | 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert!(matches!(parse_header(&huge, usize::MAX), Err(WireError::Protocol(_))));
    }

    #[test]
    fn a_frame_over_the_limit_is_refused_from_its_header() {
        let header_only = &client_frame(0x82, &[0; 2000], [0; 4])[..8];
        assert!(matches!(parse_header(header_only, 1999), Err(WireError::MessageTooBig)));
        assert!(parse_header(header_only, 2000).unwrap().is_some());
    }

    #[test]
    fn close_payloads_are_read_as_tungstenite_read_them() {
        assert_eq!(close_frame(Vec::new()).unwrap(), None);
        assert!(matches!(close_frame(vec![3]), Err(WireError::Protocol(_))));
        let normal = close_frame([&1000u16.to_be_bytes()[..], b"bye"].concat()).unwrap().unwrap();
        assert_eq!((u16::from(normal.code), normal.reason.as_str()), (1000, "bye"));
        let reserved = close_frame(1005u16.to_be_bytes().to_vec()).unwrap().unwrap();
        assert_eq!(u16::from(reserved.code), 1002);
        assert!(matches!(close_frame(vec![0x03, 0xE8, 0xFF]), Err(WireError::InvalidUtf8)));
    }

    #[test]
    fn server_headers_use_the_shortest_length() {
        let mut out = [0; MAX_SERVER_HEADER_BYTES];
        assert_eq!((write_header(&mut out, 0x1, 5), &out[..2]), (2, &[0x81, 5][..]));
        assert_eq!((write_header(&mut out, 0x2, 126), &out[..4]), (4, &[0x82, 126, 0, 126][..]));
        assert_eq!(write_header(&mut out, 0x9, 70_000), 10);
        assert_eq!(&out[..10], &[0x89, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
    }

    #[test]
    fn a_close_frame_is_written_with_its_code_and_reason() {
        let frame = CloseFrame { code: CloseCode::Away, reason: "going".into() };
        let message = close_message(Some(frame));
        assert_eq!(outgoing(&message), (0x8, &[0x03, 0xE9, b'g', b'o', b'i', b'n', b'g'][..]));
        assert_eq!(outgoing(&close_message(None)), (0x8, &[][..]));
    }
}
