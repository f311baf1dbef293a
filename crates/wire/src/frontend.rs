//! Messages a client sends. Decoders borrow from a complete frame's body; encoders write the
//! messages Weir sends to servers itself (startup, queries it injects, rewritten statements).

use bytes::{BufMut, BytesMut};

use crate::{put_cstr, put_message, split_cstr, split_text};

/// Frontend message tags.
pub mod tag {
    pub const QUERY: u8 = b'Q';
    pub const PARSE: u8 = b'P';
    pub const BIND: u8 = b'B';
    pub const DESCRIBE: u8 = b'D';
    pub const EXECUTE: u8 = b'E';
    pub const CLOSE: u8 = b'C';
    pub const SYNC: u8 = b'S';
    pub const FLUSH: u8 = b'H';
    pub const TERMINATE: u8 = b'X';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';
    pub const FUNCTION_CALL: u8 = b'F';
    /// PasswordMessage, SASLInitialResponse and SASLResponse share this tag.
    pub const PASSWORD: u8 = b'p';
}

/// Codes carried in the version field of untagged startup-phase packets.
pub mod code {
    pub const PROTOCOL_3: u32 = 3 << 16;
    pub const CANCEL_REQUEST: u32 = 80877102;
    pub const SSL_REQUEST: u32 = 80877103;
    pub const GSSENC_REQUEST: u32 = 80877104;
}

/// Why a message body could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what} message")]
pub struct Malformed {
    pub what: &'static str,
}

fn malformed(what: &'static str) -> Malformed {
    Malformed { what }
}

/// The process id and secret a client presents to cancel its query. Weir hands out its own;
/// the server's key is a different type ([`crate::backend::BackendKey`]) so they cannot mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CancelKey {
    pub pid: i32,
    pub secret: i32,
}

/// The first packet a client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel(CancelKey),
    Startup(Startup),
    /// A protocol major version other than 3.
    Unsupported {
        version: u32,
    },
}

/// A protocol 3.x StartupMessage.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Startup {
    pub minor: u16,
    /// Parameters in the order sent, `user` and `database` included.
    pub params: Vec<(String, String)>,
}

impl Startup {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn encode(&self, dst: &mut BytesMut) {
        let start = dst.len();
        dst.put_u32(0);
        dst.put_u32(code::PROTOCOL_3 | u32::from(self.minor));
        for (k, v) in &self.params {
            put_cstr(dst, k.as_bytes());
            put_cstr(dst, v.as_bytes());
        }
        dst.put_u8(0);
        let len = (dst.len() - start) as u32;
        dst[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }
}

impl StartupPacket {
    /// Decodes a whole startup packet (length prefix included), as framed by
    /// [`crate::frame::startup_packet_len`].
    pub fn decode(packet: &[u8]) -> Result<StartupPacket, Malformed> {
        let body = packet.get(4..).ok_or(malformed("startup"))?;
        let version = u32::from_be_bytes(
            body.get(..4)
                .ok_or(malformed("startup"))?
                .try_into()
                .unwrap(),
        );
        let rest = &body[4..];
        match version {
            code::SSL_REQUEST => Ok(StartupPacket::SslRequest),
            code::GSSENC_REQUEST => Ok(StartupPacket::GssEncRequest),
            code::CANCEL_REQUEST => {
                if rest.len() != 8 {
                    return Err(malformed("CancelRequest"));
                }
                Ok(StartupPacket::Cancel(CancelKey {
                    pid: i32::from_be_bytes(rest[..4].try_into().unwrap()),
                    secret: i32::from_be_bytes(rest[4..8].try_into().unwrap()),
                }))
            }
            v if v >> 16 == 3 => {
                let mut params = Vec::new();
                let mut rest = rest;
                loop {
                    let (key, after) = split_cstr(rest).ok_or(malformed("StartupMessage"))?;
                    if key.is_empty() {
                        if !after.is_empty() {
                            return Err(malformed("StartupMessage"));
                        }
                        break;
                    }
                    let (value, after) = split_cstr(after).ok_or(malformed("StartupMessage"))?;
                    let key =
                        String::from_utf8(key.to_vec()).map_err(|_| malformed("StartupMessage"))?;
                    let value = String::from_utf8(value.to_vec())
                        .map_err(|_| malformed("StartupMessage"))?;
                    params.push((key, value));
                    rest = after;
                }
                Ok(StartupPacket::Startup(Startup {
                    minor: (v & 0xffff) as u16,
                    params,
                }))
            }
            v => Ok(StartupPacket::Unsupported { version: v }),
        }
    }
}

/// Encodes a CancelRequest packet.
pub fn encode_cancel_request(dst: &mut BytesMut, pid: i32, secret: i32) {
    dst.put_u32(16);
    dst.put_u32(code::CANCEL_REQUEST);
    dst.put_i32(pid);
    dst.put_i32(secret);
}

/// Simple Query: the SQL text without its NUL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query<'a> {
    pub sql: &'a [u8],
}

