//! The PostgreSQL v3 wire protocol as Weir needs it. No sockets live here.
//!
//! Layout:
//! - [`frame`]: splitting a byte stream into messages. Every length is checked against a limit
//!   before anything is allocated; a short buffer means "read more", never an error.
//! - [`frontend`]: messages a client sends (startup packets, Query, Parse, Bind, ...), decoded
//!   zero-copy from a complete frame, and encoders for the ones Weir writes to servers.
//! - [`backend`]: messages a server sends, with encoders for those Weir synthesises and decoders
//!   for the few it must look inside (ReadyForQuery, ErrorResponse, ParameterStatus, ...).
//! - [`error`]: SQLSTATE codes and the ErrorResponse Weir raises itself.
//! - [`scram`]: the server side of SCRAM-SHA-256 (the client side comes from `postgres-protocol`).
//! - [`md5`]: PostgreSQL's md5 password scheme.
//!
//! Hot-path rule: relayed messages are forwarded as the bytes that arrived; only the handful
//! Weir rewrites are decoded into these types.

pub mod backend;
pub mod error;
pub mod frame;
pub mod frontend;
pub mod md5;
pub mod scram;

pub use error::{ErrorResponse, Severity, SqlState};
pub use frame::{FrameError, Header};

/// Reads a NUL-terminated string from the front of `buf`, returning it (without the NUL) and
/// the rest. `None` if there is no NUL.
pub fn split_cstr(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    // Names (portals, statements) are mostly empty or a few bytes: a plain look at the first
    // bytes costs less than memchr's setup; long strings (query text) go to memchr.
    let nul = match buf.iter().take(16).position(|&b| b == 0) {
        Some(i) => i,
        None => 16 + memchr::memchr(0, buf.get(16..)?)?,
    };
    Some((&buf[..nul], &buf[nul + 1..]))
}

/// [`split_cstr`] for a string expected to be long (query text): memchr at once.
pub fn split_text(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = memchr::memchr(0, buf)?;
    Some((&buf[..nul], &buf[nul + 1..]))
}

/// Appends `s` and a terminating NUL.
pub fn put_cstr(dst: &mut bytes::BytesMut, s: &[u8]) {
    dst.extend_from_slice(s);
    dst.extend_from_slice(&[0]);
}

/// Writes a message: tag, a length placeholder, the body written by `body`, then patches the
/// length. Keeps every encoder honest about the length field.
pub fn put_message(dst: &mut bytes::BytesMut, tag: u8, body: impl FnOnce(&mut bytes::BytesMut)) {
    dst.extend_from_slice(&[tag, 0, 0, 0, 0]);
    let start = dst.len() - 4;
    body(dst);
    let len = (dst.len() - start) as u32;
    dst[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::{split_cstr, split_text};

    #[test]
    fn split_cstr_finds_the_first_nul_at_any_length() {
        assert_eq!(
            split_text(b"select 1\0x"),
            Some((&b"select 1"[..], &b"x"[..]))
        );
        assert_eq!(split_text(b"select 1"), None);
        assert_eq!(split_cstr(b"\0rest"), Some((&b""[..], &b"rest"[..])));
        assert_eq!(split_cstr(b"P0_1\0x"), Some((&b"P0_1"[..], &b"x"[..])));
        assert_eq!(split_cstr(b"no nul"), None);
        assert_eq!(split_cstr(b""), None);
        // Across the 16-byte look-ahead, and exactly at its end.
        for len in [15, 16, 17, 40, 200] {
            let mut buf = vec![b'a'; len];
            buf.extend_from_slice(b"\0tail\0");
            let (s, rest) = split_cstr(&buf).unwrap();
            assert_eq!((s.len(), rest), (len, &b"tail\0"[..]), "length {len}");
            assert_eq!(split_cstr(&vec![b'a'; len]), None, "no nul, length {len}");
        }
    }
}
