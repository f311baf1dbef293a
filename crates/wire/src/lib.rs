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