impl<'a> Query<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self, Malformed> {
        let (sql, rest) = split_text(body).ok_or(malformed("Query"))?;
        if !rest.is_empty() {
            return Err(malformed("Query"));
        }
        Ok(Query { sql })
    }

    pub fn encode(&self, dst: &mut BytesMut) {
        put_message(dst, tag::QUERY, |b| put_cstr(b, self.sql));
    }
}

/// Parse: statement name, query text, and the parameter-type section kept raw
/// (an int16 count and that many OIDs) since Weir never needs the types one by one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parse<'a> {
    pub name: &'a [u8],
    pub query: &'a [u8],
    pub param_types: &'a [u8],
}

impl<'a> Parse<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self, Malformed> {
        let (name, rest) = split_cstr(body).ok_or(malformed("Parse"))?;
        let (query, rest) = split_text(rest).ok_or(malformed("Parse"))?;
        if rest.len() < 2 {
            return Err(malformed("Parse"));
        }
        let n = i16::from_be_bytes([rest[0], rest[1]]);
        if n < 0 || rest.len() != 2 + 4 * n as usize {
            return Err(malformed("Parse"));
        }
        Ok(Parse {
            name,
            query,
            param_types: rest,
        })
    }

    pub fn encode(&self, dst: &mut BytesMut) {
        put_message(dst, tag::PARSE, |b| {
            put_cstr(b, self.name);
            put_cstr(b, self.query);
            b.extend_from_slice(self.param_types);
        });
    }
}

/// Bind: portal and statement names; formats, parameters and result formats stay raw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a [u8],
    pub statement: &'a [u8],
    pub rest: &'a [u8],
}

impl<'a> Bind<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self, Malformed> {
        let (portal, rest) = split_cstr(body).ok_or(malformed("Bind"))?;
        let (statement, rest) = split_cstr(rest).ok_or(malformed("Bind"))?;
        Ok(Bind {
            portal,
            statement,
            rest,
        })
    }

    pub fn encode(&self, dst: &mut BytesMut) {
        put_message(dst, tag::BIND, |b| {
            put_cstr(b, self.portal);
            put_cstr(b, self.statement);
            b.extend_from_slice(self.rest);
        });
    }
}

/// Whether a Describe or Close names a prepared statement or a portal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Statement,
    Portal,
}

impl Target {
    fn decode(b: u8) -> Option<Target> {
        match b {
            b'S' => Some(Target::Statement),
            b'P' => Some(Target::Portal),
            _ => None,
        }
    }

    fn byte(self) -> u8 {
        match self {
            Target::Statement => b'S',
            Target::Portal => b'P',
        }
    }
}

/// Describe or Close: the same shape under two tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Named<'a> {
    pub target: Target,
    pub name: &'a [u8],
}

impl<'a> Named<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self, Malformed> {
        let (&kind, rest) = body.split_first().ok_or(malformed("Describe/Close"))?;
        let target = Target::decode(kind).ok_or(malformed("Describe/Close"))?;
        let (name, rest) = split_cstr(rest).ok_or(malformed("Describe/Close"))?;
        if !rest.is_empty() {
            return Err(malformed("Describe/Close"));
        }
        Ok(Named { target, name })
    }

    /// `tag` is [`tag::DESCRIBE`] or [`tag::CLOSE`].
    pub fn encode(&self, tag: u8, dst: &mut BytesMut) {
        put_message(dst, tag, |b| {
            b.put_u8(self.target.byte());
            put_cstr(b, self.name);
        });
    }
}

/// Sync, Flush and Terminate carry no body.
pub fn encode_empty(tag: u8, dst: &mut BytesMut) {
    put_message(dst, tag, |_| {});
}

/// PasswordMessage: a NUL-terminated password or md5 digest.
pub fn decode_password(body: &[u8]) -> Result<&[u8], Malformed> {
    match split_cstr(body) {
        Some((pw, [])) => Ok(pw),
        _ => Err(malformed("PasswordMessage")),
    }
}

