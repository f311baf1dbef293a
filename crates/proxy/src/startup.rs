//! The startup phase: untagged packets until a StartupMessage or CancelRequest arrives.

use std::io;

use bytes::{Buf, BytesMut};
use weir_wire::backend;
use weir_wire::frame::{self, FrameError};
use weir_wire::frontend::{CancelKey, Malformed, Startup, StartupPacket};
use weir_wire::{ErrorResponse, SqlState};

use crate::stream::Stream;

/// What a new connection asked for.
#[derive(Debug)]
pub enum Hello {
    Startup(Startup),
    Cancel(CancelKey),
    /// An SSLRequest Weir will honour: answer 'S' and hand the socket to TLS.
    SslRequest,
    /// A TLS handshake without an SSLRequest (PostgreSQL 17's direct TLS); its first bytes
    /// are in the buffer.
    DirectTls,
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("client closed the connection during startup")]
    Closed,
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Malformed(#[from] Malformed),
    #[error("unsupported frontend protocol {}.{}: server supports 3.0", .0 >> 16, .0 & 0xffff)]
    Version(u32),
    #[error("unexpected data after an encryption request")]
    DataAfterSslRequest,
}

impl StartupError {
    /// The error to send the client, if the connection can still carry one.
    pub fn to_response(&self) -> Option<ErrorResponse> {
        match self {
            StartupError::Closed | StartupError::Io(_) => None,
            StartupError::Version(_) => Some(ErrorResponse::fatal(
                SqlState::FEATURE_NOT_SUPPORTED,
                self.to_string(),
            )),
            _ => Some(ErrorResponse::fatal(
                SqlState::PROTOCOL_VIOLATION,
                self.to_string(),
            )),
        }
    }
}

/// TLS record type of a handshake: the first byte of a direct TLS connection.
const TLS_HANDSHAKE: u8 = 0x16;

/// Reads packets until a StartupMessage or CancelRequest. With `tls` (TLS is on and the
/// connection is not encrypted yet) an SSLRequest or a direct TLS handshake is returned for
/// the caller to upgrade; otherwise SSL and GSSAPI encryption requests are declined with
/// 'N'. A newer 3.x minor version or `_pq_.` options get a NegotiateProtocolVersion naming
/// what Weir speaks.
pub async fn read_hello(
    stream: &mut Stream,
    buf: &mut BytesMut,
    tls: bool,
) -> Result<Hello, StartupError> {
    loop {
        while buf.is_empty() {
            buf.reserve(1024);
            if stream.read_buf(buf).await? == 0 {
                return Err(StartupError::Closed);
            }
        }
        if tls && buf[0] == TLS_HANDSHAKE {
            return Ok(Hello::DirectTls);
        }
        let len = loop {
            if let Some(len) = frame::startup_packet_len(buf)? {
                break len;
            }
            buf.reserve(1024);
            if stream.read_buf(buf).await? == 0 {
                return Err(StartupError::Closed);
            }
        };
        let packet = StartupPacket::decode(&buf[..len])?;
        buf.advance(len);
        match packet {
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                // Anything already sent after the request would be read as if encrypted
                // later; refuse it rather than mix trust levels (CVE-2021-23214).
                if !buf.is_empty() {
                    return Err(StartupError::DataAfterSslRequest);
                }
                if tls && matches!(packet, StartupPacket::SslRequest) {
                    return Ok(Hello::SslRequest);
                }
                stream.write_all(b"N").await?;
            }
            StartupPacket::Cancel(key) => return Ok(Hello::Cancel(key)),
            StartupPacket::Unsupported { version } => return Err(StartupError::Version(version)),
            StartupPacket::Startup(mut s) => {
                let unrecognized: Vec<String> = s
                    .params
                    .iter()
                    .filter(|(k, _)| k.starts_with("_pq_."))
                    .map(|(k, _)| k.clone())
                    .collect();
                if s.minor > 0 || !unrecognized.is_empty() {
                    let mut out = BytesMut::new();
                    let names: Vec<&str> = unrecognized.iter().map(String::as_str).collect();
                    backend::encode_negotiate_protocol_version(&mut out, 0, &names);
                    stream.write_all(&out).await?;
                    s.params.retain(|(k, _)| !k.starts_with("_pq_."));
                    s.minor = 0;
                }
                return Ok(Hello::Startup(s));
            }
        }
    }
}

/// Reads one whole tagged message during login. Not for the hot path.
pub async fn read_message(
    stream: &mut Stream,
    buf: &mut BytesMut,
    limit: u32,
) -> Result<(u8, BytesMut), StartupError> {
    loop {
        if let Some(h) = frame::Header::parse(buf, limit)?
            && buf.len() >= h.total_len()
        {
            let mut msg = buf.split_to(h.total_len());
            msg.advance(frame::HEADER_LEN);
            return Ok((h.tag, msg));
        }
        buf.reserve(1024);
        if stream.read_buf(buf).await? == 0 {
            return Err(StartupError::Closed);
        }
    }
}
