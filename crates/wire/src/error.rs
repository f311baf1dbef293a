//! SQLSTATE codes and the ErrorResponse / NoticeResponse that Weir raises itself.

use bytes::BytesMut;

use crate::{put_cstr, put_message};

/// A five-character SQLSTATE. Constants name the ones Weir raises; any code read from a server
/// is kept as the bytes it sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SqlState(pub [u8; 5]);

impl SqlState {
    pub const PROTOCOL_VIOLATION: SqlState = SqlState(*b"08P01");
    pub const CONNECTION_FAILURE: SqlState = SqlState(*b"08006");
    pub const CANNOT_CONNECT: SqlState = SqlState(*b"08001");
    pub const INVALID_AUTHORIZATION: SqlState = SqlState(*b"28000");
    pub const INVALID_PASSWORD: SqlState = SqlState(*b"28P01");
    pub const INVALID_CATALOG_NAME: SqlState = SqlState(*b"3D000");
    pub const TOO_MANY_CONNECTIONS: SqlState = SqlState(*b"53300");
    pub const PROGRAM_LIMIT_EXCEEDED: SqlState = SqlState(*b"54000");
    pub const QUERY_CANCELED: SqlState = SqlState(*b"57014");
    pub const ADMIN_SHUTDOWN: SqlState = SqlState(*b"57P01");
    pub const CANNOT_CONNECT_NOW: SqlState = SqlState(*b"57P03");
    pub const FEATURE_NOT_SUPPORTED: SqlState = SqlState(*b"0A000");
    pub const INVALID_SQL_STATEMENT_NAME: SqlState = SqlState(*b"26000");
    pub const INTERNAL_ERROR: SqlState = SqlState(*b"XX000");
    pub const SUCCESSFUL_COMPLETION: SqlState = SqlState(*b"00000");
    pub const WARNING: SqlState = SqlState(*b"01000");

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("XX000")
    }

    pub fn from_bytes(b: &[u8]) -> Option<SqlState> {
        <[u8; 5]>::try_from(b).ok().map(SqlState)
    }
}

impl std::fmt::Display for SqlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
    Warning,
    Notice,
    Log,
}

impl Severity {
    fn as_bytes(self) -> &'static [u8] {
        match self {
            Severity::Error => b"ERROR",
            Severity::Fatal => b"FATAL",
            Severity::Warning => b"WARNING",
            Severity::Notice => b"NOTICE",
            Severity::Log => b"LOG",
        }
    }
}

/// An error (or notice) as a client will see it. Built by Weir, or parsed from a server's
/// ErrorResponse to learn its code and severity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorResponse {
    pub severity: Severity,
    pub code: SqlState,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ErrorResponse {
    pub fn new(severity: Severity, code: SqlState, message: impl Into<String>) -> Self {
        ErrorResponse {
            severity,
            code,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn error(code: SqlState, message: impl Into<String>) -> Self {
        Self::new(Severity::Error, code, message)
    }

    pub fn fatal(code: SqlState, message: impl Into<String>) -> Self {
        Self::new(Severity::Fatal, code, message)
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Encodes as ErrorResponse ('E'), or NoticeResponse ('N') for warning/notice/log.
    pub fn encode(&self, dst: &mut BytesMut) {
        let tag = match self.severity {
            Severity::Error | Severity::Fatal => crate::backend::tag::ERROR_RESPONSE,
            _ => crate::backend::tag::NOTICE_RESPONSE,
        };
        put_message(dst, tag, |b| {
            b.extend_from_slice(b"S");
            put_cstr(b, self.severity.as_bytes());
            b.extend_from_slice(b"V");
            put_cstr(b, self.severity.as_bytes());
            b.extend_from_slice(b"C");
            put_cstr(b, &self.code.0);
            b.extend_from_slice(b"M");
            put_cstr(b, self.message.as_bytes());
            if let Some(d) = &self.detail {
                b.extend_from_slice(b"D");
                put_cstr(b, d.as_bytes());
            }
            if let Some(h) = &self.hint {
                b.extend_from_slice(b"H");
                put_cstr(b, h.as_bytes());
            }
            b.extend_from_slice(&[0]);
        });
    }

    /// Decodes the body of an ErrorResponse or NoticeResponse. Unknown fields are skipped;
    /// a missing code reads as XX000.
    pub fn decode(body: &[u8]) -> Option<ErrorResponse> {
        let mut rest = body;
        let mut out = ErrorResponse::error(SqlState::INTERNAL_ERROR, "");
        let mut severity_v: Option<Severity> = None;
        let mut severity_s: Option<Severity> = None;
        loop {
            let (&field, after) = rest.split_first()?;
            if field == 0 {
                break;
            }
            let (value, after) = crate::split_cstr(after)?;
            rest = after;
            let text = || String::from_utf8_lossy(value).into_owned();
            match field {
                b'V' => severity_v = parse_severity(value),
                b'S' => severity_s = parse_severity(value),
                b'C' => out.code = SqlState::from_bytes(value).unwrap_or(SqlState::INTERNAL_ERROR),
                b'M' => out.message = text(),
                b'D' => out.detail = Some(text()),
                b'H' => out.hint = Some(text()),
                _ => {}
            }
        }
        out.severity = severity_v.or(severity_s).unwrap_or(Severity::Error);
        Some(out)
    }
}

/// The value of one field (`b'R'`: the routine that raised it, ...) of an ErrorResponse or
/// NoticeResponse body, without decoding the rest.
pub fn field(body: &[u8], code: u8) -> Option<&[u8]> {
    let mut rest = body;
    loop {
        let (&f, after) = rest.split_first()?;
        if f == 0 {
            return None;
        }
        let (value, after) = crate::split_cstr(after)?;
        if f == code {
            return Some(value);
        }
        rest = after;
    }
}

fn parse_severity(v: &[u8]) -> Option<Severity> {
    Some(match v {
        b"ERROR" => Severity::Error,
        b"FATAL" | b"PANIC" => Severity::Fatal,
        b"WARNING" => Severity::Warning,
        b"NOTICE" | b"DEBUG" | b"INFO" => Severity::Notice,
        b"LOG" => Severity::Log,
        _ => return None,
    })
}

impl std::fmt::Display for ErrorResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame;

    #[test]
    fn round_trip() {
        let e = ErrorResponse::error(SqlState::TOO_MANY_CONNECTIONS, "pool full")
            .with_detail("waited 5 s")
            .with_hint("raise pool_size");
        let mut buf = BytesMut::new();
        e.encode(&mut buf);
        let (h, body) = frame::complete(&buf, 1 << 20).unwrap().unwrap();
        assert_eq!(h.tag, b'E');
        assert_eq!(h.total_len(), buf.len());
        assert_eq!(ErrorResponse::decode(body).unwrap(), e);
    }

    #[test]
    fn notice_uses_n_tag() {
        let mut buf = BytesMut::new();
        ErrorResponse::new(Severity::Warning, SqlState::WARNING, "w").encode(&mut buf);
        assert_eq!(buf[0], b'N');
    }

    #[test]
    fn decode_rejects_truncated() {
        assert!(ErrorResponse::decode(b"SERROR").is_none());
        assert!(ErrorResponse::decode(b"").is_none());
    }
}