/// SASLInitialResponse: mechanism name and the client-first message.
pub fn decode_sasl_initial(body: &[u8]) -> Result<(&[u8], &[u8]), Malformed> {
    let (mech, rest) = split_cstr(body).ok_or(malformed("SASLInitialResponse"))?;
    if rest.len() < 4 {
        return Err(malformed("SASLInitialResponse"));
    }
    let len = i32::from_be_bytes(rest[..4].try_into().unwrap());
    let data = &rest[4..];
    if len < 0 || len as usize != data.len() {
        return Err(malformed("SASLInitialResponse"));
    }
    Ok((mech, data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame;

    fn body_of(buf: &BytesMut, want_tag: u8) -> &[u8] {
        let (h, body) = frame::complete(buf, 1 << 20).unwrap().unwrap();
        assert_eq!(h.tag, want_tag);
        assert_eq!(h.total_len(), buf.len());
        body
    }

    #[test]
    fn startup_round_trip() {
        let s = Startup {
            minor: 0,
            params: vec![
                ("user".into(), "alice".into()),
                ("database".into(), "app".into()),
            ],
        };
        let mut buf = BytesMut::new();
        s.encode(&mut buf);
        assert_eq!(frame::startup_packet_len(&buf).unwrap(), Some(buf.len()));
        assert_eq!(
            StartupPacket::decode(&buf).unwrap(),
            StartupPacket::Startup(s)
        );
    }

    #[test]
    fn startup_special_codes() {
        let mut buf = BytesMut::new();
        encode_cancel_request(&mut buf, 42, -7);
        assert_eq!(
            StartupPacket::decode(&buf).unwrap(),
            StartupPacket::Cancel(CancelKey {
                pid: 42,
                secret: -7
            })
        );
        let ssl = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        assert_eq!(
            StartupPacket::decode(&ssl).unwrap(),
            StartupPacket::SslRequest
        );
        let v2 = [0, 0, 0, 8, 0, 2, 0, 0];
        assert_eq!(
            StartupPacket::decode(&v2).unwrap(),
            StartupPacket::Unsupported { version: 2 << 16 }
        );
    }

    #[test]
    fn startup_rejects_unterminated_params() {
        let mut pkt = vec![0, 0, 0, 0, 0, 3, 0, 0];
        pkt.extend_from_slice(b"user\0alice");
        assert!(StartupPacket::decode(&pkt).is_err());
    }

    #[test]
    fn query_round_trip() {
        let mut buf = BytesMut::new();
        Query { sql: b"select 1" }.encode(&mut buf);
        assert_eq!(Query::decode(body_of(&buf, b'Q')).unwrap().sql, b"select 1");
    }

    #[test]
    fn parse_round_trip() {
        let types = [0u8, 1, 0, 0, 0, 23];
        let p = Parse {
            name: b"s1",
            query: b"select $1",
            param_types: &types,
        };
        let mut buf = BytesMut::new();
        p.encode(&mut buf);
        assert_eq!(Parse::decode(body_of(&buf, b'P')).unwrap(), p);
    }

    #[test]
    fn parse_rejects_bad_type_count() {
        assert!(Parse::decode(b"s\0q\0\0\x02\0\0\0\x17").is_err());
        assert!(Parse::decode(b"s\0q\0\xff\xff").is_err());
    }

    #[test]
    fn bind_round_trip() {
        let b = Bind {
            portal: b"",
            statement: b"s1",
            rest: &[0, 0, 0, 0, 0, 0],
        };
        let mut buf = BytesMut::new();
        b.encode(&mut buf);
        assert_eq!(Bind::decode(body_of(&buf, b'B')).unwrap(), b);
    }

    #[test]
    fn describe_close_round_trip() {
        for (tag, target) in [
            (tag::DESCRIBE, Target::Statement),
            (tag::CLOSE, Target::Portal),
        ] {
            let n = Named { target, name: b"x" };
            let mut buf = BytesMut::new();
            n.encode(tag, &mut buf);
            assert_eq!(Named::decode(body_of(&buf, tag)).unwrap(), n);
        }
        assert!(Named::decode(b"Qx\0").is_err());
    }

    #[test]
    fn sasl_initial_checks_length() {
        assert_eq!(
            decode_sasl_initial(b"SCRAM-SHA-256\0\0\0\0\x02hi").unwrap(),
            (&b"SCRAM-SHA-256"[..], &b"hi"[..])
        );
        assert!(decode_sasl_initial(b"SCRAM-SHA-256\0\0\0\0\x09hi").is_err());
    }
}
