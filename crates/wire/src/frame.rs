//! Framing: find message boundaries in a byte stream without trusting the peer's lengths.

/// Length of a regular message header: one tag byte and a four-byte length.
pub const HEADER_LEN: usize = 5;

/// PostgreSQL's own ceiling for a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_LEN: u32 = 10_000;

/// Why a frame could not be accepted. Each is fatal for the connection: after a bad length the
/// stream cannot be resynchronised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("invalid message length {len} for message type '{}'", char::from(*tag))]
    LengthTooShort { tag: u8, len: u32 },
    #[error("message type '{}' of {len} bytes exceeds the limit of {limit} bytes", char::from(*tag))]
    TooLarge { tag: u8, len: u32, limit: u32 },
    #[error("invalid startup packet length {len} (allowed: 8 to {MAX_STARTUP_LEN})")]
    BadStartupLength { len: u32 },
}

/// The header of a tagged message. `len` counts itself but not the tag, as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    pub len: u32,
}

impl Header {
    /// Parses the header at the front of `buf`. `Ok(None)` means fewer than five bytes are
    /// available. A length below 4 or above `limit` is an error.
    #[inline]
    pub fn parse(buf: &[u8], limit: u32) -> Result<Option<Header>, FrameError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let tag = buf[0];
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
        if len < 4 {
            return Err(FrameError::LengthTooShort { tag, len });
        }
        if len > limit {
            return Err(FrameError::TooLarge { tag, len, limit });
        }
        Ok(Some(Header { tag, len }))
    }

    /// Bytes of the whole message including the tag.
    #[inline]
    pub fn total_len(&self) -> usize {
        self.len as usize + 1
    }

    /// Bytes of the body (after tag and length).
    #[inline]
    pub fn body_len(&self) -> usize {
        self.len as usize - 4
    }
}

/// If `buf` starts with a complete tagged message, returns its header and body.
#[inline]
pub fn complete(buf: &[u8], limit: u32) -> Result<Option<(Header, &[u8])>, FrameError> {
    match Header::parse(buf, limit)? {
        Some(h) if buf.len() >= h.total_len() => {
            Some(Ok((h, &buf[HEADER_LEN..h.total_len()]))).transpose()
        }
        _ => Ok(None),
    }
}

/// Startup-phase packets have no tag: a four-byte length, then the body. Returns the total
/// length once the whole packet is in `buf`.
pub fn startup_packet_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if !(8..=MAX_STARTUP_LEN).contains(&len) {
        return Err(FrameError::BadStartupLength { len });
    }
    Ok((buf.len() >= len as usize).then_some(len as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_buffer_means_read_more() {
        assert_eq!(Header::parse(b"Q\0\0", 100), Ok(None));
        assert_eq!(complete(b"Q\0\0\0\x09ab", 100), Ok(None));
    }

    #[test]
    fn rejects_lengths_below_four_and_above_limit() {
        assert_eq!(
            Header::parse(b"Q\0\0\0\x03", 100),
            Err(FrameError::LengthTooShort { tag: b'Q', len: 3 })
        );
        let huge = [b'Q', 0x80, 0, 0, 0];
        assert_eq!(
            Header::parse(&huge, 1 << 20),
            Err(FrameError::TooLarge {
                tag: b'Q',
                len: 1 << 31,
                limit: 1 << 20
            })
        );
    }

    #[test]
    fn complete_message_splits_body() {
        let (h, body) = complete(b"Q\0\0\0\x07ab\0rest", 100).unwrap().unwrap();
        assert_eq!(h, Header { tag: b'Q', len: 7 });
        assert_eq!(body, b"ab\0");
        assert_eq!(h.total_len(), 8);
    }

    #[test]
    fn startup_length_is_bounded() {
        assert_eq!(startup_packet_len(&[0, 0]), Ok(None));
        assert_eq!(startup_packet_len(&[0, 0, 0, 8, 1, 2]), Ok(None));
        assert_eq!(startup_packet_len(&[0, 0, 0, 8, 1, 2, 3, 4]), Ok(Some(8)));
        assert!(startup_packet_len(&[0, 0, 0, 4]).is_err());
        assert!(startup_packet_len(&100_000u32.to_be_bytes()).is_err());
    }
}
